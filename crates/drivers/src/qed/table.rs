//! QED's two levels of tables (QEMU: block/qed-table.c, qed-cluster.c, qed-l2-cache.c):
//! the L1 table, always in memory, points to L2 tables, which point to data clusters or
//! say a cluster reads as zeroes. A table is `table_size` clusters of little-endian
//! 64-bit entries; 0 is "not here" (the backing file's), 1 a zero cluster. L2 tables are
//! cached, a few dozen at most.

use super::header::Header;
use ferrite_block::Child;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

/// An L2 entry for a cluster that reads as zeroes.
pub(super) const ZERO_CLUSTER: u64 = 1;
/// L2 tables kept in memory.
const CACHED_TABLES: usize = 64;
/// Entries per sector: tables are written a sector at a time.
const PER_SECTOR: usize = 512 / 8;

/// The sizes the header fixes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) cluster: u64,
    /// Clusters per table.
    pub(super) table_size: u64,
    /// Entries per table.
    pub(super) entries: usize,
    l2_shift: u32,
    l1_shift: u32,
    /// Bytes of header clusters: no data or table lies below.
    pub(super) header_bytes: u64,
}

impl Geometry {
    /// The geometry of a header whose cluster and table sizes were checked.
    pub(super) fn new(h: &Header) -> Geometry {
        let cluster = u64::from(h.cluster_size);
        let entries = (cluster * u64::from(h.table_size) / 8) as usize;
        let l2_shift = cluster.trailing_zeros();
        Geometry {
            cluster,
            table_size: u64::from(h.table_size),
            entries,
            l2_shift,
            l1_shift: l2_shift + entries.trailing_zeros(),
            header_bytes: u64::from(h.header_size) * cluster,
        }
    }

    pub(super) fn table_bytes(&self) -> u64 {
        self.cluster * self.table_size
    }

    pub(super) fn l1_index(&self, pos: u64) -> usize {
        (pos >> self.l1_shift) as usize
    }

    pub(super) fn l2_index(&self, pos: u64) -> usize {
        ((pos >> self.l2_shift) as usize) & (self.entries - 1)
    }

    pub(super) fn in_cluster(&self, pos: u64) -> u64 {
        pos & (self.cluster - 1)
    }

    /// Bytes from `pos` to the end of the stretch its L2 table covers.
    pub(super) fn left_in_l2(&self, pos: u64) -> u64 {
        (((pos >> self.l1_shift) + 1) << self.l1_shift) - pos
    }

    /// A data cluster's place: aligned, past the header, inside the file.
    pub(super) fn cluster_valid(&self, offset: u64, file_size: u64) -> bool {
        self.in_cluster(offset) == 0 && offset >= self.header_bytes && offset < file_size
    }

    /// A table's place: each of its clusters valid. (QEMU also refuses every table of one
    /// cluster, by an overflow check that takes its last cluster's offset, its first,
    /// for a wrap: so it cannot open images of `table_size=1`. ferrite can.)
    pub(super) fn table_valid(&self, offset: u64, file_size: u64) -> bool {
        match offset.checked_add((self.table_size - 1) * self.cluster) {
            Some(last) => {
                self.cluster_valid(offset, file_size) && self.cluster_valid(last, file_size)
            }
            None => false,
        }
    }
}

/// What a stretch of the disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    /// In the file, the byte asked for at this offset, the rest after it.
    Found(u64),
    /// Zero clusters.
    Zero,
    /// No cluster in this image (its L2 table exists).
    NoCluster,
    /// No L2 table for this stretch.
    NoTable,
}

/// An L2 table in memory, shared by the cache and the requests using it.
pub(super) type L2 = Rc<RefCell<Vec<u64>>>;

/// The L1 table and the cached L2 tables.
pub(super) struct Tables {
    pub(super) geometry: Geometry,
    pub(super) l1: RefCell<Vec<u64>>,
    l1_offset: u64,
    cache: RefCell<HashMap<u64, (L2, u64)>>,
    /// Uses of the cache, to find the least recent.
    tick: Cell<u64>,
    /// Changes to tables in memory: a table read from the file while one changed may be
    /// stale, and is read again.
    changes: Cell<u64>,
}

fn decode(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
        .collect()
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Tables {
    /// Reads the L1 table the header places.
    ///
    /// # Errors
    /// The file's.
    pub(super) async fn read(file: &Child, h: &Header) -> io::Result<Tables> {
        let geometry = Geometry::new(h);
        let bytes = file
            .read(h.l1_table_offset, geometry.table_bytes() as usize)
            .await?;
        Ok(Tables {
            geometry,
            l1: RefCell::new(decode(&bytes)),
            l1_offset: h.l1_table_offset,
            cache: RefCell::new(HashMap::new()),
            tick: Cell::new(0),
            changes: Cell::new(0),
        })
    }

    /// The L2 table at `offset`, from the cache or the file.
    ///
    /// # Errors
    /// The file's.
    pub(super) async fn l2(&self, file: &Child, offset: u64) -> io::Result<L2> {
        loop {
            if let Some(t) = self.cached(offset) {
                return Ok(t);
            }
            let changes = self.changes.get();
            file.debug_event("l2_load").await;
            let bytes = file
                .read(offset, self.geometry.table_bytes() as usize)
                .await?;
            if let Some(t) = self.cached(offset) {
                return Ok(t);
            }
            if changes == self.changes.get() {
                let t = Rc::new(RefCell::new(decode(&bytes)));
                self.insert(offset, t.clone());
                return Ok(t);
            }
        }
    }

    fn cached(&self, offset: u64) -> Option<L2> {
        let tick = self.tick.get() + 1;
        self.tick.set(tick);
        let mut cache = self.cache.borrow_mut();
        let (t, used) = cache.get_mut(&offset)?;
        *used = tick;
        Some(t.clone())
    }

    /// Keeps table `t` (at `offset`), dropping the least recently used one no request
    /// holds when the cache is full.
    pub(super) fn insert(&self, offset: u64, t: L2) {
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHED_TABLES {
            let victim = cache
                .iter()
                .filter(|(_, (t, _))| Rc::strong_count(t) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                cache.remove(&k);
            }
        }
        cache.insert(offset, (t, self.tick.get()));
    }

    /// Notes that a table in memory is about to change.
    pub(super) fn changing(&self) {
        self.changes.set(self.changes.get() + 1);
    }

    /// Forgets every cached L2 table.
    pub(super) fn clear_cache(&self) {
        self.cache.borrow_mut().clear();
    }

    /// What `pos..pos + len` starts with: the run of clusters of one kind from `pos`, in
    /// one L2 table, and its length in bytes (QEMU's `qed_find_cluster`), with the table
    /// when there is one.
    ///
    /// # Errors
    /// EINVAL for a table or cluster placed outside the file; the file's.
    pub(super) async fn find(
        &self,
        file: &Child,
        file_size: u64,
        pos: u64,
        len: u64,
    ) -> io::Result<(Run, u64, Option<L2>)> {
        let g = self.geometry;
        let len = len.min(g.left_in_l2(pos));
        let l2_offset = *self.l1.borrow().get(g.l1_index(pos)).ok_or_else(einval)?;
        if l2_offset == 0 {
            return Ok((Run::NoTable, len, None));
        }
        if !g.table_valid(l2_offset, file_size) {
            return Err(einval());
        }
        let table = self.l2(file, l2_offset).await?;
        let (run, clusters) = {
            let t = table.borrow();
            let first = g.l2_index(pos);
            let want = (g.in_cluster(pos) + len).div_ceil(g.cluster) as usize;
            let end = (first + want).min(g.entries);
            let head = t[first];
            let same = |i: usize| match head {
                0 | ZERO_CLUSTER => t[i] == head,
                _ => t[i] == head + (i - first) as u64 * g.cluster,
            };
            let n = (first + 1..end).take_while(|&i| same(i)).count() + 1;
            let run = match head {
                0 => Run::NoCluster,
                ZERO_CLUSTER => Run::Zero,
                at if g.cluster_valid(at, file_size) => Run::Found(at + g.in_cluster(pos)),
                _ => return Err(einval()),
            };
            (run, n as u64)
        };
        let len = len.min(clusters * g.cluster - g.in_cluster(pos));
        Ok((run, len, Some(table)))
    }

    /// Writes entries `first..first + n` of `table` at `offset` (whole sectors of them).
    ///
    /// # Errors
    /// The file's.
    pub(super) async fn write(
        file: &Child,
        offset: u64,
        table: &[u64],
        first: usize,
        n: usize,
    ) -> io::Result<()> {
        let start = first / PER_SECTOR * PER_SECTOR;
        let end = (first + n).div_ceil(PER_SECTOR) * PER_SECTOR;
        let end = end.min(table.len());
        let mut bytes = ferrite_block::io::pool::take((end - start) * 8);
        for (dst, v) in bytes.chunks_exact_mut(8).zip(&table[start..end]) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        file.write(
            offset + start as u64 * 8,
            bytes,
            ferrite_block::ReqFlags::empty(),
        )
        .await
    }

    /// Writes L1 entries `first..first + n`.
    ///
    /// # Errors
    /// The file's.
    pub(super) async fn write_l1(&self, file: &Child, first: usize, n: usize) -> io::Result<()> {
        let l1 = self.l1.borrow().clone();
        Self::write(file, self.l1_offset, &l1, first, n).await
    }
}
