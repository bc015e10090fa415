//! File descriptors a management process hands over: `-add-fd` and the monitor's `add-fd`,
//! `remove-fd` and `query-fdsets` (descriptor sets, opened as `/dev/fdset/N`), and `getfd`
//! and `closefd` (descriptors a monitor keeps by name). The sets themselves are the block
//! layer's ([`ferrite_block::fdset`]), where the `file` driver opens them.

use ferrite_block::fdset;
use ferrite_qapi::{Args, Error};
use ferrite_qmp::{SessionContext, current_session};
use ferrite_qobject::{QDict, QObject};
use std::os::fd::{BorrowedFd, OwnedFd};

fn session() -> Result<SessionContext, Error> {
    current_session().ok_or_else(|| Error::generic("No monitor is running this command"))
}

fn passed_fd() -> Result<OwnedFd, Error> {
    session()?
        .take_passed_fd()
        .ok_or_else(|| Error::generic("No file descriptor supplied via SCM_RIGHTS"))
}

/// Runs one of the descriptor commands; `None` if `name` is not one.
pub(crate) fn run(name: &str, args: &Args) -> Option<Result<QObject, Error>> {
    Some(match name {
        "add-fd" => add_fd(args),
        "remove-fd" => remove_fd(args),
        "query-fdsets" => Ok(query_fdsets()),
        "getfd" => getfd(args),
        "closefd" => closefd(args),
        _ => return None,
    })
}

fn add_fd(args: &Args) -> Result<QObject, Error> {
    let fd = passed_fd()?;
    let (id, fd) =
        fdset::add(fd, args.opt_i64("fdset-id"), args.opt_str("opaque")).map_err(Error::generic)?;
    Ok(QDict::new()
        .with("fdset-id", id)
        .with("fd", i64::from(fd))
        .into())
}

fn remove_fd(args: &Args) -> Result<QObject, Error> {
    fdset::remove(args.i64("fdset-id")?, args.opt_i64("fd")).map_err(Error::generic)?;
    Ok(QDict::new().into())
}

fn query_fdsets() -> QObject {
    let sets: Vec<QObject> = fdset::query()
        .into_iter()
        .map(|s| {
            let fds: Vec<QObject> = s
                .fds
                .into_iter()
                .map(|(fd, opaque)| {
                    let mut d = QDict::new().with("fd", i64::from(fd));
                    d.insert_opt("opaque", opaque.map(QObject::from));
                    d.into()
                })
                .collect();
            QDict::new().with("fdset-id", s.id).with("fds", fds).into()
        })
        .collect();
    sets.into()
}

fn getfd(args: &Args) -> Result<QObject, Error> {
    let name = args.str("fdname")?;
    let fd = passed_fd()?;
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        // The descriptor is closed, as QEMU closes it.
        drop(fd);
        return Err(Error::generic(
            "Parameter 'fdname' expects a name not starting with a digit",
        ));
    }
    session()?.named_fds().insert(name, fd);
    Ok(QDict::new().into())
}

/// Socket addresses of type `fd` in a command name what the command's monitor keeps
/// (`getfd`), as QEMU's do.
pub(crate) fn use_named_fds_for_sockets() {
    ferrite_socket::monitor_fd::set_lookup(std::rc::Rc::new(|name| {
        let session = ferrite_qmp::current_session()?;
        Some(
            session
                .named_fds()
                .take(name)
                .ok_or_else(|| format!("File descriptor named '{name}' has not been found")),
        )
    }));
}

fn closefd(args: &Args) -> Result<QObject, Error> {
    let name = args.str("fdname")?;
    session()?
        .named_fds()
        .take(name)
        .ok_or_else(|| Error::generic(format!("File descriptor named '{name}' not found")))?;
    Ok(QDict::new().into())
}

/// `-add-fd fd=N,set=S[,opaque=TEXT]`: a duplicate of inherited descriptor N goes into set S.
///
/// # Errors
/// QEMU's texts, without the option's name.
pub(crate) fn add_from_command_line(text: &str) -> Result<(), String> {
    let mut fd = None;
    let mut set = None;
    let mut opaque = None;
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, "on"));
        let number =
            || parse_number(value).ok_or_else(|| format!("Parameter '{key}' expects a number"));
        match key {
            "fd" => fd = Some(number()?),
            "set" => set = Some(number()?),
            "opaque" => opaque = Some(value.to_owned()),
            _ => return Err(format!("Invalid parameter '{key}'")),
        }
    }
    let fd = fd
        .filter(|&n| n >= 0)
        .ok_or("fd option is required and must be non-negative")?;
    if fd <= 2 {
        return Err("fd cannot be a standard I/O stream".to_owned());
    }
    let raw = i32::try_from(fd).map_err(|_| "fd is not valid or already in use")?;
    // SAFETY: F_GETFD only reads the descriptor's flags; a number that is not open fails.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    // Inherited descriptors have FD_CLOEXEC clear; the program's own have it set.
    if flags == -1 || flags & libc::FD_CLOEXEC != 0 {
        return Err("fd is not valid or already in use".to_owned());
    }
    let set = set
        .filter(|&n| n >= 0)
        .ok_or("set option is required and must be non-negative")?;
    // SAFETY: the descriptor is open (F_GETFD succeeded) and stays open for this borrow; it
    // was inherited for this purpose and is only duplicated here, never closed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    let dup = borrowed
        .try_clone_to_owned()
        .map_err(|e| format!("error duplicating fd: {}", ferrite_qapi::os_msg(&e)))?;
    fdset::add(dup, Some(set), opaque.as_deref())?;
    Ok(())
}

/// A QemuOpts number: decimal, or hexadecimal with `0x`; `-1` and the like wrap as QEMU's do.
fn parse_number(v: &str) -> Option<i64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok().map(|n| n as i64);
    }
    v.parse::<i64>().ok()
}
