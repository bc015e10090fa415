//! `blockdev-backup`: a point-in-time copy of a node to a target node. A `copy-before-write`
//! filter goes above the source when the job starts, so every write first saves the old
//! contents of the clusters it touches to the target; the job copies the rest in the
//! background (sync `full`, or `top`: only what the top layer allocates) or nothing at all
//! (sync `none`: the target is a fleecing overlay that only receives those old contents).

use crate::error::{Error, Result};
use crate::job::{ErrorPolicy, Job, JobDriver, JobFuture, JobTxn, PhaseFuture};
use crate::manager::{JobManager, JobOptions};
use crate::types::{BitmapSyncMode, JobType, MirrorSyncMode};
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::copy::{BlockCopy, CopyError, MAX_CHUNK};
use ferrite_block::{BlockOp, Child, Graph, Node, Perm, TargetFormat};
use ferrite_drivers::cbw::CbwFactory;
use ferrite_qapi::Args;
use std::cell::RefCell;
use std::rc::Rc;

/// Chunks the background copy keeps in flight unless `x-perf` says otherwise.
const WORKERS: usize = 16;

/// Most buffer memory the background copy's chunks in flight may hold.
const MAX_COPY_MEMORY: u64 = 128 << 20;

/// `x-perf`: how the background copy runs.
struct Perf {
    max_workers: usize,
    /// Largest request in bytes; 0 for the default.
    max_chunk: u64,
    /// As given: the filter judges it when it is made.
    min_cluster_size: Option<u64>,
}

impl Perf {
    /// # Errors
    /// QEMU's texts for values out of range.
    fn parse(perf: Option<Args>) -> Result<Perf> {
        let perf = perf.unwrap_or_else(|| Args::new(ferrite_qobject::QDict::new()));
        let max_workers = match perf.opt_i64("max-workers") {
            None => WORKERS,
            Some(n) if (1..=i64::from(i32::MAX)).contains(&n) => n as usize,
            Some(_) => {
                return Err(Error::MaxWorkers);
            }
        };
        let max_chunk =
            u64::try_from(perf.opt_i64("max-chunk").unwrap_or(0)).map_err(|_| Error::MaxChunk)?;
        Ok(Perf {
            max_workers,
            max_chunk,
            min_cluster_size: perf.opt_u64("min-cluster-size"),
        })
    }

    /// The smallest cluster the copy may use (one the filter will refuse counts for
    /// nothing: the backup goes no further).
    fn min_cluster(&self) -> u64 {
        ferrite_block::copy::min_cluster_size(self.min_cluster_size).unwrap_or(0)
    }

    /// Chunks in flight: `max-workers`, as long as their buffers stay within 128 MiB (QEMU
    /// bounds block-copy memory the same way).
    fn workers(&self, cluster: u64) -> usize {
        let fit = (MAX_COPY_MEMORY / self.chunk(cluster)).max(1);
        self.max_workers
            .min(usize::try_from(fit).unwrap_or(usize::MAX))
    }

    /// The request size for `cluster`-sized clusters: `max-chunk` in whole clusters, at
    /// most a megabyte.
    fn chunk(&self, cluster: u64) -> u64 {
        let limit = if self.max_chunk == 0 {
            MAX_CHUNK
        } else {
            self.max_chunk.min(MAX_CHUNK)
        };
        (limit / cluster * cluster).max(cluster)
    }
}

/// The job's progress: bytes copied, of those plus what is left to copy.
fn report_progress(copy: &BlockCopy, job: &Job) {
    let done = copy.copied();
    job.set_progress(done, done + copy.dirty_bytes());
}

/// Why the target refuses other users while the job runs (QEMU's blocker text).
const BLOCKED: &str = "block device is in use by block job: backup";

/// What to copy in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    Full,
    Top,
    None,
    /// What the user's bitmap marks dirty.
    Bitmap,
}

struct BackupJob {
    graph: Rc<Graph>,
    source: Rc<Node>,
    target: Rc<Node>,
    copy: Rc<BlockCopy>,
    sync: Sync,
    /// The user's bitmap and what to do with it at the end.
    bitmap: Option<UserBitmap>,
    on_source_error: ErrorPolicy,
    on_target_error: ErrorPolicy,
    /// The copy-before-write filter while it is in the graph (it stays while other jobs'
    /// filters come and go above or below it).
    filter: RefCell<Option<Rc<Node>>>,
    /// The filter's edges to the source and the target: the copies go through them.
    source_edge: Rc<Child>,
    target_edge: Rc<Child>,
    /// The target was opened for this job (drive-backup): it goes when the job does.
    drop_target: bool,
    /// Chunks the background copy keeps in flight.
    workers: usize,
    /// Bytes one background request copies (whole clusters).
    chunk: u64,
}

impl BackupJob {
    fn progress(&self, job: &Job) {
        report_progress(&self.copy, job);
    }

    /// For `top`: what the top layer does not allocate is not copied.
    async fn skip_unallocated(&self, job: &Job) -> Result<(), String> {
        let len = self.source.len();
        let mut at = 0;
        while at < len {
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let e = self
                .source
                .block_status(at, len - at)
                .await
                .map_err(|e| ferrite_qapi::os_msg(&e))?;
            if !e.allocated {
                self.copy.skip(at, e.len);
            }
            at += e.len.max(1);
        }
        Ok(())
    }

    async fn copy_all(&self, job: &Job) -> Result<(), String> {
        let cs = self.copy.cluster_size();
        let mut workers: tokio::task::JoinSet<Result<u64, CopyError>> = tokio::task::JoinSet::new();
        let mut next = 0;
        loop {
            // Keep up to `workers` chunks in flight; the block-copy state keeps them (and the
            // guest's copy-before-write) from copying a cluster twice.
            // A job asked to pause lets what it has in flight land first, so that a paused
            // job makes no progress (QEMU cancels its block-copy call and waits for it).
            while workers.len() >= self.workers
                || (self.copy.next_dirty(next).is_none() && !workers.is_empty())
                || (job.pause_requested() && !workers.is_empty())
            {
                match workers.join_next().await {
                    Some(Ok(Ok(_))) => self.progress(job),
                    Some(Ok(Err(e))) => {
                        // What failed stays to copy; the policy says whether to retry, once
                        // for everything in flight (the other chunks fail alike).
                        while workers.join_next().await.is_some() {}
                        self.progress(job);
                        let policy = if e.read {
                            self.on_source_error
                        } else {
                            self.on_target_error
                        };
                        job.io_error(e.read, &e.error, policy).await?;
                        next = 0;
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => break,
                }
            }
            let c = match self.copy.next_dirty(next) {
                Some(c) => c,
                // Retried clusters sit before the cursor.
                None if !self.copy.is_empty() && workers.is_empty() => {
                    next = 0;
                    continue;
                }
                None => break,
            };
            job.pause_point().await;
            if job.is_cancelled() {
                workers.shutdown().await;
                return Ok(());
            }
            // One request per run the source's block status allows, as QEMU's tasks: the
            // rate limit counts what each really moves.
            let clusters = self
                .copy
                .run_at(&self.source_edge, c, self.chunk / cs)
                .await;
            let bytes = (clusters * cs).min(self.copy.len() - c * cs);
            job.rate_limit_before(bytes).await;
            // Chunks finish while the limiter holds the next one back.
            self.progress(job);
            if job.is_cancelled() {
                workers.shutdown().await;
                return Ok(());
            }
            let (copy, source, target) = (
                self.copy.clone(),
                self.source_edge.clone(),
                self.target_edge.clone(),
            );
            let me = job.me.clone();
            workers.spawn_local(ferrite_block::io::background(async move {
                let r = copy.copy(&source, &target, c * cs, bytes).await;
                // Progress counts each chunk as it lands, as QEMU's block-copy callback does;
                // not while the job is paused, which QEMU only is once its copies landed
                // (the job's loop counts them when it runs again).
                if let Some(job) = me.upgrade()
                    && !matches!(
                        job.status(),
                        crate::state::Status::Paused | crate::state::Status::Standby
                    )
                {
                    report_progress(&copy, &job);
                }
                r
            }));
            next = c + clusters;
        }
        self.progress(job);
        // No flush of the target, as in QEMU: one the job opened (drive-backup) is flushed
        // as it closes with the filter, one the user added when the user closes it. Waiting
        // here for the page cache to reach the disk took most of a backup's time.
        Ok(())
    }

    async fn work(&self, job: &Job) -> Result<(), String> {
        self.progress(job);
        match self.sync {
            Sync::None => {
                job.wait_cancelled().await;
                // What the filter copied before writes counts as done.
                self.progress(job);
                Ok(())
            }
            Sync::Top => {
                self.skip_unallocated(job).await?;
                self.progress(job);
                self.copy_all(job).await
            }
            Sync::Full | Sync::Bitmap => self.copy_all(job).await,
        }
    }

    /// The user's bitmap after the job (QEMU's outcome table): only the writes made during
    /// the job when it succeeded (unless `never`) or always; otherwise its old bits plus
    /// those writes, and with `always` also what was not copied.
    fn settle_bitmap(&self, success: bool) {
        let Some((b, mode)) = &self.bitmap else {
            return;
        };
        let replace =
            mode == &BitmapSyncMode::Always || (success && mode != &BitmapSyncMode::Never);
        b.thaw(replace);
        if replace {
            // QEMU deletes the bitmap and gives its name to the successor.
            self.source.replace_bitmap_by_successor(b);
        }
        if *mode == BitmapSyncMode::Always && !success {
            let cs = self.copy.cluster_size();
            let mut next = 0;
            while let Some(c) = self.copy.next_dirty(next) {
                b.set_range(c * cs, cs);
                next = c + 1;
            }
        }
    }

    /// Takes the filter out: the source's users go back to it; the target is free again.
    async fn remove_filter(&self) {
        let filter = self.filter.borrow_mut().take();
        if let Some(f) = filter {
            self.graph.unblock(&self.target, BLOCKED);
            if let Err(e) = self.graph.remove_filter(&f).await {
                tracing::warn!(error = %e, "taking the copy-before-write filter out failed");
            }
            if self.drop_target {
                // Gone with the filter already, unless something else took it meanwhile.
                self.graph.close_inline(&self.target).await;
            }
        }
    }
}

impl JobDriver for BackupJob {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn is_block_job(&self) -> bool {
        true
    }

    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        self.target.cancel_in_flight();
        true
    }

    /// What is to copy is known before the first chunk: the total shows at once.
    fn begin(&self, job: &Job) {
        self.progress(job);
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move { self.work(&job).await })
    }

    fn commit(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move { self.settle_bitmap(true) })
    }

    fn abort(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move { self.settle_bitmap(false) })
    }

    fn clean(self: Rc<Self>, job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move {
            job.remove_nodes(&self.graph);
            self.remove_filter().await;
        })
    }
}

/// A backup whose point in time is set (the filter is in place, the job created) but whose
/// background copy has not started: a transaction's action between prepare and commit.
pub struct Prepared {
    job: Rc<Job>,
}

impl Prepared {
    /// Starts the job.
    pub fn start(&self, jobs: &Rc<JobManager>) {
        jobs.run_job(&self.job);
    }

    /// Takes everything back (a later action of the transaction failed): the job ends
    /// without having started, through its abort and clean phases.
    pub async fn abort(&self, jobs: &Rc<JobManager>) {
        jobs.abort_unstarted(&self.job).await;
    }
}

/// Checks a backup and sets its point in time: a copy-before-write filter above the source,
/// the user's bitmap frozen, the job created (in `txn` when grouped).
///
/// # Errors
/// QEMU's texts for unknown nodes, bitmap options, the same or differently sized source and
/// target, busy nodes, bad job IDs and permission conflicts.
pub async fn prepare(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
    txn: Option<Rc<JobTxn>>,
) -> Result<Prepared> {
    let source = graph.lookup(args.str("device")?)?;
    let target = graph.lookup(args.str("target")?)?;
    prepare_nodes(jobs, graph, args, source, target, false, txn).await
}

/// A backup between two nodes; `drop_target`: the target was opened for this job (drive-
/// backup) and goes away with it.
async fn prepare_nodes(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
    source: Rc<Node>,
    target: Rc<Node>,
    drop_target: bool,
    txn: Option<Rc<JobTxn>>,
) -> Result<Prepared> {
    let (sync, bitmap) = check_sync(args, &source)?;
    let id = args
        .opt_str("job-id")
        .map_or_else(|| source.device_name(), str::to_owned);
    if Rc::ptr_eq(&source, &target) {
        return Err(Error::SameSourceAndTarget);
    }
    for n in [&source, &target] {
        if !n.is_inserted() {
            return Err(Error::NotInserted(n.device_name()));
        }
    }
    let compress = args.bool_or("compress", false);
    if compress && !target.supports_compressed_writes() {
        return Err(Error::CannotCompress(target.device_name()));
    }
    graph.check_op(&source, BlockOp::BackupSource)?;
    graph.check_op(&target, BlockOp::BackupTarget)?;
    let perf = Perf::parse(args.dict("x-perf"))?;
    if source.len() != target.len() {
        return Err(Error::DifferentSizes);
    }
    let cluster = ferrite_block::copy::cluster_size_for(&target).max(perf.min_cluster());
    // The job's ID is judged when the job is created, after the filter (as in QEMU).
    let speed = args.opt_i64("speed").unwrap_or(0);
    let copy = match (&bitmap, sync) {
        (Some((b, _)), Sync::Bitmap) => {
            BlockCopy::new_from_bitmap(source.len(), cluster, compress, b)
        }
        _ => BlockCopy::new(source.len(), cluster, compress),
    };
    copy.set_discard_source(args.bool_or("discard-source", false));
    let mut filter_opts = ferrite_qobject::QDict::new()
        .with("driver", "copy-before-write")
        .with("file", source.name())
        .with("target", target.name());
    filter_opts.insert_opt("node-name", args.opt_str("filter-node-name"));
    if let Some(min) = perf.min_cluster_size {
        // QEMU passes it to the filter as a signed number, which it checks after the
        // filter's name.
        let min = i64::try_from(min).map_err(|_| Error::MinClusterTooLarge(min))?;
        filter_opts.insert("min-cluster-size", min);
    }
    let filter = graph
        .insert_filter_node(
            &source,
            &Args::new(filter_opts),
            &CbwFactory::sharing(copy.clone()),
        )
        .await?;
    // As in QEMU, a chunk below the cluster is refused once the filter is in place, so the
    // filter's own refusals (an inactive source, a taken node name) come first.
    let edges = filter.edge("file").zip(filter.edge("target"));
    let chunk_too_small = perf.max_chunk != 0 && perf.max_chunk < cluster;
    let (Some((source_edge, target_edge)), false) = (edges, chunk_too_small) else {
        let _ = graph.remove_filter(&filter).await;
        return Err(if chunk_too_small {
            Error::MaxChunkBelowCluster {
                max_chunk: perf.max_chunk,
                cluster,
            }
        } else {
            Error::FilterLostChildren
        });
    };
    graph.block(&target, BLOCKED);
    let driver = Rc::new(BackupJob {
        graph: graph.clone(),
        source,
        target: target.clone(),
        copy,
        sync,
        bitmap: bitmap.clone(),
        on_source_error: ErrorPolicy::parse(args.opt_str("on-source-error")),
        on_target_error: ErrorPolicy::parse(args.opt_str("on-target-error")),
        filter: RefCell::new(Some(filter.clone())),
        source_edge,
        target_edge,
        drop_target,
        workers: perf.workers(cluster),
        chunk: perf.chunk(cluster),
    });
    if let Some((b, _)) = &bitmap {
        b.freeze();
    }
    let created = jobs.create(
        JobOptions {
            id,
            auto_finalize: args.bool_or("auto-finalize", true),
            auto_dismiss: args.bool_or("auto-dismiss", true),
            speed: 0,
        },
        driver.clone(),
        txn,
    );
    // A negative speed is refused once the job exists (it announces itself, then goes).
    let created = created.and_then(|job| match u64::try_from(speed) {
        Ok(s) => {
            job.speed.set(s);
            Ok(job)
        }
        Err(_) => {
            jobs.early_fail(&job);
            Err(Error::NegativeSpeed)
        }
    });
    let job = match created {
        Ok(job) => job,
        Err(e) => {
            driver.remove_filter().await;
            // The job never ran: the bitmap is as it was.
            if let Some((b, _)) = &driver.bitmap {
                b.thaw(false);
            }
            return Err(e);
        }
    };
    // The job works on its filter and its target (QEMU's "main node" and "target").
    for (node, name) in [(&filter, "main node"), (&target, "target")] {
        if let Err(e) = job.add_node(graph, node, name, Perm::empty(), Perm::all()) {
            jobs.abort_unstarted(&job).await;
            return Err(e);
        }
    }
    Ok(Prepared { job })
}

/// The user's bitmap of a backup, and its mode.
type UserBitmap = (Rc<DirtyBitmap>, BitmapSyncMode);

/// `drive-backup`: the target is an image file ferrite creates (mode `absolute-paths`, the
/// default) or opens (`existing`); for sync `top` it is backed by the source's backing
/// file, for `none` by the source itself.
///
/// # Errors
/// As `blockdev-backup`, and the target's creation or opening failing.
pub async fn prepare_drive(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
    txn: Option<Rc<JobTxn>>,
) -> Result<Prepared> {
    let source = graph.lookup(args.str("device")?)?;
    if source.is_ejected() {
        return Err(Error::NoMedium);
    }
    // Before the target is made (a concluded stream job not dismissed still blocks its node).
    graph.check_op(&source, BlockOp::BackupSource)?;
    let file = args.str("target")?.to_owned();
    let existing = args.opt_str("mode") == Some("existing");
    // An existing image without a format given opens as the source's flags say; a new one
    // takes the source's format.
    let target_format = match args.opt_str("format") {
        Some(f) => TargetFormat::given(f),
        None if existing => graph.job_target_format(&source, &file).await?,
        None => TargetFormat::given(source.driver_name()),
    };
    let format = target_format.name.clone();
    let mut sync = args.str("sync")?;
    // Without a backing file, `top` is `full` (QEMU's rule for drive-backup).
    if sync == "top" && source.child("backing").is_none() {
        sync = "full";
    }
    let args = &Args::new(args.as_dict().clone().with("sync", sync));
    // Which node the new target is backed by.
    let backing = match sync {
        "none" => Some(source.clone()),
        "top" => source.child("backing"),
        _ => None,
    };
    if !existing {
        create_target(graph, &source, &file, &format, backing.as_deref(), false).await?;
    }
    // A format with backing files opens the target without one, then gets the node.
    let cow = graph
        .registry()
        .get(&format)
        .is_some_and(|f| f.supports_backing());
    let mut extra = if cow {
        ferrite_qobject::QDict::new().with("backing", ferrite_qobject::QObject::Null)
    } else {
        ferrite_qobject::QDict::new()
    };
    // QEMU opens the target with the source's flags: an inactive source's target opens
    // inactive too (and the backup then fails at its filter, which must be active).
    if !source.is_active() {
        extra.insert("active", false);
    }
    let target = graph.open_job_target(&file, &target_format, extra).await?;
    // Opened without its backing; the one it gets is the one its header names.
    target.remove_option("backing");
    // `sync: none` gives the target the source as its backing file whatever its format
    // (QEMU's `bdrv_set_backing_hd`, which refuses a format without backing files).
    if let Some(b) = &backing
        && (cow || sync == "none")
        && let Err(e) = graph.attach_backing(&target, b)
    {
        graph.release_inline(&target);
        return Err(e.into());
    }
    let r = prepare_nodes(jobs, graph, args, source, target.clone(), true, txn).await;
    if r.is_err() {
        graph.release_inline(&target);
    }
    r
}

/// A new image for drive-backup, drive-mirror and external snapshots: `format` over a new
/// file, as big as `source`, backed by `backing` (its file name and format) when given.
/// The image is announced on standard output as QEMU announces what it formats, unless
/// `quiet` (a temporary snapshot).
///
/// # Errors
/// An unknown format or one that cannot create images, the file or image failing.
pub async fn create_target(
    graph: &Graph,
    source: &Node,
    file: &str,
    format: &str,
    backing: Option<&Node>,
    quiet: bool,
) -> Result<()> {
    use ferrite_block::{DriverKind, create};
    use ferrite_qobject::QDict;
    // QEMU's `bdrv_img_create` checks the format, then the protocol the name gives, before
    // it touches anything. A raw image, or a protocol's own (a file, an NBD export, a host
    // device), is just the protocol's part of the right size; other formats need their
    // driver's create step over it.
    let factory = graph
        .registry()
        .get(format)
        .ok_or_else(|| Error::UnknownFileFormat(format.to_owned()))?;
    ferrite_block::filename::known_protocol_options(file)?;
    let plain = format == "raw" || factory.kind() == DriverKind::Protocol;
    let protocol = if factory.kind() == DriverKind::Protocol {
        // A protocol as the format makes the image itself, at the place the name gives: as
        // the driver reads the name if it reads names (NBD), else as the name's protocol
        // does if that is the format.
        let mut location = ferrite_block::filename::protocol_options(file);
        if factory.parse_filename(file).is_some()
            || location.get("driver").and_then(|d| d.as_str()) != Some(format)
        {
            location = QDict::new().with("driver", format).with("filename", file);
        }
        let how = create::by_name_location(graph, location)
            .map_err(|_| Error::CannotCreateFormat(format.to_owned()))?;
        // The name's own protocol must be one that creates (QEMU looks it up regardless).
        create::by_name_protocol(graph, file)?;
        how
    } else {
        if !factory.can_create() && format != "raw" {
            return Err(Error::CannotCreateFormat(format.to_owned()));
        }
        create::by_name_protocol(graph, file)?
    };
    if backing.is_some() && !factory.supports_backing() {
        return Err(Error::BackingUnsupported(format.to_owned()));
    }
    let backing_names = backing.map(|b| (b.filename(), b.driver_name().to_owned()));
    let named = backing_names
        .as_ref()
        .map(|(f, d)| (f.as_str(), d.as_str()));
    // Made, the image would destroy the data it is to be backed by.
    if named.is_some_and(|(f, _)| f == file) {
        return Err(Error::BackingIsTheImage);
    }
    if !quiet {
        let options = factory.formatting_options(source.len(), named);
        println!("Formatting '{file}', fmt={format} {options}");
    }
    let location = protocol.0.clone();
    let size = if plain { source.len() } else { 0 };
    create::create_by_name(&graph.rc(), protocol, size).await?;
    if plain {
        return Ok(());
    }
    let mut opts = QDict::new()
        .with("driver", format)
        .with("file", location)
        .with("size", source.len());
    if let Some((f, d)) = named {
        opts.insert("backing-file", f);
        opts.insert("backing-fmt", d);
    }
    let opts = factory.by_name_create_options(opts)?;
    Ok(create::create(&graph.rc(), &Args::new(opts)).await?)
}

/// The sync mode and the bitmap (on the source) with its mode, checked in QEMU's order.
fn check_sync(args: &Args, source: &Node) -> Result<(Sync, Option<UserBitmap>)> {
    let mut sync = MirrorSyncMode::parse(args.str("sync")?).unwrap_or(MirrorSyncMode::Full);
    let bitmap = args.opt_str("bitmap");
    let mut mode = args.opt_str("bitmap-mode").and_then(BitmapSyncMode::parse);
    if sync == MirrorSyncMode::Incremental {
        if bitmap.is_none() {
            return Err(Error::BitmapRequired("incremental"));
        }
        if mode.is_some_and(|m| m != BitmapSyncMode::OnSuccess) {
            return Err(Error::IncrementalMode);
        }
        sync = MirrorSyncMode::Bitmap;
        mode = Some(BitmapSyncMode::OnSuccess);
    }
    let user_bitmap = match bitmap {
        Some(name) => {
            let b = source
                .bitmap(name)
                .ok_or_else(|| Error::BitmapNotFound(name.to_owned()))?;
            let Some(m) = mode else {
                return Err(Error::BitmapModeRequired);
            };
            if b.is_busy() {
                return Err(Error::BitmapBusy(name.to_owned()));
            }
            if b.is_inconsistent() {
                return Err(Error::BitmapInconsistent(name.to_owned()));
            }
            if sync == MirrorSyncMode::None {
                return Err(Error::BitmapWithSyncNone);
            }
            if m == BitmapSyncMode::Never && sync != MirrorSyncMode::Bitmap {
                return Err(Error::NeverWithoutBitmapSync(sync.as_str()));
            }
            Some((b, m))
        }
        None => {
            if sync == MirrorSyncMode::Bitmap {
                return Err(Error::BitmapRequired("bitmap"));
            }
            if mode.is_some() {
                return Err(Error::BitmapModeWithoutBitmap);
            }
            None
        }
    };
    Ok((
        match sync {
            MirrorSyncMode::Top => Sync::Top,
            MirrorSyncMode::None => Sync::None,
            MirrorSyncMode::Bitmap | MirrorSyncMode::Incremental => Sync::Bitmap,
            MirrorSyncMode::Full => Sync::Full,
        },
        user_bitmap,
    ))
}
