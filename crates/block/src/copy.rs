//! Block copy: the clusters of a source still to be copied to a target, and the copying
//! itself, shared by a `copy-before-write` filter (which copies what a write is about to
//! change) and a backup job (which copies the rest in the background). A cluster is copied at
//! most once, and a write waits for the copy of its clusters in flight (QEMU: block-copy.c).

use crate::bitmap::DirtyBitmap;
use crate::child::Child;
use crate::driver::ReqFlags;
use crate::node::Node;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use tokio::sync::Notify;

/// A copy that failed: reading the source or writing the target.
#[derive(Debug)]
pub struct CopyError {
    /// The source failed (else the target).
    pub read: bool,
    /// What the failing side reported.
    pub error: io::Error,
}

impl From<CopyError> for io::Error {
    fn from(e: CopyError) -> io::Error {
        e.error
    }
}

/// Most bytes one copy request moves.
pub const MAX_CHUNK: u64 = 1 << 20;

/// Default copy granularity when the target's is smaller or unknown (QEMU's).
const DEFAULT_CLUSTER: u64 = 64 << 10;

/// The copy granularity for a target: its cluster size, at least 64 KiB.
pub fn cluster_size_for(target: &Node) -> u64 {
    target
        .cluster_size()
        .unwrap_or(DEFAULT_CLUSTER)
        .max(DEFAULT_CLUSTER)
}

/// `min-cluster-size`: a power of two, or zero for none.
///
/// # Errors
/// QEMU's text for other values.
pub fn min_cluster_size(v: Option<u64>) -> crate::Result<u64> {
    match v {
        Some(v) if v != 0 && !v.is_power_of_two() => Err(crate::Error::MinClusterSize),
        v => Ok(v.unwrap_or(0)),
    }
}

/// The to-copy state of a source.
pub struct BlockCopy {
    cluster: u64,
    len: u64,
    /// Clusters still to copy.
    dirty: Rc<DirtyBitmap>,
    /// Clusters being copied now, with whom to wake when done.
    in_flight: RefCell<HashMap<u64, Rc<Notify>>>,
    /// Write the target compressed (whole clusters).
    compress: bool,
    /// Discard what was copied from the source (backup's `discard-source`).
    discard_source: Cell<bool>,
    /// Bytes copied so far.
    copied: Cell<u64>,
}

impl BlockCopy {
    /// Every cluster of a `len`-byte source marked to copy, in clusters of `cluster` bytes.
    pub fn new(len: u64, cluster: u64, compress: bool) -> Rc<BlockCopy> {
        let dirty = DirtyBitmap::new("", cluster, len, false);
        dirty.fill();
        Rc::new(BlockCopy {
            cluster,
            len,
            dirty,
            in_flight: RefCell::new(HashMap::new()),
            compress,
            discard_source: Cell::new(false),
            copied: Cell::new(0),
        })
    }

    /// Only what `bitmap` marks dirty is to copy (sync `bitmap`, a copy-before-write
    /// filter's `bitmap`).
    pub fn new_from_bitmap(
        len: u64,
        cluster: u64,
        compress: bool,
        bitmap: &DirtyBitmap,
    ) -> Rc<BlockCopy> {
        let b = BlockCopy::new(len, cluster, compress);
        b.dirty.clear();
        b.dirty.merge_from(bitmap);
        b
    }

    /// Discard each range from the source once it is copied.
    pub fn set_discard_source(&self, on: bool) {
        self.discard_source.set(on);
    }

    /// Whether copied ranges are discarded from the source.
    pub fn discards_source(&self) -> bool {
        self.discard_source.get()
    }

    /// The copy granularity in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The source's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is left to copy.
    pub fn is_empty(&self) -> bool {
        self.dirty.is_empty()
    }

    /// Bytes still to copy.
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.count().min(self.len)
    }

    /// Bytes copied so far.
    pub fn copied(&self) -> u64 {
        self.copied.get()
    }

    /// The clusters still to copy, as an anonymous bitmap (QEMU shows a copy-before-write
    /// node's internal bitmaps in its `dirty-bitmaps`).
    pub fn dirty_bitmap(&self) -> Rc<DirtyBitmap> {
        self.dirty.clone()
    }

    fn bytes_of(&self, c: u64) -> u64 {
        self.cluster.min(self.len - c * self.cluster)
    }

    /// Whether cluster `c` is still to copy.
    pub fn is_dirty(&self, c: u64) -> bool {
        self.dirty.get(c)
    }

    /// Unmarks the clusters wholly inside `offset..offset + len` (nothing to copy there).
    pub fn skip(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(self.cluster);
        let end = if offset + len >= self.len {
            self.len.div_ceil(self.cluster)
        } else {
            (offset + len) / self.cluster
        };
        for c in first..end {
            self.dirty.set_granule(c, false);
        }
    }

    /// Waits until no copy of a cluster of `offset..offset + len` is in flight.
    pub async fn wait_in_flight(&self, offset: u64, len: u64) {
        let clusters = offset / self.cluster..(offset + len).div_ceil(self.cluster);
        loop {
            let busy = clusters
                .clone()
                .find_map(|c| self.in_flight.borrow().get(&c).cloned());
            match busy {
                Some(n) => n.notified().await,
                None => return,
            }
        }
    }

    /// The first cluster at or after `from` still to copy.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.dirty.next_dirty_granule(from)
    }

    /// Copies every cluster of `offset..offset + len` still to copy from `source` to
    /// `target`, waiting for those another request is copying. Returns the bytes this call
    /// copied.
    ///
    /// # Errors
    /// The source or the target failing; the clusters concerned stay to copy.
    pub async fn copy(
        &self,
        source: &Child,
        target: &Child,
        offset: u64,
        len: u64,
    ) -> Result<u64, CopyError> {
        if len == 0 || offset >= self.len {
            return Ok(0);
        }
        let first = offset / self.cluster;
        let end = (offset + len).min(self.len).div_ceil(self.cluster);
        let mut done = 0;
        let mut c = first;
        while c < end {
            let busy = self.in_flight.borrow().get(&c).cloned();
            if let Some(n) = busy {
                n.notified().await;
                continue;
            }
            if !self.is_dirty(c) {
                c += 1;
                continue;
            }
            // A run of clusters to copy that nobody else is copying.
            let mut n = 1;
            while c + n < end
                && n * self.cluster < MAX_CHUNK
                && self.is_dirty(c + n)
                && !self.in_flight.borrow().contains_key(&(c + n))
            {
                n += 1;
            }
            done += self.copy_run(source, target, c, n).await?;
            c += n;
        }
        Ok(done)
    }

    async fn copy_run(
        &self,
        source: &Child,
        target: &Child,
        c: u64,
        n: u64,
    ) -> Result<u64, CopyError> {
        let notify = Rc::new(Notify::new());
        for k in c..c + n {
            self.in_flight.borrow_mut().insert(k, notify.clone());
        }
        let start = c * self.cluster;
        let bytes: u64 = (c..c + n).map(|k| self.bytes_of(k)).sum();
        let r = self.transfer(source, target, start, bytes).await;
        for k in c..c + n {
            self.in_flight.borrow_mut().remove(&k);
            if r.is_ok() {
                self.dirty.set_granule(k, false);
            }
        }
        notify.notify_waiters();
        r?;
        self.copied.set(self.copied.get() + bytes);
        if self.discard_source.get() {
            // As QEMU: the source's answer does not matter, the copy is made.
            let _ = source.discard(start, bytes).await;
        }
        Ok(bytes)
    }

    /// Moves one range: zeroes as zeroes (never skipped: a target backed by the source
    /// must not show the source's new data through), data as data, compressed if asked. A
    /// range bigger than a chunk (a huge `min-cluster-size`) moves a chunk at a time, so
    /// memory stays bounded.
    async fn transfer(
        &self,
        source: &Child,
        target: &Child,
        offset: u64,
        len: u64,
    ) -> Result<(), CopyError> {
        // Whole target clusters per piece, for compressed writes.
        let piece = MAX_CHUNK.max(target.node().cluster_size().unwrap_or(0));
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = piece.min(end - at);
            let data = source
                .read(at, n as usize)
                .await
                .map_err(|error| CopyError { read: true, error })?;
            let r = if crate::io::is_zero(&data) {
                target.write_zeroes(at, n, ReqFlags::empty()).await
            } else if self.compress {
                target.write_compressed(at, data).await
            } else {
                target.write(at, data, ReqFlags::empty()).await
            };
            r.map_err(|error| CopyError { read: false, error })?;
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::BlockCopy;

    #[test]
    fn marks_and_skips_whole_clusters() {
        let b = BlockCopy::new(10 * 65536 + 100, 65536, false);
        assert_eq!(b.dirty_bytes(), 10 * 65536 + 100);
        assert_eq!(b.next_dirty(0), Some(0));
        b.skip(100, 3 * 65536);
        // Cluster 0 is only partly inside, 1 and 2 wholly, 3 partly.
        assert!(b.is_dirty(0) && !b.is_dirty(1) && !b.is_dirty(2) && b.is_dirty(3));
        assert_eq!(b.next_dirty(1), Some(3));
        b.skip(9 * 65536, 65536 + 100);
        assert_eq!(b.next_dirty(4), Some(4));
        assert!(!b.is_dirty(9) && !b.is_dirty(10));
        b.skip(0, 11 * 65536);
        assert_eq!(b.next_dirty(0), None);
        assert!(b.is_empty());
    }
}
