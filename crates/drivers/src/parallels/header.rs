//! The 64-byte header of a Parallels image (docs/interop/parallels.rst in QEMU's tree), all
//! little-endian, and what follows from it: the cluster size, where a BAT entry's offset
//! points, where the data area starts.

pub(super) const HEADER_LEN: usize = 64;
/// Images whose BAT entries count sectors and whose size is 32 bits.
pub(super) const MAGIC: &[u8; 16] = b"WithoutFreeSpace";
/// Images whose BAT entries count clusters (all ferrite and QEMU make).
pub(super) const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
pub(super) const VERSION: u32 = 2;
/// `inuse` while software has the image open for writing.
pub(super) const INUSE: u32 = 0x746f_6e59;
/// The geometry QEMU writes (nothing at the image level reads it).
pub(super) const HEADS: u32 = 16;
pub(super) const SECTORS_PER_CYLINDER: u64 = 32;
pub(super) const DEFAULT_CLUSTER_SIZE: u64 = 1 << 20;
pub(super) const SECTOR: u64 = 512;

/// The header's fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) magic: [u8; 16],
    pub(super) version: u32,
    pub(super) heads: u32,
    pub(super) cylinders: u32,
    /// The cluster size in sectors.
    pub(super) tracks: u32,
    pub(super) bat_entries: u32,
    pub(super) nb_sectors: u64,
    pub(super) inuse: u32,
    /// Where the data area starts, in sectors.
    pub(super) data_off: u32,
    pub(super) flags: u32,
    /// Where the format extension cluster is, in sectors (0: none).
    pub(super) ext_off: u64,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl Header {
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> Header {
        let mut magic = [0u8; 16];
        magic.copy_from_slice(&b[..16]);
        Header {
            magic,
            version: le32(b, 16),
            heads: le32(b, 20),
            cylinders: le32(b, 24),
            tracks: le32(b, 28),
            bat_entries: le32(b, 32),
            nb_sectors: le64(b, 36),
            inuse: le32(b, 44),
            data_off: le32(b, 48),
            flags: le32(b, 52),
            ext_off: le64(b, 56),
        }
    }

    pub(super) fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..16].copy_from_slice(&self.magic);
        for (at, v) in [
            (16, self.version),
            (20, self.heads),
            (24, self.cylinders),
            (28, self.tracks),
            (32, self.bat_entries),
            (44, self.inuse),
            (48, self.data_off),
            (52, self.flags),
        ] {
            b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        b[36..44].copy_from_slice(&self.nb_sectors.to_le_bytes());
        b[56..64].copy_from_slice(&self.ext_off.to_le_bytes());
        b
    }

    /// The old format: BAT entries count sectors, the size only 32 bits.
    pub(super) fn old_magic(&self) -> bool {
        &self.magic == MAGIC
    }

    /// The bytes the header and its BAT take.
    pub(super) fn bat_end(&self) -> u64 {
        bat_entry_at(self.bat_entries)
    }

    /// Where the data area starts (in sectors), and whether the header says so rightly
    /// (QEMU's `parallels_test_data_off`): not before the BAT's end (rounded up to a
    /// cluster for the new format), not past the file's end; 0 in an old-format image
    /// means just after the BAT.
    pub(super) fn data_start(&self, file_sectors: u64) -> (u64, bool) {
        let mut min = self.bat_end().div_ceil(SECTOR);
        if !self.old_magic() {
            min = min.next_multiple_of(u64::from(self.tracks));
        }
        let off = u64::from(self.data_off);
        if off == 0 && self.old_magic() {
            return (min, true);
        }
        if off < min || off > file_sectors {
            return (min, false);
        }
        (off, true)
    }
}

/// Where BAT entry `index` is in the file.
pub(super) fn bat_entry_at(index: u32) -> u64 {
    HEADER_LEN as u64 + 4 * u64::from(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_survive_a_round_trip() {
        let h = Header {
            magic: *MAGIC_EXT,
            version: VERSION,
            heads: HEADS,
            cylinders: 40,
            tracks: 2048,
            bat_entries: 10,
            nb_sectors: 20480,
            inuse: INUSE,
            data_off: 2048,
            flags: 1,
            ext_off: 1 << 40,
        };
        assert_eq!(Header::parse(&h.to_bytes()), h);
    }

    #[test]
    fn the_data_area_starts_where_qemu_finds_it() {
        let mut h = Header {
            magic: *MAGIC_EXT,
            tracks: 2048,
            bat_entries: 10,
            data_off: 2048,
            ..Header::default()
        };
        assert_eq!(h.data_start(4096), (2048, true));
        assert_eq!(h.data_start(1000), (2048, false));
        h.data_off = 1;
        assert_eq!(h.data_start(4096), (2048, false));
        h.magic = *MAGIC;
        h.data_off = 0;
        assert_eq!(h.data_start(4096), (1, true));
    }
}
