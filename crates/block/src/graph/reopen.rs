//! Changing open nodes in place (QEMU: `bdrv_reopen_multiple`, `bdrv_co_truncate` from
//! `block_resize`): `blockdev-reopen`, the internal switches between read-only and
//! read-write, and resizing.

use crate::backend::BlockBackend;
use crate::child::Child;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::{DetectZeroes, Node};
use crate::perm::Perm;
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// A reopen's entries with the children's own, and the edges to move.
struct Expanded {
    list: Vec<Args>,
    moves: Vec<Move>,
    /// Children whose read-only mode becomes their own once the reopen is done.
    now_own_mode: Vec<Rc<Node>>,
}

/// A child edge a reopen points at another node (or, for `backing`, at none).
struct Move {
    node: Rc<Node>,
    edge: &'static str,
    to: Option<Rc<Node>>,
}

/// The reopen options of child `cur` given inline as `child_opts` under `parent_opts`: its
/// own name, and what it takes from its parent when it does not set it (read-only mode,
/// cache modes; a file passes discards on).
fn inherited_reopen(
    parent_opts: &Args,
    cur: &Rc<Node>,
    child_opts: &QDict,
    edge: &str,
) -> Result<QDict> {
    let mut child = child_opts.clone();
    if child
        .get("node-name")
        .is_some_and(|n| n.as_str() != Some(cur.name()))
    {
        // The child's own check speaks, as in QEMU, where the child is reopened after its
        // parent, with the options the parent passes down: of what it cannot take (another
        // name, options for children it did not open), the first in QEMU's dict order.
        let mut left = QDict::new().with("node-name", true);
        for edge in ["backing", "file"] {
            if let Some(QObject::Dict(grandchild)) = child.get(edge)
                && !cur.child(edge).is_some_and(|g| inherits_from(&g, cur))
            {
                flatten_into(&mut left, grandchild, &format!("{edge}."));
            }
        }
        let first = left.iter_qemu_order().next().map(|(k, _)| k.to_owned());
        return Err(Error::CannotChange(first.unwrap_or_default()));
    }
    child.insert("node-name", cur.name());
    // A backing file is read-only unless it says otherwise, as at open.
    if edge == "backing" && child.get("read-only").is_none() {
        child.insert("read-only", true);
    }
    if cur.inherits_read_only()
        && child.get("read-only").is_none()
        && let Some(ro) = parent_opts.get("read-only")
    {
        child.insert("read-only", ro.clone());
    }
    let (inherits_direct, inherits_no_flush) = cur.inherits_cache();
    if let Some(cache) = parent_opts.dict("cache") {
        let mut c = child
            .get("cache")
            .and_then(QObject::as_dict)
            .cloned()
            .unwrap_or_default();
        for (key, inherits) in [("direct", inherits_direct), ("no-flush", inherits_no_flush)] {
            if let (true, None, Some(v)) = (inherits, c.get(key), cache.get(key)) {
                c.insert(key, v.clone());
            }
        }
        child.insert("cache", c);
    }
    if edge == "file" && child.get("discard").is_none() {
        child.insert("discard", "unmap");
    }
    Ok(child)
}

/// What a reopen's options leave for the end (QEMU compares them with the node's): another
/// driver is one of the options its old driver does not take, the first changed in QEMU's
/// dict order; the block layer's own options that never change; children other than `file`
/// and `backing`, which stay where they are.
fn check_unchanged_options(node: &Rc<Node>, opts: &Args, same_driver: bool) -> Result<()> {
    if !same_driver {
        return Err(Error::CannotChange(first_changed(node, opts)));
    }
    crate::driver::check_unchanged(opts, &Args::new(node.options()), &["force-share"])?;
    for e in node.children() {
        if let Some(QObject::String(wanted)) = opts.get(e.name())
            && !matches!(e.name(), "file" | "backing")
            && *wanted != e.node().name()
        {
            return Err(Error::CannotChange(e.name().to_owned()));
        }
    }
    Ok(())
}

impl Graph {
    /// `blockdev-reopen`: checks every entry first, then applies them all on drained nodes.
    /// Options left out take their defaults, as in QEMU.
    ///
    /// # Errors
    /// QEMU's texts for a missing or unknown node name and for options that cannot change;
    /// "Read-only block node 'x' cannot support read-write users" when a user still writes
    /// to a node made read-only.
    pub async fn reopen(&self, list: &[Args]) -> Result<()> {
        // QEMU queues every node first (each named, each there), then prepares each.
        for opts in list {
            let name = opts
                .opt_str("node-name")
                .ok_or_else(|| Error::ReopenNodeNameMissing)?;
            self.find(name)
                .ok_or_else(|| Error::NoSuchNode(name.to_owned()))?;
        }
        // Then, before anything about the node or its children is judged, its common
        // options (QEMU parses them first when it prepares a node).
        for opts in list {
            if opts.opt_str("detect-zeroes") == Some("unmap")
                && opts.opt_str("discard") != Some("unmap")
            {
                return Err(Error::DetectZeroesUnmapWithoutDiscard);
            }
        }
        let Expanded {
            list,
            moves,
            now_own_mode,
        } = self.expand_children(list)?;
        let list = &list[..];
        // Nodes this reopen makes read-only: their own writes to their children end with it.
        let going_read_only: Vec<&str> = list
            .iter()
            .filter(|o| o.bool_or("read-only", false))
            .filter_map(|o| o.opt_str("node-name"))
            .collect();
        let mut plan = Vec::new();
        for opts in list {
            let name = opts
                .opt_str("node-name")
                .ok_or_else(|| Error::ReopenNodeNameMissing)?;
            let node = self
                .find(name)
                .ok_or_else(|| Error::NoSuchNode(name.to_owned()))?;
            let read_only = opts.bool_or("read-only", false);
            let stays_writer = |u: &Child| {
                !u.parent_node()
                    .is_some_and(|p| going_read_only.contains(&p.name()))
            };
            if read_only && Self::has_writers(&node, stays_writer) {
                return Err(if node.is_read_only() {
                    Error::ReadOnly
                } else {
                    Error::ReadOnlyWithWriters(node.name().to_owned())
                });
            }
            // A format made writable writes its file: the file must be writable after
            // this reopen too (checked now, so that a refusal changes nothing).
            if !read_only
                && node.driver.writes_file_when_writable()
                && let Some(file) = node.child("file")
            {
                let file_read_only = list
                    .iter()
                    .find(|o| o.opt_str("node-name") == Some(file.name()))
                    .map_or(file.is_read_only(), |o| o.bool_or("read-only", false));
                if file_read_only {
                    return Err(Error::ReadOnly);
                }
            }
            plan.push((node, opts, read_only));
        }
        // A node whose file changes writes back what it holds to the file it has now first
        // (QEMU flushes a qcow2 image's caches in its reopen-prepare, before the new file).
        for m in moves
            .iter()
            .filter(|m| m.edge != "backing" && m.to.is_some())
        {
            let _drained = self.drain(&m.node).await;
            m.node.flush().await.map_err(Error::WriteBack)?;
        }
        // Other children move together: two images may swap their files.
        let mut others = Vec::new();
        for m in moves {
            match (m.edge, m.to) {
                ("backing", to) => self.set_backing(&m.node, to.as_ref()).await?,
                (edge, Some(to)) => others.extend(m.node.edge(edge).map(|e| (e, to))),
                _ => {}
            }
        }
        self.retarget_edges(&others).await?;
        // Applied node by node; a failure (a lock another process or node holds) puts back
        // every node already changed, as QEMU's reopen aborts as a whole.
        let mut applied: Vec<(Rc<Node>, Saved)> = Vec::new();
        for (node, opts, read_only) in &plan {
            applied.push((node.clone(), Saved::of(node)));
            if let Err(e) = self.apply_reopen(node, opts, *read_only).await {
                for (n, saved) in applied.iter().rev() {
                    self.restore_reopened(n, saved).await;
                }
                return Err(e);
            }
        }
        for (node, _, _) in &plan {
            node.forget_cli_text();
            node.reopened.set(true);
        }
        for child in now_own_mode {
            child.inherits_read_only.set(false);
        }
        Ok(())
    }

    /// Gives `node` its new options and mode.
    async fn apply_reopen(&self, node: &Rc<Node>, opts: &Args, read_only: bool) -> Result<()> {
        let _drained = self.drain(node).await;
        if read_only && !node.is_read_only() {
            // Leaving read-write: caches written back and the image marked clean.
            node.driver.close(node).await.map_err(Error::WriteBack)?;
        }
        let was_read_only = node.is_read_only();
        node.driver.reopen_apply(node, opts, read_only)?;
        if was_read_only && !read_only {
            node.driver
                .prepare_writable(node)
                .await
                .map_err(Error::PrepareWritable)?;
        }
        node.read_only.set(read_only);
        self.propagate(node)?;
        node.detect_zeroes
            .set(DetectZeroes::parse(opts.opt_str("detect-zeroes")));
        node.discard_unmap
            .set(opts.opt_str("discard") == Some("unmap"));
        let cache = opts.dict("cache").unwrap_or_default();
        node.cache_direct.set(cache.bool_or("direct", false));
        node.cache_no_flush.set(cache.bool_or("no-flush", false));
        *node.options.borrow_mut() = opts.as_dict().clone();
        Ok(())
    }

    /// Puts back what [`Graph::apply_reopen`] changed of `node`, best effort.
    async fn restore_reopened(&self, node: &Rc<Node>, saved: &Saved) {
        let _drained = self.drain(node).await;
        let _ = node
            .driver
            .reopen_apply(node, &Args::new(saved.options.clone()), saved.read_only);
        node.read_only.set(saved.read_only);
        let _ = self.propagate(node);
        node.detect_zeroes.set(saved.detect_zeroes);
        node.discard_unmap.set(saved.discard_unmap);
        node.cache_direct.set(saved.cache.0);
        node.cache_no_flush.set(saved.cache.1);
        *node.options.borrow_mut() = saved.options.clone();
    }

    /// QEMU's handling of `file` and `backing` in a reopen's options: options for a child
    /// the node opened itself (a dict) reopen that child too, read-only mode and cache modes
    /// passing down as at open (a child made writable before its parent, made read-only
    /// after it); another node's name makes that node the child, `null` drops the backing
    /// file (the edges move once all is checked). A node with a backing file must say what
    /// becomes of it. Each entry's options are judged here, whole, before the next entry's,
    /// in the order QEMU prepares a node: what it loses, its driver's own, its children,
    /// then what must stay unchanged.
    fn expand_children(&self, list: &[Args]) -> Result<Expanded> {
        let mut out = Vec::new();
        let mut moves = Vec::new();
        let mut now_own_mode = Vec::new();
        for opts in list {
            let Some(node) = opts.opt_str("node-name").and_then(|n| self.find(n)) else {
                out.push(opts.clone());
                continue;
            };
            // Each node is judged whole before the next, as QEMU prepares them: the
            // options it loses, its driver's own, the children it names, then what is left.
            check_resets(&node, opts)?;
            // The driver checks what it is left with: the children it has now.
            let mut parent = opts.as_dict().clone();
            for edge in ["backing", "file"] {
                if let Some(cur) = node.child(edge)
                    && opts.get(edge).is_some()
                {
                    parent.insert(edge, cur.name());
                }
            }
            let parent = Args::new(parent);
            let same_driver = opts.str("driver")? == node.driver_name();
            if same_driver {
                node.driver.reopen_check(&node, &parent)?;
            }
            if opts.get("backing").is_none()
                && node.driver.supports_backing()
                && (node.child("backing").is_some() || node.driver.backing_filename().is_some())
            {
                return Err(Error::BackingMissing(node.name().to_owned()));
            }
            let mut before = Vec::new();
            let mut after = Vec::new();
            for edge in ["backing", "file"] {
                let Some(given) = opts.get(edge) else {
                    continue;
                };
                let current = node.child(edge);
                match (given, &current) {
                    (QObject::Null, None) => {}
                    (QObject::Null, Some(cur)) if edge == "backing" => {
                        self.check_replaceable(&node, edge, cur)?;
                        moves.push(Move {
                            node: node.clone(),
                            edge,
                            to: None,
                        });
                    }
                    // The child named as it is, opened by this node and taking its mode
                    // from it, follows the node to read-only, and keeps that mode as its
                    // own from then on (QEMU keeps the child's options, inherited ones
                    // included).
                    (QObject::String(wanted), Some(cur))
                        if wanted == cur.name()
                            && edge == "file"
                            && opts.bool_or("read-only", false)
                            && !cur.is_read_only()
                            && cur.inherits_read_only()
                            && !self.is_monitor_owned(cur)
                            && !list
                                .iter()
                                .any(|o| o.opt_str("node-name") == Some(cur.name())) =>
                    {
                        let mut child = cur.options();
                        child.insert("node-name", cur.name());
                        child.insert("driver", cur.driver_name());
                        child.insert("read-only", true);
                        after.push(Args::new(child));
                        now_own_mode.push(cur.clone());
                    }
                    (QObject::String(wanted), _)
                        if current.as_ref().is_none_or(|c| wanted != c.name()) =>
                    {
                        let new = self
                            .find(wanted)
                            .ok_or_else(|| Error::NodeNotFound(wanted.clone()))?;
                        if current
                            .as_ref()
                            .is_some_and(|c| Rc::ptr_eq(&c.skip_implicit_filters(), &new))
                        {
                            continue;
                        }
                        if new.reaches(&node) {
                            return Err(Error::ChildCycle {
                                child: wanted.clone(),
                                edge: edge.into(),
                                parent: node.name().to_owned(),
                            });
                        }
                        if let Some(cur) = &current {
                            self.check_replaceable(&node, edge, cur)?;
                        }
                        moves.push(Move {
                            node: node.clone(),
                            edge,
                            to: Some(new),
                        });
                    }
                    (QObject::Dict(child_opts), Some(cur)) if inherits_from(cur, &node) => {
                        let child = inherited_reopen(opts, cur, child_opts, edge)?;
                        // A writable child before its parent needs it; a read-only one
                        // after the parent has written back what it held.
                        let read_only = child
                            .get("read-only")
                            .and_then(QObject::as_bool)
                            .unwrap_or(false);
                        // Its own inline children's options, in turn.
                        let nested = self.expand_children(&[Args::new(child)])?;
                        moves.extend(nested.moves);
                        now_own_mode.extend(nested.now_own_mode);
                        if read_only {
                            after.extend(nested.list);
                        } else {
                            before.extend(nested.list);
                        }
                    }
                    // Options for a child this node did not open stay with the node, where
                    // QEMU finds the first of them (in its dict's order) changed.
                    (QObject::Dict(child_opts), _) => {
                        let mut flat = QDict::new();
                        flatten_into(&mut flat, child_opts, &format!("{edge}."));
                        let first = flat
                            .iter_qemu_order()
                            .next()
                            .map_or_else(|| edge.to_owned(), |(k, _)| k.to_owned());
                        return Err(Error::CannotChange(first));
                    }
                    _ => {}
                }
            }
            check_unchanged_options(&node, &parent, same_driver)?;
            out.extend(before);
            out.push(parent);
            out.extend(after);
        }
        Ok(Expanded {
            list: out,
            moves,
            now_own_mode,
        })
    }

    /// A child edge a reopen may point elsewhere: not one a job put in, not one a job holds.
    fn check_replaceable(&self, node: &Rc<Node>, edge: &str, cur: &Rc<Node>) -> Result<()> {
        if cur.is_implicit() {
            return Err(Error::ImplicitChild {
                edge: edge.into(),
                parent: node.name().to_owned(),
            });
        }
        if node.edge(edge).is_some_and(|e| e.is_frozen()) {
            return Err(Error::FrozenChild {
                edge: edge.into(),
                parent: node.name().to_owned(),
                child: cur.name().to_owned(),
            });
        }
        Ok(())
    }

    /// Switches a node and the inline `file` children below it that take their mode from
    /// it (see `inherited_files`) between read-only and read-write in place (internal
    /// reopens: an external snapshot's old top, `change-backing-file`).
    ///
    /// # Errors
    /// The storage refusing the mode.
    pub fn set_read_only(&self, node: &Rc<Node>, read_only: bool) -> Result<()> {
        if read_only {
            Self::check_no_writers(node)?;
        }
        let files = self.inherited_files(node);
        // Going read-only, each node drops its write permission before its file reopens;
        // going read-write, the files reopen for writing first, the lowest first.
        let order: Vec<&Rc<Node>> = if read_only {
            std::iter::once(node).chain(files.iter()).collect()
        } else {
            files.iter().rev().chain(std::iter::once(node)).collect()
        };
        let mut done: Vec<&Rc<Node>> = Vec::new();
        for n in order {
            let r = n
                .driver
                .reopen_apply(n, &Args::new(n.options()), read_only)
                .and_then(|()| {
                    n.read_only.set(read_only);
                    self.propagate(n)
                });
            if let Err(e) = r {
                // Back to where it was: this node and those already switched.
                for m in std::iter::once(n).chain(done.into_iter().rev()) {
                    let _ = m
                        .driver
                        .reopen_apply(m, &Args::new(m.options()), !read_only);
                    m.read_only.set(!read_only);
                    let _ = self.propagate(m);
                }
                return Err(e);
            }
            done.push(n);
        }
        for n in done {
            n.reopened.set(true);
        }
        Ok(())
    }

    /// Reopens a node that may have written read-only: its image is brought up to date
    /// and marked clean first (QEMU's qcow2 does this when a reopen drops write access),
    /// then [`Graph::set_read_only`].
    ///
    /// # Errors
    /// As [`Graph::set_read_only`].
    pub async fn reopen_read_only(&self, node: &Rc<Node>) -> Result<()> {
        if node.is_read_only() {
            // Reopened all the same, in the same mode (QEMU does not skip it).
            node.reopened.set(true);
            return Ok(());
        }
        Self::check_no_writers(node)?;
        // Each node that goes read-only with it writes its state back first (a preallocate
        // filter cuts its file back while it still may).
        for n in std::iter::once(node.clone()).chain(self.inherited_files(node)) {
            let _ = n.driver.close(&n).await;
        }
        self.set_read_only(node, true)
    }

    /// Refuses to make `node` read-only while a user still writes to it (a format that
    /// has it as its file, say), as QEMU's reopen does. The files that go read-only with
    /// it are written only by it.
    fn check_no_writers(node: &Rc<Node>) -> Result<()> {
        if Self::has_writers(node, |_| true) && !node.is_read_only() {
            return Err(Error::ReadOnlyWithWriters(node.name().to_owned()));
        }
        Ok(())
    }

    /// Whether a user of `node` that `counts` holds a write permission on it.
    fn has_writers(node: &Rc<Node>, counts: impl Fn(&Child) -> bool) -> bool {
        node.users().iter().any(|u| u.perm().writes() && counts(u))
    }

    /// The nodes below `node` that switch between read-only and read-write with it: its
    /// `file` child if opened with it (inline) and taking its mode from it, and so on down (a
    /// filter opened inline between a format and its file, raw over throttle over file,
    /// passes the mode on to its own file). One the user added or gave its own mode keeps
    /// it, as in QEMU, where only inherited options change with the parent.
    fn inherited_files(&self, node: &Rc<Node>) -> Vec<Rc<Node>> {
        let mut files = Vec::new();
        let mut at = node.clone();
        while let Some(f) = at
            .child("file")
            .filter(|f| self.goes_with_parent(f) && f.inherits_read_only.get())
        {
            files.push(f.clone());
            at = f;
        }
        files
    }

    /// `block_resize`: a backend holding the resize permission truncates the drained node.
    ///
    /// # Errors
    /// QEMU's texts for a bad size, a job or an overlay blocking the resize, a read-only
    /// node, a driver that cannot resize, or a permission conflict.
    pub async fn resize(&self, node: &Rc<Node>, size: i64) -> Result<()> {
        let size = u64::try_from(size).map_err(|_| Error::NegativeSize)?;
        self.check_op(node, super::BlockOp::Resize)?;
        let blk = BlockBackend::new(&self.rc(), node, Perm::RESIZE, Perm::all())?;
        if size > crate::MAX_LENGTH {
            return Err(Error::OffsetTooLarge(size));
        }
        if node.is_read_only() {
            return Err(Error::ImageReadOnly);
        }
        // The resize runs inside its own drained section.
        blk.set_queue_requests(false);
        let drained = self.drain(node).await;
        let r = blk.truncate(size).await;
        drop(drained);
        drop(blk);
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSUP) => Error::ResizeUnsupported,
            _ => Error::Resize(e),
        })
    }
}

/// Whether `child` takes its options from `parent` (a reopen of `parent` reopens it with
/// the options given inline for it; other children's options stay with `parent`).
fn inherits_from(child: &Node, parent: &Rc<Node>) -> bool {
    child
        .inherits_from()
        .is_some_and(|p| Rc::ptr_eq(&p, parent))
}

/// The flat names of the options in `d` (`cache.direct`), children's left out.
fn flat_names(node: &Node, d: &QDict) -> Vec<String> {
    let mut own = QDict::new();
    for (k, v) in d.iter() {
        // Children (and `backing: null`, which is not an option the node keeps) are
        // reopened or replaced as edges, not compared here.
        let child_like = matches!(v, QObject::Null | QObject::List(_))
            || matches!(k, "file" | "backing" | "data-file");
        if node.edge(k).is_none() && !child_like {
            own.insert(k, v.clone());
        }
    }
    let mut flat = QDict::new();
    flatten_into(&mut flat, &own, "");
    flat.keys().map(str::to_owned).collect()
}

/// What a reopen changes of a node, to put back when another node's change fails.
struct Saved {
    read_only: bool,
    options: QDict,
    detect_zeroes: DetectZeroes,
    discard_unmap: bool,
    cache: (bool, bool),
}

impl Saved {
    fn of(node: &Node) -> Saved {
        Saved {
            read_only: node.is_read_only(),
            options: node.options(),
            detect_zeroes: node.detect_zeroes(),
            discard_unmap: node.discard_unmap(),
            cache: node.cache_mode(),
        }
    }
}

/// Every option `node` was opened with is in `opts` again, unless the block layer handles
/// it or the driver lets it go back to its default (QEMU's `bdrv_reset_options_allowed`).
fn check_resets(node: &Node, opts: &Args) -> Result<()> {
    const COMMON: [&str; 7] = [
        "node-name",
        "discard",
        "cache.direct",
        "cache.no-flush",
        "read-only",
        "auto-read-only",
        "detect-zeroes",
    ];
    let was = flat_names(node, &node.options());
    let mut now = flat_names(node, opts.as_dict());
    // QEMU takes `active` out of the new options before it compares them: a node opened
    // with `active` given, either way, can never be reopened.
    now.retain(|k| k != "active");
    let mutable = node.driver.mutable_options();
    match was.into_iter().find(|k| {
        !now.contains(k)
            && !COMMON.contains(&k.as_str())
            && !mutable.contains(&k.as_str())
            && !node.is_flag_option(k)
    }) {
        Some(k) => Err(Error::CannotReset(k)),
        None => Ok(()),
    }
}

/// Of the options given for `node` under another driver, the first that changed in QEMU's
/// dict order (the block layer's own options are not among them: it takes those).
fn first_changed(node: &Node, opts: &Args) -> String {
    const BLOCK_LAYER: [&str; 8] = [
        "node-name",
        "discard",
        "cache",
        "read-only",
        "auto-read-only",
        "detect-zeroes",
        "force-share",
        "active",
    ];
    // QEMU compares flat options (`server.host`), in its dict's order.
    let now = flatten_as_qemu(opts.as_dict());
    let mut was = QDict::new();
    flatten_into(&mut was, &node.options(), "");
    let block_layer = |k: &str| {
        let top = k.split_once('.').map_or(k, |(top, _)| top);
        BLOCK_LAYER.contains(&top)
    };
    now.iter_qemu_order()
        .find(|(k, v)| !block_layer(k) && was.get(k) != Some(*v))
        .map_or_else(|| "driver".to_owned(), |(k, _)| k.to_owned())
}

/// `d` flattened as QEMU's `qdict_flatten` does it, so that its members come in QEMU's order:
/// the top level's own keep their places; each nested dict's, taken in QEMU's order, are
/// added after them under their prefix (`server.host`).
fn flatten_as_qemu(d: &QDict) -> QDict {
    let mut out: QDict = d
        .iter()
        .filter(|(_, v)| !flattens(v))
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect();
    for (k, v) in d.iter_qemu_order() {
        if flattens(v) {
            flatten_value(&mut out, k.to_owned(), v);
        }
    }
    out
}

/// Whether `qdict_flatten` replaces `v` by its members: a dict or a list that is not empty.
fn flattens(v: &QObject) -> bool {
    match v {
        QObject::Dict(d) => !d.is_empty(),
        QObject::List(l) => !l.is_empty(),
        _ => false,
    }
}

/// `v` under the flat name `key`: a dict's members as `key.name`, a list's as `key.N`,
/// each in turn flattened, anything else as it is.
fn flatten_value(out: &mut QDict, key: String, v: &QObject) {
    match v {
        QObject::Dict(d) if flattens(v) => {
            for (k, inner) in d.iter_qemu_order() {
                flatten_value(out, format!("{key}.{k}"), inner);
            }
        }
        QObject::List(l) if flattens(v) => {
            for (i, inner) in l.iter().enumerate() {
                flatten_value(out, format!("{key}.{i}"), inner);
            }
        }
        _ => out.insert(key, v.clone()),
    }
}

/// `d`'s options as flat names under `prefix` (`backing.file.driver`).
fn flatten_into(out: &mut QDict, d: &QDict, prefix: &str) {
    for (k, v) in d.iter() {
        flatten_value(out, format!("{prefix}{k}"), v);
    }
}
