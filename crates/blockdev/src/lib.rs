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
pub mod vm_snapshot;

pub use error::{Error, Result};

use ferrite_block::{Graph, Node};
use std::rc::Rc;

/// The node a command's `device` and `node-name` arguments name (QEMU's `bdrv_lookup_bs`):
/// the medium of the drive called `device`, else the node called `node`.
///
/// # Errors
/// "Device 'x' has no medium" for an empty drive, else "Cannot find device='x' nor
/// node-name='y'".
pub fn lookup_bs(graph: &Graph, device: Option<&str>, node: Option<&str>) -> Result<Rc<Node>> {
    if let Some(d) = device.filter(|d| !d.is_empty())
        && let Some(blk) = graph.backends().into_iter().find(|b| b.name() == d)
    {
        return blk.node().ok_or_else(|| Error::NoMedium(d.to_owned()));
    }
    node.filter(|n| !n.is_empty())
        .and_then(|n| graph.find(n))
        .ok_or_else(|| Error::NotFound {
            device: device.unwrap_or("").to_owned(),
            node: node.unwrap_or("").to_owned(),
        })
}
