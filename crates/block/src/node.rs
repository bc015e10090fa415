//! A node of the block graph and the request path through it (QEMU: `BlockDriverState`,
//! `block/io.c`).

use crate::bitmap::DirtyBitmap;
use crate::driver::{Driver, Extent, ReqFlags};
use crate::perm::Perm;
use crate::stats::{IoKind, Stats};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Instant;
use tokio::sync::Notify;

/// What happens to write-zeroes requests that could unmap (QAPI `BlockdevDetectZeroesOptions`
/// covers writes of zeroes; `discard` decides whether discards reach the storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as given.
    Off,
    /// Writes of all-zero buffers become write-zeroes.
    On,
    /// ... and may unmap (with `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Who uses a node: another node through a named child edge, or a root user (an export, a
/// job, a temporary user of a QMP command).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// Node `parent` uses this node as its child `child`.
    Node {
        /// The parent's node name.
        parent: String,
        /// The edge name (`file`, `backing`).
        child: String,
    },
    /// A root user, with a description for error messages (`block device`).
    Root(String),
}

/// One use of a node and the permissions it takes and shares.
#[derive(Debug, Clone)]
pub struct Use {
    pub(crate) id: u64,
    /// Who.
    pub parent: Parent,
    /// What it takes.
    pub perm: Perm,
    /// What it lets others take.
    pub shared: Perm,
}

/// An edge from a parent node to a child.
#[derive(Clone)]
pub struct Child {
    /// The edge name (`file`).
    pub name: String,
    /// The child node.
    pub node: Rc<Node>,
    pub(crate) use_id: u64,
}

/// A node of the block graph.
///
/// # Invariants
/// - `children` and `users` change only in `graph`, through `Graph::attach`/`detach` and node
///   creation and deletion, which check permissions first.
/// - Each child's use holds what the driver's `child_perm` returns for this node's users.
/// - No two uses of a node conflict (one takes what another does not share).
pub struct Node {
    pub(crate) name: String,
    pub(crate) driver: Box<dyn Driver>,
    pub(crate) options: RefCell<QDict>,
    pub(crate) read_only: Cell<bool>,
    pub(crate) children: RefCell<Vec<Child>>,
    pub(crate) users: RefCell<Vec<Use>>,
    pub(crate) stats: RefCell<Stats>,
    pub(crate) detect_zeroes: Cell<DetectZeroes>,
    pub(crate) discard_unmap: Cell<bool>,
    pub(crate) cache_direct: bool,
    pub(crate) cache_no_flush: bool,
    pub(crate) write_threshold: Cell<u64>,
    pub(crate) threshold_hit: RefCell<Option<ThresholdHook>>,
    /// Dirty bitmaps, newest first.
    pub(crate) bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
    in_flight: Cell<u64>,
    quiesce: Cell<u32>,
    idle: Notify,
    resumed: Notify,
}

/// Called when a write crosses the node's write threshold: (node, bytes past it, threshold).
pub(crate) type ThresholdHook = Box<dyn Fn(&Node, u64, u64)>;

/// A drained section: root users (exports, jobs) start no new requests on the drained nodes
/// until it is dropped; the holder itself may still issue requests.
#[must_use = "the nodes stay quiesced only while this is held"]
pub struct Drained(Vec<Rc<Node>>);

impl Drop for Drained {
    fn drop(&mut self) {
        for node in &self.0 {
            let q = node.quiesce.get().saturating_sub(1);
            node.quiesce.set(q);
            if q == 0 {
                node.resumed.notify_waiters();
            }
        }
    }
}

/// Quiesces `nodes` (a node and everything above it): waits until none has requests in flight
/// (QEMU: `bdrv_drained_begin`).
pub(crate) async fn drain(nodes: Vec<Rc<Node>>) -> Drained {
    for n in &nodes {
        n.quiesce.set(n.quiesce.get() + 1);
    }
    for n in &nodes {
        while n.in_flight.get() > 0 {
            n.idle.notified().await;
        }
    }
    Drained(nodes)
}

/// Settings common to every node (`BlockdevOptions` base members).
pub(crate) struct NodeSettings {
    pub(crate) read_only: bool,
    pub(crate) detect_zeroes: DetectZeroes,
    pub(crate) discard_unmap: bool,
    pub(crate) cache_direct: bool,
    pub(crate) cache_no_flush: bool,
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Largest request the layer accepts in one piece (QEMU's `BDRV_REQUEST_MAX_BYTES` is close).
pub(crate) const MAX_REQUEST: u64 = 1 << 31;

impl Node {
    pub(crate) fn new(
        name: String,
        driver: Box<dyn Driver>,
        options: QDict,
        settings: NodeSettings,
        children: Vec<Child>,
    ) -> Rc<Node> {
        Rc::new(Node {
            name,
            driver,
            options: RefCell::new(options),
            read_only: Cell::new(settings.read_only),
            children: RefCell::new(children),
            users: RefCell::new(Vec::new()),
            stats: RefCell::default(),
            detect_zeroes: Cell::new(settings.detect_zeroes),
            discard_unmap: Cell::new(settings.discard_unmap),
            cache_direct: settings.cache_direct,
            cache_no_flush: settings.cache_no_flush,
            write_threshold: Cell::new(0),
            threshold_hit: RefCell::new(None),
            bitmaps: RefCell::new(Vec::new()),
            in_flight: Cell::new(0),
            quiesce: Cell::new(0),
            idle: Notify::new(),
            resumed: Notify::new(),
        })
    }

    /// The options the node was opened (or last reopened) with (`BlockdevOptions`, as given).
    pub fn options(&self) -> QDict {
        self.options.borrow().clone()
    }

    /// The file name QEMU shows for the node (`bdrv_refresh_filename`).
    pub fn filename(&self) -> String {
        if let Some(f) = self.driver.plain_filename() {
            return f;
        }
        if self.driver.is_passthrough()
            && !self.backing_overridden()
            && let Some(file) = self.child("file")
        {
            return file.filename();
        }
        format!(
            "json:{}",
            ferrite_qobject::to_json(&QObject::Dict(self.full_options()))
        )
    }

    /// The options that recreate this node and its children (`json:` file names).
    pub fn full_options(&self) -> QDict {
        let mut d = QDict::new().with("driver", self.driver_name());
        for (k, v) in self.driver.strong_options().iter() {
            d.insert(k, v.clone());
        }
        if let Some(f) = self.driver.plain_filename() {
            d.insert("filename", f);
        }
        let overridden = self.backing_overridden();
        for c in self.children() {
            // The backing file the image names is implied; one set by the user is not.
            if c.name == "backing" && !overridden {
                continue;
            }
            d.insert(c.name.clone(), c.node.full_options());
        }
        if overridden && self.child("backing").is_none() {
            d.insert("backing", QObject::Null);
        }
        d
    }

    /// The user chose the backing child (or none) instead of the one the image names.
    fn backing_overridden(&self) -> bool {
        self.options.borrow().get("backing").is_some()
    }

    /// Deletes internal snapshot `id` (a transaction taking one back).
    ///
    /// # Errors
    /// The image failing.
    pub async fn driver_snapshot_delete(&self, id: &str) -> std::io::Result<()> {
        self.driver
            .snapshot_delete(self, Some(id), None)
            .await
            .map(|_| ())
    }

    /// Forgets option `key` of the node (how it was opened no longer shows it).
    pub fn remove_option(&self, key: &str) {
        self.options.borrow_mut().remove(key);
    }

    /// The dirty bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<Rc<DirtyBitmap>> {
        self.bitmaps
            .borrow()
            .iter()
            .find(|b| !b.name().is_empty() && b.name() == name)
            .cloned()
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver name.
    pub fn driver_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.driver.len(self)
    }

    /// Whether the node has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the node is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.get()
    }

    /// The child on edge `name`.
    pub fn child(&self, name: &str) -> Option<Rc<Node>> {
        self.children
            .borrow()
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.node.clone())
    }

    /// The node's children.
    pub fn children(&self) -> Vec<Child> {
        self.children.borrow().clone()
    }

    /// The node's uses.
    pub fn users(&self) -> Vec<Use> {
        self.users.borrow().clone()
    }

    /// Whether drivers can zero ranges fast.
    pub fn can_fast_zero(&self) -> bool {
        self.driver.can_fast_zero()
    }

    /// Whether `discard=unmap` lets discards reach the storage.
    pub fn discard_unmap(&self) -> bool {
        self.discard_unmap.get()
    }

    /// Request alignment in bytes.
    pub fn request_alignment(&self) -> u64 {
        self.driver.request_alignment(self)
    }

    /// What the node's users take and share, all together.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        self.users
            .borrow()
            .iter()
            .fold((Perm::empty(), Perm::all()), |(p, s), u| {
                (p | u.perm, s & u.shared)
            })
    }

    /// For root users: waits while the node is drained, before submitting a request.
    pub async fn wait_unquiesced(&self) {
        while self.quiesce.get() > 0 {
            self.resumed.notified().await;
        }
    }

    /// Entry to every request: counts it in flight.
    async fn begin(&self) -> InFlight<'_> {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self)
    }

    fn check_bounds(&self, kind: IoKind, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        if end > self.len() || len > MAX_REQUEST {
            self.stats.borrow_mut().invalid(kind);
            return Err(einval());
        }
        Ok(())
    }

    /// Bounds of a write: past the end only for a driver that grows, when a parent holds
    /// the resize permission (a format writing new clusters to its file).
    fn check_write_bounds(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        let grows = end > self.len()
            && self.driver.can_grow()
            && self.cumulative_perms().0.contains(Perm::RESIZE);
        if len > MAX_REQUEST || (end > self.len() && !grows) {
            self.stats.borrow_mut().invalid(IoKind::Write);
            return Err(einval());
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only.get() {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn account<T>(&self, kind: IoKind, bytes: u64, started: Instant, r: &io::Result<T>) {
        self.stats
            .borrow_mut()
            .done(kind, bytes, started, r.is_ok());
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// EINVAL out of bounds; the driver's error otherwise.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check_bounds(IoKind::Read, offset, len as u64)?;
        let _f = self.begin().await;
        let started = Instant::now();
        let r = self.driver.read(self, offset, len).await;
        self.account(IoKind::Read, len as u64, started, &r);
        r
    }

    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// EINVAL out of bounds, EPERM when read-only; the driver's error otherwise.
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_write_bounds(offset, len)?;
        self.check_writable()?;
        if self.detect_zeroes.get() != DetectZeroes::Off && crate::io::is_zero(&data) {
            let mut zflags = flags;
            if self.detect_zeroes.get() == DetectZeroes::Unmap && self.discard_unmap.get() {
                zflags |= ReqFlags::MAY_UNMAP;
            }
            return self.write_zeroes(offset, len, zflags).await;
        }
        let _f = self.begin().await;
        let started = Instant::now();
        let r = self.driver.write(self, offset, data, flags).await;
        self.account(IoKind::Write, len, started, &r);
        if r.is_ok() {
            self.wrote(offset, len);
        }
        r
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    ///
    /// # Errors
    /// As [`Node::write`]; ENOTSUP for `NO_FALLBACK` when zeroing would be slow.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.check_write_bounds(offset, len)?;
        self.check_writable()?;
        let mut flags = flags;
        if !self.discard_unmap.get() {
            flags.remove(ReqFlags::MAY_UNMAP);
        }
        let _f = self.begin().await;
        let started = Instant::now();
        let r = self.driver.write_zeroes(self, offset, len, flags).await;
        self.account(IoKind::Write, len, started, &r);
        if r.is_ok() {
            self.wrote(offset, len);
        }
        r
    }

    /// Writes whole clusters compressed where the format can (`write -c`, backup's
    /// `compress`).
    ///
    /// # Errors
    /// As [`Node::write`]; EINVAL for a range that is not whole clusters.
    pub async fn write_compressed(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_bounds(IoKind::Write, offset, len)?;
        self.check_writable()?;
        let _f = self.begin().await;
        let started = Instant::now();
        let r = self.driver.write_compressed(self, offset, data).await;
        self.account(IoKind::Write, len, started, &r);
        if r.is_ok() {
            self.wrote(offset, len);
        }
        r
    }

    /// How deep in the backing chain the range at `offset` is allocated (1 = this node, 0 =
    /// nowhere), and for how many bytes that holds (NBD's `qemu:allocation-depth`).
    ///
    /// # Errors
    /// As [`Node::block_status`].
    pub fn allocation_depth(&self, offset: u64, len: u64) -> crate::driver::BoxFut<'_, (u64, u32)> {
        Box::pin(async move {
            let e = self.block_status(offset, len).await?;
            if e.allocated {
                return Ok((e.len, 1));
            }
            match self.child("backing") {
                Some(b) if offset < b.len() => {
                    let (n, d) = b
                        .allocation_depth(offset, e.len.min(b.len() - offset))
                        .await?;
                    Ok((n, if d == 0 { 0 } else { d + 1 }))
                }
                _ => Ok((e.len, 0)),
            }
        })
    }

    /// Discards a range; a no-op unless `discard=unmap`.
    ///
    /// # Errors
    /// As [`Node::write`].
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_bounds(IoKind::Unmap, offset, len)?;
        self.check_writable()?;
        if !self.discard_unmap.get() {
            return Ok(());
        }
        let _f = self.begin().await;
        let started = Instant::now();
        let r = self.driver.discard(self, offset, len).await;
        self.account(IoKind::Unmap, len, started, &r);
        if r.is_ok() {
            for b in self.bitmaps.borrow().iter() {
                b.note_write(offset, len);
            }
        }
        r
    }

    /// Flushes; a no-op with `cache.no-flush=on`.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn flush(&self) -> io::Result<()> {
        let _f = self.begin().await;
        let started = Instant::now();
        let r = if self.cache_no_flush {
            Ok(())
        } else {
            self.driver.flush(self).await
        };
        self.account(IoKind::Flush, 0, started, &r);
        r
    }

    /// The extent at `offset`, at most `len` long.
    ///
    /// # Errors
    /// EINVAL out of bounds; the driver's error.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.check_status_range(offset, len)?;
        let _f = self.begin().await;
        self.driver.block_status(self, offset, len).await
    }

    /// Reads the point in time this node (a `copy-before-write` filter) keeps.
    ///
    /// # Errors
    /// EINVAL out of bounds; EACCES for what the snapshot no longer holds; ENOTSUP from
    /// other nodes.
    pub async fn snapshot_read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.check_bounds(IoKind::Read, offset, len as u64)?;
        let _f = self.begin().await;
        self.driver.snapshot_read(self, offset, len).await
    }

    /// The status of the point in time at `offset`, at most `len` long.
    ///
    /// # Errors
    /// As [`Node::snapshot_read`].
    pub async fn snapshot_block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.check_status_range(offset, len)?;
        let _f = self.begin().await;
        self.driver.snapshot_block_status(self, offset, len).await
    }

    /// A block-status range: inside the node and not empty.
    fn check_status_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        if end > self.len() || len == 0 {
            return Err(einval());
        }
        Ok(())
    }

    /// Gives up the point in time of a range (whole clusters of it).
    ///
    /// # Errors
    /// As [`Node::snapshot_read`].
    pub async fn snapshot_discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_bounds(IoKind::Unmap, offset, len)?;
        let _f = self.begin().await;
        self.driver.snapshot_discard(self, offset, len).await
    }

    /// Changes the size.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn truncate(&self, size: u64) -> io::Result<()> {
        let _f = self.begin().await;
        self.driver.truncate(self, size).await
    }

    fn wrote(&self, offset: u64, len: u64) {
        let end = offset + len;
        for b in self.bitmaps.borrow().iter() {
            b.note_write(offset, len);
        }
        self.stats.borrow_mut().wrote_up_to(end);
        let threshold = self.write_threshold.get();
        if threshold > 0 && end > threshold {
            self.write_threshold.set(0);
            if let Some(hit) = self.threshold_hit.borrow().as_ref() {
                hit(self, end - threshold, threshold);
            }
        }
    }
}

/// A request in flight on a node; its end may finish a drain.
struct InFlight<'a>(&'a Node);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get() - 1;
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}
