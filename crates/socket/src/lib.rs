//! Socket addresses as QEMU's programs use them (`util/qemu-sockets.c`): `SocketAddress` and
//! `SocketAddressLegacy` read from arguments ([`SocketAddress`]), host names resolved with
//! `getaddrinfo`, listening ([`inet::listen`], [`unix::listen`], [`vsock::listen`]) and
//! connecting ([`inet::connect`], [`unix::connect`], [`vsock::connect`] and their async
//! forms) with QEMU's rules (port ranges, dual-stack IPv6 sockets, abstract unix names, vsock
//! ids as `strtoul` reads them) and its error texts.
//!
//! The NBD server, the `nbd` driver and socket chardevs all go through here, so an address
//! means the same thing to each of them.

mod addr;
mod error;
pub mod fd;
pub mod inet;
pub mod monitor_fd;
pub mod unix;
pub mod vsock;

pub use addr::{InetAddr, SocketAddress, UnixAddr, VsockAddr};
pub use error::{Error, Result};
