//! External snapshots and backing file names: `blockdev-snapshot` (a prepared overlay),
//! `blockdev-snapshot-sync` (ferrite creates the overlay) and `change-backing-file`, with
//! QEMU's checks and texts.

use crate::error::{Error, Result};
use ferrite_block::Node;
use ferrite_block::driver::NewSnapshot;
use ferrite_block::{BlockOp, Graph};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::rc::Rc;

/// The node of `device`/`node-name`: a storage daemon has no devices, so only a node name
/// alone finds anything (QEMU's text names both).
/// An overlay goes only on a node whose drivers are all there.
fn check_inserted(node: &Node) -> Result<()> {
    if node.is_inserted() {
        Ok(())
    } else {
        Err(Error::NoMedium(node.device_or_node_name()))
    }
}

/// QEMU's op blockers for taking a snapshot of `node`: a backing file (also of an overlay
/// an earlier action of the same transaction put on it: QEMU puts it there in the action's
/// prepare step), or a job's node.
fn check_snapshot_allowed(graph: &Graph, node: &Rc<Node>, earlier: &[&Prepared]) -> Result<()> {
    let pending = earlier
        .iter()
        .find(|p| Rc::ptr_eq(&p.node, node))
        .map(|p| p.overlay.clone());
    if let Some(p) = pending {
        return Err(ferrite_block::Error::Busy {
            node: node.name().to_owned(),
            reason: format!("node is used as backing hd of '{}'", p.name()),
        }
        .into());
    }
    Ok(graph.check_op(node, BlockOp::ExternalSnapshot)?)
}

/// Whether images of `format` can have a backing file.
fn supports_backing(graph: &Graph, format: &str) -> bool {
    graph
        .registry()
        .get(format)
        .is_some_and(|f| f.supports_backing())
}

/// The checks on an overlay before it goes on top.
fn check_overlay(graph: &Graph, overlay: &Node) -> Result<()> {
    // A parent that reads it as an image already (not a mirror's write-only target) would
    // see its data change under it.
    if overlay
        .cumulative_perms()
        .0
        .contains(ferrite_block::Perm::CONSISTENT_READ)
    {
        return Err(Error::OverlayInUse);
    }
    if overlay.filtered().is_some() {
        return Err(Error::OverlayIsFilter);
    }
    // A job's node may take a backing file (QEMU checks no op blockers on the overlay:
    // a mirror's target gets its backing chain so before the job completes).
    if overlay.child("backing").is_some() {
        return Err(Error::OverlayHasBacking);
    }
    if !supports_backing(graph, overlay.driver_name()) {
        return Err(Error::OverlayWithoutBacking);
    }
    Ok(())
}

/// An external snapshot checked and its overlay ready, not yet on top (a transaction's
/// action between prepare and commit).
pub struct Prepared {
    node: Rc<Node>,
    overlay: Rc<Node>,
    /// The overlay was opened for this snapshot (`-sync`): deleted again on abort.
    opened_here: bool,
}

impl Prepared {
    /// Puts the overlay on top.
    ///
    /// # Errors
    /// A permission conflict.
    pub async fn commit(&self, graph: &Graph) -> Result<()> {
        // An active overlay over an inactive image goes inactive with it, as QEMU keeps
        // allowing it (a VM snapshot by migration to a file, then an external snapshot
        // while the images are inactive).
        if !self.node.is_active() && self.overlay.is_active() {
            graph.inactivate(&self.overlay).await?;
        }
        graph.append_overlay(&self.node, &self.overlay).await?;
        if self.opened_here {
            // The overlay lives as long as something uses it (QEMU drops its own reference).
            graph.release_inline(&self.overlay);
        }
        Ok(())
    }

    /// Drops what prepare opened.
    pub fn abort(&self, graph: &Graph) {
        if self.opened_here {
            graph.release_inline(&self.overlay);
        }
    }
}

/// `blockdev-snapshot` (`sync` false: a prepared overlay) or `blockdev-snapshot-sync`:
/// the checks, and for `-sync` the overlay created (mode `absolute-paths`) or opened;
/// `earlier` are the snapshots a transaction prepared before this one.
///
/// # Errors
/// Unknown nodes, a node that cannot be snapshotted, an overlay that cannot take it, the
/// overlay's creation or opening failing.
pub async fn prepare(
    graph: &Graph,
    args: &Args,
    sync: bool,
    earlier: &[&Prepared],
) -> Result<Prepared> {
    if !sync {
        let node = graph.lookup(args.str("node")?)?;
        check_inserted(&node)?;
        check_snapshot_allowed(graph, &node, earlier)?;
        let overlay = graph.lookup(args.str("overlay")?)?;
        check_overlay(graph, &overlay)?;
        return Ok(Prepared {
            node,
            overlay,
            opened_here: false,
        });
    }
    let node = crate::lookup_bs(graph, args.opt_str("device"), args.opt_str("node-name"))?;
    check_inserted(&node)?;
    check_snapshot_allowed(graph, &node, earlier)?;
    let file = args.str("snapshot-file")?.to_owned();
    let new_name = args.opt_str("snapshot-node-name");
    if args.has("node-name") && new_name.is_none() {
        return Err(Error::OverlayNameMissing);
    }
    // A drive's name counts too, where it has a medium (QEMU's `bdrv_lookup_bs`).
    if let Some(n) = new_name
        && graph.lookup(n).is_ok()
    {
        return Err(Error::OverlayNameInUse);
    }
    let format = args.opt_str("format").unwrap_or("qcow2");
    // An existing overlay is judged once open, as `blockdev-snapshot` judges one.
    if args.opt_str("mode") != Some("existing") {
        create_overlay(graph, &node, &file, format, true).await?;
    }
    let mut opts = QDict::new().with("backing", ferrite_qobject::QObject::Null);
    if let Some(n) = new_name {
        opts.insert("node-name", n);
    }
    // The overlay takes the old top's cache modes (QEMU opens it with the old top's flags).
    let (direct, no_flush) = node.cache_mode();
    if direct || no_flush {
        let cache = QDict::new()
            .with("direct", direct)
            .with("no-flush", no_flush);
        opts.insert("cache", cache);
    }
    // Opened by its name, as QEMU does: the name's protocol under a format, or the name
    // itself for a protocol (an NBD export too).
    let overlay = graph.open_image(&file, Some(format), opts).await?;
    // Opened without its backing: the node goes there.
    overlay.remove_option("backing");
    if let Err(e) = check_overlay(graph, &overlay) {
        graph.release_inline(&overlay);
        return Err(e);
    }
    Ok(Prepared {
        node,
        overlay,
        opened_here: true,
    })
}

/// A new image of `format` over `node`: its size, and (`name_backing`) `node` recorded
/// as its backing file; without, the caller attaches `node` itself (a temporary snapshot,
/// made without a word).
///
/// # Errors
/// The file or the image failing to be made.
pub async fn create_overlay(
    graph: &Graph,
    node: &Node,
    file: &str,
    format: &str,
    name_backing: bool,
) -> Result<()> {
    let backing = name_backing.then_some(node);
    Ok(
        ferrite_jobs::backup::create_target(graph, node, file, format, backing, !name_backing)
            .await?,
    )
}

/// `change-backing-file`: records a new backing file name in `image-node-name`, a node of
/// `device`'s chain that has a backing file.
///
/// # Errors
/// Unknown nodes, an image without a backing file or outside the chain, the write failing.
pub async fn change_backing_file(graph: &Graph, args: &Args) -> Result<()> {
    let top = crate::job_cmds::root_node(graph, args.str("device")?)?;
    let image = graph.lookup_node(args.str("image-node-name")?)?;
    let Some(backing) = image.child("backing") else {
        return Err(Error::NoBackingFile);
    };
    // The device's blockers speak for its whole chain.
    graph.check_op(&top, BlockOp::Change)?;
    let mut at = Some(top);
    let mut in_chain = false;
    while let Some(n) = at {
        if Rc::ptr_eq(&n, &image) {
            in_chain = true;
            break;
        }
        at = n.child("backing");
    }
    if !in_chain {
        return Err(Error::ImageNotInChain);
    }
    let name = args.str("backing-file")?.to_owned();
    // A read-only image is made writable for the header write only.
    let was_read_only = image.is_read_only();
    if was_read_only {
        graph.set_read_only(&image, false)?;
    }
    let r = image
        .change_backing_file(Some(name), Some(backing.driver_name().to_owned()))
        .await;
    if was_read_only {
        let _ = graph.reopen_read_only(&image).await;
    }
    r.map_err(|error| Error::ChangeBackingFile {
        name: args.str("backing-file").unwrap_or_default().to_owned(),
        error,
    })
}

/// The node of an internal-snapshot command, with QEMU's checks before any change.
fn internal_target(graph: &Graph, device: &str) -> Result<Rc<Node>> {
    let node = crate::job_cmds::root_node(graph, device)?;
    graph.check_op(&node, BlockOp::InternalSnapshot)?;
    if node.is_read_only() {
        return Err(Error::DeviceReadOnly(device.to_owned()));
    }
    // An inactive image cannot take a snapshot now (QEMU: `bdrv_can_snapshot`).
    if !node.driver().supports_internal_snapshots() || !node.is_active() {
        return Err(Error::NoInternalSnapshots {
            format: node.driver_name().to_owned(),
            device: device.to_owned(),
        });
    }
    Ok(node)
}

/// `blockdev-snapshot-internal-sync`: returns the new snapshot's ID (for a transaction to
/// take it back).
///
/// # Errors
/// QEMU's texts for an unknown or read-only node, a format without internal snapshots, an
/// empty or taken name; the image failing.
pub async fn internal_sync(graph: &Graph, args: &Args) -> Result<(Rc<Node>, String)> {
    let device = args.str("device")?;
    let node = internal_target(graph, device)?;
    let name = args.str("name")?;
    if name.is_empty() {
        return Err(Error::SnapshotNameEmpty);
    }
    if node
        .driver()
        .snapshots_info()
        .iter()
        .any(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
    {
        return Err(Error::SnapshotExists {
            name: name.to_owned(),
            device: device.to_owned(),
        });
    }
    let info = node
        .driver()
        .snapshot_create(
            &node,
            &NewSnapshot::now(name, ferrite_block::clock::vm_clock_ns()),
        )
        .await
        .map_err(|e| Error::SnapshotFailed {
            name: name.to_owned(),
            device: device.to_owned(),
            error: e,
        })?;
    let id = info
        .get("id")
        .and_then(|i| i.as_str())
        .unwrap_or_default()
        .to_owned();
    Ok((node, id))
}

/// `blockdev-snapshot-delete-internal-sync`: the deleted snapshot's `SnapshotInfo`.
///
/// # Errors
/// QEMU's texts for an unknown or read-only node, no name and no ID, no such snapshot.
pub async fn delete_internal_sync(graph: &Graph, args: &Args) -> Result<QDict> {
    let device = args.str("device")?;
    let id = args.opt_str("id");
    let name = args.opt_str("name");
    // QEMU's order: the node, a name or an ID, the snapshot found, then the deletion.
    let node = crate::job_cmds::root_node(graph, device)?;
    if id.is_none() && name.is_none() {
        return Err(Error::NameOrIdRequired);
    }
    graph.check_op(&node, BlockOp::InternalSnapshotDelete)?;
    if !node.driver().supports_internal_snapshots() {
        return Err(Error::SnapshotListFailed(
            std::io::Error::from_raw_os_error(libc::ENOTSUP),
        ));
    }
    let field = |s: &QDict, key: &str| s.get(key).and_then(|v| v.as_str()).map(str::to_owned);
    let found = node.driver().snapshots_info().iter().any(|s| {
        id.is_none_or(|id| field(s, "id").as_deref() == Some(id))
            && name.is_none_or(|name| field(s, "name").as_deref() == Some(name))
    });
    if !found {
        return Err(Error::NoSuchSnapshot {
            id: id.unwrap_or("null").to_owned(),
            name: name.unwrap_or("null").to_owned(),
            device: device.to_owned(),
        });
    }
    if node.is_read_only() {
        return Err(Error::SnapshotListRemoveFailed(
            std::io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    let gone = node
        .driver()
        .snapshot_delete(&node, id, name)
        .await
        .map_err(Error::SnapshotDeleteFailed)?;
    gone.ok_or_else(|| Error::NoSuchSnapshot {
        id: id.unwrap_or("null").to_owned(),
        name: name.unwrap_or("null").to_owned(),
        device: device.to_owned(),
    })
}

/// Deletes internal snapshot `id` of `node` (a transaction taking one back).
///
/// # Errors
/// The image failing.
pub async fn delete_internal_by_id(node: &Node, id: &str) -> std::io::Result<()> {
    node.driver()
        .snapshot_delete(node, Some(id), None)
        .await
        .map(|_| ())
}
