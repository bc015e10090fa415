//! A socket handed over as a descriptor (`SocketAddress` of type `fd`): what kind it is, and
//! listening on it as QEMU's `socket_listen` does.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The address family of socket `fd` (`AF_UNIX`, `AF_INET`...), or `None` if it is not a
/// socket.
pub fn family(fd: RawFd) -> Option<i32> {
    let mut storage = std::mem::MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is a properly sized, writable sockaddr_storage and `len` holds its
    // size, as getsockname requires; the kernel writes at most `len` bytes.
    let rc = unsafe { libc::getsockname(fd, storage.as_mut_ptr().cast(), &mut len) };
    if rc < 0 {
        return None;
    }
    // SAFETY: getsockname succeeded, so at least the family field has been written (and the
    // zeroed rest is a valid bit pattern for the plain-data struct).
    let storage = unsafe { storage.assume_init() };
    Some(i32::from(storage.ss_family))
}

/// A listening socket made of a handed-over descriptor.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket.
    Unix(std::os::unix::net::UnixListener),
    /// An IPv4 or IPv6 socket.
    Tcp(std::net::TcpListener),
}

/// Puts socket `fd` into the listening state (it may be there already), as QEMU does
/// with a descriptor address.
///
/// # Errors
/// "Failed to listen on fd socket: ...", or a socket of a family ferrite cannot accept on.
pub fn listen(fd: OwnedFd, backlog: i32) -> Result<Listener> {
    // SAFETY: listen() on a descriptor this function owns; it touches nothing else.
    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
        return Err(Error::Os {
            what: "Failed to listen on fd socket".into(),
            error: std::io::Error::last_os_error(),
        });
    }
    match family(fd.as_raw_fd()) {
        Some(libc::AF_UNIX) => Ok(Listener::Unix(fd.into())),
        Some(libc::AF_INET | libc::AF_INET6) => Ok(Listener::Tcp(fd.into())),
        _ => Err(Error::Os {
            what: "Failed to listen on fd socket".into(),
            error: std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
        }),
    }
}
