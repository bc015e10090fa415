//! `parallels`: Parallels (Virtuozzo) expandable images (QEMU: block/parallels.c). A
//! 64-byte [`header`], then the BAT, one little-endian `u32` per cluster of the disk
//! saying where in the file the cluster is (0: nowhere, reading as zeroes or as the
//! backing file), then the data area.
//!
//! As under QEMU:
//! - `inuse` is set in the header while the image is open for writing, cleared at close;
//!   an image found with it set, or with a BAT QEMU would not trust, is checked and
//!   repaired when opened writable ([`check`]);
//! - a new cluster goes into the first free cluster of the data area, else past the last
//!   one, the file then grown by the cluster and 128 MiB more (zeroes allocated), which
//!   later clusters fill; the file is cut back to its last cluster at close;
//! - BAT entries reach the file when the node is flushed (or closed);
//! - zeroes over whole clusters, and discards of whole clusters, drop the clusters (no
//!   backing file only); other zeroes are written as data;
//! - the format extension's dirty bitmaps become read-only bitmaps of a node opened
//!   read-only ([`ext`]); opened writable, the extension is ignored with a warning.
//!
//! Unlike QEMU: reads and writes into placed clusters never wait for clusters being
//! placed; a backing file's data for a new cluster goes to that cluster (QEMU writes it
//! past the last cluster, wrongly when the new one fills a hole); a BAT entry pointing
//! before the data area is repaired where QEMU's check aborts; writes past what the BAT
//! covers fail where QEMU aborts.

mod check;
mod create;
mod ext;
mod header;
mod used;

use crate::blockmap;
use crate::error::generic;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::{Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use header::{HEADER_LEN, Header, INUSE, MAGIC, MAGIC_EXT, SECTOR, VERSION};
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io;
use std::rc::Rc;
use used::Used;

/// How much the file grows past a new cluster at its end (QEMU's `prealloc-size`
/// default), in sectors.
const PREALLOC_SECTORS: u64 = (128 << 20) / SECTOR;
/// The header and BAT go to the file in pieces of this many bytes, those holding changed
/// entries (QEMU: four host pages).
const BAT_CHUNK: u64 = 16384;

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// The `parallels` driver's factory.
pub(crate) struct ParallelsFactory;

impl DriverFactory for ParallelsFactory {
    fn name(&self) -> &'static str {
        "parallels"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU's test: either magic, version 2.
    fn probe(&self, head: &[u8]) -> bool {
        let Some(h) = head.first_chunk::<HEADER_LEN>() else {
            return false;
        };
        let h = Header::parse(h);
        (&h.magic == MAGIC || &h.magic == MAGIC_EXT) && h.version == VERSION
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create::create(graph, opts))
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// By name, QEMU rounds the size up to a sector; its creation options have no
    /// backing file.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        if opts.get("backing-file").is_some() {
            return Err(generic(
                "Backing file not supported for file format 'parallels'",
            ));
        }
        let size = opts.get("size").and_then(QObject::as_u64).unwrap_or(0);
        opts.insert("size", size.next_multiple_of(SECTOR));
        Ok(opts)
    }

    fn formatting_options(&self, size: u64, _backing: Option<(&str, &str)>) -> String {
        format!("size={size} cluster_size={}", header::DEFAULT_CLUSTER_SIZE)
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let (file, read_only) = blockmap::open_file(ctx).await?;
            let writable = !read_only && ctx.opens_active();
            let state = State::open(file, writable, read_only).await?;
            Ok(Box::new(Parallels {
                s: state,
                read_only: Cell::new(read_only),
                blocker: format!(
                    "The Parallels format used by node '{}' does not support live migration",
                    ctx.node_name()
                ),
            }) as Box<dyn Driver>)
        })
    }
}

/// What the header says of the disk's layout.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    /// Cluster size in bytes.
    cluster: u64,
    /// What a BAT entry counts, in sectors (1 in the old format, a cluster in the new).
    unit: u64,
    /// Entries in the BAT.
    entries: u32,
    /// The disk's size in bytes.
    size: u64,
}

/// A node's BAT, its header, and where new clusters go.
struct State {
    file: Rc<Child>,
    g: Geometry,
    header: RefCell<Header>,
    /// The entries the file holds (those past the file's end read as 0, and take memory
    /// only once set).
    bat: RefCell<Vec<u32>>,
    /// Pieces of the header and BAT changed since they were last written
    /// ([`BAT_CHUNK`] bytes each).
    dirty: RefCell<BTreeSet<u64>>,
    /// The data area's clusters the BAT claims.
    used: RefCell<Used>,
    /// Where the data area starts, and where its last cluster ends, in sectors.
    data_start: Cell<u64>,
    data_end: Cell<u64>,
    /// The image was not closed cleanly.
    unclean: Cell<bool>,
    /// One placement at a time (QEMU's lock, which every request takes).
    alloc: tokio::sync::Mutex<()>,
    /// The format extension's bitmaps, until the node takes them.
    bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
}

impl State {
    /// QEMU's `parallels_open`, its checks in its order and words; a writable image is
    /// marked in use, and checked and repaired when it needs it.
    async fn open(
        file: Rc<Child>,
        writable: bool,
        read_only: bool,
    ) -> ferrite_block::Result<Rc<State>> {
        let file_sectors = file.len() / SECTOR;
        let head = file
            .read(0, HEADER_LEN)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        let head: &[u8; HEADER_LEN] = head
            .first_chunk()
            .ok_or_else(|| generic("Image not in Parallels format"))?;
        let h = Header::parse(head);
        if h.version != VERSION || (&h.magic != MAGIC && &h.magic != MAGIC_EXT) {
            return Err(generic("Image not in Parallels format"));
        }
        let mut sectors = h.nb_sectors;
        let unit = if h.old_magic() {
            sectors &= 0xffff_ffff;
            1
        } else {
            u64::from(h.tracks)
        };
        if h.tracks == 0 {
            return Err(generic("Invalid image: Zero sectors per track"));
        }
        if h.tracks > i32::MAX as u32 / 513 {
            return Err(generic("Invalid image: Too big cluster"));
        }
        if h.bat_entries > i32::MAX as u32 / 4 {
            return Err(generic("Catalog too large"));
        }
        if h.ext_off >= (i64::MAX >> 9) as u64 {
            return Err(generic("Invalid image: Too big offset"));
        }
        // Beyond QEMU, whose sizes are 64-bit byte counts: a size that does not fit one.
        if sectors > (i64::MAX as u64) / SECTOR {
            return Err(generic("Invalid image: Too big size"));
        }
        let g = Geometry {
            cluster: u64::from(h.tracks) * SECTOR,
            unit,
            entries: h.bat_entries,
            size: sectors * SECTOR,
        };
        let in_file = (file.len().saturating_sub(HEADER_LEN as u64) / 4).min(g.entries.into());
        let bytes = file
            .read(HEADER_LEN as u64, (in_file * 4) as usize)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        let bat: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let unclean = h.inuse == INUSE;
        let (data_start, data_off_ok) = h.data_start(file_sectors);
        let mut need_check = unclean || !data_off_ok;
        let mut bitmaps = Vec::new();
        if h.ext_off != 0 && !read_only {
            // QEMU's driver has always ignored the extension when writing.
            ferrite_block::report::warn_report("Format Extension ignored in RW mode");
        } else if h.ext_off != 0 {
            bitmaps = ext::read_bitmaps(&file, h.ext_off * SECTOR, g).await?;
        }
        let s = State {
            file,
            g,
            header: RefCell::new(h),
            bat: RefCell::new(bat),
            dirty: RefCell::new(BTreeSet::new()),
            used: RefCell::new(Used::default()),
            data_start: Cell::new(data_start),
            data_end: Cell::new(data_start),
            unclean: Cell::new(unclean),
            alloc: tokio::sync::Mutex::new(()),
            bitmaps: RefCell::new(bitmaps),
        };
        if writable {
            s.header.borrow_mut().inuse = INUSE;
            s.write_header()
                .await
                .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        }
        // Where the last cluster ends; an entry pointing nowhere counts as a cluster at
        // the file's start, as in QEMU.
        let mut end = (0..s.held())
            .map(|i| s.sector_of(i) + g.cluster / SECTOR)
            .max()
            .unwrap_or(0);
        if s.held() < g.entries {
            end = end.max(g.cluster / SECTOR);
        }
        s.data_end.set(s.data_end.get().max(end));
        need_check |= s.data_end.get() > file_sectors;
        if !need_check {
            need_check = s.fill_used().is_err();
        }
        if writable && need_check {
            let _one = s.alloc.lock().await;
            check::repair(&s).await.map_err(|e| {
                generic(format!(
                    "Could not repair corrupted image: {}",
                    ferrite_qapi::os_msg(&e)
                ))
            })?;
        }
        Ok(Rc::new(s))
    }

    /// How many BAT entries the file holds (those after it point nowhere).
    fn held(&self) -> u32 {
        (self.bat.borrow().len() as u32).min(self.g.entries)
    }

    /// BAT entry `i` (0 past what the file holds).
    fn entry(&self, i: u32) -> u32 {
        self.bat.borrow().get(i as usize).copied().unwrap_or(0)
    }

    /// The header changed: it goes to the file with the next flush.
    fn mark_header_changed(&self) {
        self.dirty.borrow_mut().insert(0);
    }

    /// Sets BAT entry `i`, to be written with the next flush.
    fn set_entry(&self, i: u32, v: u32) {
        {
            let mut bat = self.bat.borrow_mut();
            let at = i as usize;
            if at >= bat.len() {
                bat.resize(at + 1, 0);
            }
            bat[at] = v;
        }
        self.dirty
            .borrow_mut()
            .insert(header::bat_entry_at(i) / BAT_CHUNK);
    }

    /// Where cluster `i`'s entry points, in sectors (0: nowhere).
    fn sector_of(&self, i: u32) -> u64 {
        u64::from(self.entry(i)) * self.g.unit
    }

    /// Where cluster `i` is in the file, in bytes.
    fn host_of(&self, i: u32) -> Option<u64> {
        match self.sector_of(i) {
            0 => None,
            s => Some(s * SECTOR),
        }
    }

    /// The data area's cluster at byte `host` (`None` before the data area).
    fn used_index(&self, host: u64) -> Option<u64> {
        host.checked_sub(self.data_start.get() * SECTOR)
            .map(|d| d / self.g.cluster)
    }

    /// The used clusters as the BAT claims them (QEMU's `parallels_fill_used_bitmap`),
    /// filled as far as it goes; the first claim that fails is the error.
    fn fill_used(&self) -> io::Result<()> {
        let payload = self
            .file
            .len()
            .checked_sub(self.data_start.get() * SECTOR)
            .ok_or_else(|| errno(libc::EINVAL))?;
        let mut used = Used::new(payload.div_ceil(self.g.cluster));
        let mut r = Ok(());
        if used.len() > 0 {
            for i in 0..self.held() {
                if let Some(host) = self.host_of(i)
                    && let Err(e) = used.claim(self.used_index(host), 1)
                    && r.is_ok()
                {
                    r = Err(e);
                }
            }
        }
        *self.used.borrow_mut() = used;
        r
    }

    /// The header to the file, made durable (QEMU's `parallels_update_header`).
    async fn write_header(&self) -> io::Result<()> {
        let bytes = self.header.borrow().to_bytes().to_vec();
        self.file.write(0, bytes, ReqFlags::empty()).await?;
        self.file.flush().await
    }

    /// The header and BAT bytes `from..to`, as they are now.
    fn meta_bytes(&self, from: u64, to: u64) -> Vec<u8> {
        let head = self.header.borrow().to_bytes();
        (from..to)
            .map(|at| {
                if at < HEADER_LEN as u64 {
                    head[at as usize]
                } else {
                    let i = ((at - HEADER_LEN as u64) / 4) as u32;
                    self.entry(i).to_le_bytes()[((at - HEADER_LEN as u64) % 4) as usize]
                }
            })
            .collect()
    }

    /// The changed pieces of the header and BAT to the file (QEMU's
    /// `parallels_co_flush_to_os`).
    async fn write_bat(&self) -> io::Result<()> {
        let end = self.header.borrow().bat_end();
        loop {
            let Some(chunk) = self.dirty.borrow_mut().pop_first() else {
                return Ok(());
            };
            let from = chunk * BAT_CHUNK;
            let to = (from + BAT_CHUNK).min(end);
            if from >= to {
                continue;
            }
            let bytes = self.meta_bytes(from, to);
            if let Err(e) = self.file.write(from, bytes, ReqFlags::empty()).await {
                self.dirty.borrow_mut().insert(chunk);
                return Err(e);
            }
        }
    }

    /// BAT entries to the file, then the file flushed.
    async fn flush(&self) -> io::Result<()> {
        {
            let _one = self.alloc.lock().await;
            self.write_bat().await?;
        }
        self.file.flush().await
    }

    /// The run from byte `pos` (at most `len` bytes, within one BAT's reach): placed
    /// clusters following each other in the file (where the run starts in the file), or
    /// clusters not placed (`None`).
    fn find(&self, pos: u64, len: u64) -> (Option<u64>, u64) {
        let c = self.g.cluster;
        let first = pos / c;
        let start = self.host_at(first);
        let mut n = (c - pos % c).min(len);
        let mut i = first + 1;
        while n < len {
            let next = self.host_at(i);
            let follows = match (start, next) {
                (None, None) => true,
                (Some(a), Some(b)) => b == a + (i - first) * c,
                _ => false,
            };
            if !follows {
                break;
            }
            n = (n + c).min(len);
            i += 1;
        }
        (start.map(|h| h + pos % c), n)
    }

    fn host_at(&self, cluster: u64) -> Option<u64> {
        u32::try_from(cluster)
            .ok()
            .filter(|&i| i < self.g.entries)
            .and_then(|i| self.host_of(i))
    }

    /// Places `want` clusters from `first` (none placed, all within the BAT), as many as
    /// fit together (QEMU's `allocate_clusters`): the first free clusters of the data
    /// area, or past its end, the file grown by them and [`PREALLOC_SECTORS`] more. The
    /// caller holds `alloc`. Returns where the first went and how many were placed; their
    /// entries are set, and `before` runs between finding their place and setting them.
    async fn place(
        &self,
        first: u32,
        want: u64,
        before: impl AsyncFnOnce(u64, u64) -> io::Result<()>,
    ) -> io::Result<(u64, u64)> {
        let c = self.g.cluster;
        let mut want = want;
        let (first_free, len) = {
            let u = self.used.borrow();
            (u.first_free(), u.len())
        };
        let host = if first_free == len {
            let bytes = want * c + PREALLOC_SECTORS.max(self.g.cluster / SECTOR) * SECTOR;
            let host = self.data_end.get() * SECTOR;
            self.file
                .write_zeroes(host, bytes, ReqFlags::empty())
                .await?;
            self.used.borrow_mut().grow(bytes / c);
            host
        } else {
            let next = self.used.borrow().next_claimed(first_free);
            want = want.min(next - first_free);
            let host = self.data_start.get() * SECTOR + first_free * c;
            if host < self.data_end.get() * SECTOR {
                self.file
                    .write_zeroes(host, want * c, ReqFlags::empty())
                    .await?;
            }
            host
        };
        // The entry counts sectors or clusters in 32 bits: a file past that cannot say
        // where the cluster is (QEMU would store a wrapped offset).
        let unit_bytes = self.g.unit * SECTOR;
        if (host + (want - 1) * c) / unit_bytes > u64::from(u32::MAX) {
            return Err(errno(libc::EFBIG));
        }
        before(host, want).await?;
        self.used.borrow_mut().claim(self.used_index(host), want)?;
        for k in 0..want {
            let at = host + k * c;
            self.set_entry(first + k as u32, (at / unit_bytes) as u32);
        }
        let end = (host + want * c) / SECTOR;
        if end > self.data_end.get() {
            self.data_end.set(end);
        }
        Ok((host, want))
    }
}

/// A node of the `parallels` driver.
struct Parallels {
    s: Rc<State>,
    read_only: Cell<bool>,
    blocker: String,
}

impl Parallels {
    async fn read_impl(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let s = &self.s;
        blockmap::gather(offset, len, async |at, max| {
            let (host, n) = s.find(at, max as u64);
            let n = n as usize;
            let bytes = match (host, node.edge("backing")) {
                (Some(h), _) => Some(s.file.read(h, n).await?),
                (None, Some(b)) => Some(b.read(at, n).await?),
                (None, None) => None,
            };
            Ok((n, bytes))
        })
        .await
    }

    async fn write_impl(&self, node: &Node, offset: u64, data: &[u8]) -> io::Result<()> {
        let s = &self.s;
        let c = s.g.cluster;
        let len = data.len() as u64;
        let mut at = offset;
        while at < offset + len {
            let done = (at - offset) as usize;
            let (host, n) = s.find(at, offset + len - at);
            if let Some(h) = host {
                let piece = pool::copy_of(&data[done..done + n as usize]);
                s.file.write(h, piece, ReqFlags::empty()).await?;
                at += n;
                continue;
            }
            let first = at / c;
            if first + (at % c + n).div_ceil(c) > u64::from(s.g.entries) {
                // The header's size reaches past its BAT (QEMU asserts).
                return Err(errno(libc::EIO));
            }
            let (host, n, copied) = {
                let _one = s.alloc.lock().await;
                // Placed meanwhile by another request: written in place on the next turn.
                if s.find(at, n).0.is_some() {
                    continue;
                }
                let inner = at % c;
                let backing = node.edge("backing");
                let copies = backing.is_some();
                let piece = &data[done..done + n as usize];
                let (host, got) = s
                    .place(first as u32, (inner + n).div_ceil(c), async |host, got| {
                        let Some(b) = backing else {
                            return Ok(());
                        };
                        // What the backing file has in the new clusters, the new data
                        // over it, before the entries point there.
                        let mut whole = b.read(first * c, (got * c) as usize).await?;
                        let k = piece.len().min((got * c - inner) as usize);
                        whole[inner as usize..inner as usize + k].copy_from_slice(&piece[..k]);
                        s.file.write(host, whole, ReqFlags::empty()).await
                    })
                    .await?;
                (host + inner, n.min(got * c - inner), copies)
            };
            if !copied {
                let piece = pool::copy_of(&data[done..done + n as usize]);
                s.file.write(host, piece, ReqFlags::empty()).await?;
            }
            at += n;
        }
        Ok(())
    }

    /// QEMU's discard: whole clusters only, no backing file; each placed one punched out
    /// of the file and dropped from the BAT. Anything else is left as it is (ENOTSUP,
    /// which the block layer ignores).
    async fn drop_clusters(&self, node: &Node, offset: u64, len: u64) -> io::Result<bool> {
        let s = &self.s;
        let c = s.g.cluster;
        if node.child("backing").is_some() || offset % c != 0 || len % c != 0 {
            return Ok(false);
        }
        let _one = s.alloc.lock().await;
        for cluster in offset / c..(offset + len) / c {
            let Some(host) = s.host_at(cluster) else {
                continue;
            };
            s.file.discard(host, c).await?;
            s.set_entry(cluster as u32, 0);
            if let Some(i) = s.used_index(host) {
                s.used.borrow_mut().free(i);
            }
        }
        Ok(true)
    }

    /// A write with FUA: durable, BAT included, as QEMU's block layer flushes the node.
    async fn write_durable(
        &self,
        node: &Node,
        offset: u64,
        data: &[u8],
        flags: ReqFlags,
    ) -> io::Result<()> {
        self.write_impl(node, offset, data).await?;
        if flags.contains(ReqFlags::FUA) {
            self.s.flush().await?;
        }
        Ok(())
    }
}

impl Driver for Parallels {
    crate::format_child_answers!();

    fn format_name(&self) -> &'static str {
        "parallels"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.s.g.size
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.read_impl(node, offset, len))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let r = self.write_durable(node, offset, &data, flags).await;
            pool::give(data);
            r
        })
    }

    /// Whole clusters without a backing file are dropped (QEMU's driver discards); the
    /// rest written as data.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if !self.drop_clusters(node, offset, len).await? {
                ferrite_block::driver::write_zeroes_as_data(
                    offset,
                    len,
                    flags,
                    |at, z| async move { self.write_impl(node, at, &z).await },
                )
                .await?;
            }
            // Durable once, whichever way the zeroes went.
            if flags.contains(ReqFlags::FUA) {
                self.s.flush().await?;
            }
            Ok(())
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move { self.drop_clusters(node, offset, len).await.map(|_| ()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(self.s.flush())
    }

    /// Placed clusters are data (QEMU's driver does not ask the file which read as
    /// zeroes); the rest is the backing file's, or zeroes.
    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            match self.s.find(offset, len) {
                (Some(_), n) => Ok(Extent::data(n)),
                (None, n) => Extent::below(node, offset, n).await,
            }
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn migration_blocker(&self) -> Option<&str> {
        Some(&self.blocker)
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        std::mem::take(&mut *self.s.bitmaps.borrow_mut())
    }

    /// QEMU's driver answers no `bdrv_get_info`: no cluster size, no dirty flag.
    fn has_image_info(&self) -> bool {
        false
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn writes_file_when_writable(&self) -> bool {
        true
    }

    /// Made durable, marked closed, and the file cut back to its last cluster (QEMU's
    /// `parallels_close`; its errors are ignored there too). An image another process
    /// owns (inactive) is left alone.
    fn close<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.s;
            if self.read_only.get() || !node.is_active() {
                return Ok(());
            }
            let _ = s.flush().await;
            s.header.borrow_mut().inuse = 0;
            let _ = s.write_header().await;
            let _ = s.file.truncate(s.data_end.get() * SECTOR).await;
            Ok(())
        })
    }
}
