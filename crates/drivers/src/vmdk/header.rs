//! The binary half of VMDK: the header of a sparse extent (`KDMV`, or the older ESX `COWD`),
//! as read when an extent opens and as written when one is made.

pub(super) const SECTOR: u64 = 512;
pub(super) const VMDK3_MAGIC: u32 = u32::from_be_bytes(*b"COWD");
pub(super) const VMDK4_MAGIC: u32 = u32::from_be_bytes(*b"KDMV");
const FLAG_NL_DETECT: u32 = 1;
const FLAG_RGD: u32 = 1 << 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_COMPRESS: u32 = 1 << 16;
const FLAG_MARKER: u32 = 1 << 17;
const COMPRESSION_DEFLATE: u16 = 1;
/// The grain directory's offset in a stream-optimized image whose footer says where it is.
pub(super) const GD_AT_END: u64 = u64::MAX;
/// Bytes of a `KDMV` header after the magic.
pub(super) const VMDK4_HEADER_LEN: usize = 75;
/// Bytes of a `COWD` header after the magic.
pub(super) const VMDK3_HEADER_LEN: usize = 40;
/// Sectors the descriptor of a monolithic sparse image takes (QEMU reads and writes that
/// many).
pub(super) const DESC_SECTORS: u64 = 20;
/// The footer of a stream-optimized image: a footer marker, a header, an end-of-stream
/// marker, one sector each, ending the file.
pub(super) const FOOTER_LEN: usize = 1536;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// A `KDMV` header's fields (QEMU's `VMDK4Header`), read from the bytes after the magic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Vmdk4Header {
    pub(super) version: u32,
    pub(super) flags: u32,
    /// Sectors of the disk this extent holds.
    pub(super) capacity: u64,
    /// Sectors per grain.
    pub(super) granularity: u64,
    pub(super) desc_offset: u64,
    pub(super) desc_size: u64,
    pub(super) gtes_per_gt: u32,
    /// The redundant grain directory (the one QEMU reads as the backup).
    pub(super) rgd_offset: u64,
    pub(super) gd_offset: u64,
    pub(super) grain_offset: u64,
    pub(super) compress_algorithm: u16,
}

impl Vmdk4Header {
    /// Reads the header from the bytes after the magic (at least [`VMDK4_HEADER_LEN`]).
    pub(super) fn parse(b: &[u8]) -> Vmdk4Header {
        Vmdk4Header {
            version: le32(b, 0),
            flags: le32(b, 4),
            capacity: le64(b, 8),
            granularity: le64(b, 16),
            desc_offset: le64(b, 24),
            desc_size: le64(b, 32),
            gtes_per_gt: le32(b, 40),
            rgd_offset: le64(b, 44),
            gd_offset: le64(b, 52),
            grain_offset: le64(b, 60),
            compress_algorithm: le16(b, 73),
        }
    }

    pub(super) fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    pub(super) fn has_marker(&self) -> bool {
        self.flags & FLAG_MARKER != 0
    }

    pub(super) fn has_zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    pub(super) fn has_rgd(&self) -> bool {
        self.flags & FLAG_RGD != 0
    }

    /// The magic and the header as a new extent starts (QEMU's `vmdk_init_extent`): a
    /// 64 KiB grain, 512 entries per grain table, the descriptor's 20 sectors after the
    /// header, then the redundant grain directory and its tables, then the directory and
    /// its tables, the grains from the next 64 KiB boundary.
    pub(super) fn new_sparse(capacity: u64, compress: bool, zeroed_grain: bool) -> NewSparse {
        const GRANULARITY: u64 = 128;
        const GTES: u64 = 512;
        let grains = capacity.div_ceil(GRANULARITY);
        let gt_sectors = (GTES * 4).div_ceil(SECTOR);
        let gt_count = grains.div_ceil(GTES);
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
        let rgd_offset = 1 + DESC_SECTORS;
        let gd_offset = rgd_offset + gd_sectors + gt_sectors * gt_count;
        let grain_offset =
            (gd_offset + gd_sectors + gt_sectors * gt_count).next_multiple_of(GRANULARITY);
        let version = if compress {
            3
        } else if zeroed_grain {
            2
        } else {
            1
        };
        let mut flags = FLAG_RGD | FLAG_NL_DETECT;
        if compress {
            flags |= FLAG_COMPRESS | FLAG_MARKER;
        }
        if zeroed_grain {
            flags |= FLAG_ZERO_GRAIN;
        }
        let mut b = vec![0u8; 4 + VMDK4_HEADER_LEN];
        b[..4].copy_from_slice(&VMDK4_MAGIC.to_be_bytes());
        let mut put = |at: usize, v: &[u8]| b[4 + at..4 + at + v.len()].copy_from_slice(v);
        put(0, &u32::to_le_bytes(version));
        put(4, &flags.to_le_bytes());
        put(8, &capacity.to_le_bytes());
        put(16, &GRANULARITY.to_le_bytes());
        put(24, &1u64.to_le_bytes());
        put(32, &DESC_SECTORS.to_le_bytes());
        put(40, &(GTES as u32).to_le_bytes());
        put(44, &rgd_offset.to_le_bytes());
        put(52, &gd_offset.to_le_bytes());
        put(60, &grain_offset.to_le_bytes());
        // The newline check bytes.
        put(69, &[0x0a, 0x20, 0x0d, 0x0a]);
        let algorithm = if compress { COMPRESSION_DEFLATE } else { 0 };
        put(73, &algorithm.to_le_bytes());
        let directory = |at: u64| -> Vec<u8> {
            let mut d = vec![0u8; (gd_sectors * SECTOR) as usize];
            for (i, e) in d.chunks_exact_mut(4).take(gt_count as usize).enumerate() {
                let table = at + gd_sectors + i as u64 * gt_sectors;
                e.copy_from_slice(&(table as u32).to_le_bytes());
            }
            d
        };
        NewSparse {
            rgd: (rgd_offset * SECTOR, directory(rgd_offset)),
            gd: (gd_offset * SECTOR, directory(gd_offset)),
            header: b,
            file_len: grain_offset * SECTOR,
        }
    }
}

/// A new sparse extent's bytes: its magic and header, its two grain directories (offset and
/// bytes), and how long the file is before any grain (its tables zeroes).
pub(super) struct NewSparse {
    pub(super) header: Vec<u8>,
    pub(super) rgd: (u64, Vec<u8>),
    pub(super) gd: (u64, Vec<u8>),
    pub(super) file_len: u64,
}

/// A `COWD` header's fields that matter (QEMU's `VMDK3Header`).
pub(super) struct Vmdk3Header {
    pub(super) disk_sectors: u32,
    pub(super) granularity: u32,
    pub(super) l1dir_offset: u32,
    pub(super) l1dir_size: u32,
}

impl Vmdk3Header {
    /// Reads the header from the bytes after the magic (at least [`VMDK3_HEADER_LEN`]).
    pub(super) fn parse(b: &[u8]) -> Vmdk3Header {
        Vmdk3Header {
            disk_sectors: le32(b, 8),
            granularity: le32(b, 12),
            l1dir_offset: le32(b, 16),
            l1dir_size: le32(b, 20),
        }
    }
}

/// The marker types of a stream-optimized file.
const MARKER_END_OF_STREAM: u32 = 0;
const MARKER_FOOTER: u32 = 3;

/// The header a stream-optimized image's footer holds, if the footer is sound (QEMU's
/// checks: a footer marker, the magic, an end-of-stream marker).
pub(super) fn footer_header(f: &[u8]) -> Option<Vmdk4Header> {
    let (footer, header, eos) = (&f[..512], &f[512..1024], &f[1024..1536]);
    let sound = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) == VMDK4_MAGIC
        && le32(footer, 8) == 0
        && le32(footer, 12) == MARKER_FOOTER
        && le64(eos, 0) == 0
        && le32(eos, 8) == 0
        && le32(eos, 12) == MARKER_END_OF_STREAM;
    sound.then(|| Vmdk4Header::parse(&header[4..]))
}

/// The fields of an seSparse extent's constant header that say where things are.
pub(super) struct SeSparseHeader {
    pub(super) capacity: u64,
    pub(super) grain_sectors: u64,
    pub(super) grain_table_sectors: u64,
    pub(super) volatile_header_offset: u64,
    pub(super) grain_dir_offset: u64,
    pub(super) grain_dir_sectors: u64,
    pub(super) grain_tables_offset: u64,
    pub(super) grains_offset: u64,
}

/// The seSparse headers' magic numbers.
const SE_CONST_MAGIC: u64 = 0xcafe_babe;
const SE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;

impl SeSparseHeader {
    /// QEMU's strict checks of the constant header (the format has no public
    /// description), in its order and words.
    pub(super) fn parse(b: &[u8]) -> Result<SeSparseHeader, String> {
        let magic = le64(b, 0);
        if magic != SE_CONST_MAGIC {
            return Err(format!("Bad const header magic: 0x{magic:016x}"));
        }
        let version = le64(b, 8);
        if version != 0x0000_0002_0000_0001 {
            return Err(format!("Unsupported version: 0x{version:016x}"));
        }
        let grain_size = le64(b, 24);
        if grain_size != 8 {
            return Err(format!("Unsupported grain size: {grain_size}"));
        }
        let table_size = le64(b, 32);
        if table_size != 64 {
            return Err(format!("Unsupported grain table size: {table_size}"));
        }
        let flags = le64(b, 40);
        if flags != 0 {
            return Err(format!("Unsupported flags: 0x{flags:016x}"));
        }
        let reserved = [le64(b, 48), le64(b, 56), le64(b, 64), le64(b, 72)];
        if reserved.iter().any(|&r| r != 0) {
            return Err(format!(
                "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
                reserved[0], reserved[1], reserved[2], reserved[3]
            ));
        }
        if b[208..512].iter().any(|&x| x != 0) {
            return Err("Unsupported non-zero const header padding".into());
        }
        Ok(SeSparseHeader {
            capacity: le64(b, 16),
            grain_sectors: grain_size,
            grain_table_sectors: table_size,
            volatile_header_offset: le64(b, 80),
            grain_dir_offset: le64(b, 128),
            grain_dir_sectors: le64(b, 136),
            grain_tables_offset: le64(b, 144),
            grains_offset: le64(b, 192),
        })
    }

    /// QEMU's checks of the volatile header: an image with a journal to replay is
    /// refused.
    pub(super) fn check_volatile(b: &[u8]) -> Result<(), String> {
        let magic = le64(b, 0);
        if magic != SE_VOLATILE_MAGIC {
            return Err(format!("Bad volatile header magic: 0x{magic:016x}"));
        }
        if le64(b, 24) != 0 {
            return Err("Image is dirty, Replaying journal not supported".into());
        }
        if b[32..512].iter().any(|&x| x != 0) {
            return Err("Unsupported non-zero volatile header padding".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_header_reads_back() {
        let n = Vmdk4Header::new_sparse(204_800, false, false);
        let h = Vmdk4Header::parse(&n.header[4..]);
        assert_eq!(
            (h.version, h.capacity, h.granularity, h.gtes_per_gt),
            (1, 204_800, 128, 512)
        );
        // As qemu-img lays out a 100 MiB image: directories at 21 and 38, grains at 128.
        assert_eq!((h.rgd_offset, h.gd_offset, h.grain_offset), (21, 38, 128));
        assert_eq!(n.file_len, 65536);
        assert!(h.has_rgd() && !h.compressed() && !h.has_zero_grain());
        assert_eq!(&n.rgd.1[..8], &[22, 0, 0, 0, 26, 0, 0, 0]);
    }
}
