//! The metadata of an open image: the header, the active L1 table, cached L2 tables and
//! refcount blocks, and the refcount table; cluster allocation and freeing; write-back in
//! an order that a crash at any point leaves at most leaked clusters.
//!
//! Ordering rules (QEMU keeps the same ones with its cache dependencies):
//! - a cluster's refcount reaches the disk before any table that points to it;
//! - a table stops pointing to a cluster on disk before its refcount drops, which is why
//!   frees wait in `pending_frees` until the next write-back of the L2 tables.

use super::cache::TableCache;
use super::entry::{self, OFFSET_MASK};
use super::header::{Header, MAX_REFTABLE_BYTES};
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::collections::HashSet;
use std::io;

/// Why metadata could not be used: the image is corrupt (QEMU marks it so and stops writes).
#[derive(Debug, Clone)]
pub(crate) struct Corruption {
    pub(crate) msg: String,
    pub(crate) offset: Option<u64>,
    pub(crate) size: Option<u64>,
}

/// Kinds of freed space, for the `pass-discard-*` options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FreeKind {
    /// A discard request from a user.
    Request,
    /// Anything else (overwritten COW sources, replaced metadata).
    Other,
}

/// The open image's metadata.
pub(crate) struct Meta {
    pub(crate) h: Header,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2: TableCache,
    rb: TableCache,
    pub(crate) reftable: Vec<u64>,
    refblocks: HashSet<u64>,
    /// First cluster index that may be free.
    free_hint: u64,
    /// References to drop once the tables no longer pointing there are on disk.
    pending_frees: Vec<(u64, u64, FreeKind)>,
    /// Corruption found; the image takes no more writes.
    pub(crate) corrupt: Option<Corruption>,
    pub(crate) pass_discard_request: bool,
    pub(crate) pass_discard_other: bool,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Reads `len` bytes at `offset` of `file`, past its end as zeroes.
pub(crate) async fn read_at(file: &Child, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let flen = file.len();
    if offset + len as u64 <= flen {
        return file.read(offset, len).await;
    }
    let mut v = vec![0u8; len];
    if offset < flen {
        let got = file.read(offset, (flen - offset) as usize).await?;
        v[..got.len()].copy_from_slice(&got);
    }
    Ok(v)
}

pub(crate) fn get_be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

pub(crate) fn put_be64(b: &mut [u8], i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads refcount `i` of a block with `order` (bits = 1 << order).
pub(crate) fn get_refcount(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            u64::from((b[bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(b[i]),
        4 => u64::from(u16::from_be_bytes([b[2 * i], b[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            b[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]),
        )),
        _ => get_be64(b, i),
    }
}

/// Writes refcount `i` (the value fits the width).
pub(crate) fn set_refcount(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            b[bit / 8] = (b[bit / 8] & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        3 => b[i] = v as u8,
        4 => b[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        5 => b[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => put_be64(b, i, v),
    }
}

/// Writes a cache's dirty tables back; whether there were any.
async fn write_dirty(cache: &mut TableCache, file: &Child) -> io::Result<bool> {
    let dirty = cache.dirty();
    for off in &dirty {
        if let Some(bytes) = cache.bytes(*off) {
            file.write(*off, bytes, ReqFlags::empty()).await?;
        }
        cache.mark_clean(*off);
    }
    Ok(!dirty.is_empty())
}

impl Meta {
    /// Loads the L1 and refcount tables of an image whose header was parsed.
    pub(crate) async fn load(
        file: &Child,
        h: Header,
        l2_cache_tables: usize,
        rb_cache_tables: usize,
    ) -> io::Result<Meta> {
        let l1_bytes = read_at(file, h.l1_table_offset, h.l1_size as usize * 8).await?;
        let l1 = (0..h.l1_size as usize)
            .map(|i| get_be64(&l1_bytes, i))
            .collect();
        let rt_len = (u64::from(h.refcount_table_clusters) << h.cluster_bits) as usize;
        let rt_bytes = read_at(file, h.refcount_table_offset, rt_len).await?;
        let reftable: Vec<u64> = (0..rt_len / 8).map(|i| get_be64(&rt_bytes, i)).collect();
        let refblocks = reftable
            .iter()
            .map(|e| e & !0x1ff)
            .filter(|&o| o != 0)
            .collect();
        Ok(Meta {
            h,
            l1,
            l2: TableCache::new(l2_cache_tables),
            rb: TableCache::new(rb_cache_tables),
            reftable,
            refblocks,
            free_hint: 0,
            pending_frees: Vec::new(),
            corrupt: None,
            pass_discard_request: false,
            pass_discard_other: false,
        })
    }

    pub(crate) fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    /// L2 entries per table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cs() / self.h.l2_entry_size()
    }

    fn refcounts_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.h.refcount_order
    }

    fn max_refcount(&self) -> u64 {
        if self.h.refcount_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }

    /// Records corruption (the first one wins) and returns the error for the request.
    pub(crate) fn corruption(
        &mut self,
        msg: String,
        offset: Option<u64>,
        size: Option<u64>,
    ) -> io::Error {
        tracing::warn!(%msg, "qcow2 image corrupted");
        if self.corrupt.is_none() {
            self.corrupt = Some(Corruption { msg, offset, size });
        }
        eio()
    }

    // ----- L2 tables -----

    /// Makes room in a cache of tables, writing a dirty victim back (L2 tables only after
    /// the refcount blocks they depend on).
    async fn make_room(&mut self, file: &Child, l2: bool) -> io::Result<()> {
        let cache = if l2 { &self.l2 } else { &self.rb };
        if !cache.is_full() {
            return Ok(());
        }
        let Some((victim, dirty)) = cache.victim() else {
            return Ok(());
        };
        if dirty {
            if l2 {
                self.write_refblocks(file).await?;
            }
            let cache = if l2 { &mut self.l2 } else { &mut self.rb };
            if let Some(bytes) = cache.bytes(victim) {
                file.write(victim, bytes, ReqFlags::empty()).await?;
            }
        }
        let cache = if l2 { &mut self.l2 } else { &mut self.rb };
        cache.remove(victim);
        Ok(())
    }

    /// The L2 table offset for L1 index `i`, checked; `None` when unallocated.
    fn l2_offset(&mut self, i: usize) -> io::Result<Option<(u64, bool)>> {
        let e = self.l1.get(i).copied().unwrap_or(0);
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cs() != 0 {
            return Err(self.corruption(
                format!("L2 table offset {off:#x} unaligned (L1 index: {i:#x})"),
                Some(off),
                None,
            ));
        }
        Ok(Some((off, e & entry::COPIED != 0)))
    }

    /// Makes sure the L2 table at `off` is cached.
    async fn load_l2(&mut self, file: &Child, off: u64) -> io::Result<()> {
        if self.l2.get(off).is_some() {
            return Ok(());
        }
        self.check_in_file(file, off, "L2 table")?;
        let data = read_at(file, off, self.cs() as usize).await?;
        self.make_room(file, true).await?;
        self.l2.insert(off, data, false);
        Ok(())
    }

    /// The L2 entry (first word, and the subcluster bitmap with extended L2) of guest
    /// cluster `gc`.
    pub(crate) async fn l2_entry(&mut self, file: &Child, gc: u64) -> io::Result<(u64, u64)> {
        let per = self.l2_entries();
        let Some((off, _)) = self.l2_offset((gc / per) as usize)? else {
            return Ok((0, 0));
        };
        self.load_l2(file, off).await?;
        let idx = (gc % per) as usize;
        let t = self.l2.get(off).unwrap_or(&[]);
        if self.h.extended_l2() {
            Ok((get_be64(t, 2 * idx), get_be64(t, 2 * idx + 1)))
        } else {
            Ok((get_be64(t, idx), 0))
        }
    }

    /// A table read from disk must lie in the file: an offset past its end is damage, and
    /// writing the table back there would grow the file without bound.
    fn check_in_file(&mut self, file: &Child, off: u64, what: &str) -> io::Result<()> {
        if off.saturating_add(self.cs()) > file.len().next_multiple_of(self.cs()) {
            return Err(self.corruption(
                format!("{what} offset {off:#x} past the end of the image file"),
                Some(off),
                Some(self.cs()),
            ));
        }
        Ok(())
    }

    /// Checks a data cluster offset from an L2 entry (alignment, within the file).
    pub(crate) fn check_data_cluster(
        &mut self,
        file: &Child,
        gc: u64,
        host: u64,
    ) -> io::Result<()> {
        if host % self.cs() != 0 {
            let per = self.l2_entries();
            let l2 = self.l1.get((gc / per) as usize).copied().unwrap_or(0) & OFFSET_MASK;
            return Err(self.corruption(
                format!(
                    "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2:#x}, L2 index: {:#x})",
                    gc % per
                ),
                None,
                None,
            ));
        }
        // Data in an external data file is checked by that file.
        if self.h.incompatible & super::header::incompat::DATA_FILE == 0
            && host >= file.len().next_multiple_of(self.cs())
        {
            return Err(self.corruption(
                format!("Data cluster offset {host:#x} past the end of the image file"),
                Some(host),
                Some(self.cs()),
            ));
        }
        Ok(())
    }

    /// QEMU's overlap check for a write of `len` bytes at host `offset` that is meant to be
    /// data: refuses (and marks the image corrupt) if it would land on metadata.
    pub(crate) fn check_overlap(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let cs = self.cs();
        let end = offset + len;
        let hits = |start: u64, bytes: u64| bytes > 0 && offset < start + bytes && start < end;
        let what = if hits(0, cs) {
            Some("qcow2_header")
        } else if hits(self.h.l1_table_offset, u64::from(self.h.l1_size) * 8) {
            Some("active L1 table")
        } else if hits(
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
        ) {
            Some("refcount table")
        } else if self.h.nb_snapshots > 0 && hits(self.h.snapshots_offset, cs) {
            Some("snapshot table")
        } else {
            let mut c = offset & !(cs - 1);
            let mut found = None;
            while c < end {
                if self.refblocks.contains(&c) {
                    found = Some("refcount block");
                    break;
                }
                if self.l2.get(c).is_some() {
                    found = Some("active L2 table");
                    break;
                }
                c += cs;
            }
            found
        };
        match what {
            Some(w) => Err(self.corruption(
                format!("Preventing invalid write on metadata (overlaps with {w})"),
                Some(offset),
                Some(len),
            )),
            None => Ok(()),
        }
    }

    /// The L2 table for guest cluster `gc`, ready to be changed: allocated if missing,
    /// copied if shared with a snapshot. Returns its offset and the entry index.
    pub(crate) async fn l2_for_write(&mut self, file: &Child, gc: u64) -> io::Result<(u64, usize)> {
        let per = self.l2_entries();
        let i = (gc / per) as usize;
        if i >= self.l1.len() {
            return Err(eio());
        }
        let idx = (gc % per) as usize;
        match self.l2_offset(i)? {
            Some((off, true)) => {
                self.load_l2(file, off).await?;
                Ok((off, idx))
            }
            old => {
                let data = match old {
                    Some((off, _)) => {
                        self.load_l2(file, off).await?;
                        self.l2.bytes(off).unwrap_or_default()
                    }
                    None => vec![0u8; self.cs() as usize],
                };
                let new = self.alloc(file, 1).await?;
                // The new table's refcount first, then the table, then the L1 entry.
                self.write_refblocks(file).await?;
                file.write(new, data.clone(), ReqFlags::empty()).await?;
                self.make_room(file, true).await?;
                self.l2.insert(new, data, false);
                self.set_l1(file, i, new | entry::COPIED).await?;
                if let Some((off, _)) = old {
                    self.free(off, 1, FreeKind::Other);
                }
                Ok((new, idx))
            }
        }
    }

    /// Sets L1 entry `i` and writes it through.
    pub(crate) async fn set_l1(&mut self, file: &Child, i: usize, v: u64) -> io::Result<()> {
        self.l1[i] = v;
        let at = self.h.l1_table_offset + i as u64 * 8;
        file.write(at, v.to_be_bytes().to_vec(), ReqFlags::empty())
            .await
    }

    /// Sets an L2 entry of a table returned by [`Meta::l2_for_write`].
    pub(crate) fn set_l2(&mut self, table: u64, idx: usize, e: u64, bitmap: u64) {
        let ext = self.h.extended_l2();
        if let Some(t) = self.l2.get_mut(table) {
            if ext {
                put_be64(t, 2 * idx, e);
                put_be64(t, 2 * idx + 1, bitmap);
            } else {
                put_be64(t, idx, e);
            }
        }
    }

    // ----- refcounts -----

    fn refblock_offset(&mut self, b: u64) -> io::Result<Option<u64>> {
        let e = self.reftable.get(b as usize).copied().unwrap_or(0);
        let off = e & !0x1ff;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cs() != 0 {
            return Err(self.corruption(
                format!("Refblock offset {off:#x} unaligned (reftable index: {b:#x})"),
                Some(off),
                None,
            ));
        }
        Ok(Some(off))
    }

    async fn load_refblock(&mut self, file: &Child, off: u64) -> io::Result<()> {
        if self.rb.get(off).is_some() {
            return Ok(());
        }
        self.check_in_file(file, off, "Refcount block")?;
        let data = read_at(file, off, self.cs() as usize).await?;
        self.make_room(file, false).await?;
        self.rb.insert(off, data, false);
        Ok(())
    }

    /// The refcount of host cluster index `c`.
    pub(crate) async fn refcount(&mut self, file: &Child, c: u64) -> io::Result<u64> {
        let per = self.refcounts_per_block();
        let Some(off) = self.refblock_offset(c / per)? else {
            return Ok(0);
        };
        self.load_refblock(file, off).await?;
        let order = self.h.refcount_order;
        Ok(get_refcount(
            self.rb.get(off).unwrap_or(&[]),
            (c % per) as usize,
            order,
        ))
    }

    /// Adds `delta` to the refcount of host cluster index `c`.
    pub(crate) async fn update_refcount(
        &mut self,
        file: &Child,
        c: u64,
        delta: i64,
    ) -> io::Result<u64> {
        let per = self.refcounts_per_block();
        let b = c / per;
        let off = match self.refblock_offset(b)? {
            Some(o) => o,
            None if delta > 0 => self.new_refblock(file, b, None).await?,
            None => {
                return Err(self.corruption(
                    format!("Cannot decrease refcount of cluster {c:#x} below 0"),
                    Some(c * self.cs()),
                    None,
                ));
            }
        };
        self.load_refblock(file, off).await?;
        let order = self.h.refcount_order;
        let max = self.max_refcount();
        let i = (c % per) as usize;
        let old = get_refcount(self.rb.get(off).unwrap_or(&[]), i, order);
        let new = if delta >= 0 {
            old.checked_add(delta as u64).filter(|&v| v <= max)
        } else {
            old.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            if delta < 0 {
                return Err(self.corruption(
                    format!("Cannot decrease refcount of cluster {c:#x} below 0"),
                    Some(c * self.cs()),
                    None,
                ));
            }
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        };
        if let Some(t) = self.rb.get_mut(off) {
            set_refcount(t, i, order, new);
        }
        if new == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        Ok(new)
    }

    /// A new refcount block for block index `b`, placed at the first cluster it describes
    /// (free, since nothing counts it yet) so that it counts itself.
    async fn new_refblock(&mut self, file: &Child, b: u64, at: Option<u64>) -> io::Result<u64> {
        let per = self.refcounts_per_block();
        let cs = self.cs();
        let at = at.unwrap_or(b * per * cs);
        let mut data = vec![0u8; cs as usize];
        set_refcount(
            &mut data,
            (at / cs - b * per) as usize,
            self.h.refcount_order,
            1,
        );
        if b as usize >= self.reftable.len() {
            Box::pin(self.grow_reftable(file, b + 1)).await?;
            // Growing may itself have created this block.
            if let Some(off) = self.refblock_offset(b)? {
                return Ok(off);
            }
        }
        self.place_refblock(file, at, data).await?;
        self.point_reftable(file, b, at).await?;
        Ok(at)
    }

    /// Writes a new refcount block at `at` and caches it.
    async fn place_refblock(&mut self, file: &Child, at: u64, data: Vec<u8>) -> io::Result<()> {
        file.write(at, data.clone(), ReqFlags::empty()).await?;
        self.make_room(file, false).await?;
        self.rb.insert(at, data, false);
        self.refblocks.insert(at);
        Ok(())
    }

    /// Points refcount table entry `b` at the block at `at`, on disk too.
    async fn point_reftable(&mut self, file: &Child, b: u64, at: u64) -> io::Result<()> {
        self.reftable[b as usize] = at;
        let entry_at = self.h.refcount_table_offset + b * 8;
        file.write(entry_at, at.to_be_bytes().to_vec(), ReqFlags::empty())
            .await
    }

    /// A new refcount block for block index `b` that counts the clusters of `run` in it.
    fn block_counting(&self, b: u64, run: std::ops::Range<u64>) -> Vec<u8> {
        let per = self.refcounts_per_block();
        let mut data = vec![0u8; self.cs() as usize];
        for c in run.filter(|c| c / per == b) {
            set_refcount(&mut data, (c % per) as usize, self.h.refcount_order, 1);
        }
        data
    }

    /// Free space for `n` clusters followed by one refcount block for each block index the
    /// whole run touches that has none yet. Returns the start and those block indexes.
    async fn find_run(&mut self, file: &Child, n: u64) -> io::Result<(u64, Vec<u64>)> {
        let per = self.refcounts_per_block();
        let mut extra = 0u64;
        loop {
            let total = n + extra;
            let start = self.find_free(file, total).await?;
            let missing: Vec<u64> = (start / per..=(start + total - 1) / per)
                .filter(|&b| self.reftable.get(b as usize).copied().unwrap_or(0) == 0)
                .collect();
            if missing.len() as u64 == extra {
                return Ok((start, missing));
            }
            extra = missing.len() as u64;
        }
    }

    /// Replaces the refcount table with a bigger one of at least `min_entries`, placed past
    /// everything in use together with the refcount blocks that count it.
    async fn grow_reftable(&mut self, file: &Child, min_entries: u64) -> io::Result<()> {
        let entries = min_entries.max(self.reftable.len() as u64 * 3 / 2);
        self.relocate_reftable(file, entries).await
    }

    /// Writes the refcount table anew, with at least `entries` entries, past everything in
    /// use, together with the refcount blocks that count it; the old table is freed.
    pub(crate) async fn relocate_reftable(&mut self, file: &Child, entries: u64) -> io::Result<()> {
        let cs = self.cs();
        let per_cluster = cs / 8;
        let per = self.refcounts_per_block();
        let mut entries = entries.max(self.reftable.len() as u64);
        let (start, table_clusters, new_blocks) = loop {
            let table_clusters = entries.div_ceil(per_cluster);
            let (start, missing) = self.find_run(file, table_clusters).await?;
            let need = missing.iter().max().map_or(0, |&b| b + 1);
            if need <= table_clusters * per_cluster {
                break (start, table_clusters, missing);
            }
            entries = need.max(entries + per_cluster);
        };
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let mut table = self.reftable.clone();
        table.resize((table_clusters * per_cluster) as usize, 0);
        // Layout: the table, then the new refcount blocks.
        let run = start..start + table_clusters + new_blocks.len() as u64;
        for (k, &b) in new_blocks.iter().enumerate() {
            let at = (start + table_clusters + k as u64) * cs;
            table[b as usize] = at;
            let data = self.block_counting(b, run.clone());
            self.place_refblock(file, at, data).await?;
        }
        for c in run.filter(|c| !new_blocks.contains(&(c / per))) {
            self.update_refcount(file, c, 1).await?;
        }
        self.write_refblocks(file).await?;
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            put_be64(&mut bytes, i, *e);
        }
        file.write(start * cs, bytes, ReqFlags::empty()).await?;
        file.flush().await?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.reftable = table;
        self.write_header(file).await?;
        for c in 0..old_clusters {
            self.update_refcount(file, old_off / cs + c, -1).await?;
        }
        Ok(())
    }

    /// First cluster index of `n` free clusters in a row.
    async fn find_free(&mut self, file: &Child, n: u64) -> io::Result<u64> {
        let per = self.refcounts_per_block();
        let mut start = self.free_hint;
        let mut c = start;
        while c < start + n {
            let b = c / per;
            if self.refblock_offset(b)?.is_none() {
                // A whole block's worth of free clusters.
                c = (b + 1) * per;
                continue;
            }
            if self.refcount(file, c).await? == 0 {
                c += 1;
            } else {
                c += 1;
                start = c;
            }
        }
        if n == 1 || start == self.free_hint {
            // Everything before `start` is in use.
            self.free_hint = start;
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1 each); returns the host offset.
    ///
    /// Ranges without a refcount block get one right after the run, filled in before the
    /// refcount table points to it, so the run stays contiguous whatever the cluster size.
    pub(crate) async fn alloc(&mut self, file: &Child, n: u64) -> io::Result<u64> {
        let per = self.refcounts_per_block();
        let cs = self.cs();
        loop {
            let (start, missing) = self.find_run(file, n).await?;
            if let Some(&top) = missing.last()
                && top as usize >= self.reftable.len()
            {
                Box::pin(self.grow_reftable(file, top + 1)).await?;
                continue;
            }
            let total = n + missing.len() as u64;
            // Every new block is on disk, complete, before the table points to any of them.
            for (k, &b) in missing.iter().enumerate() {
                let data = self.block_counting(b, start..start + total);
                self.place_refblock(file, (start + n + k as u64) * cs, data)
                    .await?;
            }
            for (k, &b) in missing.iter().enumerate() {
                self.point_reftable(file, b, (start + n + k as u64) * cs)
                    .await?;
            }
            for c in start..start + total {
                if !missing.contains(&(c / per)) {
                    self.update_refcount(file, c, 1).await?;
                }
            }
            if self.free_hint == start {
                self.free_hint = start + total;
            }
            return Ok(start * cs);
        }
    }

    /// Sets the refcount of cluster `c` to `want` (repair). A missing refcount block goes to
    /// a cluster of its range that nothing references (`refs`).
    pub(crate) async fn set_refcount_value(
        &mut self,
        file: &Child,
        c: u64,
        want: u64,
        refs: &std::collections::HashMap<u64, u64>,
    ) -> io::Result<()> {
        let per = self.refcounts_per_block();
        let b = c / per;
        if self.refblock_offset(b)?.is_none() {
            let spot = (b * per..(b + 1) * per)
                .find(|k| *k != c && !refs.contains_key(k))
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
            self.new_refblock(file, b, Some(spot * self.cs())).await?;
        }
        let have = self.refcount(file, c).await?;
        self.update_refcount(file, c, want as i64 - have as i64)
            .await?;
        Ok(())
    }

    /// Whether a refcount block lives at `offset`.
    pub(crate) fn is_refblock(&self, offset: u64) -> bool {
        self.refblocks.contains(&offset)
    }

    /// Drops one reference to `n` clusters at `host` once the tables are written back.
    pub(crate) fn free(&mut self, host: u64, n: u64, kind: FreeKind) {
        self.pending_frees.push((host, n, kind));
    }

    /// Whether enough frees wait that a write-back is worth it.
    pub(crate) fn frees_pending(&self) -> usize {
        self.pending_frees.len()
    }

    // ----- write-back -----

    async fn write_refblocks(&mut self, file: &Child) -> io::Result<bool> {
        write_dirty(&mut self.rb, file).await
    }

    async fn write_l2_tables(&mut self, file: &Child) -> io::Result<bool> {
        write_dirty(&mut self.l2, file).await
    }

    /// Writes every dirty table back in a safe order and applies the waiting frees; `sync`
    /// makes it durable.
    pub(crate) async fn write_back(&mut self, file: &Child, sync: bool) -> io::Result<()> {
        let rb_written = self.write_refblocks(file).await?;
        if rb_written && sync && !self.l2.dirty().is_empty() {
            file.flush().await?;
        }
        let l2_written = self.write_l2_tables(file).await?;
        if !self.pending_frees.is_empty() {
            if l2_written {
                file.flush().await?;
            }
            let frees = std::mem::take(&mut self.pending_frees);
            let cs = self.cs();
            for (host, n, kind) in frees {
                let mut punch = Vec::new();
                for c in host / cs..host / cs + n {
                    if self.update_refcount(file, c, -1).await? == 0 {
                        self.l2.remove(c * cs);
                        punch.push(c);
                    }
                }
                let pass = match kind {
                    FreeKind::Request => self.pass_discard_request,
                    FreeKind::Other => self.pass_discard_other,
                };
                if pass {
                    for c in punch {
                        let _ = file.discard(c * cs, cs).await;
                    }
                }
            }
            self.write_refblocks(file).await?;
        }
        if sync {
            file.flush().await?;
        }
        Ok(())
    }

    /// Rewrites cluster 0 from the header.
    pub(crate) async fn write_header(&mut self, file: &Child) -> io::Result<()> {
        let bytes = self
            .h
            .serialize()
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        file.write(0, bytes, ReqFlags::empty()).await
    }

    /// Drops clean cached tables unused since the last cleaning (`cache-clean-interval`).
    pub(crate) fn drop_unused_tables(&mut self) {
        self.l2.drop_unused();
        self.rb.drop_unused();
    }

    /// Replaces the L1 table with one of `entries` entries (bigger), in new clusters.
    pub(crate) async fn grow_l1(&mut self, file: &Child, entries: u64) -> io::Result<()> {
        if entries * 8 > super::header::MAX_L1_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let cs = self.cs();
        let clusters = (entries * 8).div_ceil(cs);
        let new = self.alloc(file, clusters).await?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        for (i, e) in l1.iter().enumerate() {
            put_be64(&mut bytes, i, *e);
        }
        self.write_refblocks(file).await?;
        file.write(new, bytes, ReqFlags::empty()).await?;
        file.flush().await?;
        let old_off = self.h.l1_table_offset;
        let old_clusters = (u64::from(self.h.l1_size) * 8).div_ceil(cs);
        self.h.l1_table_offset = new;
        self.h.l1_size = entries as u32;
        self.l1 = l1;
        self.write_header(file).await?;
        if old_clusters > 0 && old_off != 0 {
            self.free(old_off, old_clusters, FreeKind::Other);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut b = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_refcount(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} i {i}"
                );
            }
        }
        // Sub-byte widths put entry 0 in the least significant bits.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b1101);
    }
}
