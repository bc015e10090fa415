//! `drive-mirror`'s target: an image file ferrite creates (mode `absolute-paths`, backed by
//! what the mirror does not copy) or one that exists, opened for the job (QEMU:
//! `qmp_drive_mirror`).

use super::{BackingMode, TargetKind, start_mirror};
use crate::backup::create_target;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::manager::JobManager;
use ferrite_block::{BlockOp, Graph, Node, TargetFormat};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// `drive-mirror` of `source` (a root node).
///
/// # Errors
/// QEMU's texts; the target's creation or opening failing.
pub async fn start_drive_mirror(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
    source: Rc<Node>,
) -> Result<Rc<Job>> {
    // Checked before a target is made for nothing.
    graph.check_op(&source, BlockOp::MirrorSource)?;
    let existing = args.opt_str("mode") == Some("existing");
    let format = match args.opt_str("format") {
        Some(f) => Some(f.to_owned()),
        None if existing => None,
        None => Some(source.driver_name().to_owned()),
    };
    let mut sync = args.str("sync")?.to_owned();
    let mut target_backing = source.skip_filters().child("backing");
    if target_backing.is_none() && sync == "top" {
        sync = "full".to_owned();
    }
    if sync == "none" {
        target_backing = Some(source.clone());
    }
    if args.opt_str("replaces").is_some() && args.opt_str("node-name").is_none() {
        return Err(Error::ReplacesWithoutNodeName);
    }
    let file = args.str("target")?;
    if !existing {
        let format = format.as_deref().unwrap_or("raw");
        let backing = match (&target_backing, sync.as_str()) {
            (Some(b), "top" | "none") => Some(b.clone()),
            _ => None,
        };
        create_target(graph, &source, file, format, backing.as_deref(), false).await?;
    }
    let target = open_target(
        graph,
        &source,
        file,
        format.as_deref(),
        args.opt_str("node-name"),
    )
    .await?;
    // A new image reads as zeroes already; an existing one is zeroed where the source is.
    let how = TargetKind {
        backing_mode: if existing {
            BackingMode::OpenChain
        } else {
            BackingMode::SourceChain
        },
        zero_target: sync == "full" && existing,
        drop_target: true,
    };
    let args = Args::new(args.as_dict().clone().with("sync", sync.as_str()));
    let r = start_mirror(jobs, graph, &args, source, target.clone(), how).await;
    if r.is_err() {
        graph.close_inline(&target).await;
    }
    r
}

/// Opens the target image without its backing file (the job decides it at the end).
async fn open_target(
    graph: &Rc<Graph>,
    source: &Node,
    file: &str,
    format: Option<&str>,
    node_name: Option<&str>,
) -> Result<Rc<Node>> {
    let format = match format {
        Some(f) => TargetFormat::given(f),
        None => graph.job_target_format(source, file).await?,
    };
    let mut extra = QDict::new();
    if graph
        .registry()
        .get(&format.name)
        .is_some_and(|f| f.supports_backing())
    {
        extra.insert("backing", QObject::Null);
    }
    extra.insert_opt("node-name", node_name);
    let target = graph.open_job_target(file, &format, extra).await?;
    // Opened without its backing; the one it gets is the one its image names or the job's.
    target.remove_option("backing");
    Ok(target)
}
