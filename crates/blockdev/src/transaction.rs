//! `transaction`: actions applied as one. The nodes they name are drained first; each
//! action is prepared in order; the first failure takes back every action already
//! prepared and is the one error reported. Backup jobs start only once all are prepared, and
//! with `completion-mode: grouped` they complete or fail together.

use crate::bitmap_cmds::{self as bm, Undo};
use crate::error::{Error, Result};
use crate::snapshot_cmds;
use ferrite_block::{Drained, Graph};
use ferrite_jobs::backup::{self, Prepared};
use ferrite_jobs::{JobManager, JobTxn};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::rc::Rc;

/// What a prepared action leaves to do: nothing more, a backup to start or a snapshot to
/// put on top (or either to abort).
enum Done {
    Undo(Undo),
    Backup(Prepared),
    Snapshot(snapshot_cmds::Prepared),
    /// An internal snapshot taken (node, ID), deleted again on rollback.
    Internal((Rc<ferrite_block::Node>, String)),
}

/// A command that QEMU runs as a transaction of one action of the same name (its
/// `blockdev_do_action`): `blockdev-backup`, `drive-backup`, `blockdev-snapshot`,
/// `blockdev-snapshot-sync` and `blockdev-snapshot-internal-sync`. Like a transaction, it
/// first drains everything, so running jobs pause and resume.
///
/// # Errors
/// As the action's prepare or commit.
pub async fn qmp_single_action(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    action: &str,
    args: &Args,
) -> Result<(), ferrite_qapi::Error> {
    run(jobs, graph, vec![(action.into(), args.clone())], false)
        .await
        .map_err(Into::into)
}

/// `transaction`.
///
/// # Errors
/// A grouped completion with an action that cannot join it, or the first action's error.
pub async fn qmp_transaction(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
) -> Result<(), ferrite_qapi::Error> {
    let actions = match args.get("actions") {
        Some(QObject::List(l)) => l.clone(),
        _ => Vec::new(),
    };
    let grouped = args
        .dict("properties")
        .and_then(|p| p.opt_str("completion-mode").map(|m| m == "grouped"))
        .unwrap_or(false);
    let mut parsed = Vec::new();
    for a in &actions {
        let QObject::Dict(d) = a else { continue };
        let a = Args::new(d.clone());
        let kind = a.str("type")?.to_owned();
        let data = a
            .dict("data")
            .unwrap_or_else(|| Args::new(Default::default()));
        if grouped && !matches!(kind.as_str(), "blockdev-backup" | "drive-backup") {
            return Err(Error::NotGroupable(kind).into());
        }
        parsed.push((kind, data));
    }
    run(jobs, graph, parsed, grouped).await.map_err(Into::into)
}

/// Prepares `actions` in order on drained nodes, rolls them all back on the first failure,
/// and otherwise commits them.
async fn run(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    parsed: Vec<(String, Args)>,
    grouped: bool,
) -> Result<()> {
    // Everything settles first (QEMU's `bdrv_drain_all`: running jobs pause and resume once),
    // then the nodes the actions name stay drained until the end.
    drop(graph.drain_all().await);
    let _drained = drain_named(graph, &parsed).await;
    let txn = grouped.then(|| Rc::new(JobTxn::default()));
    let mut done: Vec<Done> = Vec::new();
    for (kind, data) in &parsed {
        let snapshots: Vec<&snapshot_cmds::Prepared> = done
            .iter()
            .filter_map(|d| match d {
                Done::Snapshot(s) => Some(s),
                _ => None,
            })
            .collect();
        let r = match kind.as_str() {
            "abort" => Err(Error::Aborted),
            "block-dirty-bitmap-add" => bm::add(graph, data).map(Done::Undo),
            "block-dirty-bitmap-remove" => bm::remove(graph, data).map(Done::Undo),
            "block-dirty-bitmap-clear" => bm::clear(graph, data).map(Done::Undo),
            "block-dirty-bitmap-enable" => bm::set_enabled(graph, data, true).map(Done::Undo),
            "block-dirty-bitmap-disable" => bm::set_enabled(graph, data, false).map(Done::Undo),
            "block-dirty-bitmap-merge" => bm::merge(graph, data).map(Done::Undo),
            "blockdev-backup" => backup::prepare(jobs, graph, data, txn.clone())
                .await
                .map(Done::Backup)
                .map_err(Error::from),
            "drive-backup" => backup::prepare_drive(jobs, graph, data, txn.clone())
                .await
                .map(Done::Backup)
                .map_err(Error::from),
            "blockdev-snapshot-internal-sync" => snapshot_cmds::internal_sync(graph, data)
                .await
                .map(Done::Internal),
            "blockdev-snapshot" => snapshot_cmds::prepare(graph, data, false, &snapshots)
                .await
                .map(Done::Snapshot),
            "blockdev-snapshot-sync" => snapshot_cmds::prepare(graph, data, true, &snapshots)
                .await
                .map(Done::Snapshot),
            other => Err(Error::UnsupportedAction(other.to_owned())),
        };
        match r {
            Ok(d) => done.push(d),
            Err(e) => {
                for d in done.into_iter().rev() {
                    match d {
                        Done::Undo(undo) => undo(),
                        Done::Backup(b) => b.abort(jobs).await,
                        Done::Snapshot(s) => s.abort(graph),
                        Done::Internal((node, id)) => {
                            let _ = snapshot_cmds::delete_internal_by_id(&node, &id).await;
                        }
                    }
                }
                return Err(e);
            }
        }
    }
    // Commit, in order: snapshots go on top, backups start.
    let mut result = Ok(());
    for d in &done {
        match d {
            Done::Backup(b) => b.start(jobs),
            Done::Snapshot(s) => {
                if let Err(e) = s.commit(graph).await {
                    s.abort(graph);
                    result = result.and(Err(e));
                }
            }
            Done::Undo(_) | Done::Internal(_) => {}
        }
    }
    result
}

/// Drains the node each action works on, as QEMU's actions do in their prepare step
/// (backups their source, snapshots the node that gets an overlay or a snapshot): no
/// write lands on it between two actions. Bitmap actions do not wait, so nothing can.
async fn drain_named(graph: &Graph, actions: &[(String, Args)]) -> Vec<Drained> {
    let mut nodes: Vec<Rc<ferrite_block::Node>> = Vec::new();
    for (kind, data) in actions {
        if let Some(node) = drained_node(graph, kind, data)
            && !nodes.iter().any(|x| Rc::ptr_eq(x, &node))
        {
            nodes.push(node);
        }
    }
    let mut held = Vec::new();
    for node in nodes {
        held.push(graph.drain(&node).await);
    }
    held
}

/// The node action `kind` drains, found as the action finds it: an action that fails its
/// lookup (a missing node, no root where it wants one, a node without a driver where it
/// checks for one first) fails before it drains anything.
fn drained_node(graph: &Graph, kind: &str, data: &Args) -> Option<Rc<ferrite_block::Node>> {
    let find = |key: &str| data.opt_str(key).and_then(|n| graph.lookup(n).ok());
    match kind {
        "drive-backup" => find("device").filter(|n| !n.is_ejected()),
        "blockdev-backup" => find("target").and(find("device")),
        "blockdev-snapshot-internal-sync" => data
            .opt_str("device")
            .and_then(|n| crate::job_cmds::root_node(graph, n).ok()),
        "blockdev-snapshot-sync" => find("device").or_else(|| find("node-name")),
        "blockdev-snapshot" => find("node"),
        _ => None,
    }
}
