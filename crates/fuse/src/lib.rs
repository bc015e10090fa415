//! The FUSE export (QEMU: `block/export/fuse.c`): a node appears as a regular file at the
//! mount point, which must be an existing regular file; the export mounts over it.
//!
//! The kernel's requests arrive on a thread of the `fuser` crate (`kernel.rs`), which hands
//! each one to the main thread; there it is answered from the export's `BlockBackend`
//! (`serve.rs`), many at a time. `export.rs` is the `fuse` export type: QEMU's checks and
//! texts, mounting (`mount.rs`) and the end of an export.

mod export;
mod kernel;
mod mount;
mod serve;

pub use export::FuseExportType;
