//! Opening nodes (QEMU: `bdrv_open_inherit`, `bdrv_open_child`): the options common to
//! every node, then the driver's factory with an [`OpenCtx`] through which it opens or looks
//! up its children and reads them. The node joins the graph only once its driver is open.

use crate::child::{Child, ParentRef, RootParent, Vertex, VertexKind};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::events::EventSink;
use crate::graph::Graph;
use crate::io::IoBackend;
use crate::node::{DetectZeroes, Node, NodeSettings};
use crate::perm::Perm;
use crate::registry::DriverFactory;
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::{Rc, Weak};

/// The longest node QEMU has: `INT64_MAX` rounded down to its largest alignment (1 GiB).
pub const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// The parent of a child edge while its node is being opened: the driver reads the child
/// through the edge before the node exists; the edge then moves to the node.
struct Opening {
    name: String,
}

impl RootParent for Opening {
    fn description(&self) -> String {
        format!("node '{}'", self.name)
    }
    fn drained_begin(&self) {}
    fn drained_end(&self) {}
    fn drained_poll(&self) -> bool {
        false
    }
    fn vertex(&self) -> Vertex {
        Vertex {
            kind: VertexKind::BlockBackend,
            name: String::new(),
            key: self as *const Self as usize,
            order: 0,
        }
    }
}

/// Where a driver opening a node finds its options and opens its children.
pub struct OpenCtx<'a> {
    graph: &'a Graph,
    opts: &'a Args,
    name: String,
    settings: NodeSettings,
    opening: Rc<Opening>,
    edges: Vec<Rc<Child>>,
    /// The children it opened from inline options: they take their options from it.
    inline: Vec<Rc<Node>>,
    position: Option<usize>,
    /// An inline `file` opened before the node took its name (QEMU's order), for
    /// [`OpenCtx::open_child_ref`] to take instead of opening it again.
    early_file: Option<Rc<Node>>,
}

impl<'a> OpenCtx<'a> {
    /// The node's options (`BlockdevOptions`).
    pub fn opts(&self) -> &'a Args {
        self.opts
    }

    /// The new node's name.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The common settings; a driver may change them (a file opened read-only after
    /// `auto-read-only` fell back).
    pub fn settings(&mut self) -> &mut NodeSettings {
        &mut self.settings
    }

    /// For a node that cannot write (QEMU's `bdrv_apply_auto_read_only`): a node asked to
    /// be writable becomes read-only with `auto-read-only`, else fails with `refusal`.
    ///
    /// # Errors
    /// `refusal`, for a writable node without `auto-read-only`.
    pub fn apply_auto_read_only(&mut self, refusal: impl FnOnce() -> crate::Error) -> Result<()> {
        if !self.settings.read_only {
            if !self.opts.opt_bool("auto-read-only").unwrap_or(false) {
                return Err(refusal());
            }
            self.settings.read_only = true;
        }
        Ok(())
    }

    /// The graph the node joins.
    pub fn graph(&self) -> &'a Graph {
        self.graph
    }

    /// Where events go (`BLOCK_IMAGE_CORRUPTED`).
    pub fn events(&self) -> Rc<dyn EventSink> {
        self.graph.events()
    }

    /// The I/O backend for `aio` (`threads`, `io_uring`, `native`).
    pub fn io_backend(&self, aio: &str) -> Rc<dyn IoBackend> {
        self.graph.io_backend(aio)
    }

    /// The node joins the graph's creation order here rather than after its last child
    /// (QEMU lists a format node once its file is open, before its backing chain).
    pub fn take_position_now(&mut self) {
        self.position = Some(self.graph.node_count());
    }

    /// Attaches `node` as child `key` of the node being opened.
    ///
    /// # Errors
    /// An inactive node under an active one, a permission conflict.
    pub fn attach(&mut self, key: &str, node: &Rc<Node>) -> Result<Rc<Child>> {
        // A new node is active (unless `active=off` opens it inactive): an active one
        // cannot stand on an inactive one. Judged as the child comes, before the driver
        // reads it, as in QEMU.
        if self.opens_active() && !node.is_active() {
            return Err(Error::InactiveChild {
                child: node.name().to_owned(),
                edge: key.to_owned(),
                parent: self.name.clone(),
            });
        }
        let parent: Weak<dyn RootParent> = Rc::downgrade(&self.opening) as Weak<dyn RootParent>;
        let edge = self
            .graph
            .attach_root(node, parent, key, Perm::empty(), Perm::all())?;
        self.edges.push(edge.clone());
        Ok(edge)
    }

    /// A format's metadata child, claimed as the child comes, before the driver reads it
    /// (QEMU's `bdrv_default_perms_for_storage` when the child is attached): the format
    /// reads it consistently and lets nobody else write or resize it; one that may write
    /// takes writing and resizing too, so that it may write its metadata while it opens
    /// (the file's descriptor is opened for writing for it). A child that shares
    /// everything (`force-share`) still does.
    ///
    /// # Errors
    /// A permission conflict, or the file refusing to be written.
    pub fn claim_for_metadata(&self, edge: &Rc<Child>) -> Result<()> {
        let metadata = Perm::WRITE | Perm::RESIZE;
        let own = if self.settings.read_only {
            Perm::empty()
        } else {
            metadata
        };
        self.claim(edge, Perm::CONSISTENT_READ | own, metadata)
    }

    /// A child whose data the node maps rather than passes through (raw's window): as the
    /// child comes, nobody else may resize it (QEMU's `bdrv_default_perms_for_storage` for
    /// a data child, as it is attached). A child that shares everything (`force-share`)
    /// still does.
    ///
    /// # Errors
    /// A permission conflict.
    pub fn claim_for_data(&self, edge: &Rc<Child>) -> Result<()> {
        self.claim(edge, Perm::empty(), Perm::RESIZE)
    }

    /// Takes `perm` of a child as it comes and shares all but `unshared` (all, where the
    /// child shares everything). An inactive node claims nothing: the image is someone
    /// else's for now.
    fn claim(&self, edge: &Rc<Child>, perm: Perm, unshared: Perm) -> Result<()> {
        if !self.opens_active() {
            return Ok(());
        }
        let shared = if edge.node().force_share() {
            Perm::all()
        } else {
            Perm::all() - unshared
        };
        self.graph.update_edge_perm(edge, perm, shared)
    }

    /// Whether the node opens active: not `active=off`, nor while the graph opens every
    /// node inactive (an incoming migration awaited).
    pub fn opens_active(&self) -> bool {
        self.opts.opt_bool("active") != Some(false) && !self.graph.opens_inactive()
    }

    /// For a node opening inactive, the scope in which its child `key` opens inactive too:
    /// every child but a `file`, which QEMU opens before it reads the node's own `active`
    /// (what the node inherited it passes on all the same).
    fn inactive_parent_scope(&self, key: &str) -> Option<crate::graph::InactiveParentScope<'a>> {
        (key != "file" && !self.opens_active()).then(|| self.graph.inactive_parent_scope())
    }

    /// Opens child `key`, which the options must give (a node name or inline options).
    ///
    /// # Errors
    /// "A block device must be specified for \"key\"", an unknown node, the child failing
    /// to open.
    pub async fn open_child(&mut self, key: &str) -> Result<Rc<Child>> {
        let v = self
            .opts
            .get(key)
            .ok_or_else(|| Error::MissingChild(key.to_owned()))?
            .clone();
        self.open_child_ref(key, &v).await
    }

    /// Opens child `key` from a `BlockdevRef`: a node name, or inline options that take
    /// from this node what they do not set (QEMU's inherited options).
    ///
    /// # Errors
    /// An unknown node, the child failing to open.
    pub async fn open_child_ref(&mut self, key: &str, value: &QObject) -> Result<Rc<Child>> {
        let node = match value {
            QObject::String(name) => {
                // QEMU names a node before its driver opens the children (all but a format's
                // `file`, found first to probe): one naming the node itself is a cycle.
                if key != "file" && self.opts.opt_str("node-name") == Some(name.as_str()) {
                    return Err(Error::ChildCycle {
                        child: name.clone(),
                        edge: key.to_owned(),
                        parent: name.clone(),
                    });
                }
                self.graph.lookup(name).map_err(|e| open_failure(key, e))?
            }
            QObject::Dict(d) => {
                let cow = key == "backing";
                let early = self.early_file.take_if(|_| key == "file");
                let node = match early {
                    Some(node) => node,
                    None => {
                        let _inactive = self.inactive_parent_scope(key);
                        self.graph
                            .open(&Args::new(inherited(self.opts, d, cow)))
                            .await
                            .map_err(|e| open_failure(key, e))?
                    }
                };
                node.inherits_read_only
                    .set(!cow && d.get("read-only").is_none());
                node.inherits_cache.set(cache_given(d));
                self.inline.push(node.clone());
                node
            }
            _ => return Err(Error::InvalidChildRef),
        };
        let edge = self.attach(key, &node);
        if edge.is_err() {
            self.graph.forget_if_orphan(&node);
        }
        edge
    }

    /// Opens a node from `opts` (not inheriting anything) as child `key`.
    ///
    /// # Errors
    /// The node failing to open.
    pub async fn open_child_opts(&mut self, key: &str, opts: QDict) -> Result<Rc<Child>> {
        let node = {
            let _inactive = self.inactive_parent_scope(key);
            self.graph.open(&Args::new(opts)).await?
        };
        // Made by this node for itself: its mode is this node's.
        node.inherits_read_only.set(true);
        self.inline.push(node.clone());
        let edge = self.attach(key, &node);
        if edge.is_err() {
            self.graph.forget_if_orphan(&node);
        }
        edge
    }

    /// The options of a `file` node for image file `path` (read-only if `read_only`),
    /// with this node's cache modes.
    pub fn image_file_opts(&self, path: &str, read_only: bool) -> QDict {
        let mut file_opts = crate::filename::protocol_options(path).with("read-only", read_only);
        // Cache modes and force-share pass down to what the node opens, as in QEMU.
        for key in ["cache", "force-share"] {
            if let Some(v) = self.opts.get(key) {
                file_opts.insert(key, v.clone());
            }
        }
        file_opts
    }

    /// The format of image file `path` by its first bytes (raw when no format claims it).
    ///
    /// # Errors
    /// The file failing to open.
    pub async fn probe(&self, path: &str) -> Result<&'static str> {
        self.graph
            .probe_format(&self.image_file_opts(path, true))
            .await
    }

    /// Opens image file `path` as child `key`: a `file` node under a node of `format`
    /// (just the `file` node for format `file`), read-only if `read_only`.
    ///
    /// # Errors
    /// An unknown format, the image failing to open.
    pub async fn open_image(
        &mut self,
        key: &str,
        path: &str,
        format: &str,
        read_only: bool,
    ) -> Result<Rc<Child>> {
        self.open_image_with(key, path, format, read_only, QDict::new())
            .await
    }

    /// As [`OpenCtx::open_image`], with options of the user's on top (`node-name`, the
    /// image's own backing options, `file.*` for its file).
    ///
    /// # Errors
    /// As [`OpenCtx::open_image`].
    pub async fn open_image_with(
        &mut self,
        key: &str,
        path: &str,
        format: &str,
        read_only: bool,
        extra: QDict,
    ) -> Result<Rc<Child>> {
        if self.graph.registry().get(format).is_none() {
            return Err(Error::UnknownDriver(format.to_owned()));
        }
        // `-drive`'s options for the image (strings): typed now that its format is known.
        let extra = if !extra.is_empty() && all_strings(&extra) {
            let mut o = extra.with("driver", format);
            let placeholder = o.get("file").is_none();
            if placeholder {
                o.insert("file", "");
            }
            // Options for its own backing file (no driver either) are typed when it opens.
            let nested = match o.get("backing") {
                Some(QObject::Dict(b)) if b.get("driver").is_none() => o.remove("backing"),
                _ => None,
            };
            let mut typed = self.graph.check_drive_options(&o)?;
            typed.remove("driver");
            if placeholder {
                typed.remove("file");
            }
            if let Some(b) = nested {
                typed.insert("backing", b);
            }
            typed
        } else {
            extra
        };
        // What the user set of the image's cache modes (the rest it takes from here).
        let extra_cache = extra.clone();
        let mut file_opts = self.image_file_opts(path, read_only);
        // A `json:` name that describes the image node (its format, its file): its file is
        // the file, its other options the image's, the format given winning (QEMU merges
        // them into the options).
        let mut extra = extra;
        let describes_format = path.starts_with("json:")
            && file_opts
                .get("driver")
                .and_then(QObject::as_str)
                .and_then(|d| self.graph.registry().get(d))
                .is_some_and(|f| f.kind() != crate::DriverKind::Protocol);
        if describes_format && format != "file" {
            let mut described = crate::filename::protocol_options(path);
            described.remove("driver");
            if let Some(QObject::Dict(inner)) = described.remove("file") {
                let mut inner = inner.with("read-only", read_only);
                for key in ["cache", "force-share"] {
                    if let Some(v) = file_opts.get(key) {
                        inner.insert(key, v.clone());
                    }
                }
                file_opts = inner;
            }
            extra = merge(described, extra);
        }
        let opts = if format == "file" {
            merge(file_opts, extra)
        } else {
            // The image's file takes its mode from the image (and follows its reopens), and
            // its cache modes from the image's, which the user's options may change.
            file_opts.remove("read-only");
            let mut opts = QDict::new()
                .with("driver", format)
                .with("read-only", read_only);
            for key in ["cache", "force-share"] {
                if let Some(v) = file_opts.get(key) {
                    opts.insert(key, v.clone());
                }
            }
            let mut opts = merge(opts, extra);
            if let Some(c) = opts.get("cache") {
                file_opts.insert("cache", c.clone());
            }
            let theirs_file = match opts.remove("file") {
                Some(QObject::Dict(theirs)) => Some(theirs),
                _ => None,
            };
            let file_inherits = theirs_file.as_ref().map_or((true, true), cache_given);
            let file = match theirs_file {
                Some(theirs) => merge(file_opts, theirs),
                None => file_opts,
            };
            opts.insert("file", file);
            let edge = self.open_child_opts(key, opts).await?;
            let node = edge.node();
            node.inherits_cache.set(cache_given(&extra_cache));
            if let Some(f) = node.child("file") {
                f.inherits_cache.set(file_inherits);
            }
            return Ok(edge);
        };
        self.open_child_opts(key, opts).await
    }

    /// Takes back what was opened for a node that failed to open.
    fn abandon(self) {
        if let Some(node) = &self.early_file {
            self.graph.forget_if_orphan(node);
        }
        for e in self.edges.iter().rev() {
            let node = e.node();
            self.graph.detach_edge(e);
            self.graph.forget_if_orphan(&node);
        }
    }
}

/// Options QEMU's drivers declare as sizes in their `-drive` option lists (`QEMU_OPT_SIZE`),
/// which take a suffix there (`size=1M`) though the schema's keyval reading does not.
const DRIVE_SIZE_OPTIONS: &[(&str, &str)] = &[
    ("null-co", "size"),
    ("null-aio", "size"),
    ("qcow2", "cache-size"),
    ("qcow2", "l2-cache-size"),
    ("qcow2", "l2-cache-entry-size"),
    ("qcow2", "refcount-cache-size"),
    ("blkdebug", "align"),
    ("blkdebug", "max-transfer"),
    ("blkdebug", "opt-write-zero"),
    ("blkdebug", "max-write-zero"),
    ("blkdebug", "opt-discard"),
    ("blkdebug", "max-discard"),
    ("preallocate", "prealloc-align"),
    ("preallocate", "prealloc-size"),
];

/// `-drive` options as QEMU's drivers read them from their option lists, which take more than
/// the schema does: sizes with a suffix, and `discard=on|off` for `unmap|ignore` (anything
/// else is QEMU's "Invalid discard option").
fn drive_leniency(d: &QDict) -> Result<QDict> {
    let driver = d.get("driver").and_then(QObject::as_str).unwrap_or("");
    let mut out = QDict::new();
    for (k, v) in d.iter() {
        let v = match v {
            QObject::Dict(inner) => QObject::Dict(drive_leniency(inner)?),
            QObject::String(s) if k == "discard" => QObject::from(match s.as_str() {
                "on" | "unmap" => "unmap",
                "off" | "ignore" => "ignore",
                _ => {
                    return Err(Error::Qapi(ferrite_qapi::Error::generic(
                        "Invalid discard option",
                    )));
                }
            }),
            QObject::String(s) if DRIVE_SIZE_OPTIONS.contains(&(driver, k)) => {
                match ferrite_qapi::visit::parse_size(s) {
                    Some(n) => QObject::from(n.to_string()),
                    None => v.clone(),
                }
            }
            other => other.clone(),
        };
        out.insert(k, v);
    }
    if driver == "ssh" {
        ssh_legacy_options(&mut out)?;
    }
    Ok(out)
}

/// Options a driver's option list takes on `-drive` (and from its file names) that its
/// schema does not: the iscsi driver's `password` (QEMU's deprecated CHAP password, which
/// `iscsi://user%password@...` names set). Each is taken out with the path to its dict,
/// to go back after the schema's check.
fn take_unscheduled(d: &mut QDict, path: &mut Vec<String>, out: &mut Vec<(Vec<String>, QObject)>) {
    if d.get("driver").and_then(QObject::as_str) == Some("iscsi")
        && let Some(v) = d.remove("password")
    {
        let mut at = path.clone();
        at.push("password".to_owned());
        out.push((at, v));
    }
    let keys: Vec<String> = d.iter().map(|(k, _)| k.to_owned()).collect();
    for k in keys {
        if let Some(QObject::Dict(inner)) = d.get_mut(&k) {
            path.push(k.clone());
            take_unscheduled(inner, path, out);
            path.pop();
        }
    }
}

/// Puts `value` back at `path` (dict keys, the last one the option's).
fn put_at(d: &mut QDict, path: &[String], value: QObject) {
    match path {
        [] => {}
        [last] => {
            d.insert(last.as_str(), value);
        }
        [first, rest @ ..] => {
            if let Some(QObject::Dict(inner)) = d.get_mut(first) {
                put_at(inner, rest, value);
            }
        }
    }
}

/// The ssh driver's older options (`host`, `port`, `host_key_check`) as its schema has them
/// (QEMU's `ssh_process_legacy_options`).
fn ssh_legacy_options(d: &mut QDict) -> Result<()> {
    let host = d.remove("host");
    let port = d.remove("port");
    match (host, port) {
        (None, Some(_)) => {
            return Err(Error::Qapi(ferrite_qapi::Error::generic(
                "port may not be used without host",
            )));
        }
        (Some(host), port) => {
            let port = port.unwrap_or_else(|| QObject::from("22"));
            d.insert("server", QDict::new().with("host", host).with("port", port));
        }
        (None, None) => {}
    }
    if let Some(check) = d.remove("host_key_check") {
        let text = check.as_str().unwrap_or_default();
        d.insert("host-key-check", crate::filename::ssh_host_key_check(text)?);
    }
    Ok(())
}

impl Graph {
    /// [`Graph::check_cli_options`] for `-drive`'s options, read with the leniency of
    /// QEMU's option lists (sizes with suffixes, `discard=on|off`).
    ///
    /// # Errors
    /// As [`Graph::check_cli_options`].
    pub fn check_drive_options(&self, opts: &QDict) -> Result<QDict> {
        let mut opts = drive_leniency(opts)?;
        let mut hidden = Vec::new();
        take_unscheduled(&mut opts, &mut Vec::new(), &mut hidden);
        let mut checked = self.check_cli_options(&opts)?;
        for (path, value) in hidden {
            put_at(&mut checked, &path, value);
        }
        Ok(checked)
    }

    /// QEMU's text for an option no part of a node of `driver` takes.
    fn unsupported_option(&self, driver: &str, key: &str) -> String {
        let protocol = self
            .registry()
            .get(driver)
            .is_some_and(|f| f.opens_as_protocol());
        if protocol {
            format!("Block protocol '{driver}' doesn't support the option '{key}'")
        } else {
            format!("Block format '{driver}' does not support the option '{key}'")
        }
    }

    /// Options from the command line (every scalar a string, QEMU's `-drive`) for a node:
    /// typed by the schema, an option its driver lacks named as QEMU names it ("Block
    /// format 'qcow2' does not support the option 'x'", "Block protocol 'file' doesn't
    /// support the option 'x'" for one under `file.`).
    ///
    /// # Errors
    /// The schema's error, or the texts above.
    pub fn check_cli_options(&self, opts: &QDict) -> Result<QDict> {
        let driver = opts.get("driver").and_then(QObject::as_str).unwrap_or("");
        let wording = |d: &str, key: &str| self.unsupported_option(d, key);
        ferrite_qapi::visit::check_object(
            ferrite_qapi::schema(),
            "BlockdevOptions",
            &QObject::Dict(opts.clone()),
            ferrite_qapi::visit::Mode::Keyval,
        )
        .map_err(|e| {
            let key = e
                .desc
                .strip_prefix("Parameter '")
                .and_then(|r| r.strip_suffix("' is unexpected"));
            let file_driver = match opts.get("file") {
                Some(QObject::Dict(f)) => f.get("driver").and_then(QObject::as_str),
                _ => None,
            };
            let text = match (key, key.and_then(|k| k.strip_prefix("file.")), file_driver) {
                (_, Some(rest), Some(d)) => wording(d, rest),
                (Some(k), _, _) => wording(driver, k),
                (None, _, _) => return Error::Qapi(e),
            };
            Error::Qapi(ferrite_qapi::Error::generic(text))
        })
    }
}

/// Whether every scalar in `d` is a string (options from the command line).
fn all_strings(d: &QDict) -> bool {
    d.iter().all(|(_, v)| match v {
        QObject::String(_) => true,
        QObject::Dict(inner) => all_strings(inner),
        _ => false,
    })
}

/// Which of the cache modes a child's own options leave to its parent: (`direct`,
/// `no-flush`), true where not given.
fn cache_given(child: &QDict) -> (bool, bool) {
    let cache = child.get("cache").and_then(QObject::as_dict);
    let unset = |key: &str| cache.is_none_or(|c| c.get(key).is_none());
    (unset("direct"), unset("no-flush"))
}

/// `base` with `over` on top, dictionaries merged key by key.
fn merge(mut base: QDict, over: QDict) -> QDict {
    for (k, v) in over {
        let v = match (base.remove(&k), v) {
            (Some(QObject::Dict(mine)), QObject::Dict(theirs)) => {
                QObject::Dict(merge(mine, theirs))
            }
            (_, v) => v,
        };
        base.insert(k, v);
    }
    base
}

/// The options of a child given inline: what it does not set itself, it takes from its
/// parent (read-only, auto-read-only, force-share, cache modes), and it passes discards on,
/// since the parent already applies its own discard policy (QEMU's inherited options). A
/// backing file (`cow`) opens read-only unless it says otherwise, whatever its parent is.
fn inherited(parent: &Args, child: &QDict, cow: bool) -> QDict {
    let mut d = child.clone();
    let modes: &[&str] = if cow {
        for (key, default) in [("read-only", true), ("auto-read-only", false)] {
            if d.get(key).is_none() {
                d.insert(key, default);
            }
        }
        &["force-share"]
    } else {
        &["read-only", "auto-read-only", "force-share"]
    };
    for &key in modes {
        if d.get(key).is_none()
            && let Some(v) = parent.get(key)
        {
            d.insert(key, v.clone());
        }
    }
    // Only cache modes pass down: a parent's empty `cache` is nothing to inherit.
    if let Some(QObject::Dict(pc)) = parent
        .get("cache")
        .filter(|c| c.as_dict().is_some_and(|c| !c.is_empty()))
    {
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

/// For a driver that reads all its options in one QAPI visit, as QEMU's `nfs`, `ssh` and
/// `rbd` do: an empty `cache` group, which the generic open leaves behind (QEMU's flattening
/// keeps an empty dictionary), is a member its type lacks, refused as QEMU's visitor refuses
/// it, when the driver starts reading.
///
/// # Errors
/// "Parameter 'cache' is unexpected".
pub fn check_visited_whole(opts: &Args) -> std::result::Result<(), ferrite_qapi::Error> {
    match opts.get("cache") {
        Some(QObject::Dict(d)) if d.is_empty() => Err(ferrite_qapi::Error::generic(
            "Parameter 'cache' is unexpected",
        )),
        _ => Ok(()),
    }
}

/// The settings every node has, from its options; `factory` opens it.
///
/// # Errors
/// QEMU's texts, in its order: `force-share` on a writable node, a driver that opens a file
/// given none, `detect-zeroes=unmap` without `discard=unmap`.
pub(crate) fn settings(opts: &Args, factory: &dyn DriverFactory) -> Result<NodeSettings> {
    let cache = opts.dict("cache").unwrap_or_default();
    let s = NodeSettings {
        read_only: opts.bool_or("read-only", false),
        detect_zeroes: DetectZeroes::parse(opts.opt_str("detect-zeroes")),
        discard_unmap: opts.opt_str("discard") == Some("unmap"),
        cache_direct: cache.bool_or("direct", false),
        cache_no_flush: cache.bool_or("no-flush", false),
        force_share: opts.bool_or("force-share", false),
    };
    if s.force_share && !s.read_only {
        return Err(Error::ForceShareWritable);
    }
    if factory.needs_filename() && opts.opt_str("filename").is_none_or(str::is_empty) {
        return Err(Error::FilenameRequired(factory.name().to_owned()));
    }
    if s.detect_zeroes == DetectZeroes::Unmap && !s.discard_unmap {
        return Err(Error::DetectZeroesUnmapWithoutDiscard);
    }
    Ok(s)
}

/// Child `key` failing to open or to be found: a backing file's failure says so first
/// (QEMU's `bdrv_open_backing_file`); attaching it is another matter.
fn open_failure(key: &str, e: Error) -> Error {
    if key == "backing" {
        Error::BackingOpen(Box::new(e))
    } else {
        e
    }
}

impl Graph {
    /// Opens a node from checked `BlockdevOptions` with the driver the options name (boxed:
    /// children open through it recursively).
    pub(crate) fn open<'a>(&'a self, opts: &'a Args) -> crate::registry::LocalFut<'a, Rc<Node>> {
        Box::pin(async move {
            // `"backing": ""` is an older spelling of `null`, still taken with a warning.
            let respelled;
            let opts = if opts.get("backing").and_then(QObject::as_str) == Some("") {
                crate::report::warn_report(
                    "Use of \"backing\": \"\" is deprecated; use \"backing\": null instead",
                );
                respelled = Args::new(opts.as_dict().clone().with("backing", QObject::Null));
                &respelled
            } else {
                opts
            };
            let driver = opts.str("driver")?;
            // A driver of the schema's without a factory is one QEMU leaves out of a storage
            // daemon too (`blkreplay`): unknown to both.
            let factory = self
                .registry()
                .get(driver)
                .ok_or_else(|| Error::UnknownDriver(driver.to_owned()))?;
            self.open_with(opts, factory.as_ref()).await
        })
    }

    /// Opens a node from `opts` with `factory` (which need not be registered: a job's
    /// filter with state it shares).
    ///
    /// # Errors
    /// A malformed or taken node name, bad common options, the driver failing.
    pub async fn open_with(&self, opts: &Args, factory: &dyn DriverFactory) -> Result<Rc<Node>> {
        // QEMU opens a format's or filter's `file` first, then judges the common options,
        // then takes the node's name.
        let early_file = match opts.get("file") {
            _ if factory.opens_as_protocol() => None,
            Some(QObject::String(file)) => {
                self.lookup(file)?;
                None
            }
            Some(QObject::Dict(d)) => Some(self.open(&Args::new(inherited(opts, d, false))).await?),
            _ => None,
        };
        let named = settings(opts, factory).and_then(|settings| {
            let name = match opts.opt_str("node-name") {
                Some(n) => self.check_name(n).map(|()| n.to_owned())?,
                None => self.auto_name(),
            };
            Ok((settings, name))
        });
        let (settings, name) = match named {
            Ok(named) => named,
            Err(e) => {
                if let Some(node) = &early_file {
                    self.forget_if_orphan(node);
                }
                return Err(e);
            }
        };
        let mut ctx = OpenCtx {
            graph: self,
            opts,
            opening: Rc::new(Opening { name: name.clone() }),
            name,
            settings,
            edges: Vec::new(),
            inline: Vec::new(),
            position: None,
            early_file,
        };
        match factory.open(&mut ctx).await {
            Ok(driver) => self.finish_open(ctx, driver),
            Err(e) => {
                ctx.abandon();
                Err(e)
            }
        }
    }

    /// Makes the node of an opened driver: its children's edges move to it with what it
    /// needs of them, and it joins the graph.
    fn finish_open(&self, mut ctx: OpenCtx<'_>, driver: Box<dyn Driver>) -> Result<Rc<Node>> {
        if let Some(unused) = ctx.early_file.take() {
            self.forget_if_orphan(&unused);
        }
        // A name taken while this node's children opened.
        if ctx.opts.opt_str("node-name").is_some() && self.find(&ctx.name).is_some() {
            let e = Error::DuplicateNodeName(ctx.name.clone());
            ctx.abandon();
            return Err(e);
        }
        let active = ctx.opens_active();
        let node = Node::new(
            ctx.name.clone(),
            driver,
            ctx.opts.as_dict().clone(),
            ctx.settings,
        );
        if node.len() > MAX_LENGTH {
            ctx.abandon();
            return Err(Error::TooLarge);
        }
        // An empty group of options (`"cache": {}`) is still an option to QEMU, and one no
        // part of the node takes: refused once the node has opened (and its length was
        // judged), as QEMU refuses what is left over.
        let empty = ctx
            .opts
            .as_dict()
            .iter_qemu_order()
            .find_map(|(k, v)| match v {
                QObject::Dict(d) if d.is_empty() => Some(k.to_owned()),
                _ => None,
            });
        if let Some(key) = empty {
            let text = self.unsupported_option(ctx.opts.opt_str("driver").unwrap_or(""), &key);
            drop(node);
            ctx.abandon();
            return Err(ferrite_qapi::Error::generic(text).into());
        }
        // An inactive node takes its image's bitmaps up when it is activated (QEMU does not
        // load them before: they may be migrating, or change meanwhile).
        let initial = node.driver.take_initial_bitmaps();
        if active {
            *node.bitmaps.borrow_mut() = initial;
        }
        let events = self.events();
        *node.threshold_hit.borrow_mut() = Some(Box::new(move |n: &Node, exceeded, threshold| {
            events.emit(&crate::events::BlockWriteThreshold {
                node_name: n.name().to_owned(),
                amount_exceeded: exceeded,
                write_threshold: threshold,
            });
        }));
        for e in &ctx.edges {
            *e.parent.borrow_mut() = ParentRef::Node(Rc::downgrade(&node));
            node.children.borrow_mut().push(e.clone());
            // A child drained while this node opened quiesces the node from now on.
            if e.quiesced_parent.get() {
                node.drained_begin();
            }
        }
        node.inactive.set(!active);
        for e in &ctx.edges {
            let (perm, shared) = Graph::child_edge_perms(&node, e.name());
            if let Err(err) = crate::graph::check_inactive_perm(&e.node(), perm) {
                ctx.abandon();
                return Err(err);
            }
            if let Err(err) = self.update_edge_perm(e, perm, shared) {
                ctx.abandon();
                return Err(err);
            }
        }
        for child in &ctx.inline {
            *child.inherits_from.borrow_mut() = Rc::downgrade(&node);
        }
        node.note_implicit_backing();
        self.insert_node(node.clone(), ctx.position);
        Ok(node)
    }
}
