//! The active L1 table and the L2 tables: looking entries up, getting a table ready to be
//! changed (allocated, or copied when a snapshot shares it), growing the L1 table.

use super::overlap::Metadata;
use super::{FreeKind, Meta, get_be64, put_be64, read_at};
use crate::format::entry::{self, OFFSET_MASK};
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::io;

impl Meta {
    /// The L2 table offset for L1 index `i`, checked; `None` when unallocated.
    pub(super) fn l2_offset(&mut self, i: usize) -> io::Result<Option<(u64, bool)>> {
        let e = self.l1.get(i).copied().unwrap_or(0);
        let off = self.checked_l2_offset(e, i)?;
        Ok((off != 0).then_some((off, e & entry::COPIED != 0)))
    }

    /// The L2 table offset of L1 entry `e` (of any L1 table, at index `i`): 0 when
    /// unallocated, corruption when not on a cluster boundary.
    pub(crate) fn checked_l2_offset(&mut self, e: u64, i: usize) -> io::Result<u64> {
        let off = e & OFFSET_MASK;
        if off % self.cs() != 0 {
            return Err(self.corruption(
                format!("L2 table offset {off:#x} unaligned (L1 index: {i:#x})"),
                None,
                None,
            ));
        }
        Ok(off)
    }

    /// Makes sure the L2 table at `off` is cached. A table past the end of the file reads as
    /// zeroes (QEMU's too); changing one in place is refused (`l2_for_write`).
    pub(super) async fn load_l2(&mut self, file: &Child, off: u64) -> io::Result<()> {
        if self.l2.get(off).is_some() {
            return Ok(());
        }
        file.debug_event("l2_load").await;
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

    /// The L2 table for guest cluster `gc`, ready to be changed: allocated if missing,
    /// copied if shared with a snapshot. Returns its offset and the entry index.
    pub(crate) async fn l2_for_write(&mut self, file: &Child, gc: u64) -> io::Result<(u64, usize)> {
        let per = self.l2_entries();
        let i = (gc / per) as usize;
        if i >= self.l1.len() {
            // Only the VM state area lies past the disk: the table grows for it, by half
            // again each time as QEMU's does, so that a VM state written in pieces does not
            // move it at each one.
            let mut entries = (self.l1.len() as u64).max(1);
            while entries <= i as u64 {
                entries = (entries * 3).div_ceil(2);
            }
            self.grow_l1(file, entries).await?;
        }
        let idx = (gc % per) as usize;
        match self.l2_offset(i)? {
            Some((off, true)) => {
                self.check_in_file(file, off, "L2 table")?;
                self.load_l2(file, off).await?;
                Ok((off, idx))
            }
            old => {
                let new = self.alloc(file, 1).await?;
                if let Err(e) = self.place_l2(file, i, old.map(|(off, _)| off), new).await {
                    // Nothing on disk points to the new table: it goes back, as in QEMU.
                    self.l2.remove(new);
                    self.free_now(file, new, 1, FreeKind::Other).await;
                    return Err(e);
                }
                if let Some((off, _)) = old {
                    self.free(off, 1, FreeKind::Other);
                }
                Ok((new, idx))
            }
        }
    }

    /// Fills the new L2 table at `new` (zeroes, or a copy of the table at `old`), writes
    /// it, and points L1 entry `i` to it: the new table's refcount first, then the table,
    /// then the L1 entry.
    async fn place_l2(
        &mut self,
        file: &Child,
        i: usize,
        old: Option<u64>,
        new: u64,
    ) -> io::Result<()> {
        self.write_refblocks(file).await?;
        let data = match old {
            Some(off) => {
                file.debug_event("l2_alloc_cow_read").await;
                self.load_l2(file, off).await?;
                self.l2.bytes(off).unwrap_or_default()
            }
            None => vec![0u8; self.cs() as usize],
        };
        file.debug_event("l2_alloc_write").await;
        // QEMU writes its whole L2 cache here, the new table with it.
        self.write_l2_tables(file).await?;
        self.check_write(file, new, data.len() as u64, Metadata::ACTIVE_L2)
            .await?;
        file.debug_event("l2_update").await;
        file.write(new, data.clone(), ReqFlags::empty()).await?;
        self.make_room(file, true).await?;
        self.l2.insert(new, data, false);
        self.set_l1(file, i, new | entry::COPIED).await
    }

    /// Sets L1 entry `i` and writes it through.
    pub(crate) async fn set_l1(&mut self, file: &Child, i: usize, v: u64) -> io::Result<()> {
        let at = self.h.l1_table_offset + i as u64 * 8;
        // A damaged header may place the table anywhere: it is read as zeroes there, but
        // not written there (QEMU would grow the file to it).
        self.check_in_file(file, at - at % self.cs(), "L1 table")?;
        self.check_write(file, at, 8, Metadata::ACTIVE_L1).await?;
        file.debug_event("l1_update").await;
        file.write(at, v.to_be_bytes().to_vec(), ReqFlags::empty())
            .await?;
        // Only once on disk: a table the disk's L1 does not name would lose what is
        // mapped in it at the next open.
        self.l1.set(i, v);
        Ok(())
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

    /// Replaces the L1 table with one of `entries` entries (bigger), in new clusters.
    pub(crate) async fn grow_l1(&mut self, file: &Child, entries: u64) -> io::Result<()> {
        if entries * 8 > crate::format::header::MAX_L1_BYTES {
            return Err(io::Error::from_raw_os_error(libc::EFBIG));
        }
        let cs = self.cs();
        let clusters = (entries * 8).div_ceil(cs);
        file.debug_event("l1_grow_alloc_table").await;
        let new = self.alloc(file, clusters).await?;
        if let Err(e) = self.switch_l1(file, new, entries).await {
            // Nothing on disk points to the new table: it goes back, as in QEMU.
            self.free_now(file, new, clusters, FreeKind::Other).await;
            return Err(e);
        }
        Ok(())
    }

    /// Writes the L1 table, grown to `entries`, at `new` and makes the header point to it;
    /// memory follows once the disk has it.
    async fn switch_l1(&mut self, file: &Child, new: u64, entries: u64) -> io::Result<()> {
        let cs = self.cs();
        let mut l1 = self.l1.to_vec();
        l1.resize(entries as usize, 0);
        // The table's own bytes, not its clusters' (a new image's file ends with them, as
        // QEMU's does).
        let mut bytes = vec![0u8; entries as usize * 8];
        for (i, e) in l1.iter().enumerate() {
            put_be64(&mut bytes, i, *e);
        }
        self.write_refblocks(file).await?;
        self.check_write(file, new, bytes.len() as u64, Metadata::ACTIVE_L1)
            .await?;
        file.debug_event("l1_grow_write_table").await;
        file.write(new, bytes, ReqFlags::empty()).await?;
        file.flush().await?;
        let old_off = self.h.l1_table_offset;
        let old_size = self.h.l1_size;
        let old_clusters = (u64::from(old_size) * 8).div_ceil(cs);
        self.h.l1_table_offset = new;
        self.h.l1_size = entries as u32;
        file.debug_event("l1_grow_activate_table").await;
        if let Err(e) = self.sync_header(file).await {
            self.h.l1_table_offset = old_off;
            self.h.l1_size = old_size;
            return Err(e);
        }
        self.l1.replace(l1);
        if old_clusters > 0 && old_off != 0 {
            // The header names the new table on disk already: the old one goes now.
            self.free_now(file, old_off, old_clusters, FreeKind::Other)
                .await;
        }
        Ok(())
    }
}
