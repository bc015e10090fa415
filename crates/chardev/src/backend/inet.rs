//! Inet addresses as QEMU resolves them (`getaddrinfo`, with its words when it fails).

use crate::error::{Error, Result};
use std::ffi::{CStr, CString};
use std::net::SocketAddr;

/// The address family `ipv4`/`ipv6` ask for (QEMU's rules).
pub fn family(ipv4: Option<bool>, ipv6: Option<bool>) -> Result<i32> {
    Ok(match (ipv4, ipv6) {
        (Some(false), Some(false)) => return Err(Error::NoAddressFamily),
        (Some(true), Some(true)) => libc::AF_UNSPEC,
        (_, Some(true)) | (Some(false), _) => libc::AF_INET6,
        (Some(true), _) | (_, Some(false)) => libc::AF_INET,
        (None, None) => libc::AF_UNSPEC,
    })
}

/// `getaddrinfo`'s answers, in its order; never empty.
pub fn resolve(
    host: Option<&str>,
    port: &str,
    family: i32,
    socktype: i32,
    flags: i32,
) -> Result<Vec<SocketAddr>> {
    let fail = |reason: String| Error::Resolve {
        host: host.unwrap_or("(null)").to_owned(),
        port: port.to_owned(),
        reason,
    };
    let c_host = host
        .map(CString::new)
        .transpose()
        .map_err(|_| fail("Name or service not known".into()))?;
    let c_port = CString::new(port).map_err(|_| fail("Servname not supported".into()))?;
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
            c_port.as_ptr(),
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
