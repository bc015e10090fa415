//! Attaching, detaching and moving edges (QEMU: `bdrv_attach_child`, `bdrv_replace_node`,
//! `bdrv_append`): the operations every graph change is made of. Moving an edge between
//! drained nodes keeps its parent quiesced throughout (QEMU's `bdrv_replace_child_noperm`
//! order: the new node's drain reaches the parent before the old one's lets go).

use crate::child::{Child, ParentRef, RootParent};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::perm::Perm;
use crate::registry::DriverFactory;
use ferrite_qapi::Args;
use std::rc::{Rc, Weak};

impl Graph {
    /// Links a new edge into `node`'s users, quiescing its parent if `node` is drained.
    fn link(&self, e: &Rc<Child>, node: &Rc<Node>) {
        node.users.borrow_mut().push(Rc::downgrade(e));
        if node.is_quiesced() && !e.quiesced_parent.get() {
            e.parent_drained_begin();
        }
    }

    /// Unlinks an edge from its node's users.
    fn unlink(&self, e: &Rc<Child>, node: &Node) {
        node.users
            .borrow_mut()
            .retain(|w| w.upgrade().is_some_and(|u| !Rc::ptr_eq(&u, e)));
    }

    /// A root user's edge to `node`, named `name`, taking `perm` and sharing `shared`.
    ///
    /// # Errors
    /// A permission conflict anywhere below, or a lock held by another process; nothing
    /// changes then.
    pub fn attach_root(
        &self,
        node: &Rc<Node>,
        parent: Weak<dyn RootParent>,
        name: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<Rc<Child>> {
        check_inactive_perm(node, perm)?;
        let e = Child::new(name, node, ParentRef::Root(parent), self.next_id());
        self.link(&e, node);
        if let Err(err) = self.update_edge_perm(&e, perm, shared) {
            self.detach_edge(&e);
            return Err(err);
        }
        Ok(e)
    }

    /// A new edge from `parent` to `child`, named `name`, with what `parent`'s driver needs
    /// of it for `parent`'s users.
    ///
    /// # Errors
    /// A cycle, parent and child held in different iothreads, or a permission conflict;
    /// nothing changes then.
    pub fn attach_child(
        &self,
        parent: &Rc<Node>,
        child: &Rc<Node>,
        name: &str,
    ) -> Result<Rc<Child>> {
        // A node under itself would make every walk down the graph endless.
        if child.reaches(parent) {
            return Err(Error::ChildCycle {
                child: child.name().to_owned(),
                edge: name.to_owned(),
                parent: parent.name().to_owned(),
            });
        }
        if !child.is_active() && parent.is_active() {
            return Err(Error::InactiveChild {
                child: child.name().to_owned(),
                edge: name.to_owned(),
                parent: parent.name().to_owned(),
            });
        }
        let (p, s) = Self::child_edge_perms(parent, name);
        check_inactive_perm(child, p)?;
        let iothreads = self.iothread_snapshot([parent, child]);
        self.join_iothreads(parent, child)?;
        let e = Child::new(
            name,
            child,
            ParentRef::Node(Rc::downgrade(parent)),
            self.next_id(),
        );
        self.link(&e, child);
        parent.children.borrow_mut().push(e.clone());
        if let Err(err) = self.update_edge_perm(&e, p, s) {
            self.detach_edge(&e);
            iothreads.restore();
            return Err(err);
        }
        Ok(e)
    }

    /// Removes an edge: its parent forgets it and lets go of what it held; a parent
    /// quiesced through it resumes. The child node stays (see
    /// [`Graph::forget_if_orphan`]).
    pub fn detach_edge(&self, e: &Rc<Child>) {
        let node = e.node();
        if let Some(p) = e.parent_node() {
            p.children.borrow_mut().retain(|c| !Rc::ptr_eq(c, e));
            unset_inherits_from(&p, &node);
        }
        self.unlink(e, &node);
        e.parent_drained_end();
        let _ = self.propagate(&node);
    }

    /// Points edge `e` at `to` instead, keeping its parent's quiescence consistent.
    fn move_edge(&self, e: &Rc<Child>, to: &Rc<Node>) {
        let from = e.node();
        if to.is_quiesced() && !e.quiesced_parent.get() {
            e.parent_drained_begin();
        }
        self.unlink(e, &from);
        *e.node.borrow_mut() = to.clone();
        to.users.borrow_mut().push(Rc::downgrade(e));
        if !to.is_quiesced() && e.quiesced_parent.get() {
            e.parent_drained_end();
        }
    }

    /// Replaces `old` with `new` under every parent of `old` (except `new` itself, when it
    /// sits above `old` as a filter does, and nodes below `new`), as one operation on drained
    /// nodes: node edges and root users move together, and on a permission conflict nothing
    /// moves (QEMU: `bdrv_replace_node`).
    ///
    /// # Errors
    /// A permission conflict on `new`.
    pub async fn replace(&self, old: &Rc<Node>, new: &Rc<Node>) -> Result<()> {
        let _old_drained = self.drain(old).await;
        let _new_drained = self.drain(new).await;
        // A parent below `new` stays (moving it would make a loop: a fleecing target backed
        // by the source it protects keeps that source as its backing).
        // A job's edges stay where the job put them.
        let moving: Vec<Rc<Child>> = old
            .users()
            .into_iter()
            .filter(|u| u.parent_node().is_none_or(|p| !new.reaches(&p)))
            .filter(|u| u.root_parent().is_none_or(|r| !r.stays_at_node()))
            .collect();
        for e in &moving {
            self.move_edge(e, new);
        }
        // `old` lets go first: what it asked of its own children for these users (a filter
        // guarding its source) must not stand in their way at `new`.
        let _ = self.propagate(old);
        let r = self.check_node(new);
        if r.is_err() {
            for e in &moving {
                self.move_edge(e, old);
            }
            let _ = self.propagate(new);
            let _ = self.check_node(old);
        }
        r
    }

    /// Points edge `e` (a node's child, or a root user's: a device's drive changed with
    /// `qom-set`) at `to`, on drained nodes; the node it left is closed if nothing else
    /// uses it.
    ///
    /// # Errors
    /// A cycle, or a permission conflict on `to`; the edge stays where it was then.
    pub async fn retarget_edge(&self, e: &Rc<Child>, to: &Rc<Node>) -> Result<()> {
        self.retarget_edges(&[(e.clone(), to.clone())]).await
    }

    /// Points each edge at its new node as one change (a reopen that swaps two images'
    /// files): permissions are checked once all have moved, and on a conflict all go back.
    /// Nodes left without users are closed.
    ///
    /// # Errors
    /// A cycle, or a permission conflict; no edge has moved then.
    pub(crate) async fn retarget_edges(&self, moves: &[(Rc<Child>, Rc<Node>)]) -> Result<()> {
        let moves: Vec<(Rc<Child>, Rc<Node>, Rc<Node>)> = moves
            .iter()
            .map(|(e, to)| (e.clone(), e.node(), to.clone()))
            .filter(|(_, from, to)| !Rc::ptr_eq(from, to))
            .collect();
        for (e, _, to) in &moves {
            if let Some(parent) = e.parent_node()
                && to.reaches(&parent)
            {
                return Err(Error::ChildCycle {
                    child: to.name().to_owned(),
                    edge: e.name().to_owned(),
                    parent: parent.name().to_owned(),
                });
            }
        }
        let parents: Vec<Rc<Node>> = moves
            .iter()
            .filter_map(|(e, _, _)| e.parent_node())
            .collect();
        let iothreads = self.iothread_snapshot(parents.iter().chain(moves.iter().map(|m| &m.2)));
        for (e, _, to) in &moves {
            if let Some(parent) = e.parent_node()
                && let Err(err) = self.join_iothreads(&parent, to)
            {
                iothreads.restore();
                return Err(err);
            }
        }
        let mut drained = Vec::new();
        for (_, from, to) in &moves {
            drained.push(self.drain(from).await);
            drained.push(self.drain(to).await);
        }
        for (e, _, to) in &moves {
            self.move_edge(e, to);
        }
        for (_, from, _) in &moves {
            let _ = self.propagate(from);
        }
        if let Err(err) = moves.iter().try_for_each(|(_, _, to)| self.check_node(to)) {
            for (e, from, _) in &moves {
                self.move_edge(e, from);
            }
            for (_, from, to) in &moves {
                let _ = self.propagate(to);
                let _ = self.check_node(from);
            }
            iothreads.restore();
            return Err(err);
        }
        for (e, from, to) in &moves {
            if let Some(parent) = e.parent_node() {
                relink_inherits_from(&parent, from, to);
            }
        }
        drop(drained);
        for (_, from, _) in &moves {
            // Written back before it goes: it may be an image a device wrote through.
            self.close_inline(from).await;
        }
        Ok(())
    }

    /// Opens a filter node from `opts` with `factory` and puts it above `below`: every
    /// user of `below` goes through it from now on (a backup job's copy-before-write).
    ///
    /// # Errors
    /// The filter failing to open, or a permission conflict; nothing changes then.
    pub async fn insert_filter(
        &self,
        below: &Rc<Node>,
        opts: &Args,
        factory: &dyn DriverFactory,
    ) -> Result<Rc<Node>> {
        let filter = self.open_with(opts, factory).await?;
        self.place_above(below, filter).await
    }

    /// As [`Graph::insert_filter`], with the wording of QEMU's `bdrv_insert_node`: a filter that
    /// fails to open says "Could not create node: ..." (backup's and stream's filters).
    ///
    /// # Errors
    /// As [`Graph::insert_filter`].
    pub async fn insert_filter_node(
        &self,
        below: &Rc<Node>,
        opts: &Args,
        factory: &dyn DriverFactory,
    ) -> Result<Rc<Node>> {
        let filter = self
            .open_with(opts, factory)
            .await
            .map_err(|e| Error::CreateNode(Box::new(e)))?;
        self.place_above(below, filter).await
    }

    /// Puts an opened filter above `below`, or deletes it if that fails.
    async fn place_above(&self, below: &Rc<Node>, filter: Rc<Node>) -> Result<Rc<Node>> {
        if let Err(e) = self.replace(below, &filter).await {
            self.forget_if_orphan(&filter);
            return Err(e);
        }
        Ok(filter)
    }

    /// Takes a filter out again: its users go to what is below it now (its filtered child,
    /// `file` or `backing`: the node it was put on, or another filter inserted since) and
    /// it is deleted.
    ///
    /// # Errors
    /// A permission conflict moving the users back.
    pub async fn remove_filter(&self, filter: &Rc<Node>) -> Result<()> {
        let filtered = filter.driver().filtered_child().unwrap_or("file");
        if let Some(below) = filter.child(filtered) {
            self.replace(filter, &below).await?;
        }
        self.close_dropped_filter(filter).await;
        Ok(())
    }

    /// Gives `node` (a format node without one) `backing` as its backing child.
    ///
    /// # Errors
    /// A driver without backing files, a permission conflict; nothing changed then.
    pub fn attach_backing(&self, node: &Rc<Node>, backing: &Rc<Node>) -> Result<()> {
        if !node.driver().supports_backing() {
            return Err(Error::BackingUnsupported {
                driver: node.driver_name().to_owned(),
                node: node.name().to_owned(),
            });
        }
        self.attach_child(node, backing, "backing").map(drop)
    }

    /// Makes `backing` (or nothing) `node`'s backing child in place of the one it has
    /// (QEMU: `bdrv_set_backing_hd`), under drain. The old backing node stays open while
    /// others use it; the caller records the change in the image.
    ///
    /// # Errors
    /// A permission conflict; the old backing child is back then.
    pub async fn set_backing(&self, node: &Rc<Node>, backing: Option<&Rc<Node>>) -> Result<()> {
        let _drained = self.drain(node).await;
        let old = node.edge("backing");
        let old_node = old.as_ref().map(|e| e.node());
        let inherits = backing.is_some_and(|b| b.inherits_from_recursive(node));
        if let Some(e) = &old {
            self.detach_edge(e);
        }
        if let Some(b) = backing
            && let Err(err) = self.attach_child(node, b, "backing")
        {
            if let Some(o) = &old_node {
                let _ = self.attach_child(node, o, "backing");
            }
            return Err(err);
        }
        if let Some(b) = backing
            && inherits
        {
            *b.inherits_from.borrow_mut() = Rc::downgrade(node);
        }
        // The image will name what it is backed by now.
        node.remove_option("backing");
        if let Some(o) = &old_node {
            self.close_inline(o).await;
        }
        Ok(())
    }

    /// Opens the backing file `node`'s image names and attaches it, if it has none yet
    /// (QEMU: `bdrv_open_backing_file`, for an image first opened without one).
    ///
    /// # Errors
    /// The backing file failing to open, or a permission conflict.
    pub async fn open_backing_file(&self, node: &Rc<Node>) -> Result<()> {
        if node.child("backing").is_some() {
            return Ok(());
        }
        let Some((name, format)) = node.driver().backing_filename() else {
            return Ok(());
        };
        let image = node
            .child("file")
            .map_or_else(|| node.filename(), |f| f.filename());
        let path = crate::filename::backing_path(&image, &name)?;
        // A protocol name (`null-co://`, `json:{...}`) says what opens it.
        let file_opts = crate::filename::protocol_options(&path).with("read-only", true);
        let format = match format {
            Some(f) => f,
            None => self.probe_format(&file_opts).await?.to_owned(),
        };
        let opts = ferrite_qobject::QDict::new()
            .with("driver", format.as_str())
            .with("file", file_opts)
            .with("read-only", true);
        let backing = self.open(&Args::new(opts)).await?;
        let r = self.attach_backing(node, &backing);
        match r {
            Ok(()) => *backing.inherits_from.borrow_mut() = Rc::downgrade(node),
            Err(_) => self.forget_if_orphan(&backing),
        }
        r
    }

    /// An external snapshot's switch: `overlay` gets `node` as its backing file and takes
    /// its place under every user, and `node` becomes read-only (QEMU's `bdrv_append`).
    ///
    /// # Errors
    /// A permission conflict; nothing changed then.
    pub async fn append_overlay(&self, node: &Rc<Node>, overlay: &Rc<Node>) -> Result<()> {
        let _drained = self.drain(node).await;
        let edge = self.attach_child(overlay, node, "backing")?;
        if let Err(e) = self.replace(node, overlay).await {
            self.detach_edge(&edge);
            return Err(e);
        }
        // Unless the overlay's header names this very node, its backing was chosen here
        // (its file name then shows the choice, as QEMU's does).
        let named = overlay.driver.backing_filename().and_then(|(f, _)| {
            let image = overlay.child("file").map(|c| c.filename())?;
            crate::filename::backing_path(&image, &f).ok()
        });
        if named.as_deref() != Some(node.filename().as_str()) {
            overlay.set_option("backing", node.name.as_str());
        }
        // The old top is read-only from now on, its file too, where nothing writing holds
        // it (QEMU's reopen, whose failure it ignores; it always fails for a node opened
        // with `active` given). An inactive one has nothing to write back first, and may
        // not.
        let _ = if node.options().get("active").is_some() {
            Ok(())
        } else if node.is_active() {
            self.reopen_read_only(node).await
        } else {
            self.set_read_only(node, true)
        };
        Ok(())
    }
}

/// `parent` lets go of `child`: nodes below `child` that took their options from `parent`
/// take them from nobody now, unless `parent` still has `child` under another edge
/// (QEMU's `bdrv_unset_inherits_from`).
fn unset_inherits_from(parent: &Rc<Node>, child: &Rc<Node>) {
    if child
        .inherits_from()
        .is_some_and(|p| Rc::ptr_eq(&p, parent))
        && !parent
            .children()
            .iter()
            .any(|c| Rc::ptr_eq(&c.node(), child))
    {
        *child.inherits_from.borrow_mut() = Weak::new();
    }
    for c in child.children() {
        unset_inherits_from(parent, &c.node());
    }
}

/// `parent`'s edge went from `from` to `to`: `to` takes its options from `parent` if it
/// took them from it through nodes between (QEMU's `bdrv_set_file_or_backing_noperm`).
fn relink_inherits_from(parent: &Rc<Node>, from: &Rc<Node>, to: &Rc<Node>) {
    let inherits = to.inherits_from_recursive(parent);
    unset_inherits_from(parent, from);
    if inherits {
        *to.inherits_from.borrow_mut() = Rc::downgrade(parent);
    }
}

/// An inactive node gives its users nothing but reading (QEMU checks each new edge so).
///
/// # Errors
/// "Permission '...' unavailable on inactive node".
pub(crate) fn check_inactive_perm(node: &Node, perm: Perm) -> Result<()> {
    if !node.is_active() && !(perm - Perm::CONSISTENT_READ).is_empty() {
        return Err(Error::InactivePermission(perm.message_names()));
    }
    Ok(())
}
