//! TCP addresses as QEMU resolves, listens on and connects to them (`getaddrinfo`, each
//! answer in turn, a port range, IPv6 sockets that take IPv4 too), with its words when it
//! fails.

use crate::addr::InetAddr;
use crate::error::{Error, Result};
use rustix::net::{AddressFamily, SocketFlags, SocketType, ipproto, sockopt};
use std::ffi::{CStr, CString};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;

/// The address family `ipv4`/`ipv6` ask for (QEMU's rules).
///
/// # Errors
/// Both turned off.
pub fn family(ipv4: Option<bool>, ipv6: Option<bool>) -> Result<i32> {
    Ok(match (ipv4, ipv6) {
        (Some(false), Some(false)) => return Err(Error::NoAddressFamily),
        (Some(true), Some(true)) => libc::AF_UNSPEC,
        (_, Some(true)) | (Some(false), _) => libc::AF_INET6,
        (Some(true), _) | (_, Some(false)) => libc::AF_INET,
        (None, None) => libc::AF_UNSPEC,
    })
}

/// The family for a stream address: as [`family`], except that asking for both with no host
/// looks up `::`, whose socket then takes IPv4 as well.
fn stream_family(a: &InetAddr) -> Result<i32> {
    if a.ipv4 == Some(true) && a.ipv6 == Some(true) && a.host.is_empty() {
        return Ok(libc::AF_INET6);
    }
    family(a.ipv4, a.ipv6)
}

/// `getaddrinfo`'s answers, in its order; never empty. `None` asks for no host (or port);
/// errors show it as C's `printf` shows a null string, as QEMU's do.
///
/// # Errors
/// QEMU's "address resolution failed for host:port: ..." with `getaddrinfo`'s words.
pub fn resolve(
    host: Option<&str>,
    port: Option<&str>,
    family: i32,
    socktype: i32,
    flags: i32,
) -> Result<Vec<SocketAddr>> {
    let shown = (host.unwrap_or("(null)"), port.unwrap_or("(null)"));
    lookup(host, port, shown, family, socktype, flags)
}

/// [`resolve`], with errors naming the address as `shown` (host, port).
fn lookup(
    host: Option<&str>,
    port: Option<&str>,
    shown: (&str, &str),
    family: i32,
    socktype: i32,
    flags: i32,
) -> Result<Vec<SocketAddr>> {
    let fail = |reason: String| Error::Resolve {
        host: shown.0.to_owned(),
        port: shown.1.to_owned(),
        reason,
    };
    let c_host = host
        .map(CString::new)
        .transpose()
        .map_err(|_| fail("Name or service not known".into()))?;
    let c_port = port
        .map(CString::new)
        .transpose()
        .map_err(|_| fail("Servname not supported for ai_socktype".into()))?;
    // SAFETY: an all-zero addrinfo is the documented way to start the hints.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = flags;
    hints.ai_family = family;
    hints.ai_socktype = socktype;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the strings are NUL-terminated and live across the call; `res` receives a
    // list that is freed below.
    let rc = unsafe {
        libc::getaddrinfo(
            c_host.as_ref().map_or(std::ptr::null(), |h| h.as_ptr()),
            c_port.as_ref().map_or(std::ptr::null(), |p| p.as_ptr()),
            &raw const hints,
            &raw mut res,
        )
    };
    if rc != 0 {
        // SAFETY: gai_strerror returns a static NUL-terminated string for any code.
        let reason = unsafe { CStr::from_ptr(libc::gai_strerror(rc)) };
        return Err(fail(reason.to_string_lossy().into_owned()));
    }
    let mut addrs = Vec::new();
    let mut at = res;
    // SAFETY: on success `res` is a list whose entries hold addresses of `ai_addrlen` bytes
    // and link to the next; it is freed once the addresses are copied out.
    unsafe {
        while !at.is_null() {
            let e = &*at;
            addrs.extend(sockaddr_to_std(e.ai_addr, e.ai_addrlen));
            at = e.ai_next;
        }
        libc::freeaddrinfo(res);
    }
    if addrs.is_empty() {
        return Err(fail("Address family for hostname not supported".into()));
    }
    Ok(addrs)
}

/// # Safety
/// `sa` must point to a socket address of `len` bytes.
unsafe fn sockaddr_to_std(sa: *const libc::sockaddr, len: libc::socklen_t) -> Option<SocketAddr> {
    // SAFETY: the caller's guarantee, with the family checked before each cast and the
    // length against the structure read.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET if len as usize >= std::mem::size_of::<libc::sockaddr_in>() => {
                let a = &*sa.cast::<libc::sockaddr_in>();
                Some(SocketAddr::from((
                    u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len as usize >= std::mem::size_of::<libc::sockaddr_in6>() => {
                let a = &*sa.cast::<libc::sockaddr_in6>();
                Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                    a.sin6_addr.s6_addr.into(),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

fn non_empty(s: &str) -> Option<&str> {
    Some(s).filter(|s| !s.is_empty())
}

/// A new TCP socket for `addr`'s family (multipath with `mptcp`), closed on exec.
fn stream_socket(addr: &SocketAddr, mptcp: bool, flags: SocketFlags) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let protocol = mptcp.then_some(ipproto::MPTCP);
    Ok(rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | flags,
        protocol,
    )?)
}

/// Binds, keeping an IPv6 socket to IPv6 when `v6only`; a dual-stack bind whose IPv4 port
/// is taken is tried again for IPv6 alone.
fn bind(sock: &OwnedFd, addr: &SocketAddr, mut v6only: bool) -> io::Result<()> {
    loop {
        if addr.is_ipv6() {
            // As QEMU, a socket that cannot change this is bound as it is.
            let _ = sockopt::set_ipv6_v6only(sock, v6only);
        }
        match rustix::net::bind(sock, addr) {
            Err(rustix::io::Errno::ADDRINUSE) if addr.is_ipv6() && !v6only => v6only = true,
            r => return Ok(r?),
        }
    }
}

/// Listens on `a` as QEMU does: each address the host resolves to in turn and, with `to`,
/// each port of the range; a port in use is a reason to try the next.
///
/// `keep-alive` is set on the listening socket, which its connections inherit.
///
/// # Errors
/// QEMU's texts: resolution, "Failed to bind socket", "Failed to listen on socket",
/// "Failed to find an available port".
pub fn listen(a: &InetAddr, backlog: i32) -> Result<TcpListener> {
    let mut flags = libc::AI_PASSIVE;
    if a.numeric {
        flags |= libc::AI_NUMERICHOST | libc::AI_NUMERICSERV;
    }
    let family = stream_family(a)?;
    // QEMU copies the port into a buffer of 32 characters: what is longer is cut there.
    let mut end = a.port.len().min(32);
    while !a.port.is_char_boundary(end) {
        end -= 1;
    }
    let port = &a.port[..end];
    // An empty host or port is none, but errors show what was given.
    let addrs = lookup(
        non_empty(&a.host),
        non_empty(port),
        (&a.host, port),
        family,
        libc::SOCK_STREAM,
        flags,
    )?;
    // A socket takes both families only when neither or both were asked for.
    let v6only = !matches!((a.ipv4, a.ipv6), (None, None) | (Some(true), Some(true)));
    let mut created = false;
    // Only a range that ends before it starts tries nothing at all (QEMU reports whatever
    // errno held then).
    let mut last = io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "the port range {}-{} is empty",
            a.port,
            a.to.unwrap_or_default()
        ),
    );
    for mut addr in addrs {
        let first = addr.port();
        for port in first..=a.to.unwrap_or(first) {
            addr.set_port(port);
            let sock = match stream_socket(&addr, a.mptcp, SocketFlags::empty()) {
                Ok(s) => s,
                // The family may be missing from the kernel: try the next address.
                Err(e) if port == first => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(Error::os("Failed to recreate failed listening socket", e)),
            };
            created = true;
            let _ = sockopt::set_socket_reuseaddr(&sock, true);
            if let Err(e) = bind(&sock, &addr, v6only) {
                if e.raw_os_error() != Some(libc::EADDRINUSE) {
                    return Err(Error::os("Failed to bind socket", e));
                }
                last = e;
                continue;
            }
            match rustix::net::listen(&sock, backlog) {
                Ok(()) => {
                    keep_alive(a, &sock)?;
                    return Ok(TcpListener::from(sock));
                }
                Err(rustix::io::Errno::ADDRINUSE) => last = rustix::io::Errno::ADDRINUSE.into(),
                Err(e) => return Err(Error::os("Failed to listen on socket", e)),
            }
        }
    }
    let what = if created {
        "Failed to find an available port"
    } else {
        "Failed to create a socket"
    };
    Err(Error::os(what, last))
}

/// The addresses a client tries, in order.
fn resolve_peer(a: &InetAddr) -> Result<Vec<SocketAddr>> {
    resolve(
        Some(&a.host),
        Some(&a.port),
        stream_family(a)?,
        libc::SOCK_STREAM,
        libc::AI_CANONNAME | libc::AI_ADDRCONFIG | libc::AI_V4MAPPED,
    )
}

fn connect_failed(a: &InetAddr, e: impl Into<io::Error>) -> Error {
    Error::os(format!("Failed to connect to '{}'", a.target()), e)
}

fn keep_alive(a: &InetAddr, sock: &impl std::os::fd::AsFd) -> Result<()> {
    if a.keep_alive {
        sockopt::set_socket_keepalive(sock, true)
            .map_err(|e| Error::os("Unable to set KEEPALIVE", e))?;
    }
    Ok(())
}

/// Connects to `a`, blocking, as QEMU's chardevs do: each address the host resolves to in
/// turn; the last one's failure is the one reported.
///
/// # Errors
/// Resolution, or "Failed to connect to 'host:port': ...".
pub fn connect(a: &InetAddr) -> Result<TcpStream> {
    let mut failure = None;
    for addr in resolve_peer(a)? {
        let attempt = stream_socket(&addr, a.mptcp, SocketFlags::empty()).and_then(|sock| {
            loop {
                match rustix::net::connect(&sock, &addr) {
                    Err(rustix::io::Errno::INTR) => {}
                    r => return r.map(|()| sock).map_err(io::Error::from),
                }
            }
        });
        match attempt {
            Ok(sock) => {
                keep_alive(a, &sock)?;
                return Ok(TcpStream::from(sock));
            }
            Err(e) => failure = Some(connect_failed(a, e)),
        }
    }
    Err(failure.unwrap_or_else(|| connect_failed(a, io::ErrorKind::NotFound)))
}

/// Connects to `a` without blocking the thread (the name lookup still does, as in QEMU),
/// as [`connect`] does otherwise.
///
/// # Errors
/// As [`connect`].
pub async fn connect_async(a: &InetAddr) -> Result<tokio::net::TcpStream> {
    let mut failure = None;
    for addr in resolve_peer(a)? {
        let sock = match stream_socket(&addr, a.mptcp, SocketFlags::NONBLOCK) {
            Ok(s) => tokio::net::TcpSocket::from_std_stream(TcpStream::from(s)),
            Err(e) => {
                failure = Some(connect_failed(a, e));
                continue;
            }
        };
        match sock.connect(addr).await {
            Ok(s) => {
                keep_alive(a, &s)?;
                return Ok(s);
            }
            Err(e) => failure = Some(connect_failed(a, e)),
        }
    }
    Err(failure.unwrap_or_else(|| connect_failed(a, io::ErrorKind::NotFound)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(host: &str, port: &str) -> InetAddr {
        InetAddr {
            host: host.into(),
            port: port.into(),
            numeric: false,
            to: None,
            ipv4: None,
            ipv6: None,
            keep_alive: false,
            mptcp: false,
        }
    }

    #[test]
    fn a_range_skips_ports_in_use() {
        let taken = listen(&addr("127.0.0.1", "0"), 1).unwrap();
        let port = taken.local_addr().unwrap().port();
        let alone = listen(&addr("127.0.0.1", &port.to_string()), 1).unwrap_err();
        assert_eq!(
            alone.to_string(),
            "Failed to find an available port: Address already in use"
        );
        let ranged = InetAddr {
            to: Some(port.saturating_add(3)),
            ..addr("127.0.0.1", &port.to_string())
        };
        let l = listen(&ranged, 1).unwrap();
        let got = l.local_addr().unwrap().port();
        assert!(got > port && got <= port + 3, "{got} after {port}");
        let empty = InetAddr {
            to: Some(port - 1),
            ..ranged
        };
        let e = listen(&empty, 1).unwrap_err().to_string();
        assert!(
            e.starts_with("Failed to create a socket: the port range"),
            "{e}"
        );
    }

    #[test]
    fn names_and_families_fail_in_qemu_words() {
        let numeric = InetAddr {
            numeric: true,
            ..addr("localhost", "0")
        };
        assert_eq!(
            listen(&numeric, 1).unwrap_err().to_string(),
            "address resolution failed for localhost:0: Name or service not known"
        );
        assert_eq!(
            listen(&addr("", ""), 1).unwrap_err().to_string(),
            "address resolution failed for :: Name or service not known"
        );
        let neither = InetAddr {
            ipv4: Some(false),
            ipv6: Some(false),
            ..addr("127.0.0.1", "0")
        };
        assert_eq!(
            connect(&neither).unwrap_err().to_string(),
            "Cannot disable IPv4 and IPv6 at same time"
        );
        let v6 = InetAddr {
            ipv4: Some(false),
            ..addr("127.0.0.1", "0")
        };
        assert_eq!(
            listen(&v6, 1).unwrap_err().to_string(),
            "address resolution failed for 127.0.0.1:0: Address family for hostname not supported"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connects_blocking_or_not_with_keep_alive() {
        let l = listen(&addr("127.0.0.1", "0"), 4).unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        let a = InetAddr {
            keep_alive: true,
            ..addr("127.0.0.1", &port)
        };
        let s = connect(&a).unwrap();
        assert!(sockopt::socket_keepalive(&s).unwrap());
        let s = connect_async(&a).await.unwrap();
        assert!(sockopt::socket_keepalive(&s).unwrap());
        drop(l);
        let e = connect_async(&a).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
        );
    }
}
