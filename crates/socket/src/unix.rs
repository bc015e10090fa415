//! Unix sockets as QEMU listens on and connects to them: a file (replacing a stale one), a
//! name in Linux's abstract namespace (tight or padded), or a new file in the temporary
//! directory when the path is empty.

use crate::addr::UnixAddr;
use crate::error::{Error, Result};
use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

/// The bytes of a socket address's path.
const SUN_PATH: usize = 108;

/// What [`listen`] made.
#[derive(Debug)]
pub struct Listening {
    /// The listening socket.
    pub listener: UnixListener,
    /// The socket file, for its owner to remove when it closes (none for abstract names).
    pub file: Option<PathBuf>,
}

fn socket_address(path: &str, a: &UnixAddr) -> Result<SocketAddrUnix> {
    let limit = if a.abstract_ns {
        SUN_PATH - 1
    } else {
        SUN_PATH
    };
    if path.len() > limit {
        return Err(Error::PathTooLong {
            path: path.to_owned(),
            limit,
        });
    }
    let made = if a.abstract_ns {
        let mut name = path.as_bytes().to_vec();
        if !a.tight {
            // A padded name is the whole address, zeroes after the name included.
            name.resize(SUN_PATH - 1, 0);
        }
        SocketAddrUnix::new_abstract_name(&name)
    } else {
        SocketAddrUnix::new(path)
    };
    made.map_err(|e| Error::os(format!("Failed to bind socket to {path}"), e))
}

fn unix_socket(flags: SocketFlags) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | flags,
        None,
    )?)
}

/// A new file name in the temporary directory, made (and left) as a regular file so that no
/// other program takes it; the bind replaces it.
fn temporary_path() -> Result<String> {
    let dir = std::env::temp_dir();
    let mut template = format!("{}/qemu-socket-XXXXXX", dir.display()).into_bytes();
    template.push(0);
    // SAFETY: `template` is a writable NUL-terminated buffer ending in six X's, as mkstemp
    // requires; it fills them in place.
    let fd = unsafe { libc::mkstemp(template.as_mut_ptr().cast()) };
    template.pop();
    let path = String::from_utf8_lossy(&template).into_owned();
    if fd < 0 {
        return Err(Error::os(
            format!("Failed to make a temporary socket {path}"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: mkstemp returned a new descriptor that nothing else owns.
    drop(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    Ok(path)
}

/// Removes the socket a earlier listener left at `path`, as QEMU does before it binds. Only
/// a socket: QEMU unlinks whatever the path names (an image given by mistake, or
/// `/dev/null` when run as root); ferrite leaves any other file, and the bind then fails
/// ("Address already in use").
///
/// # Errors
/// The path cannot be looked at or the socket removed.
pub fn remove_stale(path: &str) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Listens on `a` as QEMU does (but see [`remove_stale`]).
///
/// # Errors
/// QEMU's texts: a path too long, "Failed to unlink socket", "Failed to bind socket to
/// path", "Failed to listen on socket".
pub fn listen(a: &UnixAddr, backlog: i32) -> Result<Listening> {
    let sock = unix_socket(SocketFlags::empty())
        .map_err(|e| Error::os("Failed to create Unix socket", e))?;
    let path = if a.path.is_empty() && !a.abstract_ns {
        // Checked for length before the file is made, as QEMU does.
        socket_address(
            &format!("{}/qemu-socket-XXXXXX", std::env::temp_dir().display()),
            a,
        )?;
        temporary_path()?
    } else {
        a.path.clone()
    };
    let addr = socket_address(&path, a)?;
    let unlinked = if a.path.is_empty() && !a.abstract_ns {
        // The placeholder made for the name.
        std::fs::remove_file(&path)
    } else if !a.abstract_ns {
        remove_stale(&path)
    } else {
        Ok(())
    };
    unlinked.map_err(|e| Error::os(format!("Failed to unlink socket {path}"), e))?;
    rustix::net::bind(&sock, &addr)
        .map_err(|e| Error::os(format!("Failed to bind socket to {path}"), e))?;
    rustix::net::listen(&sock, backlog).map_err(|e| Error::os("Failed to listen on socket", e))?;
    Ok(Listening {
        listener: UnixListener::from(sock),
        file: (!a.abstract_ns).then(|| PathBuf::from(path)),
    })
}

/// Connects to `a`, blocking.
///
/// # Errors
/// A path too long, or "Failed to connect to 'path': ...".
pub fn connect(a: &UnixAddr) -> Result<UnixStream> {
    let addr = socket_address(&a.path, a)?;
    let sock = unix_socket(SocketFlags::empty()).map_err(|e| connect_failed(a, e))?;
    loop {
        match rustix::net::connect(&sock, &addr) {
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(connect_failed(a, e)),
            Ok(()) => return Ok(UnixStream::from(sock)),
        }
    }
}

/// Connects to `a` without blocking the thread: a server whose backlog is full is asked
/// again a little later, where a blocking connect would wait.
///
/// # Errors
/// As [`connect`].
pub async fn connect_async(a: &UnixAddr) -> Result<tokio::net::UnixStream> {
    let addr = socket_address(&a.path, a)?;
    let sock = unix_socket(SocketFlags::NONBLOCK).map_err(|e| connect_failed(a, e))?;
    loop {
        match rustix::net::connect(&sock, &addr) {
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Err(e) => return Err(connect_failed(a, e)),
            Ok(()) => {
                return tokio::net::UnixStream::from_std(UnixStream::from(sock))
                    .map_err(|e| connect_failed(a, e));
            }
        }
    }
}

fn connect_failed(a: &UnixAddr, e: impl Into<io::Error>) -> Error {
    Error::os(format!("Failed to connect to '{}'", a.path), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abstract_name(path: &str, tight: bool) -> UnixAddr {
        UnixAddr {
            path: path.into(),
            abstract_ns: true,
            tight,
        }
    }

    #[test]
    fn tight_and_padded_names_are_different_addresses() {
        let name = format!("ferrite-socket-test-{}", std::process::id());
        let tight = listen(&abstract_name(&name, true), 1).unwrap();
        assert!(tight.file.is_none());
        connect(&abstract_name(&name, true)).unwrap();
        let e = connect(&abstract_name(&name, false)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Failed to connect to '{name}': Connection refused")
        );
        let _padded = listen(&abstract_name(&name, false), 1).unwrap();
        connect(&abstract_name(&name, false)).unwrap();
    }

    #[test]
    fn only_a_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let at = UnixAddr {
            path: path.to_string_lossy().into_owned(),
            abstract_ns: false,
            tight: true,
        };
        let first = listen(&at, 1).unwrap();
        drop(first.listener);
        // The stale socket is replaced...
        let second = listen(&at, 1).unwrap();
        drop(second);
        // ...a regular file is not.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"precious").unwrap();
        let e = listen(&at, 1).unwrap_err().to_string();
        assert!(e.ends_with("Address already in use"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn paths_fit_as_in_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let long = format!("{}/{}", dir.path().display(), "x".repeat(120));
        let e = listen(
            &UnixAddr {
                path: long.clone(),
                abstract_ns: false,
                tight: true,
            },
            1,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("UNIX socket path '{long}' is too long")
        );
        let hint = ferrite_qapi::Error::from(e).hint;
        assert_eq!(hint.as_deref(), Some("Path must be less than 108 bytes"));
        let e = listen(&abstract_name(&"y".repeat(108), true), 1).unwrap_err();
        assert!(e.to_string().ends_with("is too long"));
        // An empty path is a new file in the temporary directory, replaced by the socket.
        let made = listen(
            &UnixAddr {
                path: String::new(),
                abstract_ns: false,
                tight: true,
            },
            1,
        )
        .unwrap();
        let file = made.file.unwrap();
        assert!(file.to_string_lossy().contains("qemu-socket-"));
        connect(&UnixAddr {
            path: file.to_string_lossy().into_owned(),
            abstract_ns: false,
            tight: true,
        })
        .unwrap();
        std::fs::remove_file(file).unwrap();
    }
}
