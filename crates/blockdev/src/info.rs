//! What the query commands report about nodes (QEMU: `block/qapi.c`).

use ferrite_block::Node;
use ferrite_block::throttle::{BucketKind, ThrottleGroup};
use ferrite_block::{BlockBackend, Graph};
use ferrite_block::{Child, VertexKind};
use ferrite_qapi::Error;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// `ImageInfo` for a node; unless `flat`, with its backing chain's (`backing-image`), which
/// leaves out the filters jobs put in that the user never named when `skip_implicit` (what
/// `query-block` shows of a drive).
fn image_info(node: &Node, flat: bool, skip_implicit: bool) -> QDict {
    let mut d = QDict::new()
        .with("virtual-size", node.len())
        .with("filename", node.filename())
        .with("format", node.driver_name());
    // A filter has no cluster size or dirty flag of its own: the node below its filters
    // answers (QEMU's `bdrv_get_info`).
    let below_filters = node.filtered().map(|f| f.skip_filters());
    let info = below_filters.as_deref().unwrap_or(node);
    // raw asks its file (QEMU's `raw_get_info`): a qcow2 image below gives its cluster size
    // and dirty flag.
    let file = info
        .child("file")
        .filter(|_| info.driver().image_info_from_file());
    let answering: &Node = file.as_deref().unwrap_or(info);
    if let Some(cs) = answering.driver().cluster_size() {
        d.insert("cluster-size", cs);
    }
    if let Some((name, format)) = node.driver().backing_filename() {
        let image = node
            .child("file")
            .map_or_else(|| node.filename(), |f| f.filename());
        if let Ok(full) = ferrite_block::filename::backing_path(&image, &name) {
            d.insert("full-backing-filename", full);
        }
        d.insert("backing-filename", name);
        if let Some(f) = format {
            d.insert("backing-filename-format", f);
        }
    }
    let snapshots = node.driver().snapshots_info();
    if !snapshots.is_empty() {
        d.insert(
            "snapshots",
            QObject::List(snapshots.into_iter().map(QObject::Dict).collect()),
        );
    }
    // A filter's child counts as its backing image here, as in QEMU's query.
    if !flat && let Some(b) = node.below() {
        let b = if skip_implicit {
            b.skip_implicit_filters()
        } else {
            b
        };
        d.insert("backing-image", image_info(&b, false, skip_implicit));
    }
    d.insert_opt("actual-size", node.allocated_file_size());
    if let Some(fs) = node.driver().format_specific() {
        d.insert("format-specific", fs);
    }
    if answering.driver().has_image_info() {
        d.insert("dirty-flag", answering.driver().dirty_flag());
    }
    if node.driver().is_encrypted() {
        d.insert("encrypted", true);
    }
    d
}

/// The I/O limits `query-block` reports for a drive: the averages always (0 when
/// unthrottled), bursts, their lengths, `iops_size` and the group only when set.
fn throttle_info(d: &mut QDict, group: Option<&ThrottleGroup>, averages: bool) {
    const NAMES: [(&str, BucketKind); 6] = [
        ("bps", BucketKind::BpsTotal),
        ("bps_rd", BucketKind::BpsRead),
        ("bps_wr", BucketKind::BpsWrite),
        ("iops", BucketKind::OpsTotal),
        ("iops_rd", BucketKind::OpsRead),
        ("iops_wr", BucketKind::OpsWrite),
    ];
    let limits = group.map(ThrottleGroup::limits).unwrap_or_default();
    if averages {
        for (name, kind) in NAMES {
            d.insert(name, limits.buckets[kind as usize].avg as i64);
        }
        return;
    }
    let Some(group) = group else {
        return;
    };
    for (name, kind) in NAMES {
        let b = limits.buckets[kind as usize];
        if b.max > 0.0 {
            d.insert(format!("{name}_max"), b.max as i64);
        }
    }
    for (name, kind) in NAMES {
        let b = limits.buckets[kind as usize];
        if b.max > 0.0 {
            d.insert(format!("{name}_max_length"), b.burst_length as i64);
        }
    }
    if limits.op_size > 0 {
        d.insert("iops_size", limits.op_size);
    }
    d.insert("group", group.name());
}

/// `BlockDeviceInfo` for a node (QEMU counts the backing chain only when not `flat`); for
/// the medium of `drive`, with the drive's I/O limits and the chain as its user sees it
/// (without implicit filters).
pub(crate) fn device_info(node: &Node, flat: bool, drive: Option<&BlockBackend>) -> QDict {
    let throttle = drive.and_then(BlockBackend::throttle_group);
    let throttle = throttle.as_deref();
    let mut depth = 0i64;
    if !flat {
        // Every layer down the chain counts, a filter's child too (QEMU's
        // `bdrv_filter_or_cow_bs`); a job's implicit filter in a drive's chain (commit's)
        // is not a layer of it.
        let mut at = node.below();
        while let Some(b) = at {
            depth += 1;
            let b = if drive.is_some() {
                b.skip_implicit_filters()
            } else {
                b
            };
            at = b.below();
        }
    }
    let mut d = QDict::new()
        .with("file", node.filename())
        .with("node-name", node.name())
        .with("ro", node.is_read_only())
        .with("drv", node.driver_name())
        .with("backing_file_depth", depth)
        .with("active", node.is_active())
        .with("encrypted", node.driver().is_encrypted())
        .with("detect_zeroes", node.detect_zeroes().as_str());
    throttle_info(&mut d, throttle, true);
    if let Some(b) = node.child("backing")
        && node.driver().filtered_child() != Some("backing")
    {
        d.insert("backing_file", b.filename());
    }
    if let Some(bitmaps) = crate::bitmap_cmds::info(node) {
        d.insert("dirty-bitmaps", bitmaps);
    }
    d.insert("image", image_info(node, flat, drive.is_some()));
    throttle_info(&mut d, throttle, false);
    d.insert(
        "cache",
        QDict::new()
            .with("writeback", drive.is_none_or(BlockBackend::write_cache))
            .with("direct", node.cache_mode().0)
            .with("no-flush", node.cache_mode().1),
    );
    d.insert("write_threshold", node.write_threshold());
    d
}

/// `query-block`: the backends that have a name or a device, in creation order, with their
/// device's view (removable medium, I/O status) and the node inserted.
pub(crate) fn block_info(graph: &Graph) -> QObject {
    graph
        .backends()
        .iter()
        .filter(|b| !b.name().is_empty() || b.device().is_some())
        .map(|b| {
            let medium = b.medium();
            let mut d = QDict::new().with("device", b.name());
            if let Some(dev) = b.device() {
                d.insert("qdev", dev);
            }
            d.insert("type", "unknown");
            // A drive without a device could take any medium (QEMU says removable); a tray
            // is only reported for a device that has one.
            d.insert("removable", medium.removable || b.device().is_none());
            d.insert("locked", medium.locked);
            if medium.has_tray {
                d.insert("tray_open", medium.tray_open);
            }
            if b.iostatus_enabled() {
                d.insert("io-status", b.iostatus().as_str());
            }
            if let Some(n) = b.node().filter(|n| !n.is_ejected()) {
                d.insert(
                    "inserted",
                    device_info(&n.skip_implicit_filters(), false, Some(b)),
                );
            }
            QObject::Dict(d)
        })
        .collect::<Vec<_>>()
        .into()
}

/// `query-named-block-nodes`: newest node first, as QEMU lists them.
///
/// # Errors
/// QEMU's "Block device x is ejected" for the first node its driver gave up.
pub(crate) fn named_block_nodes(graph: &Graph, flat: bool) -> Result<QObject, Error> {
    let mut list = Vec::new();
    for n in graph.nodes().iter().rev() {
        if n.is_ejected() {
            return Err(Error::generic(format!(
                "Block device {} is ejected",
                n.name()
            )));
        }
        list.push(QObject::Dict(device_info(n, flat, None)));
    }
    Ok(list.into())
}

/// Node-level `BlockStats`: as in QEMU, the counters belong to backends, so a node shows
/// only how far it was written.
/// `BlockStats` of a node: its file's as its "parent" (QEMU's name); for a drive's medium
/// (`drive_level`), the implicit filters jobs put in are left out and the backing chain
/// (or a filter's child) follows as "backing".
fn block_stats(node: &Rc<Node>, drive_level: bool) -> QDict {
    let node = if drive_level {
        node.skip_implicit_filters()
    } else {
        node.clone()
    };
    let mut stats = ferrite_block::stats::empty();
    stats.insert("wr_highest_offset", node.wr_highest_offset());
    let mut d = QDict::new()
        .with("node-name", node.name())
        .with("stats", stats);
    let filtered = node.driver().filtered_child();
    if let Some(file) = node.child(filtered.unwrap_or("file")) {
        d.insert("parent", block_stats(&file, drive_level));
    }
    if drive_level && let Some(below) = node.child(filtered.unwrap_or("backing")) {
        d.insert("backing", block_stats(&below, drive_level));
    }
    if let Some(ds) = node.driver().driver_stats() {
        d.insert("driver-specific", ds);
    }
    d
}

/// `query-blockstats`: with `query-nodes`, every node in creation order; otherwise the
/// backends with a name or a device (a storage daemon has none), with their accounting.
pub(crate) fn blockstats(graph: &Graph, query_nodes: bool) -> QObject {
    if !query_nodes {
        return graph
            .backends()
            .iter()
            .filter(|b| !b.name().is_empty() || b.device().is_some())
            .map(|b| {
                let mut d = QDict::new().with("device", b.name());
                if let Some(dev) = b.device() {
                    d.insert("qdev", dev);
                }
                let mut stats = b.stats();
                stats.insert(
                    "wr_highest_offset",
                    b.node()
                        .map_or(0, |n| n.skip_implicit_filters().wr_highest_offset()),
                );
                // The medium's node stats, with the drive's accounting as its "stats".
                let mut medium = b.node().map(|n| block_stats(&n, true)).unwrap_or_default();
                if let Some(n) = medium.remove("node-name") {
                    d.insert("node-name", n);
                }
                medium.remove("stats");
                d.insert("stats", stats);
                for (k, v) in medium {
                    d.insert(k, v);
                }
                QObject::Dict(d)
            })
            .collect::<Vec<_>>()
            .into();
    }
    graph
        .nodes()
        .iter()
        .map(|n| QObject::Dict(block_stats(n, false)))
        .collect::<Vec<_>>()
        .into()
}

/// `x-debug-query-block-graph`, numbered and ordered as QEMU does it: backends in creation
/// order, then jobs newest first, then every node in creation order with its children
/// newest first; an id is given when a vertex is first met, as a vertex or as the child of
/// an edge; both lists come out newest first.
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
        |p: ferrite_block::Perm| QObject::List(p.names().into_iter().map(QObject::from).collect());
    let edge = |parent: u64, child: u64, e: &Child| {
        QObject::Dict(
            QDict::new()
                .with("parent", parent)
                .with("child", child)
                .with("name", e.name())
                .with("perm", names(e.perm()))
                .with("shared-perm", names(e.shared())),
        )
    };
    let vertex = |id: u64, kind: &str, name: &str| {
        QObject::Dict(
            QDict::new()
                .with("id", id)
                .with("type", kind)
                .with("name", name),
        )
    };
    let mut out_nodes = Vec::new();
    let mut edges = Vec::new();
    // Root parents and their edges, grouped by parent.
    let mut roots: Vec<(ferrite_block::Vertex, Vec<Rc<Child>>)> = Vec::new();
    for e in nodes.iter().flat_map(|n| n.users()).filter(|e| e.is_root()) {
        let Some(v) = e.root_parent().map(|p| p.vertex()) else {
            continue;
        };
        match roots.iter_mut().find(|(w, _)| w.key == v.key) {
            Some((_, list)) => list.push(e),
            None => roots.push((v, vec![e])),
        }
    }
    let mut backends: Vec<_> = roots
        .iter()
        .filter(|(v, _)| v.kind == VertexKind::BlockBackend)
        .collect();
    backends.sort_by_key(|(v, _)| v.order);
    let mut jobs: Vec<_> = roots
        .iter()
        .filter(|(v, _)| v.kind == VertexKind::BlockJob)
        .collect();
    jobs.sort_by_key(|(v, _)| std::cmp::Reverse(v.order));
    for (v, list) in backends.into_iter().chain(jobs) {
        let id = next;
        next += 1;
        let kind = match v.kind {
            VertexKind::BlockBackend => "block-backend",
            VertexKind::BlockJob => "block-job",
        };
        out_nodes.push(vertex(id, kind, &v.name));
        // A job's edges newest first (QEMU prepends them).
        let mut list = list.clone();
        list.sort_by_key(|e| std::cmp::Reverse(e.id()));
        for e in &list {
            let child = id_of(&e.node(), &mut next);
            edges.push(edge(id, child, e));
        }
    }
    for n in &nodes {
        let id = id_of(n, &mut next);
        out_nodes.push(vertex(id, "block-driver", n.name()));
        for c in n.children().iter().rev() {
            let child = id_of(&c.node(), &mut next);
            edges.push(edge(id, child, c));
        }
    }
    out_nodes.reverse();
    edges.reverse();
    QDict::new()
        .with("nodes", out_nodes)
        .with("edges", edges)
        .into()
}
