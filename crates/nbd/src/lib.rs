//! NBD: ferrite's own implementation of the NBD server (fixed newstyle handshake, structured
//! replies, meta contexts `base:allocation` and `qemu:allocation-depth`) and the block
//! exports it serves.
//!
//! QEMU counterparts: `nbd/server.c`, `blockdev-nbd.c`, `block/export/`.

pub mod client;
mod error;
mod export;
mod handshake;
mod proto;
pub mod qmp_cmds;
mod service;
mod transmission;

pub use error::{Error, Result};
pub use export::Export;
pub use service::NbdService;
