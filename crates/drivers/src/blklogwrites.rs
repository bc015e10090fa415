//! `blklogwrites`: a filter that passes every request to `file` and records each write,
//! zeroing, discard and flush in `log`, in the format of Linux's dm-log-writes target, so
//! that the disk's history can be replayed step by step, as crash-consistency tests do
//! (QEMU: block/blklogwrites.c).
//!
//! The log: a superblock in its first sector (magic, version, number of entries, sector
//! size), then the entries one after another, each a sector holding where the request went
//! and its flags, followed by the sectors it wrote (none for discards and flushes). The
//! superblock is rewritten, and the log flushed, at every flush and every
//! `log-super-update-interval` entries.

use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx, Perm};
use ferrite_qapi::os_msg;
use ferrite_qobject::QDict;
use std::cell::Cell;
use std::io;
use std::rc::Rc;
use tokio::sync::{Notify, RwLock};

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
const FLUSH: u64 = 1 << 0;
const DISCARD: u64 = 1 << 2;
/// Every flag the format defines: also FUA (1 << 1) and MARK (1 << 3), which QEMU never
/// writes but accepts in a log it appends to.
const KNOWN_FLAGS: u64 = 0xf;
const SUPERBLOCK_LEN: usize = 28;
const ENTRY_LEN: usize = 32;
/// The largest offset a request may reach, as in QEMU (`BDRV_MAX_LENGTH`): reading an entry
/// beyond it fails with EIO.
const MAX_LENGTH: u64 = i64::MAX as u64 & !((1 << 30) - 1);
/// The largest zeroing QEMU's block layer hands a driver at once (`INT_MAX`, aligned down).
const MAX_ZEROES: u64 = i32::MAX as u64;

/// The `blklogwrites` driver's factory.
pub(crate) struct BlkLogWritesFactory;

fn fail<T>(text: String) -> ferrite_block::Result<T> {
    Err(crate::error::generic(text))
}

/// A sector size the format can use: a power of two that holds an entry, below 16 MiB.
fn sector_size_valid(size: u64) -> bool {
    size.is_power_of_two() && size >= ENTRY_LEN as u64 && size < 1 << 24
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The log's first sector.
struct Superblock {
    magic: u64,
    version: u64,
    entries: u64,
    sector_size: u32,
}

impl Superblock {
    fn new(entries: u64, sector_size: u32) -> Self {
        Superblock {
            magic: MAGIC,
            version: VERSION,
            entries,
            sector_size,
        }
    }

    fn parse(b: &[u8; SUPERBLOCK_LEN]) -> Self {
        Superblock {
            magic: le64(b, 0),
            version: le64(b, 8),
            entries: le64(b, 16),
            sector_size: u32::from_le_bytes(b[24..28].try_into().expect("4 bytes")),
        }
    }

    /// One sector: the fields, then zeroes.
    fn sector(&self, sector_size: u64) -> Vec<u8> {
        let mut b = vec![0u8; sector_size as usize];
        b[0..8].copy_from_slice(&self.magic.to_le_bytes());
        b[8..16].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.entries.to_le_bytes());
        b[24..28].copy_from_slice(&self.sector_size.to_le_bytes());
        b
    }
}

/// One request as the log records it.
struct Entry {
    sector: u64,
    sectors: u64,
    flags: u64,
}

impl Entry {
    /// The entry's sector followed by `data`, the bytes the request wrote.
    fn with_data(&self, sector_size: u64, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(sector_size as usize + data.len());
        b.extend_from_slice(&self.sector.to_le_bytes());
        b.extend_from_slice(&self.sectors.to_le_bytes());
        b.extend_from_slice(&self.flags.to_le_bytes());
        // data_len: QEMU leaves it 0, the data's length being the sector count.
        b.extend_from_slice(&0u64.to_le_bytes());
        b.resize(sector_size as usize, 0);
        b.extend_from_slice(data);
        b
    }
}

/// Reads `N` bytes of the log at `offset`; past its end the log reads as zeroes, as QEMU's
/// block layer pads a read past a file's end.
async fn read_log<const N: usize>(log: &Child, offset: u64) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    if offset > MAX_LENGTH - N as u64 {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    let len = log.len();
    if offset < len {
        let n = (len - offset).min(N as u64) as usize;
        b[..n].copy_from_slice(&log.read(offset, n).await?);
    }
    Ok(b)
}

/// Where the log's `entries` entries end, as a sector number (QEMU's
/// `blk_log_writes_find_cur_log_sector`). Entries past the log's end read as zeroes, one
/// sector each: they are counted without reading, so a superblock claiming billions of
/// entries costs no more than its real ones.
async fn end_of_entries(log: &Child, sector_size: u64, entries: u64) -> Result<u64, String> {
    let bits = sector_size.trailing_zeros();
    let failed = |i: u64, e: io::Error| format!("Failed to read log entry {i}: {}", os_msg(&e));
    let mut sector: u64 = 1;
    let mut i = 0;
    while i < entries {
        // QEMU's 64-bit shift: sector numbers past 2^64 bytes wrap.
        let offset = sector << bits;
        if offset >= log.len() && offset <= MAX_LENGTH - ENTRY_LEN as u64 {
            // Every entry from here on reads as zeroes until one would pass MAX_LENGTH.
            let readable = ((MAX_LENGTH - ENTRY_LEN as u64) >> bits) - (offset >> bits) + 1;
            let left = entries - i;
            if left <= readable {
                return Ok(sector.wrapping_add(left));
            }
            return Err(failed(
                i + readable,
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let b: [u8; ENTRY_LEN] = read_log(log, offset).await.map_err(|e| failed(i, e))?;
        let flags = le64(&b, 16);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(format!("Invalid flags {flags:#x} in log entry {i}"));
        }
        sector = sector.wrapping_add(1);
        if flags & DISCARD == 0 {
            sector = sector.wrapping_add(le64(&b, 8));
        }
        i += 1;
    }
    Ok(sector)
}

impl DriverFactory for BlkLogWritesFactory {
    fn name(&self) -> &'static str {
        "blklogwrites"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            // QEMU opens `file` before the node itself, `log` after.
            ctx.take_position_now();
            let log = ctx.open_child("log").await?;
            let opts = ctx.opts();
            let append = opts.opt_bool("log-append");
            let sector_option = opts.opt_u64("log-sector-size");
            let (sector_size, end, entries) = if append == Some(true) {
                if sector_option.is_some() {
                    return fail("log-append and log-sector-size are mutually exclusive".into());
                }
                let superblock = if log.is_empty() {
                    Superblock::new(0, 512)
                } else {
                    let b = read_log(&log, 0).await.map_err(|e| {
                        crate::error::generic(format!(
                            "Could not read log superblock: {}",
                            os_msg(&e)
                        ))
                    })?;
                    Superblock::parse(&b)
                };
                if superblock.magic != MAGIC {
                    return fail("Invalid log superblock magic".into());
                }
                if superblock.version != VERSION {
                    return fail(format!("Unsupported log version {}", superblock.version));
                }
                let size = u64::from(superblock.sector_size);
                if sector_size_valid(size) {
                    let end = end_of_entries(&log, size, superblock.entries)
                        .await
                        .or_else(fail)?;
                    (size, end, superblock.entries)
                } else {
                    (size, 1, 0)
                }
            } else {
                (sector_option.unwrap_or(512), 1, 0)
            };
            if !sector_size_valid(sector_size) {
                return fail(format!("Invalid log sector size {sector_size}"));
            }
            let interval = opts.opt_u64("log-super-update-interval").unwrap_or(4096);
            if interval == 0 {
                return fail(format!("Invalid log superblock update interval {interval}"));
            }
            let read_only = ctx.settings().read_only;
            Ok(Box::new(BlkLogWrites {
                file,
                log,
                sector_size,
                interval,
                append,
                sector_option,
                read_only,
                end: Cell::new(end),
                entries: Cell::new(entries),
                superblock_turn: Cell::new(0),
                superblock_written: Notify::new(),
                padding: RwLock::new(()),
            }) as Box<dyn Driver>)
        })
    }
}

struct BlkLogWrites {
    file: Rc<Child>,
    log: Rc<Child>,
    sector_size: u64,
    /// Entries between superblock updates (besides those at flushes).
    interval: u64,
    /// The options that name the log's layout, as given (for the node's `json:` name).
    append: Option<bool>,
    sector_option: Option<u64>,
    read_only: bool,
    /// The log sector the next entry goes to.
    end: Cell<u64>,
    entries: Cell<u64>,
    /// The entry whose superblock update is going on (0: none). One goes at a time; an
    /// older entry's update waiting behind a newer one is dropped, the newer one having
    /// counted it.
    superblock_turn: Cell<u64>,
    superblock_written: Notify,
    /// A request that reads around itself to fill its sectors goes alone, so that no write
    /// to those sectors lands between its read and its write (QEMU makes such requests
    /// serialising); requests of whole sectors go side by side.
    padding: RwLock<()>,
}

impl BlkLogWrites {
    fn bits(&self) -> u32 {
        self.sector_size.trailing_zeros()
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset % self.sector_size == 0 && len % self.sector_size == 0
    }

    /// Appends a record (an entry's sector and its data, from [`Entry::with_data`]), then
    /// `zeroes` zeroed bytes. Its place is taken before any I/O, so records written side by
    /// side do not overlap; the superblock follows at a flush or when the interval is up.
    async fn log(&self, flags: u64, record: Vec<u8>, zeroes: u64) -> io::Result<()> {
        let s = self.sector_size;
        let sectors = (record.len() as u64 + zeroes.next_multiple_of(s)) >> self.bits();
        let start = self.end.get();
        let seq = self.entries.get() + 1;
        self.entries.set(seq);
        self.end.set(start.wrapping_add(sectors));
        // QEMU's 64-bit shift: a log appended to past 2^64 bytes wraps (and fails).
        let offset = start << self.bits();
        let record_len = record.len() as u64;
        self.log.write(offset, record, ReqFlags::empty()).await?;
        if zeroes > 0 {
            let at = offset
                .checked_add(record_len)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
            self.log.write_zeroes(at, zeroes, ReqFlags::empty()).await?;
        }
        if flags & FLUSH != 0 || seq % self.interval == 0 {
            self.update_superblock(seq).await?;
        }
        Ok(())
    }

    async fn update_superblock(&self, seq: u64) -> io::Result<()> {
        loop {
            let turn = self.superblock_turn.get();
            if turn == 0 {
                break;
            }
            if seq < turn {
                return Ok(());
            }
            self.superblock_written.notified().await;
        }
        self.superblock_turn.set(seq);
        let superblock = Superblock::new(self.entries.get(), self.sector_size as u32);
        let r = async {
            self.log
                .write(0, superblock.sector(self.sector_size), ReqFlags::empty())
                .await?;
            self.log.flush().await
        }
        .await;
        self.superblock_turn.set(0);
        self.superblock_written.notify_waiters();
        r
    }

    /// Does `file_op`, then logs `record` (flags `flags`) and `zeroes` zeroed bytes after
    /// it, even when the file failed, as QEMU does; the log's failure wins.
    async fn file_and_log(
        &self,
        file_op: impl Future<Output = io::Result<()>>,
        flags: u64,
        record: Vec<u8>,
        zeroes: u64,
    ) -> io::Result<()> {
        let file = file_op.await;
        self.log(flags, record, zeroes).await?;
        file
    }

    /// The record of a request that logs no data of its own.
    fn header(&self, offset: u64, len: u64, flags: u64) -> Vec<u8> {
        self.entry(offset, len, flags)
            .with_data(self.sector_size, &[])
    }

    fn entry(&self, offset: u64, len: u64, flags: u64) -> Entry {
        Entry {
            sector: offset >> self.bits(),
            sectors: len >> self.bits(),
            flags,
        }
    }

    /// A write of whole sectors, and its FUA the way QEMU's block layer gives a driver
    /// without FUA of its own: a flush of the node afterwards, logged as any flush.
    async fn write_sectors(
        &self,
        node: &Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let record = self
            .entry(offset, data.len() as u64, 0)
            .with_data(self.sector_size, &data);
        let write = self.file.write(offset, data, ReqFlags::empty());
        self.file_and_log(write, 0, record, 0).await?;
        self.fua(node, flags).await
    }

    async fn fua(&self, node: &Node, flags: ReqFlags) -> io::Result<()> {
        if flags.contains(ReqFlags::FUA) {
            node.flush().await?;
        }
        Ok(())
    }

    /// The whole sectors around `offset..offset + len` as they are in `file`, with `fill`
    /// (the request's own bytes, or `None` for zeroes) in place of the range: QEMU's
    /// read-modify-write padding of a request that does not fill its sectors.
    async fn padded(
        &self,
        offset: u64,
        len: u64,
        fill: Option<&[u8]>,
    ) -> io::Result<(u64, Vec<u8>)> {
        let s = self.sector_size;
        let start = offset - offset % s;
        let end = (offset + len).next_multiple_of(s);
        let mut buf = vec![0u8; (end - start) as usize];
        let head = (offset - start) as usize;
        if head > 0 {
            self.read_padding(start, &mut buf[..s as usize]).await?;
        }
        let tail_start = end - s;
        if (offset + len) % s != 0 && (head == 0 || tail_start > start) {
            let at = (tail_start - start) as usize;
            self.read_padding(tail_start, &mut buf[at..]).await?;
        }
        let range = &mut buf[head..head + len as usize];
        match fill {
            Some(data) => range.copy_from_slice(data),
            None => range.fill(0),
        }
        Ok((start, buf))
    }

    /// One sector of `file` at `offset` into `dest` (zeroes past the file's end).
    async fn read_padding(&self, offset: u64, dest: &mut [u8]) -> io::Result<()> {
        let n = self
            .file
            .len()
            .saturating_sub(offset)
            .min(dest.len() as u64) as usize;
        if n > 0 {
            dest[..n].copy_from_slice(&self.file.read(offset, n).await?);
        }
        Ok(())
    }

    /// Whole sectors of zeroes: the file zeroed, an entry whose data the log zeroes too.
    async fn zero_sectors(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let mut at = offset;
        let piece_max = MAX_ZEROES & !(self.sector_size - 1);
        while at < offset + len {
            let n = piece_max.min(offset + len - at);
            let zeroing = self.file.write_zeroes(at, n, ReqFlags::empty());
            self.file_and_log(zeroing, 0, self.header(at, n, 0), n)
                .await?;
            at += n;
        }
        self.fua(node, flags).await
    }
}

impl Driver for BlkLogWrites {
    ferrite_block::forward_to_child!(self.file; len, read, truncate);

    fn format_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.sector_size
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn strong_options(&self) -> QDict {
        let mut d = QDict::new();
        d.insert_opt("log-append", self.append);
        d.insert_opt("log-sector-size", self.sector_option);
        d
    }

    /// `file` as a filter passes it on; `log` as a format's metadata: always read
    /// consistently, written and grown by this node alone while it may write.
    fn child_perm(&self, name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        if name != "log" {
            return (perm, shared);
        }
        let own = Perm::WRITE | Perm::RESIZE;
        let perm = perm | Perm::CONSISTENT_READ;
        let perm = if self.read_only { perm } else { perm | own };
        (perm, shared - own)
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.aligned(offset, data.len() as u64) {
                let _side_by_side = self.padding.read().await;
                return self.write_sectors(node, offset, data, flags).await;
            }
            let _alone = self.padding.write().await;
            let (start, buf) = self.padded(offset, data.len() as u64, Some(&data)).await?;
            self.write_sectors(node, start, buf, flags).await
        })
    }

    /// QEMU's block layer pads a zeroing that does not fill its sectors as it pads a write:
    /// the partial first sector (or the one or two sectors holding the whole request) is
    /// written as data, the whole sectors between are zeroed, the partial last sector is
    /// written as data; each logged on its own.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = self.sector_size;
            let head = offset % s;
            let tail = (s - (offset + len) % s) % s;
            if head == 0 && tail == 0 {
                let _side_by_side = self.padding.read().await;
                return self.zero_sectors(node, offset, len, flags).await;
            }
            let _alone = self.padding.write().await;
            let padded = head + len + tail;
            let both = if padded > s && head > 0 && tail > 0 {
                2 * s
            } else {
                s
            };
            let (mut offset, mut len) = (offset, len);
            if head > 0 || padded == both {
                let n = if padded == both { len } else { s - head };
                let (start, buf) = self.padded(offset, n, None).await?;
                self.write_sectors(node, start, buf, flags).await?;
                if padded == both {
                    return Ok(());
                }
                offset += n;
                len -= n;
            }
            let middle = len - len % s;
            if middle > 0 {
                self.zero_sectors(node, offset, middle, flags).await?;
                offset += middle;
                len -= middle;
            }
            if len > 0 {
                let (start, buf) = self.padded(offset, len, None).await?;
                self.write_sectors(node, start, buf, flags).await?;
            }
            Ok(())
        })
    }

    /// Only whole sectors are discarded and logged; a discard is advisory, and the rest of
    /// the range is left as it is (QEMU hands the partial sectors to the driver, whose
    /// check then aborts the whole process).
    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = self.sector_size;
            let start = offset.next_multiple_of(s);
            let end = (offset + len) / s * s;
            if end <= start {
                return Ok(());
            }
            let record = self.header(start, end - start, DISCARD);
            let _side_by_side = self.padding.read().await;
            self.file_and_log(self.file.discard(start, end - start), DISCARD, record, 0)
                .await
        })
    }

    /// A flush after writes flushes `file` and logs a flush entry, which rewrites the
    /// superblock and flushes the log; then, as QEMU's block layer does after any flush,
    /// both children are flushed (nothing is left to do there after writes).
    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if node.written_since_flush() {
                let record = self.header(0, 0, FLUSH);
                self.file_and_log(self.file.flush(), FLUSH, record, 0)
                    .await?;
            }
            self.file.flush().await?;
            self.log.flush().await
        })
    }

    /// QEMU's blklogwrites says nothing of allocation: everything is data.
    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }
}
