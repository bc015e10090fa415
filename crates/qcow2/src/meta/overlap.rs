//! Checks that keep damage from spreading: tables read from past the end of the file,
//! data clusters that are unaligned or outside it, and QEMU's overlap check: no write, of
//! data or of metadata, may land on metadata of another kind (`overlap-check`). A write that
//! would is refused and the image marked corrupt, so a damaged refcount that hands out a
//! cluster twice cannot turn into guest data over the header.

use super::Meta;
use crate::format::entry::OFFSET_MASK;
use crate::format::get_be64;
use crate::format::header::{EXT_BITMAPS, autoclear};
use ferrite_block::Child;
use std::io;

/// Kinds of qcow2 metadata, as QEMU's `overlap-check` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Metadata(u16);

impl Metadata {
    pub(crate) const NONE: Metadata = Metadata(0);
    pub(crate) const HEADER: Metadata = Metadata(1);
    pub(crate) const ACTIVE_L1: Metadata = Metadata(1 << 1);
    pub(crate) const ACTIVE_L2: Metadata = Metadata(1 << 2);
    pub(crate) const REFCOUNT_TABLE: Metadata = Metadata(1 << 3);
    pub(crate) const REFCOUNT_BLOCK: Metadata = Metadata(1 << 4);
    pub(crate) const SNAPSHOT_TABLE: Metadata = Metadata(1 << 5);
    pub(crate) const INACTIVE_L1: Metadata = Metadata(1 << 6);
    pub(crate) const INACTIVE_L2: Metadata = Metadata(1 << 7);
    pub(crate) const BITMAP_DIRECTORY: Metadata = Metadata(1 << 8);

    /// What `overlap-check=constant` checks: structures found from the header alone.
    const CONSTANT: Metadata = Metadata(
        Self::HEADER.0
            | Self::ACTIVE_L1.0
            | Self::REFCOUNT_TABLE.0
            | Self::SNAPSHOT_TABLE.0
            | Self::INACTIVE_L1.0,
    );
    /// `cached` (the default): also what the tables in memory point to.
    pub(crate) const CACHED: Metadata = Metadata(
        Self::CONSTANT.0 | Self::ACTIVE_L2.0 | Self::REFCOUNT_BLOCK.0 | Self::BITMAP_DIRECTORY.0,
    );
    /// `all`: also the snapshots' L2 tables (read from disk for every write).
    const ALL: Metadata = Metadata(Self::CACHED.0 | Self::INACTIVE_L2.0);

    /// The `overlap-check` option's per-kind member names, with their kind.
    pub(crate) const MEMBERS: [(&'static str, Metadata); 9] = [
        ("main-header", Self::HEADER),
        ("active-l1", Self::ACTIVE_L1),
        ("active-l2", Self::ACTIVE_L2),
        ("refcount-table", Self::REFCOUNT_TABLE),
        ("refcount-block", Self::REFCOUNT_BLOCK),
        ("snapshot-table", Self::SNAPSHOT_TABLE),
        ("inactive-l1", Self::INACTIVE_L1),
        ("inactive-l2", Self::INACTIVE_L2),
        ("bitmap-directory", Self::BITMAP_DIRECTORY),
    ];

    /// A template by its `overlap-check` name.
    pub(crate) fn template(name: &str) -> Option<Metadata> {
        match name {
            "none" => Some(Self::NONE),
            "constant" => Some(Self::CONSTANT),
            "cached" => Some(Self::CACHED),
            "all" => Some(Self::ALL),
            _ => None,
        }
    }

    pub(crate) fn contains(self, other: Metadata) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub(crate) fn with(self, other: Metadata, on: bool) -> Metadata {
        if on {
            Metadata(self.0 | other.0)
        } else {
            Metadata(self.0 & !other.0)
        }
    }

    /// How QEMU's corruption message names the kind.
    fn name(self) -> &'static str {
        match self {
            Self::HEADER => "qcow2_header",
            Self::ACTIVE_L1 => "active L1 table",
            Self::ACTIVE_L2 => "active L2 table",
            Self::REFCOUNT_TABLE => "refcount table",
            Self::REFCOUNT_BLOCK => "refcount block",
            Self::SNAPSHOT_TABLE => "snapshot table",
            Self::INACTIVE_L1 => "inactive L1 table",
            Self::INACTIVE_L2 => "inactive L2 table",
            _ => "bitmap directory",
        }
    }
}

impl Meta {
    /// A table read from disk must lie in the file: an offset past its end is damage, and
    /// writing the table back there would grow the file without bound.
    pub(crate) fn check_in_file(&mut self, file: &Child, off: u64, what: &str) -> io::Result<()> {
        if off.saturating_add(self.cs()) > file.len().next_multiple_of(self.cs()) {
            return Err(self.corruption(
                format!("{what} offset {off:#x} past the end of the image file"),
                Some(off),
                Some(self.cs()),
            ));
        }
        Ok(())
    }

    /// A data cluster's offset, from entry `index` of the L2 table at `l2`, must be on a
    /// cluster boundary.
    pub(crate) fn check_cluster_aligned(
        &mut self,
        host: u64,
        l2: u64,
        index: u64,
    ) -> io::Result<()> {
        if host % self.cs() != 0 {
            return Err(self.corruption(
                format!(
                    "Cluster allocation offset {host:#x} unaligned (L2 offset: {l2:#x}, L2 index: {index:#x})"
                ),
                None,
                None,
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
        let per = self.l2_entries();
        let l2 = self.l1.get((gc / per) as usize).copied().unwrap_or(0) & OFFSET_MASK;
        self.check_cluster_aligned(host, l2, gc % per)?;
        // Data in an external data file is checked by that file. A file that cannot grow
        // (a raw window, a device) refuses the write itself, as under QEMU (ENOSPC); one
        // that can would grow without bound for a damaged entry, which ferrite calls
        // corruption where QEMU writes.
        if self.h.incompatible & crate::format::header::incompat::DATA_FILE == 0
            && file.node().driver().can_grow()
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

    /// QEMU's overlap check for a write of `len` bytes at host `offset` of metadata of kind
    /// `own` (`NONE` for guest data): refuses it, and marks the image corrupt, if it would
    /// land on metadata of another kind that `overlap-check` watches.
    pub(crate) async fn check_write(
        &mut self,
        file: &Child,
        offset: u64,
        len: u64,
        own: Metadata,
    ) -> io::Result<()> {
        let hit = match self.overlap(offset, len, own) {
            Some(hit) => Some(hit),
            None if self.overlap_check.contains(Metadata::INACTIVE_L2)
                && own != Metadata::INACTIVE_L2 =>
            {
                self.overlaps_inactive_l2(file, offset, len).await?
            }
            None => None,
        };
        match hit {
            Some(what) => Err(self.corruption(
                format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    what.name()
                ),
                Some(offset),
                Some(len),
            )),
            None => Ok(()),
        }
    }

    /// The overlap check for a write of guest data at host `offset`.
    pub(crate) async fn check_data(
        &mut self,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.check_write(file, offset, len, Metadata::NONE).await
    }

    /// The first watched kind of metadata (in QEMU's order) that `offset..offset + len`
    /// touches, leaving out `own` and the snapshots' L2 tables.
    fn overlap(&self, offset: u64, len: u64, own: Metadata) -> Option<Metadata> {
        let chk = self.overlap_check.with(own, false);
        if len == 0 {
            return None;
        }
        if chk.contains(Metadata::HEADER) && offset < self.cs() {
            return Some(Metadata::HEADER);
        }
        let cs = self.cs();
        // Whole clusters, as QEMU compares them.
        let start = offset & !(cs - 1);
        let end = (offset + len).next_multiple_of(cs);
        let hits = |at: u64, bytes: u64| bytes > 0 && start < at.saturating_add(bytes) && at < end;
        if chk.contains(Metadata::ACTIVE_L1)
            && hits(self.h.l1_table_offset, u64::from(self.h.l1_size) * 8)
        {
            return Some(Metadata::ACTIVE_L1);
        }
        if chk.contains(Metadata::REFCOUNT_TABLE)
            && hits(
                self.h.refcount_table_offset,
                u64::from(self.h.refcount_table_clusters) * cs,
            )
        {
            return Some(Metadata::REFCOUNT_TABLE);
        }
        if chk.contains(Metadata::SNAPSHOT_TABLE)
            && self.h.nb_snapshots > 0
            && hits(self.h.snapshots_offset, self.snapshots_size.max(1))
        {
            return Some(Metadata::SNAPSHOT_TABLE);
        }
        if chk.contains(Metadata::INACTIVE_L1)
            && self
                .snapshot_l1s
                .iter()
                .any(|&(at, entries)| hits(at, u64::from(entries) * 8))
        {
            return Some(Metadata::INACTIVE_L1);
        }
        if chk.contains(Metadata::ACTIVE_L2) && self.l1.points_into(start, end, cs) {
            return Some(Metadata::ACTIVE_L2);
        }
        if chk.contains(Metadata::REFCOUNT_BLOCK) && self.reftable.points_into(start, end, cs) {
            return Some(Metadata::REFCOUNT_BLOCK);
        }
        if chk.contains(Metadata::BITMAP_DIRECTORY) && self.h.autoclear & autoclear::BITMAPS != 0 {
            if let Some(ext) = self.h.extension(EXT_BITMAPS).filter(|x| x.len() >= 24) {
                if hits(get_be64(ext, 2), get_be64(ext, 1)) {
                    return Some(Metadata::BITMAP_DIRECTORY);
                }
            }
        }
        None
    }

    /// Whether the range touches an L2 table of a snapshot (their L1 tables read from disk,
    /// as QEMU does for `overlap-check=all`).
    async fn overlaps_inactive_l2(
        &self,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<Option<Metadata>> {
        let cs = self.cs();
        let start = offset & !(cs - 1);
        let end = (offset + len).next_multiple_of(cs);
        for &(at, entries) in &self.snapshot_l1s {
            let bytes = u64::from(entries) * 8;
            if bytes > crate::format::header::MAX_L1_BYTES {
                return Err(io::Error::from_raw_os_error(libc::EFBIG));
            }
            let l1 = crate::format::read_at(file, at, bytes as usize).await?;
            for k in 0..entries as usize {
                let l2 = get_be64(&l1, k) & OFFSET_MASK;
                if l2 != 0 && start < l2 + cs && l2 < end {
                    return Ok(Some(Metadata::INACTIVE_L2));
                }
            }
        }
        Ok(None)
    }
}
