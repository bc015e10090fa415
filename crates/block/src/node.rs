//! A node of the block graph (QEMU: `BlockDriverState`): its driver, options, edges, dirty
//! bitmaps, and its side of drained sections. The request path through a node is in
//! `request.rs`.

use crate::bitmap::DirtyBitmap;
use crate::child::Child;
use crate::driver::Driver;
use crate::perm::Perm;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

/// What happens to writes of zeroes (QAPI `BlockdevDetectZeroesOptions`; `discard` decides
/// whether discards reach the storage).
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

    /// From the QAPI name (absent: off).
    pub fn parse(v: Option<&str>) -> DetectZeroes {
        match v {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        }
    }
}

/// A node of the block graph.
///
/// # Invariants
/// - `children` and `users` change only in the graph's edge operations (attach, detach,
///   replace), which check permissions first and keep drained sections consistent.
/// - Each child edge holds what the driver's `child_perm` returns for this node's users.
/// - No two edges into a node conflict (one takes what another does not share).
/// - `quiesce` counts the drained sections of this node, its own and those of its
///   children that reached it through an edge; while it is above zero every parent edge has
///   `quiesced_parent` set.
pub struct Node {
    pub(crate) name: String,
    pub(crate) driver: Box<dyn Driver>,
    pub(crate) options: RefCell<QDict>,
    pub(crate) read_only: Cell<bool>,
    /// Its read-only mode came from its parent (an inline child that did not set its
    /// own), so it follows the parent's internal reopens.
    pub(crate) inherits_read_only: Cell<bool>,
    /// Whether its `cache.direct` and `cache.no-flush` came from its parent (not given
    /// for it): a parent's change of cache mode passes on to it.
    pub(crate) inherits_cache: Cell<(bool, bool)>,
    /// Inactive (QEMU's `BDRV_O_INACTIVE`): another process may own the image, so the
    /// node writes nothing and gives no writer to anyone until it is activated again.
    pub(crate) inactive: Cell<bool>,
    /// It has been reopened (by `blockdev-reopen`, or by a snapshot, job or command that
    /// switches its mode). QEMU's reopen drops `BDRV_O_PROTOCOL` from the node's open
    /// flags, so a job's existing target named after it is probed from then on.
    pub(crate) reopened: Cell<bool>,
    /// A filter a job put in without a name from the user (QEMU's `implicit`): queries of
    /// the drive look through it.
    pub(crate) implicit: Cell<bool>,
    never_freeze: Cell<bool>,
    /// The node that opened this one as its child and whose options it takes, if that
    /// node is still above it (QEMU's `inherits_from`): a reopen of that node reopens this
    /// one with the options given inline for it.
    pub(crate) inherits_from: RefCell<Weak<Node>>,
    /// The backing file name the node's choice is judged by (QEMU's `auto_backing_file`):
    /// the backing node's own name when it was opened from the header alone, else (`None`)
    /// the header's text as written.
    auto_backing: RefCell<Option<String>>,
    /// The options as `-drive` wrote them, all text: QEMU keeps a command line's options
    /// as given, so a `json:` name shows `"read-zeroes": "on"` where `blockdev-add`'s
    /// shows `true`. Gone at the first reopen, which gives typed options.
    cli_text: RefCell<Option<QDict>>,
    /// Options a front end set as QEMU sets open flags rather than options (`-drive
    /// aio=`): a reopen may leave them out without resetting them.
    flag_options: RefCell<Vec<String>>,
    /// The iothread the node runs in (`None`: the main loop; see `graph/iothread.rs`).
    pub(crate) iothread: RefCell<Option<String>>,
    /// Edges this node owns, to its children.
    pub(crate) children: RefCell<Vec<Rc<Child>>>,
    /// Edges pointing at this node (their parents own them).
    pub(crate) users: RefCell<Vec<Weak<Child>>>,
    pub(crate) detect_zeroes: Cell<DetectZeroes>,
    pub(crate) discard_unmap: Cell<bool>,
    /// `cache.direct` and `cache.no-flush` (a reopen may change them).
    pub(crate) cache_direct: Cell<bool>,
    pub(crate) cache_no_flush: Cell<bool>,
    pub(crate) force_share: bool,
    pub(crate) write_threshold: Cell<u64>,
    pub(crate) threshold_hit: RefCell<Option<ThresholdHook>>,
    /// Dirty bitmaps, newest first.
    pub(crate) bitmaps: RefCell<Vec<Rc<DirtyBitmap>>>,
    /// The end of the furthest write (QEMU's `wr_highest_offset`, the one figure node-level
    /// `query-blockstats` reports).
    pub(crate) wr_highest_offset: Cell<u64>,
    /// Requests that changed the node, and how many of them the last flush covered
    /// (QEMU's `write_gen` and `flushed_gen`).
    pub(crate) write_gen: Cell<u64>,
    pub(crate) flushed_gen: Cell<u64>,
    /// Flushes of the node go one at a time, in the order they came (QEMU's
    /// `active_flush_req` and `flush_queue`).
    pub(crate) flush_turn: tokio::sync::Mutex<()>,
    /// While the driver flushes: whether writes the flush is to cover were not flushed yet.
    pub(crate) flush_pending: Cell<bool>,
    pub(crate) in_flight: Cell<u64>,
    quiesce: Cell<u32>,
    /// Its format was probed, not given (QEMU's `probed`): a raw image then keeps
    /// anything that would look like another format out of its first sector.
    probed: Cell<bool>,
}

/// Called when a write crosses the node's write threshold: (node, bytes past it, threshold).
pub(crate) type ThresholdHook = Box<dyn Fn(&Node, u64, u64)>;

/// Settings common to every node (`BlockdevOptions` base members).
#[derive(Debug, Clone, Copy)]
pub struct NodeSettings {
    /// `read-only` (after `auto-read-only` fell back, if it did).
    pub read_only: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `discard=unmap`.
    pub discard_unmap: bool,
    /// `cache.direct`.
    pub cache_direct: bool,
    /// `cache.no-flush`.
    pub cache_no_flush: bool,
    /// `force-share`: the node's parents share everything with others (read-only nodes
    /// only), so it reads an image another writer holds.
    pub force_share: bool,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({})", self.name)
    }
}

impl Node {
    pub(crate) fn new(
        name: String,
        driver: Box<dyn Driver>,
        options: QDict,
        settings: NodeSettings,
    ) -> Rc<Node> {
        Rc::new(Node {
            name,
            driver,
            options: RefCell::new(options),
            read_only: Cell::new(settings.read_only),
            inherits_read_only: Cell::new(false),
            inherits_cache: Cell::new((false, false)),
            inactive: Cell::new(false),
            reopened: Cell::new(false),
            implicit: Cell::new(false),
            never_freeze: Cell::new(false),
            inherits_from: RefCell::new(Weak::new()),
            auto_backing: RefCell::new(None),
            cli_text: RefCell::new(None),
            flag_options: RefCell::new(Vec::new()),
            iothread: RefCell::new(None),
            children: RefCell::new(Vec::new()),
            users: RefCell::new(Vec::new()),
            detect_zeroes: Cell::new(settings.detect_zeroes),
            discard_unmap: Cell::new(settings.discard_unmap),
            cache_direct: Cell::new(settings.cache_direct),
            cache_no_flush: Cell::new(settings.cache_no_flush),
            force_share: settings.force_share,
            write_threshold: Cell::new(0),
            threshold_hit: RefCell::new(None),
            bitmaps: RefCell::new(Vec::new()),
            wr_highest_offset: Cell::new(0),
            write_gen: Cell::new(0),
            flushed_gen: Cell::new(0),
            flush_turn: tokio::sync::Mutex::new(()),
            flush_pending: Cell::new(false),
            in_flight: Cell::new(0),
            quiesce: Cell::new(0),
            probed: Cell::new(false),
        })
    }

    /// The options the node was opened (or last reopened) with (`BlockdevOptions`, as given).
    pub fn options(&self) -> QDict {
        self.options.borrow().clone()
    }

    /// Records the command line's text of the options of this node and of the children
    /// they describe inline (see `cli_text`).
    pub fn keep_cli_text(&self, text: &QDict) {
        for c in self.children() {
            if let Some(QObject::Dict(t)) = text.get(c.name()) {
                c.node().keep_cli_text(t);
            }
        }
        *self.cli_text.borrow_mut() = Some(text.clone());
    }

    /// Marks option `key` of this node and of the children opened with it as one a front
    /// end set as QEMU sets an open flag (see `flag_options`).
    pub fn mark_flag_option(&self, key: &str) {
        if self.options.borrow().get(key).is_some() {
            self.flag_options.borrow_mut().push(key.to_owned());
        }
        for c in self.children() {
            c.node().mark_flag_option(key);
        }
    }

    /// Whether option `key` is one a front end set as an open flag.
    pub fn is_flag_option(&self, key: &str) -> bool {
        self.flag_options.borrow().iter().any(|k| k == key)
    }

    /// Forgets the command line's text: the node's options are typed from now on.
    pub(crate) fn forget_cli_text(&self) {
        self.cli_text.borrow_mut().take();
    }

    /// The child a filter shows unchanged, if the node is a filter.
    pub fn filtered(&self) -> Option<Rc<Node>> {
        self.driver.filtered_child().and_then(|c| self.child(c))
    }

    /// Whether `cache.direct` and `cache.no-flush` came from the parent that opened it.
    pub fn inherits_cache(&self) -> (bool, bool) {
        self.inherits_cache.get()
    }

    /// Whether its read-only mode came from the parent that opened it.
    pub fn inherits_read_only(&self) -> bool {
        self.inherits_read_only.get()
    }

    /// Marks cache modes as the node's own from now on (a reopen named them for it).
    pub fn keep_own_cache(&self, direct: bool, no_flush: bool) {
        let (d, n) = self.inherits_cache.get();
        self.inherits_cache.set((d && !direct, n && !no_flush));
    }

    /// Whether `target` is this node or a node below it (a new edge from `target` down to
    /// this node would make a cycle).
    pub fn reaches(self: &Rc<Self>, target: &Rc<Node>) -> bool {
        Rc::ptr_eq(self, target) || self.children().iter().any(|c| c.node().reaches(target))
    }

    /// The next node down the chain: the filtered child, or the backing file (QEMU:
    /// `bdrv_filter_or_cow_bs`).
    pub fn below(&self) -> Option<Rc<Node>> {
        self.filtered().or_else(|| self.child("backing"))
    }

    /// The image of this node's chain whose backing file is `base` (or the last image when
    /// `base` is none), looking through filters (QEMU: `bdrv_find_overlay`): the last layer a
    /// stream or commit works on. `None` when `base` is not in the chain.
    pub fn find_overlay(self: &Rc<Self>, base: Option<&Rc<Node>>) -> Option<Rc<Node>> {
        let base = base.map(|b| b.skip_filters());
        let mut active = self.skip_filters();
        loop {
            let next = active.child("backing").map(|b| b.skip_filters());
            match (&next, &base) {
                (Some(n), Some(b)) if Rc::ptr_eq(n, b) => return Some(active),
                (None, None) => return Some(active),
                (None, Some(_)) => return None,
                (Some(n), _) => active = n.clone(),
            }
        }
    }

    /// The node below any filters (QEMU: `bdrv_skip_filters`).
    pub fn skip_filters(self: &Rc<Self>) -> Rc<Node> {
        let mut n = self.clone();
        while let Some(f) = n.filtered() {
            n = f;
        }
        n
    }

    /// The node whose inline options this node takes (see `inherits_from`).
    pub fn inherits_from(&self) -> Option<Rc<Node>> {
        self.inherits_from.borrow().upgrade()
    }

    /// Whether following `inherits_from` up from this node reaches `ancestor` (QEMU's
    /// `bdrv_inherits_from_recursive`).
    pub(crate) fn inherits_from_recursive(&self, ancestor: &Node) -> bool {
        if std::ptr::eq(self, ancestor) {
            return true;
        }
        let mut at = self.inherits_from();
        while let Some(n) = at {
            if std::ptr::eq(n.as_ref(), ancestor) {
                return true;
            }
            at = n.inherits_from();
        }
        false
    }

    /// Marks the node as one no other job may hold a link to (a commit filter, which goes
    /// when its job ends; QEMU's `never_freeze`).
    pub fn set_never_freeze(&self) {
        self.never_freeze.set(true);
    }

    /// Whether links to the node may not be frozen by a job.
    pub fn never_freeze(&self) -> bool {
        self.never_freeze.get()
    }

    /// Whether a job put the node in without a user's name for it.
    pub fn is_implicit(&self) -> bool {
        self.implicit.get()
    }

    /// Marks the node as a filter a job made without a user's name for it.
    pub fn set_implicit(&self) {
        self.implicit.set(true);
    }

    /// Below the implicit filters at the top (what `query-block` shows of a drive).
    pub fn skip_implicit_filters(self: &Rc<Self>) -> Rc<Node> {
        let mut n = self.clone();
        while n.implicit.get()
            && let Some(f) = n.filtered()
        {
            n = f;
        }
        n
    }

    /// The driver as its own type, where the driver shows it ([`Driver::as_any`]): its
    /// factory's operations on an open node (`x-blockdev-amend`).
    pub fn driver_as<T: 'static>(&self) -> Option<&T> {
        self.driver.as_any()?.downcast_ref()
    }

    /// The driver instance (for queries and for drivers that look at their children's).
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    /// Stops waiting on what cannot come soon (see [`Driver::cancel_in_flight`]).
    pub fn cancel_in_flight(&self) {
        self.driver.cancel_in_flight(self);
    }

    /// The file name QEMU shows for the node (`bdrv_refresh_filename`).
    pub fn filename(&self) -> String {
        // A filter a job put in without a name is its child as far as names go.
        if self.implicit.get()
            && let Some(child) = self.filtered()
        {
            return child.filename();
        }
        if let Some(f) = self.driver.plain_filename() {
            return f;
        }
        // A filter that adds nothing to its file's data (copy-before-write, snapshot-access)
        // shows the file's name, whatever it is. A format takes its file's name when the
        // file is a protocol node with a plain one; over anything else (a filter, another
        // format) it needs a `json:` name.
        if self.driver.is_passthrough()
            && !self.backing_overridden()
            && let Some(file) = self.child("file")
        {
            if self.driver.shows_file_name() {
                return file.filename();
            }
            if let Some(name) = file.driver.plain_filename() {
                return name;
            }
        }
        format!(
            "json:{}",
            ferrite_qobject::to_json(&QObject::Dict(self.full_options()))
        )
    }

    /// The node's plain file name, if it has one (QEMU's `exact_filename`): none where
    /// only a `json:` name describes it.
    pub fn exact_filename(&self) -> Option<String> {
        Some(self.filename()).filter(|f| !f.starts_with("json:"))
    }

    /// The options that recreate this node and its children (`json:` file names).
    pub fn full_options(&self) -> QDict {
        if self.implicit.get()
            && let Some(child) = self.filtered()
        {
            return child.full_options();
        }
        let mut d = QDict::new().with("driver", self.driver_name());
        let text = self.cli_text.borrow();
        for (k, v) in self.driver.strong_options().iter() {
            let given = text
                .as_ref()
                .and_then(|t| t.get(k))
                .filter(|t| matches!(t, QObject::String(_)));
            d.insert(k, given.unwrap_or(v).clone());
        }
        if let Some(f) = self
            .driver
            .plain_filename()
            .filter(|_| self.driver.filename_is_option())
        {
            d.insert("filename", f);
        }
        let overridden = self.backing_overridden();
        if let Some(gathered) = self.driver.gathered_child_options(self, overridden) {
            for (k, v) in gathered {
                d.insert(k, v);
            }
            return d;
        }
        for c in self.children() {
            // The backing file the image names is implied; one set by the user is not.
            if c.name() == "backing" && !overridden {
                continue;
            }
            d.insert(c.name(), c.node().full_options());
        }
        if overridden && self.child("backing").is_none() {
            d.insert("backing", QObject::Null);
        }
        d
    }

    /// The backing child is not the file the image names, or there is none where the image
    /// names one (QEMU: `bdrv_backing_overridden`): the backing node's name compared with
    /// the header's text as written, or, for a backing file opened from the header alone,
    /// with that file's name at the time.
    pub fn backing_overridden(&self) -> bool {
        let named = self.auto_backing.borrow().clone().or_else(|| {
            self.driver
                .backing_filename()
                .map(|(n, _)| n)
                .filter(|n| !n.is_empty())
        });
        match (self.child("backing"), named) {
            (Some(_), None) => true,
            (Some(b), Some(name)) => name != b.filename(),
            (None, named) => named.is_some(),
        }
    }

    /// The node was opened: a backing file it opened from its header alone (no `backing`
    /// option) is its own choice by name.
    pub(crate) fn note_implicit_backing(&self) {
        if self.options.borrow().get("backing").is_none()
            && let Some(b) = self.child("backing")
        {
            *self.auto_backing.borrow_mut() = Some(b.filename());
        }
    }

    /// Writes a new backing file name into the image's header; from then on the header's
    /// text is what the backing node is judged by.
    ///
    /// # Errors
    /// The driver's (ENOTSUP for formats without backing files).
    pub async fn change_backing_file(
        &self,
        name: Option<String>,
        format: Option<String>,
    ) -> std::io::Result<()> {
        self.driver.change_backing_file(self, name, format).await?;
        *self.auto_backing.borrow_mut() = None;
        Ok(())
    }

    /// Forgets option `key` of the node (how it was opened no longer shows it).
    pub fn remove_option(&self, key: &str) {
        self.options.borrow_mut().remove(key);
    }

    /// Records option `key` (a choice made after opening, such as a backing node).
    pub fn set_option(&self, key: &str, value: impl Into<QObject>) {
        self.options.borrow_mut().insert(key, value);
    }

    /// The dirty bitmap `name`.
    pub fn bitmap(&self, name: &str) -> Option<Rc<DirtyBitmap>> {
        self.bitmaps
            .borrow()
            .iter()
            .find(|b| !b.name().is_empty() && b.name() == name)
            .cloned()
    }

    /// Adds a dirty bitmap (newest first).
    pub fn add_bitmap(&self, b: Rc<DirtyBitmap>) {
        self.insert_bitmap(0, b);
    }

    /// Puts a dirty bitmap back where it was (a removal taken back).
    pub fn insert_bitmap(&self, at: usize, b: Rc<DirtyBitmap>) {
        let mut v = self.bitmaps.borrow_mut();
        let at = at.min(v.len());
        v.insert(at, b);
    }

    /// Removes a dirty bitmap; returns where it was in the list.
    pub fn remove_bitmap(&self, b: &Rc<DirtyBitmap>) -> Option<usize> {
        let mut v = self.bitmaps.borrow_mut();
        let at = v.iter().position(|x| Rc::ptr_eq(x, b))?;
        v.remove(at);
        Some(at)
    }

    /// The node's dirty bitmaps, newest first.
    pub fn bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        self.bitmaps.borrow().clone()
    }

    /// The node's dirty bitmaps as QEMU lists them: with the successors of those a job
    /// uses, each where its making puts it among the others (newest first).
    pub fn listed_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        let mut all = self.bitmaps();
        let successors: Vec<_> = all.iter().filter_map(|b| b.successor()).collect();
        for s in successors {
            let at = all
                .iter()
                .position(|b| s.is_newer_than(b))
                .unwrap_or(all.len());
            all.insert(at, s);
        }
        all
    }

    /// Moves `b`, which has just taken its successor's place (a job's bitmap after it),
    /// to where its successor stood in [`Node::listed_bitmaps`].
    pub fn replace_bitmap_by_successor(&self, b: &Rc<DirtyBitmap>) {
        if self.remove_bitmap(b).is_none() {
            return;
        }
        let at = self
            .bitmaps
            .borrow()
            .iter()
            .position(|x| b.is_newer_than(x))
            .unwrap_or(usize::MAX);
        self.insert_bitmap(at, b.clone());
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

    /// Whether its format was probed rather than given.
    pub fn probed(&self) -> bool {
        self.probed.get()
    }

    pub(crate) fn set_probed(&self) {
        self.probed.set(true);
    }

    /// Whether the node is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only.get()
    }

    /// Whether compressed writes reach a format that stores them (QEMU's
    /// `bdrv_supports_compressed_writes`): the driver takes them, and a filter's child too.
    pub fn supports_compressed_writes(&self) -> bool {
        if !self.driver.can_write_compressed() {
            return false;
        }
        match self.driver.filtered_child().and_then(|c| self.child(c)) {
            Some(filtered) => filtered.supports_compressed_writes(),
            None => true,
        }
    }

    /// The node on child edge `name`.
    pub fn child(&self, name: &str) -> Option<Rc<Node>> {
        self.edge(name).map(|c| c.node())
    }

    /// Child edge `name`: how a driver reaches that child's data.
    pub fn edge(&self, name: &str) -> Option<Rc<Child>> {
        self.children
            .borrow()
            .iter()
            .find(|c| c.name() == name)
            .cloned()
    }

    /// The node's child edges.
    pub fn children(&self) -> Vec<Rc<Child>> {
        self.children.borrow().clone()
    }

    /// The edges pointing at this node: every parent's use of it.
    pub fn users(&self) -> Vec<Rc<Child>> {
        self.users
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Whether the node is active (see `blockdev-set-active`).
    pub fn is_active(&self) -> bool {
        !self.inactive.get()
    }

    /// A breakpoint operation on the first node down the primary children (`file`, else
    /// `image`) whose driver has breakpoints; `Err(ENOTSUP)` when none has (QEMU's
    /// `bdrv_debug_breakpoint` and friends).
    ///
    /// # Errors
    /// The driver's errno (ENOENT for an unknown tag), or ENOTSUP.
    pub fn debug_breakpoint(&self, op: crate::driver::DebugOp<'_>) -> Result<bool, i32> {
        if let Some(r) = self.driver().debug_breakpoint(op) {
            return r;
        }
        match self.child("file").or_else(|| self.child("image")) {
            Some(c) => c.debug_breakpoint(op),
            None => Err(libc::ENOTSUP),
        }
    }

    /// The name of the first named `BlockBackend` on the node (QEMU's
    /// `bdrv_get_device_name`; empty for a node without one, as every node of a storage
    /// daemon is): what a block job without `job-id` is called.
    pub fn device_name(&self) -> String {
        self.users()
            .iter()
            .filter_map(|u| u.root_parent())
            .map(|r| r.vertex())
            .find(|v| v.kind == crate::child::VertexKind::BlockBackend && !v.name.is_empty())
            .map(|v| v.name)
            .unwrap_or_default()
    }

    /// How QEMU's messages name the node (`bdrv_get_device_or_node_name`): its drive's
    /// name, else its own.
    pub fn device_or_node_name(&self) -> String {
        Some(self.device_name())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| self.name.clone())
    }

    /// Whether a `BlockBackend` (an export, a device, a job's writer) uses the node (QEMU:
    /// `bdrv_has_blk`); jobs' own edges do not count.
    pub fn has_backend_user(&self) -> bool {
        self.users().iter().any(|u| {
            u.root_parent()
                .is_some_and(|r| r.vertex().kind == crate::child::VertexKind::BlockBackend)
        })
    }

    /// Whether drivers can zero ranges fast.
    pub fn can_fast_zero(&self) -> bool {
        self.driver.can_fast_zero()
    }

    /// Whether `discard=unmap` lets discards reach the storage.
    pub fn discard_unmap(&self) -> bool {
        self.discard_unmap.get()
    }

    /// `cache.direct` (O_DIRECT) and `cache.no-flush`.
    pub fn cache_mode(&self) -> (bool, bool) {
        (self.cache_direct.get(), self.cache_no_flush.get())
    }

    /// `force-share`: whatever its parents take, they share everything.
    pub fn force_share(&self) -> bool {
        self.force_share
    }

    /// The end of the furthest write (`wr_highest_offset`).
    pub fn wr_highest_offset(&self) -> u64 {
        self.wr_highest_offset.get()
    }

    /// The `detect-zeroes` setting.
    pub fn detect_zeroes(&self) -> DetectZeroes {
        self.detect_zeroes.get()
    }

    /// Sets `detect-zeroes` outside the node's options, as `-drive` does (QEMU sets
    /// `bs->detect_zeroes` after the open, so `unmap` needs no `discard=unmap` there).
    pub fn set_detect_zeroes(&self, mode: DetectZeroes) {
        self.detect_zeroes.set(mode);
    }

    /// Bytes the node occupies on its storage: the driver's own figure, a filter's filtered
    /// child's, or what its data and metadata children occupy, not its backing chain (QEMU:
    /// `bdrv_get_allocated_file_size`); `None` where the storage cannot say (a remote
    /// export).
    pub fn allocated_file_size(&self) -> Option<u64> {
        if let Some(n) = self.driver.actual_size(self) {
            return Some(n);
        }
        if !self.driver.knows_allocated_size() {
            return None;
        }
        if self.driver.filtered_child().is_some() {
            return self.filtered()?.allocated_file_size();
        }
        // A child that cannot say makes the whole unknown (QEMU's sum fails with it).
        self.children()
            .iter()
            .filter(|c| c.name() != "backing" && c.name() != "target")
            .map(|c| c.node().allocated_file_size())
            .sum()
    }

    /// Request alignment in bytes.
    pub fn request_alignment(&self) -> u64 {
        self.driver.request_alignment(self)
    }

    /// The format's cluster size, if it has one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }

    /// Whether its driver gave it up (see `Driver::is_ejected`).
    pub fn is_ejected(&self) -> bool {
        self.driver.is_ejected()
    }

    /// Whether it and everything below it has a driver (QEMU's `bdrv_is_inserted`).
    pub fn is_inserted(&self) -> bool {
        !self.is_ejected() && self.children().iter().all(|c| c.node().is_inserted())
    }

    /// Whether its driver answers QEMU's `bdrv_get_info` (see `Driver::answers_info`).
    pub fn answers_info(&self) -> bool {
        self.driver.answers_info(self)
    }

    /// The write threshold (0: none).
    pub fn write_threshold(&self) -> u64 {
        self.write_threshold.get()
    }

    /// Sets the write threshold (0: none).
    pub fn set_write_threshold(&self, threshold: u64) {
        self.write_threshold.set(threshold);
    }

    /// What the node's users take and share, all together.
    pub fn cumulative_perms(&self) -> (Perm, Perm) {
        self.users()
            .iter()
            .fold((Perm::empty(), Perm::all()), |(p, s), u| {
                (p | u.perm(), s & u.shared())
            })
    }

    /// Whether a drained section holds the node.
    pub fn is_quiesced(&self) -> bool {
        self.quiesce.get() > 0
    }

    /// Requests in flight on the node.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.get()
    }

    /// One more drained section of this node; the first quiesces every parent.
    pub(crate) fn drained_begin(&self) {
        let q = self.quiesce.get();
        self.quiesce.set(q + 1);
        if q == 0 {
            self.driver.drained_begin();
            for u in self.users() {
                if !u.quiesced_parent.get() {
                    u.parent_drained_begin();
                }
            }
        }
    }

    /// One drained section of this node ended; after the last, the parents resume.
    pub(crate) fn drained_end(&self) {
        let q = self.quiesce.get().saturating_sub(1);
        self.quiesce.set(q);
        if q == 0 {
            self.driver.drained_end();
            for u in self.users() {
                u.parent_drained_end();
            }
        }
    }

    /// Whether the node or a quiesced parent still has work in flight (QEMU:
    /// `bdrv_drain_poll`).
    pub(crate) fn drain_poll(&self) -> bool {
        self.in_flight.get() > 0
            || self.driver.busy()
            || self
                .users()
                .iter()
                .any(|u| u.quiesced_parent.get() && u.parent_drained_poll())
    }
}
