//! `vpc`: Virtual PC / Hyper-V disk images, VHD (QEMU: block/vpc.c). Every image ends in a
//! 512-byte big-endian footer (`conectix`): a fixed image is its data then the footer; a
//! dynamic one has a copy of the footer first, a dynamic disk header (`cxsparse`) naming a
//! block allocation table (one `u32` per block: the sector where the block's sector bitmap
//! starts, the block's data right after it, or all ones for a block never written), the
//! blocks in the order they were first written, and the footer after the last one.
//!
//! The disk's size comes from the footer's CHS geometry for images Virtual PC or QEMU
//! made (`vpc `, `qemu`), else from its `current_size` (Hyper-V, Azure, QEMU with
//! `force-size`), as QEMU decides. As under QEMU: no resize, no discard (a no-op),
//! zeroes written as data, no differencing images; a written block's bitmap says every
//! sector is present, and reads ignore the bitmap.

use crate::blockmap::{self, block_mapped_driver, blocker};
use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::{
    BlockBackend, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx,
};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io;
use std::rc::Rc;

const SECTOR: u64 = 512;
const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const FIXED: u32 = 2;
const DYNAMIC: u32 = 3;
/// A block allocation table entry for a block never written.
const UNALLOCATED: u32 = 0xffff_ffff;
/// The largest disk, in sectors (2040 GiB).
const MAX_SECTORS: u64 = 0xff00_0000;
const CHS_MAX_C: u64 = 65535;
const CHS_MAX_H: u64 = 16;
const CHS_MAX_S: u64 = 255;
const MAX_GEOMETRY: u64 = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
/// Seconds from the Unix epoch to 2000-01-01, where VHD time starts.
const TIMESTAMP_BASE: u64 = 946_684_800;
/// The block size of images ferrite (like QEMU) makes.
const NEW_BLOCK_SIZE: u64 = 2 << 20;

/// Footer fields: byte offsets (big-endian).
mod at {
    pub(super) const FEATURES: usize = 8;
    pub(super) const VERSION: usize = 12;
    pub(super) const DATA_OFFSET: usize = 16;
    pub(super) const TIMESTAMP: usize = 24;
    pub(super) const CREATOR_APP: usize = 28;
    pub(super) const MAJOR: usize = 32;
    pub(super) const MINOR: usize = 34;
    pub(super) const CREATOR_OS: usize = 36;
    pub(super) const ORIG_SIZE: usize = 40;
    pub(super) const CURRENT_SIZE: usize = 48;
    pub(super) const CYLS: usize = 56;
    pub(super) const HEADS: usize = 58;
    pub(super) const SECS: usize = 59;
    pub(super) const TYPE: usize = 60;
    pub(super) const CHECKSUM: usize = 64;
    pub(super) const UUID: usize = 68;
    /// Dynamic disk header fields.
    pub(super) const DYN_DATA_OFFSET: usize = 8;
    pub(super) const DYN_TABLE_OFFSET: usize = 16;
    pub(super) const DYN_VERSION: usize = 24;
    pub(super) const DYN_MAX_ENTRIES: usize = 28;
    pub(super) const DYN_BLOCK_SIZE: usize = 32;
    pub(super) const DYN_CHECKSUM: usize = 36;
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    (u64::from(be32(b, off)) << 32) | u64::from(be32(b, off + 4))
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// VHD's checksum: the one's complement of the sum of the bytes (the checksum field's
/// own bytes taken as zero).
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// The `vpc` driver's factory.
pub(crate) struct VpcFactory;

impl DriverFactory for VpcFactory {
    fn name(&self) -> &'static str {
        "vpc"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(b"conectix")
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create(graph, opts))
    }

    /// By name, QEMU rounds the size up to a sector, then (without `force_size`) up to
    /// the size its CHS geometry stands for.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        let size = opts.get("size").and_then(QObject::as_u64).unwrap_or(0);
        let size = size.next_multiple_of(SECTOR);
        let force = opts.get("force-size").and_then(QObject::as_bool) == Some(true);
        let size = if force {
            size
        } else {
            new_geometry(size, false)?.1 * SECTOR
        };
        opts.insert("size", size);
        Ok(opts)
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let (file, read_only) = blockmap::open_file(ctx).await?;
            let footer = find_footer(&file).await?;
            let sectors = disk_sectors(&footer);
            if sectors > MAX_SECTORS {
                // QEMU's words for a driver failing with EFBIG, named after the file.
                return Err(generic(format!(
                    "Could not open '{}': File too large",
                    file.node().filename()
                )));
            }
            let layout = if be32(&footer, at::TYPE) == FIXED {
                None
            } else {
                Some(Dynamic::open(&file, &footer, sectors).await?)
            };
            Ok(Box::new(Vpc {
                file,
                size: sectors * SECTOR,
                footer,
                layout,
                read_only: Cell::new(read_only),
                blocker: blocker("vpc", ctx.node_name()),
            }) as Box<dyn Driver>)
        })
    }
}

/// The footer: at the start of a dynamic image, else at the end of a fixed one; its
/// checksum checked.
async fn find_footer(file: &Child) -> ferrite_block::Result<Vec<u8>> {
    let io = |_| generic("Unable to read VHD header");
    let mut footer = file.read(0, FOOTER_LEN).await.map_err(io)?;
    if !footer.starts_with(b"conectix") {
        let len = file.len();
        if len < FOOTER_LEN as u64 {
            return Err(generic("File too small for a VHD header"));
        }
        footer = file
            .read(len - FOOTER_LEN as u64, FOOTER_LEN)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        if !footer.starts_with(b"conectix") || be32(&footer, at::TYPE) != FIXED {
            return Err(generic("invalid VPC image"));
        }
    }
    if checksum(&footer, at::CHECKSUM) != be32(&footer, at::CHECKSUM) {
        return Err(generic("Incorrect header checksum"));
    }
    Ok(footer)
}

/// The disk's size in sectors, as QEMU reads it: the CHS geometry for images Virtual PC or
/// QEMU made, unless it is the largest geometry (which stands for "see current_size");
/// the footer's `current_size` for the rest.
fn disk_sectors(footer: &[u8]) -> u64 {
    let chs = u64::from(be16(footer, at::CYLS))
        * u64::from(footer[at::HEADS])
        * u64::from(footer[at::SECS]);
    let app = &footer[at::CREATOR_APP..at::CREATOR_APP + 4];
    let use_chs = app == b"vpc " || app == b"qemu";
    if !use_chs || chs == MAX_GEOMETRY {
        be64(footer, at::CURRENT_SIZE) / SECTOR
    } else {
        chs
    }
}

/// A dynamic image's block allocation table and where the next block goes.
struct Dynamic {
    block_size: u64,
    bitmap_size: u64,
    bat_offset: u64,
    /// Entries the file holds; entries past its end read as 0, as QEMU reads them.
    bat: RefCell<Vec<u32>>,
    max_entries: u64,
    /// Where the next block's bitmap goes: the footer sits there now.
    free: Cell<u64>,
    /// Blocks whose bitmap this node has set to all present (QEMU rewrites a block's
    /// bitmap before the first write to it, so other readers see the sectors).
    bitmap_full: RefCell<HashSet<u64>>,
    /// Allocations and bitmap writes, one at a time.
    lock: tokio::sync::Mutex<()>,
}

impl Dynamic {
    async fn open(file: &Child, footer: &[u8], sectors: u64) -> ferrite_block::Result<Dynamic> {
        // Offsets past what a request can name fail to read, as under QEMU.
        let readable = |at: u64| at <= i64::MAX as u64;
        let at_header = be64(footer, at::DATA_OFFSET);
        if !readable(at_header) {
            return Err(generic("Error reading dynamic VHD header"));
        }
        let h = file
            .read(at_header, DYN_HEADER_LEN)
            .await
            .map_err(|_| generic("Error reading dynamic VHD header"))?;
        if !h.starts_with(b"cxsparse") {
            return Err(generic("Invalid header magic"));
        }
        let block_size = be32(&h, at::DYN_BLOCK_SIZE);
        if !block_size.is_power_of_two() || u64::from(block_size) < SECTOR {
            return Err(generic(format!("Invalid block size {block_size}")));
        }
        let block_size = u64::from(block_size);
        let bitmap_size = (block_size / (8 * SECTOR)).next_multiple_of(SECTOR);
        // QEMU keeps the count as a C int: a "negative" one passes the size check as a
        // huge unsigned number, and is then too large.
        let signed = be32(&h, at::DYN_MAX_ENTRIES) as i32;
        if sectors * SECTOR / block_size > u64::from(u32::MAX) {
            return Err(generic("Too many blocks"));
        }
        if (i64::from(signed) as u64).wrapping_mul(block_size) < sectors * SECTOR {
            return Err(generic("Page table too small"));
        }
        let Some(max_entries) = u64::try_from(signed)
            .ok()
            .filter(|&n| n <= (i32::MAX / 4) as u64)
        else {
            return Err(generic(format!("Max Table Entries too large ({signed})")));
        };
        let bat_offset = be64(&h, at::DYN_TABLE_OFFSET);
        if !readable(bat_offset) {
            return Err(generic("Error reading pagetable"));
        }
        let in_file = file.len().saturating_sub(bat_offset) / 4;
        let n = max_entries.min(in_file);
        let bytes = file
            .read(bat_offset, (n * 4) as usize)
            .await
            .map_err(|_| generic("Error reading pagetable"))?;
        let bat: Vec<u32> = bytes.chunks_exact(4).map(|c| be32(c, 0)).collect();
        // Within i64 with the table (at most 2 GiB) after a readable offset: no overflow.
        let mut free = (bat_offset + max_entries * 4).next_multiple_of(SECTOR);
        let mut block_end = |entry: u32| {
            if entry != UNALLOCATED {
                free = free.max(u64::from(entry) * SECTOR + bitmap_size + block_size);
            }
        };
        bat.iter().for_each(|&e| block_end(e));
        if n < max_entries {
            block_end(0);
        }
        if free > file.len() {
            return Err(generic(
                "block-vpc: free_data_block_offset points after the end of file. The image \
                 has been truncated.",
            ));
        }
        Ok(Dynamic {
            block_size,
            bitmap_size,
            bat_offset,
            bat: RefCell::new(bat),
            max_entries,
            free: Cell::new(free),
            bitmap_full: RefCell::new(HashSet::new()),
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn entry(&self, block: u64) -> u32 {
        if block >= self.max_entries {
            return UNALLOCATED;
        }
        self.bat.borrow().get(block as usize).copied().unwrap_or(0)
    }

    fn set_entry(&self, block: u64, v: u32) {
        let mut bat = self.bat.borrow_mut();
        let i = block as usize;
        if i >= bat.len() {
            bat.resize(i + 1, 0);
        }
        bat[i] = v;
    }

    /// Where block `block`'s data starts in the file, if it has a place.
    fn data_at(&self, block: u64) -> Option<u64> {
        let e = self.entry(block);
        (e != UNALLOCATED).then(|| u64::from(e) * SECTOR + self.bitmap_size)
    }

    /// Block `block`'s data offset for a write: a new block gets its place at the end of
    /// the file (bitmap, then the footer moved past the block, then its table entry, each
    /// durable before the next, as QEMU orders them); a block first written by this node
    /// gets its bitmap set to all present.
    async fn place_for_write(&self, file: &Child, footer: &[u8], block: u64) -> io::Result<u64> {
        if let Some(at) = self.data_at(block)
            && self.bitmap_full.borrow().contains(&block)
        {
            return Ok(at);
        }
        let _one = self.lock.lock().await;
        let full_bitmap = || vec![0xffu8; self.bitmap_size as usize];
        if let Some(at) = self.data_at(block) {
            if !self.bitmap_full.borrow().contains(&block) {
                file.write(at - self.bitmap_size, full_bitmap(), ReqFlags::empty())
                    .await?;
                file.flush().await?;
                self.bitmap_full.borrow_mut().insert(block);
            }
            return Ok(at);
        }
        let start = self.free.get();
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        file.write(start, full_bitmap(), ReqFlags::empty()).await?;
        file.flush().await?;
        let next = start + self.bitmap_size + self.block_size;
        file.write(next, footer.to_vec(), ReqFlags::empty()).await?;
        file.flush().await?;
        self.free.set(next);
        file.write(
            self.bat_offset + 4 * block,
            sector.to_be_bytes().to_vec(),
            ReqFlags::empty(),
        )
        .await?;
        file.flush().await?;
        self.set_entry(block, sector);
        self.bitmap_full.borrow_mut().insert(block);
        Ok(start + self.bitmap_size)
    }
}

struct Vpc {
    file: Rc<Child>,
    size: u64,
    footer: Vec<u8>,
    /// A dynamic image's table; none for a fixed one (its data is the file's start).
    layout: Option<Dynamic>,
    read_only: Cell<bool>,
    /// QEMU's migration blocker, named after the node as it opened.
    blocker: String,
}

impl Vpc {
    async fn write_impl(&self, offset: u64, data: &[u8], flags: ReqFlags) -> io::Result<()> {
        let Some(d) = &self.layout else {
            return self.file.write(offset, pool::copy_of(data), flags).await;
        };
        let mut done = 0usize;
        for (block, inner, n) in blockmap::pieces(offset, data.len() as u64, d.block_size) {
            let at = d.place_for_write(&self.file, &self.footer, block).await?;
            let piece = pool::copy_of(&data[done..done + n as usize]);
            self.file.write(at + inner, piece, flags).await?;
            done += n as usize;
        }
        Ok(())
    }
}

impl Driver for Vpc {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    ferrite_block::forward_to_child!(self.file; flush);
    block_mapped_driver!("vpc");

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            match &self.layout {
                None => self.file.read(offset, len).await,
                Some(d) => {
                    blockmap::read(&self.file, offset, len, d.block_size, |b| d.data_at(b)).await
                }
            }
        })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let Some(d) = &self.layout else {
                return Extent::placed(&self.file, offset, len).await;
            };
            let mut n = 0;
            for (block, _, piece) in blockmap::pieces(offset, len, d.block_size) {
                let placed = d.data_at(block).is_some();
                if placed && n == 0 {
                    // One block at most: its bitmap separates it from the next.
                    return Ok(Extent::data(piece));
                }
                if placed {
                    break;
                }
                n += piece;
            }
            Ok(blockmap::unplaced(n))
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        self.layout.as_ref().map(|d| d.block_size)
    }
}

/// The CHS geometry VHD's specification gives `sectors` (rounding down): (cylinders,
/// heads, sectors per track).
fn geometry(sectors: u64) -> (u64, u64, u64) {
    let sectors = sectors.min(MAX_GEOMETRY);
    let (spt, heads, cth) = if sectors >= 65535 * 16 * 63 {
        (255, 16, sectors / 255)
    } else {
        let mut spt = 17;
        let mut cth = sectors / spt;
        let mut heads = cth.div_ceil(1024).max(4);
        if cth >= heads * 1024 || heads > 16 {
            spt = 31;
            heads = 16;
            cth = sectors / spt;
        }
        if cth >= heads * 1024 {
            spt = 63;
            heads = 16;
            cth = sectors / spt;
        }
        (spt, heads, cth)
    };
    (cth / heads, heads, spt)
}

/// The geometry for a new image of `size` bytes and the size in sectors it stands for
/// (QEMU grows the sector count until the geometry covers it; with `force_size`, or past
/// what CHS can say, the largest geometry and the size itself).
fn new_geometry(size: u64, force_size: bool) -> ferrite_block::Result<((u64, u64, u64), u64)> {
    let chs = if force_size {
        (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
    } else {
        let want = MAX_GEOMETRY.min(size / SECTOR);
        let mut chs = (0, 0, 0);
        let mut i = 0;
        while want > chs.0 * chs.1 * chs.2 {
            chs = geometry(want + i);
            i += 1;
        }
        chs
    };
    let sectors = if chs.0 * chs.1 * chs.2 == MAX_GEOMETRY {
        let s = size / SECTOR;
        if s > MAX_SECTORS {
            return Err(generic("Disk size is too large, max size is 2040 GiB"));
        }
        s
    } else {
        chs.0 * chs.1 * chs.2
    };
    Ok((chs, sectors))
}

/// `blockdev-create` of a VHD image (`BlockdevCreateOptionsVpc`).
async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    let fixed = opts.opt_str("subformat") == Some("fixed");
    let force_size = opts.opt_bool("force-size").unwrap_or(false);
    blockmap::create_on_file(graph, opts, async |blk| {
        write_new_image(&blk, size, fixed, force_size).await
    })
    .await
}

async fn write_new_image(
    blk: &BlockBackend,
    size: u64,
    fixed: bool,
    force_size: bool,
) -> ferrite_block::Result<()> {
    let ((c, h, s), sectors) = new_geometry(size, force_size)?;
    if size != sectors * SECTOR {
        return Err(generic(
            "The requested image size cannot be represented in CHS geometry",
        ));
    }
    let mut f = vec![0u8; FOOTER_LEN];
    put(&mut f, 0, b"conectix");
    put(
        &mut f,
        at::CREATOR_APP,
        if force_size { b"qem2" } else { b"qemu" },
    );
    put(&mut f, at::CREATOR_OS, b"Wi2k");
    put(&mut f, at::FEATURES, &2u32.to_be_bytes());
    put(&mut f, at::VERSION, &0x0001_0000u32.to_be_bytes());
    let data_offset = if fixed { u64::MAX } else { FOOTER_LEN as u64 };
    put(&mut f, at::DATA_OFFSET, &data_offset.to_be_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    put(
        &mut f,
        at::TIMESTAMP,
        &(now.saturating_sub(TIMESTAMP_BASE) as u32).to_be_bytes(),
    );
    // Virtual PC 2007.
    put(&mut f, at::MAJOR, &5u16.to_be_bytes());
    put(&mut f, at::MINOR, &3u16.to_be_bytes());
    put(&mut f, at::ORIG_SIZE, &size.to_be_bytes());
    put(&mut f, at::CURRENT_SIZE, &size.to_be_bytes());
    put(&mut f, at::CYLS, &(c as u16).to_be_bytes());
    f[at::HEADS] = h as u8;
    f[at::SECS] = s as u8;
    put(
        &mut f,
        at::TYPE,
        &(if fixed { FIXED } else { DYNAMIC }).to_be_bytes(),
    );
    let uuid = ferrite_crypto::random_uuid().map_err(|e| generic(e.to_string()))?;
    put(&mut f, at::UUID, &uuid);
    let sum = checksum(&f, at::CHECKSUM);
    put(&mut f, at::CHECKSUM, &sum.to_be_bytes());
    if fixed {
        let total = size + FOOTER_LEN as u64;
        blk.truncate(total).await.map_err(|e| {
            generic(format!(
                "Could not resize file: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
        return blk.write(size, f, ReqFlags::empty()).await.map_err(|e| {
            generic(format!(
                "Unable to write VHD header: {}",
                ferrite_qapi::os_msg(&e)
            ))
        });
    }
    let failed = |_| generic("Unable to create or write VHD header");
    let entries = sectors.div_ceil(NEW_BLOCK_SIZE / SECTOR);
    let bat_len = (entries * 4).next_multiple_of(SECTOR);
    let bat_at = 3 * SECTOR;
    blk.write(0, f.clone(), ReqFlags::empty())
        .await
        .map_err(failed)?;
    blk.write(bat_at + bat_len, f, ReqFlags::empty())
        .await
        .map_err(failed)?;
    if bat_len > 0 {
        blk.write(bat_at, vec![0xff; bat_len as usize], ReqFlags::empty())
            .await
            .map_err(failed)?;
    }
    let mut d = vec![0u8; DYN_HEADER_LEN];
    put(&mut d, 0, b"cxsparse");
    // The specification says 0xFFFFFFFF; Microsoft's tools want all 64 bits set.
    put(&mut d, at::DYN_DATA_OFFSET, &u64::MAX.to_be_bytes());
    put(&mut d, at::DYN_TABLE_OFFSET, &bat_at.to_be_bytes());
    put(&mut d, at::DYN_VERSION, &0x0001_0000u32.to_be_bytes());
    put(
        &mut d,
        at::DYN_BLOCK_SIZE,
        &(NEW_BLOCK_SIZE as u32).to_be_bytes(),
    );
    put(&mut d, at::DYN_MAX_ENTRIES, &(entries as u32).to_be_bytes());
    let sum = checksum(&d, at::DYN_CHECKSUM);
    put(&mut d, at::DYN_CHECKSUM, &sum.to_be_bytes());
    blk.write(FOOTER_LEN as u64, d, ReqFlags::empty())
        .await
        .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_specification() {
        // Sizes qemu-img rounds to, with the geometry it writes (qemu-img info / the
        // footer of images it made).
        assert_eq!(
            new_geometry(10 << 20, false).unwrap(),
            ((302, 4, 17), 20536)
        );
        assert_eq!(geometry(4 * 17 * 1000), (1000, 4, 17));
        assert_eq!(geometry(MAX_GEOMETRY + 5), (65535, 16, 255));
        assert!(new_geometry(3 << 40, false).is_err());
        assert_eq!(new_geometry(3 << 40, true).ok(), None);
        assert_eq!(new_geometry(1 << 40, true).unwrap().1, 1 << 31);
    }

    #[test]
    fn checksum_leaves_its_own_field_out() {
        let mut f = vec![1u8; 512];
        let sum = checksum(&f, at::CHECKSUM);
        f[at::CHECKSUM] = 0xaa;
        assert_eq!(checksum(&f, at::CHECKSUM), sum);
        assert_eq!(sum, !(508u32));
    }
}
