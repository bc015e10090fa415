//! The request path through a node (QEMU: `block/io.c`): bounds and permission checks,
//! detect-zeroes, requests counted in flight for drained sections, dirty bitmaps and the
//! write threshold updated after writes.
//!
//! These methods are the core's own: drivers reach them through their child edges
//! ([`Child`](crate::Child)), root users through a [`BlockBackend`](crate::BlockBackend).

use crate::driver::{BoxFut, Extent, ReqFlags};
use crate::io::ForeignBuf;
use crate::node::{DetectZeroes, Node};
use crate::perm::Perm;
use std::io;
use std::rc::Rc;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Largest request the layer accepts in one piece (QEMU's `BDRV_REQUEST_MAX_BYTES` is close).
pub const MAX_REQUEST: u64 = 1 << 31;

/// `offset..offset + len` cut into requests of at most [`MAX_REQUEST`] bytes (one, empty,
/// for an empty range, so that its checks still run).
fn pieces(offset: u64, len: u64) -> io::Result<impl Iterator<Item = (u64, u64)>> {
    let end = offset.checked_add(len).ok_or_else(einval)?;
    let count = len.div_ceil(MAX_REQUEST).max(1);
    Ok((0..count).map(move |i| {
        let at = offset + i * MAX_REQUEST;
        (at, (end - at).min(MAX_REQUEST))
    }))
}

/// A request in flight on a node; its end may let a drain finish.
struct InFlight<'a>(&'a Node);

impl<'a> InFlight<'a> {
    fn begin(node: &'a Node) -> Self {
        node.in_flight.set(node.in_flight.get() + 1);
        InFlight(node)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get() - 1;
        self.0.in_flight.set(n);
        if n == 0 {
            crate::drain::notify_progress();
        }
    }
}

impl Node {
    /// Checks that `offset..offset + len` lies inside the node.
    pub(crate) fn check_bounds(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_span(offset, len, false)?;
        if len > MAX_REQUEST {
            return Err(einval());
        }
        Ok(())
    }

    /// Bounds of a write: past the end only for a driver that grows, when a parent holds
    /// the resize permission (a format writing new clusters to its file).
    pub(crate) fn check_write_bounds(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_span(offset, len, true)?;
        if len > MAX_REQUEST {
            return Err(einval());
        }
        Ok(())
    }

    /// Where a range of any length may lie: inside the node, or past its end for a write
    /// (`write`) to a driver that grows while a parent holds the resize permission.
    pub(crate) fn check_span(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        if end <= self.len() {
            return Ok(());
        }
        // A parent that may resize the node writes past its end; a driver that cannot grow
        // (a raw window, a device) has no space for it.
        if write && self.cumulative_perms().0.contains(Perm::RESIZE) {
            if self.driver.can_grow() {
                return Ok(());
            }
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Err(einval())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`.
    pub(crate) async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check_bounds(offset, len as u64)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let _f = InFlight::begin(self);
        self.driver.read(self, offset, len).await
    }

    /// Reads `dest.len()` bytes at `offset` into `dest`.
    pub(crate) async fn read_into(&self, offset: u64, dest: &ForeignBuf) -> io::Result<()> {
        self.check_bounds(offset, dest.len() as u64)?;
        if dest.is_empty() {
            return Ok(());
        }
        let _f = InFlight::begin(self);
        self.driver.read_into(self, offset, dest).await
    }

    /// Writes `data` at `offset`.
    pub(crate) async fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write_bounds(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            // Nothing reaches the driver (drivers may assume a range has a last byte), and
            // nothing counts as written (qemu-storage-daemon's wr_highest_offset stays).
            return Ok(());
        }
        if self.detect_zeroes.get() != DetectZeroes::Off && crate::io::is_zero(&data) {
            let mut zflags = flags;
            if self.detect_zeroes.get() == DetectZeroes::Unmap && self.discard_unmap.get() {
                zflags |= ReqFlags::MAY_UNMAP;
            }
            return self.write_zeroes(offset, len, zflags).await;
        }
        let _f = InFlight::begin(self);
        // QEMU's generic write path raises these on the node written (a blkdebug node
        // acts on them; no other driver listens).
        self.debug_event("pwritev").await;
        let r = self.driver.write(self, offset, data, flags).await;
        self.debug_event("pwritev_done").await;
        self.changed();
        // Failed or not, as QEMU's: a failed write may have changed some of the range.
        self.wrote(offset, len);
        r
    }

    /// Makes `len` bytes at `offset` read as zeroes. Not bounded by a buffer, so longer than
    /// one request may be: done in pieces (QEMU takes 64-bit zero writes the same way).
    pub(crate) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        self.check_span(offset, len, true)?;
        for (at, n) in pieces(offset, len)? {
            self.write_zeroes_piece(at, n, flags).await?;
        }
        Ok(())
    }

    async fn write_zeroes_piece(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.check_write_bounds(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let mut flags = flags;
        if !self.discard_unmap.get() {
            flags.remove(ReqFlags::MAY_UNMAP);
        }
        let _f = InFlight::begin(self);
        self.debug_event("pwritev_zero").await;
        let r = self.driver.write_zeroes(self, offset, len, flags).await;
        self.debug_event("pwritev_done").await;
        self.changed();
        // Failed or not, as QEMU's: a failed write may have changed some of the range.
        self.wrote(offset, len);
        r
    }

    /// Writes whole clusters compressed where the format can.
    pub(crate) async fn write_compressed(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_bounds(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let _f = InFlight::begin(self);
        let r = self.driver.write_compressed(self, offset, data).await;
        self.changed();
        // Failed or not, as QEMU's: a failed write may have changed some of the range.
        self.wrote(offset, len);
        r
    }

    /// How deep in the backing chain the range at `offset` is allocated (1 = this node, 0 =
    /// nowhere), and for how many bytes that holds (NBD's `qemu:allocation-depth`).
    ///
    /// # Errors
    /// As [`Node::block_status`].
    pub fn allocation_depth(&self, offset: u64, len: u64) -> BoxFut<'_, (u64, u32)> {
        Box::pin(async move {
            let e = self.block_status(offset, len).await?;
            if e.allocated {
                return Ok((e.len, 1));
            }
            match self.child("backing") {
                Some(b) if offset < b.len() => {
                    let (n, d) = b
                        .allocation_depth(offset, e.len.min(b.len() - offset))
                        .await?;
                    Ok((n, if d == 0 { 0 } else { d + 1 }))
                }
                _ => Ok((e.len, 0)),
            }
        })
    }

    /// Discards a range; a no-op unless `discard=unmap`. In pieces, as
    /// [`Node::write_zeroes`].
    pub(crate) async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_span(offset, len, false)?;
        for (at, n) in pieces(offset, len)? {
            self.discard_piece(at, n).await?;
        }
        Ok(())
    }

    async fn discard_piece(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_bounds(offset, len)?;
        self.check_writable()?;
        if len == 0 || !self.discard_unmap.get() {
            return Ok(());
        }
        let _f = InFlight::begin(self);
        let r = self.driver.discard(self, offset, len).await;
        self.changed();
        if r.is_ok() {
            for b in self.bitmaps.borrow().iter() {
                b.note_write(offset, len);
            }
        }
        r
    }

    /// Raises debug event `event` on this node (QEMU's `BLKDBG_EVENT` on an edge to it):
    /// nothing happens unless it is a blkdebug node.
    pub async fn debug_event(&self, event: &str) {
        if self.driver().handles_debug_events() {
            let _ = self.driver().debug_event(self, event).await;
        }
    }

    /// Whether writes completed on this node since its last flush.
    pub(crate) fn has_unflushed_writes(&self) -> bool {
        self.flushed_gen.get() != self.write_gen.get()
    }

    /// Flushes; a no-op with `cache.no-flush=on`. Raises `flush_to_os` on the primary child
    /// of a writable node, and `flush_to_disk` when something changed since the last flush,
    /// as QEMU's flush does. Public for drivers that make a FUA request durable by
    /// flushing their own node afterwards, as QEMU's block layer does for them.
    ///
    /// Flushes of one node go one at a time, in the order they came, each covering the
    /// writes completed when it came: one that finds those already flushed by the one
    /// before leaves the node's own flush out (QEMU's `current_gen`).
    pub async fn flush(&self) -> io::Result<()> {
        let generation = self.write_gen.get();
        let _turn = self.flush_turn.lock().await;
        let primary = if self.is_read_only() {
            None
        } else {
            self.child("file").or_else(|| self.child("image"))
        };
        if let Some(p) = &primary {
            p.debug_event("flush_to_os").await;
        }
        if self.cache_no_flush.get() {
            return Ok(());
        }
        // A protocol node that nothing changed since its last flush has nothing to make
        // durable (QEMU skips the disk flush the same way).
        let pending = self.flushed_gen.get() != generation;
        if !pending && self.children().is_empty() && !self.driver.flushes_every_time() {
            return Ok(());
        }
        if let Some(p) = &primary
            && pending
        {
            p.debug_event("flush_to_disk").await;
        }
        let _f = InFlight::begin(self);
        self.flush_pending.set(pending);
        let r = self.driver.flush(self).await;
        if r.is_ok() && generation > self.flushed_gen.get() {
            self.flushed_gen.set(generation);
        }
        r
    }

    /// The extent at `offset`, at most `len` long. A query, not a change: jobs and exports
    /// ask it of any node they see.
    ///
    /// # Errors
    /// EINVAL out of bounds or for an empty range; the driver's error.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.check_status_range(offset, len)?;
        let _f = InFlight::begin(self);
        self.driver.block_status(self, offset, len).await
    }

    /// Whether `offset..offset + len` is allocated in this node or a node of its chain
    /// (filters and backing files) above `base`, or in `base` itself with `include_base`,
    /// and for how many bytes that holds (QEMU: `bdrv_is_allocated_above`).
    ///
    /// # Errors
    /// A block-status query failing.
    pub fn is_allocated_above<'a>(
        self: &'a Rc<Self>,
        base: Option<&'a Rc<Node>>,
        include_base: bool,
        offset: u64,
        len: u64,
    ) -> BoxFut<'a, (bool, u64)> {
        Box::pin(async move {
            let mut n = len;
            let mut node = self.clone();
            loop {
                let at_base = base.is_some_and(|b| Rc::ptr_eq(b, &node));
                if at_base && !include_base {
                    return Ok((false, n));
                }
                if offset >= node.len() {
                    // A layer shorter than the one above reads as zeroes there, and those
                    // zeroes are its own: what is below does not show through.
                    return Ok((!Rc::ptr_eq(&node, self), n));
                }
                let e = node
                    .block_status(offset, n.min(node.len() - offset))
                    .await?;
                if e.allocated {
                    return Ok((true, e.len));
                }
                n = e.len.min(n).max(1);
                if at_base {
                    return Ok((false, n));
                }
                match node.filtered().or_else(|| node.child("backing")) {
                    Some(below) => node = below,
                    None => return Ok((false, n)),
                }
            }
        })
    }

    /// A block-status range: inside the node and not empty.
    pub(crate) fn check_status_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        if end > self.len() || len == 0 {
            return Err(einval());
        }
        Ok(())
    }

    /// Changes the size.
    pub(crate) async fn truncate(&self, size: u64) -> io::Result<()> {
        self.truncate_prealloc(size, crate::driver::Prealloc::Off)
            .await
    }

    /// Changes the size, the added part allocated as `prealloc` says.
    pub(crate) async fn truncate_prealloc(
        &self,
        size: u64,
        prealloc: crate::driver::Prealloc,
    ) -> io::Result<()> {
        let _f = InFlight::begin(self);
        let r = self.driver.truncate_prealloc(self, size, prealloc).await;
        self.changed();
        if r.is_ok() {
            // Bitmaps cover whole sectors of the node, as in QEMU.
            let len = self.len() & !511;
            for b in self.bitmaps.borrow().iter() {
                b.truncate(len);
            }
        }
        r
    }

    /// For a driver's flush: whether writes the flush is to cover were not flushed yet
    /// (QEMU's `flushed_gen != current_gen`). Without them the driver skips its own disk
    /// flush and only passes the flush on to its children, as QEMU's block layer does.
    pub fn written_since_flush(&self) -> bool {
        self.flush_pending.get()
    }

    /// A request that may have changed the node completed.
    fn changed(&self) {
        self.write_gen.set(self.write_gen.get() + 1);
    }

    fn wrote(&self, offset: u64, len: u64) {
        let end = offset + len;
        for b in self.bitmaps.borrow().iter() {
            b.note_write(offset, len);
        }
        if end > self.wr_highest_offset.get() {
            self.wr_highest_offset.set(end);
        }
        let threshold = self.write_threshold.get();
        if threshold > 0 && end > threshold {
            self.write_threshold.set(0);
            if let Some(hit) = self.threshold_hit.borrow().as_ref() {
                hit(self, end - threshold, threshold);
            }
        }
    }
}
