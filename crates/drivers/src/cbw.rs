//! `copy-before-write`: a filter above a source (`file`) that, before any write, write-zeroes
//! or discard reaches a cluster not yet copied, copies that cluster's old contents to
//! `target`. The target therefore keeps the source as it was when the filter was inserted
//! (backup's point in time, and image fleecing).
//!
//! The filter also keeps that point in time readable ([`Snapshot`]) for a `snapshot-access`
//! node above it: a cluster already copied is read from the target, any other from the
//! source (a write waits until such reads are done). Discarding through the snapshot gives
//! clusters up: they are no longer copied and can no longer be read.

use crate::error::Error;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::Perm;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::copy::{BlockCopy, cluster_size_for, min_cluster_size};
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use ferrite_qapi::Args;
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

/// The `copy-before-write` factory: for `blockdev-add` (the filter makes its own copy
/// state) or for a backup job (it shares the job's).
pub struct CbwFactory {
    copy: Option<Rc<BlockCopy>>,
}

impl CbwFactory {
    /// The factory `blockdev-add` uses.
    pub(crate) fn new() -> Self {
        CbwFactory { copy: None }
    }

    /// A factory for one filter sharing `copy` (a backup job's copy state).
    pub fn sharing(copy: Rc<BlockCopy>) -> Self {
        CbwFactory { copy: Some(copy) }
    }
}

impl DriverFactory for CbwFactory {
    fn name(&self) -> &'static str {
        "copy-before-write"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let target = ctx.open_child("target").await?;
            let bitmap = match ctx.opts().dict("bitmap") {
                Some(b) => Some(bitmap_option(ctx, &b)?),
                None => None,
            };
            let drv = CbwDriver::open(ctx.opts(), file, target, self.copy.clone(), bitmap)?;
            Ok(Box::new(drv) as Box<dyn Driver>)
        })
    }
}

/// The filter's `bitmap` (`BlockDirtyBitmap`).
///
/// # Errors
/// QEMU's texts for an unknown node or bitmap.
fn bitmap_option(ctx: &OpenCtx<'_>, b: &Args) -> ferrite_block::Result<Rc<DirtyBitmap>> {
    let (node, name) = (b.str("node")?, b.str("name")?);
    let node = ctx
        .graph()
        .find(node)
        .ok_or_else(|| Error::BitmapNodeNotFound(node.to_owned()))?;
    node.bitmap(name)
        .ok_or_else(|| Error::BitmapNotFound(name.to_owned()).into())
}

/// The point in time a filter keeps, readable through `snapshot-access`.
pub struct Snapshot {
    source: Rc<Child>,
    target: Rc<Child>,
    copy: Rc<BlockCopy>,
    /// Clusters the snapshot may be read from: all at first, less what was discarded
    /// through it, and with a `bitmap` only what it marked.
    access: Rc<DirtyBitmap>,
    /// Clusters the guest wrote since the point in time: the snapshot reads them from the
    /// target (every other cluster still holds it in the source).
    done: Rc<DirtyBitmap>,
    /// With break-snapshot, the first copy failure: the snapshot is gone.
    broken: Cell<Option<i32>>,
    /// Source ranges snapshot readers are reading now; writes there wait for them.
    reading: RefCell<Vec<(u64, u64)>>,
    read_done: Notify,
}

/// The filter.
pub(crate) struct CbwDriver {
    snap: Rc<Snapshot>,
    on_error: OnCbwError,
    /// Longest a copy may take before it counts as failed (`cbw-timeout`).
    timeout: Option<Duration>,
    /// The source's cluster size, shown in queries (QEMU asks the filtered node).
    file_cluster: Option<u64>,
    /// Internal bitmaps, newest first, for the node's `dirty-bitmaps`.
    bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
}

/// Marks a source range as being read for the snapshot until dropped.
struct ReadGuard<'a> {
    snap: &'a Snapshot,
    range: (u64, u64),
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut r = self.snap.reading.borrow_mut();
        if let Some(i) = r.iter().position(|x| *x == self.range) {
            r.swap_remove(i);
        }
        self.snap.read_done.notify_waiters();
    }
}

fn eacces() -> io::Error {
    io::Error::from_raw_os_error(libc::EACCES)
}

impl CbwDriver {
    /// A filter over `file` copying to `target`, with `copy` as its copy state or one of
    /// its own.
    ///
    /// # Errors
    /// QEMU's texts for a bad `min-cluster-size` and a bitmap of another size. (A target
    /// of another size is accepted, as QEMU does: copies past its end fail.)
    fn open(
        args: &Args,
        file: Rc<Child>,
        target: Rc<Child>,
        copy: Option<Rc<BlockCopy>>,
        bitmap: Option<Rc<DirtyBitmap>>,
    ) -> ferrite_block::Result<Self> {
        // A backup job hands over its copy state already narrowed to what it copies; QEMU
        // narrows it only after the filter exists, whose snapshot therefore keeps every
        // cluster readable.
        let shared = copy.is_some();
        let min = min_cluster_size(args.opt_u64("min-cluster-size"))?;
        let copy = match copy {
            Some(c) => c,
            None => {
                let cluster = cluster_size_for(&target.node()).max(min);
                let len = file.len();
                match &bitmap {
                    Some(b) if b.len() != len => {
                        return Err(Error::BitmapSize {
                            name: b.name().to_owned(),
                            len,
                            bitmap_len: b.len(),
                        }
                        .into());
                    }
                    Some(b) => BlockCopy::new_from_bitmap(len, cluster, false, b),
                    None => BlockCopy::new(len, cluster, false),
                }
            }
        };
        let access = DirtyBitmap::new("", copy.cluster_size(), copy.len(), false);
        let done = DirtyBitmap::new("", copy.cluster_size(), copy.len(), false);
        let dirty = copy.dirty_bitmap();
        if shared {
            access.fill();
        } else {
            access.merge_from(&dirty);
        }
        let on_error = match args.opt_str("on-cbw-error") {
            Some("break-snapshot") => OnCbwError::BreakSnapshot,
            _ => OnCbwError::BreakGuestWrite,
        };
        let timeout = args
            .opt_u64("cbw-timeout")
            .filter(|&s| s > 0)
            .map(Duration::from_secs);
        let file_cluster = file.node().cluster_size();
        Ok(CbwDriver {
            bitmaps: RefCell::new(vec![access.clone(), done.clone(), dirty]),
            snap: Rc::new(Snapshot {
                source: file,
                target,
                copy,
                access,
                done,
                broken: Cell::new(None),
                reading: RefCell::new(Vec::new()),
                read_done: Notify::new(),
            }),
            on_error,
            timeout,
            file_cluster,
        })
    }

    /// The point in time this filter keeps (for `snapshot-access`).
    pub(crate) fn snapshot(&self) -> Rc<Snapshot> {
        self.snap.clone()
    }

    /// Copies what `offset..offset + len` still holds of the point in time, then waits
    /// for snapshot readers of that range.
    async fn before_write(&self, offset: u64, len: u64) -> io::Result<()> {
        let snap = &self.snap;
        match self.copy_in_time(offset, len).await {
            Ok(()) => snap.done.set_range(offset, len),
            Err(e) if self.on_error == OnCbwError::BreakGuestWrite => return Err(e),
            Err(e) => {
                if snap.broken.get().is_none() {
                    snap.broken.set(Some(e.raw_os_error().unwrap_or(libc::EIO)));
                }
            }
        }
        loop {
            let done = snap.read_done.notified();
            let end = offset + len;
            let busy = snap
                .reading
                .borrow()
                .iter()
                .any(|&(o, l)| o < end && offset < o + l);
            if !busy {
                return Ok(());
            }
            done.await;
        }
    }

    /// The copy, failing with ETIMEDOUT past `cbw-timeout` (the copy itself goes on, as
    /// other writes may wait for it).
    async fn copy_in_time(&self, offset: u64, len: u64) -> io::Result<()> {
        let snap = &self.snap;
        let Some(limit) = self.timeout else {
            return snap
                .copy
                .copy_before_write(&snap.source, &snap.target, offset, len)
                .await
                .map(drop)
                .map_err(Into::into);
        };
        let snap = snap.clone();
        let task = tokio::task::spawn_local(async move {
            snap.copy
                .copy_before_write(&snap.source, &snap.target, offset, len)
                .await
                .map(drop)
        });
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(r)) => r.map_err(Into::into),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        }
    }
}

impl Snapshot {
    /// Clusters of `offset..offset + len`.
    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let cs = self.copy.cluster_size();
        offset / cs..(offset + len).div_ceil(cs)
    }

    /// The size of the point in time.
    pub(crate) fn len(&self) -> u64 {
        self.copy.len()
    }

    /// EINVAL outside the point in time, EACCES unless the whole range can be read from
    /// it.
    fn check_access(&self, offset: u64, len: u64) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len()) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
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
            snap: self,
            range: (offset, len),
        }
    }

    /// Reads the point in time.
    ///
    /// # Errors
    /// EINVAL out of bounds; EACCES for what the snapshot no longer holds; the source's
    /// or the target's error.
    pub(crate) async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check_access(offset, len as u64)?;
        let mut out: Vec<u8> = Vec::new();
        let end = offset + len as u64;
        let mut at = offset;
        while at < end {
            let (n, copied) = self.same_place(at, end - at);
            let data = if copied {
                self.target.read(at, n as usize).await?
            } else {
                let _reading = self.freeze_read(at, n);
                self.source.read(at, n as usize).await?
            };
            if at == offset && n == len as u64 {
                return Ok(data);
            }
            out.extend_from_slice(&data);
            at += n;
        }
        Ok(out)
    }

    /// The status of the point in time at `offset`, at most `len` long.
    ///
    /// # Errors
    /// As [`Snapshot::read`], and EINVAL for an empty range.
    pub(crate) async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.check_access(offset, len)?;
        let (n, copied) = self.same_place(offset, len);
        if copied {
            self.target.block_status(offset, n).await
        } else {
            let _reading = self.freeze_read(offset, n);
            self.source.block_status(offset, n).await
        }
    }

    /// Gives up the point in time of a range (whole clusters of it: the last one whole
    /// when the range reaches the end).
    ///
    /// # Errors
    /// EINVAL out of bounds; the target's discard failing.
    pub(crate) async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let cs = self.copy.cluster_size();
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
        self.target.discard(start, end - start).await
    }
}

impl Driver for CbwDriver {
    fn format_name(&self) -> &'static str {
        "copy-before-write"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.snap.source.len()
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move { self.snap.source.read(offset, len).await })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.before_write(offset, data.len() as u64).await?;
            self.snap.source.write(offset, data, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.snap.source.write_zeroes(offset, len, flags).await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.before_write(offset, len).await?;
            self.snap.source.discard(offset, len).await
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.snap.target.flush().await?;
            self.snap.source.flush().await
        })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { self.snap.source.block_status(offset, len).await })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        // The point in time has a fixed size.
        ferrite_block::driver::unsupported()
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        std::mem::take(&mut *self.bitmaps.borrow_mut())
    }

    fn cluster_size(&self) -> Option<u64> {
        self.file_cluster
    }

    fn child_perm_inactive(&self, name: &str) -> Perm {
        if name == "target" {
            Perm::WRITE
        } else {
            Perm::empty()
        }
    }

    fn child_perm(&self, name: &str, perm: Perm, shared: Perm, used: bool) -> (Perm, Perm) {
        if name == "target" {
            // QEMU shares writes on the target (the guest's disk may be in its backing
            // chain) but not resizes: the sizes are checked once, at the start.
            return (Perm::WRITE, Perm::all() - Perm::RESIZE);
        }
        // The source: what the users need. Once the filter is used, nobody else may write
        // it nor change its size (that would go around the copy); discarding what was
        // copied writes it.
        let mut perm = perm;
        let mut shared = shared;
        if used {
            perm |= Perm::CONSISTENT_READ;
            if self.snap.copy.discards_source() {
                perm |= Perm::WRITE;
            }
            shared -= Perm::WRITE | Perm::RESIZE;
        }
        (perm, shared)
    }

    fn is_passthrough(&self) -> bool {
        true
    }

    fn shows_file_name(&self) -> bool {
        true
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }
}
