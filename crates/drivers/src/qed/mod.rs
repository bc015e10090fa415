//! `qed`: QEMU Enhanced Disk images (QEMU: block/qed.c). The disk is cut into clusters
//! placed by two levels of tables ([`table`]); a cluster is found in the file, reads as
//! zeroes, or is left to the backing file the header names.
//!
//! As under QEMU:
//! - a new cluster goes at the end of the file, written whole (the rest from the backing
//!   file, or zeroes), then its L2 entry is written; a new L2 table is written and made
//!   durable before the L1 entry that points to it;
//! - with a backing file the new data is made durable before its L2 entry; without one
//!   the header's need-check flag is set before the first new cluster, and cleared again
//!   (after a flush) five seconds after the last allocating write, at once when the node
//!   is drained, and when it closes;
//! - an image opened writable with the flag set is checked and repaired first ([`check`]);
//! - zeroes written over whole clusters make zero clusters; only growing resizes.
//!
//! Unlike QEMU (one request placing clusters at a time, to its end): writes placing
//! different clusters go on together, only their table updates taking turns; writes into
//! placed clusters, and reads, never wait for them; a partial write into a zero cluster fills the rest of the cluster
//! with zeroes (QEMU copies the backing file's bytes there, which then show through);
//! images of one-cluster tables open (QEMU refuses them all).

mod check;
mod create;
mod header;
mod table;

use crate::blockmap;
use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags, flush_for_fua};
use ferrite_block::io::pool;
use ferrite_block::units::UnitLocks;
use ferrite_block::{
    BackingName, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx,
};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use header::{F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE, F_NEED_CHECK, HEADER_LEN, Header};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Duration;
use table::{Run, Tables, ZERO_CLUSTER};

/// Longest backing file name QEMU keeps (`bs->backing_file`, `PATH_MAX`), its NUL
/// included.
const MAX_BACKING_NAME: u32 = 4096;
/// How long after the last allocating write the need-check flag is cleared.
const NEED_CHECK_DELAY: Duration = Duration::from_secs(5);
const SECTOR: u64 = 512;

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// The `qed` driver's factory.
pub(crate) struct QedFactory;

impl DriverFactory for QedFactory {
    fn name(&self) -> &'static str {
        "qed"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU's test: a whole header with the magic.
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= HEADER_LEN && head.starts_with(b"QED\0")
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

    /// By name, QEMU rounds the size up to a sector.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        let size = opts.get("size").and_then(QObject::as_u64).unwrap_or(0);
        opts.insert("size", size.next_multiple_of(SECTOR));
        Ok(opts)
    }

    fn formatting_options(&self, size: u64, backing: Option<(&str, &str)>) -> String {
        format!(
            "size={size}{} cluster_size=65536",
            ferrite_block::backing_options(backing)
        )
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let (file, read_only) = blockmap::open_file(ctx).await?;
            let active = ctx.opens_active();
            let state = State::open(file.clone(), !read_only && active).await?;
            ctx.take_position_now();
            let backing = state.backing.borrow().clone();
            ctx.open_backing(&file, backing).await?;
            let state = Rc::new(state);
            if !read_only && active && state.header.borrow().has(F_NEED_CHECK) {
                state.arm_timer();
            }
            Ok(Box::new(Qed {
                s: state,
                read_only: Cell::new(read_only),
            }) as Box<dyn Driver>)
        })
    }
}

/// What a node's requests and its timer share.
struct State {
    file: Rc<Child>,
    header: RefCell<Header>,
    tables: Tables,
    /// The file's length as far as clusters go: new ones are placed here.
    file_size: Cell<u64>,
    /// The backing file the header names.
    backing: RefCell<Option<BackingName>>,
    /// Clusters a request is placing (by index): another request waits for them.
    claims: UnitLocks,
    /// Table and header updates, one at a time.
    meta: tokio::sync::Mutex<()>,
    /// Runs of clusters being placed.
    placing: Cell<usize>,
    /// The need-check flag is being cleared (under `meta`).
    flag_clearing: Cell<bool>,
    /// When the need-check timer fires, if it is pending; and whether its task runs.
    deadline: Cell<Option<Duration>>,
    timer_task: Cell<bool>,
    /// The flag is being cleared outside any request (a drain waits).
    clearing: Cell<bool>,
}

impl State {
    /// Reads and checks the header and the L1 table; `fix` when the image may be changed
    /// (writable and active): unknown autoclear features are dropped and an image not
    /// closed cleanly is checked and repaired.
    async fn open(file: Rc<Child>, fix: bool) -> ferrite_block::Result<State> {
        let n = file.len().min(HEADER_LEN as u64) as usize;
        let bytes = file
            .read(0, n)
            .await
            .map_err(|_| generic("Failed to read QED header"))?;
        let mut head = [0u8; HEADER_LEN];
        head[..n].copy_from_slice(&bytes);
        let (magic, mut h) = Header::parse(&head);
        if magic != header::MAGIC {
            return Err(generic("Image not in QED format"));
        }
        if h.features & !header::FEATURE_MASK != 0 {
            return Err(generic(format!(
                "Unsupported QED features: {:x}",
                h.features & !header::FEATURE_MASK
            )));
        }
        if !header::cluster_size_valid(h.cluster_size.into()) {
            return Err(generic("QED cluster size is invalid"));
        }
        let file_size = file.len() & !(u64::from(h.cluster_size) - 1);
        if !header::table_size_valid(h.table_size.into()) {
            return Err(generic("QED table size is invalid"));
        }
        if !header::image_size_valid(h.image_size, h.cluster_size, h.table_size) {
            return Err(generic("QED image size is invalid"));
        }
        let g = table::Geometry::new(&h);
        if !g.table_valid(h.l1_table_offset, file_size) {
            return Err(generic("QED table offset is invalid"));
        }
        if h.header_size > u32::MAX / h.cluster_size {
            return Err(generic("QED header size is too large"));
        }
        let backing = if h.has(F_BACKING_FILE) {
            Some(read_backing_name(&file, &h).await?)
        } else {
            None
        };
        if h.autoclear_features != 0 && fix {
            h.autoclear_features = 0;
            let written = async {
                write_header_bytes(&file, &h).await?;
                file.flush().await
            };
            written
                .await
                .map_err(|_| generic("Failed to update header"))?;
        }
        let tables = Tables::read(&file, &h)
            .await
            .map_err(|_| generic("Failed to read L1 table"))?;
        let s = State {
            file,
            header: RefCell::new(h),
            tables,
            file_size: Cell::new(file_size),
            backing: RefCell::new(backing),
            claims: UnitLocks::default(),
            meta: tokio::sync::Mutex::new(()),
            placing: Cell::new(0),
            flag_clearing: Cell::new(false),
            deadline: Cell::new(None),
            timer_task: Cell::new(false),
            clearing: Cell::new(false),
        };
        if fix && s.header.borrow().has(F_NEED_CHECK) {
            s.check_and_repair()
                .await
                .map_err(|_| generic("Image corrupted"))?;
            // Still set (clusters claimed twice): QEMU's timer is pending, and the drains
            // that follow every open fire it at once, clearing the flag all the same.
            if s.header.borrow().has(F_NEED_CHECK) {
                s.clear_need_check().await;
            }
        }
        Ok(s)
    }

    /// QEMU's check of an image not closed cleanly, fixing what it can; marked clean when
    /// nothing is left to fix.
    async fn check_and_repair(&self) -> io::Result<()> {
        let l1_offset = self.header.borrow().l1_table_offset;
        let report =
            check::check(&self.tables, &self.file, l1_offset, self.file_size.get()).await?;
        if report.corruptions == 0 {
            self.file.flush().await?;
            self.set_need_check(false, true).await?;
        }
        Ok(())
    }

    fn geometry(&self) -> table::Geometry {
        self.tables.geometry
    }

    async fn find(&self, pos: u64, len: u64) -> io::Result<(Run, u64, Option<table::L2>)> {
        self.tables
            .find(&self.file, self.file_size.get(), pos, len)
            .await
    }

    /// Sets or clears the need-check flag in the header: in its first sector as QEMU's
    /// allocating writes do, or (`whole`) the header structure alone as its open and
    /// close do.
    async fn set_need_check(&self, on: bool, whole: bool) -> io::Result<()> {
        let h = {
            let mut h = self.header.borrow_mut();
            if on {
                h.features |= F_NEED_CHECK;
            } else {
                h.features &= !F_NEED_CHECK;
            }
            h.clone()
        };
        if whole {
            return write_header_bytes(&self.file, &h).await;
        }
        let mut sector = self.file.read(0, SECTOR as usize).await?;
        sector[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        self.file.write(0, sector, ReqFlags::empty()).await
    }

    /// Starts (again) the wait after which the need-check flag is cleared: one task
    /// sleeps until the latest deadline.
    fn arm_timer(self: &Rc<State>) {
        self.deadline
            .set(Some(ferrite_block::clock::now() + NEED_CHECK_DELAY));
        if self.timer_task.replace(true) {
            return;
        }
        let weak = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            loop {
                let Some(s) = weak.upgrade() else {
                    return;
                };
                let Some(deadline) = s.deadline.get() else {
                    s.timer_task.set(false);
                    return;
                };
                let now = ferrite_block::clock::now();
                if now >= deadline {
                    s.deadline.set(None);
                    s.timer_task.set(false);
                    s.clear_need_check().await;
                    return;
                }
                drop(s);
                ferrite_block::clock::sleep(deadline - now).await;
            }
        });
    }

    fn cancel_timer(&self) {
        self.deadline.set(None);
    }

    /// The timer's work: unless a write is placing clusters, the file made durable, then
    /// the flag cleared (QEMU's `qed_need_check_timer`). Failures leave the flag set.
    async fn clear_need_check(&self) {
        if self.placing.get() > 0 {
            return;
        }
        let Ok(_plugged) = self.meta.try_lock() else {
            return;
        };
        // Placements that start now wait for the flag's new state.
        self.flag_clearing.set(true);
        self.clear_flag().await;
        self.flag_clearing.set(false);
    }

    async fn clear_flag(&self) {
        if self.file.flush().await.is_err() {
            return;
        }
        if self.set_need_check(false, false).await.is_ok() {
            let _ = self.file.flush().await;
        }
    }

    /// The timer's work now, as a drain begins, which waits for it.
    fn clear_now(self: &Rc<State>) {
        if self.deadline.get().is_none() {
            return;
        }
        self.cancel_timer();
        self.clearing.set(true);
        let s = self.clone();
        tokio::task::spawn_local(async move {
            s.clear_need_check().await;
            s.clearing.set(false);
            ferrite_block::notify_progress();
        });
    }
}

/// Reads the backing file name the header places (QEMU's `qed_read_string`).
async fn read_backing_name(file: &Child, h: &Header) -> ferrite_block::Result<BackingName> {
    let (at, len) = (h.backing_filename_offset, h.backing_filename_size);
    if u64::from(at) + u64::from(len) > u64::from(h.cluster_size) * u64::from(h.header_size) {
        return Err(generic("QED backing filename offset is invalid"));
    }
    let failed = || generic("Failed to read backing filename");
    if len >= MAX_BACKING_NAME {
        return Err(failed());
    }
    let end = (u64::from(at) + u64::from(len)).min(file.len());
    let bytes = match end.checked_sub(at.into()) {
        Some(n) => file
            .read(at.into(), n as usize)
            .await
            .map_err(|_| failed())?,
        None => Vec::new(),
    };
    // A C string: up to its first NUL.
    let name = bytes.split(|&b| b == 0).next().unwrap_or_default();
    let format = h.has(F_BACKING_FORMAT_NO_PROBE).then(|| "raw".to_owned());
    Ok((String::from_utf8_lossy(name).into_owned(), format))
}

/// The header structure alone, over the file's first bytes (QEMU's
/// `qed_write_header_sync`).
async fn write_header_bytes(file: &Child, h: &Header) -> io::Result<()> {
    file.write(0, h.to_bytes().to_vec(), ReqFlags::empty())
        .await
}

/// What a write puts in the clusters it covers.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Data(&'a [u8]),
    /// Zeroes, over whole clusters: zero clusters where none is placed.
    Zeroes,
}

/// A node of the `qed` driver.
struct Qed {
    s: Rc<State>,
    read_only: Cell<bool>,
}

impl Qed {
    fn has_backing(node: &Node) -> bool {
        node.child("backing").is_some()
    }

    /// `len` bytes the backing file holds at `pos`, zeroes without one.
    async fn read_backing(&self, node: &Node, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        match node.edge("backing") {
            Some(b) => {
                self.s.file.debug_event("read_backing_aio").await;
                b.read(pos, len).await
            }
            None => {
                let mut z = pool::take(len);
                z.fill(0);
                Ok(z)
            }
        }
    }

    async fn read_impl(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        blockmap::gather(offset, len, async |at, max| {
            let (run, n, _) = self.s.find(at, max as u64).await?;
            let n = n as usize;
            let bytes = match run {
                Run::Found(file_at) => {
                    self.s.file.debug_event("read_aio").await;
                    Some(self.s.file.read(file_at, n).await?)
                }
                Run::Zero => None,
                Run::NoCluster | Run::NoTable => Some(self.read_backing(node, at, n).await?),
            };
            Ok((n, bytes))
        })
        .await
    }

    /// Writes `len` bytes at `offset` (QEMU's `qed_aio_next_io` for writes): in place where
    /// clusters are found, else placing them, each run of clusters claimed by one request
    /// at a time.
    async fn write_impl(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        payload: Payload<'_>,
    ) -> io::Result<()> {
        let s = &self.s;
        let cluster = s.geometry().cluster;
        let mut at = offset;
        while at < offset + len {
            let (run, n, _) = s.find(at, offset + len - at).await?;
            let done = (at - offset) as usize;
            match (run, payload) {
                (Run::Found(file_at), Payload::Data(d)) => {
                    s.file.debug_event("write_aio").await;
                    let piece = pool::copy_of(&d[done..done + n as usize]);
                    s.file.write(file_at, piece, ReqFlags::empty()).await?;
                }
                (Run::Found(file_at), Payload::Zeroes) => {
                    s.file.debug_event("write_aio").await;
                    s.file
                        .write(file_at, vec![0; n as usize], ReqFlags::empty())
                        .await?;
                }
                (Run::Zero, Payload::Zeroes) => {}
                _ => {
                    // Claim the clusters, then look again: another request may have
                    // placed them while this one waited.
                    let (first, end) = (at / cluster, (at + n).div_ceil(cluster));
                    let _claim = s.claims.claim(first, end).await;
                    let (run, n, _) = s.find(at, n).await?;
                    if matches!(
                        (run, payload),
                        (Run::Found(_), _) | (Run::Zero, Payload::Zeroes)
                    ) {
                        continue;
                    }
                    let piece = match payload {
                        Payload::Data(d) => Payload::Data(&d[done..done + n as usize]),
                        Payload::Zeroes => Payload::Zeroes,
                    };
                    self.place(node, at, n, run, piece).await?;
                    at += n;
                    continue;
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Places the clusters of `pos..pos + len` (one run of `run`'s kind in one L2 table,
    /// claimed by the caller) and writes `payload` there (QEMU's `qed_aio_write_alloc`).
    /// Placements of other clusters go on meanwhile; their table updates take turns.
    async fn place(
        &self,
        node: &Node,
        pos: u64,
        len: u64,
        run: Run,
        payload: Payload<'_>,
    ) -> io::Result<()> {
        let s = &self.s;
        s.cancel_timer();
        s.placing.set(s.placing.get() + 1);
        let r = self.place_claimed(node, pos, len, run, payload).await;
        let left = s.placing.get() - 1;
        s.placing.set(left);
        if left == 0 && s.header.borrow().has(F_NEED_CHECK) {
            s.arm_timer();
        }
        r
    }

    async fn place_claimed(
        &self,
        node: &Node,
        pos: u64,
        len: u64,
        run: Run,
        payload: Payload<'_>,
    ) -> io::Result<()> {
        let s = &self.s;
        let g = s.geometry();
        let start = pos - g.in_cluster(pos);
        let clusters = (g.in_cluster(pos) + len).div_ceil(g.cluster);
        let backing = Self::has_backing(node);
        // Without a backing file the flag says the tables may not match the file; it is
        // on disk before any new cluster, and not cleared while clusters are placed.
        if !backing && (!s.header.borrow().has(F_NEED_CHECK) || s.flag_clearing.get()) {
            let _meta = s.meta.lock().await;
            if !s.header.borrow().has(F_NEED_CHECK) {
                s.set_need_check(true, false).await?;
            }
        }
        let entry = match payload {
            Payload::Zeroes => ZERO_CLUSTER,
            Payload::Data(_) => {
                let at = s.file_size.get();
                s.file_size.set(at + clusters * g.cluster);
                at
            }
        };
        if let Payload::Data(data) = payload {
            let whole_len = (clusters * g.cluster) as usize;
            let inner = (pos - start) as usize;
            let tail = start + (inner + data.len()) as u64;
            let mut whole = pool::take(whole_len);
            // The rest of the clusters: zeroes for zero clusters, else what was visible
            // there, the backing file's.
            if run == Run::Zero {
                whole.fill(0);
            } else {
                let head = self.read_backing(node, start, inner).await?;
                whole[..inner].copy_from_slice(&head);
                pool::give(head);
                let back = self
                    .read_backing(node, tail, whole_len - inner - data.len())
                    .await?;
                whole[inner + data.len()..].copy_from_slice(&back);
                pool::give(back);
            }
            whole[inner..inner + data.len()].copy_from_slice(data);
            // QEMU writes the copied parts first (`cow_write`), then the new data.
            if whole_len != data.len() {
                s.file.debug_event("cow_write").await;
            }
            s.file.debug_event("write_aio").await;
            s.file.write(entry, whole, ReqFlags::empty()).await?;
            if backing {
                // Before the L2 entry: a crash must not leave an entry pointing to a
                // cluster whose backing bytes were never written.
                s.file.flush().await?;
            }
        }
        let _meta = s.meta.lock().await;
        self.link(pos, clusters, entry).await
    }

    /// Points the L2 entries of `clusters` clusters from `pos` to `entry` (and the
    /// clusters after it), making the L2 table first when there is none. Table updates
    /// take turns (the caller holds `meta`), so each write of a table's sector has the
    /// latest entries.
    async fn link(&self, pos: u64, clusters: u64, entry: u64) -> io::Result<()> {
        let s = &self.s;
        let g = s.geometry();
        let first = g.l2_index(pos);
        let n = clusters as usize;
        let fill = |t: &mut [u64]| {
            for (i, e) in t[first..first + n].iter_mut().enumerate() {
                *e = if entry == ZERO_CLUSTER {
                    ZERO_CLUSTER
                } else {
                    entry + i as u64 * g.cluster
                };
            }
        };
        let index = g.l1_index(pos);
        let l2_at = s.tables.l1.borrow()[index];
        if l2_at == 0 {
            let table_at = s.file_size.get();
            s.file_size.set(table_at + g.table_bytes());
            let mut t = vec![0u64; g.entries];
            fill(&mut t);
            s.file.debug_event("l2_update").await;
            Tables::write(&s.file, table_at, &t, 0, g.entries).await?;
            s.file.flush().await?;
            let t = Rc::new(RefCell::new(t));
            s.tables.insert(table_at, t.clone());
            s.tables.changing();
            s.tables.l1.borrow_mut()[index] = table_at;
            s.file.debug_event("l1_update").await;
            let r = s.tables.write_l1(&s.file, index, 1).await;
            drop(t);
            return r;
        }
        let t = s.tables.l2(&s.file, l2_at).await?;
        s.tables.changing();
        fill(&mut t.borrow_mut());
        let entries = t.borrow().clone();
        s.file.debug_event("l2_update").await;
        let r = Tables::write(&s.file, l2_at, &entries, first, n).await;
        drop(t);
        r
    }

    /// Zeroes `offset..offset + len`: whole clusters as zero clusters, the unaligned ends
    /// as data (QEMU's block layer cuts the request at the clusters, and falls back to
    /// data for the ends its driver refuses).
    async fn zeroes(&self, node: &Node, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        let cluster = self.s.geometry().cluster;
        let end = offset + len;
        let (a, b) = (offset.next_multiple_of(cluster), end / cluster * cluster);
        let (a, b) = if a < b { (a, b) } else { (end, end) };
        for (from, to) in [(offset, a.min(end)), (a, b), (b.max(a), end)] {
            if from >= to {
                continue;
            }
            if from == a && to == b {
                self.write_impl(node, from, to - from, Payload::Zeroes)
                    .await?;
            } else {
                ferrite_block::driver::write_zeroes_as_data(from, to - from, flags, |at, z| {
                    let len = z.len() as u64;
                    async move { self.write_impl(node, at, len, Payload::Data(&z)).await }
                })
                .await?;
            }
        }
        Ok(())
    }
}

impl Driver for Qed {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    ferrite_block::forward_to_child!(self.s.file; flush);
    crate::format_child_answers!();

    fn format_name(&self) -> &'static str {
        "qed"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.s.header.borrow().image_size
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
        Box::pin(flush_for_fua(&self.s.file, flags, async move {
            let len = data.len() as u64;
            // Into clusters placed in one run: the caller's buffer goes to the file as is.
            if let (Run::Found(at), n, _) = self.s.find(offset, len).await?
                && n == len
            {
                self.s.file.debug_event("write_aio").await;
                return self.s.file.write(at, data, ReqFlags::empty()).await;
            }
            let r = self
                .write_impl(node, offset, len, Payload::Data(&data))
                .await;
            pool::give(data);
            r
        }))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(flush_for_fua(
            &self.s.file,
            flags,
            self.zeroes(node, offset, len, flags),
        ))
    }

    /// QEMU's driver has no discard: the request succeeds and nothing changes.
    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let (run, n, _) = self.s.find(offset, len).await?;
            match run {
                Run::Found(at) => Extent::placed(&self.s.file, at, n).await,
                Run::Zero => Ok(blockmap::unplaced(n)),
                Run::NoCluster | Run::NoTable => Extent::below(node, offset, n).await,
            }
        })
    }

    /// Grows only, within what the tables reach; the header says the new size.
    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.s;
            let mut h = s.header.borrow().clone();
            if !header::image_size_valid(size, h.cluster_size, h.table_size) {
                return Err(io::Error::other("Invalid image size specified"));
            }
            if size < h.image_size {
                return Err(io::Error::other(
                    "Shrinking images is currently not supported",
                ));
            }
            h.image_size = size;
            write_header_bytes(&s.file, &h).await.map_err(|e| {
                io::Error::other(format!(
                    "Failed to update the image size: {}",
                    ferrite_qapi::os_msg(&e)
                ))
            })?;
            s.header.borrow_mut().image_size = size;
            Ok(())
        })
    }

    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        prealloc: Prealloc,
    ) -> BoxFut<'a, ()> {
        match prealloc {
            Prealloc::Off => self.truncate(node, size),
            Prealloc::Falloc => {
                Box::pin(async { Err(io::Error::other("Unsupported preallocation mode 'falloc'")) })
            }
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn writes_file_when_writable(&self) -> bool {
        true
    }

    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        self.s.backing.borrow().clone()
    }

    /// A new header with the new name after it, made durable (QEMU's
    /// `bdrv_qed_co_change_backing_file`).
    fn change_backing_file<'a>(
        &'a self,
        _node: &'a Node,
        name: Option<String>,
        format: Option<String>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.s;
            let mut h = s.header.borrow().clone();
            if name.is_some() && h.compat_features != 0 {
                return Err(errno(libc::ENOTSUP));
            }
            h.features &= !(F_BACKING_FILE | F_BACKING_FORMAT_NO_PROBE);
            if name.is_some() {
                h.features |= F_BACKING_FILE;
                if format.as_deref() == Some("raw") {
                    h.features |= F_BACKING_FORMAT_NO_PROBE;
                }
            }
            let bytes = name.as_deref().unwrap_or_default().as_bytes();
            h.backing_filename_offset = HEADER_LEN as u32;
            h.backing_filename_size = bytes.len() as u32;
            let total = (HEADER_LEN + bytes.len()) as u64;
            if total > u64::from(h.header_size) * u64::from(h.cluster_size) {
                return Err(errno(libc::ENOSPC));
            }
            let mut buf = h.to_bytes().to_vec();
            buf.extend_from_slice(bytes);
            s.file.write(0, buf, ReqFlags::empty()).await?;
            s.file.flush().await?;
            let format = h.has(F_BACKING_FORMAT_NO_PROBE).then(|| "raw".to_owned());
            *s.header.borrow_mut() = h;
            *s.backing.borrow_mut() = name.map(|n| (n, format));
            Ok(())
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.s.geometry().cluster)
    }

    fn dirty_flag(&self) -> bool {
        self.s.header.borrow().has(F_NEED_CHECK)
    }

    fn drained_begin(&self) {
        self.s.clear_now();
    }

    fn busy(&self) -> bool {
        self.s.clearing.get()
    }

    /// Reads the header and tables again, checking the image as opening does.
    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.s;
            s.cancel_timer();
            let fresh = State::open(s.file.clone(), !self.read_only.get())
                .await
                .map_err(|e| io::Error::other(format!("Could not reopen qed layer: {e}")))?;
            *s.header.borrow_mut() = fresh.header.into_inner();
            *s.backing.borrow_mut() = fresh.backing.into_inner();
            s.file_size.set(fresh.file_size.get());
            s.tables.changing();
            s.tables.clear_cache();
            *s.tables.l1.borrow_mut() = fresh.tables.l1.into_inner();
            if !self.read_only.get() && s.header.borrow().has(F_NEED_CHECK) {
                s.arm_timer();
            }
            Ok(())
        })
    }

    /// Made durable, then marked clean (QEMU's `bdrv_qed_do_close`); an image another
    /// process owns (inactive) is left alone.
    fn close<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.s;
            s.cancel_timer();
            if self.read_only.get() || !node.is_active() {
                return Ok(());
            }
            s.file.flush().await?;
            if s.header.borrow().has(F_NEED_CHECK) {
                s.set_need_check(false, true).await?;
            }
            Ok(())
        })
    }
}

/// Where `pos` falls in its table, for tests.
#[cfg(test)]
mod tests {
    use super::header::Header;
    use super::table::Geometry;

    #[test]
    fn positions_map_to_table_entries() {
        let h = Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            ..Header::default()
        };
        let g = Geometry::new(&h);
        assert_eq!(g.entries, 32768);
        let l2_span = 32768 * 65536u64;
        assert_eq!(g.l1_index(l2_span * 3 + 5), 3);
        assert_eq!(g.l2_index(l2_span * 3 + 65536 * 7 + 5), 7);
        assert_eq!(g.left_in_l2(l2_span - 10), 10);
        assert!(g.table_valid(65536, 5 * 65536));
        assert!(!g.table_valid(65536, 4 * 65536));
        assert!(!g.cluster_valid(65536 + 512, 1 << 30));
        // One-cluster tables: QEMU's check refuses every one; this one is sound.
        let g1 = Geometry::new(&Header { table_size: 1, ..h });
        assert!(g1.table_valid(65536, 2 * 65536));
    }
}
