//! `bochs`: Bochs growing disk images (QEMU: block/bochs.c), read-only as in QEMU. A
//! 512-byte header, a catalog of one little-endian `u32` per extent of the disk saying
//! where its area is (or `0xffffffff`: never written), and the areas: each a bitmap of
//! which of the extent's sectors were written, then the sectors.
//!
//! Unlike QEMU, which reads a bitmap byte from the file for every sector, a request reads
//! the bitmap of each extent it touches once, and each run of written sectors in one read.

use crate::blockmap;
use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver};
use ferrite_block::io::pool;
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use std::cell::Cell;
use std::io;
use std::rc::Rc;

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 512;
const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const TYPE_REDOLOG: &[u8] = b"Redolog";
const SUBTYPE_GROWING: &[u8] = b"Growing";
const VERSION: u32 = 0x0002_0000;
const VERSION_1: u32 = 0x0001_0000;
/// The most catalog entries QEMU reads (bximage's largest image, about 8 TB).
const MAX_CATALOG: u32 = 0x10_0000;
const MAX_EXTENT: u32 = 0x80_0000;
const UNALLOCATED: u32 = 0xffff_ffff;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The C string at `at` of the header is `want` (as QEMU's `strcmp` of its fields, which
/// reads on into the next field when one has no NUL).
fn is_cstr(h: &[u8], at: usize, want: &[u8]) -> bool {
    let rest = &h[at..];
    rest.iter()
        .position(|&b| b == 0)
        .is_some_and(|end| &rest[..end] == want)
}

/// The `bochs` driver's factory.
pub(crate) struct BochsFactory;

impl DriverFactory for BochsFactory {
    fn name(&self) -> &'static str {
        "bochs"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= HEADER_LEN && header_matches(head)
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = blockmap::open_read_only_file(ctx).await?;
            Ok(Box::new(Bochs::open(file).await?) as Box<dyn Driver>)
        })
    }
}

fn header_matches(h: &[u8]) -> bool {
    let version = le32(h, 64);
    is_cstr(h, 0, MAGIC)
        && is_cstr(h, 32, TYPE_REDOLOG)
        && is_cstr(h, 48, SUBTYPE_GROWING)
        && (version == VERSION || version == VERSION_1)
}

/// A node of the `bochs` driver.
struct Bochs {
    file: Rc<Child>,
    size: u64,
    catalog: Vec<u32>,
    data_offset: u64,
    /// Sectors of an extent's bitmap, and of its data.
    bitmap_sectors: u64,
    extent_sectors: u64,
    extent: u64,
    read_only: Cell<bool>,
}

impl Bochs {
    /// QEMU's checks of the header, in its order and words, then the catalog.
    async fn open(file: Rc<Child>) -> ferrite_block::Result<Bochs> {
        let failed = |e: io::Error| generic(ferrite_qapi::os_msg(&e));
        let h = file.read(0, HEADER_LEN).await.map_err(failed)?;
        let h = &h[..];
        if !header_matches(h) {
            return Err(generic("Image not in Bochs format"));
        }
        let disk = if le32(h, 64) == VERSION_1 {
            le64(h, 84)
        } else {
            le64(h, 88)
        };
        let sectors = disk / SECTOR;
        let catalog = le32(h, 72);
        if catalog > MAX_CATALOG {
            return Err(generic("Catalog size is too large"));
        }
        // QEMU's 32-bit arithmetic: a bitmap or extent size of 0 wraps.
        let blocks = |n: u32| 1 + u64::from(n.wrapping_sub(1) / 512);
        let extent = le32(h, 80);
        if u64::from(extent) < SECTOR {
            return Err(generic("Extent size must be at least 512"));
        }
        if !extent.is_power_of_two() {
            return Err(generic(format!(
                "Extent size {extent} is not a power of two"
            )));
        }
        if extent > MAX_EXTENT {
            return Err(generic(format!("Extent size {extent} is too large")));
        }
        if u64::from(catalog) < sectors.div_ceil(u64::from(extent) / SECTOR) {
            return Err(generic("Catalog size is too small for this disk size"));
        }
        let at = u64::from(le32(h, 68));
        let bytes = file.read(at, catalog as usize * 4).await.map_err(failed)?;
        Ok(Bochs {
            file,
            size: sectors * SECTOR,
            catalog: bytes.chunks_exact(4).map(|c| le32(c, 0)).collect(),
            data_offset: u64::from(le32(h, 68)) + u64::from(catalog) * 4,
            bitmap_sectors: blocks(le32(h, 76)),
            extent_sectors: blocks(extent),
            extent: extent.into(),
            read_only: Cell::new(true),
        })
    }

    /// Where extent `e`'s area (its bitmap, then its sectors) starts, if it has one.
    fn area(&self, e: u64) -> Option<u64> {
        let entry = *self.catalog.get(e as usize)?;
        // Saturating where QEMU's 64-bit arithmetic would wrap (a damaged catalog).
        let span = SECTOR.saturating_mul(self.extent_sectors + self.bitmap_sectors);
        (entry != UNALLOCATED).then(|| {
            self.data_offset
                .saturating_add(span.saturating_mul(u64::from(entry)))
        })
    }

    /// `len` bytes at `offset` (whole sectors), written sectors from the file, the rest
    /// zeroes.
    async fn read_impl(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = pool::take(len);
        out.fill(0);
        for (e, inner, n) in blockmap::pieces(offset, len as u64, self.extent) {
            let Some(area) = self.area(e) else {
                continue;
            };
            let (first, count) = (inner / SECTOR, n / SECTOR);
            let bits = self
                .file
                .read(
                    area.saturating_add(first / 8),
                    ((first + count).div_ceil(8) - first / 8) as usize,
                )
                .await?;
            let written = |s: u64| {
                let bit = s - first / 8 * 8;
                bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0
            };
            let base = (e * self.extent + inner - offset) as usize;
            let mut s = first;
            while s < first + count {
                if !written(s) {
                    s += 1;
                    continue;
                }
                let run = (s..first + count).take_while(|&t| written(t)).count() as u64;
                let at = area.saturating_add(SECTOR * (self.bitmap_sectors + s));
                let data = self.file.read(at, (run * SECTOR) as usize).await?;
                let to = base + ((s - first) * SECTOR) as usize;
                out[to..to + data.len()].copy_from_slice(&data);
                pool::give(data);
                s += run;
            }
        }
        Ok(out)
    }
}

impl Driver for Bochs {
    blockmap::read_only_format_answers!("bochs");

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.read_impl(offset, len))
    }
}
