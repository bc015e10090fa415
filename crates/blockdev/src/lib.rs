//! The QMP block commands (QEMU: `blockdev.c`, `block/qapi.c`): `blockdev-add`, `-del`,
//! `-reopen`, the node queries, `block_resize`, write thresholds, external and internal
//! snapshots, the dirty bitmap commands, and `transaction` with its backup actions.
//!
//! Each handler checks its arguments in QEMU's order and calls into the core or the jobs;
//! none issues I/O itself.

pub mod bitmap_cmds;
mod error;
mod info;
pub mod job_cmds;
pub mod qmp_cmds;
pub mod snapshot_cmds;
pub mod transaction;

pub use error::{Error, Result};
