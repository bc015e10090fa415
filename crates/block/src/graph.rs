//! The graph: every node by name, opening nodes from `BlockdevOptions`, attaching users with
//! permission checks, and deleting (QEMU: `block.c`).

use crate::drivers::qcow2::{BackingSpec, Corruption, CorruptionHook, Qcow2Driver};
use crate::drivers::{
    cbw::{CbwDriver, CbwOptions},
    file::FileDriver,
    file::FileOpen,
    null::NullDriver,
    raw::RawDriver,
    snapshot_access::SnapshotAccessDriver,
};
use crate::io::{IoBackend, ThreadPool, Uring};
use crate::node::{Child, DetectZeroes, Drained, Node, NodeSettings, Parent, Use};
use crate::perm::Perm;
use ferrite_qapi::{Args, Error, ErrorClass, id_wellformed};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Where the block layer sends its events (the daemon's event bus).
pub trait EventSink {
    /// Emits event `name` with `data`.
    fn emit(&self, name: &'static str, data: QDict);
}

/// Longest node name QEMU accepts.
const MAX_NODE_NAME: usize = 31;

/// A root user's hold on a node (an export, a job, a command's temporary use). It follows
/// the node when the graph replaces it ([`Graph::replace`]).
#[derive(Debug)]
#[must_use = "release it with Graph::detach"]
pub struct RootUse(Rc<RootSlot>);

#[derive(Debug)]
struct RootSlot {
    node: RefCell<Rc<Node>>,
    id: u64,
}

impl RootUse {
    /// The node used now.
    pub fn node(&self) -> Rc<Node> {
        self.0.node.borrow().clone()
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.name)
    }
}

/// The block graph.
pub struct Graph {
    /// Nodes in creation order.
    nodes: RefCell<Vec<Rc<Node>>>,
    /// Every root user's hold, so that replacing a node can move them.
    roots: RefCell<Vec<std::rc::Weak<RootSlot>>>,
    /// Names of nodes created by `blockdev-add` itself (vs. inline children).
    monitor_owned: RefCell<Vec<String>>,
    next_auto: Cell<u64>,
    next_use: Cell<u64>,
    threads: Rc<dyn IoBackend>,
    uring: RefCell<Option<Rc<dyn IoBackend>>>,
    events: Rc<dyn EventSink>,
    /// The copy state the next `copy-before-write` node opened shares (a backup job's).
    handoff_copy: RefCell<Option<Rc<crate::copy::BlockCopy>>>,
    /// Nodes a block job is using, with why (QEMU's op blockers).
    blockers: RefCell<Vec<(String, String)>>,
}

fn backing_error(path: &str, e: Error) -> Error {
    Error::generic(format!(
        "Could not open backing file: Could not open '{path}': {}",
        e.desc
    ))
}

fn node_not_found(name: &str) -> Error {
    Error::generic(format!(
        "Cannot find device='{name}' nor node-name='{name}'"
    ))
}

impl Graph {
    /// An empty graph.
    pub fn new(events: Rc<dyn EventSink>) -> Rc<Graph> {
        Rc::new(Graph {
            nodes: RefCell::new(Vec::new()),
            roots: RefCell::new(Vec::new()),
            monitor_owned: RefCell::new(Vec::new()),
            next_auto: Cell::new(0),
            next_use: Cell::new(1),
            threads: Rc::new(ThreadPool),
            uring: RefCell::new(None),
            events,
            handoff_copy: RefCell::new(None),
            blockers: RefCell::new(Vec::new()),
        })
    }

    /// A node by name.
    pub fn find(&self, name: &str) -> Option<Rc<Node>> {
        self.nodes.borrow().iter().find(|n| n.name == name).cloned()
    }

    /// Every node, in creation order.
    pub fn nodes(&self) -> Vec<Rc<Node>> {
        self.nodes.borrow().clone()
    }

    /// A node by name, for commands that take a node (`Cannot find device=... nor node-name=...`).
    ///
    /// # Errors
    /// QEMU's "Cannot find device='x' nor node-name='x'".
    pub fn lookup(&self, name: &str) -> Result<Rc<Node>, Error> {
        self.find(name).ok_or_else(|| node_not_found(name))
    }

    /// A node by node name only, for commands without a device argument.
    ///
    /// # Errors
    /// QEMU's "Cannot find device='' nor node-name='x'".
    pub fn lookup_node(&self, name: &str) -> Result<Rc<Node>, Error> {
        self.find(name)
            .ok_or_else(|| Error::generic(format!("Cannot find device='' nor node-name='{name}'")))
    }

    fn io_backend(&self, aio: &str) -> Rc<dyn IoBackend> {
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

    /// `blockdev-add`: opens a node (and any inline children) from checked `BlockdevOptions`.
    ///
    /// # Errors
    /// A missing, malformed or duplicate node name, an unknown child, or the driver failing.
    pub async fn blockdev_add(&self, opts: &Args) -> Result<Rc<Node>, Error> {
        if opts.opt_str("node-name").is_none() {
            return Err(Error::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let node = self.open(opts).await?;
        self.monitor_owned.borrow_mut().push(node.name.clone());
        Ok(node)
    }

    fn check_name(&self, name: &str) -> Result<(), Error> {
        if !id_wellformed(name) {
            return Err(Error::generic(format!("Invalid node-name: '{name}'")));
        }
        if name.len() > MAX_NODE_NAME {
            return Err(Error::generic("Node name too long"));
        }
        if self.find(name).is_some() {
            return Err(Error::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        Ok(())
    }

    fn auto_name(&self) -> String {
        loop {
            let n = self.next_auto.get();
            self.next_auto.set(n + 1);
            let name = format!("#block{n:03}");
            if self.find(&name).is_none() {
                return name;
            }
        }
    }

    fn new_use_id(&self) -> u64 {
        let id = self.next_use.get();
        self.next_use.set(id + 1);
        id
    }

    /// A child given as a node name or as inline options (`BlockdevRef`).
    async fn child_ref(&self, value: &QObject, parent: &Args) -> Result<Rc<Node>, Error> {
        match value {
            QObject::String(name) => self.lookup(name),
            QObject::Dict(d) => self.open(&Args::new(inherited(parent, d))).await,
            _ => Err(Error::generic("Invalid child reference")),
        }
    }

    /// A copy-before-write filter's `bitmap` (`BlockDirtyBitmap`).
    ///
    /// # Errors
    /// QEMU's texts for an unknown node or bitmap.
    fn cbw_bitmap(&self, b: &Args) -> Result<Rc<crate::bitmap::DirtyBitmap>, Error> {
        let (node, name) = (b.str("node")?, b.str("name")?);
        let node = self
            .find(node)
            .ok_or_else(|| Error::generic(format!("Node '{node}' not found")))?;
        node.bitmap(name)
            .ok_or_else(|| Error::generic(format!("Dirty bitmap '{name}' not found")))
    }

    /// The child `key` of `opts`, which must be there.
    async fn required_child(&self, opts: &Args, key: &str) -> Result<Rc<Node>, Error> {
        let v = opts
            .get(key)
            .ok_or_else(|| Error::generic(format!("Parameter '{key}' is missing")))?;
        self.child_ref(v, opts).await
    }

    /// Opens a node from `BlockdevOptions` (boxed: children open through it recursively).
    fn open<'a>(
        &'a self,
        opts: &'a Args,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Rc<Node>, Error>> + 'a>> {
        Box::pin(async move {
            let mut children = Vec::new();
            let r = self.open_with(opts, &mut children).await;
            if r.is_err() {
                // Inline children opened for a node that failed go away again.
                for c in &children {
                    self.forget_if_orphan(c);
                }
            }
            r
        })
    }

    async fn open_with(&self, opts: &Args, opened: &mut Vec<Rc<Node>>) -> Result<Rc<Node>, Error> {
        let name = match opts.opt_str("node-name") {
            Some(n) => {
                self.check_name(n)?;
                n.to_owned()
            }
            None => self.auto_name(),
        };
        let driver_name = opts.str("driver")?;
        let cache = opts.dict("cache").unwrap_or_default();
        let direct = cache.bool_or("direct", false);
        let mut settings = NodeSettings {
            read_only: opts.bool_or("read-only", false),
            detect_zeroes: match opts.opt_str("detect-zeroes") {
                Some("on") => DetectZeroes::On,
                Some("unmap") => DetectZeroes::Unmap,
                _ => DetectZeroes::Off,
            },
            discard_unmap: opts.opt_str("discard") == Some("unmap"),
            cache_direct: direct,
            cache_no_flush: cache.bool_or("no-flush", false),
        };
        if settings.detect_zeroes == DetectZeroes::Unmap && !settings.discard_unmap {
            return Err(Error::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        let mut children = Vec::new();
        // Where the node goes in the creation order: QEMU registers a format node once its
        // file is open, before its backing chain.
        let mut position = None;
        let driver: Box<dyn crate::driver::Driver> = match driver_name {
            "file" => {
                let aio = opts.opt_str("aio").unwrap_or("threads");
                if aio == "native" && !direct {
                    return Err(Error::generic(
                        "aio=native was specified, but it requires cache.direct=on, which was not specified.",
                    ));
                }
                let (drv, ro) = FileDriver::open(FileOpen {
                    args: opts,
                    read_only: settings.read_only,
                    auto_read_only: opts.bool_or("auto-read-only", false),
                    direct,
                    io: self.io_backend(aio),
                })?;
                settings.read_only = ro;
                Box::new(drv)
            }
            "raw" => {
                let file = self.required_child(opts, "file").await?;
                opened.push(file.clone());
                let drv = RawDriver::open(opts, &file)?;
                children.push(Child {
                    name: "file".into(),
                    node: file,
                    use_id: self.new_use_id(),
                });
                Box::new(drv)
            }
            "null-co" | "null-aio" => {
                let mut json = QDict::new();
                if let Some(s) = opts.get("size") {
                    json.insert("size", s.clone());
                }
                if let Some(rz) = opts.get("read-zeroes") {
                    json.insert("read-zeroes", rz.clone());
                }
                Box::new(NullDriver::open(opts, driver_name == "null-aio", &json)?)
            }
            "qcow2" => {
                let file = self.required_child(opts, "file").await?;
                opened.push(file.clone());
                let drv =
                    Qcow2Driver::open(opts, &file, settings.read_only, self.corruption_hook())
                        .await?;
                children.push(Child {
                    name: "file".into(),
                    node: file.clone(),
                    use_id: self.new_use_id(),
                });
                if let Some(data) = self.qcow2_data_file(&drv, opts, settings.read_only).await? {
                    opened.push(data.clone());
                    children.push(Child {
                        name: "data-file".into(),
                        node: data,
                        use_id: self.new_use_id(),
                    });
                }
                position = Some(self.nodes.borrow().len());
                let backing = match opts.get("backing") {
                    Some(QObject::Null) => None,
                    Some(v) => Some(self.child_ref(v, opts).await?),
                    None => match drv.backing_spec() {
                        Some(spec) => Some(self.open_backing(&file, spec, opts).await?),
                        None => None,
                    },
                };
                if let Some(b) = backing {
                    opened.push(b.clone());
                    children.push(Child {
                        name: "backing".into(),
                        node: b,
                        use_id: self.new_use_id(),
                    });
                }
                Box::new(drv)
            }
            "copy-before-write" => {
                let file = self.required_child(opts, "file").await?;
                opened.push(file.clone());
                let target = self.required_child(opts, "target").await?;
                opened.push(target.clone());
                let bitmap = match opts.dict("bitmap") {
                    Some(b) => Some(self.cbw_bitmap(&b)?),
                    None => None,
                };
                let copy = self.handoff_copy.borrow_mut().take();
                let drv = CbwDriver::open(opts, &file, &target, CbwOptions { copy, bitmap })?;
                for (name, node) in [("file", file), ("target", target)] {
                    children.push(Child {
                        name: name.into(),
                        node,
                        use_id: self.new_use_id(),
                    });
                }
                Box::new(drv)
            }
            "snapshot-access" => {
                let file = self.required_child(opts, "file").await?;
                opened.push(file.clone());
                children.push(Child {
                    name: "file".into(),
                    node: file,
                    use_id: self.new_use_id(),
                });
                Box::new(SnapshotAccessDriver)
            }
            other => {
                return Err(Error::generic(format!(
                    "Driver '{other}' is not supported by ferrite yet"
                )));
            }
        };
        // A name taken while this node's children opened.
        if opts.opt_str("node-name").is_some() && self.find(&name).is_some() {
            return Err(Error::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        let node = Node::new(
            name,
            driver,
            opts.as_dict().clone(),
            settings,
            children.clone(),
        );
        *node.bitmaps.borrow_mut() = node.driver.take_initial_bitmaps();
        let write_event = self.events.clone();
        *node.threshold_hit.borrow_mut() = Some(Box::new(move |n: &Node, exceeded, threshold| {
            write_event.emit(
                "BLOCK_WRITE_THRESHOLD",
                QDict::new()
                    .with("node-name", n.name())
                    .with("amount-exceeded", exceeded)
                    .with("write-threshold", threshold),
            );
        }));
        // Attach the children with what this node (still unused) needs of them.
        for (i, c) in children.iter().enumerate() {
            let (perm, shared) = node
                .driver
                .child_perm(&c.name, Perm::empty(), Perm::all(), false);
            let u = Use {
                id: c.use_id,
                parent: Parent::Node {
                    parent: node.name.clone(),
                    child: c.name.clone(),
                },
                perm: Perm::empty(),
                shared: Perm::all(),
            };
            c.node.users.borrow_mut().push(u);
            if let Err(e) = self.update_use(&c.node, c.use_id, perm, shared) {
                for c in &children[..=i] {
                    c.node.users.borrow_mut().retain(|u| u.id != c.use_id);
                    self.forget_if_orphan(&c.node);
                }
                return Err(e);
            }
        }
        {
            let mut nodes = self.nodes.borrow_mut();
            let at = position.unwrap_or(nodes.len()).min(nodes.len());
            nodes.insert(at, node.clone());
        }
        Ok(node)
    }

    /// Opens a node from inline options for a command's own use (`blockdev-create`'s
    /// `file`); [`Graph::release_inline`] deletes it again.
    ///
    /// # Errors
    /// As `blockdev-add`.
    pub async fn open_inline(&self, opts: &Args) -> Result<Rc<Node>, Error> {
        self.open(opts).await
    }

    /// Deletes a node opened with [`Graph::open_inline`] once nothing uses it.
    pub fn release_inline(&self, node: &Rc<Node>) {
        self.forget_if_orphan(node);
    }

    /// As [`Graph::release_inline`] for a node that may have written: it is closed (caches
    /// written back, image marked clean) before it goes.
    pub async fn close_inline(&self, node: &Rc<Node>) {
        let owned = self.monitor_owned.borrow().iter().any(|n| *n == node.name);
        if !owned && node.users.borrow().is_empty() {
            let _ = node.flush().await;
            self.close_node(node).await;
            self.forget_if_orphan(node);
        }
    }

    /// The external data file of a qcow2 image: the `data-file` option, or the file the
    /// header names (relative to the working directory, as QEMU takes it).
    async fn qcow2_data_file(
        &self,
        drv: &Qcow2Driver,
        opts: &Args,
        read_only: bool,
    ) -> Result<Option<Rc<Node>>, Error> {
        let Some(spec) = drv.data_file() else {
            if opts.get("data-file").is_some() {
                return Err(Error::generic(
                    "'data-file' can only be set for images with an external data file",
                ));
            }
            return Ok(None);
        };
        if let Some(v) = opts.get("data-file") {
            return self.child_ref(v, opts).await.map(Some);
        }
        let name = spec
            .name
            .ok_or_else(|| Error::generic("'data-file' is required for this image"))?;
        let file_opts = QDict::new()
            .with("driver", "file")
            .with("filename", name.as_str())
            .with("read-only", read_only);
        self.open(&Args::new(file_opts)).await.map(Some)
    }

    /// Opens the backing file an image names: its path relative to the image's, its format
    /// from the image or probed, read-only.
    async fn open_backing(
        &self,
        image_file: &Rc<Node>,
        spec: BackingSpec,
        parent_opts: &Args,
    ) -> Result<Rc<Node>, Error> {
        let path = crate::filename::backing_path(&image_file.filename(), &spec.filename)?;
        let mut file_opts = QDict::new()
            .with("driver", "file")
            .with("filename", path.as_str())
            .with("read-only", true);
        if let Some(c) = parent_opts.get("cache") {
            file_opts.insert("cache", c.clone());
        }
        let format = match spec.format {
            Some(f) => f,
            None => {
                // Probe: qcow2 by its magic, raw otherwise.
                let f = self
                    .open(&Args::new(file_opts.clone()))
                    .await
                    .map_err(|e| backing_error(&path, e))?;
                let magic = if f.len() >= 4 {
                    f.read(0, 4).await.ok()
                } else {
                    None
                };
                self.forget_if_orphan(&f);
                if magic.as_deref() == Some(&b"QFI\xfb"[..]) {
                    "qcow2".to_owned()
                } else {
                    "raw".to_owned()
                }
            }
        };
        if !matches!(format.as_str(), "qcow2" | "raw" | "file" | "null-co") {
            return Err(Error::generic(format!(
                "Could not open backing file: Unknown driver '{format}'"
            )));
        }
        let opts = if format == "file" {
            file_opts
        } else {
            QDict::new()
                .with("driver", format.as_str())
                .with("file", file_opts)
                .with("read-only", true)
        };
        self.open(&Args::new(opts))
            .await
            .map_err(|e| backing_error(&path, e))
    }

    /// What a qcow2 node calls when it finds corruption: `BLOCK_IMAGE_CORRUPTED`.
    fn corruption_hook(&self) -> CorruptionHook {
        let events = self.events.clone();
        Rc::new(move |node: &Node, c: &Corruption, fatal: bool| {
            let mut d = QDict::new()
                .with("device", "")
                .with("node-name", node.name())
                .with("msg", c.msg.as_str());
            d.insert_opt("offset", c.offset);
            d.insert_opt("size", c.size);
            d.insert("fatal", fatal);
            events.emit("BLOCK_IMAGE_CORRUPTED", d);
        })
    }

    /// Adds a root user of `node` taking `perm` and sharing `shared`.
    ///
    /// # Errors
    /// A permission conflict anywhere below, or a lock held by another process.
    pub fn attach(
        &self,
        node: &Rc<Node>,
        desc: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<RootUse, Error> {
        let id = self.new_use_id();
        node.users.borrow_mut().push(Use {
            id,
            parent: Parent::Root(desc.to_owned()),
            perm: Perm::empty(),
            shared: Perm::all(),
        });
        if let Err(e) = self.update_use(node, id, perm, shared) {
            node.users.borrow_mut().retain(|u| u.id != id);
            return Err(e);
        }
        let slot = Rc::new(RootSlot {
            node: RefCell::new(node.clone()),
            id,
        });
        let mut roots = self.roots.borrow_mut();
        roots.retain(|w| w.strong_count() > 0);
        roots.push(Rc::downgrade(&slot));
        Ok(RootUse(slot))
    }

    /// Releases a root user.
    pub fn detach(&self, root: RootUse) {
        let node = root.node();
        node.users.borrow_mut().retain(|u| u.id != root.0.id);
        let _ = self.propagate(&node);
    }

    /// Replaces `old` with `new` under every parent of `old` (except `new` itself, when it
    /// sits above `old` as a filter does, and nodes below `new`), as one operation on a drained graph: node edges and
    /// root users move together, and on a permission conflict nothing moves
    /// (QEMU: `bdrv_replace_node`).
    ///
    /// # Errors
    /// A permission conflict on `new`.
    pub async fn replace(&self, old: &Rc<Node>, new: &Rc<Node>) -> Result<(), Error> {
        let _old_drained = self.drain(old).await;
        let _new_drained = self.drain(new).await;
        // A parent below `new` stays (moving it would make a loop: a fleecing target backed
        // by the source it protects keeps that source as its backing).
        let moving: Vec<Use> = old
            .users()
            .into_iter()
            .filter(|u| match &u.parent {
                Parent::Node { parent, .. } => !reaches(new, parent),
                Parent::Root(_) => true,
            })
            .collect();
        let r = self.move_uses(&moving, old, new);
        if r.is_err() {
            let _ = self.move_uses(&moving, new, old);
        }
        r
    }

    fn move_uses(&self, uses: &[Use], from: &Rc<Node>, to: &Rc<Node>) -> Result<(), Error> {
        for u in uses {
            from.users.borrow_mut().retain(|x| x.id != u.id);
            to.users.borrow_mut().push(u.clone());
            match &u.parent {
                Parent::Node { parent, .. } => {
                    if let Some(p) = self.find(parent) {
                        for c in p
                            .children
                            .borrow_mut()
                            .iter_mut()
                            .filter(|c| c.use_id == u.id)
                        {
                            c.node = to.clone();
                        }
                    }
                }
                Parent::Root(_) => {
                    for slot in self
                        .roots
                        .borrow()
                        .iter()
                        .filter_map(std::rc::Weak::upgrade)
                    {
                        if slot.id == u.id {
                            *slot.node.borrow_mut() = to.clone();
                        }
                    }
                }
            }
        }
        // `from` lets go first: what it asked of its own children for these users (a
        // filter guarding its source) must not stand in their way at `to`.
        let _ = self.propagate(from);
        uses.iter()
            .try_for_each(|u| self.check_conflicts(to, u.id))
            .and_then(|()| self.propagate(to))
    }

    /// Changes what one use of `node` takes and shares, checking the whole subgraph; on error
    /// nothing changes.
    fn update_use(&self, node: &Rc<Node>, id: u64, perm: Perm, shared: Perm) -> Result<(), Error> {
        let old = {
            let mut users = node.users.borrow_mut();
            let Some(u) = users.iter_mut().find(|u| u.id == id) else {
                return Ok(());
            };
            let old = (u.perm, u.shared);
            u.perm = perm;
            u.shared = shared;
            old
        };
        let r = self
            .check_conflicts(node, id)
            .and_then(|()| self.propagate(node));
        if r.is_err() {
            if let Some(u) = node.users.borrow_mut().iter_mut().find(|u| u.id == id) {
                u.perm = old.0;
                u.shared = old.1;
            }
            let _ = self.propagate(node);
        }
        r
    }

    /// QEMU's compliance check between every pair of a node's users (newest first), then the
    /// read-only rule.
    fn check_conflicts(&self, node: &Node, _id: u64) -> Result<(), Error> {
        let users = node.users.borrow();
        let desc = |u: &Use| match &u.parent {
            Parent::Node { parent, child } => {
                format!(
                    "node '{parent}' (uses node '{}' as '{child}' child)",
                    node.name
                )
            }
            Parent::Root(_) => format!(
                "an unnamed block device (uses node '{}' as 'root' child)",
                node.name
            ),
        };
        for a in users.iter().rev() {
            for b in users.iter().rev() {
                if a.id == b.id {
                    continue;
                }
                let denied = b.perm - a.shared;
                if !denied.is_empty() {
                    let names: Vec<&str> = Perm::NAMED
                        .iter()
                        .filter(|(p, _)| denied.contains(*p))
                        .map(|(_, n)| *n)
                        .collect();
                    return Err(Error::generic(format!(
                        "Permission conflict on node '{}': permissions '{}' are both required by {} and unshared by {}.",
                        node.name,
                        names.join(", "),
                        desc(b),
                        desc(a)
                    )));
                }
            }
        }
        let (perm, _) = node.cumulative_perms();
        if node.read_only.get() && perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) {
            return Err(Error::generic("Block node is read-only"));
        }
        Ok(())
    }

    /// Pushes a node's cumulative permissions down to its driver (locks) and children.
    fn propagate(&self, node: &Rc<Node>) -> Result<(), Error> {
        let (perm, shared) = node.cumulative_perms();
        node.driver.set_perm(perm, shared)?;
        for c in node.children() {
            let used = !node.users.borrow().is_empty();
            let (p, s) = node.driver.child_perm(&c.name, perm, shared, used);
            self.update_use(&c.node, c.use_id, p, s)?;
        }
        Ok(())
    }

    /// `blockdev-del`.
    ///
    /// # Errors
    /// Unknown node, a node not added by `blockdev-add`, or one still in use.
    pub async fn blockdev_del(&self, name: &str) -> Result<(), Error> {
        let node = self.find(name).ok_or_else(|| {
            Error::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        // QEMU's order: used by a device or export, blocked, not the monitor's, used.
        let users = node.users();
        if users.iter().any(|u| matches!(u.parent, Parent::Root(_))) {
            return Err(Error::generic(format!("Node {name} is in use")));
        }
        if let Some(p) = self.backing_parent(&node) {
            return Err(Error::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                p.name
            )));
        }
        self.check_unblocked(&node)?;
        if !self.monitor_owned.borrow().iter().any(|n| n == name) {
            return Err(Error::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !users.is_empty() {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        self.monitor_owned.borrow_mut().retain(|n| n != name);
        self.close_node(&node).await;
        self.remove(&node);
        Ok(())
    }

    /// Takes a node out of the graph, releasing its children (deleting inline ones).
    fn remove(&self, node: &Rc<Node>) {
        self.nodes.borrow_mut().retain(|n| !Rc::ptr_eq(n, node));
        let children = std::mem::take(&mut *node.children.borrow_mut());
        for c in children {
            c.node.users.borrow_mut().retain(|u| u.id != c.use_id);
            let _ = self.propagate(&c.node);
            self.forget_if_orphan(&c.node);
        }
    }

    /// Deletes an implicitly created node that nothing uses any more.
    fn forget_if_orphan(&self, node: &Rc<Node>) {
        let owned = self.monitor_owned.borrow().iter().any(|n| *n == node.name);
        if !owned && node.users.borrow().is_empty() && self.find(&node.name).is_some() {
            self.remove(node);
        }
    }

    /// `blockdev-reopen`: checks every entry first, then applies them all on drained nodes.
    /// Options left out take their defaults, as in QEMU.
    ///
    /// # Errors
    /// QEMU's texts for a missing or unknown node name and for options that cannot change;
    /// "Block node is read-only" when a user still writes to a node made read-only.
    pub async fn reopen(&self, list: &[Args]) -> Result<(), Error> {
        use ferrite_qobject::QObject;
        let mut plan = Vec::new();
        for opts in list {
            let name = opts
                .opt_str("node-name")
                .ok_or_else(|| Error::generic("node-name not specified"))?;
            let node = self.find(name).ok_or_else(|| {
                Error::generic(format!("Failed to find node with node-name='{name}'"))
            })?;
            if opts.str("driver")? != node.driver_name() {
                return Err(Error::generic("Cannot change the option 'driver'"));
            }
            crate::drivers::unchanged(
                opts,
                &Args::new(node.options()),
                &[("cache", QObject::Dict(QDict::new()))],
            )?;
            node.driver.reopen_check(&node, opts)?;
            let read_only = opts.bool_or("read-only", false);
            if opts.opt_str("detect-zeroes") == Some("unmap")
                && opts.opt_str("discard") != Some("unmap")
            {
                return Err(Error::generic(
                    "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
                ));
            }
            if read_only
                && node
                    .cumulative_perms()
                    .0
                    .intersects(Perm::WRITE | Perm::WRITE_UNCHANGED)
            {
                return Err(Error::generic("Block node is read-only"));
            }
            plan.push((node, opts, read_only));
        }
        for (node, opts, read_only) in plan {
            let _drained = self.drain(&node).await;
            if read_only && !node.is_read_only() {
                // Leaving read-write: caches written back and the image marked clean.
                node.driver.close(&node).await.map_err(|e| {
                    Error::generic(format!(
                        "Could not write back before reopening read-only: {}",
                        ferrite_qapi::os_msg(&e)
                    ))
                })?;
            }
            let was_read_only = node.is_read_only();
            node.driver.reopen_apply(&node, opts, read_only)?;
            if was_read_only && !read_only {
                node.driver.prepare_writable(&node).await.map_err(|e| {
                    Error::generic(format!(
                        "Could not prepare the image for writing: {}",
                        ferrite_qapi::os_msg(&e)
                    ))
                })?;
            }
            node.read_only.set(read_only);
            self.propagate(&node)?;
            node.detect_zeroes.set(match opts.opt_str("detect-zeroes") {
                Some("on") => DetectZeroes::On,
                Some("unmap") => DetectZeroes::Unmap,
                _ => DetectZeroes::Off,
            });
            node.discard_unmap
                .set(opts.opt_str("discard") == Some("unmap"));
            *node.options.borrow_mut() = opts.as_dict().clone();
        }
        Ok(())
    }

    /// `block_resize`: takes the resize permission for the duration, drains and truncates.
    ///
    /// # Errors
    /// QEMU's texts for a bad size, a read-only node, a driver that cannot resize, or a
    /// permission conflict.
    pub async fn resize(&self, node: &Rc<Node>, size: i64) -> Result<(), Error> {
        let size = u64::try_from(size)
            .map_err(|_| Error::generic("Parameter 'size' expects a >0 size"))?;
        let hold = self.attach(node, "block_resize", Perm::RESIZE, Perm::all())?;
        if node.is_read_only() {
            self.detach(hold);
            return Err(Error::generic("Image is read-only"));
        }
        let drained = self.drain(node).await;
        let r = node.truncate(size).await;
        drop(drained);
        self.detach(hold);
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSUP) => Error::generic("Image format driver does not support resize"),
            _ => Error::generic(format!("Could not resize: {}", ferrite_qapi::os_msg(&e))),
        })
    }

    /// Drains a node and every node above it.
    pub async fn drain(&self, node: &Rc<Node>) -> Drained {
        let mut set: Vec<Rc<Node>> = vec![node.clone()];
        let mut i = 0;
        while i < set.len() {
            for u in set[i].users() {
                if let Parent::Node { parent, .. } = &u.parent
                    && let Some(p) = self.find(parent)
                    && !set.iter().any(|n| Rc::ptr_eq(n, &p))
                {
                    set.push(p);
                }
            }
            i += 1;
        }
        crate::node::drain(set).await
    }

    /// Writes a node's cached state back before it goes (`bdrv_close`).
    async fn close_node(&self, node: &Rc<Node>) {
        if let Err(e) = node.driver.close(node).await {
            tracing::warn!(node = node.name(), error = %e, "closing failed");
        }
    }

    /// Closes every node, parents before children (daemon exit, after the flush).
    pub async fn close_all(&self) {
        for node in self.nodes().iter().rev() {
            self.close_node(node).await;
        }
    }

    /// Flushes every node, parents before children (daemon exit).
    pub async fn flush_all(&self) {
        for node in self.nodes().iter().rev() {
            if let Err(e) = node.flush().await {
                tracing::warn!(node = node.name(), error = %e, "flush at exit failed");
            }
        }
    }

    /// Marks `node` as used by a block job: other jobs and deletion refuse it until
    /// [`Graph::unblock`].
    pub fn block(&self, node: &Node, reason: &str) {
        self.blockers
            .borrow_mut()
            .push((node.name.clone(), reason.to_owned()));
    }

    /// Lifts one [`Graph::block`] of `node` for `reason`.
    pub fn unblock(&self, node: &Node, reason: &str) {
        let mut b = self.blockers.borrow_mut();
        if let Some(i) = b.iter().position(|(n, r)| *n == node.name && r == reason) {
            b.remove(i);
        }
    }

    /// QEMU's "Node 'x' is busy: ..." when a block job uses `node`.
    ///
    /// # Errors
    /// The first reason `node` is blocked.
    pub fn check_unblocked(&self, node: &Node) -> Result<(), Error> {
        match self.blockers.borrow().iter().find(|(n, _)| *n == node.name) {
            Some((n, reason)) => Err(Error::generic(format!("Node '{n}' is busy: {reason}"))),
            None => Ok(()),
        }
    }

    /// Puts a `copy-before-write` filter sharing `copy` above `source`, writing to `target`:
    /// every user of `source` goes through it from now on (a backup job's start).
    ///
    /// # Errors
    /// Different sizes, a taken name, or a permission conflict.
    pub async fn insert_copy_before_write(
        &self,
        source: &Rc<Node>,
        target: &Rc<Node>,
        name: Option<&str>,
        copy: Rc<crate::copy::BlockCopy>,
    ) -> Result<Rc<Node>, Error> {
        let mut opts = QDict::new()
            .with("driver", "copy-before-write")
            .with("file", source.name())
            .with("target", target.name());
        if let Some(n) = name {
            opts.insert("node-name", n);
        }
        *self.handoff_copy.borrow_mut() = Some(copy);
        let r = self.open(&Args::new(opts)).await;
        self.handoff_copy.borrow_mut().take();
        let filter = r?;
        if let Err(e) = self.replace(source, &filter).await {
            self.forget_if_orphan(&filter);
            return Err(e);
        }
        Ok(filter)
    }

    /// Takes a filter out again: its users go to what is below it now (the source, or
    /// another filter inserted since) and it is deleted.
    ///
    /// # Errors
    /// A permission conflict moving the users back.
    pub async fn remove_filter(&self, filter: &Rc<Node>) -> Result<(), Error> {
        if let Some(below) = filter.child("file") {
            self.replace(filter, &below).await?;
        }
        self.forget_if_orphan(filter);
        Ok(())
    }

    /// The node that has `node` as its backing child, if any.
    pub fn backing_parent(&self, node: &Node) -> Option<Rc<Node>> {
        node.users().iter().find_map(|u| match &u.parent {
            Parent::Node { parent, child } if child == "backing" => self.find(parent),
            _ => None,
        })
    }

    /// Gives `node` (a format node without one) `backing` as its backing child.
    ///
    /// # Errors
    /// A permission conflict; nothing changed then.
    pub fn attach_backing(&self, node: &Rc<Node>, backing: &Rc<Node>) -> Result<(), Error> {
        let use_id = self.new_use_id();
        backing.users.borrow_mut().push(Use {
            id: use_id,
            parent: Parent::Node {
                parent: node.name.clone(),
                child: "backing".into(),
            },
            perm: Perm::empty(),
            shared: Perm::all(),
        });
        node.children.borrow_mut().push(Child {
            name: "backing".into(),
            node: backing.clone(),
            use_id,
        });
        if let Err(e) = self.propagate(node) {
            self.detach_child(node, backing, use_id);
            return Err(e);
        }
        Ok(())
    }

    /// Takes back a child link made in place: the parent forgets it, the child its use.
    fn detach_child(&self, parent: &Node, child: &Rc<Node>, use_id: u64) {
        parent.children.borrow_mut().retain(|c| c.use_id != use_id);
        child.users.borrow_mut().retain(|u| u.id != use_id);
        let _ = self.propagate(child);
    }

    /// An external snapshot's switch: `overlay` gets `node` as its backing file and takes
    /// its place under every user, and `node` becomes read-only (QEMU's `bdrv_append`).
    ///
    /// # Errors
    /// A permission conflict; nothing changed then.
    pub async fn append_overlay(&self, node: &Rc<Node>, overlay: &Rc<Node>) -> Result<(), Error> {
        let _drained = self.drain(node).await;
        self.attach_backing(overlay, node)?;
        if let Err(e) = self.replace(node, overlay).await {
            if let Some(c) = overlay.children().into_iter().find(|c| c.name == "backing") {
                self.detach_child(overlay, node, c.use_id);
            }
            return Err(e);
        }
        // Unless the overlay's header names this very node, its backing was chosen here
        // (its file name then shows the choice, as QEMU's does).
        let named = overlay.driver.backing_filename().and_then(|(f, _)| {
            let image = overlay.child("file").map(|c| c.filename())?;
            crate::filename::backing_path(&image, &f).ok()
        });
        if named.as_deref() != Some(node.filename().as_str()) {
            overlay
                .options
                .borrow_mut()
                .insert("backing", node.name.as_str());
        }
        // The old top is read-only from now on, its file too.
        if !node.is_read_only() {
            let _ = node.driver.close(node).await;
            let _ = self.set_read_only(node, true);
        }
        Ok(())
    }

    /// Switches a node and its `file` child between read-only and read-write in place
    /// (internal reopens: an external snapshot's old top, `change-backing-file`).
    ///
    /// # Errors
    /// The storage refusing the mode.
    pub fn set_read_only(&self, node: &Rc<Node>, read_only: bool) -> Result<(), Error> {
        let file = node.child("file").filter(|f| f.users().len() == 1);
        // Going read-only, the node drops its write permission before its file reopens;
        // going read-write, the file reopens for writing first.
        let order: Vec<&Rc<Node>> = if read_only {
            std::iter::once(node).chain(file.iter()).collect()
        } else {
            file.iter().chain(std::iter::once(node)).collect()
        };
        for n in order {
            n.driver
                .reopen_apply(n, &Args::new(n.options()), read_only)?;
            n.read_only.set(read_only);
            self.propagate(n)?;
        }
        Ok(())
    }

    /// Housekeeping tick: every node drops the cached metadata it left unused.
    pub fn clean_caches(&self, now: std::time::Instant) {
        for n in self.nodes() {
            n.driver.clean_caches(now);
        }
    }

    /// A `DeviceNotFound`-class lookup, for commands that say "Device 'x' not found".
    ///
    /// # Errors
    /// `GenericError` "Device 'x' not found" (QEMU uses the generic class here).
    pub fn lookup_device(&self, name: &str) -> Result<Rc<Node>, Error> {
        self.find(name).ok_or_else(|| {
            Error::new(
                ErrorClass::GenericError,
                format!("Device '{name}' not found"),
            )
        })
    }
}

/// Whether `name` is `node` or a node below it.
fn reaches(node: &Rc<Node>, name: &str) -> bool {
    node.name == name || node.children().iter().any(|c| reaches(&c.node, name))
}

/// The options of a child given inline: what it does not set itself, it takes from its
/// parent (read-only, auto-read-only, cache modes), and it passes discards on, since the
/// parent already applies its own discard policy (QEMU's inherited options).
fn inherited(parent: &Args, child: &QDict) -> QDict {
    let mut d = child.clone();
    for key in ["read-only", "auto-read-only"] {
        if d.get(key).is_none()
            && let Some(v) = parent.get(key)
        {
            d.insert(key, v.clone());
        }
    }
    if let Some(QObject::Dict(pc)) = parent.get("cache") {
        let mut cache = match d.get("cache") {
            Some(QObject::Dict(c)) => c.clone(),
            _ => QDict::new(),
        };
        for key in ["direct", "no-flush"] {
            if cache.get(key).is_none()
                && let Some(v) = pc.get(key)
            {
                cache.insert(key, v.clone());
            }
        }
        d.insert("cache", cache);
    }
    if d.get("discard").is_none() {
        d.insert("discard", "unmap");
    }
    d
}
