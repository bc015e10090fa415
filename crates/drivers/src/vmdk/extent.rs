//! One extent of a VMDK disk: a stretch of its sectors held by one file, either as they are
//! (flat) or in grains a two-level table places (sparse: the grain directory, QEMU's L1,
//! points to grain tables, its L2, whose entries place the grains; compressed grains in a
//! stream-optimized file).

use super::header::SECTOR;
use ferrite_block::Child;
use ferrite_block::io::pool;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

/// A grain table entry for a grain that reads as zeroes (with the zeroed-grain flag).
pub(super) const GTE_ZEROED: u32 = 1;
/// Grains may start below this sector of their file (entries are 32-bit sector numbers).
const MAX_SECTORS: u64 = 1 << 32;
/// Grain tables kept in memory per extent.
const TABLES_CACHED: usize = 64;
/// A compressed grain's marker: the sector it holds (`u64`), the compressed length (`u32`).
const MARKER_LEN: usize = 12;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Where an extent keeps its data.
pub(super) enum Layout {
    /// All of it, from this byte of the file on.
    Flat {
        start: u64,
    },
    Sparse(Sparse),
}

pub(super) struct Extent {
    pub(super) file: Rc<Child>,
    /// The type its descriptor line gives (`FLAT`, `SPARSE`...); none for a monolithic
    /// sparse image's one extent.
    pub(super) kind: Option<String>,
    /// Sectors of the disk it holds.
    pub(super) sectors: u64,
    /// The first byte of the disk it holds.
    pub(super) start: u64,
    pub(super) layout: Layout,
}

impl Extent {
    /// One past the last byte of the disk it holds.
    pub(super) fn end(&self) -> u64 {
        self.start + self.sectors * SECTOR
    }

    /// The unit its data is placed in: a grain, or the whole of a flat extent.
    pub(super) fn cluster_bytes(&self) -> u64 {
        match &self.layout {
            Layout::Flat { .. } => self.sectors * SECTOR,
            Layout::Sparse(s) => s.grain_sectors * SECTOR,
        }
    }

    pub(super) fn sparse(&self) -> Option<&Sparse> {
        match &self.layout {
            Layout::Sparse(s) => Some(s),
            Layout::Flat { .. } => None,
        }
    }
}

/// What a sparse extent's tables say of a grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grain {
    /// No entry (reads from the backing file, or as zeroes).
    Unallocated,
    /// Reads as zeroes, whatever lies below.
    Zeroed,
    /// At this byte of the file.
    At(u64),
    /// The tables cannot say (an index past the directory, a table that cannot be read).
    Unknown,
}

/// Where a grain's entry is, for changing it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    l1_index: usize,
    l2_index: usize,
    /// The grain table's first sector.
    table: u64,
}

/// A sparse extent's geometry and tables.
pub(super) struct Sparse {
    pub(super) compressed: bool,
    pub(super) has_marker: bool,
    pub(super) has_zero_grain: bool,
    pub(super) grain_sectors: u64,
    /// Sectors of the disk each directory entry covers.
    l1_entry_sectors: u64,
    /// Entries the directory has (those past the end of the file read as 0).
    l1_size: usize,
    l1: Vec<u64>,
    /// The redundant directory, kept in step on every change.
    l1_backup: Option<Vec<u64>>,
    /// ESXi's 64-bit encoding of the tables, read only.
    se: Option<SeSparse>,
    /// Entries per grain table.
    l2_size: usize,
    tables: RefCell<Tables>,
    /// Where the next grain goes, in sectors.
    pub(super) next_cluster_sector: Cell<u64>,
}

/// Grain tables read so far. A table read while an entry of it changed is not kept: its
/// copy may be older than the change.
#[derive(Default)]
struct Tables {
    by_sector: HashMap<u64, Rc<Vec<u64>>>,
    changes: u64,
}

/// What opening a sparse extent found, before its tables are read.
pub(super) struct SparseGeometry {
    pub(super) capacity: u64,
    pub(super) l1_offset: u64,
    pub(super) l1_backup_offset: Option<u64>,
    pub(super) l1_size: u64,
    pub(super) l2_size: u64,
    pub(super) grain_sectors: u64,
    pub(super) compressed: bool,
    pub(super) has_marker: bool,
    pub(super) has_zero_grain: bool,
    pub(super) se: Option<SeSparse>,
}

/// Where an seSparse extent's grain tables and grains start, in sectors.
#[derive(Debug, Clone, Copy)]
pub(super) struct SeSparse {
    pub(super) tables: u64,
    pub(super) grains: u64,
}

/// The little-endian entries of a table of `width`-byte entries.
fn entries(bytes: &[u8], width: usize) -> Vec<u64> {
    bytes
        .chunks_exact(width)
        .map(|c| {
            let mut e = [0u8; 8];
            e[..width].copy_from_slice(c);
            u64::from_le_bytes(e)
        })
        .collect()
}

impl SparseGeometry {
    /// Bytes per table entry.
    fn entry_width(&self) -> usize {
        if self.se.is_some() { 8 } else { 4 }
    }
}

/// QEMU's `ROUND_UP`, a mask: exact for the powers of two images use.
fn round_up(n: u64, d: u64) -> u64 {
    n.wrapping_add(d).wrapping_sub(1) & d.wrapping_neg()
}

impl Sparse {
    /// Reads the directories of an extent in `file` (QEMU's `vmdk_add_extent` checks, then
    /// `vmdk_init_tables`). `Err` holds QEMU's words.
    pub(super) async fn open(file: &Child, g: &SparseGeometry) -> Result<Sparse, String> {
        if g.grain_sectors > 0x20_0000 || g.grain_sectors == 0 {
            return Err("Invalid granularity, image may be corrupt".into());
        }
        if g.l1_size > 32 * 1024 * 1024 {
            return Err("L1 size too big".into());
        }
        let file_sectors = file.len().div_ceil(SECTOR);
        let l1_size = g.l1_size as usize;
        let width = g.entry_width();
        let read_table = async |at: u64, what: &str| {
            // Entries past the end of the file read as 0: only those in it take memory.
            let in_file = (file.len().saturating_sub(at) / width as u64).min(g.l1_size) as usize;
            file.read(at, in_file * width)
                .await
                .map(|b| entries(&b, width))
                .map_err(|e| {
                    format!(
                        "Could not read {what} from extent '{}': {}",
                        file.node().filename(),
                        ferrite_qapi::os_msg(&e)
                    )
                })
        };
        let l1 = read_table(g.l1_offset, "l1 table").await?;
        let l1_backup = match g.l1_backup_offset {
            Some(at) if at != 0 => Some(read_table(at, "l1 backup table").await?),
            _ => None,
        };
        Ok(Sparse {
            compressed: g.compressed,
            has_marker: g.has_marker,
            has_zero_grain: g.has_zero_grain,
            grain_sectors: g.grain_sectors,
            l1_entry_sectors: g.l2_size * g.grain_sectors,
            l1_size,
            l1,
            l1_backup,
            se: g.se,
            l2_size: g.l2_size as usize,
            tables: RefCell::default(),
            next_cluster_sector: Cell::new(round_up(file_sectors, g.grain_sectors)),
        })
    }

    fn grain_bytes(&self) -> u64 {
        self.grain_sectors * SECTOR
    }

    /// The grain holding byte `rel` of the extent, and where its entry is (when its table
    /// exists).
    pub(super) async fn lookup(&self, file: &Child, rel: u64) -> (Grain, Option<Slot>) {
        let sector = rel / SECTOR;
        let l1_index = sector / self.l1_entry_sectors;
        if l1_index >= self.l1_size as u64 {
            return (Grain::Unknown, None);
        }
        let l1_index = l1_index as usize;
        let raw = self.l1.get(l1_index).copied().unwrap_or(0);
        let table = match self.se {
            None => raw,
            Some(_) if raw == 0 => 0,
            // An allocated seSparse table's entry is 0x1000_0000 in its top half.
            Some(_) if raw >> 32 != 0x1000_0000 => return (Grain::Unknown, None),
            Some(se) => {
                let t = (raw & 0xffff_ffff) * (self.l2_size as u64 * 8) / SECTOR;
                match se.tables.checked_add(t) {
                    Some(t) if t <= u64::from(u32::MAX) => t,
                    _ => return (Grain::Unknown, None),
                }
            }
        };
        if table == 0 {
            return (Grain::Unallocated, None);
        }
        let Ok(entries) = self.table(file, table).await else {
            return (Grain::Unknown, None);
        };
        let l2_index = ((sector / self.grain_sectors) % self.l2_size as u64) as usize;
        let slot = Slot {
            l1_index,
            l2_index,
            table,
        };
        let entry = entries.get(l2_index).copied().unwrap_or(0);
        let grain = match self.se {
            Some(se) => self.se_grain(se, entry),
            None => match entry {
                e if e == u64::from(GTE_ZEROED) && self.has_zero_grain => Grain::Zeroed,
                0 => Grain::Unallocated,
                e => Grain::At(e * SECTOR),
            },
        };
        (grain, Some(slot))
    }

    /// An seSparse grain table entry: its top four bits say what it is (QEMU's reading).
    fn se_grain(&self, se: SeSparse, e: u64) -> Grain {
        match e >> 60 {
            0 if e == 0 => Grain::Unallocated,
            // Unmapped (1) and zeroed (2) grains read as zeroes.
            1 | 2 => Grain::Zeroed,
            3 => {
                let index =
                    ((e & 0x0fff_0000_0000_0000) >> 48) | ((e & 0x0000_ffff_ffff_ffff) << 12);
                index
                    .checked_mul(self.grain_sectors)
                    .and_then(|s| s.checked_add(se.grains))
                    .and_then(|s| s.checked_mul(SECTOR))
                    .map_or(Grain::Unknown, Grain::At)
            }
            _ => Grain::Unknown,
        }
    }

    /// Whether the extent is ESXi's seSparse, which QEMU only reads.
    pub(super) fn is_se_sparse(&self) -> bool {
        self.se.is_some()
    }

    async fn table(&self, file: &Child, table: u64) -> io::Result<Rc<Vec<u64>>> {
        if let Some(t) = self.tables.borrow().by_sector.get(&table) {
            return Ok(t.clone());
        }
        let changes = self.tables.borrow().changes;
        let width = if self.se.is_some() { 8 } else { 4 };
        let bytes = file.read(table * SECTOR, self.l2_size * width).await?;
        let entries = Rc::new(entries(&bytes, width));
        pool::give(bytes);
        let mut t = self.tables.borrow_mut();
        if t.changes == changes {
            if t.by_sector.len() >= TABLES_CACHED {
                t.by_sector.clear();
            }
            t.by_sector.insert(table, entries.clone());
        }
        Ok(entries)
    }

    /// Sets a grain's entry in its table and in the redundant one, durably (QEMU's
    /// `vmdk_L2update`).
    pub(super) async fn set_entry(&self, file: &Child, slot: Slot, value: u32) -> io::Result<()> {
        let bytes = value.to_le_bytes().to_vec();
        let at = |table: u64| table * SECTOR + slot.l2_index as u64 * 4;
        {
            let mut t = self.tables.borrow_mut();
            t.changes += 1;
            if let Some(entries) = t.by_sector.get_mut(&slot.table) {
                Rc::make_mut(entries)[slot.l2_index] = u64::from(value);
            }
        }
        file.write(at(slot.table), bytes.clone(), Default::default())
            .await?;
        // A redundant table the directory does not place (0) is left alone: writing
        // there would overwrite the header.
        let backup = self
            .l1_backup
            .as_ref()
            .and_then(|b| b.get(slot.l1_index).copied())
            .filter(|&t| t != 0);
        if let Some(table) = backup {
            file.write(at(table), bytes, Default::default()).await?;
        }
        file.flush().await
    }

    /// Takes the next grain's place in the file: its first byte.
    pub(super) fn take_grain(&self) -> io::Result<u64> {
        let next = self.next_cluster_sector.get();
        if next >= MAX_SECTORS {
            return Err(einval());
        }
        self.next_cluster_sector.set(next + self.grain_sectors);
        Ok(next * SECTOR)
    }

    /// Reads `len` bytes at `inner` of the compressed grain at `at` (QEMU's
    /// `vmdk_read_extent`): the marker's length, then zlib's stream, whole.
    pub(super) async fn read_compressed(
        &self,
        file: &Child,
        at: u64,
        inner: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let grain = self.grain_bytes() as usize;
        let window = (2 * grain as u64).min(file.len().saturating_sub(at)) as usize;
        // QEMU reads two grains' worth; the marker says how much there is, so a first read
        // of a few kilobytes holds all of a grain that compressed well.
        let first = if self.has_marker {
            window.min(16 << 10)
        } else {
            window
        };
        let mut buf = file.read(at, first).await?;
        let marked = buf
            .get(8..12)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let needed = (MARKER_LEN + marked).min(window);
        if self.has_marker && needed > first {
            let rest = file.read(at + first as u64, needed - first).await?;
            buf.extend_from_slice(&rest);
            pool::give(rest);
        }
        let has_marker = self.has_marker;
        // Inflating takes longer than the read: off the main thread, beside other requests.
        ferrite_block::io::blocking(move || {
            let (data, data_len) = if has_marker {
                let len = buf
                    .get(8..12)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                (buf.get(MARKER_LEN..).unwrap_or(&[]), len as usize)
            } else {
                (&buf[..], grain)
            };
            if data_len == 0 || data_len > 2 * grain {
                return Err(einval());
            }
            let data = &data[..data_len.min(data.len())];
            let mut out = Vec::with_capacity(grain);
            let mut z = flate2::Decompress::new(true);
            let status = z
                .decompress_vec(data, &mut out, flate2::FlushDecompress::Finish)
                .map_err(|_| einval())?;
            let (inner, end) = (inner as usize, inner as usize + len);
            if status != flate2::Status::StreamEnd || out.len() > grain || end > out.len() {
                return Err(einval());
            }
            out.truncate(end);
            out.drain(..inner);
            Ok(out)
        })
        .await
    }

    /// The marker and zlib stream a compressed grain is written as: `lba` is the disk
    /// sector it holds.
    pub(super) fn compress(&self, lba: u64, data: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(MARKER_LEN + 2 * data.len() + 64);
        out.extend_from_slice(&lba.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let mut z = flate2::Compress::new(flate2::Compression::default(), true);
        let status = z
            .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
            .map_err(|_| einval())?;
        let n = out.len() - MARKER_LEN;
        if status != flate2::Status::StreamEnd || n == 0 {
            return Err(einval());
        }
        out[8..12].copy_from_slice(&(n as u32).to_le_bytes());
        Ok(out)
    }
}
