//! The dirty bitmap commands (`block-dirty-bitmap-*`, `x-debug-block-dirty-bitmap-sha256`)
//! with QEMU's checks and texts. Each change returns what undoes it, for transactions.

use crate::error::{Error, Result};
use ferrite_block::Graph;
use ferrite_block::Node;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// Longest bitmap name QEMU accepts (`BDRV_BITMAP_MAX_NAME_SIZE`).
const MAX_NAME: usize = 1023;

/// How to take a change back (a transaction rolling back).
pub type Undo = Box<dyn FnOnce()>;

fn not_found(name: &str) -> Error {
    Error::BitmapNotFound(name.to_owned())
}

/// The node and bitmap `node`/`name` of a command.
///
/// # Errors
/// An unknown node or bitmap.
pub fn lookup(graph: &Graph, node: &str, name: &str) -> Result<(Rc<Node>, Rc<DirtyBitmap>), Error> {
    // A drive's name first, then a node's (QEMU's `bdrv_lookup_bs(node, node)`).
    let n = graph
        .find_by_backend(node)
        .or_else(|| graph.find(node))
        .ok_or_else(|| Error::BitmapNodeNotFound(node.to_owned()))?;
    let b = n.bitmap(name).ok_or_else(|| not_found(name))?;
    Ok((n, b))
}

/// QEMU's checks before a bitmap is changed or used by an operation.
fn check_usable(b: &DirtyBitmap) -> Result<()> {
    if b.is_busy() {
        return Err(Error::BitmapBusy(b.name().to_owned()));
    }
    if b.is_inconsistent() {
        return Err(Error::BitmapInconsistent(b.name().to_owned()));
    }
    Ok(())
}

/// QEMU's checks before a bitmap is modified: those of [`check_usable`] and that it is
/// not one stored in an image opened read-only (QEMU marks those read-only).
fn check_writable(node: &Node, b: &DirtyBitmap) -> Result<()> {
    if b.is_busy() {
        return Err(Error::BitmapBusy(b.name().to_owned()));
    }
    check_not_read_only(node, b)?;
    check_usable(b)
}

fn check_not_read_only(node: &Node, b: &DirtyBitmap) -> Result<()> {
    if (b.is_persistent() && node.is_read_only()) || b.is_read_only() {
        return Err(Error::BitmapReadOnly(b.name().to_owned()));
    }
    Ok(())
}

/// The granularity a new bitmap gets: the node's cluster size within 4 KiB..64 KiB.
fn default_granularity(node: &Node) -> u64 {
    node.driver()
        .cluster_size()
        .map_or(65536, |c| c.clamp(4096, 65536))
}

/// `block-dirty-bitmap-add`.
///
/// # Errors
/// QEMU's texts for an empty or long name, an unknown node, a bad granularity, a persistent
/// bitmap the node cannot store, and a name already taken.
pub fn add(graph: &Graph, args: &Args) -> Result<Undo> {
    let name = args.str("name")?;
    if name.is_empty() {
        return Err(Error::BitmapNameEmpty);
    }
    let node = graph.lookup(args.str("node")?)?;
    let granularity = match args.opt_i64("granularity") {
        Some(g) if !(512..=1 << 31).contains(&g) || g.count_ones() != 1 => {
            return Err(Error::Granularity);
        }
        Some(g) => g as u64,
        None => default_granularity(&node),
    };
    let persistent = args.bool_or("persistent", false);
    if persistent && !node.driver().supports_persistent_bitmaps() {
        return Err(Error::NoPersistentBitmaps(node.device_or_node_name()));
    }
    if persistent && let Err(why) = node.driver().can_store_bitmap(name, granularity) {
        return Err(Error::CannotPersist {
            name: name.to_owned(),
            node: node.name().to_owned(),
            why,
        });
    }
    // QEMU's order: the format's own limits, then a name taken, then the name's length.
    if node.bitmap(name).is_some() {
        return Err(Error::BitmapExists(name.to_owned()));
    }
    if name.len() > MAX_NAME {
        return Err(Error::BitmapNameTooLong(name.to_owned()));
    }
    if node.is_ejected() {
        return Err(Error::BitmapNodeEjected);
    }
    let b = DirtyBitmap::new(
        name,
        granularity,
        node.len(),
        !args.bool_or("disabled", false),
    );
    b.set_persistent(persistent);
    node.add_bitmap(b.clone());
    Ok(Box::new(move || {
        node.remove_bitmap(&b);
    }))
}

/// `block-dirty-bitmap-remove`.
///
/// # Errors
/// An unknown bitmap, or one in use.
pub fn remove(graph: &Graph, args: &Args) -> Result<Undo> {
    let (node, b) = lookup(graph, args.str("node")?, args.str("name")?)?;
    if b.is_busy() {
        check_usable(&b)?;
    }
    check_not_read_only(&node, &b)?;
    let at = node.remove_bitmap(&b).unwrap_or(0);
    Ok(Box::new(move || node.insert_bitmap(at, b)))
}

/// `block-dirty-bitmap-clear`.
///
/// # Errors
/// An unknown, busy or inconsistent bitmap.
pub fn clear(graph: &Graph, args: &Args) -> Result<Undo> {
    let (node, b) = lookup(graph, args.str("node")?, args.str("name")?)?;
    check_writable(&node, &b)?;
    let before = b.to_bytes();
    b.clear();
    Ok(Box::new(move || b.load_bytes(&before)))
}

/// `block-dirty-bitmap-enable` (`on`) and `-disable`.
///
/// # Errors
/// An unknown, busy or inconsistent bitmap.
pub fn set_enabled(graph: &Graph, args: &Args, on: bool) -> Result<Undo> {
    let (_, b) = lookup(graph, args.str("node")?, args.str("name")?)?;
    check_usable(&b)?;
    let was = b.is_enabled();
    b.set_enabled(on);
    Ok(Box::new(move || b.set_enabled(was)))
}

/// `block-dirty-bitmap-merge`: sources named alone are on `node`; `{node, name}` elsewhere.
///
/// # Errors
/// Unknown bitmaps or nodes, a busy or inconsistent target, sizes that differ.
pub fn merge(graph: &Graph, args: &Args) -> Result<Undo> {
    let node_name = args.str("node")?;
    let (target_node, target) = lookup(graph, node_name, args.str("target")?)?;
    check_writable(&target_node, &target)?;
    let mut sources = Vec::new();
    let list = match args.get("bitmaps") {
        Some(QObject::List(l)) => l.clone(),
        _ => Vec::new(),
    };
    // qemu-storage-daemon 10.0 crashes here; an empty merge is refused instead.
    if list.is_empty() {
        return Err(Error::NothingToMerge);
    }
    for item in &list {
        let src = match item {
            QObject::String(name) => lookup(graph, node_name, name)?.1,
            QObject::Dict(d) => {
                let a = Args::new(d.clone());
                lookup(graph, a.str("node")?, a.str("name")?)?.1
            }
            _ => return Err(Error::InvalidBitmapReference),
        };
        if src.is_inconsistent() {
            check_usable(&src)?;
        }
        if src.len() != target.len() {
            return Err(Error::BitmapsIncompatible);
        }
        sources.push(src);
    }
    let before = target.to_bytes();
    for s in &sources {
        target.merge_from(s);
    }
    Ok(Box::new(move || target.load_bytes(&before)))
}

/// `x-debug-block-dirty-bitmap-sha256`.
///
/// # Errors
/// An unknown bitmap.
pub fn sha256(graph: &Graph, args: &Args) -> Result<QObject> {
    let (_, b) = lookup(graph, args.str("node")?, args.str("name")?)?;
    Ok(QDict::new().with("sha256", b.sha256()).into())
}

/// `dirty-bitmaps` in `BlockDeviceInfo`, newest first; `None` without bitmaps.
pub(crate) fn info(node: &Node) -> Option<QObject> {
    let all = node.listed_bitmaps();
    let list: Vec<QObject> = all
        .iter()
        .map(|b| {
            let mut d = QDict::new();
            if !b.name().is_empty() {
                d.insert("name", b.name());
            }
            d = d
                .with("recording", b.is_recording())
                .with("persistent", b.is_persistent())
                .with("busy", b.is_busy())
                .with("granularity", b.granularity())
                .with("count", b.count());
            if b.is_inconsistent() {
                d.insert("inconsistent", true);
            }
            QObject::Dict(d)
        })
        .collect();
    (!list.is_empty()).then_some(QObject::List(list))
}
