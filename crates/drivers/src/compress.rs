//! `compress`: a filter whose writes reach its child compressed (QEMU:
//! block/filter-compress.c). The child must be a format that stores compressed clusters
//! (qcow2); writes are made whole clusters first, the rest of a cluster read from the child,
//! as QEMU's block layer pads a request to the filter's alignment (the child's cluster).

use crate::error::Error;
use ferrite_block::driver::{BoxFut, Driver, ReqFlags};
use ferrite_block::units::UnitLocks;
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use std::io;
use std::rc::Rc;

/// The `compress` driver's factory.
pub(crate) struct CompressFactory;

impl DriverFactory for CompressFactory {
    fn name(&self) -> &'static str {
        "compress"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let node = file.node();
            let Some(cluster) = node.driver().compressed_cluster_size() else {
                return Err(Error::CannotCompress(node.driver_name().to_owned()).into());
            };
            Ok(Box::new(CompressDriver {
                file,
                cluster,
                writing: UnitLocks::default(),
            }) as Box<dyn Driver>)
        })
    }
}

struct CompressDriver {
    file: Rc<Child>,
    /// The child's cluster: the unit of a compressed write.
    cluster: u64,
    /// Clusters a write is filling in: two partial writes of one cluster must not both
    /// read its old contents.
    writing: UnitLocks,
}

impl CompressDriver {
    async fn write_impl(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let c = self.cluster;
        let size = self.file.len();
        let end = offset + data.len() as u64;
        let from = offset / c * c;
        let to = end.next_multiple_of(c).min(size);
        let _held = self.writing.claim(from / c, to.div_ceil(c)).await;
        if from == offset && to == end {
            return self.file.write_compressed(offset, data).await;
        }
        // The clusters around the request as they are, with the request's bytes in them.
        let mut whole = self.file.read(from, (to - from) as usize).await?;
        let at = (offset - from) as usize;
        whole[at..at + data.len()].copy_from_slice(&data);
        self.file.write_compressed(from, whole).await
    }
}

impl Driver for CompressDriver {
    ferrite_block::forward_to_child!(self.file; len, read, discard, flush, block_status, truncate);

    fn format_name(&self) -> &'static str {
        "compress"
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_impl(offset, data))
    }

    fn write_compressed<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_impl(offset, data))
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.file.write_zeroes(offset, len, flags))
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.cluster
    }
}
