//! Nodes coming and going (QEMU: `bdrv_open`, `bdrv_close`, `blockdev-del`): nodes added by
//! the monitor, nodes opened for a command's own use, implicit nodes that go with their last
//! user, and closing everything at exit.

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use ferrite_qapi::Args;
use std::rc::Rc;

/// What closing a node writes back first.
#[derive(Clone, Copy)]
enum Flush {
    /// The node, and through it everything below it.
    Subtree,
    /// Only the nodes that go with it (a filter dropped from the graph).
    BelowOnly,
}

impl Graph {
    /// `blockdev-add`: opens a node (and any inline children) from checked `BlockdevOptions`.
    ///
    /// # Errors
    /// A missing, malformed or duplicate node name, an unknown child, or the driver failing.
    pub async fn blockdev_add(&self, opts: &Args) -> Result<Rc<Node>> {
        if opts.opt_str("node-name").is_none() {
            return Err(Error::RootNodeNameMissing);
        }
        let node = self.open(opts).await?;
        self.monitor_owned.borrow_mut().push(node.name.clone());
        Ok(node)
    }

    /// Puts an opened node in the creation order, at `position` or last.
    pub(crate) fn insert_node(&self, node: Rc<Node>, position: Option<usize>) {
        let mut nodes = self.nodes.borrow_mut();
        let at = position.unwrap_or(nodes.len()).min(nodes.len());
        nodes.insert(at, node);
    }

    /// Opens a node from inline options for a command's own use (`blockdev-create`'s
    /// `file`); [`Graph::release_inline`] deletes it again.
    ///
    /// # Errors
    /// As `blockdev-add`.
    pub async fn open_inline(&self, opts: &Args) -> Result<Rc<Node>> {
        self.open(opts).await
    }

    /// Opens the image file `path` names (a protocol prefix such as `nbd:` or `json:` is
    /// understood) for a command's own use, as QEMU's `bdrv_open` of a file name: a node of
    /// `format` (probed from the image when `None`) over the protocol node, or just the
    /// protocol node when `format` is a protocol driver. `extra` options go on the top node.
    ///
    /// # Errors
    /// An unknown format, the probe or the open failing.
    pub async fn open_image(
        &self,
        path: &str,
        format: Option<&str>,
        extra: ferrite_qobject::QDict,
    ) -> Result<Rc<Node>> {
        let probed = format.is_none();
        let format = match format {
            Some(f) => f.to_owned(),
            None => self.probe_image(path).await?.to_owned(),
        };
        let factory = self
            .registry()
            .get(&format)
            .ok_or_else(|| Error::UnknownDriver(format.clone()))?;
        // A protocol (or a filter QEMU opens as one) named as the format reads the name
        // itself, or takes it as its `filename` option. Otherwise the image's file is found
        // by the name's protocol.
        let reads_name = factory.opens_as_protocol() && !path.starts_with("json:");
        let file = if reads_name {
            factory.read_name(path)?
        } else {
            crate::filename::known_protocol_options(path)?
        };
        // A `json:` name describes the node itself (its format too): the options merge,
        // the format given winning (QEMU's `bdrv_fill_options`).
        let describes_format = path.starts_with("json:")
            && file
                .get("driver")
                .and_then(|d| d.as_str())
                .and_then(|d| self.registry().get(d))
                .is_some_and(|f| f.kind() != crate::DriverKind::Protocol);
        let mut opts = if describes_format || factory.opens_as_protocol() {
            file.with("driver", format.as_str())
        } else {
            ferrite_qobject::QDict::new()
                .with("driver", format.as_str())
                .with("file", file)
        };
        for (k, v) in extra {
            opts.insert(k, v);
        }
        let node = self.open_inline(&Args::new(opts)).await?;
        if probed {
            self.opened_probed(&node);
        }
        Ok(node)
    }

    /// Opens a job's target image `path` as `format` says (see
    /// [`Graph::job_target_format`]), marked as probed when it was.
    ///
    /// # Errors
    /// As [`Graph::open_image`].
    pub async fn open_job_target(
        &self,
        path: &str,
        format: &crate::TargetFormat,
        extra: ferrite_qobject::QDict,
    ) -> Result<Rc<Node>> {
        let node = self.open_image(path, Some(&format.name), extra).await?;
        if format.probed {
            self.opened_probed(&node);
        }
        Ok(node)
    }

    /// `node` was opened with a probed format: a writable raw node says what that costs
    /// (QEMU's warning, on standard error) and guards its first sector.
    pub fn opened_probed(&self, node: &Node) {
        node.set_probed();
        if node.driver_name() == "raw" && !node.is_read_only() {
            let file = node.child("file").map(|f| f.filename()).unwrap_or_default();
            eprintln!(
                "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
                 Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                 Specify the 'raw' format explicitly to remove the restrictions."
            );
        }
    }

    /// Deletes a node opened with [`Graph::open_inline`] once nothing uses it.
    pub fn release_inline(&self, node: &Rc<Node>) {
        self.forget_if_orphan(node);
    }

    /// As [`Graph::release_inline`] for a node that may have written: it is closed (caches
    /// written back, image marked clean) before it goes.
    pub async fn close_inline(&self, node: &Rc<Node>) {
        self.close_if_orphan(node, Flush::Subtree).await;
    }

    /// As [`Graph::close_inline`] for a filter taken out of the graph: not flushed itself
    /// (nothing above it needs its writes made durable, and in QEMU a filter with no
    /// parents keeps no write permission to flush through), but the nodes only it used
    /// (a drive-backup's target) are written back and closed with it.
    pub(crate) async fn close_dropped_filter(&self, filter: &Rc<Node>) {
        self.close_if_orphan(filter, Flush::BelowOnly).await;
    }

    async fn close_if_orphan(&self, node: &Rc<Node>, flush: Flush) {
        // One no longer in the graph went with its parent, closed already.
        if !self.is_monitor_owned(node)
            && node.users().is_empty()
            && self.find(&node.name).is_some_and(|n| Rc::ptr_eq(&n, node))
        {
            self.close_subtree(node, flush).await;
            self.forget_if_orphan(node);
        }
    }

    /// Whether `child` was opened with its one parent (inline) and goes with it: nothing
    /// else uses it and the user did not add it.
    pub(crate) fn goes_with_parent(&self, child: &Node) -> bool {
        !self.is_monitor_owned(child) && child.users().len() == 1
    }

    /// Whether the monitor added `node` (`blockdev-add`) and holds it for the user.
    pub fn is_monitor_owned(&self, node: &Node) -> bool {
        self.monitor_owned.borrow().contains(&node.name)
    }

    /// The top-level nodes, each once, as QEMU's `bdrv_first`/`bdrv_next` walk them: the
    /// roots of the `BlockBackend`s in their order, then the nodes the monitor added that
    /// no backend uses. QEMU goes on through the monitor's nodes from where the last root
    /// stands in that list, so when there are roots it reaches only the monitor's nodes
    /// added after the last root, and none if that root is not one of the monitor's (a
    /// `-drive`'s): a VM snapshot leaves those images out, and so does ferrite's.
    pub fn top_level_nodes(&self) -> Vec<Rc<Node>> {
        let mut out: Vec<Rc<Node>> = Vec::new();
        for node in self.backends().iter().filter_map(|b| b.node()) {
            if !out.iter().any(|n| Rc::ptr_eq(n, &node)) {
                out.push(node);
            }
        }
        let owned = self.monitor_owned.borrow().clone();
        let from = match out.last() {
            None => 0,
            Some(last) => match owned.iter().position(|n| *n == last.name) {
                Some(i) => i + 1,
                None => owned.len(),
            },
        };
        for node in owned[from..].iter().filter_map(|name| self.find(name)) {
            if !node.has_backend_user() && !out.iter().any(|n| Rc::ptr_eq(n, &node)) {
                out.push(node);
            }
        }
        out
    }

    /// Deletes an implicitly created node that nothing uses any more.
    pub fn forget_if_orphan(&self, node: &Rc<Node>) {
        if !self.is_monitor_owned(node)
            && node.users().is_empty()
            && self.find(&node.name).is_some_and(|n| Rc::ptr_eq(&n, node))
        {
            self.remove(node);
        }
    }

    /// `blockdev-del`.
    ///
    /// # Errors
    /// Unknown node, a node not added by `blockdev-add`, or one still in use.
    pub async fn blockdev_del(&self, name: &str) -> Result<()> {
        let node = self
            .find(name)
            .ok_or_else(|| Error::NoSuchNode(name.to_owned()))?;
        // QEMU's order: used by a device or export, blocked, not the monitor's, used.
        if node.has_backend_user() {
            return Err(Error::InUseByRoot(name.to_owned()));
        }
        self.check_op(&node, crate::BlockOp::DriveDel)?;
        if !self.is_monitor_owned(&node) {
            return Err(Error::NotMonitorOwned(name.to_owned()));
        }
        if !node.users().is_empty() {
            return Err(Error::InUse(name.to_owned()));
        }
        self.monitor_owned.borrow_mut().retain(|n| n != name);
        let drained = self.drain(&node).await;
        self.close_subtree(&node, Flush::Subtree).await;
        drop(drained);
        // QEMU detaches the children under the graph's write lock, which drains every
        // node: running jobs pause and resume around it, whatever nodes they use.
        let everything = self.drain_all().await;
        self.remove(&node);
        drop(everything);
        Ok(())
    }

    /// Takes a node out of the graph, releasing its children (deleting inline ones).
    fn remove(&self, node: &Rc<Node>) {
        self.nodes.borrow_mut().retain(|n| !Rc::ptr_eq(n, node));
        let children = node.children();
        for c in children {
            let child = c.node();
            self.detach_edge(&c);
            self.forget_if_orphan(&child);
        }
    }

    /// Writes a node's cached state back before it goes (`bdrv_close`), and ends its
    /// connections.
    pub(crate) async fn close_node(&self, node: &Rc<Node>) {
        // An inactive node wrote everything back already and may not write any more.
        if node.is_active()
            && let Err(e) = node.driver.close(node).await
        {
            tracing::warn!(node = node.name(), error = %e, "closing failed");
        }
        if let Err(e) = node.driver.disconnect(node).await {
            tracing::debug!(node = node.name(), error = %e, "disconnecting failed");
        }
    }

    /// Flushes `node` (as `flush` says) and closes it with the implicitly created nodes
    /// below it that go with it (only it uses them), parents before children: an image
    /// opened inline under a filter writes its caches back too (QEMU's `bdrv_close` flushes
    /// and closes each node whose last reference goes).
    async fn close_subtree(&self, node: &Rc<Node>, flush: Flush) {
        let mut closing = vec![node.clone()];
        while let Some(n) = closing.pop() {
            let top = Rc::ptr_eq(&n, node);
            // Flushing the top node flushes what is below it.
            let flushed = match flush {
                Flush::Subtree => top,
                Flush::BelowOnly => !top,
            };
            if flushed && n.is_active() {
                // As QEMU's close, a failed flush does not stop the node from going.
                let _ = n.flush().await;
            }
            self.close_node(&n).await;
            for c in n.children() {
                let child = c.node();
                if self.goes_with_parent(&child) {
                    closing.push(child);
                }
            }
        }
    }

    /// Closes every node, parents before children (daemon exit, after the flush).
    pub async fn close_all(&self) {
        if self.closed.replace(true) {
            return;
        }
        for node in self.nodes().iter().rev() {
            self.close_node(node).await;
        }
    }

    /// Flushes every node, parents before children (daemon exit).
    pub async fn flush_all(&self) {
        for node in self.nodes().iter().rev().filter(|n| n.is_active()) {
            if let Err(e) = node.flush().await {
                tracing::warn!(node = node.name(), error = %e, "flush at exit failed");
            }
        }
    }
}
