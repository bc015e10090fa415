//! Block copy: the clusters of a source still to be copied to a target, and the copying
//! itself, shared by a `copy-before-write` filter (which copies what a write is about to
//! change) and a backup job (which copies the rest in the background). A cluster is copied at
//! at least once and counted once, and a write waits for the copy of its clusters in flight
//! (QEMU: block-copy.c), but never for more than the copy of its own clusters: a write that
//! finds its cluster inside a background run (up to a megabyte) copies that cluster itself as
//! soon as the run has read it, instead of waiting for the run's whole write.

use crate::bitmap::DirtyBitmap;
use crate::child::Child;
use crate::driver::ReqFlags;
use crate::node::Node;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
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

/// The copy granularity for a target: its image's cluster size, at least 64 KiB. A target that
/// knows no cluster size and has no backing file to fill what a small copy leaves out gets
/// QEMU's warning that the default may be too small.
pub fn cluster_size_for(target: &Rc<Node>) -> u64 {
    // Filters answer for the node they filter.
    let image = target.skip_filters();
    match image.cluster_size() {
        Some(size) => size.max(DEFAULT_CLUSTER),
        None => {
            if !image.answers_info() && image.child("backing").is_none() {
                crate::report::warn_report(&format!(
                    "The target block device doesn't provide information about the block \
                     size and it doesn't have a backing file. The (default) block size of \
                     {DEFAULT_CLUSTER} bytes is used. If the actual block size of the target \
                     exceeds this value, the backup may be unusable"
                ));
            }
            DEFAULT_CLUSTER
        }
    }
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

/// Clusters being copied by one request.
struct Run {
    clusters: u64,
    /// The source has been read: the clusters' old data is safe in memory, and reading the
    /// source again gives the same data until a write to them goes ahead.
    read: Cell<bool>,
    /// Woken when the read is done and when the run ends.
    notify: Notify,
}

impl Run {
    fn new(clusters: u64) -> Rc<Run> {
        Rc::new(Run {
            clusters,
            read: Cell::new(false),
            notify: Notify::new(),
        })
    }
}

/// The to-copy state of a source.
pub struct BlockCopy {
    cluster: u64,
    len: u64,
    /// Clusters still to copy.
    dirty: Rc<DirtyBitmap>,
    /// Clusters being copied now, by the run copying them.
    in_flight: RefCell<HashMap<u64, Rc<Run>>>,
    /// Clusters a write copied itself while a run had them in flight: the run does not
    /// count them again.
    stolen: RefCell<HashSet<u64>>,
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
            stolen: RefCell::new(HashSet::new()),
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

    /// Bytes still to copy, in whole clusters: as QEMU's block-copy counts progress, the
    /// last cluster of an image whose length is not a multiple counts whole, in what is
    /// left and in what is copied (a job's `len` and `offset`).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty.count()
    }

    /// Bytes copied so far, in whole clusters (see [`BlockCopy::dirty_bytes`]).
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
                Some(run) => run.notify.notified().await,
                None => return,
            }
        }
    }

    /// The first cluster at or after `from` still to copy.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        self.dirty.next_dirty_granule(from)
    }

    /// Copies every cluster of `offset..offset + len` still to copy from `source` to
    /// `target`, waiting for those another request is copying (the background copy).
    /// Returns the bytes this call copied, in whole clusters (see [`BlockCopy::dirty_bytes`]).
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
        self.copy_range(source, target, offset, len, false).await
    }

    /// As [`BlockCopy::copy`], for a write about to change `offset..offset + len`: a
    /// cluster that a longer run is copying is copied here as soon as the run has read it,
    /// so the write waits for its own clusters' copy only.
    ///
    /// # Errors
    /// As [`BlockCopy::copy`].
    pub async fn copy_before_write(
        &self,
        source: &Child,
        target: &Child,
        offset: u64,
        len: u64,
    ) -> Result<u64, CopyError> {
        self.copy_range(source, target, offset, len, true).await
    }

    async fn copy_range(
        &self,
        source: &Child,
        target: &Child,
        offset: u64,
        len: u64,
        steal: bool,
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
            if let Some(run) = busy {
                // Not with `discard-source`: the run discards its range from the source
                // when it ends, which a second read must not see.
                if steal && run.clusters > 1 && run.read.get() && !self.discard_source.get() {
                    done += self.copy_stolen(source, target, c).await?;
                    c += 1;
                } else {
                    run.notify.notified().await;
                }
                continue;
            }
            if !self.is_dirty(c) {
                c += 1;
                continue;
            }
            let n = self.run_at(source, c, end - c).await;
            done += self.copy_run(source, target, c, n).await?;
            c += n;
        }
        Ok(done)
    }

    /// How many clusters one copy from dirty cluster `c` takes (at least one, at most
    /// `max` and a chunk): those to copy that follow it, that nobody else is copying, and
    /// that lie in the source's extent at `c`. The background copy sizes its requests by
    /// this before the rate limit counts them, as QEMU's block-copy sizes its tasks.
    pub async fn run_at(&self, source: &Child, c: u64, max: u64) -> u64 {
        let mut n = 1;
        while n < max
            && n * self.cluster < MAX_CHUNK
            && self.is_dirty(c + n)
            && !self.in_flight.borrow().contains_key(&(c + n))
        {
            n += 1;
        }
        self.within_extent(source, c, n).await
    }

    /// How many of the `n` clusters from `c` lie in the source's extent at `c` (at least
    /// one): as QEMU's block-copy, a run stops where the source's block status changes, so
    /// one read never spans two extents (data and zeroes, or two host runs of a qcow2
    /// image), and a read error fails only the run it hits. A failed query leaves `n`.
    async fn within_extent(&self, source: &Child, c: u64, n: u64) -> u64 {
        if n == 1 {
            return 1;
        }
        let start = c * self.cluster;
        let bytes: u64 = (c..c + n).map(|k| self.bytes_of(k)).sum();
        match source.block_status(start, bytes).await {
            // Whole clusters of the extent (QEMU rounds down, and takes one cluster for an
            // extent shorter than that), all of them where the extent reaches the end.
            Ok(e) if start + e.len >= self.len() => e.len.div_ceil(self.cluster).clamp(1, n),
            Ok(e) => (e.len / self.cluster).clamp(1, n),
            Err(_) => n,
        }
    }

    /// Marks clusters `c..c + n` as copied by `run`.
    fn start(&self, c: u64, n: u64) -> Rc<Run> {
        let run = Run::new(n);
        let mut in_flight = self.in_flight.borrow_mut();
        for k in c..c + n {
            in_flight.insert(k, run.clone());
        }
        run
    }

    /// Unmarks what `run` still holds of `c..c + n` and wakes its waiters.
    fn finish(&self, run: &Rc<Run>, c: u64, n: u64) {
        let mut in_flight = self.in_flight.borrow_mut();
        for k in c..c + n {
            if in_flight.get(&k).is_some_and(|r| Rc::ptr_eq(r, run)) {
                in_flight.remove(&k);
            }
        }
        drop(in_flight);
        run.notify.notify_waiters();
    }

    async fn copy_run(
        &self,
        source: &Child,
        target: &Child,
        c: u64,
        n: u64,
    ) -> Result<u64, CopyError> {
        let run = self.start(c, n);
        let start = c * self.cluster;
        let bytes: u64 = (c..c + n).map(|k| self.bytes_of(k)).sum();
        let r = self
            .transfer(source, target, start, bytes, Some(&run))
            .await;
        let mut counted = 0;
        for k in c..c + n {
            // A write copied this one itself meanwhile, and counted it.
            if self.stolen.borrow_mut().remove(&k) {
                continue;
            }
            if r.is_ok() {
                self.dirty.set_granule(k, false);
                counted += self.cluster;
            }
        }
        self.finish(&run, c, n);
        r?;
        self.copied.set(self.copied.get() + counted);
        if self.discard_source.get() {
            // As QEMU: the source's answer does not matter, the copy is made.
            let _ = source.discard(start, bytes).await;
        }
        Ok(counted)
    }

    /// Copies cluster `c`, which a longer run has read but not yet written, for a write that
    /// must not wait for the rest of that run. The source still holds what the run read
    /// (writes to `c` wait for this copy), so both copies write the same bytes and either
    /// may land last.
    async fn copy_stolen(&self, source: &Child, target: &Child, c: u64) -> Result<u64, CopyError> {
        let mine = self.start(c, 1);
        // The run skips the cluster when it ends (and removes this mark): whatever becomes
        // of the run, this copy decides.
        self.stolen.borrow_mut().insert(c);
        let bytes = self.bytes_of(c);
        let r = self
            .transfer(source, target, c * self.cluster, bytes, None)
            .await;
        if r.is_ok() {
            self.dirty.set_granule(c, false);
            self.copied.set(self.copied.get() + self.cluster);
        }
        self.finish(&mine, c, 1);
        r.map(|()| self.cluster)
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
        run: Option<&Run>,
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
            if at + n == end {
                if let Some(run) = run {
                    run.read.set(true);
                    run.notify.notify_waiters();
                }
            }
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
        // The last, partial cluster counts whole, as in QEMU's progress.
        assert_eq!(b.dirty_bytes(), 11 * 65536);
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
