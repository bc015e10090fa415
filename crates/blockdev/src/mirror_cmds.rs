//! `blockdev-mirror` and `drive-mirror` (QEMU: blockdev.c's `qmp_blockdev_mirror`,
//! `qmp_drive_mirror`): the source must be a root node; the job itself is
//! `ferrite_jobs::mirror`'s.

use crate::error::{Error, Result};
use ferrite_block::{Graph, Node, VertexKind};
use ferrite_jobs::JobManager;
use ferrite_jobs::mirror::{TargetKind, start_drive_mirror, start_mirror};
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
