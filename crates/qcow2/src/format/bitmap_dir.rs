//! The bitmap directory (docs/interop/qcow2.txt "Bitmaps extension"): where each
//! persistent bitmap's table is, its flags, granularity and name. Read here once, with
//! QEMU's limits, for loading, storing, marking in use and repair alike.

use super::header::{EXT_BITMAPS, Header, autoclear};
use super::{get_be64, read_at};
use ferrite_block::Child;
use ferrite_qapi::os_msg;
use std::io;

/// The bitmap was in use when the image was last written (its bits are stale).
pub(crate) const IN_USE: u32 = 1;
/// The bitmap records writes (`recording`).
pub(crate) const AUTO: u32 = 2;
/// Most bitmaps and directory bytes QEMU accepts.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY: u64 = 1024 * MAX_BITMAPS as u64;
const MAX_NAME: usize = 1023;
/// Flags a directory entry may have.
const KNOWN_FLAGS: u32 = IN_USE | AUTO;
/// The only bitmap type: dirty tracking.
const DIRTY_TRACKING: u8 = 1;
/// Granularities QEMU accepts, as powers of two.
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Most entries a bitmap table may have (QEMU: `BME_MAX_TABLE_SIZE`).
const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;
/// Most bytes of bitmap data an entry may describe (QEMU: `BME_MAX_PHYS_SIZE`).
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// Bitmap table entries: reserved bits, the data cluster's offset, and "all ones" (bit 0,
/// only without an offset).
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
pub(crate) const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const TABLE_ALL_ONES: u64 = 1;

/// Why the image's bitmaps cannot be loaded, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BitmapError {
    #[error("bitmaps_ext: Invalid extension length")]
    ExtensionLength,
    #[error("bitmaps_ext: Reserved field is not zero")]
    ExtensionReserved,
    #[error(
        "bitmaps_ext: Image has {0} bitmaps, exceeding the QEMU supported maximum of {MAX_BITMAPS}"
    )]
    TooMany(u32),
    #[error("found bitmaps extension with zero bitmaps")]
    NoBitmaps,
    #[error("bitmaps_ext: invalid bitmap directory offset")]
    DirectoryOffset,
    #[error(
        "bitmaps_ext: bitmap directory size ({0}) exceeds the maximum supported size ({MAX_DIRECTORY})"
    )]
    DirectoryTooBig(u64),
    #[error("Requested bitmap directory size is zero")]
    DirectoryEmpty,
    #[error("Failed to read bitmap directory: {}", os_msg(.0))]
    ReadDirectory(io::Error),
    #[error("More bitmaps found than specified in header extension")]
    MoreThanCounted,
    #[error("Less bitmaps found than specified in header extension")]
    FewerThanCounted,
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    #[error("Bitmap '{0}' doesn't satisfy the constraints")]
    Constraints(String),
    #[error("Broken bitmap directory")]
    Broken,
    #[error("Could not read bitmap_table table from image for bitmap '{name}': {}", os_msg(.error))]
    ReadTable { name: String, error: io::Error },
    #[error("Could not read bitmap '{name}' from image: {}", os_msg(.error))]
    ReadData { name: String, error: io::Error },
}

impl From<BitmapError> for io::Error {
    fn from(e: BitmapError) -> io::Error {
        match e {
            BitmapError::ReadDirectory(error)
            | BitmapError::ReadTable { error, .. }
            | BitmapError::ReadData { error, .. } => error,
            e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
        }
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// One directory entry.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) table_offset: u64,
    pub(crate) table_size: u32,
    pub(crate) flags: u32,
    pub(crate) granularity_bits: u8,
    pub(crate) name: String,
    /// The entry as it is on disk (kept as is for bitmaps ferrite does not rewrite).
    pub(crate) raw: Vec<u8>,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The bitmaps extension checked as QEMU checks it while reading the header: the
/// directory's size and offset, or `None` when a program that knows nothing of bitmaps
/// cleared the autoclear bit (they are all stale then).
///
/// # Errors
/// QEMU's text for each way the extension breaks its rules.
pub(crate) fn check_extension(
    ext: &[u8],
    h: &Header,
) -> Result<Option<(u32, u64, u64)>, BitmapError> {
    if ext.len() != 24 {
        return Err(BitmapError::ExtensionLength);
    }
    if h.autoclear & autoclear::BITMAPS == 0 {
        return Ok(None);
    }
    if be32(ext, 4) != 0 {
        return Err(BitmapError::ExtensionReserved);
    }
    let nb = be32(ext, 0);
    let size = get_be64(ext, 1);
    let offset = get_be64(ext, 2);
    if nb > MAX_BITMAPS {
        return Err(BitmapError::TooMany(nb));
    }
    if nb == 0 {
        return Err(BitmapError::NoBitmaps);
    }
    if offset % h.cluster_size() != 0 {
        return Err(BitmapError::DirectoryOffset);
    }
    if size > MAX_DIRECTORY {
        return Err(BitmapError::DirectoryTooBig(size));
    }
    Ok(Some((nb, size, offset)))
}

/// The directory the header points to (empty when there is none, or when a program that
/// knows nothing of bitmaps cleared the autoclear bit: they are all stale then), checked as
/// QEMU checks it at open.
///
/// # Errors
/// QEMU's text for each way the extension, the directory or an entry breaks its rules.
pub(crate) async fn read(file: &Child, h: &Header) -> Result<Vec<Entry>, BitmapError> {
    let Some(ext) = h.extension(EXT_BITMAPS) else {
        return Ok(Vec::new());
    };
    let Some((nb, size, offset)) = check_extension(ext, h)? else {
        return Ok(Vec::new());
    };
    if size == 0 {
        return Err(BitmapError::DirectoryEmpty);
    }
    let dir = read_at(file, offset, size as usize)
        .await
        .map_err(BitmapError::ReadDirectory)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        if at + 24 > dir.len() {
            return Err(BitmapError::Broken);
        }
        if out.len() == nb as usize {
            return Err(BitmapError::MoreThanCounted);
        }
        let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
        let extra = be32(&dir, at + 20) as usize;
        let len = (24 + extra + name_size).next_multiple_of(8);
        if at + len > dir.len() {
            return Err(BitmapError::Broken);
        }
        if extra != 0 {
            return Err(BitmapError::ExtraData);
        }
        let name_at = at + 24;
        let e = Entry {
            table_offset: get_be64(&dir[at..], 0),
            table_size: be32(&dir, at + 8),
            flags: be32(&dir, at + 12),
            granularity_bits: dir[at + 17],
            name: String::from_utf8_lossy(&dir[name_at..name_at + name_size]).into_owned(),
            raw: dir[at..at + len].to_vec(),
        };
        if !satisfies_constraints(&e, dir[at + 16], name_size, h) {
            return Err(BitmapError::Constraints(e.name));
        }
        out.push(e);
        at += len;
    }
    if out.len() != nb as usize {
        return Err(BitmapError::FewerThanCounted);
    }
    Ok(out)
}

/// QEMU's rules for a directory entry: a table where one may be, a known type, flags and
/// granularity, and (unless the bitmap is stale anyway) a table big enough for the disk.
fn satisfies_constraints(e: &Entry, kind: u8, name_size: usize, h: &Header) -> bool {
    let cs = h.cluster_size();
    if e.table_size == 0
        || e.table_offset == 0
        || e.table_offset % cs != 0
        || e.table_size > MAX_TABLE_ENTRIES
        || !GRANULARITY_BITS.contains(&e.granularity_bits)
        || e.flags & !KNOWN_FLAGS != 0
        || name_size > MAX_NAME
        || kind != DIRTY_TRACKING
    {
        return false;
    }
    let phys = u64::from(e.table_size) * cs;
    if phys > MAX_PHYS_BYTES {
        return false;
    }
    // Bits the table can hold: phys * 8 granules (fits: phys is at most 2^29).
    let covers = u128::from(phys * 8) << e.granularity_bits;
    e.flags & IN_USE != 0 || u128::from(h.size & !511) <= covers
}

/// An entry's bitmap table: the host offsets of its data clusters, each checked as QEMU
/// checks them (no reserved bit, a cluster-aligned offset, "all ones" only without one).
///
/// # Errors
/// QEMU's "Could not read bitmap_table" text: EINVAL for a bad entry, or the file's error.
pub(crate) async fn read_table(file: &Child, e: &Entry, cs: u64) -> Result<Vec<u64>, BitmapError> {
    let fail = |error| BitmapError::ReadTable {
        name: e.name.clone(),
        error,
    };
    if e.table_size > MAX_TABLE_ENTRIES {
        return Err(fail(einval()));
    }
    let raw = read_at(file, e.table_offset, e.table_size as usize * 8)
        .await
        .map_err(fail)?;
    let table: Vec<u64> = (0..e.table_size as usize)
        .map(|k| get_be64(&raw, k))
        .collect();
    for &t in &table {
        let host = t & TABLE_OFFSET;
        if t & TABLE_RESERVED != 0 || (host != 0 && (t & TABLE_ALL_ONES != 0 || host % cs != 0)) {
            return Err(fail(einval()));
        }
    }
    Ok(table)
}
