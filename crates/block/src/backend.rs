//! `BlockBackend` (QEMU: `block/block-backend.c`): how a root user reaches a node.
//!
//! An NBD export, a QMP command that reads or writes, a block job's target and, later, a
//! guest device each hold a `BlockBackend`. It owns the root edge to its node and the
//! permissions on it, holds back new requests while a drained section covers the node
//! (unless its owner pauses by other means, as jobs do), counts its requests in flight for
//! drains to wait on, and keeps the accounting `query-blockstats` reports for devices. It
//! also carries what a guest device needs of its drive: a name, the removable medium's state,
//! the error policy and status, and a throttle group.

use crate::child::{Child, RootParent, Vertex, VertexKind};
use crate::driver::{Extent, ReqFlags};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::perm::Perm;
use crate::stats::{IoKind, Stats};
use crate::throttle::{Direction, GroupMember, ThrottleGroup};
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::{Rc, Weak};
use tokio::sync::Notify;

/// What a request error does to a device (QAPI `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Report the error to the guest (or fail the job).
    #[default]
    Report,
    /// Ignore it.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Stop.
    Stop,
    /// What the backend says (for jobs: the device's policy).
    Auto,
}

impl OnError {
    /// From the QAPI name (absent: report).
    pub fn parse(v: Option<&str>) -> OnError {
        match v {
            Some("ignore") => OnError::Ignore,
            Some("enospc") => OnError::Enospc,
            Some("stop") => OnError::Stop,
            Some("auto") => OnError::Auto,
            _ => OnError::Report,
        }
    }

    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
            OnError::Auto => "auto",
        }
    }
}

/// A device's I/O status (QAPI `BlockDeviceIoStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoStatus {
    /// No error.
    #[default]
    Ok,
    /// Stopped on an error.
    Failed,
    /// Stopped because the storage is full.
    NoSpace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::NoSpace => "nospace",
        }
    }
}

/// The removable-medium state of a drive (trays of CD-ROM and floppy devices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Medium {
    /// The device has removable media.
    pub removable: bool,
    /// The device has a tray (CD-ROMs; a floppy drive's medium goes in and out without).
    pub has_tray: bool,
    /// The tray is open.
    pub tray_open: bool,
    /// The guest locked the tray.
    pub locked: bool,
}

/// How a drive opens the media put into it by name (QEMU's `BlockBackendRootState`): what
/// the drive was configured with, updated from the medium in it whenever one is changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootState {
    /// Media open read-only.
    pub read_only: bool,
    /// Media detect zero writes.
    pub detect_zeroes: bool,
}

impl Default for RootState {
    /// A backend made without a drive's options opens what it is given read-only, as
    /// QEMU's zeroed root state does.
    fn default() -> Self {
        RootState {
            read_only: true,
            detect_zeroes: false,
        }
    }
}

/// What the owner of a backend (a device, a job) is told about drained sections (QEMU:
/// `BlockDevOps`).
pub trait BackendOwner {
    /// A drained section began: stop issuing requests.
    fn drained_begin(&self) {}
    /// It ended.
    fn drained_end(&self) {}
    /// Whether the owner still has work the drain must wait for.
    fn drained_poll(&self) -> bool {
        false
    }
}

/// A root user's way to a node.
///
/// # Invariants
/// - `root` is the only edge the backend owns; permissions change through
///   [`BlockBackend::set_perm`], which checks them against the node's other users.
/// - `quiesce` counts the drained sections that reached the backend through its edge;
///   requests (with queuing on) start only while it is zero.
/// - `in_flight` counts requests between their start and their end, not while they wait.
pub struct BlockBackend {
    me: Weak<BlockBackend>,
    graph: Weak<Graph>,
    root: RefCell<Option<Rc<Child>>>,
    name: RefCell<String>,
    /// The qdev ID of the device the backend is attached to, if any.
    device: RefCell<Option<String>>,
    quiesce: Cell<u32>,
    in_flight: Cell<u64>,
    resumed: Notify,
    /// Requests wait while drained (off for jobs, which pause at their pause points).
    queue_requests: Cell<bool>,
    owner: RefCell<Option<Weak<dyn BackendOwner>>>,
    stats: RefCell<Stats>,
    medium: Cell<Medium>,
    root_state: Cell<RootState>,
    on_read_error: Cell<OnError>,
    on_write_error: Cell<OnError>,
    iostatus: Cell<IoStatus>,
    /// Whether the device reports an I/O status (QEMU's `iostatus_enabled`).
    iostatus_enabled: Cell<bool>,
    throttle: RefCell<Option<Rc<GroupMember>>>,
    /// Whether a write may complete before it is on stable storage (QEMU's
    /// `enable_write_cache`; `cache=writethrough` turns it off: every write is FUA).
    write_cache: Cell<bool>,
    /// Called when the medium goes (QEMU's remove-bs notifiers: an export of a drive ends
    /// with it).
    on_medium_removed: RefCell<Vec<Box<dyn Fn()>>>,
    /// The iothread its user runs in (`None`: the main loop), and whether the user stays
    /// there when its node is moved (see `graph/iothread.rs`).
    pub(crate) iothread: RefCell<Option<String>>,
    pub(crate) fixed_iothread: Cell<bool>,
    /// What the user takes and shares (QEMU's `blk->perm`, `blk->shared_perm`): on its
    /// edge, unless the node is inactive and the backend may stay there without them
    /// (`perm_disabled`, QEMU's `disable_perm`).
    wanted: Cell<(Perm, Perm)>,
    perm_disabled: Cell<bool>,
    /// The backend may stay on an inactive node whatever it wants (an export with
    /// `allow-inactive`).
    force_allow_inactivate: Cell<bool>,
    order: u64,
}

impl std::fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockBackend({:?})", self.name.borrow())
    }
}

/// A backend request in flight.
struct InFlight<'a>(&'a BlockBackend);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_flight.get() - 1;
        self.0.in_flight.set(n);
        if n == 0 {
            crate::drain::notify_progress();
        }
    }
}

fn enomedium() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOMEDIUM)
}

impl BlockBackend {
    /// A backend on `node` taking `perm` and sharing `shared`.
    ///
    /// # Errors
    /// A permission conflict anywhere below, or a lock held by another process.
    pub fn new(graph: &Rc<Graph>, node: &Rc<Node>, perm: Perm, shared: Perm) -> Result<Rc<Self>> {
        let blk = Self::new_empty(graph);
        blk.insert(node, perm, shared)?;
        Ok(blk)
    }

    /// A backend without a node (a drive with no medium).
    pub fn new_empty(graph: &Rc<Graph>) -> Rc<Self> {
        let order = graph.next_id();
        let blk = Rc::new_cyclic(|me| BlockBackend {
            me: me.clone(),
            graph: Rc::downgrade(graph),
            root: RefCell::new(None),
            name: RefCell::new(String::new()),
            device: RefCell::new(None),
            quiesce: Cell::new(0),
            in_flight: Cell::new(0),
            resumed: Notify::new(),
            queue_requests: Cell::new(true),
            owner: RefCell::new(None),
            stats: RefCell::new(Stats::for_backend()),
            medium: Cell::new(Medium::default()),
            root_state: Cell::new(RootState::default()),
            on_read_error: Cell::new(OnError::Report),
            on_write_error: Cell::new(OnError::Enospc),
            iostatus: Cell::new(IoStatus::Ok),
            iostatus_enabled: Cell::new(false),
            throttle: RefCell::new(None),
            write_cache: Cell::new(true),
            on_medium_removed: RefCell::new(Vec::new()),
            iothread: RefCell::new(None),
            fixed_iothread: Cell::new(false),
            wanted: Cell::new((Perm::empty(), Perm::all())),
            perm_disabled: Cell::new(false),
            force_allow_inactivate: Cell::new(false),
            order,
        });
        graph.register_backend(Rc::downgrade(&blk));
        blk
    }

    /// Attaches the backend to `node` (inserting a medium).
    ///
    /// # Errors
    /// A permission conflict; nothing changes then.
    pub fn insert(&self, node: &Rc<Node>, perm: Perm, shared: Perm) -> Result<()> {
        let graph = self.graph()?;
        let me: Weak<dyn RootParent> = self.me.clone();
        // On an inactive node a backend that may stay there waits for its permissions
        // until the node is activated (QEMU's `blk_insert_bs`).
        let disabled = !node.is_active() && self.can_inactivate(perm);
        let (p, s) = if disabled {
            (Perm::empty(), Perm::all())
        } else {
            (perm, shared)
        };
        let edge = graph.attach_root(node, me, "root", p, s)?;
        self.wanted.set((perm, shared));
        self.perm_disabled.set(disabled);
        if let Some(old) = self.root.replace(Some(edge)) {
            graph.detach_edge(&old);
        }
        Ok(())
    }

    /// Lets the backend stay on an inactive node whatever it takes (QEMU's
    /// `blk_set_force_allow_inactivate`: an export with `allow-inactive`).
    pub fn set_force_allow_inactivate(&self) {
        self.force_allow_inactivate.set(true);
    }

    /// Whether the backend may stay on an inactive node (QEMU's `blk_can_inactivate`): a
    /// device's or a named drive's, one that only reads, or one told it may.
    fn can_inactivate(&self, perm: Perm) -> bool {
        self.device.borrow().is_some()
            || !self.name.borrow().is_empty()
            || (perm - Perm::CONSISTENT_READ).is_empty()
            || self.force_allow_inactivate.get()
    }

    /// Detaches the backend from its node (removing the medium); requests fail with
    /// ENOMEDIUM from now on.
    pub fn remove(&self) {
        let edge = self.root.borrow_mut().take();
        if let Some(edge) = edge {
            if let Some(g) = self.graph.upgrade() {
                g.detach_edge(&edge);
            }
            for f in self.on_medium_removed.borrow().iter() {
                f();
            }
        }
    }

    /// Adds what happens when the medium goes.
    pub fn on_medium_removed(&self, f: Box<dyn Fn()>) {
        self.on_medium_removed.borrow_mut().push(f);
    }

    fn graph(&self) -> Result<Rc<Graph>> {
        self.graph.upgrade().ok_or(Error::GraphGone)
    }

    /// The node the backend uses now (it follows the node when the graph replaces it).
    pub fn node(&self) -> Option<Rc<Node>> {
        self.root.borrow().as_ref().map(|e| e.node())
    }

    /// The root edge.
    pub fn root(&self) -> Option<Rc<Child>> {
        self.root.borrow().clone()
    }

    /// Changes what the backend takes and shares.
    ///
    /// # Errors
    /// A permission conflict; nothing changes then.
    pub fn set_perm(&self, perm: Perm, shared: Perm) -> Result<()> {
        let Some(edge) = self.root() else {
            self.wanted.set((perm, shared));
            return Ok(());
        };
        if !self.perm_disabled.get() {
            self.graph()?.update_edge_perm(&edge, perm, shared)?;
        }
        self.wanted.set((perm, shared));
        Ok(())
    }

    /// What the backend takes and shares.
    pub fn perm(&self) -> (Perm, Perm) {
        match self.root() {
            None => (Perm::empty(), Perm::all()),
            Some(_) => self.wanted.get(),
        }
    }

    /// The backend's name (a drive's ID; empty for exports and jobs).
    pub fn name(&self) -> String {
        self.name.borrow().clone()
    }

    /// Names the backend.
    pub fn set_name(&self, name: &str) {
        *self.name.borrow_mut() = name.to_owned();
    }

    /// The device the backend is attached to.
    pub fn device(&self) -> Option<String> {
        self.device.borrow().clone()
    }

    /// Attaches the backend to a device (or detaches it).
    pub fn set_device(&self, device: Option<&str>) {
        *self.device.borrow_mut() = device.map(str::to_owned);
    }

    /// Whether requests wait while a drain holds the node (default: yes). A job turns it
    /// off: it stops at its pause points instead, and its own requests must not wait.
    pub fn set_queue_requests(&self, on: bool) {
        self.queue_requests.set(on);
    }

    /// Who hears about drained sections.
    pub fn set_owner(&self, owner: Weak<dyn BackendOwner>) {
        *self.owner.borrow_mut() = Some(owner);
    }

    fn owner(&self) -> Option<Rc<dyn BackendOwner>> {
        self.owner.borrow().as_ref().and_then(Weak::upgrade)
    }

    /// The removable medium's state.
    pub fn medium(&self) -> Medium {
        self.medium.get()
    }

    /// Makes the backend report an I/O status (a device that can stop on errors does).
    pub fn iostatus_enable(&self) {
        self.iostatus_enabled.set(true);
        self.iostatus.set(IoStatus::Ok);
    }

    /// Whether it reports one.
    pub fn iostatus_enabled(&self) -> bool {
        self.iostatus_enabled.get()
    }

    /// How media changed by name open: the configured state, or the present medium's.
    pub fn root_state(&self) -> RootState {
        let mut state = self.root_state.get();
        if let Some(node) = self.node() {
            state.read_only = node.is_read_only();
            state.detect_zeroes = node.detect_zeroes() != crate::DetectZeroes::Off;
            self.root_state.set(state);
        }
        state
    }

    /// Sets the state a drive was configured with.
    pub fn set_root_state(&self, state: RootState) {
        self.root_state.set(state);
    }

    /// Sets the removable medium's state.
    pub fn set_medium(&self, m: Medium) {
        self.medium.set(m);
    }

    /// The error policies for reads and writes.
    pub fn on_error(&self) -> (OnError, OnError) {
        (self.on_read_error.get(), self.on_write_error.get())
    }

    /// Sets the error policies (`rerror`, `werror`).
    pub fn set_on_error(&self, read: OnError, write: OnError) {
        self.on_read_error.set(read);
        self.on_write_error.set(write);
    }

    /// The I/O status.
    pub fn iostatus(&self) -> IoStatus {
        self.iostatus.get()
    }

    /// Sets the I/O status.
    pub fn set_iostatus(&self, s: IoStatus) {
        self.iostatus.set(s);
    }

    /// The throttle group the backend's reads and writes go through, if any (QEMU's I/O
    /// limits of a drive).
    pub fn throttle_group(&self) -> Option<Rc<ThrottleGroup>> {
        self.throttle.borrow().as_ref().map(|m| m.group().clone())
    }

    /// Puts the backend's requests through a throttle group's limits, or lets them go
    /// unthrottled (`None`); requests waiting in the old group go on at once.
    pub fn set_throttle(&self, member: Option<GroupMember>) {
        let old = self.throttle.replace(member.map(Rc::new));
        if let Some(old) = old {
            old.drained_begin();
        }
        if self.quiesce.get() > 0
            && let Some(m) = self.throttle.borrow().as_ref()
        {
            m.drained_begin();
        }
    }

    /// Waits for the throttle group's leave to run a request of `bytes` in `dir`.
    async fn throttle(&self, dir: Direction, bytes: u64) {
        let member = self.throttle.borrow().clone();
        if let Some(m) = member {
            m.intercept(dir, bytes).await;
        }
    }

    /// Whether invalid and failed requests are accounted (a drive's `stats-account-*`).
    pub fn set_accounting(&self, invalid: bool, failed: bool) {
        self.stats.borrow_mut().set_accounting(invalid, failed);
    }

    /// Adds an interval (seconds, not 0) that `query-blockstats` reports figures over (a
    /// drive's `stats-intervals`).
    pub fn add_stats_interval(&self, seconds: u32) {
        self.stats.borrow_mut().add_interval(seconds);
    }

    /// Counts a request its issuer found invalid before sending it (qemu-io's `-i`).
    pub fn account_invalid(&self, kind: IoKind) {
        self.stats.borrow_mut().invalid(kind);
    }

    /// The accounting (`BlockDeviceStats`).
    pub fn stats(&self) -> QDict {
        self.stats.borrow().to_qdict()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    /// Whether a drained section holds the backend.
    pub fn is_quiesced(&self) -> bool {
        self.quiesce.get() > 0
    }

    /// Starts a request: waits while drained (with queuing on), then counts it in flight.
    async fn begin(&self) -> InFlight<'_> {
        while self.queue_requests.get() && self.quiesce.get() > 0 {
            let resumed = self.resumed.notified();
            if self.quiesce.get() == 0 {
                break;
            }
            resumed.await;
        }
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self)
    }

    /// The node for a request, with the request counted invalid when out of bounds.
    fn target(&self, kind: IoKind, offset: u64, len: u64, account: bool) -> io::Result<Rc<Node>> {
        self.target_span(kind, offset, len, true, account)
    }

    /// As [`Self::target`]; `buffer`: whether the request carries its bytes, which bounds
    /// its length (zero writes and discards go in pieces instead).
    fn target_span(
        &self,
        kind: IoKind,
        offset: u64,
        len: u64,
        buffer: bool,
        account: bool,
    ) -> io::Result<Rc<Node>> {
        let node = self.node().ok_or_else(enomedium)?;
        let r = match kind {
            IoKind::Flush => Ok(()),
            _ if !buffer => node.check_span(offset, len, kind == IoKind::Write),
            IoKind::Write => node.check_write_bounds(offset, len),
            _ => node.check_bounds(offset, len),
        };
        if let Err(e) = r {
            if account {
                self.stats.borrow_mut().invalid(kind);
            }
            return Err(e);
        }
        Ok(node)
    }

    fn account<T>(&self, kind: IoKind, bytes: u64, started: u64, r: &io::Result<T>, on: bool) {
        if on {
            self.stats
                .borrow_mut()
                .done(kind, bytes, started, r.is_ok());
        }
    }

    /// The same requests, left out of the accounting (QEMU accounts what devices ask, and
    /// qemu-io's synchronous commands, which bypass it).
    pub fn unaccounted(&self) -> Unaccounted<'_> {
        Unaccounted(self)
    }

    /// The node's size (0 without a medium).
    pub fn len(&self) -> u64 {
        self.node().map_or(0, |n| n.len())
    }

    /// Whether the node has no bytes (or there is none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// ENOMEDIUM without a node, EINVAL out of bounds; the driver's error otherwise.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.read_as(offset, len, true).await
    }

    async fn read_as(&self, offset: u64, len: usize, account: bool) -> io::Result<Vec<u8>> {
        let _f = self.begin().await;
        let node = self.target(IoKind::Read, offset, len as u64, account)?;
        self.throttle(Direction::Read, len as u64).await;
        let started = crate::stats::now_ns();
        let r = node.read(offset, len).await;
        self.account(IoKind::Read, len as u64, started, &r, account);
        r
    }

    /// Reads `dest.len()` bytes at `offset` into memory the caller owns (a guest's RAM),
    /// without a buffer in between where the drivers allow.
    ///
    /// # Errors
    /// As [`BlockBackend::read`].
    pub async fn read_into(&self, offset: u64, dest: &crate::io::ForeignBuf) -> io::Result<()> {
        let _f = self.begin().await;
        let len = dest.len() as u64;
        let node = self.target(IoKind::Read, offset, len, true)?;
        self.throttle(Direction::Read, len).await;
        let started = crate::stats::now_ns();
        let r = node.read_into(offset, dest).await;
        self.account(IoKind::Read, len, started, &r, true);
        r
    }

    /// Whether writes may complete before they are on stable storage.
    pub fn write_cache(&self) -> bool {
        self.write_cache.get()
    }

    /// Sets [`BlockBackend::write_cache`].
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.set(on);
    }

    /// `flags` for a write: FUA without a write cache.
    fn write_flags(&self, flags: ReqFlags) -> ReqFlags {
        if self.write_cache.get() {
            flags
        } else {
            flags | ReqFlags::FUA
        }
    }

    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// As [`BlockBackend::read`]; EPERM when the node is read-only.
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> io::Result<()> {
        self.write_as(offset, data, flags, true).await
    }

    async fn write_as(
        &self,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
        account: bool,
    ) -> io::Result<()> {
        let flags = self.write_flags(flags);
        let _f = self.begin().await;
        let len = data.len() as u64;
        let node = self.target(IoKind::Write, offset, len, account)?;
        self.throttle(Direction::Write, len).await;
        let started = crate::stats::now_ns();
        let r = node.write(offset, data, flags).await;
        self.account(IoKind::Write, len, started, &r, account);
        r
    }

    /// Makes `len` bytes at `offset` read as zeroes.
    ///
    /// # Errors
    /// As [`BlockBackend::write`]; ENOTSUP for `NO_FALLBACK` when zeroing would be slow.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.write_zeroes_as(offset, len, flags, true).await
    }

    async fn write_zeroes_as(
        &self,
        offset: u64,
        len: u64,
        flags: ReqFlags,
        account: bool,
    ) -> io::Result<()> {
        let flags = self.write_flags(flags);
        let _f = self.begin().await;
        let node = self.target_span(IoKind::Write, offset, len, false, account)?;
        self.throttle(Direction::Write, len).await;
        let started = crate::stats::now_ns();
        let r = node.write_zeroes(offset, len, flags).await;
        self.account(IoKind::Write, len, started, &r, account);
        r
    }

    /// Writes whole clusters compressed where the format can.
    ///
    /// # Errors
    /// As [`BlockBackend::write`].
    pub async fn write_compressed(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        self.write_compressed_as(offset, data, true).await
    }

    async fn write_compressed_as(
        &self,
        offset: u64,
        data: Vec<u8>,
        account: bool,
    ) -> io::Result<()> {
        let _f = self.begin().await;
        let len = data.len() as u64;
        let node = self.target(IoKind::Write, offset, len, account)?;
        let started = crate::stats::now_ns();
        let r = node.write_compressed(offset, data).await;
        self.account(IoKind::Write, len, started, &r, account);
        r
    }

    /// Discards a range (a no-op unless the node has `discard=unmap`).
    ///
    /// # Errors
    /// As [`BlockBackend::write`].
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.discard_as(offset, len, true).await
    }

    async fn discard_as(&self, offset: u64, len: u64, account: bool) -> io::Result<()> {
        let _f = self.begin().await;
        let node = self.target_span(IoKind::Unmap, offset, len, false, account)?;
        let started = crate::stats::now_ns();
        let r = node.discard(offset, len).await;
        self.account(IoKind::Unmap, len, started, &r, account);
        r
    }

    /// Flushes.
    ///
    /// # Errors
    /// ENOMEDIUM without a node; the driver's error.
    pub async fn flush(&self) -> io::Result<()> {
        self.flush_as(true).await
    }

    async fn flush_as(&self, account: bool) -> io::Result<()> {
        let _f = self.begin().await;
        let node = self.target(IoKind::Flush, 0, 0, account)?;
        let started = crate::stats::now_ns();
        let r = node.flush().await;
        self.account(IoKind::Flush, 0, started, &r, account);
        r
    }

    /// The extent at `offset`, at most `len` long.
    ///
    /// # Errors
    /// ENOMEDIUM without a node, EINVAL for a range outside the node or empty.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let _f = self.begin().await;
        let node = self.node().ok_or_else(enomedium)?;
        node.block_status(offset, len).await
    }

    /// How deep in the backing chain the range at `offset` is allocated, and for how many
    /// bytes (NBD's `qemu:allocation-depth`).
    ///
    /// # Errors
    /// As [`BlockBackend::block_status`].
    pub async fn allocation_depth(&self, offset: u64, len: u64) -> io::Result<(u64, u32)> {
        let _f = self.begin().await;
        let node = self.node().ok_or_else(enomedium)?;
        node.allocation_depth(offset, len).await
    }

    /// Changes the node's size (the backend must hold the resize permission).
    ///
    /// # Errors
    /// ENOMEDIUM without a node, EPERM without the resize permission; the driver's error.
    pub async fn truncate(&self, size: u64) -> io::Result<()> {
        self.truncate_prealloc(size, crate::driver::Prealloc::Off)
            .await
    }

    /// Changes the node's size, the added part allocated as `prealloc` says.
    ///
    /// # Errors
    /// As [`BlockBackend::truncate`]; ENOTSUP where the driver cannot preallocate.
    pub async fn truncate_prealloc(
        &self,
        size: u64,
        prealloc: crate::driver::Prealloc,
    ) -> io::Result<()> {
        let _f = self.begin().await;
        let node = self.node().ok_or_else(enomedium)?;
        if !self.perm().0.contains(Perm::RESIZE) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        node.truncate_prealloc(size, prealloc).await
    }
}

/// A [`BlockBackend`]'s requests without accounting ([`BlockBackend::unaccounted`]); each
/// is as the backend's method of the same name.
#[derive(Clone, Copy)]
pub struct Unaccounted<'a>(&'a BlockBackend);

#[allow(clippy::missing_errors_doc)]
impl Unaccounted<'_> {
    pub async fn read(self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.0.read_as(offset, len, false).await
    }

    pub async fn write(self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> io::Result<()> {
        self.0.write_as(offset, data, flags, false).await
    }

    pub async fn write_zeroes(self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.0.write_zeroes_as(offset, len, flags, false).await
    }

    pub async fn write_compressed(self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        self.0.write_compressed_as(offset, data, false).await
    }

    pub async fn discard(self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard_as(offset, len, false).await
    }

    pub async fn flush(self) -> io::Result<()> {
        self.0.flush_as(false).await
    }
}

impl RootParent for BlockBackend {
    fn inactivate(&self) -> bool {
        if self.perm_disabled.get() {
            return true;
        }
        if !self.can_inactivate(self.wanted.get().0) {
            return false;
        }
        self.perm_disabled.set(true);
        if let (Some(edge), Ok(g)) = (self.root(), self.graph()) {
            // Taking nothing and sharing everything cannot conflict.
            let _ = g.update_edge_perm(&edge, Perm::empty(), Perm::all());
        }
        true
    }

    fn activate(&self) -> Result<()> {
        if !self.perm_disabled.get() {
            return Ok(());
        }
        let (perm, shared) = self.wanted.get();
        if let (Some(edge), Ok(g)) = (self.root(), self.graph()) {
            g.update_edge_perm(&edge, perm, shared)?;
        }
        self.perm_disabled.set(false);
        Ok(())
    }

    fn description(&self) -> String {
        // QEMU: blk_root_get_parent_desc.
        let name = self.name.borrow();
        if !name.is_empty() {
            return format!("block device '{name}'");
        }
        match self.device.borrow().as_deref() {
            Some(dev) if !dev.is_empty() => format!("block device '{dev}'"),
            _ => "an unnamed block device".to_owned(),
        }
    }

    fn drained_begin(&self) {
        let q = self.quiesce.get();
        self.quiesce.set(q + 1);
        if q == 0 {
            // Throttled requests go now, so that the drain does not wait for the limits.
            if let Some(m) = self.throttle.borrow().as_ref() {
                m.drained_begin();
            }
            if let Some(o) = self.owner() {
                o.drained_begin();
            }
        }
    }

    fn drained_end(&self) {
        let q = self.quiesce.get().saturating_sub(1);
        self.quiesce.set(q);
        if q == 0 {
            if let Some(m) = self.throttle.borrow().as_ref() {
                m.drained_end();
            }
            if let Some(o) = self.owner() {
                o.drained_end();
            }
            self.resumed.notify_waiters();
        }
    }

    fn drained_poll(&self) -> bool {
        self.in_flight.get() > 0 || self.owner().is_some_and(|o| o.drained_poll())
    }

    fn vertex(&self) -> Vertex {
        Vertex {
            kind: VertexKind::BlockBackend,
            name: self.name(),
            key: self.me.as_ptr() as usize,
            order: self.order,
        }
    }
}

impl Drop for BlockBackend {
    fn drop(&mut self) {
        self.remove();
    }
}
