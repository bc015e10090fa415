//! `snapshot-access`: the point in time a `copy-before-write` node (`file`) keeps, as a
//! node of its own (image fleecing: export it over NBD, or back it up, while the guest
//! writes the source). Reads never change; a discard gives a range up (it is no longer
//! kept, and freed on the copy-before-write target); writes are refused.

use super::cbw::{CbwDriver, Snapshot};
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::Perm;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use std::any::Any;
use std::io;
use std::rc::Rc;

/// The `snapshot-access` factory.
pub(crate) struct SnapshotAccessFactory;

impl DriverFactory for SnapshotAccessFactory {
    fn name(&self) -> &'static str {
        "snapshot-access"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            // The point in time of the copy-before-write node below; over anything else
            // every read fails (ENOTSUP), as in QEMU.
            let node = file.node();
            let any: &dyn Any = node.driver();
            let snap = any.downcast_ref::<CbwDriver>().map(CbwDriver::snapshot);
            Ok(Box::new(SnapshotAccessDriver { snap }) as Box<dyn Driver>)
        })
    }
}

/// A view of a copy-before-write node's point in time.
pub(crate) struct SnapshotAccessDriver {
    snap: Option<Rc<Snapshot>>,
}

impl SnapshotAccessDriver {
    fn snap(&self) -> io::Result<&Snapshot> {
        self.snap
            .as_deref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTSUP))
    }
}

impl Driver for SnapshotAccessDriver {
    fn format_name(&self) -> &'static str {
        "snapshot-access"
    }

    fn len(&self, node: &Node) -> u64 {
        match &self.snap {
            Some(s) => s.len(),
            None => node.child("file").map_or(0, |f| f.len()),
        }
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move { self.snap()?.read(offset, len).await })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move { self.snap()?.discard(offset, len).await })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        // Nothing is written through this node.
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let mut e = self.snap()?.block_status(offset, len).await?;
            // Everything the snapshot shows is its own (nothing comes from a backing file).
            e.allocated = true;
            Ok(e)
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn child_perm(&self, _name: &str, _perm: Perm, _shared: Perm, _used: bool) -> (Perm, Perm) {
        // The copy-before-write node keeps the point in time whatever its users do.
        (Perm::empty(), Perm::all())
    }

    fn is_passthrough(&self) -> bool {
        true
    }

    fn shows_file_name(&self) -> bool {
        true
    }

    fn has_image_info(&self) -> bool {
        false
    }
}
