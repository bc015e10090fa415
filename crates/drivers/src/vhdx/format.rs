//! The on-disk structures of a VHDX image (Microsoft's VHDX specification, v1.00): the
//! two headers, the region table, the metadata table and its items, and the BAT's layout.
//! Every field is little-endian; GUIDs are kept as their 16 bytes on disk.

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;

/// `vhdxfile`, the file's first eight bytes.
pub(super) const SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Where each 64 KiB structure of the header section starts.
pub(super) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
pub(super) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// The header section's end: the log and everything after it start at 1 MiB or later.
pub(super) const HEADER_SECTION_END: u64 = MIB;
/// A header's checksum covers this much of its 64 KiB block.
pub(super) const HEADER_CHECKED: usize = 4096;
/// The bytes of a header that hold its fields (the rest of its 4 KiB is reserved).
pub(super) const HEADER_LEN: usize = 80;
const HEADER_MAGIC: &[u8; 4] = b"head";
const REGION_MAGIC: &[u8; 4] = b"regi";
pub(super) const REGION_TABLE_LEN: usize = 64 * KIB as usize;
const METADATA_MAGIC: &[u8; 8] = b"metadata";
/// The metadata table: a 32-byte header and at most 2047 entries of 32 bytes.
pub(super) const METADATA_TABLE_LEN: usize = 32 * 2048;

pub(super) const BLOCK_SIZE_MIN: u64 = MIB;
pub(super) const BLOCK_SIZE_MAX: u64 = 256 * MIB;
pub(super) const MAX_IMAGE_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// Sectors one sector bitmap block covers (its 1 MiB of bits).
const MAX_SECTORS_PER_BLOCK: u64 = 1 << 23;
pub(super) const SECTOR: u64 = 512;

/// BAT entry states (the low three bits).
pub(super) mod state {
    pub(in crate::vhdx) const NOT_PRESENT: u64 = 0;
    pub(in crate::vhdx) const UNDEFINED: u64 = 1;
    pub(in crate::vhdx) const ZERO: u64 = 2;
    pub(in crate::vhdx) const UNMAPPED: u64 = 3;
    /// `UNMAPPED` as the draft specification (0.95) numbered it.
    pub(in crate::vhdx) const UNMAPPED_V095: u64 = 5;
    pub(in crate::vhdx) const FULLY_PRESENT: u64 = 6;
    pub(in crate::vhdx) const MASK: u64 = 7;
}
/// The file offset bits of a BAT entry (a multiple of 1 MiB).
pub(super) const BAT_OFFSET_MASK: u64 = 0xFFFF_FFFF_FFF0_0000;

/// A GUID's 16 bytes as stored: `data1` (le32), `data2`, `data3` (le16), `data4`.
pub(super) type Guid = [u8; 16];

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

pub(super) const BAT_GUID: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub(super) const METADATA_GUID: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub(super) const FILE_PARAMETERS_GUID: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub(super) const VIRTUAL_SIZE_GUID: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub(super) const PAGE83_GUID: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub(super) const PHYSICAL_SECTOR_GUID: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub(super) const PARENT_LOCATOR_GUID: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
pub(super) const LOGICAL_SECTOR_GUID: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);

/// A metadata or region entry the reader must understand to open the file.
pub(super) const REQUIRED: u32 = 1;
pub(super) const META_IS_VIRTUAL_DISK: u32 = 2;
pub(super) const META_IS_REQUIRED: u32 = 4;
/// File parameters: a fixed image (blocks never given back).
pub(super) const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters: a differencing image.
pub(super) const HAS_PARENT: u32 = 2;

pub(super) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(super) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn le64(b: &[u8], at: usize) -> u64 {
    (u64::from(le32(b, at + 4)) << 32) | u64::from(le32(b, at))
}

pub(super) fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

pub(super) fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// CRC-32C (Castagnoli), as VHDX checksums its structures.
#[cfg(test)]
fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// The running (not inverted) CRC-32C state after `data`.
fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// `buf`'s CRC-32C with its checksum field (four bytes at `field`) taken as zero.
pub(super) fn checksum(buf: &[u8], field: usize) -> u32 {
    let c = crc32c_update(!0, &buf[..field]);
    let c = crc32c_update(c, &[0; 4]);
    !crc32c_update(c, &buf[field + 4..])
}

/// Whether the checksum stored at `field` (little-endian) is `buf`'s.
pub(super) fn checksum_ok(buf: &[u8], field: usize) -> bool {
    le32(buf, field) == checksum(buf, field)
}

/// Stores `buf`'s checksum at `field`.
pub(super) fn seal(buf: &mut [u8], field: usize) {
    let c = checksum(buf, field);
    put(buf, field, &c.to_le_bytes());
}

/// One of the two headers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) magic: [u8; 4],
    pub(super) checksum: u32,
    pub(super) sequence: u64,
    pub(super) file_write_guid: Guid,
    pub(super) data_write_guid: Guid,
    pub(super) log_guid: Guid,
    pub(super) log_version: u16,
    pub(super) version: u16,
    pub(super) log_length: u32,
    pub(super) log_offset: u64,
}

impl Header {
    pub(super) fn parse(b: &[u8]) -> Header {
        let mut magic = [0; 4];
        magic.copy_from_slice(&b[..4]);
        Header {
            magic,
            checksum: le32(b, 4),
            sequence: le64(b, 8),
            file_write_guid: guid_at(b, 16),
            data_write_guid: guid_at(b, 32),
            log_guid: guid_at(b, 48),
            log_version: le16(b, 64),
            version: le16(b, 66),
            log_length: le32(b, 68),
            log_offset: le64(b, 72),
        }
    }

    /// A header of a valid block: its checksum right, its signature and version 1.
    pub(super) fn is_valid(b: &[u8]) -> bool {
        let h = Header::parse(b);
        checksum_ok(&b[..HEADER_CHECKED], 4) && &h.magic == HEADER_MAGIC && h.version == 1
    }

    pub(super) fn new(sequence: u64, log_length: u32) -> Header {
        Header {
            magic: *HEADER_MAGIC,
            sequence,
            version: 1,
            log_length,
            log_offset: HEADER_SECTION_END,
            ..Header::default()
        }
    }

    /// The header written over the first [`HEADER_LEN`] bytes of `block` (its 4 KiB as
    /// they are), with the checksum of the whole.
    pub(super) fn store(&self, block: &mut [u8]) {
        put(block, 0, &self.magic);
        put(block, 8, &self.sequence.to_le_bytes());
        put(block, 16, &self.file_write_guid);
        put(block, 32, &self.data_write_guid);
        put(block, 48, &self.log_guid);
        put(block, 64, &self.log_version.to_le_bytes());
        put(block, 66, &self.version.to_le_bytes());
        put(block, 68, &self.log_length.to_le_bytes());
        put(block, 72, &self.log_offset.to_le_bytes());
        seal(&mut block[..HEADER_CHECKED], 4);
    }
}

/// A region table entry: a region the file holds.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Region {
    pub(super) guid: Guid,
    pub(super) offset: u64,
    pub(super) length: u32,
    pub(super) flags: u32,
}

/// The region table: its entries, if its checksum, signature and count are right.
pub(super) fn parse_region_table(b: &[u8]) -> Option<Vec<Region>> {
    if !checksum_ok(b, 4) || &b[..4] != REGION_MAGIC {
        return None;
    }
    let count = le32(b, 8) as usize;
    if count > 2047 {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let at = 16 + 32 * i;
                Region {
                    guid: guid_at(b, at),
                    offset: le64(b, at + 16),
                    length: le32(b, at + 24),
                    flags: le32(b, at + 28),
                }
            })
            .collect(),
    )
}

/// A region table holding `regions`, checksummed.
pub(super) fn region_table(regions: &[Region]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_LEN];
    put(&mut b, 0, REGION_MAGIC);
    put(&mut b, 8, &(regions.len() as u32).to_le_bytes());
    for (i, r) in regions.iter().enumerate() {
        let at = 16 + 32 * i;
        put(&mut b, at, &r.guid);
        put(&mut b, at + 16, &r.offset.to_le_bytes());
        put(&mut b, at + 24, &r.length.to_le_bytes());
        put(&mut b, at + 28, &r.flags.to_le_bytes());
    }
    seal(&mut b, 4);
    b
}

/// A metadata table entry: where an item is, relative to the metadata region.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct MetaEntry {
    pub(super) guid: Guid,
    pub(super) offset: u32,
    pub(super) length: u32,
    pub(super) flags: u32,
}

/// The metadata table's entries, if its signature and count are right.
pub(super) fn parse_metadata_table(b: &[u8]) -> Option<Vec<MetaEntry>> {
    if &b[..8] != METADATA_MAGIC {
        return None;
    }
    let count = le16(b, 10) as usize;
    if count * 32 > METADATA_TABLE_LEN - 32 {
        return None;
    }
    Some(
        (0..count)
            .map(|i| {
                let at = 32 + 32 * i;
                MetaEntry {
                    guid: guid_at(b, at),
                    offset: le32(b, at + 16),
                    length: le32(b, at + 20),
                    flags: le32(b, at + 24),
                }
            })
            .collect(),
    )
}

/// A metadata table of `entries` (the first 64 KiB of the metadata region).
pub(super) fn metadata_table(entries: &[MetaEntry]) -> Vec<u8> {
    let mut b = vec![0u8; 64 * KIB as usize];
    put(&mut b, 0, METADATA_MAGIC);
    put(&mut b, 10, &(entries.len() as u16).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = 32 + 32 * i;
        put(&mut b, at, &e.guid);
        put(&mut b, at + 16, &e.offset.to_le_bytes());
        put(&mut b, at + 20, &e.length.to_le_bytes());
        put(&mut b, at + 24, &e.flags.to_le_bytes());
    }
    b
}

/// How the disk maps onto BAT entries: payload blocks, with a sector bitmap entry after
/// every `chunk_ratio` of them.
#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    pub(super) block_size: u64,
    pub(super) chunk_ratio: u64,
    pub(super) size: u64,
    /// Entries the BAT holds (QEMU's 32-bit count).
    pub(super) entries: u32,
}

impl Layout {
    /// The layout of a disk of `size` bytes in blocks of `block_size` (a power of two of
    /// 1 to 256 MiB) and 512-byte sectors.
    pub(super) fn new(size: u64, block_size: u64) -> Layout {
        let chunk_ratio = MAX_SECTORS_PER_BLOCK * SECTOR / block_size;
        // QEMU counts in 32 bits: an empty disk's count wraps around to a large BAT.
        let blocks = size.div_ceil(block_size) as u32;
        let entries = blocks.wrapping_add(blocks.wrapping_sub(1) >> chunk_ratio.trailing_zeros());
        Layout {
            block_size,
            chunk_ratio,
            size,
            entries,
        }
    }

    /// The BAT entry of payload block `block`.
    pub(super) fn entry_of(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let mut b = b"abcdXXXXefgh".to_vec();
        seal(&mut b, 4);
        assert!(checksum_ok(&b, 4));
        b[0] ^= 1;
        assert!(!checksum_ok(&b, 4));
    }

    #[test]
    fn guids_store_their_first_fields_little_endian() {
        assert_eq!(
            &BAT_GUID[..8],
            &[0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42]
        );
    }

    #[test]
    fn a_sector_bitmap_entry_follows_every_chunk() {
        let l = Layout::new(64 * MIB, 8 * MIB);
        assert_eq!((l.chunk_ratio, l.entries), (512, 8));
        assert_eq!(l.entry_of(511), 511);
        assert_eq!(l.entry_of(512), 513);
        let big = Layout::new(8 * 1024 * MIB, MIB);
        assert_eq!(big.chunk_ratio, 4096);
        assert_eq!(big.entries, 8192 + 1);
        assert_eq!(Layout::new(0, 8 * MIB).entries, u32::MAX >> 9);
    }
}
