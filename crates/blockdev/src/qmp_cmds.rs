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
pub fn qmp_query_named_block_nodes(graph: &Graph, args: &Args) -> QObject {
    info::named_block_nodes(graph, args.bool_or("flat", false))
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
    let device = args.opt_str("device").unwrap_or("");
    let node_name = args.opt_str("node-name").unwrap_or("");
    // A storage daemon has no named block devices: only node names can match.
    let node = if device.is_empty() {
        graph.find(node_name)
    } else {
        None
    };
    let node = node.ok_or_else(|| {
        Error::from(crate::Error::NotFound {
            device: device.to_owned(),
            node: node_name.to_owned(),
        })
    })?;
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
