//! The block half of VM snapshots (`savevm`, `loadvm`, `delvm`, `snapshot-save` and its
//! kin; QEMU: the `bdrv_all_*` functions of `block/snapshot.c`): which nodes a VM snapshot
//! covers, and taking, finding, loading and deleting its internal snapshot on each of them.
//! The machine's half (its state, its run state) belongs to the front end.
//!
//! Without a device list a VM snapshot covers every top-level node that is inserted and
//! writable and that a `BlockBackend` uses or nothing uses (the monitor's own nodes); with
//! one it covers exactly the nodes named. A node whose format keeps no snapshots hands them
//! to its only child (a filter, or `raw` over an image), as QEMU's fallback does.

use crate::error::{Error, Result};
use ferrite_block::driver::NewSnapshot;
use ferrite_block::{Graph, Node};
use ferrite_qobject::QDict;
use std::rc::Rc;

/// The nodes a VM snapshot looks at: those `devices` names (each is covered), or every
/// top-level node (each covered if [`included`]).
struct Selection {
    nodes: Vec<Rc<Node>>,
    explicit: bool,
}

impl Selection {
    /// QEMU's `bdrv_all_get_snapshot_devices`.
    fn of(graph: &Graph, devices: Option<&[String]>) -> Result<Selection> {
        let Some(devices) = devices else {
            return Ok(Selection {
                nodes: graph.top_level_nodes(),
                explicit: false,
            });
        };
        if devices.is_empty() {
            return Err(Error::VmSnapshotNoDevices);
        }
        let nodes = devices
            .iter()
            .map(|d| {
                graph
                    .find(d)
                    .ok_or_else(|| Error::VmSnapshotNoSuchNode(d.clone()))
            })
            .collect::<Result<_>>()?;
        Ok(Selection {
            nodes,
            explicit: true,
        })
    }

    /// The nodes the snapshot covers.
    fn covered(&self) -> impl Iterator<Item = &Rc<Node>> {
        self.nodes.iter().filter(|n| self.explicit || included(n))
    }
}

/// Whether a VM snapshot without a device list covers `node` (QEMU's
/// `bdrv_all_snapshots_includes_bs`): inserted, writable, and used by a `BlockBackend` or
/// by nothing.
fn included(node: &Node) -> bool {
    !node.is_read_only() && (node.has_backend_user() || node.users().is_empty())
}

/// The node that keeps `node`'s internal snapshots: itself, or down the only child of a
/// node whose format keeps none (QEMU's `bdrv_snapshot_fallback`).
fn keeper(node: &Rc<Node>) -> Option<Rc<Node>> {
    if node.driver().supports_internal_snapshots() {
        return Some(node.clone());
    }
    let mut data = node
        .children()
        .into_iter()
        .filter(|c| c.name() != "backing");
    match (data.next(), data.next()) {
        (Some(only), None) => keeper(&only.node()),
        _ => None,
    }
}

/// Whether `node` can take a snapshot now (QEMU's `bdrv_can_snapshot`): writable, active,
/// and with a node that keeps snapshots.
pub fn can_snapshot(node: &Rc<Node>) -> bool {
    !node.is_read_only() && node.is_active() && keeper(node).is_some()
}

/// How a node is named in the messages: its drive's name, else its node name.
fn label(node: &Node) -> String {
    let device = node.device_name();
    if device.is_empty() {
        node.name().to_owned()
    } else {
        device
    }
}

/// The snapshot of `node` called `name` (QEMU's `bdrv_snapshot_find`: by name only).
pub fn find(node: &Rc<Node>, name: &str) -> Option<QDict> {
    keeper(node)?
        .driver()
        .snapshots_info()
        .into_iter()
        .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(name))
}

/// The snapshots of `node` (none where it cannot keep any).
pub fn list(node: &Rc<Node>) -> Vec<QDict> {
    keeper(node)
        .map(|k| k.driver().snapshots_info())
        .unwrap_or_default()
}

/// Refuses unless every covered node can take a snapshot (QEMU's `bdrv_all_can_snapshot`).
///
/// # Errors
/// "Device 'x' is writable but does not support snapshots", and the device list's errors.
pub fn check_all_can_snapshot(graph: &Graph, devices: Option<&[String]>) -> Result<()> {
    let sel = Selection::of(graph, devices)?;
    match sel.covered().find(|n| !can_snapshot(n)) {
        Some(n) => Err(Error::VmSnapshotUnsupported(label(n))),
        None => Ok(()),
    }
}

/// Whether every covered node has a snapshot called `name` (QEMU's
/// `bdrv_all_has_snapshot`).
///
/// # Errors
/// The device list's errors.
pub fn all_have(graph: &Graph, name: &str, devices: Option<&[String]>) -> Result<bool> {
    let sel = Selection::of(graph, devices)?;
    Ok(sel.covered().all(|n| find(n, name).is_some()))
}

/// Deletes the snapshot called `name` from every covered node that has one (QEMU's
/// `bdrv_all_delete_snapshot`).
///
/// # Errors
/// "Could not delete snapshot 'x' on 'y': ..." for the first node that fails.
pub async fn delete_all(graph: &Graph, name: &str, devices: Option<&[String]>) -> Result<()> {
    let sel = Selection::of(graph, devices)?;
    for node in sel.covered() {
        let (Some(keeper), Some(snap)) = (keeper(node), find(node, name)) else {
            continue;
        };
        let id = snap.get("id").and_then(|i| i.as_str()).map(str::to_owned);
        let drained = graph.drain(&keeper).await;
        let r = keeper
            .driver()
            .snapshot_delete(&keeper, id.as_deref(), Some(name))
            .await;
        drop(drained);
        if r.is_err() {
            return Err(Error::VmSnapshotDelete {
                name: name.to_owned(),
                device: label(node),
            });
        }
    }
    Ok(())
}

/// The node that takes the VM state (QEMU's `bdrv_all_find_vmstate_bs`): the node called
/// `vmstate`, or the first covered node that can take a snapshot.
///
/// # Errors
/// QEMU's texts for a `vmstate` node that is not there or cannot take snapshots, and for
/// no node at all.
pub fn vmstate_node(
    graph: &Graph,
    vmstate: Option<&str>,
    devices: Option<&[String]>,
) -> Result<Rc<Node>> {
    let sel = Selection::of(graph, devices)?;
    for node in &sel.nodes {
        let usable = (sel.explicit || included(node)) && can_snapshot(node);
        match vmstate {
            Some(want) if node.name() == want => {
                return if usable {
                    Ok(node.clone())
                } else {
                    Err(Error::VmStateUnsupported(want.to_owned()))
                };
            }
            None if usable => return Ok(node.clone()),
            _ => {}
        }
    }
    Err(match vmstate {
        Some(want) => Error::VmStateMissing(want.to_owned()),
        None => Error::NoVmStateNode,
    })
}

/// Writes `data` at `pos` of `node`'s VM state area.
///
/// # Errors
/// The image failing.
pub async fn save_vmstate(node: &Rc<Node>, pos: u64, data: Vec<u8>) -> std::io::Result<()> {
    let keeper = keeper(node).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOTSUP))?;
    keeper.driver().save_vmstate(&keeper, pos, data).await
}

/// Reads `len` bytes at `pos` of `node`'s VM state area.
///
/// # Errors
/// The image failing.
pub async fn load_vmstate(node: &Rc<Node>, pos: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let keeper = keeper(node).ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOTSUP))?;
    keeper.driver().load_vmstate(&keeper, pos, len).await
}

/// Takes snapshot `snap` on every covered node; `vmstate` records the VM state's size, the
/// others none (QEMU's `bdrv_all_create_snapshot`).
///
/// # Errors
/// "Could not create snapshot 'x' on 'y'" for the first node that fails.
pub async fn create_all(
    graph: &Graph,
    snap: &NewSnapshot,
    vmstate: &Rc<Node>,
    devices: Option<&[String]>,
) -> Result<()> {
    let sel = Selection::of(graph, devices)?;
    let mut nodes: Vec<&Rc<Node>> = sel.covered().collect();
    if !nodes.iter().any(|n| Rc::ptr_eq(n, vmstate)) {
        nodes.push(vmstate);
    }
    for node in nodes {
        let mine = NewSnapshot {
            vm_state_size: if Rc::ptr_eq(node, vmstate) {
                snap.vm_state_size
            } else {
                0
            },
            ..snap.clone()
        };
        let failed = || Error::VmSnapshotCreate {
            name: snap.name.clone(),
            device: label(node),
        };
        let keeper = keeper(node).ok_or_else(failed)?;
        keeper
            .driver()
            .snapshot_create(&keeper, &mine)
            .await
            .map_err(|_| failed())?;
    }
    Ok(())
}

/// Makes every covered node what its snapshot `name` holds (QEMU's
/// `bdrv_all_goto_snapshot`).
///
/// # Errors
/// "Could not load snapshot 'x' on 'y': ..." for the first node that fails.
pub async fn goto_all(graph: &Graph, name: &str, devices: Option<&[String]>) -> Result<()> {
    let sel = Selection::of(graph, devices)?;
    for node in sel.covered() {
        let failed = |reason: String| Error::VmSnapshotLoad {
            name: name.to_owned(),
            device: label(node),
            reason,
        };
        let Some(keeper) = keeper(node) else {
            return Err(failed("Block driver does not support snapshots".into()));
        };
        if !node.bitmaps().is_empty() || !keeper.bitmaps().is_empty() {
            return Err(failed("Device has active dirty bitmaps".into()));
        }
        match keeper.driver().snapshot_goto(&keeper, name).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(failed(format!(
                    "Failed to load snapshot: {}",
                    ferrite_qapi::os_msg(&std::io::Error::from_raw_os_error(libc::ENOENT))
                )));
            }
            Err(e) => {
                return Err(failed(format!(
                    "Failed to load snapshot: {}",
                    ferrite_qapi::os_msg(&e)
                )));
            }
        }
    }
    Ok(())
}
