//! Socket addresses as QEMU's programs use them (`util/qemu-sockets.c`): `SocketAddress` and
//! `SocketAddressLegacy` read from arguments ([`SocketAddress`]), host names resolved with
//! `getaddrinfo`, listening ([`inet::listen`], [`unix::listen`]) and connecting
//! ([`inet::connect`], [`unix::connect`] and their async forms) with QEMU's rules (port
//! ranges, dual-stack IPv6 sockets, abstract unix names) and its error texts.
//!
//! The NBD server, the `nbd` driver and socket chardevs all go through here, so an address
//! means the same thing to each of them.

mod addr;
mod error;
pub mod inet;
pub mod unix;

pub use addr::{InetAddr, SocketAddress, UnixAddr};
pub use error::{Error, Result};
