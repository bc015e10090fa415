//! `vhdx`: Hyper-V's VHDX images (QEMU: block/vhdx.c, block/vhdx-log.c). The file starts
//! with a 1 MiB header section: the `vhdxfile` identifier, two headers (the one with the
//! higher sequence number counts; each names the [`log`]), and two copies of the region
//! table, which places the BAT and the metadata region. The metadata says the block size
//! (1 to 256 MiB), the disk's size and its sector sizes; the BAT has one entry per
//! payload block (its state and where it is, in MiB) and a sector bitmap entry after
//! every chunk of them.
//!
//! As under QEMU:
//! - the first write after opening updates both headers (new data write GUID), and each
//!   new block goes to the end of the file (rounded up to 1 MiB), its BAT entry changed
//!   through the log, which is written, flushed, applied and retired at once;
//! - a log left by a crash is replayed on a writable open; a read-only open refuses it;
//! - blocks in the `ZERO`, `UNMAPPED` and `NOT_PRESENT` states read as zeroes;
//!   differencing images, partially present blocks and 4 KiB logical sectors are refused;
//! - no discard (a no-op), no zeroing of its own (zeroes are written), no resize, block
//!   status says "data" everywhere, and migration is blocked.

mod create;
mod format;
mod log;

use crate::blockmap::{self, block_mapped_driver, blocker};
use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::report::command_error_report;
use ferrite_block::{Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use format::{
    BAT_OFFSET_MASK, Guid, HEADER_CHECKED, HEADER_LEN, HEADER_OFFSETS, Header, Layout, MIB,
    REGION_TABLE_OFFSETS, SECTOR, le32, le64, state,
};
use log::Log;
use std::cell::{Cell, RefCell};
use std::io;
use std::ops::Range;
use std::rc::Rc;

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

fn random_guid() -> io::Result<Guid> {
    ferrite_crypto::random_uuid().map_err(|e| io::Error::other(e.to_string()))
}

/// The `vhdx` driver's factory.
pub(crate) struct VhdxFactory;

impl DriverFactory for VhdxFactory {
    fn name(&self) -> &'static str {
        "vhdx"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(format::SIGNATURE)
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create::create(graph, opts))
    }

    /// By name, QEMU rounds the size up to a sector and the log and block sizes up to
    /// 1 MiB (a block size of 0 meaning "choose", at most 256 MiB); there is no backing
    /// file option.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        if opts.get("backing-file").is_some() {
            return Err(generic("Backing file not supported for file format 'vhdx'"));
        }
        let size = opts.get("size").and_then(QObject::as_u64).unwrap_or(0);
        opts.insert("size", size.next_multiple_of(SECTOR));
        if let Some(log) = opts.get("log-size").and_then(QObject::as_u64) {
            opts.insert("log-size", log.next_multiple_of(MIB));
        }
        if let Some(block) = opts.get("block-size").and_then(QObject::as_u64) {
            let block = block.next_multiple_of(MIB);
            if block == 0 {
                opts.remove("block-size");
            } else {
                opts.insert("block-size", block.min(format::BLOCK_SIZE_MAX));
            }
        }
        Ok(opts)
    }

    fn formatting_options(&self, size: u64, _backing: Option<(&str, &str)>) -> String {
        format!("size={size} log_size=1048576 block_size=0")
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let (file, read_only) = blockmap::open_file(ctx).await?;
            let s = State::open(file, read_only).await?;
            Ok(Box::new(Vhdx {
                s,
                read_only: Cell::new(read_only),
                blocker: blocker("vhdx", ctx.node_name()),
            }) as Box<dyn Driver>)
        })
    }
}

/// QEMU's words for a driver failing with `e` and no message of its own, named after the
/// file.
fn could_not_open(file: &Child, e: &io::Error) -> ferrite_block::Error {
    generic(format!(
        "Could not open '{}': {}",
        file.node().filename(),
        ferrite_qapi::os_msg(e)
    ))
}

/// The two headers and which counts; updating them as QEMU does.
struct Headers {
    file: Rc<Child>,
    both: RefCell<[Header; 2]>,
    current: Cell<usize>,
    /// The file write GUID of every header this node writes.
    session: Guid,
    /// No guest-visible change has been made yet (the data write GUID changes first).
    first_visible_write: Cell<bool>,
}

impl Headers {
    /// Reads both headers (QEMU's `vhdx_parse_header`).
    async fn open(file: Rc<Child>) -> ferrite_block::Result<Headers> {
        let io = |e: io::Error| could_not_open(&file, &e);
        let mut both = [Header::default(), Header::default()];
        let mut valid = [false; 2];
        for (i, at) in HEADER_OFFSETS.iter().enumerate() {
            let b = file.read(*at, HEADER_CHECKED).await.map_err(io)?;
            both[i] = Header::parse(&b);
            valid[i] = Header::is_valid(&b);
        }
        let current = match valid {
            [true, false] => 0,
            [false, true] => 1,
            [true, true] if both[0].sequence > both[1].sequence => 0,
            [true, true] if both[1].sequence > both[0].sequence => 1,
            // Disk2VHD writes two identical headers.
            [true, true] if both[0] == both[1] => 0,
            _ => return Err(generic("No valid VHDX header found")),
        };
        Ok(Headers {
            file,
            both: RefCell::new(both),
            current: Cell::new(current),
            session: random_guid().map_err(|e| generic(e.to_string()))?,
            first_visible_write: Cell::new(true),
        })
    }

    fn current(&self) -> Header {
        self.both.borrow()[self.current.get()].clone()
    }

    /// Writes the other header as the new current one: the next sequence number, this
    /// session's file write GUID, a new data write GUID if `new_data_guid`, and `log_guid`
    /// if given (QEMU's `vhdx_update_header`).
    async fn update_one(&self, new_data_guid: bool, log_guid: Option<Guid>) -> io::Result<()> {
        let cur = self.current.get();
        let idx = 1 - cur;
        let h = {
            let mut both = self.both.borrow_mut();
            let seq = both[cur].sequence.wrapping_add(1);
            let h = &mut both[idx];
            h.sequence = seq;
            h.file_write_guid = self.session;
            if new_data_guid {
                h.data_write_guid = random_guid()?;
            }
            if let Some(g) = log_guid {
                h.log_guid = g;
            }
            h.clone()
        };
        // The checksum covers the 4 KiB as they are; only the fields are written.
        let mut block = self.file.read(HEADER_OFFSETS[idx], HEADER_CHECKED).await?;
        h.store(&mut block);
        block.truncate(HEADER_LEN);
        self.file
            .write(HEADER_OFFSETS[idx], block, ReqFlags::empty())
            .await?;
        self.file.flush().await?;
        self.current.set(idx);
        Ok(())
    }

    /// Both headers, one after the other (QEMU's `vhdx_update_headers`).
    async fn update(&self, new_data_guid: bool, log_guid: Option<Guid>) -> io::Result<()> {
        self.update_one(new_data_guid, log_guid).await?;
        self.update_one(new_data_guid, log_guid).await
    }

    /// Before the first guest-visible change: new data write GUIDs. The flag clears once
    /// the headers are written, so that writes checking it meanwhile wait for them (the
    /// caller holds the allocation lock); QEMU clears it first and does not try again
    /// after a failed update.
    async fn visible_write(&self) -> io::Result<()> {
        if self.first_visible_write.get() {
            self.update(true, None).await?;
            self.first_visible_write.set(false);
        }
        Ok(())
    }
}

/// A node's headers, log and BAT.
struct State {
    file: Rc<Child>,
    headers: Headers,
    log: Cell<Log>,
    layout: Layout,
    bat_offset: u64,
    /// The BAT entries the file holds (those past its end read as 0, not present).
    bat: RefCell<Vec<u64>>,
    /// One allocation (and its log entry) at a time, as QEMU's lock orders them.
    alloc: tokio::sync::Mutex<()>,
}

/// Registered regions of the file, which must not overlap (QEMU's `vhdx_region_check`).
#[derive(Default)]
struct Regions(Vec<Range<u64>>);

impl Regions {
    fn check(&self, start: u64, length: u64) -> io::Result<()> {
        let end = start.wrapping_add(length);
        for r in &self.0 {
            if !(start >= r.end || end <= r.start) {
                // QEMU prints the end with a precision of zero: nothing for 0.
                let shown = if r.end == 0 {
                    String::new()
                } else {
                    r.end.to_string()
                };
                command_error_report(&format!(
                    "VHDX region {start}-{end} overlaps with region {}-{shown}",
                    r.start
                ));
                return Err(errno(libc::EINVAL));
            }
        }
        Ok(())
    }

    fn register(&mut self, start: u64, length: u64) {
        self.0.push(start..start.wrapping_add(length));
    }
}

/// The region table's BAT and metadata regions (QEMU's `vhdx_open_region_tables`).
async fn read_regions(
    file: &Child,
    regions: &mut Regions,
) -> io::Result<(format::Region, format::Region)> {
    let b = file
        .read(REGION_TABLE_OFFSETS[0], format::REGION_TABLE_LEN)
        .await?;
    let table = format::parse_region_table(&b).ok_or_else(|| errno(libc::EINVAL))?;
    let (mut bat, mut meta) = (None, None);
    for r in table {
        regions.check(r.offset, u64::from(r.length))?;
        regions.register(r.offset, u64::from(r.length));
        let slot = if r.guid == format::BAT_GUID {
            &mut bat
        } else if r.guid == format::METADATA_GUID {
            &mut meta
        } else if r.flags & format::REQUIRED != 0 {
            return Err(errno(libc::ENOTSUP));
        } else {
            continue;
        };
        if slot.replace(r).is_some() {
            return Err(errno(libc::EINVAL));
        }
    }
    match (bat, meta) {
        (Some(b), Some(m)) => Ok((b, m)),
        _ => Err(errno(libc::EINVAL)),
    }
}

/// The disk's size and block size from the metadata region (QEMU's
/// `vhdx_parse_metadata`).
async fn read_metadata(file: &Child, region: &format::Region) -> io::Result<Layout> {
    let b = file.read(region.offset, format::METADATA_TABLE_LEN).await?;
    let entries = format::parse_metadata_table(&b).ok_or_else(|| errno(libc::EINVAL))?;
    const KNOWN: [Guid; 6] = [
        format::FILE_PARAMETERS_GUID,
        format::VIRTUAL_SIZE_GUID,
        format::PAGE83_GUID,
        format::LOGICAL_SECTOR_GUID,
        format::PHYSICAL_SECTOR_GUID,
        format::PARENT_LOCATOR_GUID,
    ];
    let mut found: [Option<format::MetaEntry>; 6] = [None; 6];
    for e in entries {
        match KNOWN.iter().position(|g| *g == e.guid) {
            Some(i) if found[i].is_some() => return Err(errno(libc::EINVAL)),
            Some(i) => found[i] = Some(e),
            None if e.flags & format::META_IS_REQUIRED != 0 => return Err(errno(libc::ENOTSUP)),
            None => {}
        }
    }
    // All but the parent locator, which only differencing images (refused) have.
    let [
        Some(params),
        Some(size),
        Some(_),
        Some(logical),
        Some(_),
        None,
    ] = found
    else {
        return Err(errno(libc::ENOTSUP));
    };
    let item = async |e: format::MetaEntry, len: usize| {
        file.read(region.offset.saturating_add(u64::from(e.offset)), len)
            .await
    };
    let p = item(params, 8).await?;
    let (block_size, bits) = (u64::from(le32(&p, 0)), le32(&p, 4));
    if bits & format::HAS_PARENT != 0 {
        // Without a parent locator (with one it was refused above).
        return Err(errno(libc::EINVAL));
    }
    let size = le64(&item(size, 8).await?, 0);
    let logical = le32(&item(logical, 4).await?, 0);
    if !(format::BLOCK_SIZE_MIN..=format::BLOCK_SIZE_MAX).contains(&block_size) {
        return Err(errno(libc::EINVAL));
    }
    if logical != 512 {
        return Err(errno(libc::ENOTSUP));
    }
    if !block_size.is_power_of_two() {
        return Err(errno(libc::EINVAL));
    }
    Ok(Layout::new(size, block_size))
}

impl State {
    /// QEMU's `vhdx_open`, its checks in its order.
    async fn open(file: Rc<Child>, read_only: bool) -> ferrite_block::Result<Rc<State>> {
        let io = |e: io::Error| could_not_open(&file, &e);
        let sig = file.read(0, 8).await.map_err(io)?;
        if sig != format::SIGNATURE {
            return Err(io(errno(libc::EINVAL)));
        }
        let headers = Headers::open(file.clone()).await?;
        let h = headers.current();
        let mut regions = Regions::default();
        regions.register(h.log_offset, u64::from(h.log_length));
        let mut log = Log::new(h.log_offset, u64::from(h.log_length));
        if h.log_offset < MIB || h.log_offset % MIB != 0 || h.log_version != 0 {
            return Err(io(errno(libc::EINVAL)));
        }
        if h.log_guid != [0; 16] && h.log_length != 0 {
            if u64::from(h.log_length) % MIB != 0 {
                return Err(io(errno(libc::EINVAL)));
            }
            if let Some(mut run) = log.search(&file, &h.log_guid).await.map_err(io)? {
                if read_only {
                    return Err(generic(format!(
                        "VHDX image file '{}' opened read-only, but contains a log that \
                         needs to be replayed",
                        file.node().filename()
                    )));
                }
                headers.visible_write().await.map_err(io)?;
                Log::replay(&file, &mut run, &h.log_guid)
                    .await
                    .map_err(io)?;
                log.reset();
                headers.update(false, Some([0; 16])).await.map_err(io)?;
            }
        }
        let (bat_region, meta_region) = read_regions(&file, &mut regions).await.map_err(io)?;
        let layout = read_metadata(&file, &meta_region).await.map_err(io)?;
        if u64::from(layout.entries) > u64::from(bat_region.length) / 8 {
            return Err(io(errno(libc::EINVAL)));
        }
        let held =
            (u64::from(layout.entries) * 8).min(file.len().saturating_sub(bat_region.offset));
        let bytes = file
            .read(bat_region.offset, held as usize)
            .await
            .map_err(io)?;
        let bat: Vec<u64> = bytes.chunks_exact(8).map(|c| le64(c, 0)).collect();
        let s = State {
            file: file.clone(),
            headers,
            log: Cell::new(log),
            layout,
            bat_offset: bat_region.offset,
            bat: RefCell::new(bat),
            alloc: tokio::sync::Mutex::new(()),
        };
        s.check_bat(&regions).map_err(io)?;
        Ok(Rc::new(s))
    }

    /// QEMU's `vhdx_check_bat_entries` as an open runs it: the first fully present block
    /// past the file's end, or over a region, fails the open.
    fn check_bat(&self, regions: &Regions) -> io::Result<()> {
        let file_len = self.file.len();
        let block = self.layout.block_size;
        let disk = self.layout.size & !(SECTOR - 1);
        let mut payload_left = self.layout.chunk_ratio;
        for (i, &e) in self.bat.borrow().iter().enumerate() {
            if e & state::MASK != state::FULLY_PRESENT {
                continue;
            }
            let i = i as u64;
            let offset = e & BAT_OFFSET_MASK;
            let len = block.min(disk.wrapping_sub(i.wrapping_mul(block)));
            if offset > i64::MAX as u64 - block {
                command_error_report(&format!("VHDX BAT entry {i} offset overflow."));
                return Err(errno(libc::EINVAL));
            }
            let past = if offset >= file_len {
                Some(("start", offset))
            } else if offset + len > file_len {
                Some(("end", offset + len - 1))
            } else {
                None
            };
            if let Some((which, at)) = past {
                command_error_report(&format!(
                    "VHDX BAT entry {i} {which} offset {at} points after end of file \
                     ({file_len}). Image has probably been truncated."
                ));
                return Err(errno(libc::EINVAL));
            }
            // QEMU counts present entries, not positions, to tell payload blocks from
            // sector bitmaps.
            if payload_left > 0 {
                regions.check(offset, block)?;
                payload_left -= 1;
            } else {
                payload_left = self.layout.chunk_ratio;
            }
        }
        Ok(())
    }

    fn entry(&self, i: u64) -> u64 {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.bat.borrow().get(i).copied())
            .unwrap_or(0)
    }

    fn set_entry(&self, i: u64, v: u64) {
        let mut bat = self.bat.borrow_mut();
        let i = i as usize;
        if i >= bat.len() {
            bat.resize(i + 1, 0);
        }
        bat[i] = v;
    }

    /// Where the bytes at `inner` of a fully present block of entry `e` are in the file
    /// (an entry pointing at the file's start reads from there, whatever `inner`, as in
    /// QEMU).
    fn host(e: u64, inner: u64) -> u64 {
        match e & BAT_OFFSET_MASK {
            0 => 0,
            at => at + inner,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let block = self.layout.block_size;
        blockmap::gather(offset, len, async |at, max| {
            let (b, inner) = (at / block, at % block);
            let n = ((block - inner) as usize).min(max);
            let e = self.entry(self.layout.entry_of(b));
            match e & state::MASK {
                state::FULLY_PRESENT => {
                    Ok((n, Some(self.file.read(Self::host(e, inner), n).await?)))
                }
                state::NOT_PRESENT
                | state::UNDEFINED
                | state::ZERO
                | state::UNMAPPED
                | state::UNMAPPED_V095 => Ok((n, None)),
                // Partially present blocks belong to differencing images.
                _ => Err(errno(libc::EIO)),
            }
        })
        .await
    }

    async fn write(&self, offset: u64, data: &[u8], flags: ReqFlags) -> io::Result<()> {
        if self.headers.first_visible_write.get() {
            let _one = self.alloc.lock().await;
            self.headers.visible_write().await?;
        }
        let mut done = 0usize;
        for (b, inner, n) in blockmap::pieces(offset, data.len() as u64, self.layout.block_size) {
            let piece = &data[done..done + n as usize];
            done += n as usize;
            let i = self.layout.entry_of(b);
            let e = self.entry(i);
            if e & state::MASK == state::FULLY_PRESENT {
                self.write_present(e, inner, piece, flags).await?;
                continue;
            }
            let _one = self.alloc.lock().await;
            // Another write may have placed the block meanwhile.
            let e = self.entry(i);
            match e & state::MASK {
                state::FULLY_PRESENT => self.write_present(e, inner, piece, flags).await?,
                state::NOT_PRESENT
                | state::UNDEFINED
                | state::ZERO
                | state::UNMAPPED
                | state::UNMAPPED_V095 => self.allocate(i, e, inner, piece, flags).await?,
                _ => return Err(errno(libc::EIO)),
            }
        }
        Ok(())
    }

    async fn write_present(
        &self,
        e: u64,
        inner: u64,
        piece: &[u8],
        flags: ReqFlags,
    ) -> io::Result<()> {
        let at = Self::host(e, inner);
        // Over the header section: a BAT QEMU would not write through either.
        if at < MIB {
            return Err(errno(libc::EFAULT));
        }
        self.file.write(at, pool::copy_of(piece), flags).await
    }

    /// A new block for entry `i` (was `e`) at the end of the file, rounded up to 1 MiB;
    /// `piece` written at `inner` in it, then the entry changed through the log. The
    /// caller holds `alloc`.
    async fn allocate(
        &self,
        i: u64,
        e: u64,
        inner: u64,
        piece: &[u8],
        flags: ReqFlags,
    ) -> io::Result<()> {
        let at = self.file.len().next_multiple_of(MIB);
        if at > i64::MAX as u64 {
            return Err(errno(libc::EINVAL));
        }
        // Grown with zeroes, so a block that read as zeroes still does around the piece.
        self.file.truncate(at + self.layout.block_size).await?;
        let entry = at | state::FULLY_PRESENT;
        self.set_entry(i, entry);
        if let Err(err) = self
            .file
            .write(at + inner, pool::copy_of(piece), flags)
            .await
        {
            self.set_entry(i, e);
            return Err(err);
        }
        self.log_bat_entry(i, entry).await
    }

    /// BAT entry `i` changed to `v` on disk through the log (QEMU's
    /// `vhdx_log_write_and_flush`).
    async fn log_bat_entry(&self, i: u64, v: u64) -> io::Result<()> {
        let f = &self.file;
        f.flush().await?;
        if self.headers.current().log_guid != [0; 16] {
            return Err(errno(libc::ENOTSUP));
        }
        let guid = random_guid()?;
        self.headers.update(false, Some(guid)).await?;
        let mut log = self.log.get();
        let at = self.bat_offset.saturating_add(8 * i);
        log.append(f, &guid, at, &v.to_le_bytes(), f.len()).await?;
        self.log.set(log);
        let mut run = log.pending();
        f.flush().await?;
        self.headers.visible_write().await?;
        Log::replay(f, &mut run, &guid).await?;
        self.headers.update(false, Some([0; 16])).await?;
        log.resume(&run);
        self.log.set(log);
        Ok(())
    }
}

/// A node of the `vhdx` driver.
struct Vhdx {
    s: Rc<State>,
    read_only: Cell<bool>,
    blocker: String,
}

impl Vhdx {
    async fn write_impl(&self, offset: u64, data: &[u8], flags: ReqFlags) -> io::Result<()> {
        self.s.write(offset, data, flags).await
    }
}

impl Driver for Vhdx {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    ferrite_block::forward_to_child!(self.s.file; flush);
    block_mapped_driver!("vhdx");

    fn len(&self, _node: &Node) -> u64 {
        self.s.layout.size & !(SECTOR - 1)
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.s.read(offset, len))
    }

    /// QEMU's driver answers no block status: all data.
    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    /// QEMU's driver works in 512-byte sectors.
    fn request_alignment(&self, _node: &Node) -> u64 {
        SECTOR
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.s.layout.block_size)
    }
}
