//! What the query commands report about nodes (QEMU: `block/qapi.c`).

use crate::graph::Graph;
use crate::node::{Node, Parent};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// `ImageInfo` for a node.
pub(crate) fn image_info(node: &Node) -> QDict {
    let mut d = QDict::new()
        .with("virtual-size", node.len())
        .with("filename", node.filename())
        .with("format", node.driver_name());
    match node.driver.actual_size(node) {
        Some(a) => d.insert("actual-size", a),
        None => d.insert("actual-size", 0i64),
    }
    if let Some(fs) = node.driver.format_specific() {
        d.insert("format-specific", fs);
    }
    if !node.driver_name().starts_with("null") {
        d.insert("dirty-flag", false);
    }
    d
}

/// `BlockDeviceInfo` for a node.
pub(crate) fn device_info(node: &Node) -> QDict {
    let mut d = QDict::new()
        .with("file", node.filename())
        .with("node-name", node.name())
        .with("ro", node.is_read_only())
        .with("drv", node.driver_name())
        .with("backing_file_depth", 0i64)
        .with("active", true)
        .with("encrypted", false)
        .with("detect_zeroes", node.detect_zeroes.get().as_str());
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        d.insert(k, 0i64);
    }
    d.insert("image", image_info(node));
    d.insert(
        "cache",
        QDict::new()
            .with("writeback", true)
            .with("direct", node.cache_direct)
            .with("no-flush", node.cache_no_flush),
    );
    d.insert("write_threshold", node.write_threshold.get());
    d
}

/// `query-named-block-nodes`: newest node first, as QEMU lists them.
pub(crate) fn named_block_nodes(graph: &Graph) -> QObject {
    graph
        .nodes()
        .iter()
        .rev()
        .map(|n| QObject::Dict(device_info(n)))
        .collect::<Vec<_>>()
        .into()
}

fn block_stats(node: &Rc<Node>) -> QDict {
    let mut d = QDict::new()
        .with("node-name", node.name())
        .with("stats", node.stats.borrow().to_qdict());
    if let Some(ds) = node.driver.driver_stats() {
        d.insert("driver-specific", ds);
    }
    // QEMU calls a node's `file` child its "parent" here.
    if let Some(file) = node.child("file") {
        d.insert("parent", block_stats(&file));
    }
    d
}

/// `query-blockstats`: with `query-nodes`, every node in creation order; otherwise the named
/// block devices, of which a storage daemon has none.
pub(crate) fn blockstats(graph: &Graph, query_nodes: bool) -> QObject {
    if !query_nodes {
        return QObject::List(Vec::new());
    }
    graph
        .nodes()
        .iter()
        .map(|n| QObject::Dict(block_stats(n)))
        .collect::<Vec<_>>()
        .into()
}

/// `x-debug-query-block-graph`.
pub(crate) fn debug_graph(graph: &Graph) -> QObject {
    let nodes = graph.nodes();
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    let id_of = |n: &Rc<Node>| -> u64 {
        nodes
            .iter()
            .position(|m| Rc::ptr_eq(m, n))
            .map_or(0, |i| i as u64 + 1)
    };
    let mut next_root = nodes.len() as u64 + 1;
    for n in nodes.iter().rev() {
        out_nodes.push(QObject::Dict(
            QDict::new()
                .with("id", id_of(n))
                .with("type", "block-driver")
                .with("name", n.name()),
        ));
    }
    for n in nodes.iter().rev() {
        for u in n.users() {
            let (parent, name) = match &u.parent {
                Parent::Node { parent, child } => {
                    (graph.find(parent).map_or(0, |p| id_of(&p)), child.clone())
                }
                Parent::Root(_) => {
                    let id = next_root;
                    next_root += 1;
                    out_nodes.push(QObject::Dict(
                        QDict::new()
                            .with("id", id)
                            .with("type", "block-backend")
                            .with("name", ""),
                    ));
                    (id, "root".to_owned())
                }
            };
            let names = |p: crate::perm::Perm| {
                QObject::List(p.names().into_iter().map(QObject::from).collect())
            };
            edges.push(QObject::Dict(
                QDict::new()
                    .with("parent", parent)
                    .with("child", id_of(n))
                    .with("name", name)
                    .with("perm", names(u.perm))
                    .with("shared-perm", names(u.shared)),
            ));
        }
    }
    QDict::new()
        .with("nodes", out_nodes)
        .with("edges", edges)
        .into()
}
