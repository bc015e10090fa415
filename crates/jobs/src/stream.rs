//! `block-stream` (QEMU: block/stream.c): copies the data of a node's backing files above
//! a base into the node itself, through a `copy-on-read` filter put above it, while its
//! users keep reading and writing; at the end the node is backed by the base directly and
//! its image says so. There is no `ready` state: the job completes by itself.

use crate::error::{Error, Result};
use crate::job::{ErrorPolicy, Job, JobDriver, JobFuture, PhaseFuture};
use crate::manager::{JobManager, JobOptions};
use crate::types::{BlockErrorAction, JobType};
use ferrite_block::{BlockBackend, FrozenChain, Graph, Node, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// How much one step looks at and copies (QEMU's `STREAM_CHUNK`).
const STREAM_CHUNK: u64 = 512 * 1024;

/// Why the job holds its nodes blocked (QEMU's blocker text).
const BLOCKED: &str = "block device is in use by block job: stream";

/// What `block-stream` was asked, checked by the QMP layer.
pub struct StreamSetup {
    /// The job ID.
    pub job_id: String,
    /// The node that receives the data.
    pub node: Rc<Node>,
    /// The first node not copied (`base`, `base-node`); none with `bottom` or for all.
    pub base: Option<Rc<Node>>,
    /// The last node copied (`bottom`).
    pub bottom: Option<Rc<Node>>,
    /// The backing file name to record (`backing-file`), instead of the base's own.
    pub backing_file: Option<String>,
    /// Record `raw` as the base's format when the base is a protocol node.
    pub backing_mask_protocol: bool,
    /// Bytes per second (negative: refused after the job is created, as QEMU does).
    pub speed: i64,
    /// The error policy.
    pub on_error: ErrorPolicy,
    /// The filter's node name.
    pub filter_node_name: Option<String>,
    /// `auto-finalize`.
    pub auto_finalize: bool,
    /// `auto-dismiss`.
    pub auto_dismiss: bool,
}

/// The node directly above `base` below `overlay`: the overlay itself, or a filter between
/// the two (QEMU's `above_base`); what is below it backs the streamed node at the end.
fn above_base(overlay: &Rc<Node>, base: Option<&Rc<Node>>) -> Rc<Node> {
    let is_base = |n: &Option<Rc<Node>>| match (n, base) {
        (Some(n), Some(b)) => Rc::ptr_eq(n, b),
        (None, None) => true,
        _ => false,
    };
    let cow = overlay.child("backing");
    if is_base(&cow) {
        return overlay.clone();
    }
    let Some(mut at) = cow else {
        return overlay.clone();
    };
    while !is_base(&at.filtered()) {
        match at.filtered() {
            Some(f) => at = f,
            None => break,
        }
    }
    at
}

/// Starts a stream job (QEMU: `stream_start`).
///
/// # Errors
/// QEMU's texts; nothing stays behind on error.
pub async fn start_stream(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    s: StreamSetup,
) -> Result<Rc<Job>> {
    let node = s.node.clone();
    let (base_overlay, above_base) = match &s.bottom {
        Some(b) => (b.clone(), b.clone()),
        None => {
            let overlay =
                node.find_overlay(s.base.as_ref())
                    .ok_or_else(|| Error::NotInBackingChain {
                        base: s
                            .base
                            .as_ref()
                            .map_or(String::new(), |b| b.name().to_owned()),
                        top: node.name().to_owned(),
                    })?;
            let above = above_base(&overlay, s.base.as_ref());
            (overlay, above)
        }
    };
    let was_read_only = node.is_read_only();
    // QEMU holds the chain while it reopens a read-only node (its filter holds it after).
    if was_read_only {
        let _held = graph.freeze_chain(&node, Some(&above_base))?;
        graph.set_read_only(&node, false)?;
    }
    let restore = |graph: &Graph| {
        if was_read_only {
            let _ = graph.set_read_only(&node, true);
        }
    };
    let mut filter_opts = QDict::new()
        .with("driver", "copy-on-read")
        .with("file", node.name())
        .with("bottom", base_overlay.name());
    filter_opts.insert_opt("node-name", s.filter_node_name.as_deref());
    let Some(cor) = graph.registry().get("copy-on-read") else {
        restore(graph);
        return Err(Error::UnknownFileFormat("copy-on-read".into()));
    };
    let filter = match graph
        .insert_filter_node(&node, &Args::new(filter_opts), cor.as_ref())
        .await
    {
        Ok(f) => f,
        Err(e) => {
            restore(graph);
            return Err(e.into());
        }
    };
    if s.filter_node_name.is_none() {
        filter.set_implicit();
    }
    // The filter holds the chain down to the node above the base, as QEMU's does from its
    // `bottom`.
    let frozen = match graph.freeze_chain(&filter, Some(&base_overlay)) {
        Ok(f) => f,
        Err(e) => {
            let _ = graph.remove_filter(&filter).await;
            restore(graph);
            return Err(ferrite_block::Error::CreateNode(Box::new(e)).into());
        }
    };
    let base = above_base.below();
    let driver = Rc::new(StreamJob {
        graph: graph.clone(),
        node: node.clone(),
        filter: RefCell::new(Some(filter.clone())),
        frozen: RefCell::new(Some(frozen)),
        filter_node: filter.clone(),
        base_overlay,
        above_base: above_base.clone(),
        backing_file: s.backing_file,
        backing_mask_protocol: s.backing_mask_protocol,
        on_error: s.on_error,
        was_read_only,
        blk: RefCell::new(None),
        intermediates: RefCell::new(Vec::new()),
        ended: Cell::new(false),
    });
    let job = match jobs.create(
        JobOptions {
            id: s.job_id,
            auto_finalize: s.auto_finalize,
            auto_dismiss: s.auto_dismiss,
            speed: 0,
        },
        driver.clone(),
        None,
    ) {
        Ok(j) => j,
        Err(e) => {
            driver.drop_filter().await;
            restore(graph);
            return Err(e);
        }
    };
    if let Err(e) = attach(graph, &job, &driver, &filter, s.speed, base.as_ref()) {
        jobs.early_fail(&job);
        job.remove_nodes(graph);
        if let Some(b) = driver.blk.borrow_mut().take() {
            b.remove();
        }
        driver.drop_filter().await;
        restore(graph);
        return Err(e);
    }
    for n in std::iter::once(&filter)
        .chain(std::iter::once(&node))
        .chain(driver.intermediates.borrow().iter())
    {
        graph.block(n, BLOCKED);
    }
    jobs.run_job(&job);
    tokio::task::yield_now().await;
    Ok(job)
}

/// The job's speed, its reader and its edges, in QEMU's order.
fn attach(
    graph: &Rc<Graph>,
    job: &Rc<Job>,
    driver: &StreamJob,
    filter: &Rc<Node>,
    speed: i64,
    base: Option<&Rc<Node>>,
) -> Result<()> {
    job.add_node(graph, filter, "main node", Perm::empty(), Perm::all())?;
    job.speed
        .set(u64::try_from(speed).map_err(|_| Error::NegativeSpeed)?);
    let basic = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
    let blk = BlockBackend::new(graph, filter, Perm::CONSISTENT_READ, basic | Perm::WRITE)?;
    // The job reports busy until its pause point: its reads must not wait for drains.
    blk.set_queue_requests(false);
    *driver.blk.borrow_mut() = Some(blk);
    job.add_node(
        graph,
        &driver.node,
        "active node",
        Perm::empty(),
        basic | Perm::WRITE,
    )?;
    let mut at = driver.node.below();
    while let Some(n) = at {
        if base.is_some_and(|b| Rc::ptr_eq(b, &n)) {
            break;
        }
        job.add_node(graph, &n, "intermediate node", Perm::empty(), basic)?;
        driver.intermediates.borrow_mut().push(n.clone());
        at = n.below();
    }
    Ok(())
}

struct StreamJob {
    graph: Rc<Graph>,
    /// The node that receives the data.
    node: Rc<Node>,
    filter: RefCell<Option<Rc<Node>>>,
    /// The filter, for lifting its blocker once it is gone.
    filter_node: Rc<Node>,
    /// The last node whose data is copied.
    base_overlay: Rc<Node>,
    /// The node directly above the base: what is below it at the end (another job may
    /// have changed it meanwhile) backs the node from then on.
    above_base: Rc<Node>,
    backing_file: Option<String>,
    backing_mask_protocol: bool,
    on_error: ErrorPolicy,
    was_read_only: bool,
    /// The chain the filter holds while it is there.
    frozen: RefCell<Option<FrozenChain>>,
    /// The job's reader, through the filter.
    blk: RefCell<Option<Rc<BlockBackend>>>,
    /// The nodes between the node and the base: they leave the chain.
    intermediates: RefCell<Vec<Rc<Node>>>,
    ended: Cell<bool>,
}

impl StreamJob {
    async fn drop_filter(&self) {
        self.frozen.borrow_mut().take();
        let filter = self.filter.borrow_mut().take();
        if let Some(f) = filter
            && let Err(e) = self.graph.remove_filter(&f).await
        {
            tracing::warn!(error = %e, "stream: taking the copy-on-read filter out");
        }
    }

    async fn work(&self, job: &Job) -> Result<(), String> {
        let top = self.node.skip_filters();
        if Rc::ptr_eq(&top, &self.base_overlay) {
            return Ok(());
        }
        let len = self.node.len();
        job.progress_set_remaining(len);
        // The copies go through the filter (its prefetch: nothing comes back); the job's
        // reader holds the filter as QEMU's does.
        if self.blk.borrow().is_none() {
            return Ok(());
        }
        let mut error: Option<String> = None;
        let mut copied = 0;
        let mut offset = 0;
        while offset < len {
            // Every step yields (QEMU's job sleeps, if only for no time, between steps).
            tokio::task::yield_now().await;
            job.rate_limit(copied).await;
            job.pause_point().await;
            if job.is_cancelled() {
                break;
            }
            let want = STREAM_CHUNK.min(len - offset);
            let step = async {
                let e = top.block_status(offset, want).await?;
                if e.allocated {
                    return Ok((false, e.len));
                }
                match top.child("backing") {
                    Some(b) if offset < b.len() => {
                        let n = e.len.min(b.len() - offset);
                        b.is_allocated_above(Some(&self.base_overlay), true, offset, n)
                            .await
                    }
                    // Past the end of the backing file: nothing more to copy.
                    _ => Ok((false, len - offset)),
                }
            };
            let r = match step.await {
                Ok((true, n)) => ferrite_drivers::cor::populate(&self.filter_node, offset, n)
                    .await
                    .map(|()| (true, n)),
                other => other,
            };
            match r {
                Ok((copy, n)) => {
                    job.progress_update(n);
                    copied = if copy { n } else { 0 };
                    offset += n;
                }
                Err(e) => {
                    copied = 0;
                    match job.error_action(true, &e, self.on_error) {
                        BlockErrorAction::Stop => continue,
                        BlockErrorAction::Report => {
                            error.get_or_insert_with(|| ferrite_qapi::os_msg(&e));
                            break;
                        }
                        BlockErrorAction::Ignore => {
                            // The job goes on but ends with the error: the chain stays.
                            error.get_or_insert_with(|| ferrite_qapi::os_msg(&e));
                            job.progress_update(want);
                            offset += want;
                        }
                    }
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The node is backed by the base from now on, and its image says so (QEMU:
    /// `stream_prepare`).
    async fn switch_backing(&self) -> Result<(), String> {
        self.drop_filter().await;
        let top = self.node.skip_filters();
        if top.child("backing").is_none() {
            return Ok(());
        }
        let below = self.above_base.below();
        let base = below.as_ref().map(|b| b.skip_filters());
        let (name, format) = match &base {
            Some(b) => {
                let name = self.backing_file.clone().unwrap_or_else(|| b.filename());
                let format = if self.backing_mask_protocol && b.children().is_empty() {
                    "raw".to_owned()
                } else {
                    b.driver_name().to_owned()
                };
                (Some(name), Some(format))
            }
            None => (None, None),
        };
        let eperm = || ferrite_qapi::os_msg(&std::io::Error::from_raw_os_error(libc::EPERM));
        if let Err(e) = self.graph.set_backing(&top, below.as_ref()).await {
            tracing::error!(error = %e, "stream: setting the backing file");
            return Err(eperm());
        }
        top.change_backing_file(name, format)
            .await
            .map_err(|e| ferrite_qapi::os_msg(&e))
    }
}

impl JobDriver for StreamJob {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn is_block_job(&self) -> bool {
        true
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move { self.work(&job).await })
    }

    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<Result<(), String>> {
        Box::pin(async move { self.switch_backing().await })
    }

    fn clean(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move {
            if self.ended.replace(true) {
                return;
            }
            self.drop_filter().await;
            if let Some(b) = self.blk.borrow_mut().take() {
                b.remove();
            }
            if self.was_read_only {
                let _ = self.graph.reopen_read_only(&self.node).await;
            }
        })
    }

    fn free(&self, job: &Job) {
        // Unlike QEMU's other block jobs, its stream job holds its nodes blocked, and the
        // filter (out of the chain, still over the node), until it is dismissed.
        let intermediates = std::mem::take(&mut *self.intermediates.borrow_mut());
        for n in std::iter::once(&self.filter_node)
            .chain(std::iter::once(&self.node))
            .chain(intermediates.iter())
        {
            self.graph.unblock(n, BLOCKED);
        }
        job.remove_nodes(&self.graph);
        // The filter and the nodes that left the chain go unless the user added them.
        self.graph.forget_if_orphan(&self.filter_node);
        for n in &intermediates {
            self.graph.forget_if_orphan(n);
        }
    }
}
