//! Refcounts and allocation: refcount blocks and the refcount table (grown and moved as
//! needed, in an order a crash leaves consistent), finding free clusters, and frees that
//! wait until no table on disk points to them.

use super::get_refcount;
use super::overlap::Metadata;
use super::set_refcount;
use super::{FreeKind, Meta, put_be64, read_at};
use crate::format::header::MAX_REFTABLE_BYTES;
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::io;

impl Meta {
    pub(super) fn refblock_offset(&mut self, b: u64) -> io::Result<Option<u64>> {
        let e = self.reftable.get(b as usize).copied().unwrap_or(0);
        let off = e & !0x1ff;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cs() != 0 {
            return Err(self.corruption(
                format!("Refblock offset {off:#x} unaligned (reftable index: {b:#x})"),
                None,
                None,
            ));
        }
        Ok(Some(off))
    }

    pub(super) async fn load_refblock(&mut self, file: &Child, off: u64) -> io::Result<()> {
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
        // QEMU raises this each time it looks up (or makes) the block a change goes to.
        file.debug_event("refblock_alloc").await;
        let per = self.refcounts_per_block();
        let b = c / per;
        let off = match self.refblock_offset(b)? {
            Some(o) => {
                // Cached or not (reading a refcount alone raises nothing).
                file.debug_event("refblock_load").await;
                o
            }
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
            // A refcount past its width: EINVAL, as QEMU reports it.
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        if let Some(t) = self.rb.get_mut(off) {
            set_refcount(t, i, order, new);
        }
        if new == 0 && c < self.free_hint {
            self.free_hint = c;
        }
        if new == 0 && self.free_byte_offset / self.cs() == c {
            // The cluster packed compressed data went to is free now: nothing goes after it.
            self.free_byte_offset = 0;
        }
        Ok(new)
    }

    /// `size` bytes for a compressed cluster, packed after the previous one as QEMU packs
    /// them (`qcow2_alloc_bytes`): in the rest of the cluster the last one ended in, running
    /// on into a new cluster when that one follows it, else at the start of a new cluster.
    /// Every host cluster the range touches holds one reference for it.
    pub(crate) async fn alloc_bytes(&mut self, file: &Child, size: u64) -> io::Result<u64> {
        file.debug_event("cluster_alloc_bytes").await;
        let cs = self.cs();
        if size == 0 || size > cs {
            return self.alloc(file, size.div_ceil(cs).max(1)).await;
        }
        let mut offset = self.free_byte_offset;
        if offset != 0 && self.refcount(file, offset / cs).await? >= self.max_refcount() {
            offset = 0;
        }
        let room = if offset == 0 { 0 } else { cs - offset % cs };
        if offset != 0 && room >= size {
            self.update_refcount(file, offset / cs, 1).await?;
        } else {
            let new = self.alloc(file, 1).await?;
            if offset != 0 && offset.next_multiple_of(cs) == new {
                // Runs on from the old cluster's tail into the new one (which alloc counted).
                self.update_refcount(file, offset / cs, 1).await?;
            } else {
                offset = new;
            }
        }
        self.free_byte_offset = if (offset + size) % cs == 0 {
            0
        } else {
            offset + size
        };
        Ok(offset)
    }

    /// A new refcount block for block index `b`, placed at the first cluster it describes
    /// (free, since nothing counts it yet) so that it counts itself.
    pub(super) async fn new_refblock(
        &mut self,
        file: &Child,
        b: u64,
        at: Option<u64>,
    ) -> io::Result<u64> {
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
        self.place_refblock(file, at, data, Some("refblock_alloc_write"))
            .await?;
        self.point_reftable(file, b, at).await?;
        Ok(at)
    }

    /// Writes a new refcount block at `at` and caches it; `event` is the debug event QEMU
    /// raises before that write, if any.
    pub(super) async fn place_refblock(
        &mut self,
        file: &Child,
        at: u64,
        data: Vec<u8>,
        event: Option<&str>,
    ) -> io::Result<()> {
        self.check_write(file, at, data.len() as u64, Metadata::REFCOUNT_BLOCK)
            .await?;
        if let Some(event) = event {
            file.debug_event(event).await;
        }
        file.write(at, data.clone(), ReqFlags::empty()).await?;
        self.make_room(file, false).await?;
        self.rb.insert(at, data, false);
        self.refblocks.insert(at);
        Ok(())
    }

    /// Points refcount table entry `b` at the block at `at`, on disk and then in memory (a
    /// failed write leaves the table as the disk has it: counts kept in a block the disk's
    /// table does not name would be lost at the next open).
    pub(super) async fn point_reftable(&mut self, file: &Child, b: u64, at: u64) -> io::Result<()> {
        let entry_at = self.h.refcount_table_offset + b * 8;
        // As for the L1 table: read past the end of the file, never written there.
        self.check_in_file(file, entry_at - entry_at % self.cs(), "Refcount table")?;
        self.check_write(file, entry_at, 8, Metadata::REFCOUNT_TABLE)
            .await?;
        file.debug_event("refblock_alloc_hookup").await;
        file.write(entry_at, at.to_be_bytes().to_vec(), ReqFlags::empty())
            .await?;
        self.reftable.set(b as usize, at);
        Ok(())
    }

    /// A new refcount block for block index `b` that counts the clusters of `run` in it.
    pub(super) fn block_counting(&self, b: u64, run: std::ops::Range<u64>) -> Vec<u8> {
        let per = self.refcounts_per_block();
        let mut data = vec![0u8; self.cs() as usize];
        for c in run.filter(|c| c / per == b) {
            set_refcount(&mut data, (c % per) as usize, self.h.refcount_order, 1);
        }
        data
    }

    /// Free space for `n` clusters followed by one refcount block for each block index the
    /// whole run touches that has none yet. Returns the start and those block indexes.
    pub(super) async fn find_run(&mut self, file: &Child, n: u64) -> io::Result<(u64, Vec<u64>)> {
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
    pub(super) async fn grow_reftable(&mut self, file: &Child, min_entries: u64) -> io::Result<()> {
        file.debug_event("reftable_grow").await;
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
        let mut table = self.reftable.to_vec();
        table.resize((table_clusters * per_cluster) as usize, 0);
        // Layout: the table, then the new refcount blocks.
        let run = start..start + table_clusters + new_blocks.len() as u64;
        // QEMU writes its new blocks here (it always makes some); ferrite may need none.
        file.debug_event("refblock_alloc_write_blocks").await;
        for (k, &b) in new_blocks.iter().enumerate() {
            let at = (start + table_clusters + k as u64) * cs;
            table[b as usize] = at;
            let data = self.block_counting(b, run.clone());
            self.place_refblock(file, at, data, None).await?;
        }
        // Counted in blocks the current table names, so a switch that fails undoes them.
        let counted: Vec<u64> = run.filter(|c| !new_blocks.contains(&(c / per))).collect();
        let mut done = 0;
        let switched = async {
            for &c in &counted {
                self.update_refcount(file, c, 1).await?;
                done += 1;
            }
            self.switch_reftable(file, start, table_clusters, table)
                .await
        }
        .await;
        if let Err(e) = switched {
            for &c in &counted[..done] {
                let _ = self.update_refcount(file, c, -1).await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Writes `table` (`table_clusters` long) at cluster `start` and makes the header
    /// point to it; memory follows once the disk has it. The old table is freed.
    async fn switch_reftable(
        &mut self,
        file: &Child,
        start: u64,
        table_clusters: u64,
        table: Vec<u64>,
    ) -> io::Result<()> {
        let cs = self.cs();
        self.write_refblocks(file).await?;
        let mut bytes = vec![0u8; (table_clusters * cs) as usize];
        for (i, e) in table.iter().enumerate() {
            put_be64(&mut bytes, i, *e);
        }
        self.check_write(
            file,
            start * cs,
            bytes.len() as u64,
            Metadata::REFCOUNT_TABLE,
        )
        .await?;
        file.debug_event("refblock_alloc_write_table").await;
        file.write(start * cs, bytes, ReqFlags::empty()).await?;
        file.flush().await?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = start * cs;
        self.h.refcount_table_clusters = table_clusters as u32;
        file.debug_event("refblock_alloc_switch_table").await;
        // On disk for good before the old table can go (its clusters may be discarded).
        if let Err(e) = self.sync_header(file).await {
            // The disk still has the old table: so does memory.
            self.h.refcount_table_offset = old_off;
            self.h.refcount_table_clusters = old_clusters as u32;
            return Err(e);
        }
        self.reftable.replace(table);
        // Switched: what fails from here on leaks the old table, and undoes nothing.
        self.free_now(file, old_off, old_clusters, FreeKind::Other)
            .await;
        Ok(())
    }

    /// First cluster index of `n` free clusters in a row.
    pub(super) async fn find_free(&mut self, file: &Child, n: u64) -> io::Result<u64> {
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
    /// QEMU's allocator, so that clusters land where QEMU puts them: the search goes on
    /// from where the last one ended (`free_hint`, moved back only by a cluster freed below
    /// it), and the run is counted block by block. A cluster of the run without a refcount
    /// block gets one at the next free cluster, what was counted is undone, and the search
    /// starts again (from the run's start if anything was counted, which the undoing frees).
    pub(crate) async fn alloc(&mut self, file: &Child, n: u64) -> io::Result<u64> {
        file.debug_event("cluster_alloc").await;
        let per = self.refcounts_per_block();
        'search: loop {
            let start = self.next_fit(file, n).await?;
            for c in start..start + n {
                let missing = self.refblock_offset(c / per)?.is_none();
                let counted = if missing {
                    Box::pin(self.make_refblock(file, c)).await
                } else {
                    self.update_refcount(file, c, 1).await.map(drop)
                };
                if missing || counted.is_err() {
                    // Undone, as QEMU undoes a part of a refcount update that failed.
                    for back in start..c {
                        let _ = self.update_refcount(file, back, -1).await;
                    }
                    counted?;
                    continue 'search;
                }
            }
            return Ok(start * self.cs());
        }
    }

    /// Allocates as [`Meta::alloc`] does, but later allocations search from where they
    /// would have before (QEMU's `qcow2_alloc_clusters_at`, for a run its caller placed):
    /// free clusters ahead of the run still come first.
    pub(crate) async fn alloc_run(&mut self, file: &Child, n: u64) -> io::Result<u64> {
        let hint = self.free_hint;
        let host = self.alloc(file, n).await?;
        self.free_hint = self.free_hint.min(hint);
        Ok(host)
    }

    /// The first of `n` free clusters in a row from `free_hint` on, which moves past them
    /// (QEMU's `alloc_clusters_noref`).
    async fn next_fit(&mut self, file: &Child, n: u64) -> io::Result<u64> {
        let mut start = self.free_hint;
        let mut found = 0;
        while found < n {
            let c = self.free_hint;
            self.free_hint += 1;
            if self.refcount(file, c).await? == 0 {
                found += 1;
            } else {
                found = 0;
                start = self.free_hint;
            }
        }
        Ok(start)
    }

    /// A refcount block for cluster `c`, at the next free cluster (QEMU's
    /// `alloc_refcount_block`): it counts itself when it lies in the range it describes,
    /// else it is counted in the block of its own range, which may first have to be made
    /// (then this one is left unused, as QEMU leaves it). Written, then hooked into the
    /// refcount table (grown first if too short).
    async fn make_refblock(&mut self, file: &Child, c: u64) -> io::Result<()> {
        file.debug_event("refblock_alloc").await;
        let per = self.refcounts_per_block();
        let cs = self.cs();
        let b = c / per;
        if b as usize >= self.reftable.len() {
            Box::pin(self.grow_reftable(file, b + 1)).await?;
            if self.refblock_offset(b)?.is_some() {
                // Growing made this block too.
                return Ok(());
            }
        }
        // What it is hooked into may depend on the L2 tables (QEMU writes them first).
        self.write_l2_tables(file).await?;
        let new = self.next_fit(file, 1).await?;
        let mut data = vec![0u8; cs as usize];
        if new / per == b {
            set_refcount(&mut data, (new % per) as usize, self.h.refcount_order, 1);
        } else if self.refblock_offset(new / per)?.is_none() {
            return Box::pin(self.make_refblock(file, new)).await;
        } else {
            self.update_refcount(file, new, 1).await?;
            self.write_refblocks(file).await?;
        }
        let counted_elsewhere = new / per != b;
        let placed = match self
            .place_refblock(file, new * cs, data, Some("refblock_alloc_write"))
            .await
        {
            Ok(()) => self.point_reftable(file, b, new * cs).await,
            Err(e) => Err(e),
        };
        if placed.is_err() {
            // Not hooked up: the cluster is free again, and no block lives there.
            self.rb.remove(new * cs);
            self.refblocks.remove(&(new * cs));
            if counted_elsewhere {
                let _ = self.update_refcount(file, new, -1).await;
            }
        }
        placed
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

    /// Replaces the refcount structure with a new one placed past everything the image
    /// uses and past the end of the file, counting what `refs` says (cluster index to
    /// references; QEMU's `rebuild_refcount_structure`, for a structure that cannot be
    /// mended in place). The old blocks and table are left as leaks; the caller writes the
    /// header that points to the new table.
    ///
    /// The new clusters lie past every reference and the end of the file, so they are
    /// written without the overlap check, whose view of the old structure is what is broken.
    pub(crate) async fn rebuild_refcount_structure(
        &mut self,
        file: &Child,
        refs: &std::collections::HashMap<u64, u64>,
    ) -> io::Result<()> {
        let cs = self.cs();
        let per = self.refcounts_per_block();
        let order = self.h.refcount_order;
        let max = if order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        let used_end = refs.keys().max().map_or(0, |c| c + 1);
        let start = used_end.max(file.len().div_ceil(cs));
        // Blocks and table sized for everything up to and including themselves.
        let (mut blocks, mut table_clusters) = (1u64, 1u64);
        loop {
            let total = start + blocks + table_clusters;
            let b = total.div_ceil(per);
            let t = (b * 8).div_ceil(cs).max(1);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let structure = start..start + blocks + table_clusters;
        // The file grows to hold them first (at open, before the node's users have taken
        // the resize permission, a write past the end would be refused).
        file.truncate(structure.end * cs).await?;
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            for i in 0..per {
                let c = b * per + i;
                let v = if structure.contains(&c) {
                    1
                } else {
                    refs.get(&c).copied().unwrap_or(0)
                };
                if v > 0 {
                    set_refcount(&mut block, i as usize, order, v.min(max));
                }
            }
            let at = (start + b) * cs;
            file.write(at, block, ReqFlags::empty()).await?;
            put_be64(&mut table, b as usize, at);
        }
        let table_at = (start + blocks) * cs;
        file.write(table_at, table.clone(), ReqFlags::empty())
            .await?;
        file.flush().await?;
        for old in std::mem::take(&mut self.refblocks) {
            self.rb.remove(old);
        }
        self.h.refcount_table_offset = table_at;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.reftable.replace(
            table
                .chunks_exact(8)
                .map(|e| u64::from_be_bytes(e.try_into().unwrap_or([0; 8])))
                .collect(),
        );
        self.refblocks = self.reftable.iter().copied().filter(|&o| o != 0).collect();
        self.free_hint = 0;
        Ok(())
    }

    /// Whether a refcount block lives at `offset`.
    pub(crate) fn is_refblock(&self, offset: u64) -> bool {
        self.refblocks.contains(&offset)
    }

    /// Drops one reference to `n` clusters at `host` at once, for clusters nothing on disk
    /// points to: handed out by [`Meta::alloc`] for something whose write failed (QEMU:
    /// `qcow2_alloc_cluster_abort`), or a table the header no longer names. A failure is
    /// said on standard error as QEMU says it, and leaves them leaked.
    pub(crate) async fn free_now(&mut self, file: &Child, host: u64, n: u64, kind: FreeKind) {
        if let Err(e) = self.drop_refs(file, host, n, kind).await {
            eprintln!("qcow2_free_clusters failed: {}", ferrite_qapi::os_msg(&e));
        }
    }

    /// Drops one reference to `n` clusters at `host`; the clusters left unused are
    /// forgotten by the L2 cache and, where `pass-discard-*` says so, discarded.
    pub(super) async fn drop_refs(
        &mut self,
        file: &Child,
        host: u64,
        n: u64,
        kind: FreeKind,
    ) -> io::Result<()> {
        file.debug_event("cluster_free").await;
        let cs = self.cs();
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
        Ok(())
    }

    /// Drops one reference to `n` clusters at `host` once the tables are written back.
    pub(crate) fn free(&mut self, host: u64, n: u64, kind: FreeKind) {
        self.pending_frees.push((host, n, kind));
    }

    /// Whether enough frees wait that a write-back is worth it.
    pub(crate) fn frees_pending(&self) -> usize {
        self.pending_frees.len()
    }
}
