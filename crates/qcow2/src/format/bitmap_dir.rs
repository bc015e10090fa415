//! The bitmap directory (docs/interop/qcow2.txt "Bitmaps extension"): where each
//! persistent bitmap's table is, its flags, granularity and name. Read here once, with
//! QEMU's limits, for loading, storing, marking in use and repair alike.

use super::header::{EXT_BITMAPS, Header, autoclear};
use super::{get_be64, read_at};
use ferrite_block::Child;
use std::io;

/// The bitmap was in use when the image was last written (its bits are stale).
pub(crate) const IN_USE: u32 = 1;
/// The bitmap records writes (`recording`).
pub(crate) const AUTO: u32 = 2;
/// Most bitmaps and directory bytes QEMU accepts.
const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY: u64 = 64 << 20;
const MAX_NAME: usize = 1023;

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

/// The directory the header points to (empty when there is none or it is stale), refused
/// past QEMU's limits.
pub(crate) async fn read(file: &Child, h: &Header) -> io::Result<Vec<Entry>> {
    if h.autoclear & autoclear::BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let Some(ext) = h.extension(EXT_BITMAPS) else {
        return Ok(Vec::new());
    };
    if ext.len() < 24 {
        return Err(invalid());
    }
    let nb = be32(ext, 0);
    let size = get_be64(ext, 1);
    let offset = get_be64(ext, 2);
    if nb > MAX_BITMAPS || size > MAX_DIRECTORY || offset % h.cluster_size() != 0 {
        return Err(invalid());
    }
    let dir = read_at(file, offset, size as usize).await?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while out.len() < nb as usize {
        if at + 24 > dir.len() {
            return Err(invalid());
        }
        let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
        let extra = be32(&dir, at + 20) as usize;
        let len = (24 + extra + name_size).next_multiple_of(8);
        if name_size == 0 || name_size > MAX_NAME || at + len > dir.len() {
            return Err(invalid());
        }
        let name_at = at + 24 + extra;
        out.push(Entry {
            table_offset: get_be64(&dir[at..], 0),
            table_size: be32(&dir, at + 8),
            flags: be32(&dir, at + 12),
            granularity_bits: dir[at + 17],
            name: String::from_utf8_lossy(&dir[name_at..name_at + name_size]).into_owned(),
            raw: dir[at..at + len].to_vec(),
        });
        at += len;
    }
    Ok(out)
}

pub(crate) fn invalid() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "invalid bitmap directory")
}

/// Most entries a bitmap table may have (QEMU: `BME_MAX_TABLE_SIZE`).
const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;

/// An entry's bitmap table: the host offsets of its data clusters (0: all zero or all
/// one, by bit 0), refused past QEMU's size limit.
///
/// # Errors
/// A table bigger than QEMU allows, or the file failing.
pub(crate) async fn read_table(file: &Child, e: &Entry) -> io::Result<Vec<u64>> {
    if e.table_size > MAX_TABLE_ENTRIES {
        return Err(invalid());
    }
    let raw = read_at(file, e.table_offset, e.table_size as usize * 8).await?;
    Ok((0..e.table_size as usize)
        .map(|k| get_be64(&raw, k))
        .collect())
}
