//! `AF_VSOCK` sockets, between a virtual machine and its host (or its sibling machines):
//! a context id (CID: 2 is the host, `4294967295` any of this machine's) and a port, both
//! given as decimal text, which QEMU parses as `strtoul` does.
//!
//! Connections are handed out as unix stream types: `std` and tokio read, write and shut a
//! stream socket down the same whatever its family, and only their address methods (not
//! used for these) would be wrong.

use crate::addr::VsockAddr;
use crate::error::{Error, Result};
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A decimal `unsigned int` as QEMU reads a CID or port: leading white space and a `+`
/// allowed, nothing after the digits.
fn parse_u32(text: &str) -> Option<u32> {
    let t = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let digits = t.strip_prefix('+').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The kernel's address for `a`.
fn sockaddr(a: &VsockAddr) -> Result<libc::sockaddr_vm> {
    let cid = parse_u32(&a.cid).ok_or_else(|| Error::Parse(format!("cid '{}'", a.cid)))?;
    let port = parse_u32(&a.port).ok_or_else(|| Error::Parse(format!("port '{}'", a.port)))?;
    Ok(libc::sockaddr_vm {
        svm_family: libc::AF_VSOCK as libc::sa_family_t,
        svm_reserved1: 0,
        svm_port: port,
        svm_cid: cid,
        svm_zero: [0; 4],
    })
}

fn socket(flags: SocketFlags) -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::VSOCK,
        SocketType::STREAM,
        flags | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// `bind` or `connect` (`call`) of `fd` to `addr`.
fn with_address(
    call: unsafe extern "C" fn(libc::c_int, *const libc::sockaddr, libc::socklen_t) -> libc::c_int,
    fd: &OwnedFd,
    addr: &libc::sockaddr_vm,
) -> io::Result<()> {
    // SAFETY: `addr` is a whole `sockaddr_vm` that outlives the call, and the length given
    // is its size; `fd` is an open socket this function borrows.
    let rc = unsafe {
        call(
            fd.as_raw_fd(),
            std::ptr::from_ref(addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Listens on `a` (a non-blocking socket).
///
/// # Errors
/// A CID or port that does not parse ("Failed to parse cid 'x'"), or the kernel refusing
/// ("Failed to bind socket: Cannot assign requested address" for a CID not this
/// machine's).
pub fn listen(a: &VsockAddr, backlog: i32) -> Result<OwnedFd> {
    let addr = sockaddr(a)?;
    let sock =
        socket(SocketFlags::NONBLOCK).map_err(|e| Error::os("Failed to create socket", e))?;
    with_address(libc::bind, &sock, &addr).map_err(|e| Error::os("Failed to bind socket", e))?;
    rustix::net::listen(&sock, backlog).map_err(|e| Error::os("Failed to listen on socket", e))?;
    Ok(sock)
}

/// Connects to `a`, blocking.
///
/// # Errors
/// A CID or port that does not parse, or "Failed to connect to 'cid:port': ...".
pub fn connect(a: &VsockAddr) -> Result<UnixStream> {
    let addr = sockaddr(a)?;
    let failed = |e: io::Error| Error::os(format!("Failed to connect to '{}'", a.target()), e);
    let sock = socket(SocketFlags::empty()).map_err(failed)?;
    loop {
        match with_address(libc::connect, &sock, &addr) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e)),
            Ok(()) => return Ok(UnixStream::from(sock)),
        }
    }
}

/// Connects to `a` without blocking the thread.
///
/// # Errors
/// As [`connect`].
pub async fn connect_async(a: &VsockAddr) -> Result<tokio::net::UnixStream> {
    let addr = sockaddr(a)?;
    let failed = |e: io::Error| Error::os(format!("Failed to connect to '{}'", a.target()), e);
    let sock = socket(SocketFlags::NONBLOCK).map_err(failed)?;
    match with_address(libc::connect, &sock, &addr) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(failed(e)),
    }
    let stream = tokio::net::UnixStream::from_std(UnixStream::from(sock)).map_err(failed)?;
    // Connected once writable; the outcome is the socket's pending error.
    stream.writable().await.map_err(failed)?;
    match stream.take_error().map_err(failed)? {
        Some(e) => Err(failed(e)),
        None => Ok(stream),
    }
}

/// A listening vsock socket in tokio's reactor.
pub struct Listener(tokio::io::unix::AsyncFd<OwnedFd>);

impl Listener {
    /// Takes a socket [`listen`] made.
    ///
    /// # Errors
    /// The reactor refusing it.
    pub fn new(sock: OwnedFd) -> io::Result<Listener> {
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, so the descriptor stays open and
        // this socket's for as long as it is registered.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(io::Error::from)?;
        Ok(Listener(fd))
    }

    /// The next connection.
    ///
    /// # Errors
    /// What `accept` fails with.
    pub async fn accept(&self) -> io::Result<tokio::net::UnixStream> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| {
                Ok(rustix::net::accept_with(
                    fd.get_ref(),
                    SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                )?)
            }) {
                Ok(conn) => return tokio::net::UnixStream::from_std(UnixStream::from(conn?)),
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_and_ports_parse_as_strtoul_with_nothing_after() {
        assert_eq!(parse_u32("4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(" +2"), Some(2));
        for bad in ["", "-1", "0x10", "4294967296", "1x", "x", "+"] {
            assert_eq!(parse_u32(bad), None, "{bad}");
        }
    }
}
