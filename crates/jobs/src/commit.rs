//! `block-commit` (QEMU: block/commit.c, and the mirror engine for an active commit): the
//! data of a chain's layers from `top` down to above `base` is written into `base`, and the
//! layers leave the chain. With `top` the active layer (or written to) the job is a mirror
//! into the base that goes `ready` and switches the users to the base on `job-complete`;
//! otherwise it copies once, under a `commit_top` filter, and then points the overlay of
//! `top` at the base, its image recording the new backing file.

use crate::error::{Error, Result};
use crate::job::{ErrorPolicy, Job, JobDriver, JobFuture, PhaseFuture};
use crate::manager::{JobManager, JobOptions};
use crate::mirror::{self, BackingMode, Setup, Sync};
use crate::types::{BlockErrorAction, JobType, MirrorCopyMode};
use ferrite_block::driver::{BoxFut, Driver, ReqFlags, unsupported};
use ferrite_block::{
    BlockBackend, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx, Perm,
};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// How much one step of an intermediate commit copies (QEMU's `COMMIT_BUFFER_SIZE`).
const COMMIT_CHUNK: u64 = 512 * 1024;

const BLOCKED: &str = "block device is in use by block job: commit";

/// What `block-commit` was asked, checked by the QMP layer.
pub struct CommitSetup {
    /// The job ID.
    pub job_id: String,
    /// The device (a root node).
    pub device: Rc<Node>,
    /// The top of what is committed.
    pub top: Rc<Node>,
    /// Where it goes.
    pub base: Rc<Node>,
    /// The backing file name to record in the overlay (intermediate commit).
    pub backing_file: Option<String>,
    /// Record `raw` as the base's format when the base is a protocol node.
    pub backing_mask_protocol: bool,
    /// Bytes per second (negative: refused after the job is created).
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

/// Whether committing `top` needs the mirror engine: `top` is the device's active layer,
/// or someone writes to it (QEMU's rule).
pub fn is_active(device: &Rc<Node>, top: &Rc<Node>) -> bool {
    top.cumulative_perms().0.contains(Perm::WRITE)
        || Rc::ptr_eq(&top.skip_filters(), &device.skip_filters())
}

/// Starts an active commit (QEMU: `commit_active_start`): a mirror of `top` into `base`.
///
/// # Errors
/// QEMU's texts; the base's read-only state is restored on error.
pub async fn start_active_commit(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    s: CommitSetup,
) -> Result<Rc<Job>> {
    let base_ro = s.base.is_read_only();
    if base_ro {
        graph.set_read_only(&s.base, false)?;
    }
    let setup = Setup {
        kind: JobType::Commit,
        job_id: s.job_id,
        source: s.top.clone(),
        target: s.base.clone(),
        replaces: None,
        sync: Sync::Full,
        base: Some(s.base.clone()),
        backing_mode: BackingMode::Leave,
        zero_target: false,
        speed: s.speed,
        granularity: 0,
        buf_size: 0,
        on_source_error: s.on_error,
        on_target_error: s.on_error,
        unmap: true,
        filter_node_name: s.filter_node_name,
        copy_mode: MirrorCopyMode::Background,
        auto_finalize: s.auto_finalize,
        auto_dismiss: s.auto_dismiss,
        base_ro,
        drop_target: false,
    };
    let r = mirror::start_job(jobs, graph, setup).await;
    if r.is_err() && base_ro {
        let _ = graph.set_read_only(&s.base, true);
    }
    r
}

/// Starts an intermediate commit (QEMU: `commit_start`).
///
/// # Errors
/// QEMU's texts; nothing stays behind on error.
pub async fn start_commit(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    s: CommitSetup,
) -> Result<Rc<Job>> {
    if Rc::ptr_eq(&s.top.skip_filters(), &s.base.skip_filters()) {
        return Err(Error::SameTopAndBase);
    }
    let mut base_perm = Perm::CONSISTENT_READ | Perm::WRITE;
    if s.base.len() < s.top.len() {
        base_perm |= Perm::RESIZE;
    }
    let driver = Rc::new(CommitJob {
        graph: graph.clone(),
        top: s.top.clone(),
        base: s.base.clone(),
        filter: RefCell::new(None),
        filter_node: RefCell::new(None),
        base_overlay: RefCell::new(None),
        backing_file: s.backing_file,
        backing_mask_protocol: s.backing_mask_protocol,
        on_error: s.on_error,
        base_ro: Cell::new(false),
        base_blk: RefCell::new(None),
        frozen: RefCell::new(None),
        top_blk: RefCell::new(None),
        blocked: RefCell::new(Vec::new()),
    });
    let job = jobs.create(
        JobOptions {
            id: s.job_id,
            auto_finalize: s.auto_finalize,
            auto_dismiss: s.auto_dismiss,
            speed: 0,
        },
        driver.clone(),
        None,
    )?;
    if let Err(e) = setup(graph, &job, &driver, &s.device, s.speed, s.filter_node_name).await {
        jobs.early_fail(&job);
        driver.undo(&job).await;
        if driver.base_ro.get() {
            let _ = graph.reopen_read_only(&driver.base).await;
        }
        return Err(e);
    }
    jobs.run_job(&job);
    tokio::task::yield_now().await;
    Ok(job)
}

/// The job's node edges, its filter and its readers and writers, in QEMU's order.
async fn setup(
    graph: &Rc<Graph>,
    job: &Rc<Job>,
    d: &CommitJob,
    device: &Rc<Node>,
    speed: i64,
    filter_node_name: Option<String>,
) -> Result<()> {
    job.add_node(graph, device, "main node", Perm::empty(), Perm::all())?;
    job.speed
        .set(u64::try_from(speed).map_err(|_| Error::NegativeSpeed)?);
    if d.base.is_read_only() {
        graph.set_read_only(&d.base, false)?;
        d.base_ro.set(true);
    }
    let mut opts = QDict::new()
        .with("driver", "commit_top")
        .with("backing", d.top.name());
    opts.insert_opt("node-name", filter_node_name.as_deref());
    let filter = graph
        .insert_filter(&d.top, &Args::new(opts), &CommitTopFactory)
        .await?;
    if filter_node_name.is_none() {
        filter.set_implicit();
    }
    *d.filter.borrow_mut() = Some(filter.clone());
    *d.filter_node.borrow_mut() = Some(filter.clone());
    // What the job copies is what the images above the base hold themselves, down to the
    // last one above it, filters between them and the base not counted (a throttle filter
    // over the base shows the base's data, which is there already).
    let overlay = d
        .top
        .find_overlay(Some(&d.base))
        .ok_or(Error::SameTopAndBase)?;
    *d.base_overlay.borrow_mut() = Some(overlay);
    let top_shared = if Rc::ptr_eq(&d.top.skip_filters(), &d.base.skip_filters()) {
        Perm::WRITE_UNCHANGED | Perm::WRITE | Perm::CONSISTENT_READ
    } else {
        Perm::WRITE_UNCHANGED | Perm::WRITE
    };
    job.add_node(
        graph,
        &d.top,
        "intermediate node",
        Perm::empty(),
        top_shared,
    )?;
    mirror::hold_intermediates_from(graph, job, &d.top, &d.base)?;
    *d.frozen.borrow_mut() = Some(graph.freeze_chain(&filter, Some(&d.base))?);
    job.add_node(graph, &d.base, "base", Perm::empty(), Perm::all())?;
    let base_perm = if d.base.len() < d.top.len() {
        Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE
    } else {
        Perm::CONSISTENT_READ | Perm::WRITE
    };
    let base_blk = BlockBackend::new(
        graph,
        &d.base,
        base_perm,
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    )?;
    base_blk.set_queue_requests(false);
    *d.base_blk.borrow_mut() = Some(base_blk);
    let top_blk = BlockBackend::new(graph, &d.top, Perm::empty(), Perm::all())?;
    top_blk.set_queue_requests(false);
    *d.top_blk.borrow_mut() = Some(top_blk);
    // The filter is not blocked (QEMU adds only the nodes the job holds); nobody may freeze
    // a link to it instead, since it leaves the chain with the job.
    filter.set_never_freeze();
    let mut blocked = vec![device.clone()];
    let mut at = Some(d.top.clone());
    while let Some(n) = at {
        blocked.push(n.clone());
        if Rc::ptr_eq(&n, &d.base) {
            break;
        }
        at = n.below();
    }
    for n in &blocked {
        graph.block(n, BLOCKED);
    }
    *d.blocked.borrow_mut() = blocked;
    Ok(())
}

struct CommitJob {
    graph: Rc<Graph>,
    top: Rc<Node>,
    base: Rc<Node>,
    filter: RefCell<Option<Rc<Node>>>,
    /// The filter, to delete once the job lets go of it.
    filter_node: RefCell<Option<Rc<Node>>>,
    /// The lowest node above the base: what is allocated down to it is copied.
    base_overlay: RefCell<Option<Rc<Node>>>,
    backing_file: Option<String>,
    backing_mask_protocol: bool,
    on_error: ErrorPolicy,
    base_ro: Cell<bool>,
    base_blk: RefCell<Option<Rc<BlockBackend>>>,
    /// The chain from the filter down to the base, held while the job runs.
    frozen: RefCell<Option<ferrite_block::FrozenChain>>,
    top_blk: RefCell<Option<Rc<BlockBackend>>>,
    blocked: RefCell<Vec<Rc<Node>>>,
}

impl CommitJob {
    async fn work(&self, job: &Job) -> Result<(), String> {
        let os = |e: std::io::Error| ferrite_qapi::os_msg(&e);
        let (Some(top_blk), Some(base_blk), Some(overlay)) = (
            self.top_blk.borrow().clone(),
            self.base_blk.borrow().clone(),
            self.base_overlay.borrow().clone(),
        ) else {
            return Ok(());
        };
        let len = top_blk.len();
        job.progress_set_remaining(len);
        if base_blk.len() < len {
            base_blk.truncate(len).await.map_err(os)?;
        }
        let mut offset = 0;
        let mut copied = 0;
        while offset < len {
            tokio::task::yield_now().await;
            job.rate_limit(copied).await;
            job.pause_point().await;
            if job.is_cancelled() {
                break;
            }
            let want = COMMIT_CHUNK.min(len - offset);
            let mut source_side = true;
            let r = async {
                let (copy, n) = self
                    .top
                    .is_allocated_above(Some(&overlay), true, offset, want)
                    .await?;
                if copy {
                    let data = top_blk.read(offset, n as usize).await?;
                    source_side = false;
                    base_blk.write(offset, data, ReqFlags::empty()).await?;
                }
                Ok::<_, std::io::Error>((copy, n))
            }
            .await;
            match r {
                Ok((copy, n)) => {
                    job.progress_update(n);
                    copied = if copy { n } else { 0 };
                    offset += n;
                }
                Err(e) => {
                    copied = 0;
                    if job.error_action(source_side, &e, self.on_error) == BlockErrorAction::Report
                    {
                        return Err(os(e));
                    }
                }
            }
        }
        Ok(())
    }

    /// The overlay of `top` is backed by the base now, and its image says so; `top` and
    /// the layers below it leave the chain (QEMU: `bdrv_drop_intermediate`).
    async fn drop_intermediate(&self) -> Result<(), String> {
        self.frozen.borrow_mut().take();
        if let Some(b) = self.base_blk.borrow_mut().take() {
            b.remove();
        }
        let Some(filter) = self.filter.borrow().clone() else {
            return Ok(());
        };
        let eperm = || ferrite_qapi::os_msg(&std::io::Error::from_raw_os_error(libc::EPERM));
        let name = self
            .backing_file
            .clone()
            .unwrap_or_else(|| self.base.filename());
        let format = if self.backing_mask_protocol && self.base.children().is_empty() {
            "raw".to_owned()
        } else {
            self.base.driver_name().to_owned()
        };
        // Whoever used the filter (the overlay, as its backing file) uses the base.
        let overlays: Vec<Rc<Node>> = filter
            .users()
            .iter()
            .filter(|u| u.name() == "backing")
            .filter_map(|u| u.parent_node())
            .collect();
        if let Err(e) = self.graph.replace(&filter, &self.base).await {
            tracing::error!(error = %e, "commit: linking the overlay to the base");
            return Err(eperm());
        }
        for o in &overlays {
            o.remove_option("backing");
            // A read-only overlay is reopened read-write for the update and back after;
            // an update that fails leaves the graph linked and the job successful, as
            // QEMU's `bdrv_child_cb_update_filename` reports and goes on.
            let read_only = o.is_read_only();
            let r = match read_only {
                true => self
                    .graph
                    .set_read_only(o, false)
                    .map_err(|e| e.to_string()),
                false => Ok(()),
            };
            let r = match r {
                Ok(()) => o
                    .driver()
                    .change_backing_file(o, Some(name.clone()), Some(format.clone()))
                    .await
                    .map_err(|e| ferrite_qapi::os_msg(&e)),
                Err(e) => Err(e),
            };
            if read_only {
                let _ = self.graph.reopen_read_only(o).await;
            }
            if let Err(e) = r {
                tracing::error!(node = o.name(), "Could not update backing file link: {e}");
            }
        }
        *self.filter.borrow_mut() = None;
        Ok(())
    }

    /// Releases what the job held, takes the filter out if it is still there.
    async fn undo(&self, job: &Job) {
        self.frozen.borrow_mut().take();
        for b in [&self.base_blk, &self.top_blk] {
            if let Some(b) = b.borrow_mut().take() {
                b.remove();
            }
        }
        for n in std::mem::take(&mut *self.blocked.borrow_mut()) {
            self.graph.unblock(&n, BLOCKED);
        }
        job.remove_nodes(&self.graph);
        let filter = self.filter.borrow_mut().take();
        if let Some(f) = filter
            && let Some(below) = f.child("backing")
        {
            let _ = self.graph.replace(&f, &below).await;
        }
        if let Some(f) = self.filter_node.borrow_mut().take() {
            self.graph.forget_if_orphan(&f);
        }
    }
}

impl JobDriver for CommitJob {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn is_block_job(&self) -> bool {
        true
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move { self.work(&job).await })
    }

    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<Result<(), String>> {
        Box::pin(async move { self.drop_intermediate().await })
    }

    fn abort(self: Rc<Self>, job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move { self.undo(&job).await })
    }

    fn clean(self: Rc<Self>, job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move {
            self.undo(&job).await;
            // The committed layers go unless the user added them.
            self.graph.close_inline(&self.top).await;
            if self.base_ro.get() {
                let _ = self.graph.reopen_read_only(&self.base).await;
            }
        })
    }
}

/// `commit_top`: the filter an intermediate commit puts above `top` (QEMU's
/// `bdrv_commit_top`): it reads through, and asks nothing of the chain below, so the base
/// stays writable for the job.
pub(crate) struct CommitTopFactory;

impl DriverFactory for CommitTopFactory {
    fn name(&self) -> &'static str {
        "commit_top"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let top = ctx.open_child("backing").await?;
            Ok(Box::new(CommitTop { top }) as Box<dyn Driver>)
        })
    }
}

struct CommitTop {
    top: Rc<Child>,
}

impl Driver for CommitTop {
    ferrite_block::forward_to_child!(self.top; len, read, block_status);

    fn format_name(&self) -> &'static str {
        "commit_top"
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        unsupported()
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        unsupported()
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        unsupported()
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        unsupported()
    }

    fn child_perm(&self, _name: &str, _perm: Perm, _shared: Perm, _used: bool) -> (Perm, Perm) {
        (Perm::empty(), Perm::all())
    }

    fn plain_filename(&self) -> Option<String> {
        Some(self.top.node().filename())
    }

    fn cluster_size(&self) -> Option<u64> {
        self.top.node().driver().cluster_size()
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("backing")
    }
}
