//! QEMU's `iscsi` block driver: a node whose bytes are a SCSI logical unit on an iSCSI
//! target, with QEMU's options, checks and texts. QEMU reaches the target through
//! libiscsi; ferrite speaks iSCSI itself (RFC 7143), every request under way at once on
//! one connection, and logs in again when the connection breaks.
//!
//! - `pdu.rs`: the protocol data units, their header digest;
//! - `text.rs`: the `key=value` texts of login and their negotiation;
//! - `login.rs`: connecting and logging in (with CHAP);
//! - `session.rs`: the full-feature phase: tagged commands, data in and out, NOPs;
//! - `scsi.rs`: the SCSI commands the node sends and what their answers mean;
//! - `driver.rs`: the node.

mod driver;
mod login;
mod pdu;
mod scsi;
mod session;
mod text;

use ferrite_block::Registry;
use std::rc::Rc;

/// Registers the `iscsi` driver.
pub fn register(registry: &Registry) {
    registry.register(Rc::new(driver::IscsiFactory));
}
