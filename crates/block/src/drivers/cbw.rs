//! `copy-before-write`: a filter above a source (`file`) that, before any write, write-zeroes
//! or discard reaches a cluster not yet copied, copies that cluster's old contents to
//! `target`. The target therefore keeps the source as it was when the filter was inserted
//! (backup's point in time, and image fleecing).

use crate::copy::{BlockCopy, cluster_size_for};
use crate::driver::{BoxFut, Driver, Extent, ReqFlags};
use crate::node::Node;
use crate::perm::Perm;
use ferrite_qapi::{Args, Error};
use std::io;
use std::rc::Rc;

pub(crate) struct CbwDriver {
    copy: Rc<BlockCopy>,
}

impl CbwDriver {
    /// A filter sharing `copy` (a backup job's), or with its own state over the source.
    pub(crate) fn open(
        args: &Args,
        file: &Node,
        target: &Node,
        copy: Option<Rc<BlockCopy>>,
    ) -> Result<Self, Error> {
        if file.len() != target.len() {
            return Err(Error::generic(
                "Source and target image have different sizes",
            ));
        }
        let copy = match copy {
            Some(c) => c,
            None => {
                let min = match args.opt_i64("min-cluster-size") {
                    Some(v) if v < 0 || (v as u64).count_ones() != 1 => {
                        return Err(Error::generic("min-cluster-size needs to be a power of 2"));
                    }
                    Some(v) => v as u64,
                    None => 0,
                };
                BlockCopy::new(file.len(), cluster_size_for(target).max(min), false)
            }
        };
        Ok(CbwDriver { copy })
    }

    fn children(node: &Node) -> io::Result<(Rc<Node>, Rc<Node>)> {
        let nomedium = || io::Error::from_raw_os_error(libc::ENOMEDIUM);
        Ok((
            node.child("file").ok_or_else(nomedium)?,
            node.child("target").ok_or_else(nomedium)?,
        ))
    }

    /// Copies what `offset..offset + len` still holds of the point in time.
    async fn before_write(&self, node: &Node, offset: u64, len: u64) -> io::Result<Rc<Node>> {
        let (file, target) = Self::children(node)?;
        self.copy.copy(&file, &target, offset, len).await?;
        Ok(file)
    }
}

impl Driver for CbwDriver {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn len(&self, node: &Node) -> u64 {
        node.child("file").map_or(0, |f| f.len())
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move { Self::children(node)?.0.read(offset, len).await })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = self.before_write(node, offset, data.len() as u64).await?;
            file.write(offset, data, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = self.before_write(node, offset, len).await?;
            file.write_zeroes(offset, len, flags).await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = self.before_write(node, offset, len).await?;
            file.discard(offset, len).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let (file, target) = Self::children(node)?;
            target.flush().await?;
            file.flush().await
        })
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Self::children(node)?.0.block_status(offset, len).await })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        // The point in time has a fixed size.
        crate::driver::unsupported()
    }

    fn child_perm(&self, name: &str, perm: Perm, shared: Perm) -> (Perm, Perm) {
        if name == "target" {
            // Only this filter writes the target; readers of the point in time may share it.
            return (
                Perm::WRITE | Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
            );
        }
        // The source: what the users need, and it may not change size under the copy.
        (perm | Perm::CONSISTENT_READ, shared - Perm::RESIZE)
    }

    fn reopen_check(&self, _node: &Node, _opts: &Args) -> Result<(), Error> {
        Err(Error::generic(
            "Cannot change the options of a copy-before-write node",
        ))
    }

    fn is_passthrough(&self) -> bool {
        true
    }
}
