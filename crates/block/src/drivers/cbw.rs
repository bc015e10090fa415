//! `copy-before-write`: a filter above a source (`file`) that, before any write, write-zeroes
//! or discard reaches a cluster not yet copied, copies that cluster's old contents to
//! `target`. The target therefore keeps the source as it was when the filter was inserted
//! (backup's point in time, and image fleecing).
//!
//! The filter also serves that point in time to a `snapshot-access` node above it: a
//! cluster already copied is read from the target, any other from the source (a write
//! waits until such reads are done). Discarding through the snapshot gives clusters up: they
//! are no longer copied and can no longer be read.

use crate::bitmap::DirtyBitmap;
use crate::copy::{BlockCopy, cluster_size_for, min_cluster_size};
use crate::driver::{BoxFut, Driver, Extent, ReqFlags};
use crate::node::Node;
use crate::perm::Perm;
use ferrite_qapi::{Args, Error};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;

/// What a failed copy breaks (`on-cbw-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnCbwError {
    /// The guest's write fails; the point in time stays whole.
    BreakGuestWrite,
    /// The guest's write goes on; the snapshot can no longer be read.
    BreakSnapshot,
}

/// How the filter was asked to start.
pub(crate) struct CbwOptions {
    /// A backup job's copy state to share (else the filter makes its own).
    pub copy: Option<Rc<BlockCopy>>,
    /// Copy only what this bitmap marks (the `bitmap` option).
    pub bitmap: Option<Rc<DirtyBitmap>>,
}

pub(crate) struct CbwDriver {
    copy: Rc<BlockCopy>,
    /// Clusters the snapshot may be read from: all at first, less what was discarded
    /// through it, and with a `bitmap` only what it marked.
    access: Rc<DirtyBitmap>,
    /// Clusters the guest wrote since the point in time: the snapshot reads them from the
    /// target (every other cluster still holds it in the source).
    done: Rc<DirtyBitmap>,
    on_error: OnCbwError,
    /// Longest a copy may take before it counts as failed (`cbw-timeout`).
    timeout: Option<Duration>,
    /// With break-snapshot, the first copy failure: the snapshot is gone.
    broken: Cell<Option<i32>>,
    /// Source ranges snapshot readers are reading now; writes there wait for them.
    reading: RefCell<Vec<(u64, u64)>>,
    read_done: Notify,
    /// The source's cluster size, shown in queries (QEMU asks the filtered node).
    file_cluster: Option<u64>,
    /// Internal bitmaps, newest first, for the node's `dirty-bitmaps`.
    bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
}

/// Marks a source range as being read for the snapshot until dropped.
struct ReadGuard<'a> {
    driver: &'a CbwDriver,
    range: (u64, u64),
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.driver.reading.borrow_mut();
        if let Some(i) = r.iter().position(|x| *x == self.range) {
            r.swap_remove(i);
        }
        self.driver.read_done.notify_waiters();
    }
}

fn eacces() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

impl CbwDriver {
    /// A filter over `file` copying to `target`.
    ///
    /// # Errors
    /// QEMU's texts for a bad `min-cluster-size` and a bitmap of another size. (A target
    /// of another size is accepted, as QEMU does: copies past its end fail.)
    pub(crate) fn open(
        args: &Args,
        file: &Node,
        target: &Node,
        opts: CbwOptions,
    ) -> Result<Self, Error> {
        let copy = match opts.copy {
            Some(c) => c,
            None => {
                let min = min_cluster_size(args.opt_u64("min-cluster-size"))?;
                let cluster = cluster_size_for(target).max(min);
                match &opts.bitmap {
                    Some(b) if b.len() != file.len() => {
                        return Err(Error::generic(format!(
                            "Cannot create block-copy-state: Failed to merge bitmap '{}' to \
                             internal copy-bitmap: Bitmaps are of different sizes (destination \
                             size is {}, source size is {}) and can't be merged",
                            b.name(),
                            file.len(),
                            b.len()
                        )));
                    }
                    Some(b) => BlockCopy::new_from_bitmap(file.len(), cluster, false, b),
                    None => BlockCopy::new(file.len(), cluster, false),
                }
            }
        };
        let access = DirtyBitmap::new("", copy.cluster_size(), copy.len(), false);
        let done = DirtyBitmap::new("", copy.cluster_size(), copy.len(), false);
        let dirty = copy.dirty_bitmap();
        access.merge_from(&dirty);
        let on_error = match args.opt_str("on-cbw-error") {
            Some("break-snapshot") => OnCbwError::BreakSnapshot,
            _ => OnCbwError::BreakGuestWrite,
        };
        let timeout = args
            .opt_u64("cbw-timeout")
            .filter(|&s| s > 0)
            .map(Duration::from_secs);
        Ok(CbwDriver {
            bitmaps: RefCell::new(vec![access.clone(), done.clone(), dirty]),
            copy,
            access,
            done,
            on_error,
            timeout,
            broken: Cell::new(None),
            reading: RefCell::new(Vec::new()),
            read_done: Notify::new(),
            file_cluster: file.driver.cluster_size(),
        })
    }

    fn children(node: &Node) -> io::Result<(Rc<Node>, Rc<Node>)> {
        let nomedium = || io::Error::from_raw_os_error(libc::ENOMEDIUM);
        Ok((
            node.child("file").ok_or_else(nomedium)?,
            node.child("target").ok_or_else(nomedium)?,
        ))
    }

    /// Copies what `offset..offset + len` still holds of the point in time, then waits
    /// for snapshot readers of that range.
    async fn before_write(&self, node: &Node, offset: u64, len: u64) -> io::Result<Rc<Node>> {
        let (file, target) = Self::children(node)?;
        match self.copy_in_time(&file, &target, offset, len).await {
            Ok(()) => self.done.set_range(offset, len),
            Err(e) if self.on_error == OnCbwError::BreakGuestWrite => return Err(e),
            Err(e) => {
                if self.broken.get().is_none() {
                    self.broken.set(Some(e.raw_os_error().unwrap_or(libc::EIO)));
                }
            }
        }
        loop {
            let done = self.read_done.notified();
            let end = offset + len;
            let busy = self
                .reading
                .borrow()
                .iter()
                .any(|&(o, l)| o < end && offset < o + l);
            if !busy {
                break;
            }
            done.await;
        }
        Ok(file)
    }

    /// The copy, failing with ETIMEDOUT past `cbw-timeout` (the copy itself goes on, as
    /// other writes may wait for it).
    async fn copy_in_time(
        &self,
        file: &Rc<Node>,
        target: &Rc<Node>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let Some(limit) = self.timeout else {
            return self
                .copy
                .copy(file, target, offset, len)
                .await
                .map(drop)
                .map_err(Into::into);
        };
        let (copy, file, target) = (self.copy.clone(), file.clone(), target.clone());
        let task = tokio::task::spawn_local(async move {
            copy.copy(&file, &target, offset, len).await.map(drop)
        });
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(r)) => r.map_err(Into::into),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        }
    }

    /// Clusters of `offset..offset + len`.
    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let cs = self.copy.cluster_size();
        offset / cs..(offset + len).div_ceil(cs)
    }

    /// EACCES unless the whole range can be read from the snapshot.
    fn check_access(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.broken.get().is_some() || self.clusters(offset, len).any(|c| !self.access.get(c)) {
            return Err(eacces());
        }
        Ok(())
    }

    /// How far from `offset` (at most `len`) the clusters stay copied, or stay not copied.
    fn same_place(&self, offset: u64, len: u64) -> (u64, bool) {
        let cs = self.copy.cluster_size();
        let first = offset / cs;
        let done = self.done.get(first);
        let mut c = first + 1;
        while c * cs < offset + len && self.done.get(c) == done {
            c += 1;
        }
        ((c * cs).min(offset + len) - offset, done)
    }

    fn freeze_read(&self, offset: u64, len: u64) -> ReadGuard<'_> {
        self.reading.borrow_mut().push((offset, len));
        ReadGuard {
            driver: self,
            range: (offset, len),
        }
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

    fn snapshot_read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let (file, target) = Self::children(node)?;
            self.check_access(offset, len as u64)?;
            let mut out: Vec<u8> = Vec::new();
            let end = offset + len as u64;
            let mut at = offset;
            while at < end {
                let (n, copied) = self.same_place(at, end - at);
                let data = if copied {
                    target.read(at, n as usize).await?
                } else {
                    let _reading = self.freeze_read(at, n);
                    file.read(at, n as usize).await?
                };
                if at == offset && n == len as u64 {
                    return Ok(data);
                }
                out.extend_from_slice(&data);
                at += n;
            }
            Ok(out)
        })
    }

    fn snapshot_block_status<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
    ) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let (file, target) = Self::children(node)?;
            self.check_access(offset, len)?;
            let (n, copied) = self.same_place(offset, len);
            if copied {
                target.block_status(offset, n).await
            } else {
                let _reading = self.freeze_read(offset, n);
                file.block_status(offset, n).await
            }
        })
    }

    fn snapshot_discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let (_, target) = Self::children(node)?;
            // Only whole clusters are given up (the last one whole when the range reaches
            // the end).
            let cs = self.copy.cluster_size();
            let size = self.copy.len();
            let start = offset.div_ceil(cs) * cs;
            let end = if offset + len >= size {
                size
            } else {
                (offset + len) / cs * cs
            };
            if start >= end {
                return Ok(());
            }
            self.access.reset_range(start, end - start);
            self.copy.skip(start, end - start);
            // A copy under way would write the target after the discard.
            self.copy.wait_in_flight(start, end - start).await;
            target.discard(start, end - start).await
        })
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        std::mem::take(&mut *self.bitmaps.borrow_mut())
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file_cluster
    }

    fn child_perm(&self, name: &str, perm: Perm, shared: Perm, used: bool) -> (Perm, Perm) {
        if name == "target" {
            // Only this filter writes the target; readers of the point in time may share it.
            return (
                Perm::WRITE | Perm::CONSISTENT_READ,
                Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
            );
        }
        // The source: what the users need. Once the filter is used, nobody else may write
        // it nor change its size (that would go around the copy); discarding what was
        // copied writes it.
        let mut perm = perm;
        let mut shared = shared;
        if used {
            perm |= Perm::CONSISTENT_READ;
            if self.copy.discards_source() {
                perm |= Perm::WRITE;
            }
            shared -= Perm::WRITE | Perm::RESIZE;
        }
        (perm, shared)
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
