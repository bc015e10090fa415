//! The drivers: `file` (protocol), `raw` (format, with offset/size), `null-co`/`null-aio`,
//! `qcow2`, and the `copy-before-write` filter with its `snapshot-access` view.

pub mod cbw;
pub(crate) mod file;
pub(crate) mod lock;
pub(crate) mod null;
pub(crate) mod qcow2;
pub(crate) mod raw;
pub(crate) mod snapshot_access;

use crate::registry::Registry;
use std::rc::Rc;

/// Registers every driver of this crate.
pub fn register(registry: &Registry) {
    registry.register(Rc::new(file::FileFactory));
    registry.register(Rc::new(raw::RawFactory));
    registry.register(Rc::new(null::NullFactory { aio: false }));
    registry.register(Rc::new(null::NullFactory { aio: true }));
    registry.register(Rc::new(qcow2::Qcow2Factory));
    registry.register(Rc::new(cbw::CbwFactory::new()));
    registry.register(Rc::new(snapshot_access::SnapshotAccessFactory));
}
