//! The mirror job's work (QEMU: `mirror_run`, `mirror_iteration`, `mirror_exit_common`):
//! mark what the target lacks, copy it chunk by chunk with up to 16 requests in flight
//! while writes keep marking more, go `ready` once both sides match, and at the end switch
//! the source's users to the target (`job-complete`) or leave the graph as it was.

use super::state::Shared;
use crate::job::{Job, JobDriver, JobFuture, PhaseFuture};
use crate::types::{JobType, MirrorCopyMode};
use crate::{Error, Result};
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{Child, Drained, Graph, Node, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Duration;
use tokio::sync::Notify;

/// Copies in flight at most (QEMU's `MAX_IN_FLIGHT`).
pub(crate) const MAX_IN_FLIGHT: usize = 16;
/// The largest copy request, unless `buf-size` allows more per request.
const MAX_IO_BYTES: u64 = 1 << 20;
/// Buffer memory for copies in flight unless `buf-size` says otherwise.
pub(crate) const DEFAULT_BUF_SIZE: u64 = MAX_IN_FLIGHT as u64 * MAX_IO_BYTES;
/// How long a `ready` job with nothing to copy sleeps between looks (QEMU's slice).
const SLICE: Duration = Duration::from_millis(100);
/// The largest request the initial zeroing and the allocation scan make.
const SCAN_STEP: u64 = i32::MAX as u64;

/// What the job copies before it follows writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sync {
    /// Everything the source's chain shows.
    Full,
    /// What the layers above `base` allocate.
    Top,
    /// Nothing: only what is written from now on.
    None,
}

/// What happens to the target's backing file when the job switches over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackingMode {
    /// Nothing (`blockdev-mirror`, commit).
    Leave,
    /// The target gets the source's chain below what was copied (drive-mirror's new image).
    SourceChain,
    /// The target opens the backing file its image names (drive-mirror `existing`).
    OpenChain,
}

/// How a chunk reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Copy,
    Zero,
    Discard,
}

/// Waits for the main loop's next turn: everything that is ready now runs first, a
/// command that is answering included. A drain in a job starts this way, as QEMU's does
/// in a coroutine, so a `job-complete` or a cancel is answered before the job's end is
/// announced.
async fn next_turn() {
    tokio::time::sleep(Duration::ZERO).await;
}

/// How many writes to `target` the copies keep going at once: one into the page cache,
/// where a file takes one buffered write at a time and further writers spin on its lock
/// (taking the CPU the guest's requests need; measured with `bench/blockjobs.py`), more
/// where the device queues them (O_DIRECT).
fn writers_for(target: &Rc<Node>) -> usize {
    let mut node = target.clone();
    while let Some(f) = node.child("file") {
        node = f;
    }
    if node.cache_mode().0 {
        MAX_IN_FLIGHT
    } else {
        1
    }
}

/// Why the job holds nodes of others blocked (QEMU's blocker texts).
pub(crate) fn blocker(kind: JobType) -> String {
    format!("block device is in use by block job: {}", kind.as_str())
}
const COMPLETE_BLOCKER: &str = "block device is in use by block-job-complete";

/// One mirror (or active commit) job.
pub(crate) struct MirrorJob {
    pub(crate) graph: Rc<Graph>,
    pub(crate) kind: JobType,
    pub(crate) shared: Rc<Shared>,
    /// The `mirror_top` filter above the source.
    pub(crate) filter: Rc<Node>,
    /// The node the filter sits on.
    pub(crate) source: Rc<Node>,
    /// The filter's edge to the source: copies read through it.
    pub(crate) source_edge: Rc<Child>,
    pub(crate) target: Rc<Node>,
    pub(crate) sync: Sync,
    /// The first node not copied (`top`: the source's backing file; commit: the base).
    pub(crate) base: Option<Rc<Node>>,
    pub(crate) zero_target: bool,
    pub(crate) unmap: bool,
    pub(crate) buf_size: u64,
    pub(crate) backing_mode: BackingMode,
    pub(crate) replaces: Option<String>,
    /// The target was opened for this job (drive-mirror): it goes if the job does not
    /// switch to it.
    pub(crate) drop_target: bool,
    /// The base was read-only before an active commit opened it for writing.
    pub(crate) base_ro: bool,
    pub(crate) should_complete: Cell<bool>,
    to_replace: RefCell<Option<Rc<Node>>>,
    /// The nodes the job keeps others' jobs and commands off (its filter, source, target
    /// and, committing, the layers between): QEMU blocks every node a job holds.
    pub(crate) blocked: RefCell<Vec<Rc<Node>>>,
    /// The chain down to a target in the source's backing chain, held while the job runs.
    pub(crate) frozen: RefCell<Option<ferrite_block::FrozenChain>>,
    /// The job drains its own source to finish: it must not wait for itself.
    in_drain: Cell<bool>,
    held: RefCell<Vec<Drained>>,
    prepared: Cell<bool>,
    initial_zeroing: Cell<bool>,
    len: Cell<u64>,
    /// The granule after the last run copied: the next run starts there.
    cursor: Cell<u64>,
    last_yield: Cell<tokio::time::Instant>,
    in_flight: Cell<usize>,
    bytes_in_flight: Cell<u64>,
    op_done: Notify,
    /// Writes to the target at once: a file takes one buffered write at a time, and more
    /// writers only spin on its lock (taking CPU from the guest's requests).
    target_writers: tokio::sync::Semaphore,
    /// Set when the target must be written whole clusters at a time (see
    /// [`MirrorJob::whole_clusters`]).
    cow: RefCell<Option<WholeClusters>>,
}

/// A target that names a backing file it has not opened fills the rest of a cluster it
/// allocates with zeroes, not with the backing file's data: until the job has written a
/// cluster once, it copies the whole cluster (QEMU: `cow_bitmap`, `mirror_cow_align`).
struct WholeClusters {
    cluster: u64,
    /// The chunks the job has written to the target.
    written: Rc<DirtyBitmap>,
}

impl MirrorJob {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        graph: Rc<Graph>,
        kind: JobType,
        shared: Rc<Shared>,
        filter: Rc<Node>,
        source: Rc<Node>,
        source_edge: Rc<Child>,
        target: Rc<Node>,
        sync: Sync,
        base: Option<Rc<Node>>,
    ) -> MirrorJob {
        let writers = writers_for(&target);
        MirrorJob {
            graph,
            kind,
            shared,
            filter,
            source,
            source_edge,
            target,
            sync,
            base,
            zero_target: false,
            blocked: RefCell::new(Vec::new()),
            frozen: RefCell::new(None),
            unmap: true,
            buf_size: DEFAULT_BUF_SIZE,
            backing_mode: BackingMode::Leave,
            replaces: None,
            drop_target: false,
            base_ro: false,
            should_complete: Cell::new(false),
            to_replace: RefCell::new(None),
            in_drain: Cell::new(false),
            held: RefCell::new(Vec::new()),
            prepared: Cell::new(false),
            initial_zeroing: Cell::new(false),
            len: Cell::new(0),
            cursor: Cell::new(0),
            last_yield: Cell::new(tokio::time::Instant::now()),
            in_flight: Cell::new(0),
            bytes_in_flight: Cell::new(0),
            op_done: Notify::new(),
            target_writers: tokio::sync::Semaphore::new(writers),
            cow: RefCell::new(None),
        }
    }

    /// Copies whole target clusters where the target cannot fill a partly written one
    /// itself: it names a backing file but has none open, and its clusters are larger than
    /// the job's chunks.
    fn whole_clusters(&self, len: u64) -> Option<WholeClusters> {
        let g = self.shared.granularity;
        let cluster = self.target.driver().cluster_size().unwrap_or(0);
        let names_backing = self
            .target
            .driver()
            .backing_filename()
            .is_some_and(|(name, _)| !name.is_empty());
        (names_backing && self.target.child("backing").is_none() && cluster > g).then(|| {
            WholeClusters {
                cluster,
                written: DirtyBitmap::new("", g, len, false),
            }
        })
    }

    /// The chunks `first..end` widened to whole target clusters, if the target needs them
    /// and the job has not written both ends yet; clipped to the image.
    fn cow_span(&self, first: u64, end: u64) -> Option<(u64, u64)> {
        let cow = self.cow.borrow();
        let cow = cow.as_ref()?;
        if cow.written.get(first) && cow.written.get(end - 1) {
            return None;
        }
        let g = self.shared.granularity;
        let from = first * g / cow.cluster * cow.cluster;
        let to = (end * g).div_ceil(cow.cluster) * cow.cluster;
        let to = to.min(self.len.get());
        Some((from / g, to.div_ceil(g)))
    }

    fn target_backend(&self) -> io::Result<Rc<ferrite_block::BlockBackend>> {
        self.shared
            .target
            .borrow()
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    /// Waits until one copy in flight finishes (any, if some are).
    async fn wait_for_op(&self) {
        let done = self.op_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if self.in_flight.get() == 0 {
            return;
        }
        done.await;
    }

    async fn wait_all_io(&self) {
        while self.in_flight.get() > 0 {
            self.wait_for_op().await;
        }
    }

    /// Starts one request: `bytes` at `offset` by `method`, in its own task. Its chunks
    /// must be held; the request lets go of them when it ends.
    fn perform(self: &Rc<Self>, job: &Rc<Job>, offset: u64, bytes: u64, method: Method) {
        self.in_flight.set(self.in_flight.get() + 1);
        self.bytes_in_flight.set(self.bytes_in_flight.get() + bytes);
        let me = self.clone();
        let job = Rc::downgrade(job);
        let locked = method != Method::Zero || !self.initial_zeroing.get();
        tokio::task::spawn_local(ferrite_block::io::background(async move {
            let r = me.transfer(offset, bytes, method).await;
            match r {
                Ok(()) => {
                    if let Some(cow) = me.cow.borrow().as_ref() {
                        cow.written.set_range(offset, bytes);
                    }
                    if !me.initial_zeroing.get()
                        && let Some(j) = job.upgrade()
                    {
                        j.progress_update(bytes);
                    }
                }
                Err((read, e)) => {
                    me.shared.mark_dirty(offset, bytes);
                    me.shared.request_failed(read, &e);
                }
            }
            me.in_flight.set(me.in_flight.get() - 1);
            me.bytes_in_flight.set(me.bytes_in_flight.get() - bytes);
            if locked {
                let (first, end) = me.shared.chunks(offset, bytes);
                me.shared.locks.release(first, end);
            }
            me.op_done.notify_waiters();
            ferrite_block::notify_progress();
        }));
    }

    /// One request's I/O; the error says whether reading the source failed.
    async fn transfer(
        &self,
        offset: u64,
        bytes: u64,
        method: Method,
    ) -> Result<(), (bool, io::Error)> {
        let target = self.target_backend().map_err(|e| (false, e))?;
        match method {
            Method::Copy => {
                let data = self
                    .source_edge
                    .read(offset, bytes as usize)
                    .await
                    .map_err(|e| (true, e))?;
                let _writer = self.target_writers.acquire().await;
                target
                    .write(offset, data, ReqFlags::empty())
                    .await
                    .map_err(|e| (false, e))
            }
            Method::Zero => {
                let flags = if self.unmap {
                    ReqFlags::MAY_UNMAP
                } else {
                    ReqFlags::empty()
                };
                target
                    .write_zeroes(offset, bytes, flags)
                    .await
                    .map_err(|e| (false, e))
            }
            Method::Discard => target.discard(offset, bytes).await.map_err(|e| (false, e)),
        }
    }

    /// Whether the target can make zeroes by deallocating (`discard=unmap`): the initial
    /// zeroing then costs nothing (QEMU: `bdrv_can_write_zeroes_with_unmap`).
    fn target_zeroes_cheaply(&self) -> bool {
        self.target.discard_unmap() && !self.target.is_read_only()
    }

    /// The job yields now and then even when it never waits (QEMU: `mirror_throttle`):
    /// once per slice.
    async fn throttle(&self, job: &Job) {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.last_yield.get()) > SLICE {
            self.last_yield.set(now);
            tokio::task::yield_now().await;
        }
        if job.pause_requested() {
            self.wait_all_io().await;
        }
        job.pause_point().await;
    }

    /// Marks what the target lacks at the start (QEMU: `mirror_dirty_init`).
    async fn dirty_init(self: &Rc<Self>, job: &Rc<Job>) -> Result<(), String> {
        let len = self.len.get();
        let g = self.shared.granularity;
        if self.zero_target {
            if !self.target_zeroes_cheaply() {
                self.shared.bitmap.set_range(0, len);
                return Ok(());
            }
            self.initial_zeroing.set(true);
            let mut offset = 0;
            while offset < len {
                self.throttle(job).await;
                if job.is_cancelled() {
                    self.initial_zeroing.set(false);
                    return Ok(());
                }
                if self.in_flight.get() >= MAX_IN_FLIGHT {
                    self.wait_for_op().await;
                    continue;
                }
                let bytes = (len - offset).min(SCAN_STEP / g * g);
                self.perform(job, offset, bytes, Method::Zero);
                offset += bytes;
            }
            self.wait_all_io().await;
            self.initial_zeroing.set(false);
        }
        let mut offset = 0;
        while offset < len {
            self.throttle(job).await;
            if job.is_cancelled() {
                return Ok(());
            }
            let bytes = (len - offset).min(SCAN_STEP / g * g);
            let (allocated, n) = self
                .source
                .is_allocated_above(self.base.as_ref(), false, offset, bytes)
                .await
                .map_err(|e| ferrite_qapi::os_msg(&e))?;
            if allocated {
                self.shared.bitmap.set_range(offset, n);
            }
            offset += n;
        }
        Ok(())
    }

    /// Copies the next run of dirty chunks (QEMU: `mirror_iteration`).
    async fn iteration(self: &Rc<Self>, job: &Rc<Job>) {
        let shared = &self.shared;
        let g = shared.granularity;
        let len = self.len.get();
        // Onwards from where the last run ended, wrapping around (QEMU's dirty iterator):
        // chunks written again behind the cursor wait for the next pass instead of the
        // copies in flight.
        let Some(first) = shared
            .bitmap
            .next_dirty_granule(self.cursor.get())
            .or_else(|| shared.bitmap.next_dirty_granule(0))
        else {
            return;
        };
        // Requests on the first chunk finish first; the run stops before any other chunk
        // in flight.
        shared.locks.wait_free(first, first + 1).await;
        job.pause_point().await;
        if !shared.bitmap.get(first) {
            return;
        }
        let mut first = first;
        let mut chunks = 1;
        while (chunks + 1) * g <= self.buf_size.max(g) {
            let next = first + chunks;
            if next * g >= len || !shared.bitmap.get(next) || shared.locks.is_held(next) {
                break;
            }
            chunks += 1;
        }
        if let Some((from, end)) = self.cow_span(first, first + chunks) {
            if (from..end).any(|c| shared.locks.is_held(c)) {
                // The next turn looks again once the neighbours' copies are done.
                shared.locks.wait_free(from, end).await;
                return;
            }
            first = from;
            chunks = end - from;
        }
        self.cursor.set(first + chunks);
        // Cleared before the status is asked: writes meanwhile mark their chunks again.
        let mut offset = first * g;
        shared.bitmap.reset_range(offset, chunks * g);
        shared.locks.hold(first, first + chunks);
        let max_io = (self.buf_size / MAX_IN_FLIGHT as u64).max(MAX_IO_BYTES);
        let target_cluster = self.target.driver().cluster_size().unwrap_or(g).max(1);
        while chunks > 0 && offset < len {
            let want = chunks * g;
            let (method, mut io) = match self
                .source_edge
                .block_status(offset, want.min(len - offset))
                .await
            {
                Err(_) => (Method::Copy, want.min(max_io)),
                Ok(e) if e.data => (Method::Copy, e.len.min(max_io)),
                Ok(e) => {
                    let m = if e.zero {
                        Method::Zero
                    } else {
                        Method::Discard
                    };
                    (m, e.len)
                }
            };
            io -= io % g;
            let method = if io < g {
                io = g;
                Method::Copy
            } else if method != Method::Copy
                && (offset % target_cluster != 0 || (io % target_cluster != 0 && offset + io < len))
            {
                Method::Copy
            } else {
                method
            };
            while self.in_flight.get() >= MAX_IN_FLIGHT {
                self.wait_for_op().await;
            }
            if shared.has_failed() {
                break;
            }
            let io = io.min(len - offset);
            let io = if method == Method::Copy {
                io.min(self.buf_size)
            } else {
                io
            };
            self.perform(job, offset, io, method);
            // Zeroes cost nothing where the target deallocates them.
            let accounted = if method != Method::Copy && self.target_zeroes_cheaply() {
                0
            } else {
                io
            };
            offset += io;
            chunks = chunks.saturating_sub(io.div_ceil(g));
            // Counted, not waited for: the whole run goes out, then the job's loop sleeps.
            job.rate_limit_account(accounted);
        }
        if chunks > 0 {
            // Not started (the job failed): those chunks are free and still to copy.
            let from = offset / g;
            shared.locks.release(from, from + chunks);
            shared.mark_dirty(offset, chunks * g);
        }
    }

    /// Flushes the target; a failure goes to the target's error policy.
    async fn flush_target(&self) -> bool {
        match self.target_backend() {
            Ok(t) => match t.flush().await {
                Ok(()) => true,
                Err(e) => {
                    self.shared.request_failed(false, &e);
                    false
                }
            },
            Err(_) => false,
        }
    }

    /// The reported failure, if a request's error ended the job.
    fn failure(&self) -> Result<(), String> {
        match self.shared.failure.borrow().as_ref() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    async fn work(self: &Rc<Self>, job: &Rc<Job>) -> Result<(), String> {
        if job.is_cancelled() {
            return Ok(());
        }
        *self.shared.job.borrow_mut() = Rc::downgrade(job);
        let len = self.source.len();
        self.len.set(len);
        let target = self
            .target_backend()
            .map_err(|e| ferrite_qapi::os_msg(&e))?;
        if self.shared.is_commit {
            // An active commit grows its base to the top's size.
            if len > target.len() {
                target
                    .truncate(len)
                    .await
                    .map_err(|e| ferrite_qapi::os_msg(&e))?;
            }
        } else if len != target.len() {
            return Err(Error::DifferentSizes.to_string());
        }
        *self.cow.borrow_mut() = self.whole_clusters(len);
        if len == 0 {
            job.transition_to_ready();
            self.shared.actively_synced.set(true);
            while !job.cancel_requested() && !self.should_complete.get() {
                job.sleep(Duration::MAX, &self.shared.dirtied).await;
                job.pause_point().await;
            }
            return Ok(());
        }
        if self.sync != Sync::None {
            self.dirty_init(job).await?;
            if job.is_cancelled() {
                return Ok(());
            }
        }
        // From now on active writes go to the target too.
        self.shared.copying.set(true);
        loop {
            self.failure()?;
            if job.pause_requested() {
                self.wait_all_io().await;
            }
            job.pause_point().await;
            if job.is_cancelled() {
                return Ok(());
            }
            let mut dirty = self.shared.bitmap.count();
            job.progress_set_remaining(
                self.bytes_in_flight.get() + dirty + self.shared.active_bytes.get(),
            );
            if self.in_flight.get() >= MAX_IN_FLIGHT
                || self.bytes_in_flight.get() >= self.buf_size
                || (dirty == 0 && self.in_flight.get() > 0)
            {
                self.wait_for_op().await;
                continue;
            }
            if dirty != 0 {
                self.iteration(job).await;
            }
            let mut finish = false;
            if self.in_flight.get() == 0 && dirty == 0 {
                if !job.is_ready() {
                    if !self.flush_target().await {
                        continue;
                    }
                    job.transition_to_ready();
                }
                if self.shared.copy_mode.get() != MirrorCopyMode::Background {
                    self.shared.actively_synced.set(true);
                }
                finish = self.should_complete.get() || job.cancel_requested();
                dirty = self.shared.bitmap.count();
            }
            if dirty == 0 && finish {
                // Writes stop while the last look is taken.
                self.in_drain.set(true);
                next_turn().await;
                let drained = self.graph.drain(&self.source).await;
                if self.shared.bitmap.count() > 0 || !self.flush_target().await {
                    drop(drained);
                    self.in_drain.set(false);
                    continue;
                }
                self.held.borrow_mut().push(drained);
                return Ok(());
            }
            if job.is_ready() && !finish {
                if self.in_flight.get() == 0 && dirty == 0 {
                    job.sleep(SLICE, &self.shared.dirtied).await;
                }
            } else {
                job.rate_limit(0).await;
            }
        }
    }

    /// After the work, failed or not: nothing in flight, the source drained until the
    /// graph has changed.
    async fn settle(&self) {
        self.wait_all_io().await;
        if self.held.borrow().is_empty() {
            next_turn().await;
            self.in_drain.set(true);
            let drained = self.graph.drain(&self.source).await;
            self.held.borrow_mut().push(drained);
        }
    }

    /// The end, for success and failure alike (QEMU: `mirror_exit_common`): the target
    /// takes the source's place if the job completed, the filter goes.
    async fn exit(&self, job: &Job, abort: bool) -> Result<(), String> {
        if self.prepared.replace(true) {
            return Ok(());
        }
        let mut result = Ok(());
        self.frozen.borrow_mut().take();
        self.filter.remove_bitmap(&self.shared.bitmap);
        // The target's writer goes before the target takes the source's place, where it
        // may not have the same permissions.
        if let Some(t) = self.shared.target.borrow_mut().take() {
            t.remove();
        }
        let _filter_drained = self.graph.drain(&self.filter).await;
        let _target_drained = self.graph.drain(&self.target).await;
        self.shared.stop.set(true);
        let _ = self.graph.refresh_perms(&self.filter);
        if !abort {
            match self.backing_mode {
                BackingMode::SourceChain => {
                    let backing = match self.sync {
                        Sync::None => Some(self.source.clone()),
                        _ => self.base.clone(),
                    };
                    if let Some(b) = backing
                        && self.target.child("backing").is_none()
                        && let Err(e) = self.graph.attach_backing(&self.target, &b)
                    {
                        tracing::error!(error = %e, "mirror: setting the target's backing file");
                        result = Err(ferrite_qapi::os_msg(&io::Error::from_raw_os_error(
                            libc::EPERM,
                        )));
                    }
                }
                BackingMode::OpenChain => {
                    if let Err(e) = self.graph.open_backing_file(&self.target).await {
                        tracing::error!(error = %e, "mirror: opening the target's backing file");
                    }
                }
                BackingMode::Leave => {}
            }
        }
        if self.should_complete.get() && !abort {
            let to_replace = self
                .to_replace
                .borrow()
                .clone()
                .unwrap_or_else(|| self.source.clone());
            if to_replace.is_read_only() != self.target.is_read_only() {
                let _ = self
                    .graph
                    .set_read_only(&self.target, to_replace.is_read_only());
            }
            let r = if can_replace(&self.source, &to_replace) {
                self.graph
                    .replace(&to_replace, &self.target)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "Can no longer replace '{}' by '{}', because it can no longer be \
                     guaranteed that doing so would not lead to an abrupt change of visible data",
                    to_replace.name(),
                    self.target.name()
                ))
            };
            if let Err(e) = r {
                ferrite_block::report::error_report(&e);
                result = Err(ferrite_qapi::os_msg(&io::Error::from_raw_os_error(
                    libc::EPERM,
                )));
            }
        }
        let replaced = self.to_replace.borrow_mut().take();
        if let Some(n) = &replaced {
            self.graph.unblock(n, COMPLETE_BLOCKER);
        }
        self.release_nodes(job);
        if let Err(e) = self.graph.remove_filter(&self.filter).await {
            tracing::warn!(error = %e, "mirror: taking the filter out");
        }
        if abort && self.base_ro && !self.target.is_read_only() {
            let _ = self.graph.reopen_read_only(&self.target).await;
        }
        let switched = self.should_complete.get() && !abort && result.is_ok();
        if switched {
            // What the target replaced (and, for a commit, the layers above the base) goes
            // unless the user added it.
            // The source was written up to the switch: its caches go to disk first.
            self.graph.close_inline(&self.source).await;
            if let Some(n) = &replaced {
                self.graph.close_inline(n).await;
            }
        }
        if self.drop_target && !switched {
            self.graph.close_inline(&self.target).await;
        } else if self.drop_target {
            self.graph.release_inline(&self.target);
        }
        self.held.borrow_mut().clear();
        self.in_drain.set(false);
        result
    }

    /// Lets go of every node the job held and blocked.
    fn release_nodes(&self, job: &Job) {
        let reason = blocker(self.kind);
        for n in std::mem::take(&mut *self.blocked.borrow_mut()) {
            self.graph.unblock(&n, &reason);
        }
        job.remove_nodes(&self.graph);
    }
}

/// Whether `to_replace` shows the same data as `source` (they are the same node, or only
/// filters lie between them; QEMU: `bdrv_recurse_can_replace`).
pub(crate) fn can_replace(source: &Rc<Node>, to_replace: &Rc<Node>) -> bool {
    if Rc::ptr_eq(source, to_replace) {
        return true;
    }
    match source.filtered() {
        Some(f) => can_replace(&f, to_replace),
        None => source.driver().can_replace_child(source, to_replace),
    }
}

impl JobDriver for MirrorJob {
    fn job_type(&self) -> JobType {
        self.kind
    }

    fn is_block_job(&self) -> bool {
        true
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move {
            let r = self.work(&job).await;
            if let Err(e) = &r
                && self.shared.failure.borrow().is_none()
            {
                *self.shared.failure.borrow_mut() = Some(e.clone());
            }
            self.settle().await;
            r
        })
    }

    fn prepare(self: Rc<Self>, job: Rc<Job>) -> PhaseFuture<Result<(), String>> {
        Box::pin(async move { self.exit(&job, false).await })
    }

    fn abort(self: Rc<Self>, job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async move {
            let _ = self.exit(&job, true).await;
        })
    }

    fn complete(&self, job: &Job) -> Result<()> {
        if !job.is_ready() {
            return Err(Error::CannotComplete(job.id().to_owned()));
        }
        if let Some(name) = &self.replaces {
            let node = self
                .graph
                .find(name)
                .ok_or_else(|| Error::ReplacedNodeGone(name.clone()))?;
            self.graph.block(&node, COMPLETE_BLOCKER);
            *self.to_replace.borrow_mut() = Some(node);
        }
        self.should_complete.set(true);
        job.enter();
        Ok(())
    }

    fn change(&self, _job: &Job, opts: &Args) -> Result<()> {
        let want = opts
            .opt_str("copy-mode")
            .and_then(MirrorCopyMode::parse)
            .unwrap_or(MirrorCopyMode::Background);
        let now = self.shared.copy_mode.get();
        if want == now {
            return Ok(());
        }
        if want != MirrorCopyMode::WriteBlocking {
            return Err(Error::CopyModeChange(want.as_str()));
        }
        self.shared.copy_mode.set(want);
        Ok(())
    }

    fn cancel(&self, job: &Job, force: bool) -> bool {
        // Before `ready` every cancel is forced; after it, a soft one completes without
        // switching.
        let force = force || !job.is_ready();
        if force {
            self.target.cancel_in_flight();
        }
        force
    }

    fn has_io_in_flight(&self) -> bool {
        self.in_flight.get() > 0
    }

    fn in_own_drain(&self) -> bool {
        self.in_drain.get()
    }

    fn block_info(&self, _job: &Job) -> Option<QDict> {
        (self.kind == JobType::Mirror)
            .then(|| QDict::new().with("actively-synced", self.shared.actively_synced.get()))
    }
}
