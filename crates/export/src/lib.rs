//! Block exports of every type (QEMU: `block/export/export.c`): the list of exports by ID,
//! what `block-export-add` checks and sets up whatever the type (the ID, the node, its
//! activation, the export's `BlockBackend` and its permissions), removal in safe and hard
//! mode with `BLOCK_EXPORT_DELETED`, and `query-block-exports`.
//!
//! Each export type (NBD, FUSE, vhost-user-blk, vduse-blk) is an [`ExportType`] that the
//! program registers; the type turns the prepared backend into a running export.

mod error;
mod events;
mod exports;
mod in_flight;
pub mod qmp_cmds;

pub use error::{Error, Result};
pub use events::BlockExportDeleted;
pub use exports::{ExportInstance, ExportSetup, ExportType, Exports, LocalFut, RemoveMode};
pub use in_flight::{InFlight, InFlightGuard};
