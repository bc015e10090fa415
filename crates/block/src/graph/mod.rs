//! The block graph (QEMU: `block.c`): every node by name, and the operations that change
//! the graph. They live in one module each: `perm` (permission checks and their
//! propagation), `edges` (attaching, detaching and moving edges: filters, overlays,
//! replacement), `frozen` (links a job holds),
//! `blockers` (QEMU's op blockers: which operations a job or an overlay refuses),
//! `lifecycle` (adding, closing and deleting nodes), `reopen` (options and
//! modes changed in place), `active` (inactivation for migration, and back).
//!
//! Graph changes happen on the main thread only, and under a drained section of every node
//! whose parents change (`Graph::drain`), so that no request crosses a changing edge.

mod active;
mod blockers;
pub use blockers::BlockOp;
mod edges;
pub(crate) use edges::check_inactive_perm;
mod frozen;
mod iothread;
pub use iothread::IothreadResolver;
mod lifecycle;
mod perm;
mod reopen;

pub use frozen::FrozenChain;

use crate::backend::BlockBackend;
use crate::drain::Drained;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::io::{IoBackend, ThreadPool, Uring};
use crate::node::Node;
use crate::registry::Registry;
use ferrite_qapi::{Args, id_wellformed};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

/// Longest node name QEMU accepts.
const MAX_NODE_NAME: usize = 31;

/// The format a job's existing target opens as ([`Graph::job_target_format`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetFormat {
    /// The driver's name.
    pub name: String,
    /// Found by probing the image, not given: a raw node then guards its first sector.
    pub probed: bool,
}

impl TargetFormat {
    /// A format the command named.
    pub fn given(name: &str) -> TargetFormat {
        TargetFormat {
            name: name.to_owned(),
            probed: false,
        }
    }
}

/// The block graph.
///
/// # Invariants
/// - `nodes` holds every node in creation order (QEMU's listing order), each name once.
/// - A node not in `monitor_owned` was opened for another node or a command, and goes away
///   when its last user does.
pub struct Graph {
    me: Weak<Graph>,
    nodes: RefCell<Vec<Rc<Node>>>,
    /// Names of nodes created by `blockdev-add` itself (vs. inline children).
    monitor_owned: RefCell<Vec<String>>,
    next_auto: Cell<u64>,
    next_id: Cell<u64>,
    threads: Rc<dyn IoBackend>,
    uring: RefCell<Option<Rc<dyn IoBackend>>>,
    events: Rc<dyn EventSink>,
    registry: Rc<Registry>,
    /// Nodes a block job is using, with why and when (an id from `next_id`, comparable
    /// with an edge's): QEMU's op blockers.
    blockers: RefCell<Vec<(String, String, u64)>>,
    /// Every `BlockBackend`, in creation order.
    backends: RefCell<Vec<Weak<BlockBackend>>>,
    /// The throttle groups throttle filters have joined.
    throttle_groups: crate::throttle::ThrottleGroups,
    /// The secrets drivers take by id.
    secrets: crate::secrets::Secrets,
    /// Every node was closed (exit): closing again would store bitmaps twice.
    closed: Cell<bool>,
    /// The QOM type of the program's object of a given id, if there is one.
    object_types: RefCell<Option<ObjectTypeLookup>>,
    /// Finds `iothread` objects by QOM path.
    iothread_resolver: RefCell<Option<iothread::IothreadResolver>>,
    /// New nodes open inactive (a machine waiting for an incoming migration: the images
    /// are the source's until it is over).
    open_inactive: Cell<bool>,
    /// Images being created: the nodes a creation opens are its own and open active even
    /// while the rest open inactive (QEMU's `bdrv_create` opens with flags of its own).
    creating: Cell<u32>,
    /// Inactive nodes opening children that inherit their flags (QEMU passes
    /// `BDRV_O_INACTIVE` down to the children a driver opens).
    under_inactive: Cell<u32>,
}

/// See [`Graph::inactive_parent_scope`].
pub(crate) struct InactiveParentScope<'a>(&'a Graph);

impl Drop for InactiveParentScope<'_> {
    fn drop(&mut self) {
        self.0.under_inactive.set(self.0.under_inactive.get() - 1);
    }
}

/// See [`Graph::creation_scope`].
pub(crate) struct CreationScope<'a>(&'a Graph);

impl Drop for CreationScope<'_> {
    fn drop(&mut self) {
        self.0.creating.set(self.0.creating.get() - 1);
    }
}

/// The QOM type of the program's object `id` (`iothread`, `pr-manager-helper`...), or
/// `None` when there is no such object.
pub type ObjectTypeLookup = Rc<dyn Fn(&str) -> Option<&'static str>>;

impl Graph {
    /// Lets the graph and its drivers find the program's objects by id.
    pub fn set_object_types(&self, lookup: ObjectTypeLookup) {
        *self.object_types.borrow_mut() = Some(lookup);
    }

    /// The QOM type of the program's object `id`, if there is one.
    pub fn object_type(&self, id: &str) -> Option<&'static str> {
        self.object_types.borrow().as_ref().and_then(|f| f(id))
    }

    /// The secrets drivers take by id (`key-secret`).
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    /// The throttle groups throttle filters join.
    pub fn throttle_groups(&self) -> &crate::throttle::ThrottleGroups {
        &self.throttle_groups
    }

    /// An empty graph whose nodes open with the drivers of `registry`.
    pub fn new(events: Rc<dyn EventSink>, registry: Rc<Registry>) -> Rc<Graph> {
        Rc::new_cyclic(|me| Graph {
            me: me.clone(),
            nodes: RefCell::new(Vec::new()),
            monitor_owned: RefCell::new(Vec::new()),
            next_auto: Cell::new(0),
            next_id: Cell::new(1),
            threads: Rc::new(ThreadPool),
            uring: RefCell::new(None),
            events,
            registry,
            blockers: RefCell::new(Vec::new()),
            backends: RefCell::new(Vec::new()),
            throttle_groups: Default::default(),
            secrets: Default::default(),
            closed: Cell::new(false),
            object_types: RefCell::new(None),
            iothread_resolver: RefCell::new(None),
            open_inactive: Cell::new(false),
            creating: Cell::new(0),
            under_inactive: Cell::new(0),
        })
    }

    pub(crate) fn register_backend(&self, blk: Weak<BlockBackend>) {
        let mut b = self.backends.borrow_mut();
        b.retain(|w| w.strong_count() > 0);
        b.push(blk);
    }

    /// Makes new nodes open inactive, or active again (QEMU opens every image inactive
    /// while an incoming migration is awaited).
    pub fn set_open_inactive(&self, on: bool) {
        self.open_inactive.set(on);
    }

    /// Whether new nodes open inactive.
    pub fn opens_inactive(&self) -> bool {
        (self.open_inactive.get() || self.under_inactive.get() > 0) && self.creating.get() == 0
    }

    /// While the returned guard lives, nodes open inactive: an inactive node is opening
    /// the children it passes its flags to.
    pub(crate) fn inactive_parent_scope(&self) -> InactiveParentScope<'_> {
        self.under_inactive.set(self.under_inactive.get() + 1);
        InactiveParentScope(self)
    }

    /// While the returned guard lives, nodes open active: an image is being created on
    /// them. (Another command opening a node meanwhile, on an incoming migration's
    /// destination, would open it active too; QEMU's main loop has the same window.)
    pub(crate) fn creation_scope(&self) -> CreationScope<'_> {
        self.creating.set(self.creating.get() + 1);
        CreationScope(self)
    }

    /// Every `BlockBackend`, in creation order.
    pub fn backends(&self) -> Vec<Rc<BlockBackend>> {
        self.backends
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The graph as an `Rc` (for the objects that keep a weak reference to it).
    pub fn rc(&self) -> Rc<Graph> {
        self.me
            .upgrade()
            .expect("a graph method runs while the graph exists")
    }

    /// The driver registry.
    pub fn registry(&self) -> &Rc<Registry> {
        &self.registry
    }

    /// Where the block layer's events go.
    pub fn events(&self) -> Rc<dyn EventSink> {
        self.events.clone()
    }

    /// A number for ordering edges and backends by creation.
    pub(crate) fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// A node by name.
    pub fn find(&self, name: &str) -> Option<Rc<Node>> {
        self.nodes.borrow().iter().find(|n| n.name == name).cloned()
    }

    /// Every node, in creation order.
    pub fn nodes(&self) -> Vec<Rc<Node>> {
        self.nodes.borrow().clone()
    }

    pub(crate) fn node_count(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// A node by name, for commands that take a node (`Cannot find device=... nor node-name=...`):
    /// the medium of the drive of that name, else the node.
    ///
    /// # Errors
    /// QEMU's "Device 'x' has no medium" for an empty drive, "Cannot find device='x' nor
    /// node-name='x'".
    pub fn lookup(&self, name: &str) -> Result<Rc<Node>> {
        if let Some(blk) = self.backend_named(name) {
            return blk.node().ok_or_else(|| Error::NoMedium(name.to_owned()));
        }
        self.find(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))
    }

    fn backend_named(&self, name: &str) -> Option<Rc<BlockBackend>> {
        if name.is_empty() {
            return None;
        }
        self.backends().into_iter().find(|b| b.name() == name)
    }

    /// The node inserted in the backend called `name` (a drive of the system front end),
    /// which commands that take a device find before a node of that name.
    pub fn find_by_backend(&self, name: &str) -> Option<Rc<Node>> {
        self.backend_named(name).and_then(|b| b.node())
    }

    /// A node by node name only, for commands without a device argument.
    ///
    /// # Errors
    /// QEMU's "Cannot find device='' nor node-name='x'".
    pub fn lookup_node(&self, name: &str) -> Result<Rc<Node>> {
        self.find(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_owned()))
    }

    /// A node by node name only, for commands that say "Device 'x' not found".
    ///
    /// # Errors
    /// `GenericError` "Device 'x' not found" (QEMU uses the generic class here).
    pub fn lookup_device(&self, name: &str) -> Result<Rc<Node>> {
        self.find(name)
            .ok_or_else(|| Error::DeviceNotFound(name.to_owned()))
    }

    pub(crate) fn check_name(&self, name: &str) -> Result<()> {
        if !id_wellformed(name) {
            return Err(Error::InvalidNodeName(name.to_owned()));
        }
        // QEMU's order: a device's name, another node's, then the length.
        if self.backends().iter().any(|b| b.name() == name) {
            return Err(Error::NodeNameIsDeviceId(name.to_owned()));
        }
        if self.find(name).is_some() {
            return Err(Error::DuplicateNodeName(name.to_owned()));
        }
        if name.len() > MAX_NODE_NAME {
            return Err(Error::NodeNameTooLong);
        }
        Ok(())
    }

    pub(crate) fn auto_name(&self) -> String {
        loop {
            let n = self.next_auto.get();
            self.next_auto.set(n + 1);
            let name = format!("#block{n:03}");
            if self.find(&name).is_none() {
                return name;
            }
        }
    }

    /// The I/O backend for `aio`: the thread pool, or io_uring (falling back to the pool
    /// where the kernel refuses a ring).
    pub fn io_backend(&self, aio: &str) -> Rc<dyn IoBackend> {
        if aio == "threads" {
            return self.threads.clone();
        }
        if let Some(u) = self.uring.borrow().as_ref() {
            return u.clone();
        }
        match Uring::new() {
            Ok(u) => {
                let u: Rc<dyn IoBackend> = Rc::new(u);
                *self.uring.borrow_mut() = Some(u.clone());
                u
            }
            Err(e) => {
                tracing::warn!(error = %e, "io_uring is not available; using the thread pool");
                self.threads.clone()
            }
        }
    }

    /// The format of the image file at `path`, by its first bytes (raw when no format
    /// claims it).
    ///
    /// # Errors
    /// The file failing to open.
    pub async fn probe_image(&self, path: &str) -> Result<&'static str> {
        self.probe_image_as(path, true).await
    }

    /// The format an existing image a job writes to (`drive-backup`, `drive-mirror` with
    /// mode `existing`), given none, opens as. QEMU opens it with the source's flags: under
    /// a source opened as a protocol (a `file`, a `null-co`) and not reopened since, that
    /// means by its protocol alone (the file node itself, as big as the file); otherwise the
    /// image is probed, and
    /// the node opened must then be marked so ([`Graph::opened_probed`]).
    ///
    /// # Errors
    /// The file failing to open for the probe.
    pub async fn job_target_format(&self, source: &Node, path: &str) -> Result<TargetFormat> {
        // The name's protocol is looked up first, and must be one known.
        crate::filename::known_protocol_options(path)?;
        // Until a reopen drops the flag that says so (`Node::reopened`).
        let source_is_protocol = !source.reopened.get()
            && self
                .registry()
                .get(source.driver_name())
                .is_some_and(|f| f.opens_as_protocol());
        if source_is_protocol {
            let protocol = crate::filename::protocol_options(path);
            let name = protocol.get("driver").and_then(QObject::as_str);
            return Ok(TargetFormat::given(name.unwrap_or("file")));
        }
        Ok(TargetFormat {
            name: self.probe_image_as(path, false).await?.to_owned(),
            probed: true,
        })
    }

    /// [`Graph::probe_image`] of a file about to be opened for writing (a job's target):
    /// QEMU opens it so before it probes, so a file that cannot be written fails as it
    /// would then.
    ///
    /// # Errors
    /// The file failing to open.
    pub async fn probe_image_as(&self, path: &str, read_only: bool) -> Result<&'static str> {
        let file_opts = crate::filename::protocol_options(path).with("read-only", read_only);
        self.probe_format(&file_opts).await
    }

    /// The format of the image a node opened from command-line options `file_opts` (every
    /// scalar a string, a `-drive`'s `file.*`) shows, by its first bytes: the node is opened
    /// read-only for the look and closed again (QEMU opens a drive's file, then probes).
    ///
    /// # Errors
    /// The options refused, the node failing to open.
    pub async fn probe_cli_options(&self, file_opts: &QDict) -> Result<&'static str> {
        // Typed as the file of a raw node, as a drive's file would be.
        let drive = QDict::new()
            .with("driver", "raw")
            .with("file", file_opts.clone());
        let typed = self.check_drive_options(&drive)?;
        let Some(ferrite_qobject::QObject::Dict(file)) = typed.get("file") else {
            return Err(Error::MissingChild("file".into()));
        };
        self.probe_format(&file.clone().with("read-only", true))
            .await
    }

    pub(crate) async fn probe_format(&self, file_opts: &QDict) -> Result<&'static str> {
        let f = self.open(&Args::new(file_opts.clone())).await?;
        let head = match BlockBackend::new(
            &self.rc(),
            &f,
            crate::Perm::CONSISTENT_READ,
            crate::Perm::all(),
        ) {
            Ok(blk) => {
                let n = f.len().min(512) as usize;
                let head = if n > 0 {
                    blk.read(0, n).await.ok()
                } else {
                    None
                };
                drop(blk);
                head
            }
            Err(_) => None,
        };
        self.forget_if_orphan(&f);
        let name = f.filename();
        Ok(self
            .registry
            .probe(head.as_deref().unwrap_or_default(), Some(&name)))
    }

    /// Drains a node: its parents, up to the root users, issue no new requests until the
    /// section is dropped, and nothing is in flight when this returns.
    pub async fn drain(&self, node: &Rc<Node>) -> Drained {
        crate::drain::drain(node).await
    }

    /// Drains every node at once (QEMU: `bdrv_drain_all_begin`): nothing is in flight
    /// anywhere and every job is paused until the sections are dropped.
    pub async fn drain_all(&self) -> Vec<Drained> {
        let nodes = self.nodes();
        for n in &nodes {
            n.drained_begin();
        }
        let held: Vec<Drained> = nodes.iter().map(|n| Drained::holding(n.clone())).collect();
        for n in &nodes {
            crate::drain::poll_until_quiet(n).await;
        }
        held
    }

    /// Housekeeping tick: every node drops the cached metadata it left unused.
    pub fn clean_caches(&self, now: std::time::Instant) {
        for n in self.nodes() {
            n.driver.clean_caches(now);
        }
    }
}
