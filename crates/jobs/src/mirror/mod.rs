//! Mirror (QEMU: block/mirror.c, and blockdev.c's mirror commands): a job that makes a
//! target node a copy of a source node while the source stays in use, then (on
//! `job-complete`) puts the target in the source's place. Active commit runs on the same
//! engine with the source's backing file as target.
//!
//! - `state`: what the job and its filter share (dirty bitmap, chunks in flight).
//! - `top`: the `mirror_top` filter that sees every write to the source.
//! - `job`: the job's work and its end.
//! - `drive`: `drive-mirror`'s target image.

mod drive;
mod job;
mod state;
mod top;

pub use drive::start_drive_mirror;

use crate::error::{Error, Result};
use crate::job::{ErrorPolicy, Job};
use crate::manager::{JobManager, JobOptions};
use crate::types::{JobType, MirrorCopyMode, MirrorSyncMode};
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{BlockBackend, BlockOp, Graph, Node, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use job::MirrorJob;
pub(crate) use job::{BackingMode, Sync};
use state::Shared;
use std::rc::Rc;
use top::MirrorTopFactory;

/// Everything a mirror-engine job is started with (QEMU: `mirror_start_job`'s arguments).
pub(crate) struct Setup {
    pub(crate) kind: JobType,
    pub(crate) job_id: String,
    pub(crate) source: Rc<Node>,
    pub(crate) target: Rc<Node>,
    pub(crate) replaces: Option<String>,
    pub(crate) sync: Sync,
    pub(crate) base: Option<Rc<Node>>,
    pub(crate) backing_mode: BackingMode,
    pub(crate) zero_target: bool,
    pub(crate) speed: i64,
    /// 0 for the default.
    pub(crate) granularity: u64,
    /// 0 for the default.
    pub(crate) buf_size: i64,
    pub(crate) on_source_error: ErrorPolicy,
    pub(crate) on_target_error: ErrorPolicy,
    pub(crate) unmap: bool,
    pub(crate) filter_node_name: Option<String>,
    pub(crate) copy_mode: MirrorCopyMode,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) base_ro: bool,
    pub(crate) drop_target: bool,
}

/// The bitmap granularity for a target: its cluster size within 4 KiB..64 KiB, 64 KiB if
/// it has none (QEMU: `bdrv_get_default_bitmap_granularity`).
fn default_granularity(target: &Node) -> u64 {
    target
        .driver()
        .cluster_size()
        .filter(|&c| c > 0)
        .map_or(65536, |c| c.clamp(4096, 65536))
}

/// Whether `node` is `of` or in its chain below (filters and backing files).
pub(crate) fn chain_contains(of: &Rc<Node>, node: &Rc<Node>) -> bool {
    let mut at = Some(of.clone());
    while let Some(n) = at {
        if Rc::ptr_eq(&n, node) {
            return true;
        }
        at = n.below();
    }
    false
}

/// The next node of `node`'s chain that holds data below it (its backing file, past
/// filters; QEMU: `bdrv_backing_chain_next`).
pub(crate) fn backing_chain_next(node: &Rc<Node>) -> Option<Rc<Node>> {
    node.skip_filters()
        .child("backing")
        .map(|b| b.skip_filters())
}

/// Starts a mirror-engine job (QEMU: `mirror_start_job`): the filter goes above the
/// source, the job is created and attached to its nodes, and starts.
///
/// # Errors
/// QEMU's texts, in QEMU's order; nothing stays behind on error.
pub(crate) async fn start_job(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    s: Setup,
) -> Result<Rc<Job>> {
    let granularity = match s.granularity {
        0 => default_granularity(&s.target),
        g => g,
    };
    let buf_size = match s.buf_size {
        n if n < 0 => return Err(Error::InvalidBufSize),
        0 => job::DEFAULT_BUF_SIZE,
        n => n as u64,
    };
    if Rc::ptr_eq(&s.source.skip_filters(), &s.target.skip_filters()) {
        return Err(Error::MirrorIntoItself);
    }
    let target_is_backing = chain_contains(&s.source, &s.target);
    let bitmap = DirtyBitmap::new("", granularity, s.source.len(), false);
    let shared = Shared::new(bitmap, s.copy_mode, target_is_backing);
    let mut filter_opts = QDict::new()
        .with("driver", "mirror_top")
        .with("backing", s.source.name());
    filter_opts.insert_opt("node-name", s.filter_node_name.as_deref());
    let filter = graph
        .insert_filter(
            &s.source,
            &Args::new(filter_opts),
            &MirrorTopFactory(shared.clone()),
        )
        .await?;
    if s.filter_node_name.is_none() {
        filter.set_implicit();
    }
    let source_edge = match filter.edge("backing") {
        Some(e) => e,
        None => {
            let _ = graph.remove_filter(&filter).await;
            return Err(Error::FilterLostChildren);
        }
    };
    let mut driver = MirrorJob::new(
        graph.clone(),
        s.kind,
        shared.clone(),
        filter.clone(),
        s.source.clone(),
        source_edge,
        s.target.clone(),
        s.sync,
        s.base.clone(),
    );
    driver.zero_target = s.zero_target;
    driver.unmap = s.unmap;
    driver.buf_size = buf_size.next_multiple_of(granularity);
    driver.backing_mode = s.backing_mode;
    driver.replaces = s.replaces.clone();
    shared.on_source_error.set(s.on_source_error);
    shared.on_target_error.set(s.on_target_error);
    driver.drop_target = s.drop_target;
    driver.base_ro = s.base_ro;
    let driver = Rc::new(driver);
    let created = jobs.create(
        JobOptions {
            id: s.job_id.clone(),
            auto_finalize: s.auto_finalize,
            auto_dismiss: s.auto_dismiss,
            speed: 0,
        },
        driver.clone(),
        None,
    );
    let job = match created {
        Ok(j) => j,
        Err(e) => {
            let _ = graph.remove_filter(&filter).await;
            return Err(e);
        }
    };
    // A commit of the active layer holds the chain down to its base (QEMU freezes it
    // once the job holds the nodes between).
    let attached = attach(graph, &job, &s, &filter, target_is_backing).and_then(|blk| {
        if target_is_backing {
            *driver.frozen.borrow_mut() = Some(graph.freeze_chain(&filter, Some(&s.target))?);
        }
        Ok(blk)
    });
    let blk = match attached {
        Ok(blk) => blk,
        Err(e) => {
            jobs.early_fail(&job);
            job.remove_nodes(graph);
            let _ = graph.remove_filter(&filter).await;
            return Err(e);
        }
    };
    blk.set_queue_requests(false);
    *shared.target.borrow_mut() = Some(blk);
    let reason = job::blocker(s.kind);
    let mut blocked = vec![filter.clone(), s.source.clone(), s.target.clone()];
    if target_is_backing {
        let mut at = s.source.below();
        while let Some(n) = at.filter(|n| !Rc::ptr_eq(n, &s.target)) {
            at = n.below();
            blocked.push(n);
        }
    }
    for n in &blocked {
        graph.block(n, &reason);
    }
    *driver.blocked.borrow_mut() = blocked;
    jobs.run_job(&job);
    // QEMU enters the job before the command returns: what it does before its first wait
    // (a sync that has nothing to copy goes `ready`) happens first.
    tokio::task::yield_now().await;
    Ok(job)
}

/// The job's speed, its way to the target and its edges to its nodes, in QEMU's order.
fn attach(
    graph: &Rc<Graph>,
    job: &Rc<Job>,
    s: &Setup,
    filter: &Rc<Node>,
    target_is_backing: bool,
) -> Result<Rc<BlockBackend>> {
    // The source may not be resized while the job runs.
    job.add_node(
        graph,
        filter,
        "main node",
        Perm::CONSISTENT_READ,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::WRITE,
    )?;
    job.speed
        .set(u64::try_from(s.speed).map_err(|_| Error::NegativeSpeed)?);
    let mut perm = Perm::WRITE;
    let mut shared = Perm::WRITE_UNCHANGED;
    if target_is_backing {
        if s.target.len() < s.source.len() {
            perm |= Perm::RESIZE;
        }
        shared |= Perm::CONSISTENT_READ | Perm::WRITE;
    } else if chain_contains(&s.source, &s.target.skip_filters()) {
        return Err(Error::MirrorToFilterInChain);
    }
    let blk = BlockBackend::new(graph, &s.target, perm, shared)?;
    // A mirror's target may be the NBD export of a migration's destination: the job is
    // drained and the machine stopped when the images are given up, so the target may go
    // inactive with them (QEMU allows it too). A commit's may not.
    if s.kind == JobType::Mirror {
        blk.set_force_allow_inactivate();
    }
    let edges = job
        .add_node(
            graph,
            &s.source,
            "source",
            Perm::empty(),
            Perm::WRITE_UNCHANGED | Perm::WRITE | Perm::CONSISTENT_READ,
        )
        .and_then(|()| job.add_node(graph, &s.target, "target", Perm::empty(), Perm::all()))
        .and_then(|()| {
            if target_is_backing {
                hold_intermediates_from(graph, job, &s.source, &s.target)
            } else {
                Ok(())
            }
        });
    if let Err(e) = edges {
        blk.remove();
        return Err(e);
    }
    Ok(blk)
}

/// The nodes between the top and the base of a commit: they leave the chain, so the job
/// holds them (sharing writes, which the base below needs; consistent reads only on the
/// base's own filters).
pub(crate) fn hold_intermediates_from(
    graph: &Rc<Graph>,
    job: &Rc<Job>,
    top: &Rc<Node>,
    base: &Rc<Node>,
) -> Result<()> {
    let unfiltered_base = base.skip_filters();
    let mut shared = Perm::WRITE_UNCHANGED | Perm::WRITE;
    let mut at = top.below();
    while let Some(n) = at {
        if Rc::ptr_eq(&n, base) {
            break;
        }
        if Rc::ptr_eq(&n.skip_filters(), &unfiltered_base) {
            shared |= Perm::CONSISTENT_READ;
        }
        job.add_node(graph, &n, "intermediate node", Perm::empty(), shared)?;
        at = n.below();
    }
    Ok(())
}

/// What `blockdev-mirror` and `drive-mirror` have in common (QEMU:
/// `blockdev_mirror_common` and `mirror_start`): the arguments checked in QEMU's order,
/// then the job started.
///
/// # Errors
/// QEMU's texts.
pub async fn start_mirror(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
    source: Rc<Node>,
    target: Rc<Node>,
    how: TargetKind,
) -> Result<Rc<Job>> {
    let granularity = args.opt_u64("granularity").unwrap_or(0);
    if granularity != 0 && !(512..=64 << 20).contains(&granularity) {
        return Err(Error::GranularityRange);
    }
    if !granularity.is_power_of_two() && granularity != 0 {
        return Err(Error::GranularityPowerOfTwo);
    }
    graph.check_op(&source, BlockOp::MirrorSource)?;
    graph.check_op(&target, BlockOp::MirrorTarget)?;
    let mut sync = MirrorSyncMode::parse(args.str("sync")?).unwrap_or(MirrorSyncMode::Full);
    if sync == MirrorSyncMode::Top && backing_chain_next(&source).is_none() {
        sync = MirrorSyncMode::Full;
    }
    let replaces = args.opt_str("replaces").map(str::to_owned);
    if let Some(name) = &replaces {
        let to_replace = graph
            .find(name)
            .ok_or_else(|| Error::ReplaceNotFound(name.clone()))?;
        graph.check_op(&to_replace, BlockOp::Replace)?;
        if !job::can_replace(&source, &to_replace) {
            return Err(Error::CannotReplace {
                node: name.clone(),
                source_node: source.name().to_owned(),
            });
        }
        if source.len() != to_replace.len() {
            return Err(Error::ReplaceDifferentSize);
        }
    }
    let sync = match sync {
        MirrorSyncMode::Incremental | MirrorSyncMode::Bitmap => {
            return Err(Error::SyncModeNotSupported(sync.as_str()));
        }
        MirrorSyncMode::Top => Sync::Top,
        MirrorSyncMode::None => Sync::None,
        MirrorSyncMode::Full => Sync::Full,
    };
    let base = match sync {
        Sync::Top => backing_chain_next(&source),
        _ => None,
    };
    let policy = |key| ErrorPolicy::parse(args.opt_str(key));
    let setup = Setup {
        kind: JobType::Mirror,
        job_id: args
            .opt_str("job-id")
            .map_or_else(|| source.device_name(), str::to_owned),
        source,
        target,
        replaces,
        sync,
        base,
        backing_mode: how.backing_mode,
        zero_target: how.zero_target,
        speed: args.opt_i64("speed").unwrap_or(0),
        granularity,
        buf_size: args.opt_i64("buf-size").unwrap_or(0),
        on_source_error: policy("on-source-error"),
        on_target_error: policy("on-target-error"),
        unmap: args.bool_or("unmap", true),
        filter_node_name: args.opt_str("filter-node-name").map(str::to_owned),
        copy_mode: args
            .opt_str("copy-mode")
            .and_then(MirrorCopyMode::parse)
            .unwrap_or(MirrorCopyMode::Background),
        auto_finalize: args.bool_or("auto-finalize", true),
        auto_dismiss: args.bool_or("auto-dismiss", true),
        base_ro: false,
        drop_target: how.drop_target,
    };
    start_job(jobs, graph, setup).await
}

/// How the command came by its target.
pub struct TargetKind {
    /// What the target's backing file becomes at the switch.
    pub(crate) backing_mode: BackingMode,
    /// Whether the target is zeroed first (a `full` mirror to an image that does not read
    /// as zeroes on its own).
    pub(crate) zero_target: bool,
    /// The target was opened for the job and goes with it.
    pub(crate) drop_target: bool,
}

impl TargetKind {
    /// `blockdev-mirror`: a node the user added; `full` zeroes it first.
    pub fn node(args: &Args) -> TargetKind {
        TargetKind {
            backing_mode: BackingMode::Leave,
            zero_target: args.str("sync").ok() == Some("full"),
            drop_target: false,
        }
    }
}
