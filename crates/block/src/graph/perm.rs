//! Permissions on edges (QEMU: `bdrv_check_perm`, `bdrv_child_perm`, block.c): a change
//! to one edge is checked against every other user of its node, then pushed down to the
//! node's driver (image locks) and, through the driver's `child_perm`, to its children's
//! edges. Any conflict on the way undoes the change.

use crate::child::Child;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::perm::Perm;
use std::rc::Rc;

impl Graph {
    /// Changes what edge `e` takes and shares, checking the whole subgraph below; on error
    /// nothing changes.
    ///
    /// # Errors
    /// A permission conflict anywhere below, or a lock held by another process.
    pub(crate) fn update_edge_perm(&self, e: &Rc<Child>, perm: Perm, shared: Perm) -> Result<()> {
        let old = (e.perm.get(), e.shared.get());
        let node = e.node();
        // A node's parents share everything with others when it says so (QEMU applies
        // force-share to node parents, not to users such as devices).
        let shared = if node.force_share() && e.parent_node().is_some() {
            Perm::all()
        } else {
            shared
        };
        e.perm.set(perm);
        e.shared.set(shared);
        let r = check_conflicts(&node).and_then(|()| self.propagate(&node));
        if r.is_err() {
            e.perm.set(old.0);
            e.shared.set(old.1);
            let _ = self.propagate(&node);
        }
        r
    }

    /// Pushes a node's cumulative permissions down to its driver (locks) and children.
    pub(crate) fn propagate(&self, node: &Rc<Node>) -> Result<()> {
        let (perm, shared) = node.cumulative_perms();
        let active = node.is_active();
        // An inactive node lets go of its image (its locks) and asks its children only to
        // read (`child_edge_perms`): another process may own the image meanwhile.
        if active {
            node.driver.set_perm(perm, shared)?;
        } else {
            node.driver.set_perm(Perm::empty(), Perm::all())?;
        }
        for c in node.children() {
            let (p, s) = Self::child_edge_perms(node, c.name());
            self.update_edge_perm(&c, p, s)?;
        }
        Ok(())
    }

    /// What `parent` asks of its child `name` for its users now: what its driver needs, or,
    /// while it is inactive, only reading (and what its driver still needs), sharing
    /// everything.
    pub(crate) fn child_edge_perms(parent: &Node, name: &str) -> (Perm, Perm) {
        let (perm, shared) = parent.cumulative_perms();
        let used = !parent.users().is_empty();
        let (p, s) = parent.driver.child_perm(name, perm, shared, used);
        if parent.is_active() {
            (p, s)
        } else {
            (
                p & (Perm::CONSISTENT_READ | parent.driver.child_perm_inactive(name)),
                Perm::all(),
            )
        }
    }

    /// Asks `node`'s driver again what it needs of its children (its own state changed,
    /// as a mirror filter's does when its job ends).
    ///
    /// # Errors
    /// A permission conflict below.
    pub fn refresh_perms(&self, node: &Rc<Node>) -> Result<()> {
        self.propagate(node)
    }

    /// Checks the users of `node` after edges moved to it.
    pub(crate) fn check_node(&self, node: &Rc<Node>) -> Result<()> {
        check_conflicts(node).and_then(|()| self.propagate(node))
    }
}

/// QEMU's compliance check between every pair of a node's users (newest first), then the
/// read-only rule.
fn check_conflicts(node: &Node) -> Result<()> {
    let users = node.users();
    for a in users.iter().rev() {
        for b in users.iter().rev() {
            if Rc::ptr_eq(a, b) {
                continue;
            }
            let denied = b.perm() - a.shared();
            if !denied.is_empty() {
                return Err(Error::PermissionConflict {
                    node: node.name.clone(),
                    perms: denied.message_names(),
                    user: b.user_desc(),
                    other: a.user_desc(),
                });
            }
        }
    }
    let (perm, _) = node.cumulative_perms();
    let writes = perm.writes();
    // An inactive node takes no writer either (QEMU's `bdrv_is_writable_after_reopen`):
    // an overlay made inactive cannot take over the users of an active node that write.
    if (node.read_only.get() || !node.is_active()) && writes {
        return Err(Error::ReadOnly);
    }
    // A write is widened to the node's alignment (a compress filter's cluster), which may
    // reach past the end of an image whose size is not a multiple of it: only a writer that
    // may resize can have that (QEMU's rule).
    if writes
        && !perm.contains(Perm::RESIZE)
        && node.len().next_multiple_of(512) % node.request_alignment().max(1) != 0
    {
        return Err(Error::UnalignedSize);
    }
    Ok(())
}
