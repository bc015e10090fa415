//! `vdi`: VirtualBox disk images (QEMU: block/vdi.c). A 512-byte header, then a block map
//! with one little-endian `u32` per 1 MiB block of the disk: where in the data area the
//! block lives (its index there), or that it was never written or was discarded (both read
//! as zeroes). Blocks take their place in the data area in the order they are first
//! written, each written whole. A static image (`preallocation=metadata`) maps every block
//! when it is made.
//!
//! As under QEMU: no resize, no discard (a no-op), zeroes written as data, no backing file.
//! Unlike QEMU, a block being allocated holds only that block: writes elsewhere go on.

use crate::blockmap::{self, block_mapped_driver, blocker};
use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::units::UnitLocks;
use ferrite_block::{
    BlockBackend, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx,
};
use ferrite_qapi::Args;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

const SECTOR: u64 = 512;
/// The one block size QEMU (and so ferrite) supports.
const BLOCK: u64 = 1 << 20;
const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
const TYPE_DYNAMIC: u32 = 1;
const TYPE_STATIC: u32 = 2;
/// A block map entry for a block never written...
const UNALLOCATED: u32 = 0xffff_ffff;
/// ...and for one discarded; entries below this one place the block.
const DISCARDED: u32 = 0xffff_fffe;
/// The most blocks: the block map, rounded up to a sector, stays within 2 GiB (QEMU reads
/// it in one request).
const MAX_BLOCKS: u64 = ((1 << 31) - SECTOR) / 4;
const MAX_DISK_SIZE: u64 = MAX_BLOCKS * BLOCK;
/// The text at the start of images ferrite (like QEMU) makes; VirtualBox writes its own,
/// and nothing reads it.
const TEXT: &[u8] = b"<<< QEMU VM Virtual Disk Image >>>\n";
/// Entries in a sector of the block map.
const PER_SECTOR: u64 = SECTOR / 4;

/// Header fields: byte offsets in the 512-byte header (all little-endian).
mod at {
    pub(super) const SIGNATURE: usize = 0x40;
    pub(super) const VERSION: usize = 0x44;
    pub(super) const HEADER_SIZE: usize = 0x48;
    pub(super) const IMAGE_TYPE: usize = 0x4c;
    pub(super) const OFFSET_BMAP: usize = 0x154;
    pub(super) const OFFSET_DATA: usize = 0x158;
    pub(super) const SECTOR_SIZE: usize = 0x168;
    pub(super) const DISK_SIZE: usize = 0x170;
    pub(super) const BLOCK_SIZE: usize = 0x178;
    pub(super) const BLOCKS_IN_IMAGE: usize = 0x180;
    pub(super) const BLOCKS_ALLOCATED: usize = 0x184;
    pub(super) const UUID_IMAGE: usize = 0x188;
    pub(super) const UUID_LAST_SNAP: usize = 0x198;
    pub(super) const UUID_LINK: usize = 0x1a8;
    pub(super) const UUID_PARENT: usize = 0x1b8;
}

fn le32(h: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]])
}

fn le64(h: &[u8], off: usize) -> u64 {
    u64::from(le32(h, off)) | (u64::from(le32(h, off + 4)) << 32)
}

fn put32(h: &mut [u8], off: usize, v: u32) {
    h[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(h: &mut [u8], off: usize, v: u64) {
    h[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The `vdi` driver's factory.
pub(crate) struct VdiFactory;

impl DriverFactory for VdiFactory {
    fn name(&self) -> &'static str {
        "vdi"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= SECTOR as usize && le32(head, at::SIGNATURE) == SIGNATURE
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create(graph, opts))
    }

    fn formatting_options(&self, size: u64, _backing: Option<(&str, &str)>) -> String {
        format!("size={size} static=off")
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let (file, read_only) = blockmap::open_file(ctx).await?;
            let mut header = file
                .read(0, SECTOR as usize)
                .await
                .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
            let geometry = check_header(&mut header)?;
            let map = Bmap::read(&file, &header, geometry.blocks_used).await?;
            Ok(Box::new(Vdi {
                file,
                size: geometry.size,
                offset_bmap: u64::from(le32(&header, at::OFFSET_BMAP)),
                offset_data: u64::from(le32(&header, at::OFFSET_DATA)),
                is_static: le32(&header, at::IMAGE_TYPE) == TYPE_STATIC,
                header: RefCell::new(header),
                map,
                allocating: UnitLocks::default(),
                metadata: tokio::sync::Mutex::new(()),
                read_only: Cell::new(read_only),
                blocker: blocker("vdi", ctx.node_name()),
            }) as Box<dyn Driver>)
        })
    }
}

/// What a good header says about the disk.
struct Geometry {
    /// The disk's size (a whole number of sectors).
    size: u64,
    /// Blocks that hold some of it.
    blocks_used: u64,
}

/// QEMU's checks of a header, in its order and words. An odd disk size is rounded up to a
/// whole sector, in `h` too, as QEMU keeps it (and writes it back with the next
/// allocation).
fn check_header(h: &mut [u8]) -> ferrite_block::Result<Geometry> {
    let disk_size = le64(h, at::DISK_SIZE);
    if disk_size > MAX_DISK_SIZE {
        return Err(generic(format!(
            "Unsupported VDI image size (size is {disk_size:#x}, max supported is \
             {MAX_DISK_SIZE:#x})"
        )));
    }
    let size = disk_size.next_multiple_of(SECTOR);
    put64(h, at::DISK_SIZE, size);
    let signature = le32(h, at::SIGNATURE);
    let version = le32(h, at::VERSION);
    let (offset_bmap, offset_data) = (le32(h, at::OFFSET_BMAP), le32(h, at::OFFSET_DATA));
    let sector_size = le32(h, at::SECTOR_SIZE);
    let block_size = le32(h, at::BLOCK_SIZE);
    let blocks = u64::from(le32(h, at::BLOCKS_IN_IMAGE));
    let unsupported = |what: String| Err(generic(format!("unsupported VDI image ({what})")));
    if signature != SIGNATURE {
        return Err(generic(format!(
            "Image not in VDI format (bad signature {signature:08x})"
        )));
    }
    if version != VERSION_1_1 {
        return unsupported(format!("version {}.{}", version >> 16, version & 0xffff));
    }
    if u64::from(offset_bmap) % SECTOR != 0 {
        return unsupported(format!("unaligned block map offset {offset_bmap:#x}"));
    }
    if u64::from(offset_data) % SECTOR != 0 {
        return unsupported(format!("unaligned data offset {offset_data:#x}"));
    }
    if u64::from(sector_size) != SECTOR {
        return unsupported(format!("sector size {sector_size} is not {SECTOR}"));
    }
    if u64::from(block_size) != BLOCK {
        return unsupported(format!("block size {block_size} is not {BLOCK}"));
    }
    if size > blocks * BLOCK {
        return unsupported(format!(
            "disk size {size}, image bitmap has room for {}",
            blocks * BLOCK
        ));
    }
    let is_null = |off: usize| h[off..off + 16].iter().all(|&b| b == 0);
    if !is_null(at::UUID_LINK) {
        return unsupported("non-NULL link UUID".into());
    }
    if !is_null(at::UUID_PARENT) {
        return unsupported("non-NULL parent UUID".into());
    }
    if blocks > MAX_BLOCKS {
        return unsupported(format!("too many blocks {blocks}, max is {MAX_BLOCKS}"));
    }
    Ok(Geometry {
        size,
        blocks_used: size.div_ceil(BLOCK),
    })
}

/// The block map entries for the blocks the disk uses. Entries the file does not hold (a
/// damaged header can claim any number) read as 0, as QEMU reads them past the end of the
/// file; they take memory only once a write places them.
struct Bmap {
    entries: RefCell<Vec<u32>>,
}

impl Bmap {
    async fn read(file: &Child, h: &[u8], blocks_used: u64) -> ferrite_block::Result<Bmap> {
        let offset = u64::from(le32(h, at::OFFSET_BMAP));
        let in_file = file.len().saturating_sub(offset) / 4;
        let n = blocks_used.min(in_file);
        let bytes = file
            .read(offset, (n * 4) as usize)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        let entries = bytes.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Ok(Bmap {
            entries: RefCell::new(entries),
        })
    }

    fn get(&self, block: u64) -> u32 {
        self.entries
            .borrow()
            .get(block as usize)
            .copied()
            .unwrap_or(0)
    }

    fn set(&self, block: u64, v: u32) {
        let mut e = self.entries.borrow_mut();
        let i = block as usize;
        if i >= e.len() {
            e.resize(i + 1, 0);
        }
        e[i] = v;
    }

    /// The block map's sectors `first..=last` as the file should hold them.
    fn sectors(&self, first: u64, last: u64) -> Vec<u8> {
        (first * PER_SECTOR..(last + 1) * PER_SECTOR)
            .flat_map(|b| self.get(b).to_le_bytes())
            .collect()
    }
}

fn is_allocated(entry: u32) -> bool {
    entry < DISCARDED
}

struct Vdi {
    file: Rc<Child>,
    size: u64,
    offset_bmap: u64,
    offset_data: u64,
    is_static: bool,
    /// The header as it goes back to the file (its count of allocated blocks changes).
    header: RefCell<Vec<u8>>,
    map: Bmap,
    /// Blocks a write is placing: another write to the same block waits, then finds it
    /// placed.
    allocating: UnitLocks,
    /// Header and block map writes, one at a time, each of the latest state.
    metadata: tokio::sync::Mutex<()>,
    read_only: Cell<bool>,
    /// QEMU's migration blocker, named after the node as it opened.
    blocker: String,
}

impl Vdi {
    /// Where block `entry`'s data starts in the file.
    fn data_at(&self, entry: u32) -> u64 {
        self.offset_data + u64::from(entry) * BLOCK
    }

    /// Writes `data` into block `block` at `inner`, placing the block first if it has no
    /// place yet: then it is written whole, zeroes around the data. Returns whether it
    /// placed the block.
    async fn write_piece(
        &self,
        block: u64,
        inner: u64,
        data: &[u8],
        flags: ReqFlags,
    ) -> io::Result<bool> {
        let mut entry = self.map.get(block);
        if !is_allocated(entry) {
            let _claim = self.allocating.claim(block, block + 1).await;
            entry = self.map.get(block);
            if !is_allocated(entry) {
                let new = {
                    let mut h = self.header.borrow_mut();
                    let n = le32(&h, at::BLOCKS_ALLOCATED);
                    put32(&mut h, at::BLOCKS_ALLOCATED, n.wrapping_add(1));
                    n
                };
                if !is_allocated(new) {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                let mut whole = pool::take(BLOCK as usize);
                whole.fill(0);
                whole[inner as usize..inner as usize + data.len()].copy_from_slice(data);
                self.file.write(self.data_at(new), whole, flags).await?;
                self.map.set(block, new);
                return Ok(true);
            }
        }
        self.file
            .write(self.data_at(entry) + inner, pool::copy_of(data), flags)
            .await
            .map(|()| false)
    }

    /// After a write placed blocks `first..=last`: the header (its count) and the block
    /// map's sectors holding them go to the file.
    async fn write_metadata(&self, first: u64, last: u64) -> io::Result<()> {
        let _one_at_a_time = self.metadata.lock().await;
        let header = self.header.borrow().clone();
        self.file.write(0, header, ReqFlags::empty()).await?;
        let (first, last) = (first / PER_SECTOR, last / PER_SECTOR);
        let sectors = self.map.sectors(first, last);
        self.file
            .write(
                self.offset_bmap + first * SECTOR,
                sectors,
                ReqFlags::empty(),
            )
            .await
    }

    async fn write_impl(&self, offset: u64, data: &[u8], flags: ReqFlags) -> io::Result<()> {
        let mut placed: Option<(u64, u64)> = None;
        let mut done = 0usize;
        let mut result = Ok(());
        for (block, inner, n) in blockmap::pieces(offset, data.len() as u64, BLOCK) {
            let piece = &data[done..done + n as usize];
            done += n as usize;
            match self.write_piece(block, inner, piece, flags).await {
                Ok(true) => placed = Some(placed.map_or((block, block), |(f, _)| (f, block))),
                Ok(false) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // What was placed before a failure still needs its map entries on disk.
        if let Some((first, last)) = placed {
            self.write_metadata(first, last).await?;
        }
        result
    }
}

impl Driver for Vdi {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    ferrite_block::forward_to_child!(self.file; flush);
    block_mapped_driver!("vdi");

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(blockmap::read(&self.file, offset, len, BLOCK, |block| {
            let entry = self.map.get(block);
            is_allocated(entry).then(|| self.data_at(entry))
        }))
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let (block, inner) = (offset / BLOCK, offset % BLOCK);
            let n = (BLOCK - inner).min(len);
            let entry = self.map.get(block);
            if !is_allocated(entry) {
                return Ok(blockmap::unplaced(n));
            }
            if !self.is_static {
                return Ok(Extent::data(n));
            }
            // A static image's blocks are all placed: the file says which read as zeroes.
            Extent::placed(&self.file, self.data_at(entry) + inner, n).await
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK)
    }
}

/// `blockdev-create` of a VDI image (`BlockdevCreateOptionsVdi`): the header and an empty
/// block map, or with `preallocation=metadata` a static image whose map places every
/// block, the file sized to hold them.
async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    let is_static = match opts.opt_str("preallocation").unwrap_or("off") {
        "off" => false,
        "metadata" => true,
        _ => return Err(generic("Preallocation mode not supported for vdi")),
    };
    if size > MAX_DISK_SIZE {
        return Err(generic(format!(
            "Unsupported VDI image size (size is {size:#x}, max supported is {MAX_DISK_SIZE:#x})"
        )));
    }
    blockmap::create_on_file(graph, opts, async |blk| {
        write_new_image(&blk, size, is_static).await
    })
    .await
}

async fn write_new_image(
    blk: &BlockBackend,
    size: u64,
    is_static: bool,
) -> ferrite_block::Result<()> {
    let blocks = size.div_ceil(BLOCK);
    let bmap_len = (blocks * 4).next_multiple_of(SECTOR);
    let mut h = vec![0u8; SECTOR as usize];
    h[..TEXT.len()].copy_from_slice(TEXT);
    put32(&mut h, at::SIGNATURE, SIGNATURE);
    put32(&mut h, at::VERSION, VERSION_1_1);
    // QEMU writes 0x180 here (VirtualBox 0x190); nothing reads it.
    put32(&mut h, at::HEADER_SIZE, 0x180);
    put32(
        &mut h,
        at::IMAGE_TYPE,
        if is_static { TYPE_STATIC } else { TYPE_DYNAMIC },
    );
    put32(&mut h, at::OFFSET_BMAP, SECTOR as u32);
    put32(&mut h, at::OFFSET_DATA, (SECTOR + bmap_len) as u32);
    put32(&mut h, at::SECTOR_SIZE, SECTOR as u32);
    put64(&mut h, at::DISK_SIZE, size);
    put32(&mut h, at::BLOCK_SIZE, BLOCK as u32);
    put32(&mut h, at::BLOCKS_IN_IMAGE, blocks as u32);
    if is_static {
        put32(&mut h, at::BLOCKS_ALLOCATED, blocks as u32);
    }
    for field in [at::UUID_IMAGE, at::UUID_LAST_SNAP] {
        h[field..field + 16].copy_from_slice(&random_uuid()?);
    }
    blk.write(0, h, ReqFlags::empty())
        .await
        .map_err(|_| generic("Error writing header"))?;
    if bmap_len > 0 {
        let mut bmap = vec![0u8; bmap_len as usize];
        for (i, e) in bmap.chunks_exact_mut(4).take(blocks as usize).enumerate() {
            let v = if is_static { i as u32 } else { UNALLOCATED };
            e.copy_from_slice(&v.to_le_bytes());
        }
        blk.write(SECTOR, bmap, ReqFlags::empty())
            .await
            .map_err(|_| generic("Error writing bmap"))?;
    }
    if is_static {
        blk.truncate(SECTOR + bmap_len + blocks * BLOCK)
            .await
            .map_err(|e| {
                generic(format!(
                    "Failed to statically allocate file{}",
                    ferrite_qapi::os_msg(&e)
                ))
            })?;
    }
    Ok(())
}

/// A random (version 4) UUID as VDI headers keep them: the first three fields
/// little-endian.
fn random_uuid() -> ferrite_block::Result<[u8; 16]> {
    let mut u = ferrite_crypto::random_uuid().map_err(|e| generic(e.to_string()))?;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(disk_size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        put32(&mut h, at::SIGNATURE, SIGNATURE);
        put32(&mut h, at::VERSION, VERSION_1_1);
        put32(&mut h, at::OFFSET_BMAP, 512);
        put32(&mut h, at::OFFSET_DATA, 1024);
        put32(&mut h, at::SECTOR_SIZE, 512);
        put32(&mut h, at::BLOCK_SIZE, BLOCK as u32);
        put64(&mut h, at::DISK_SIZE, disk_size);
        put32(
            &mut h,
            at::BLOCKS_IN_IMAGE,
            disk_size.div_ceil(BLOCK) as u32,
        );
        h
    }

    #[test]
    fn an_odd_disk_size_is_rounded_up_to_a_sector() {
        let mut h = header(1000);
        let g = check_header(&mut h).unwrap();
        assert_eq!((g.size, g.blocks_used), (1024, 1));
        assert_eq!(le64(&h, at::DISK_SIZE), 1024);
    }

    #[test]
    fn every_header_field_is_checked_without_panicking() {
        // Each byte of the header set to each of a few values: a refusal or a geometry
        // within the limits, never a panic.
        for off in 0..512 {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut h = header(5 << 20);
                h[off] = v;
                if let Ok(g) = check_header(&mut h) {
                    assert!(g.size <= MAX_DISK_SIZE && g.blocks_used <= MAX_BLOCKS);
                }
            }
        }
    }
}
