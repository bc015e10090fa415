//! Image locking with OFD locks, byte for byte as QEMU does it, so that ferrite and QEMU
//! processes see each other's locks (QEMU: `raw_apply_lock_bytes`, `raw_check_lock_bytes`).
//!
//! For each permission bit N a process holds a shared lock on byte 100+N while it uses the
//! permission, and on byte 200+N while it does not let others have it. A conflict is someone
//! else's lock on the byte that tells the opposite.

use crate::error::Error;
use ferrite_block::Perm;
use std::fs::File;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

fn flock(file: &File, cmd: i32, ty: i16, byte: i64) -> Result<libc::flock, std::io::Error> {
    // SAFETY: an all-zero flock is a valid value of this plain-data struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes the flock struct we
    // pass by pointer; it lives for the whole call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl)
    }
}

fn set(file: &File, byte: i64, locked: bool) -> std::io::Result<()> {
    let ty = if locked { libc::F_RDLCK } else { libc::F_UNLCK } as i16;
    flock(file, libc::F_OFD_SETLK, ty, byte).map(drop)
}

/// Whether another open file description holds a lock on `byte`.
fn taken_by_other(file: &File, byte: i64) -> bool {
    match flock(file, libc::F_OFD_GETLK, libc::F_WRLCK as i16, byte) {
        Ok(fl) => fl.l_type != libc::F_UNLCK as i16,
        Err(_) => false,
    }
}

fn lock_error(what: &'static str, perm: Perm, path: &str) -> Error {
    Error::Lock {
        what,
        perm: perm.first_name(),
        path: path.to_owned(),
    }
}

/// Checks for conflicts with other holders, then sets our lock bytes to `perm`/`shared`.
pub(crate) fn apply(file: &File, path: &str, perm: Perm, shared: Perm) -> Result<(), Error> {
    // Every permission wanted first, then every one unshared (QEMU's order, so the first
    // conflict named is QEMU's).
    for (p, _) in Perm::NAMED {
        if perm.contains(p) && taken_by_other(file, SHARED_BASE + i64::from(p.bit())) {
            return Err(lock_error("", p, path));
        }
    }
    for (p, _) in Perm::NAMED {
        if !shared.contains(p) && taken_by_other(file, PERM_BASE + i64::from(p.bit())) {
            return Err(lock_error("shared ", p, path));
        }
    }
    for (p, _) in Perm::NAMED {
        let bit = i64::from(p.bit());
        let fail = |e: std::io::Error| Error::LockByte {
            byte: PERM_BASE + bit,
            error: e,
        };
        set(file, PERM_BASE + bit, perm.contains(p)).map_err(fail)?;
        set(file, SHARED_BASE + bit, !shared.contains(p)).map_err(fail)?;
    }
    Ok(())
}
