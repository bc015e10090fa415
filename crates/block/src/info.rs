//! What the query commands report about nodes (QEMU: `block/qapi.c`).

use crate::graph::Graph;
use crate::node::{Node, Parent};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// `ImageInfo` for a node; unless `flat`, with its backing chain's (`backing-image`).
pub(crate) fn image_info(node: &Node, flat: bool) -> QDict {
    let mut d = QDict::new()
        .with("virtual-size", node.len())
        .with("filename", node.filename())
        .with("format", node.driver_name());
    if let Some(cs) = node.driver.cluster_size() {
        d.insert("cluster-size", cs);
    }
    if let Some((name, format)) = node.driver.backing_filename() {
        let image = node
            .child("file")
            .map_or_else(|| node.filename(), |f| f.filename());
        if let Ok(full) = crate::filename::backing_path(&image, &name) {
            d.insert("full-backing-filename", full);
        }
        d.insert("backing-filename", name);
        if let Some(f) = format {
            d.insert("backing-filename-format", f);
        }
    }
    let snapshots = node.driver.snapshots_info();
    if !snapshots.is_empty() {
        d.insert(
            "snapshots",
            QObject::List(snapshots.into_iter().map(QObject::Dict).collect()),
        );
    }
    if !flat && let Some(b) = node.child("backing") {
        d.insert("backing-image", image_info(&b, false));
    }
    d.insert("actual-size", allocated_size(node));
    if let Some(fs) = node.driver.format_specific() {
        d.insert("format-specific", fs);
    }
    if node.driver.has_image_info() {
        d.insert("dirty-flag", false);
    }
    d
}

/// Bytes a node occupies on its storage: the driver's own figure, or what its data and
/// metadata children occupy (not its backing chain).
fn allocated_size(node: &Node) -> u64 {
    node.driver.actual_size(node).unwrap_or_else(|| {
        node.children()
            .iter()
            .filter(|c| c.name != "backing" && c.name != "target")
            .map(|c| allocated_size(&c.node))
            .sum()
    })
}

/// `BlockDeviceInfo` for a node (QEMU counts the backing chain only when not `flat`).
pub(crate) fn device_info(node: &Node, flat: bool) -> QDict {
    let mut depth = 0i64;
    if !flat {
        let mut at = node.child("backing");
        while let Some(b) = at {
            depth += 1;
            at = b.child("backing");
        }
    }
    let mut d = QDict::new()
        .with("file", node.filename())
        .with("node-name", node.name())
        .with("ro", node.is_read_only())
        .with("drv", node.driver_name())
        .with("backing_file_depth", depth)
        .with("active", true)
        .with("encrypted", false)
        .with("detect_zeroes", node.detect_zeroes.get().as_str());
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        d.insert(k, 0i64);
    }
    if let Some(b) = node.child("backing") {
        d.insert("backing_file", b.filename());
    }
    if let Some(bitmaps) = crate::bitmap_cmds::info(node) {
        d.insert("dirty-bitmaps", bitmaps);
    }
    d.insert("image", image_info(node, flat));
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
pub(crate) fn named_block_nodes(graph: &Graph, flat: bool) -> QObject {
    graph
        .nodes()
        .iter()
        .rev()
        .map(|n| QObject::Dict(device_info(n, flat)))
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

/// `x-debug-query-block-graph`, numbered and ordered as QEMU does it: root users (block
/// backends) first, then every node in creation order; an id is given when a node or backend
/// is first met, as a vertex or as the child of an edge; both lists come out newest first.
pub(crate) fn debug_graph(graph: &Graph) -> QObject {
    let nodes = graph.nodes();
    let mut ids: Vec<(*const Node, u64)> = Vec::new();
    let mut next = 1u64;
    let mut id_of = |n: &Rc<Node>, next: &mut u64| -> u64 {
        let key = Rc::as_ptr(n);
        if let Some((_, id)) = ids.iter().find(|(k, _)| *k == key) {
            return *id;
        }
        let id = *next;
        *next += 1;
        ids.push((key, id));
        id
    };
    let names =
        |p: crate::perm::Perm| QObject::List(p.names().into_iter().map(QObject::from).collect());
    let edge = |parent: u64, child: u64, name: &str, u: &crate::node::Use| {
        QObject::Dict(
            QDict::new()
                .with("parent", parent)
                .with("child", child)
                .with("name", name)
                .with("perm", names(u.perm))
                .with("shared-perm", names(u.shared)),
        )
    };
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    // Root users, oldest first.
    let mut roots: Vec<(crate::node::Use, Rc<Node>)> = nodes
        .iter()
        .flat_map(|n| {
            n.users()
                .into_iter()
                .filter(|u| matches!(u.parent, Parent::Root(_)))
                .map(move |u| (u, n.clone()))
        })
        .collect();
    roots.sort_by_key(|(u, _)| u.id);
    for (u, n) in &roots {
        let id = next;
        next += 1;
        out_nodes.push(QObject::Dict(
            QDict::new()
                .with("id", id)
                .with("type", "block-backend")
                .with("name", ""),
        ));
        let child = id_of(n, &mut next);
        edges.push(edge(id, child, "root", u));
    }
    for n in &nodes {
        let id = id_of(n, &mut next);
        out_nodes.push(QObject::Dict(
            QDict::new()
                .with("id", id)
                .with("type", "block-driver")
                .with("name", n.name()),
        ));
        for c in n.children() {
            let child = id_of(&c.node, &mut next);
            if let Some(u) = c.node.users().into_iter().find(|u| u.id == c.use_id) {
                edges.push(edge(id, child, &c.name, &u));
            }
        }
    }
    out_nodes.reverse();
    edges.reverse();
    QDict::new()
        .with("nodes", out_nodes)
        .with("edges", edges)
        .into()
}
