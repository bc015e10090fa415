//! The commands that start block jobs besides backup (QEMU: blockdev.c's
//! `qmp_blockdev_mirror`, `qmp_drive_mirror`, `qmp_block_stream`, `qmp_block_commit`):
//! their arguments checked in QEMU's order; the jobs themselves are `ferrite_jobs`'.

use crate::error::{Error, Result};
use ferrite_block::{BlockOp, Graph, Node, VertexKind};
use ferrite_jobs::commit::{CommitSetup, is_active, start_active_commit, start_commit};
use ferrite_jobs::mirror::{TargetKind, start_drive_mirror, start_mirror};
use ferrite_jobs::stream::{StreamSetup, start_stream};
use ferrite_jobs::{ErrorPolicy, JobManager};
use ferrite_qapi::Args;
use std::rc::Rc;

/// The node named `name` if nothing but block backends use it (QEMU: `qmp_get_root_bs`).
///
/// # Errors
/// An unknown node, or "Need a root block node".
pub(crate) fn root_node(graph: &Graph, name: &str) -> Result<Rc<Node>> {
    let node = graph.lookup(name)?;
    let root = node.users().iter().all(|u| {
        u.root_parent()
            .is_some_and(|r| r.vertex().kind == VertexKind::BlockBackend)
    });
    if !root {
        return Err(Error::NeedRootNode);
    }
    if !node.is_inserted() {
        return Err(Error::NotInserted);
    }
    Ok(node)
}

/// `blockdev-mirror`.
///
/// # Errors
/// Unknown or non-root nodes, and the job's setup errors.
pub async fn qmp_blockdev_mirror(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
) -> Result<()> {
    let source = root_node(graph, args.str("device")?)?;
    let target = graph.lookup(args.str("target")?)?;
    start_mirror(jobs, graph, args, source, target, TargetKind::node(args)).await?;
    Ok(())
}

/// `drive-mirror`.
///
/// # Errors
/// Unknown or non-root nodes, the target image failing, and the job's setup errors.
pub async fn qmp_drive_mirror(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let source = root_node(graph, args.str("device")?)?;
    start_drive_mirror(jobs, graph, args, source).await?;
    Ok(())
}

/// Whether `node` is `top` or down its chain.
fn in_chain(top: &Rc<Node>, node: &Rc<Node>) -> bool {
    let mut at = Some(top.clone());
    while let Some(n) = at {
        if Rc::ptr_eq(&n, node) {
            return true;
        }
        at = n.below();
    }
    false
}

/// Node `name`, which must be `top` or down its chain (a commit's ends).
/// Checks that `op` may happen on every node from `top` down to `end` (not included;
/// `None`: the bottom of the chain).
fn check_op_down_to(
    graph: &Graph,
    top: &Rc<Node>,
    end: Option<&Rc<Node>>,
    op: BlockOp,
) -> Result<()> {
    let mut at = Some(top.clone());
    while let Some(n) = at {
        if end.is_some_and(|e| Rc::ptr_eq(e, &n)) {
            break;
        }
        graph.check_op(&n, op)?;
        at = n.below();
    }
    Ok(())
}

fn node_in_chain(graph: &Graph, top: &Rc<Node>, name: &str) -> Result<Rc<Node>> {
    let node = graph.lookup_node(name)?;
    if !in_chain(top, &node) {
        return Err(Error::NotInThisChain(name.to_owned()));
    }
    Ok(node)
}

/// The node of `top`'s chain that an image names `name` as its backing file, or whose
/// own file name is `name` (QEMU: `bdrv_find_backing_image`).
pub(crate) fn find_backing_image(top: &Rc<Node>, name: &str) -> Option<Rc<Node>> {
    let mut at = top.skip_filters();
    loop {
        let next = at.child("backing")?.skip_filters();
        let recorded = at.driver().backing_filename().map(|(n, _)| n);
        let image = at
            .child("file")
            .map_or_else(|| at.filename(), |f| f.filename());
        let full = recorded
            .as_deref()
            .and_then(|r| ferrite_block::filename::backing_path(&image, r).ok());
        // A backing node other than the one the image names (overridden by options) is
        // found by its own file name only.
        let named = !at.backing_overridden()
            && (recorded.as_deref() == Some(name) || full.as_deref() == Some(name));
        if next.filename() == name || named {
            return Some(next);
        }
        at = next;
    }
}

/// `block-stream`: its arguments checked in QEMU's order.
///
/// # Errors
/// QEMU's texts.
pub async fn qmp_block_stream(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let (base, base_node, bottom) = (
        args.opt_str("base"),
        args.opt_str("base-node"),
        args.opt_str("bottom"),
    );
    if base.is_some() && base_node.is_some() {
        return Err(Error::Exclusive("base", "base-node"));
    }
    if base.is_some() && bottom.is_some() {
        return Err(Error::Exclusive("base", "bottom"));
    }
    if bottom.is_some() && base_node.is_some() {
        return Err(Error::Exclusive("bottom", "base-node"));
    }
    let device = args.str("device")?;
    let node = graph.lookup(device)?;
    let mut base_bs = None;
    if let Some(b) = base {
        base_bs =
            Some(find_backing_image(&node, b).ok_or_else(|| Error::NotInChain(b.to_owned()))?);
    }
    if let Some(b) = base_node {
        let n = graph.lookup_node(b)?;
        if Rc::ptr_eq(&n, &node) || !in_chain(&node, &n) {
            return Err(Error::NotABackingImage {
                node: b.to_owned(),
                device: device.to_owned(),
            });
        }
        base_bs = Some(n);
    }
    let mut bottom_bs = None;
    if let Some(b) = bottom {
        let n = graph.lookup_node(b)?;
        if n.filtered().is_some() {
            return Err(Error::BottomIsFilter(b.to_owned()));
        }
        if !in_chain(&node, &n) {
            return Err(Error::BottomNotInChain {
                bottom: b.to_owned(),
                device: device.to_owned(),
            });
        }
        bottom_bs = Some(n);
    }
    // Nothing the job would change may be in another's use.
    let end = match &bottom_bs {
        Some(b) => b.below(),
        None => base_bs.clone(),
    };
    check_op_down_to(graph, &node, end.as_ref(), BlockOp::Stream)?;
    if base_bs.is_none() && args.opt_str("backing-file").is_some() {
        return Err(Error::BackingFileWithoutBase);
    }
    let setup = StreamSetup {
        // Without an ID a job is named after its device, which a storage daemon's nodes
        // never have: QEMU then refuses the empty ID.
        job_id: args
            .opt_str("job-id")
            .map_or_else(|| node.device_name(), str::to_owned),
        node,
        base: base_bs,
        bottom: bottom_bs,
        backing_file: args.opt_str("backing-file").map(str::to_owned),
        backing_mask_protocol: args.bool_or("backing-mask-protocol", false),
        speed: args.opt_i64("speed").unwrap_or(0),
        on_error: ErrorPolicy::parse(args.opt_str("on-error")),
        filter_node_name: args.opt_str("filter-node-name").map(str::to_owned),
        auto_finalize: args.bool_or("auto-finalize", true),
        auto_dismiss: args.bool_or("auto-dismiss", true),
    };
    start_stream(jobs, graph, setup).await?;
    Ok(())
}

/// `block-commit`: its arguments checked in QEMU's order; an active commit when `top` is
/// the active layer or written to.
///
/// # Errors
/// QEMU's texts (an unknown device with class `DeviceNotFound`).
pub async fn qmp_block_commit(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let device = args.str("device")?;
    let node = match root_node(graph, device) {
        Ok(n) => n,
        Err(e) if graph.find(device).is_some() => return Err(e),
        Err(_) => return Err(Error::CommitDeviceNotFound(device.to_owned())),
    };
    graph.check_op(&node, BlockOp::CommitSource)?;
    let top = match (args.opt_str("top-node"), args.opt_str("top")) {
        (Some(_), Some(_)) => return Err(Error::NodeAndFile("top")),
        (Some(t), None) => node_in_chain(graph, &node, t)?,
        (None, Some(t)) if node.filename() != t => {
            find_backing_image(&node, t).ok_or_else(|| Error::TopNotFound(t.to_owned()))?
        }
        _ => node.clone(),
    };
    let base = match (args.opt_str("base-node"), args.opt_str("base")) {
        (Some(_), Some(_)) => return Err(Error::NodeAndFile("base")),
        (Some(b), None) => node_in_chain(graph, &top, b)?,
        (None, Some(b)) => {
            find_backing_image(&top, b).ok_or_else(|| Error::NotInChain(b.to_owned()))?
        }
        (None, None) => {
            // The bottom of the chain.
            let mut at = top.skip_filters();
            while let Some(b) = at.child("backing") {
                at = b.skip_filters();
            }
            at
        }
    };
    // Everything from the top down to the base changes.
    let end = base.below();
    check_op_down_to(graph, &top, end.as_ref(), BlockOp::CommitTarget)?;
    if Rc::ptr_eq(&top, &base) {
        return Err(Error::CommitIntoItself);
    }
    let active = is_active(&node, &top);
    if active && args.opt_str("backing-file").is_some() {
        return Err(Error::BackingFileForActive(
            if Rc::ptr_eq(&top.skip_filters(), &node.skip_filters()) {
                "is the active layer"
            } else {
                "has a writer on it"
            },
        ));
    }
    let setup = CommitSetup {
        job_id: args
            .opt_str("job-id")
            .map_or_else(|| node.device_name(), str::to_owned),
        device: node.clone(),
        top: top.clone(),
        base,
        backing_file: args.opt_str("backing-file").map(str::to_owned),
        backing_mask_protocol: args.bool_or("backing-mask-protocol", false),
        speed: args.opt_i64("speed").unwrap_or(0),
        on_error: ErrorPolicy::parse(args.opt_str("on-error")),
        filter_node_name: args.opt_str("filter-node-name").map(str::to_owned),
        auto_finalize: args.bool_or("auto-finalize", true),
        auto_dismiss: args.bool_or("auto-dismiss", true),
    };
    if active {
        start_active_commit(jobs, graph, setup).await?;
    } else {
        // The overlay of the top changes its backing file.
        let mut overlay = node.clone();
        while let Some(n) = overlay.below() {
            if Rc::ptr_eq(&n, &top) {
                break;
            }
            overlay = n;
        }
        graph.check_op(&overlay, BlockOp::CommitTarget)?;
        start_commit(jobs, graph, setup).await?;
    }
    Ok(())
}
