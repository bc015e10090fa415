//! Checks that keep damage from spreading: tables read from past the end of the file,
//! data clusters that are unaligned or outside it, and data writes that would land on
//! metadata (QEMU's overlap check).

use super::Meta;
use crate::format::entry::OFFSET_MASK;
use ferrite_block::Child;
use std::io;

impl Meta {
    /// A table read from disk must lie in the file: an offset past its end is damage, and
    /// writing the table back there would grow the file without bound.
    pub(super) fn check_in_file(&mut self, file: &Child, off: u64, what: &str) -> io::Result<()> {
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
        if self.h.incompatible & crate::format::header::incompat::DATA_FILE == 0
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
}
