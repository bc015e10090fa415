//! The QED header (QEMU: `QEDHeader` in block/qed.h): 64 little-endian bytes at the start
//! of the file, the backing file's name after them in the header clusters, and the checks
//! QEMU makes of its sizes.

/// "QED\0" read as a little-endian number.
pub(super) const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
/// Bytes of the header structure.
pub(super) const HEADER_LEN: usize = 64;

/// The image has a backing file.
pub(super) const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly: its tables must be checked before use.
pub(super) const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw: its format is not probed.
pub(super) const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// The feature bits QEMU (and ferrite) know.
pub(super) const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;

pub(super) const MIN_CLUSTER_SIZE: u32 = 4 * 1024;
pub(super) const MAX_CLUSTER_SIZE: u32 = 64 * 1024 * 1024;
pub(super) const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
pub(super) const MIN_TABLE_SIZE: u32 = 1;
pub(super) const MAX_TABLE_SIZE: u32 = 16;
pub(super) const DEFAULT_TABLE_SIZE: u32 = 4;

const SECTOR: u64 = 512;

/// The header's fields, in the order the file has them (after the magic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Header {
    /// Bytes per cluster, a power of two.
    pub(super) cluster_size: u32,
    /// Clusters per L1 or L2 table, a power of two.
    pub(super) table_size: u32,
    /// Clusters the header takes.
    pub(super) header_size: u32,
    pub(super) features: u64,
    pub(super) compat_features: u64,
    pub(super) autoclear_features: u64,
    pub(super) l1_table_offset: u64,
    /// The disk's size in bytes.
    pub(super) image_size: u64,
    /// Where the backing file's name starts, from the start of the file.
    pub(super) backing_filename_offset: u32,
    pub(super) backing_filename_size: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// The magic and the header in the first [`HEADER_LEN`] bytes of `b` (zeroes past a
    /// shorter file's end).
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> (u32, Header) {
        let h = Header {
            cluster_size: le32(b, 4),
            table_size: le32(b, 8),
            header_size: le32(b, 12),
            features: le64(b, 16),
            compat_features: le64(b, 24),
            autoclear_features: le64(b, 32),
            l1_table_offset: le64(b, 40),
            image_size: le64(b, 48),
            backing_filename_offset: le32(b, 56),
            backing_filename_size: le32(b, 60),
        };
        (le32(b, 0), h)
    }

    /// The header as the file holds it, magic first.
    pub(super) fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.features.to_le_bytes());
        b[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        b[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        b[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        b[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        b
    }

    pub(super) fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }
}

/// A power of two from 4 KiB to 64 MiB.
pub(super) fn cluster_size_valid(size: u64) -> bool {
    (u64::from(MIN_CLUSTER_SIZE)..=u64::from(MAX_CLUSTER_SIZE)).contains(&size)
        && size.is_power_of_two()
}

/// A power of two from 1 to 16 clusters.
pub(super) fn table_size_valid(size: u64) -> bool {
    (u64::from(MIN_TABLE_SIZE)..=u64::from(MAX_TABLE_SIZE)).contains(&size)
        && size.is_power_of_two()
}

/// The largest disk two levels of tables reach. QEMU computes it in 64 bits, where the
/// largest geometries wrap (to 0 for 64 MiB clusters in 16-cluster tables); kept so that
/// the same sizes are refused.
pub(super) fn max_image_size(cluster_size: u32, table_size: u32) -> u64 {
    let entries = u64::from(table_size.wrapping_mul(cluster_size)) / 8;
    let l2_size = entries.wrapping_mul(u64::from(cluster_size));
    l2_size.wrapping_mul(entries)
}

/// A whole number of sectors the tables can reach.
pub(super) fn image_size_valid(size: u64, cluster_size: u32, table_size: u32) -> bool {
    size % SECTOR == 0 && size <= max_image_size(cluster_size, table_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_round_trips() {
        let h = Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: F_BACKING_FILE,
            l1_table_offset: 65536,
            image_size: 1 << 30,
            backing_filename_offset: 64,
            backing_filename_size: 5,
            ..Header::default()
        };
        assert_eq!(Header::parse(&h.to_bytes()), (MAGIC, h));
    }

    #[test]
    fn sizes_are_checked_as_qemu_checks_them() {
        assert!(cluster_size_valid(4096) && cluster_size_valid(64 << 20));
        assert!(!cluster_size_valid(2048) && !cluster_size_valid(3 << 12));
        assert!(table_size_valid(1) && table_size_valid(16) && !table_size_valid(3));
        // 64 KiB clusters, 4-cluster tables: 32768 entries of 64 KiB each, squared.
        assert_eq!(max_image_size(65536, 4), 32768 * 32768 * 65536);
        assert_eq!(max_image_size(64 << 20, 16), 0);
        assert!(!image_size_valid(100, 65536, 4));
    }
}
