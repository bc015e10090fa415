//! The block QMP commands (QEMU: `blockdev.c`, `block/qapi.c`, `block/write-threshold.c`).

use crate::info;
use ferrite_block::Graph;
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};

fn ok() -> Result<QObject, Error> {
    Ok(QDict::new().into())
}

/// `blockdev-add`.
///
/// # Errors
/// As [`Graph::blockdev_add`].
pub async fn qmp_blockdev_add(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    graph.blockdev_add(args).await?;
    ok()
}

/// `blockdev-del`.
///
/// # Errors
/// As [`Graph::blockdev_del`].
pub async fn qmp_blockdev_del(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    graph.blockdev_del(args.str("node-name")?).await?;
    ok()
}

/// `query-named-block-nodes`.
///
/// # Errors
/// A node its driver gave up ("Block device x is ejected").
pub fn qmp_query_named_block_nodes(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    info::named_block_nodes(graph, args.bool_or("flat", false))
}

/// `query-block`.
pub fn qmp_query_block(graph: &Graph) -> QObject {
    info::block_info(graph)
}

/// `query-blockstats`.
pub fn qmp_query_blockstats(graph: &Graph, args: &Args) -> QObject {
    info::blockstats(graph, args.bool_or("query-nodes", false))
}

/// `x-debug-query-block-graph`.
pub fn qmp_x_debug_query_block_graph(graph: &Graph) -> QObject {
    info::debug_graph(graph)
}

/// `block_resize`.
///
/// # Errors
/// An unknown node or what [`Graph::resize`] reports.
pub async fn qmp_block_resize(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    let node = crate::lookup_bs(graph, args.opt_str("device"), args.opt_str("node-name"))?;
    graph.resize(&node, args.i64("size")?).await?;
    ok()
}

/// `block-set-write-threshold`.
///
/// # Errors
/// "Device 'x' not found".
pub fn qmp_block_set_write_threshold(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    let node = graph.lookup_device(args.str("node-name")?)?;
    node.set_write_threshold(args.opt_u64("write-threshold").unwrap_or(0));
    ok()
}

/// `blockdev-reopen`.
///
/// # Errors
/// As [`Graph::reopen`].
pub async fn qmp_blockdev_reopen(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    let list: Vec<Args> = args
        .get("options")
        .and_then(QObject::as_list)
        .unwrap_or(&[])
        .iter()
        .filter_map(|o| o.as_dict().cloned().map(Args::new))
        .collect();
    graph.reopen(&list).await?;
    ok()
}

/// `x-blockdev-change`: adds a child to or removes one from a node whose driver takes any
/// number of children (QEMU's quorum). ferrite has no such driver yet, so after QEMU's
/// checks every node answers as QEMU's other drivers do.
///
/// # Errors
/// QEMU's texts.
pub fn qmp_x_blockdev_change(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    let parent_name = args.str("parent")?;
    let parent = graph.lookup(parent_name)?;
    match (args.opt_str("child"), args.opt_str("node")) {
        (Some(_), Some(_)) => Err(crate::Error::ChildAndNode.into()),
        (None, None) => Err(crate::Error::ChildOrNode.into()),
        (Some(child), None) => {
            let Some(edge) = parent.edge(child) else {
                return Err(crate::Error::NoSuchChild {
                    parent: parent_name.to_owned(),
                    child: child.to_owned(),
                }
                .into());
            };
            match parent.driver().check_remove_child(child) {
                None => Err(crate::Error::CannotRemoveChild(parent.device_or_node_name()).into()),
                Some(Err(text)) => Err(Error::generic(text)),
                Some(Ok(())) => {
                    parent.driver().child_removed(child);
                    let node = edge.node();
                    graph.detach_edge(&edge);
                    // A child opened inline with the parent goes with its edge (QEMU's unref).
                    graph.forget_if_orphan(&node);
                    Ok(QDict::new().into())
                }
            }
        }
        (None, Some(node)) => {
            let Some(new) = graph.find(node) else {
                return Err(crate::Error::BitmapNodeNotFound(node.to_owned()).into());
            };
            match parent.driver().new_child_name() {
                None => Err(crate::Error::CannotAddChild(parent.device_or_node_name()).into()),
                Some(Err(text)) => Err(Error::generic(text)),
                Some(Ok(name)) => {
                    let edge = graph.attach_child(&parent, &new, &name)?;
                    parent.driver().child_added(edge);
                    Ok(QDict::new().into())
                }
            }
        }
    }
}

/// `x-blockdev-set-iothread`: the node and those connected to it move to the iothread
/// (`null`: the main loop), after QEMU's checks; a user that stays in its own iothread (a
/// device) refuses, `force` or not.
///
/// # Errors
/// QEMU's texts: an unknown node or iothread, a node a BlockBackend uses without `force`,
/// a user that refuses the move.
pub fn qmp_x_blockdev_set_iothread(graph: &Graph, args: &Args) -> Result<QObject, Error> {
    let name = args.str("node-name")?;
    let node = graph
        .find(name)
        .ok_or_else(|| ferrite_block::Error::NoSuchNode(name.to_owned()))?;
    if !args.bool_or("force", false) && node.has_backend_user() {
        return Err(crate::Error::NodeHasBackend(name.to_owned()).into());
    }
    let iothread = match args.get("iothread") {
        Some(QObject::String(path)) => Some(
            graph
                .resolve_iothread(path)
                .ok_or_else(|| crate::Error::NoSuchIothread(path.clone()))?,
        ),
        _ => None,
    };
    graph
        .move_to_iothread(&node, iothread.as_deref(), None)
        .map_err(|e| Error::from(crate::Error::from(e)))?;
    Ok(QDict::new().into())
}

/// `blockdev-set-active`: one node (with the children only it keeps active), or all.
///
/// # Errors
/// QEMU's texts: an unknown node, an active parent, a user still writing.
pub async fn qmp_blockdev_set_active(graph: &Graph, args: &Args) -> crate::Result<()> {
    let active = args.bool_or("active", true);
    match args.opt_str("node-name") {
        None if active => Ok(graph.activate_all().await?),
        None => graph.inactivate_all().await.map_err(|e| match e {
            ferrite_block::Error::InactivateFailed(io) => crate::Error::InactivateAllFailed(io),
            other => other.into(),
        }),
        Some(name) => {
            let node = graph
                .find(name)
                .ok_or_else(|| ferrite_block::Error::NoSuchNode(name.to_owned()))?;
            if active {
                Ok(graph.activate(&node).await?)
            } else {
                Ok(graph.inactivate(&node).await?)
            }
        }
    }
}
