//! The metadata of an open image: the header, the active L1 table, cached L2 tables and
//! refcount blocks, and the refcount table; cluster allocation and freeing; write-back in
//! an order that a crash at any point leaves at most leaked clusters.
//!
//! Ordering rules (QEMU keeps the same ones with its cache dependencies):
//! - a cluster's refcount reaches the disk before any table that points to it;
//! - a table stops pointing to a cluster on disk before its refcount drops, which is why
//!   frees wait in `pending_frees` until the next write-back of the L2 tables.

mod l2;
pub(crate) mod overlap;
mod pointers;
mod refcount;
mod writeback;

use crate::cache::TableCache;
use crate::format::header::Header;
pub(crate) use crate::format::{get_be64, put_be64, read_at};
use ferrite_block::Child;
use std::collections::HashSet;
use std::io;

/// Why metadata could not be used: the image is corrupt (QEMU marks it so and stops writes).
#[derive(Debug, Clone)]
pub(crate) struct Corruption {
    pub(crate) msg: String,
    pub(crate) offset: Option<u64>,
    pub(crate) size: Option<u64>,
}

/// `msg` with each `0x0` number written as C's `%#x` writes zero: `0`.
fn c_hex_zeroes(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find("0x0") {
        let before = rest[..at].chars().last();
        let after = rest[at + 3..].chars().next();
        let alone = !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_hexdigit());
        out.push_str(&rest[..at]);
        out.push_str(if alone { "0" } else { "0x0" });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    out
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
    pub(crate) l1: pointers::PointerTable,
    pub(crate) l2: TableCache,
    rb: TableCache,
    pub(crate) reftable: pointers::PointerTable,
    refblocks: HashSet<u64>,
    /// Where the next search for free clusters starts (QEMU's `free_cluster_index`): past
    /// the last allocation, moved back only by a cluster freed below it.
    free_hint: u64,
    /// Where the next compressed cluster may go in the cluster the last one ended in (0:
    /// none), so that compressed clusters are packed as QEMU packs them.
    free_byte_offset: u64,
    /// References to drop once the tables no longer pointing there are on disk.
    pending_frees: Vec<(u64, u64, FreeKind)>,
    /// Corruption found; the image takes no more writes.
    pub(crate) corrupt: Option<Corruption>,
    pub(crate) pass_discard_request: bool,
    pub(crate) pass_discard_other: bool,
    /// The metadata writes must not land on (`overlap-check`).
    pub(crate) overlap_check: overlap::Metadata,
    /// The internal snapshots' L1 tables (offset, entries) and the snapshot table's size in
    /// bytes, for the overlap check.
    pub(crate) snapshot_l1s: Vec<(u64, u32)>,
    pub(crate) snapshots_size: u64,
    /// The image's bitmap directory as queries show it: name, granularity, flags.
    pub(crate) bitmap_info: Vec<(String, u64, u32)>,
}

pub(crate) fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
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
        file.debug_event("reftable_load").await;
        let rt_bytes = read_at(file, h.refcount_table_offset, rt_len).await?;
        let reftable: Vec<u64> = (0..rt_len / 8).map(|i| get_be64(&rt_bytes, i)).collect();
        let refblocks = reftable
            .iter()
            .map(|e| e & !0x1ff)
            .filter(|&o| o != 0)
            .collect();
        Ok(Meta {
            h,
            l1: pointers::PointerTable::new(l1),
            l2: TableCache::new(l2_cache_tables),
            rb: TableCache::new(rb_cache_tables),
            reftable: pointers::PointerTable::new(reftable),
            refblocks,
            free_hint: 0,
            free_byte_offset: 0,
            pending_frees: Vec::new(),
            corrupt: None,
            pass_discard_request: false,
            pass_discard_other: false,
            overlap_check: overlap::Metadata::CACHED,
            snapshot_l1s: Vec::new(),
            snapshots_size: 0,
            bitmap_info: Vec::new(),
        })
    }

    pub(crate) fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    /// L2 entries per table.
    pub(crate) fn l2_entries(&self) -> u64 {
        self.cs() / self.h.l2_entry_size()
    }

    pub(crate) fn refcounts_per_block(&self) -> u64 {
        (self.cs() * 8) >> self.h.refcount_order
    }

    pub(crate) fn max_refcount(&self) -> u64 {
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
        // QEMU prints its numbers with C's `%#x`, which writes zero as "0", not "0x0".
        let msg = c_hex_zeroes(&msg);
        if self.corrupt.is_none() {
            self.corrupt = Some(Corruption { msg, offset, size });
        }
        eio()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_reads_as_c_writes_it() {
        assert_eq!(
            c_hex_zeroes("L2 table offset 0x2a2a2a00 unaligned (L1 index: 0x0)"),
            "L2 table offset 0x2a2a2a00 unaligned (L1 index: 0)"
        );
        assert_eq!(c_hex_zeroes("0x0, 0x0a, 0x10"), "0, 0x0a, 0x10");
    }

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
