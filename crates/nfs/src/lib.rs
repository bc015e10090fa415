//! QEMU's `nfs` block driver: a node whose bytes are a file on an NFS (version 3) export,
//! with QEMU's options, checks and texts. QEMU reaches the server through libnfs; ferrite
//! speaks ONC RPC, MOUNT and NFSv3 itself, every piece of every request under way at once
//! on one connection, made again when it breaks.
//!
//! - `xdr.rs`: the encoding every message is in;
//! - `rpc.rs`: calls and replies over TCP;
//! - `nfs3.rs`: the NFSv3, MOUNT and portmapper procedures the node calls;
//! - `client.rs`: mounting, looking up, reading and writing as libnfs does;
//! - `uncommitted.rs`: writes the server holds in memory, kept until a COMMIT and written
//!   again when the server restarted before it;
//! - `options.rs`: `BlockdevOptionsNfs`, QEMU's checks, the node's file name;
//! - `driver.rs`: the node and `blockdev-create`.

mod cache;
mod client;
mod driver;
mod nfs3;
mod options;
mod rpc;
mod uncommitted;
mod xdr;

use ferrite_block::Registry;
use std::rc::Rc;

/// Registers the `nfs` driver.
pub fn register(registry: &Registry) {
    registry.register(Rc::new(driver::NfsFactory));
}
