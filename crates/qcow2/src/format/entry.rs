//! L1 and L2 table entries: their bits and what kind of cluster an L2 entry describes.

/// Host offset bits of an L1 or standard L2 entry.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one: the cluster may be written in place.
pub(crate) const COPIED: u64 = 1 << 63;
/// The L2 entry describes a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeroes (v3, standard L2 entries).
pub(crate) const ZERO: u64 = 1;

/// Subcluster bitmap: all 32 subclusters allocated.
pub(crate) const SUB_ALL_ALLOC: u64 = 0xffff_ffff;
/// Subcluster bitmap: all 32 subclusters read as zeroes.
pub(crate) const SUB_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// What an L2 entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Nothing here: reads come from the backing file (or are zeroes).
    Unallocated,
    /// Reads as zeroes; `host` is preallocated space, if any.
    Zero { host: Option<u64> },
    /// Data at `host`; `copied` says it may be written in place.
    Normal { host: u64, copied: bool },
    /// Compressed data: `offset` bytes into the file, `len` bytes long.
    Compressed { offset: u64, len: u64 },
}

/// Decodes an entry's first word; `cluster_bits` for the compressed layout, `extended` for
/// whether bit 0 is the zero flag (standard entries only).
pub(crate) fn decode(entry: u64, cluster_bits: u32, extended: bool) -> Cluster {
    if entry & COMPRESSED != 0 {
        let (offset, len) = compressed_range(entry, cluster_bits);
        return Cluster::Compressed { offset, len };
    }
    let host = entry & OFFSET_MASK;
    if !extended && entry & ZERO != 0 {
        return Cluster::Zero {
            host: (host != 0).then_some(host),
        };
    }
    if host == 0 {
        return Cluster::Unallocated;
    }
    Cluster::Normal {
        host,
        copied: entry & COPIED != 0,
    }
}

/// [`decode`] for an image whose data clusters live in an external data file: there each
/// guest cluster maps to its own offset, so offset 0 is a real cluster (guest cluster 0),
/// told from an unallocated entry by COPIED (every data-file cluster has refcount 1).
pub(crate) fn decode_external(entry: u64, cluster_bits: u32, extended: bool) -> Cluster {
    match decode(entry, cluster_bits, extended) {
        Cluster::Unallocated if entry & COPIED != 0 => Cluster::Normal {
            host: 0,
            copied: true,
        },
        c => c,
    }
}

/// Bits that address the byte offset of a compressed cluster.
pub(crate) fn compressed_offset_bits(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// The file range a compressed entry occupies.
pub(crate) fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = compressed_offset_bits(cluster_bits);
    let offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    let len = sectors * 512 - (offset & 511);
    (offset, len)
}

/// The entry for compressed data of `len` bytes at file offset `offset`.
pub(crate) fn compressed_entry(offset: u64, len: u64, cluster_bits: u32) -> u64 {
    let x = compressed_offset_bits(cluster_bits);
    let sectors = (offset + len - 1) / 512 - offset / 512;
    COMPRESSED | (sectors << x) | offset
}

/// Host clusters a compressed entry touches (each holds one reference for it).
pub(crate) fn compressed_clusters(offset: u64, len: u64, cluster_size: u64) -> (u64, u64) {
    let first = offset & !(cluster_size - 1);
    let last = (offset + len - 1) & !(cluster_size - 1);
    (first, (last - first) / cluster_size + 1)
}

/// Per-subcluster state in an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    /// Not allocated: the backing file shows through.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Allocated in the cluster.
    Data,
}

/// The state of subcluster `i` from an extended entry's bitmap word.
pub(crate) fn sub_state(bitmap: u64, i: u32) -> Sub {
    if bitmap & (1 << (32 + i)) != 0 {
        Sub::Zero
    } else if bitmap & (1 << i) != 0 {
        Sub::Data
    } else {
        Sub::Unallocated
    }
}

/// The bitmap word with subclusters `[from, to)` set to `state`.
pub(crate) fn sub_set(bitmap: u64, from: u32, to: u32, state: Sub) -> u64 {
    let mask = if to - from >= 32 {
        0xffff_ffff
    } else {
        ((1u64 << (to - from)) - 1) << from
    };
    let cleared = bitmap & !(mask | (mask << 32));
    match state {
        Sub::Unallocated => cleared,
        Sub::Zero => cleared | (mask << 32),
        Sub::Data => cleared | mask,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_entries_round_trip() {
        for bits in 9..=21 {
            for (off, len) in [
                (0x12345u64, 100u64),
                (0x10000, 512),
                (0x1ff, 2),
                (0x20000, 1 << bits),
            ] {
                let e = compressed_entry(off, len, bits);
                let (o, l) = compressed_range(e, bits);
                assert_eq!(o, off);
                assert!(l >= len && l < len + 512, "{bits} {off:#x} {len} -> {l}");
            }
        }
    }

    #[test]
    fn subcluster_bits() {
        let b = sub_set(0, 0, 32, Sub::Data);
        assert_eq!(b, SUB_ALL_ALLOC);
        let b = sub_set(b, 4, 8, Sub::Zero);
        assert_eq!(sub_state(b, 3), Sub::Data);
        assert_eq!(sub_state(b, 4), Sub::Zero);
        assert_eq!(sub_state(b, 7), Sub::Zero);
        assert_eq!(sub_state(b, 8), Sub::Data);
        assert_eq!(
            sub_state(sub_set(b, 5, 6, Sub::Unallocated), 5),
            Sub::Unallocated
        );
    }
}
