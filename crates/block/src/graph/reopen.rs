//! Changing open nodes in place (QEMU: `bdrv_reopen_multiple`, `bdrv_co_truncate` from
//! `block_resize`): `blockdev-reopen`, the internal switches between read-only and
//! read-write, and resizing.

use crate::backend::BlockBackend;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::{DetectZeroes, Node};
use crate::perm::Perm;
use ferrite_qapi::Args;
use std::rc::Rc;

impl Graph {
    /// `blockdev-reopen`: checks every entry first, then applies them all on drained nodes.
    /// Options left out take their defaults, as in QEMU.
    ///
    /// # Errors
    /// QEMU's texts for a missing or unknown node name and for options that cannot change;
    /// "Block node is read-only" when a user still writes to a node made read-only.
    pub async fn reopen(&self, list: &[Args]) -> Result<()> {
        // Nodes this reopen makes read-only: their own writes to their children end with it.
        let going_read_only: Vec<&str> = list
            .iter()
            .filter(|o| o.bool_or("read-only", false))
            .filter_map(|o| o.opt_str("node-name"))
            .collect();
        let mut plan = Vec::new();
        for opts in list {
            let name = opts
                .opt_str("node-name")
                .ok_or_else(|| Error::ReopenNodeNameMissing)?;
            let node = self
                .find(name)
                .ok_or_else(|| Error::NoSuchNode(name.to_owned()))?;
            if opts.str("driver")? != node.driver_name() {
                return Err(Error::CannotChange("driver".into()));
            }
            node.driver.reopen_check(&node, opts)?;
            let read_only = opts.bool_or("read-only", false);
            if opts.opt_str("detect-zeroes") == Some("unmap")
                && opts.opt_str("discard") != Some("unmap")
            {
                return Err(Error::DetectZeroesUnmapWithoutDiscard);
            }
            let writers = node.users().into_iter().filter(|u| {
                u.perm().intersects(Perm::WRITE | Perm::WRITE_UNCHANGED)
                    && !u
                        .parent_node()
                        .is_some_and(|p| going_read_only.contains(&p.name()))
            });
            if read_only && writers.count() > 0 {
                return Err(Error::ReadOnly);
            }
            plan.push((node, opts, read_only));
        }
        for (node, opts, read_only) in plan {
            let _drained = self.drain(&node).await;
            if read_only && !node.is_read_only() {
                // Leaving read-write: caches written back and the image marked clean.
                node.driver.close(&node).await.map_err(Error::WriteBack)?;
            }
            let was_read_only = node.is_read_only();
            node.driver.reopen_apply(&node, opts, read_only)?;
            if was_read_only && !read_only {
                node.driver
                    .prepare_writable(&node)
                    .await
                    .map_err(Error::PrepareWritable)?;
            }
            node.read_only.set(read_only);
            self.propagate(&node)?;
            node.detect_zeroes
                .set(DetectZeroes::parse(opts.opt_str("detect-zeroes")));
            node.discard_unmap
                .set(opts.opt_str("discard") == Some("unmap"));
            let cache = opts.dict("cache").unwrap_or_default();
            node.cache_direct.set(cache.bool_or("direct", false));
            node.cache_no_flush.set(cache.bool_or("no-flush", false));
            *node.options.borrow_mut() = opts.as_dict().clone();
        }
        Ok(())
    }

    /// Switches a node and its `file` child between read-only and read-write in place
    /// (internal reopens: an external snapshot's old top, `change-backing-file`).
    ///
    /// # Errors
    /// The storage refusing the mode.
    pub fn set_read_only(&self, node: &Rc<Node>, read_only: bool) -> Result<()> {
        // Only a file opened with the node (inline) that took its mode from it follows it;
        // one the user added or gave its own mode keeps it, as in QEMU, where only
        // inherited options change with the parent.
        let file = node.child("file").filter(|f| {
            f.users().len() == 1 && !self.is_monitor_owned(f) && f.inherits_read_only.get()
        });
        // Going read-only, the node drops its write permission before its file reopens;
        // going read-write, the file reopens for writing first.
        let order: Vec<&Rc<Node>> = if read_only {
            std::iter::once(node).chain(file.iter()).collect()
        } else {
            file.iter().chain(std::iter::once(node)).collect()
        };
        let mut done: Vec<&Rc<Node>> = Vec::new();
        for n in order {
            let r = n
                .driver
                .reopen_apply(n, &Args::new(n.options()), read_only)
                .and_then(|()| {
                    n.read_only.set(read_only);
                    self.propagate(n)
                });
            if let Err(e) = r {
                // Back to where it was: this node and those already switched.
                for m in std::iter::once(n).chain(done.into_iter().rev()) {
                    let _ = m
                        .driver
                        .reopen_apply(m, &Args::new(m.options()), !read_only);
                    m.read_only.set(!read_only);
                    let _ = self.propagate(m);
                }
                return Err(e);
            }
            done.push(n);
        }
        Ok(())
    }

    /// Reopens a node that may have written read-only: its image is brought up to date
    /// and marked clean first (QEMU's qcow2 does this when a reopen drops write access),
    /// then [`Graph::set_read_only`].
    ///
    /// # Errors
    /// As [`Graph::set_read_only`].
    pub async fn reopen_read_only(&self, node: &Rc<Node>) -> Result<()> {
        if node.is_read_only() {
            return Ok(());
        }
        let _ = node.driver.close(node).await;
        self.set_read_only(node, true)
    }

    /// `block_resize`: a backend holding the resize permission truncates the drained node.
    ///
    /// # Errors
    /// QEMU's texts for a bad size, a read-only node, a driver that cannot resize, or a
    /// permission conflict.
    pub async fn resize(&self, node: &Rc<Node>, size: i64) -> Result<()> {
        let size = u64::try_from(size).map_err(|_| Error::NegativeSize)?;
        let blk = BlockBackend::new(&self.rc(), node, Perm::RESIZE, Perm::all())?;
        if node.is_read_only() {
            return Err(Error::ImageReadOnly);
        }
        // The resize runs inside its own drained section.
        blk.set_queue_requests(false);
        let drained = self.drain(node).await;
        let r = blk.truncate(size).await;
        drop(drained);
        drop(blk);
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSUP) => Error::ResizeUnsupported,
            _ => Error::Resize(e),
        })
    }
}
