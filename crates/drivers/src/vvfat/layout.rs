//! Where things sit on a vvfat disk: the geometry QEMU gives it, the MBR and boot sector it
//! writes, and the FAT's entries in their three widths.
//!
//! Cluster numbers are counted from the root directory's first sector, as QEMU counts them:
//! FAT12 and FAT16 keep their 512-entry root directory in clusters 0 and 1, so the data
//! clusters a FAT names start at 2 where they sit on a real disk.

/// Bytes in a sector.
pub(crate) const SECTOR: usize = 512;
/// Bytes in a directory entry.
pub(crate) const ENTRY: usize = 32;
/// Sectors in every cluster QEMU makes (8 KiB), whatever the FAT type.
const SECTORS_PER_CLUSTER: u32 = 16;
/// The boot sector's OEM name.
const OEM_NAME: &[u8; 8] = b"MSWIN4.1";

/// The width of the FAT's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

impl FatType {
    /// From the `fat-type` option (0 or absent: the default).
    pub(crate) fn from_option(bits: i64) -> Option<Option<FatType>> {
        match bits {
            0 => Some(None),
            12 => Some(Some(FatType::Fat12)),
            16 => Some(Some(FatType::Fat16)),
            32 => Some(Some(FatType::Fat32)),
            _ => None,
        }
    }

    pub(crate) fn bits(self) -> u32 {
        match self {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        }
    }

    /// The entry that ends a chain as written; anything above `max - 8` ends one when read.
    pub(crate) fn max(self) -> u32 {
        match self {
            FatType::Fat12 => 0xfff,
            FatType::Fat16 => 0xffff,
            FatType::Fat32 => 0x0fff_ffff,
        }
    }

    pub(crate) fn is_end(self, entry: u32) -> bool {
        entry > self.max() - 8
    }
}

/// The disk's shape, fixed at open.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub(crate) fat: FatType,
    cyls: u32,
    heads: u32,
    secs: u32,
    /// 0 for a floppy; a hard disk has an MBR and its partition starts at sector 63.
    pub(crate) boot_sector: u32,
    pub(crate) sectors_per_fat: u32,
    pub(crate) first_fat: u32,
    pub(crate) root_dir: u32,
    /// Clusters the data area holds (counted from the root directory).
    pub(crate) cluster_count: u32,
    /// Sectors of the partition as the boot sector states them.
    partition_sectors: u32,
    pub(crate) root_entries: u32,
}

impl Layout {
    /// QEMU's geometry: a 2.88 MB (or 1.44 MB FAT12) floppy, or a hard disk of 32 MB
    /// (FAT12) or 504 MB (FAT16, the default, and FAT32).
    pub(crate) fn new(fat: Option<FatType>, floppy: bool) -> Layout {
        let (fat, cyls, heads, secs, boot_sector) = if floppy {
            let fat_given = fat.is_some();
            let fat = fat.unwrap_or(FatType::Fat12);
            let secs = if fat_given && fat == FatType::Fat12 {
                18
            } else {
                36
            };
            (fat, 80, 2, secs, 0)
        } else {
            let fat = fat.unwrap_or(FatType::Fat16);
            let cyls = if fat == FatType::Fat12 { 64 } else { 1024 };
            (fat, cyls, 16, 63, 0x3f)
        };
        let partition_sectors = cyls * heads * secs - boot_sector;
        let per_fat_sector = 1 + SECTORS_PER_CLUSTER * SECTOR as u32 * 8 / fat.bits();
        let sectors_per_fat = (partition_sectors + per_fat_sector) / per_fat_sector;
        let first_fat = boot_sector + 1;
        let root_dir = first_fat + sectors_per_fat * 2;
        Layout {
            fat,
            cyls,
            heads,
            secs,
            boot_sector,
            sectors_per_fat,
            first_fat,
            root_dir,
            cluster_count: (partition_sectors - root_dir) / SECTORS_PER_CLUSTER,
            partition_sectors,
            root_entries: 0x20 * SECTORS_PER_CLUSTER,
        }
    }

    pub(crate) fn total_sectors(&self) -> u64 {
        u64::from(self.cyls * self.heads * self.secs)
    }

    pub(crate) const fn sectors_per_cluster(&self) -> u32 {
        SECTORS_PER_CLUSTER
    }

    pub(crate) const fn cluster_size(&self) -> usize {
        SECTORS_PER_CLUSTER as usize * SECTOR
    }

    /// Entries in a cluster of a directory.
    pub(crate) const fn entries_per_cluster(&self) -> usize {
        self.cluster_size() / ENTRY
    }

    /// The cluster a data-area sector belongs to and the sector's place in it.
    pub(crate) fn cluster_of(&self, sector: u64) -> Option<(u32, usize)> {
        let rel = sector.checked_sub(u64::from(self.root_dir))?;
        let cluster = u32::try_from(rel / u64::from(SECTORS_PER_CLUSTER)).ok()?;
        Some((cluster, (rel % u64::from(SECTORS_PER_CLUSTER)) as usize))
    }

    pub(crate) fn first_sector_of(&self, cluster: u32) -> u64 {
        u64::from(self.root_dir) + u64::from(cluster) * u64::from(SECTORS_PER_CLUSTER)
    }

    /// Whether `sector` lies in the first FAT (the one read back; QEMU serves the second
    /// from the same table and ignores what is written there).
    pub(crate) fn in_first_fat(&self, sector: u64) -> bool {
        (u64::from(self.first_fat)..u64::from(self.first_fat + self.sectors_per_fat))
            .contains(&sector)
    }

    /// The byte of the boot sector a guest may change (FAT16's `reserved1`, where systems
    /// mark the volume dirty).
    pub(crate) const DIRTY_BYTE: usize = 37;

    /// The sectors before the first FAT: the MBR (hard disks) and the boot sector.
    pub(crate) fn first_sectors(&self, label: &[u8; 11]) -> Vec<u8> {
        let mut out = vec![0u8; self.first_fat as usize * SECTOR];
        if self.boot_sector > 0 {
            self.write_mbr(&mut out[..SECTOR]);
        }
        let at = self.boot_sector as usize * SECTOR;
        self.write_boot_sector(&mut out[at..at + SECTOR], label);
        out
    }

    fn write_boot_sector(&self, b: &mut [u8], label: &[u8; 11]) {
        let hard_disk = self.boot_sector > 0;
        b[..3].copy_from_slice(&[0xeb, 0x3e, 0x90]);
        b[3..11].copy_from_slice(OEM_NAME);
        put16(b, 11, SECTOR as u16);
        b[13] = SECTORS_PER_CLUSTER as u8;
        put16(b, 14, 1);
        b[16] = 2;
        put16(b, 17, self.root_entries as u16);
        let small = u16::try_from(self.partition_sectors).ok();
        put16(b, 19, small.unwrap_or(0));
        b[21] = self.media();
        put16(b, 22, self.sectors_per_fat as u16);
        put16(b, 24, self.secs as u16);
        put16(b, 26, self.heads as u16);
        put32(b, 28, self.boot_sector);
        put32(
            b,
            32,
            if small.is_some() {
                0
            } else {
                self.partition_sectors
            },
        );
        // QEMU writes FAT16's extended fields for every type, FAT32 included.
        b[36] = if hard_disk { 0x80 } else { 0 };
        b[38] = 0x29;
        put32(b, 39, 0xfabe_1afd);
        b[43..54].copy_from_slice(label);
        let name: &[u8; 8] = if self.fat == FatType::Fat12 {
            b"FAT12   "
        } else {
            b"FAT16   "
        };
        b[54..62].copy_from_slice(name);
        b[510] = 0x55;
        b[511] = 0xaa;
    }

    /// The media descriptor: hard disk or floppy.
    pub(crate) fn media(&self) -> u8 {
        if self.boot_sector > 0 { 0xf8 } else { 0xf0 }
    }

    fn write_mbr(&self, m: &mut [u8]) {
        put32(m, 0x1b8, 0xbe1a_fdfa);
        let p = &mut m[0x1be..0x1ce];
        p[0] = 0x80;
        let last = (self.total_sectors() - 1) as u32;
        let start_overflows = self.chs(self.boot_sector, &mut p[1..4]);
        let end_overflows = self.chs(last, &mut p[5..8]);
        let lba = start_overflows || end_overflows;
        p[4] = match self.fat {
            FatType::Fat12 => 0x01,
            FatType::Fat16 if lba => 0x0e,
            FatType::Fat16 => 0x06,
            FatType::Fat32 if lba => 0x0c,
            FatType::Fat32 => 0x0b,
        };
        put32(p, 8, self.boot_sector);
        put32(p, 12, last + 1 - self.boot_sector);
        m[510] = 0x55;
        m[511] = 0xaa;
    }

    /// Writes `sector` as head, sector and cylinder bytes; true (and all 0xff) where the
    /// geometry cannot say it.
    fn chs(&self, sector: u32, out: &mut [u8]) -> bool {
        let s = sector % self.secs;
        let rest = sector / self.secs;
        let head = rest % self.heads;
        let cyl = rest / self.heads;
        if cyl >= self.cyls {
            out.copy_from_slice(&[0xff; 3]);
            return true;
        }
        out[0] = head as u8;
        out[1] = ((s + 1) | ((cyl >> 8) << 6)) as u8;
        out[2] = cyl as u8;
        false
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A FAT's bytes, read and written by entry.
pub(crate) struct Fat<'a> {
    pub(crate) kind: FatType,
    pub(crate) bytes: &'a mut [u8],
}

impl Fat<'_> {
    /// The entry of `cluster`; `None` past the table's end.
    #[cfg(test)]
    pub(crate) fn get(&self, cluster: u32) -> Option<u32> {
        get(self.kind, self.bytes, cluster)
    }

    pub(crate) fn set(&mut self, cluster: u32, value: u32) {
        let c = cluster as usize;
        match self.kind {
            FatType::Fat32 => {
                if let Some(e) = self.bytes.get_mut(c * 4..c * 4 + 4) {
                    e.copy_from_slice(&value.to_le_bytes());
                }
            }
            FatType::Fat16 => {
                if let Some(e) = self.bytes.get_mut(c * 2..c * 2 + 2) {
                    e.copy_from_slice(&(value as u16).to_le_bytes());
                }
            }
            FatType::Fat12 => {
                let at = c * 3 / 2;
                if let Some(p) = self.bytes.get_mut(at..at + 2) {
                    if c & 1 == 0 {
                        p[0] = value as u8;
                        p[1] = (p[1] & 0xf0) | ((value >> 8) & 0xf) as u8;
                    } else {
                        p[0] = (p[0] & 0x0f) | ((value & 0xf) << 4) as u8;
                        p[1] = (value >> 4) as u8;
                    }
                }
            }
        }
    }
}

/// The entry of `cluster` in a FAT's bytes; `None` past their end.
pub(crate) fn get(kind: FatType, bytes: &[u8], cluster: u32) -> Option<u32> {
    let c = cluster as usize;
    match kind {
        FatType::Fat32 => {
            let e = bytes.get(c * 4..c * 4 + 4)?;
            Some(u32::from_le_bytes([e[0], e[1], e[2], e[3]]))
        }
        FatType::Fat16 => {
            let e = bytes.get(c * 2..c * 2 + 2)?;
            Some(u32::from(u16::from_le_bytes([e[0], e[1]])))
        }
        FatType::Fat12 => {
            let at = c * 3 / 2;
            let e = bytes.get(at..at + 2)?;
            let pair = u32::from(e[0]) | (u32::from(e[1]) << 8);
            Some((pair >> if c & 1 == 1 { 4 } else { 0 }) & 0xfff)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries_are_qemus() {
        let hd = Layout::new(None, false);
        assert_eq!(hd.fat, FatType::Fat16);
        assert_eq!(hd.total_sectors() * 512, 528_482_304);
        assert_eq!((hd.first_fat, hd.sectors_per_fat), (64, 252));
        assert_eq!(hd.root_dir, 64 + 504);
        let floppy = Layout::new(None, true);
        assert_eq!(floppy.total_sectors(), 80 * 2 * 36);
        assert_eq!(floppy.boot_sector, 0);
        let f12 = Layout::new(Some(FatType::Fat12), true);
        assert_eq!(f12.total_sectors(), 80 * 2 * 18);
    }

    #[test]
    fn fat12_entries_pack_in_three_bytes() {
        let mut bytes = vec![0u8; 12];
        let mut fat = Fat {
            kind: FatType::Fat12,
            bytes: &mut bytes,
        };
        for c in 0..8 {
            fat.set(c, 0xa00 + c);
        }
        for c in 0..8 {
            assert_eq!(fat.get(c), Some(0xa00 + c));
        }
        assert_eq!(fat.get(8), None);
        assert!(FatType::Fat12.is_end(0xff8) && !FatType::Fat12.is_end(0xff7));
    }
}
