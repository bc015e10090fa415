//! `qcow`: version 1 of QEMU's copy-on-write format, qcow2's predecessor (QEMU:
//! block/qcow.c). A big-endian header, an L1 table and L2 tables of 64-bit entries; a
//! cluster is placed in the file, compressed (raw deflate, as qcow2's), or left to the
//! backing file the header names.
//!
//! As under QEMU:
//! - new L2 tables and clusters go at the end of the file, rounded up to a cluster; each
//!   table entry is made durable as it is written; a new cluster is not filled from the
//!   backing file (images with one are made with 512-byte clusters, written whole);
//! - requests are cut to sectors: a write not aligned to them reads the sectors around it
//!   first (QEMU's block layer does this for the driver);
//! - a compressed cluster written in part is inflated into a new cluster first;
//! - no resize, no discard, migration blocked; AES-encrypted images are refused.
//!
//! Unlike QEMU, a compressed write into a cluster already placed writes it in place,
//! uncompressed (QEMU writes the compressed bytes over it, with an entry that still says
//! it is not compressed).

use crate::compress::{self, Codec};
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::{
    BackingName, BlockBackend, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx,
};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;

const MAGIC: u32 = u32::from_be_bytes(*b"QFI\xfb");
const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const COMPRESSED: u64 = 1 << 63;
const SECTOR: u64 = 512;
/// L2 tables kept in memory (QEMU's `L2_CACHE_SIZE`).
const CACHED_TABLES: usize = 16;
/// Longest backing file name QEMU reads.
const MAX_BACKING_NAME: u32 = 1023;

fn generic(text: impl Into<String>) -> ferrite_block::Error {
    ferrite_qapi::Error::generic(text).into()
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The `qcow` driver's factory.
pub(crate) struct QcowFactory;

impl DriverFactory for QcowFactory {
    fn name(&self) -> &'static str {
        "qcow"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU's test: a whole header with the magic and version 1.
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= HEADER_LEN && be32(head, 0) == MAGIC && be32(head, 4) == VERSION
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create(graph, opts))
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// The header has no room for the backing file's format: QEMU checks that it is one
    /// it knows, then drops it.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        opts.remove("backing-fmt");
        Ok(opts)
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let read_only = ctx.settings().read_only;
            let file = ctx.open_child("file").await?;
            ctx.claim_for_metadata(&file)?;
            ctx.take_position_now();
            let q = Qcow::open(file.clone(), read_only, ctx.node_name()).await?;
            if q.crypt_method == 0 && ctx.opts().get("encrypt").is_some() {
                return Err(generic(
                    "No encryption in image header, but options specified format 'aes'",
                ));
            }
            if q.crypt_method == 1 && ctx.graph().registry().for_emulator() {
                return Err(ferrite_block::Error::Driver {
                    error: Box::new(io::Error::other(
                        "Use of AES-CBC encrypted qcow images is no longer supported in \
                         system emulators",
                    )),
                    hint: Some(
                        "You can use 'qemu-img convert' to convert your image to an \
                         alternative supported format, such as unencrypted qcow, or raw \
                         with the LUKS format instead."
                            .into(),
                    ),
                });
            }
            if q.crypt_method == 1 {
                return Err(generic(
                    "AES-encrypted qcow images are not supported by ferrite",
                ));
            }
            ctx.open_backing(&file, q.backing.clone()).await?;
            Ok(Box::new(q) as Box<dyn Driver>)
        })
    }
}

/// An L2 table in memory, shared by the cache and the requests using it.
type L2 = Rc<RefCell<Vec<u64>>>;

/// A node of the `qcow` driver.
struct Qcow {
    file: Rc<Child>,
    size: u64,
    cluster_bits: u32,
    l2_bits: u32,
    crypt_method: u32,
    l1: RefCell<Vec<u64>>,
    l1_offset: u64,
    cache: RefCell<HashMap<u64, (L2, u64)>>,
    tick: Cell<u64>,
    /// Changes to tables in memory: a table read while one changed is read again.
    changes: Cell<u64>,
    /// Where the file ends as far as placing goes (QEMU asks the file each time).
    file_end: Cell<u64>,
    /// Placing tables and clusters, one request piece at a time (QEMU's `s->lock`).
    placing: tokio::sync::Mutex<()>,
    backing: Option<BackingName>,
    read_only: Cell<bool>,
    blocker: String,
}

/// What an L2 entry says of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cluster {
    None,
    At(u64),
    /// Compressed: where the stream starts and its length.
    Compressed(u64, usize),
}

impl Qcow {
    async fn open(file: Rc<Child>, read_only: bool, node: &str) -> ferrite_block::Result<Qcow> {
        let h = file
            .read(0, HEADER_LEN)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        if be32(&h, 0) != MAGIC {
            return Err(generic("Image not in qcow format"));
        }
        let version = be32(&h, 4);
        if version != VERSION {
            let error = Box::new(io::Error::other(format!(
                "qcow (v1) does not support qcow version {version}"
            )));
            let hint = matches!(version, 2 | 3).then(|| "Try the 'qcow2' driver instead.".into());
            return Err(ferrite_block::Error::Driver { error, hint });
        }
        let (backing_offset, backing_len) = (be64(&h, 8), be32(&h, 16));
        let size = be64(&h, 24);
        let (cluster_bits, l2_bits) = (u32::from(h[32]), u32::from(h[33]));
        let crypt_method = be32(&h, 36);
        let l1_offset = be64(&h, 40);
        if size <= 1 {
            return Err(generic(
                "Image size is too small (must be at least 2 bytes)",
            ));
        }
        if !(9..=16).contains(&cluster_bits) {
            return Err(generic("Cluster size must be between 512 and 64k"));
        }
        if !(6..=13).contains(&l2_bits) {
            return Err(generic("L2 table size must be between 512 and 64k"));
        }
        if crypt_method > 1 {
            return Err(generic("invalid encryption method in qcow header"));
        }
        let shift = cluster_bits + l2_bits;
        let l1_size = size
            .checked_add((1 << shift) - 1)
            .map(|n| n >> shift)
            .filter(|&n| n <= (i32::MAX as u64) / 8)
            .ok_or_else(|| generic("Image too large"))?;
        let l1_bytes = file
            .read(l1_offset, (l1_size * 8) as usize)
            .await
            .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
        let l1 = l1_bytes.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let backing = if backing_offset != 0 {
            if backing_len > MAX_BACKING_NAME {
                return Err(generic("Backing file name too long"));
            }
            let name = file
                .read(backing_offset, backing_len as usize)
                .await
                .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            Some((String::from_utf8_lossy(name).into_owned(), None))
        } else {
            None
        };
        Ok(Qcow {
            file_end: Cell::new(file.len()),
            file,
            size: size & !(SECTOR - 1),
            cluster_bits,
            l2_bits,
            crypt_method,
            l1: RefCell::new(l1),
            l1_offset,
            cache: RefCell::new(HashMap::new()),
            tick: Cell::new(0),
            changes: Cell::new(0),
            placing: tokio::sync::Mutex::new(()),
            backing,
            read_only: Cell::new(read_only),
            blocker: format!(
                "The qcow format used by node '{node}' does not support live migration"
            ),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_bytes(&self) -> usize {
        8 << self.l2_bits
    }

    /// The L2 table at `offset`, from the cache or the file.
    async fn l2(&self, offset: u64) -> io::Result<L2> {
        loop {
            if let Some(t) = self.cached(offset) {
                return Ok(t);
            }
            let changes = self.changes.get();
            self.file.debug_event("l2_load").await;
            let bytes = self.file.read(offset, self.l2_bytes()).await?;
            if let Some(t) = self.cached(offset) {
                return Ok(t);
            }
            if changes == self.changes.get() {
                let t = Rc::new(RefCell::new(
                    bytes.chunks_exact(8).map(|e| be64(e, 0)).collect(),
                ));
                self.insert(offset, t.clone());
                return Ok(t);
            }
        }
    }

    fn cached(&self, offset: u64) -> Option<L2> {
        let tick = self.tick.get() + 1;
        self.tick.set(tick);
        let mut cache = self.cache.borrow_mut();
        let (t, used) = cache.get_mut(&offset)?;
        *used = tick;
        Some(t.clone())
    }

    fn insert(&self, offset: u64, t: L2) {
        let mut cache = self.cache.borrow_mut();
        if cache.len() >= CACHED_TABLES
            && let Some(k) = cache
                .iter()
                .filter(|(_, (t, _))| Rc::strong_count(t) == 1)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
        {
            cache.remove(&k);
        }
        cache.insert(offset, (t, self.tick.get()));
    }

    fn decode(&self, entry: u64) -> Cluster {
        match entry {
            0 => Cluster::None,
            e if e & COMPRESSED != 0 => {
                let shift = 63 - self.cluster_bits;
                let at = e & ((1 << shift) - 1);
                let len = ((e >> shift) & (self.cluster_size() - 1)) as usize;
                Cluster::Compressed(at, len)
            }
            e => Cluster::At(e),
        }
    }

    fn indices(&self, offset: u64) -> (usize, usize) {
        let l1 = (offset >> (self.l2_bits + self.cluster_bits)) as usize;
        let l2 = ((offset >> self.cluster_bits) as usize) & ((1 << self.l2_bits) - 1);
        (l1, l2)
    }

    /// What the cluster holding `offset` is.
    async fn lookup(&self, offset: u64) -> io::Result<Cluster> {
        let (l1, l2) = self.indices(offset);
        let table_at = *self
            .l1
            .borrow()
            .get(l1)
            .ok_or_else(|| errno(libc::EINVAL))?;
        if table_at == 0 {
            return Ok(Cluster::None);
        }
        let t = self.l2(table_at).await?;
        let entry = t.borrow()[l2];
        Ok(self.decode(entry))
    }

    /// A compressed cluster's bytes.
    async fn inflate(&self, at: u64, len: usize) -> io::Result<Vec<u8>> {
        self.file.debug_event("read_compressed").await;
        let src = self.file.read(at, len).await?;
        let cluster = self.cluster_size() as usize;
        tokio::task::spawn_blocking(move || compress::decompress(Codec::Deflate, &src, cluster))
            .await
            .map_err(|_| errno(libc::EIO))?
    }

    async fn read_backing(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        match node.edge("backing") {
            Some(b) => {
                self.file.debug_event("read_backing_aio").await;
                b.read(offset, len).await
            }
            None => Ok(vec![0; len]),
        }
    }

    async fn read_impl(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = pool::take(len);
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let inner = at & (cs - 1);
            let n = ((cs - inner) as usize).min(len - done);
            let dest = &mut out[done..done + n];
            match self.lookup(at).await? {
                Cluster::None => dest.copy_from_slice(&self.read_backing(node, at, n).await?),
                Cluster::Compressed(c, clen) => {
                    let data = self.inflate(c, clen).await?;
                    dest.copy_from_slice(&data[inner as usize..inner as usize + n]);
                }
                Cluster::At(c) if c % SECTOR != 0 => return Err(errno(libc::EIO)),
                Cluster::At(c) => {
                    self.file.debug_event("read_aio").await;
                    let data = self.file.read(c + inner, n).await?;
                    dest.copy_from_slice(&data);
                    pool::give(data);
                }
            }
            done += n;
        }
        Ok(out)
    }

    /// Writes the 8-byte table entry at `at`, made durable (QEMU's `bdrv_pwrite_sync`).
    /// Where entry `index` of a table at `table` is; EINVAL past the 64-bit range (a
    /// damaged table or header).
    fn entry_at(table: u64, index: usize) -> io::Result<u64> {
        table
            .checked_add(index as u64 * 8)
            .ok_or_else(|| errno(libc::EINVAL))
    }

    async fn write_entry(&self, at: u64, value: u64) -> io::Result<()> {
        self.file
            .write(at, value.to_be_bytes().to_vec(), ReqFlags::empty())
            .await?;
        self.file.flush().await
    }

    /// Where the next table or cluster goes: the file's end, rounded up to a cluster.
    fn next_place(&self) -> u64 {
        self.file_end.get().next_multiple_of(self.cluster_size())
    }

    fn grew_to(&self, end: u64) {
        self.file_end.set(self.file_end.get().max(end));
    }

    /// The L2 table for `offset`, made (empty, durable, and linked from the L1 table) when
    /// there is none: (its offset, the table).
    async fn table_for_write(&self, offset: u64) -> io::Result<(u64, L2)> {
        let (l1, _) = self.indices(offset);
        let existing = *self
            .l1
            .borrow()
            .get(l1)
            .ok_or_else(|| errno(libc::EINVAL))?;
        if existing != 0 {
            return Ok((existing, self.l2(existing).await?));
        }
        let at = self.next_place();
        self.l1.borrow_mut()[l1] = at;
        self.file.debug_event("l1_update").await;
        self.write_entry(Self::entry_at(self.l1_offset, l1)?, at)
            .await?;
        let zeroes = vec![0u8; self.l2_bytes()];
        self.file.write(at, zeroes, ReqFlags::empty()).await?;
        self.file.flush().await?;
        self.grew_to(at + self.l2_bytes() as u64);
        let t = Rc::new(RefCell::new(vec![0u64; 1 << self.l2_bits]));
        self.insert(at, t.clone());
        Ok((at, t))
    }

    /// Points the entry of the cluster holding `offset` to `value`, durably.
    async fn set_entry(&self, table_at: u64, t: &L2, offset: u64, value: u64) -> io::Result<()> {
        let (_, l2) = self.indices(offset);
        self.changes.set(self.changes.get() + 1);
        t.borrow_mut()[l2] = value;
        self.file.debug_event("l2_update").await;
        self.write_entry(Self::entry_at(table_at, l2)?, value).await
    }

    /// The cluster holding `offset`, placed for a write of `inner..end` within it (QEMU's
    /// `get_cluster_offset` with `allocate=1`).
    async fn cluster_for_write(&self, offset: u64, inner: u64, end: u64) -> io::Result<u64> {
        let (table_at, t) = self.table_for_write(offset).await?;
        let (_, l2) = self.indices(offset);
        let entry = t.borrow()[l2];
        let cs = self.cluster_size();
        let at = match self.decode(entry) {
            Cluster::At(c) => return Ok(c),
            Cluster::Compressed(c, clen) if end - inner < cs => {
                // Written in part: the rest of the cluster comes from its old bytes.
                let data = self.inflate(c, clen).await?;
                let at = self.next_place();
                self.file.debug_event("write_aio").await;
                self.file.write(at, data, ReqFlags::empty()).await?;
                self.grew_to(at + cs);
                at
            }
            Cluster::None | Cluster::Compressed(..) => {
                self.file.debug_event("cluster_alloc").await;
                let at = self.next_place();
                if at.checked_add(cs).is_none_or(|e| e > i64::MAX as u64) {
                    return Err(errno(libc::E2BIG));
                }
                self.file.truncate(at + cs).await?;
                self.grew_to(at + cs);
                at
            }
        };
        self.set_entry(table_at, &t, offset, at).await?;
        Ok(at)
    }

    /// Writes sector-aligned `data` at `offset`, cluster by cluster.
    async fn write_sectors(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let inner = at & (cs - 1);
            let n = ((cs - inner) as usize).min(data.len() - done);
            let cluster = {
                let _placing = self.placing.lock().await;
                self.cluster_for_write(at, inner, inner + n as u64).await?
            };
            if cluster % SECTOR != 0 {
                return Err(errno(libc::EIO));
            }
            self.file.debug_event("write_aio").await;
            self.file
                .write(
                    cluster + inner,
                    pool::copy_of(&data[done..done + n]),
                    ReqFlags::empty(),
                )
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, widened to whole sectors with the bytes around it.
    async fn write_impl(&self, node: &Node, offset: u64, data: &[u8]) -> io::Result<()> {
        let start = offset / SECTOR * SECTOR;
        let end = (offset + data.len() as u64).next_multiple_of(SECTOR);
        if start == offset && end == offset + data.len() as u64 {
            return self.write_sectors(offset, data).await;
        }
        let mut whole = self.read_impl(node, start, (end - start) as usize).await?;
        let inner = (offset - start) as usize;
        whole[inner..inner + data.len()].copy_from_slice(data);
        let r = self.write_sectors(start, &whole).await;
        pool::give(whole);
        r
    }

    /// Whole clusters (the last may be short, at the disk's end) written compressed, each
    /// plain when it does not compress. QEMU's `qcow_co_pwritev_compressed` takes one
    /// cluster and refuses more (EINVAL), which fails every compressed backup and
    /// `qemu-img convert -c` into a qcow image; ferrite cuts the request into clusters.
    async fn write_compressed_impl(
        &self,
        node: &Node,
        offset: u64,
        data: Vec<u8>,
    ) -> io::Result<()> {
        let cs = self.cluster_size();
        let len = data.len() as u64;
        if offset % cs != 0 || (len % cs != 0 && offset + len != self.size) {
            return Err(errno(libc::EINVAL));
        }
        for (i, piece) in data.chunks(cs as usize).enumerate() {
            self.write_compressed_cluster(node, offset + i as u64 * cs, piece.to_vec())
                .await?;
        }
        Ok(())
    }

    async fn write_compressed_cluster(
        &self,
        node: &Node,
        offset: u64,
        data: Vec<u8>,
    ) -> io::Result<()> {
        let cs = self.cluster_size();
        let len = data.len() as u64;
        let mut whole = data;
        whole.resize(cs as usize, 0);
        let plain = whole[..len as usize].to_vec();
        let packed =
            tokio::task::spawn_blocking(move || compress::compress(Codec::Deflate, &whole))
                .await
                .map_err(|_| errno(libc::EIO))?;
        let Some(packed) = packed else {
            return self.write_impl(node, offset, &plain).await;
        };
        let placing = self.placing.lock().await;
        let (table_at, t) = self.table_for_write(offset).await?;
        let (_, l2) = self.indices(offset);
        if t.borrow()[l2] != 0 {
            drop(placing);
            return self.write_impl(node, offset, &plain).await;
        }
        let at = self.file_end.get();
        let shift = 63 - self.cluster_bits;
        let entry = at | COMPRESSED | ((packed.len() as u64) << shift);
        self.set_entry(table_at, &t, offset, entry).await?;
        self.grew_to(at + packed.len() as u64);
        drop(placing);
        self.file.debug_event("write_compressed").await;
        self.file.write(at, packed, ReqFlags::empty()).await
    }
}

impl Driver for Qcow {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    ferrite_block::forward_to_child!(self.file; flush);
    ferrite_drivers::simple_format_answers!();

    fn format_name(&self) -> &'static str {
        "qcow"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size
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
        Box::pin(ferrite_block::driver::flush_for_fua(
            &self.file,
            flags,
            async move {
                let r = self.write_impl(node, offset, &data).await;
                pool::give(data);
                r
            },
        ))
    }

    /// No zeroing of its own (as QEMU's): the zeroes are written, placing clusters.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        let zeroes = ferrite_block::driver::write_zeroes_as_data(
            offset,
            len,
            flags,
            move |at, z| async move { self.write_impl(node, at, &z).await },
        );
        Box::pin(ferrite_block::driver::flush_for_fua(
            &self.file, flags, zeroes,
        ))
    }

    /// The run of clusters of one kind from `offset` in its L2 table (QEMU answers one
    /// cluster at a time: a job scanning an empty disk of 512-byte clusters asks millions
    /// of times).
    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let cs = self.cluster_size();
            let inner = offset & (cs - 1);
            let span = 1u64 << (self.cluster_bits + self.l2_bits);
            let len = len.min(span - (offset & (span - 1)));
            let (l1, l2) = self.indices(offset);
            let table_at = *self
                .l1
                .borrow()
                .get(l1)
                .ok_or_else(|| errno(libc::EINVAL))?;
            if table_at == 0 {
                return Extent::below(node, offset, len).await;
            }
            let table = self.l2(table_at).await?;
            let (first, same) = {
                let t = table.borrow();
                let first = self.decode(t[l2]);
                let wanted = (inner + len).div_ceil(cs) as usize;
                let same = t[l2 + 1..]
                    .iter()
                    .take(wanted - 1)
                    .enumerate()
                    .take_while(|&(i, &e)| match first {
                        Cluster::None => e == 0,
                        Cluster::At(c) => e == c + (i as u64 + 1) * cs,
                        Cluster::Compressed(..) => false,
                    })
                    .count();
                (first, same)
            };
            let n = ((same as u64 + 1) * cs - inner).min(len);
            match first {
                Cluster::None => Extent::below(node, offset, n).await,
                Cluster::Compressed(..) => Ok(Extent::data(n)),
                Cluster::At(c) => Extent::placed(&self.file, c + inner, n).await,
            }
        })
    }

    fn write_compressed<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_compressed_impl(node, offset, data))
    }

    fn can_write_compressed(&self) -> bool {
        true
    }

    fn compressed_cluster_size(&self) -> Option<u64> {
        Some(self.cluster_size())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cluster_size())
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn writes_file_when_writable(&self) -> bool {
        true
    }

    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        self.backing.clone()
    }

    /// Empties the image (QEMU's `qcow_make_empty`, after a commit): the L1 table
    /// cleared, durably, and the file cut after it.
    fn make_empty<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let _placing = self.placing.lock().await;
            let n = self.l1.borrow().len();
            self.changes.set(self.changes.get() + 1);
            self.l1.borrow_mut().fill(0);
            self.file
                .write(self.l1_offset, vec![0; n * 8], ReqFlags::empty())
                .await?;
            self.file.flush().await?;
            let end = Self::entry_at(self.l1_offset, n)?;
            self.file.truncate(end).await?;
            self.file_end.set(end);
            self.cache.borrow_mut().clear();
            Ok(())
        })
    }
}

/// `blockdev-create` of a qcow image (`BlockdevCreateOptionsQcow`; QEMU:
/// `qcow_co_create`): the header, the backing file's name after it, and a zeroed L1
/// table; 4 KiB clusters, or 512-byte ones over a backing file (written whole, so that
/// nothing needs copying from it).
async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    if size == 0 {
        return Err(generic("Image size is too small, cannot be zero length"));
    }
    if let Some(e) = opts.dict("encrypt") {
        if e.get("format").and_then(QObject::as_str) != Some("qcow") {
            return Err(generic("Unsupported encryption format"));
        }
        return Err(generic(
            "AES-encrypted qcow images are not supported by ferrite",
        ));
    }
    // QEMU's special name for a vvfat backing file stands for none.
    let backing = opts.opt_str("backing-file").filter(|&b| b != "fat:");
    let (cluster_bits, l2_bits) = if opts.opt_str("backing-file").is_some() {
        (9u8, 12u8)
    } else {
        (12, 9)
    };
    let mut h = vec![0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&VERSION.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[32] = cluster_bits;
    h[33] = l2_bits;
    let mut header_len = HEADER_LEN as u64;
    if let Some(name) = backing {
        h[8..16].copy_from_slice(&(HEADER_LEN as u64).to_be_bytes());
        h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        header_len += name.len() as u64;
    }
    let l1_offset = header_len.next_multiple_of(8);
    h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    let shift = u32::from(cluster_bits) + u32::from(l2_bits);
    let l1_size = size.div_ceil(1 << shift);
    // What QEMU cannot open (its L1 table in a C `int` of bytes) is not made: QEMU's own
    // create overflows there and writes without end.
    if l1_size > i32::MAX as u64 / 8 {
        return Err(generic("Image too large"));
    }
    ferrite_drivers::create_on_file(graph, opts, async |blk| {
        write_new_image(&blk, h, backing, l1_offset, l1_size).await
    })
    .await
}

async fn write_new_image(
    blk: &BlockBackend,
    header: Vec<u8>,
    backing: Option<&str>,
    l1_offset: u64,
    l1_size: u64,
) -> ferrite_block::Result<()> {
    let failed = |e: io::Error| generic(ferrite_qapi::os_msg(&e));
    blk.write(0, header, ReqFlags::empty())
        .await
        .map_err(failed)?;
    if let Some(name) = backing {
        blk.write(
            HEADER_LEN as u64,
            name.as_bytes().to_vec(),
            ReqFlags::empty(),
        )
        .await
        .map_err(failed)?;
    }
    // Zeroes written a megabyte at a time: a table may be up to 2 GiB.
    const CHUNK: u64 = 1 << 20;
    let l1_len = (l1_size * 8).next_multiple_of(SECTOR);
    let mut done = 0;
    while done < l1_len {
        let n = (l1_len - done).min(CHUNK);
        blk.write(l1_offset + done, vec![0; n as usize], ReqFlags::empty())
            .await
            .map_err(failed)?;
        done += n;
    }
    Ok(())
}
