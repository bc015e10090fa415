//! Active and inactive nodes (QEMU: `bdrv_inactivate`, `bdrv_activate`,
//! `blockdev-set-active`): an inactive node has written everything back and gives no writer
//! to anyone, so another process (a migration's destination) may own the image meanwhile;
//! activating it again re-reads what the driver caches. A node is inactivated with its
//! children (those no other active node uses), after its parents; activated before them.

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use std::rc::Rc;

/// Whether a node (not a root user) that is itself active uses `node`.
fn has_active_node_parent(node: &Node) -> bool {
    node.users()
        .iter()
        .filter_map(|u| u.parent_node())
        .any(|p| p.is_active())
}

impl Graph {
    /// Inactivates `node` and the children only it keeps active.
    ///
    /// # Errors
    /// "Node has active parent node", or EPERM when a user still writes it.
    pub async fn inactivate(&self, node: &Rc<Node>) -> Result<()> {
        if has_active_node_parent(node) {
            return Err(Error::ActiveParent);
        }
        self.inactivate_recurse(node).await
    }

    /// Inactivates the top-level nodes that no node uses, and so, their whole subgraphs.
    /// They are walked as QEMU's `bdrv_inactivate_all` walks them (`top_level_nodes`, which
    /// says which of the monitor's nodes that walk misses): those stay active here too,
    /// and a migration leaves them to the source.
    ///
    /// # Errors
    /// The first node that cannot be inactivated.
    pub async fn inactivate_all(&self) -> Result<()> {
        for n in self.top_level_nodes() {
            if n.users().iter().any(|u| u.parent_node().is_some()) {
                continue;
            }
            self.inactivate_recurse(&n).await?;
        }
        Ok(())
    }

    fn inactivate_recurse<'a>(&'a self, node: &'a Rc<Node>) -> crate::registry::LocalFut<'a, ()> {
        Box::pin(async move {
            if node.is_ejected() {
                return Err(Error::InactivateFailed(std::io::Error::from_raw_os_error(
                    libc::ENOMEDIUM,
                )));
            }
            // A child goes with its last active parent.
            if has_active_node_parent(node) || !node.is_active() {
                return Ok(());
            }
            // Root users that may stay give their permissions up (QEMU asks each parent);
            // one that may not refuses the inactivation.
            for u in node.users() {
                if let Some(root) = u.root_parent()
                    && !root.inactivate()
                {
                    return Err(Error::InactivateFailed(std::io::Error::from_raw_os_error(
                        libc::EPERM,
                    )));
                }
            }
            // Whoever still writes keeps the node active.
            if node.cumulative_perms().0.writes() {
                return Err(Error::InactivateFailed(std::io::Error::from_raw_os_error(
                    libc::EPERM,
                )));
            }
            let drained = self.drain(node).await;
            // Everything goes back to the image, as when the node closes. Only what was
            // written since the last flush is flushed: a machine stopping flushed the rest,
            // and an NBD server whose node went inactive first refuses flushes (EPERM).
            node.driver()
                .close(node)
                .await
                .map_err(Error::InactivateFailed)?;
            if node.has_unflushed_writes() {
                node.flush().await.map_err(Error::InactivateFailed)?;
            }
            // The persistent bitmaps just stored are the image's now, not this process's:
            // whoever activates the image next loads them (QEMU releases them too).
            if node.driver().supports_persistent_bitmaps() {
                for b in node.bitmaps() {
                    if b.is_stored() && !b.is_inconsistent() && !b.is_busy() {
                        node.remove_bitmap(&b);
                    }
                }
            }
            node.inactive.set(true);
            drop(drained);
            // What it asks of its children loosens: they can go inactive too.
            let _ = self.propagate(node);
            for c in node.children() {
                self.inactivate_recurse(&c.node()).await?;
            }
            Ok(())
        })
    }

    /// Activates `node`, its children first; the drivers re-read what they cache.
    ///
    /// # Errors
    /// A driver failing to re-read its image.
    pub fn activate<'a>(&'a self, node: &'a Rc<Node>) -> crate::registry::LocalFut<'a, ()> {
        Box::pin(async move {
            // A node its driver gave up stays as it is; QEMU's activation fails without a
            // word (ENOMEDIUM), so the command succeeds.
            if node.is_ejected() {
                return Ok(());
            }
            for c in node.children() {
                self.activate(&c.node()).await?;
            }
            if node.is_active() {
                return Ok(());
            }
            // Its users' permissions (and its image locks) hold again before the driver
            // re-reads its image, which may write to it (a qcow2 header's autoclear bits).
            node.inactive.set(false);
            let reread = match self.propagate(node) {
                Ok(()) => node.driver().invalidate_cache(node).await.map_err(|error| {
                    Error::ActivateFailed {
                        driver: node.driver_name().to_owned(),
                        error,
                    }
                }),
                Err(e) => Err(e),
            };
            if let Err(e) = reread {
                // Inactive again, asking nothing of its image.
                node.inactive.set(true);
                let _ = self.propagate(node);
                return Err(e);
            }
            // Bitmaps that were migrating are stored here again; the image's persistent
            // bitmaps come (back) in, where none of the same name is here already (QEMU
            // skips those as well).
            for b in node.bitmaps() {
                b.set_skip_store(false);
            }
            for b in node.driver().take_initial_bitmaps().into_iter().rev() {
                if node.bitmap(b.name()).is_none() {
                    node.add_bitmap(b);
                }
            }
            for u in node.users() {
                if let Some(root) = u.root_parent() {
                    root.activate()?;
                }
            }
            Ok(())
        })
    }

    /// Activates the top-level nodes and everything below them, walked as QEMU's
    /// `bdrv_activate_all` walks them (`top_level_nodes`): the monitor's nodes that walk
    /// misses stay inactive, as in QEMU (all of them when the last backend's root is a
    /// `-drive`'s), until `blockdev-set-active` names them.
    ///
    /// # Errors
    /// The first node that cannot be activated.
    pub async fn activate_all(&self) -> Result<()> {
        for n in self.top_level_nodes() {
            self.activate(&n).await?;
        }
        Ok(())
    }
}
