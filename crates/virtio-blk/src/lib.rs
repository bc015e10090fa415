//! virtio-blk exports (QEMU: `block/export/vhost-user-blk-server.c`, `vduse-blk.c`,
//! `virtio-blk-handler.c`): a node served as a virtio block device.
//!
//! - `device.rs`: what the device is, whatever carries it: the options QEMU checks, the
//!   feature bits and the config space.
//! - `request.rs`: a virtio-blk request answered from the export's `BlockBackend`, as QEMU's
//!   handler answers it.
//! - `vhost_user/`: the `vhost-user-blk` export type. rust-vmm's `vhost-user-backend` speaks
//!   the protocol and pops requests on its own threads; each request is handed to the main
//!   thread, answered there, and completed into the guest's memory.
//! - `vduse.rs`: the `vduse-blk` export type, which needs the kernel's VDUSE.

mod device;
mod request;
mod vduse;
mod vhost_user;

pub use vduse::VduseBlkExportType;
pub use vhost_user::VhostUserBlkExportType;
