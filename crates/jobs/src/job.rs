//! A job (QEMU: `Job`, `BlockJob`; job.c, blockjob.c): its state, progress, pause points,
//! rate limit and error policy, and the nodes it works on.
//!
//! A job holds an edge to each node it works on ([`Job::add_node`]); through those edges a
//! drained section of any of them pauses the job at its next pause point, and the drain
//! waits until it has (QEMU's `child_job` class). What a kind of job does is its
//! [`JobDriver`], in QEMU's phases: `run`, then `prepare`, then `commit` or `abort`, then
//! `clean`; jobs that reach `ready` also answer `complete` and `change`.

use crate::error::{Error, Result};
use crate::events::{BlockJobError, BlockJobProgress, JobStatusChange};
use crate::manager::JobManager;
use crate::state::{Status, Verb};
use crate::types::{BlockErrorAction, IoOperationType, JobType};
use ferrite_block::{Child, Graph, IoStatus, Node, Perm, RootParent, Vertex, VertexKind};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use tokio::sync::Notify;

/// The job's main work: `Ok` when done, `Err(text)` on failure.
pub type JobFuture = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// A finalization phase.
pub type PhaseFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// What a kind of job does; the state machine around it is [`Job`]'s.
pub trait JobDriver {
    /// The `JobType` name (`create`, `backup`...).
    fn job_type(&self) -> JobType;

    /// Block jobs (backup...) also show in `query-block-jobs`, answer `block-job-*` and emit
    /// `BLOCK_JOB_*` events.
    fn is_block_job(&self) -> bool {
        false
    }

    /// What the work does at once as the job starts, before anything could run beside it
    /// (QEMU's job coroutine runs until it first yields before `job_start` returns): a
    /// `query-jobs` right after the job's command sees it.
    fn begin(&self, _job: &Job) {}

    /// The main work. It should call [`Job::pause_point`] between steps so that pause and
    /// cancel take effect.
    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture;

    /// After every job of the transaction finished its work: the last step that may still
    /// fail (QEMU: `.prepare`; mirror's graph switch).
    fn prepare(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// The transaction succeeded: make the result permanent.
    fn commit(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async {})
    }

    /// The transaction failed or was cancelled: take back what can be.
    fn abort(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async {})
    }

    /// Either way, last: release what the job held.
    fn clean(self: Rc<Self>, _job: Rc<Job>) -> PhaseFuture<()> {
        Box::pin(async {})
    }

    /// The job is dismissed (QEMU: `block_job_free`): it lets go of what it held until the
    /// user took it away. Most jobs let go of everything in `clean` already.
    fn free(&self, _job: &Job) {}

    /// `job-complete` on a job in `ready`.
    ///
    /// # Errors
    /// QEMU's text for jobs without a completion step.
    fn complete(&self, job: &Job) -> Result<()> {
        Err(Error::CannotComplete(job.id().to_owned()))
    }

    /// `block-job-change`.
    ///
    /// # Errors
    /// QEMU's text for jobs without options to change.
    fn change(&self, _job: &Job, _opts: &Args) -> Result<()> {
        Err(Error::ChangeUnsupported)
    }

    /// A cancel request: returns whether it is forced. Jobs without a soft cancel treat
    /// every cancel as forced; mirror after `ready` turns a soft one into its own kind of
    /// ending (it completes without switching).
    fn cancel(&self, _job: &Job, _force: bool) -> bool {
        true
    }

    /// Whether the job has requests of its own in flight that a drain must wait for even
    /// while the job is paused (mirror's copies).
    fn has_io_in_flight(&self) -> bool {
        false
    }

    /// Whether the job itself holds the drained section that is asking (mirror converging
    /// before it completes): it must not wait for itself.
    fn in_own_drain(&self) -> bool {
        false
    }

    /// Members `query-block-jobs` adds for this kind of job (mirror's `actively-synced`).
    fn block_info(&self, _job: &Job) -> Option<QDict> {
        None
    }
}

/// Jobs that complete or fail as one (QEMU: `JobTxn`). Every job has one; a grouped
/// transaction's backups share theirs.
#[derive(Default)]
pub struct JobTxn {
    pub(crate) jobs: RefCell<Vec<Weak<Job>>>,
    /// One member failed: the others are being cancelled and finalized with it.
    pub(crate) aborting: Cell<bool>,
}

impl JobTxn {
    pub(crate) fn members(&self) -> Vec<Rc<Job>> {
        self.jobs
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    pub(crate) fn remove(&self, job: &Job) {
        self.jobs
            .borrow_mut()
            .retain(|w| !std::ptr::eq(w.as_ptr(), job));
    }
}

/// What a block job does when a request fails (`on-source-error`, `on-target-error`).
pub type ErrorPolicy = ferrite_block::OnError;

/// Rate limiting works in slices of this length (QEMU's).
const SLICE: std::time::Duration = std::time::Duration::from_millis(100);

/// One job.
///
/// # Invariants
/// - `status` changes only through `Job::transition`, along the table of
///   `Status::can_become`, each change announced with `JOB_STATUS_CHANGE`.
/// - `pause_count` counts the user's pause (at most one, `user_paused`) and every drained
///   section that reached the job through one of its node edges.
/// - `busy` is false only where the job's work waits at a pause point, sleeps, or has not
///   started: a drain need not wait for it then.
pub struct Job {
    pub(crate) me: Weak<Job>,
    pub(crate) id: String,
    pub(crate) driver: Rc<dyn JobDriver>,
    pub(crate) status: Cell<Status>,
    current: Cell<u64>,
    total: Cell<u64>,
    /// Why the job failed (`job->err`); set with `failed`.
    pub(crate) error: RefCell<Option<String>>,
    pub(crate) failed: Cell<bool>,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) cancelled: Cell<bool>,
    /// The cancel is forced (QEMU's `force_cancel`): the job stops without finishing.
    pub(crate) force_cancel: Cell<bool>,
    pub(crate) user_paused: Cell<bool>,
    pub(crate) pause_count: Cell<u32>,
    pub(crate) busy: Cell<bool>,
    pub(crate) started: Cell<bool>,
    /// The work has returned and its completion was taken up.
    pub(crate) deferred: Cell<bool>,
    pub(crate) wake: Notify,
    pub(crate) manager: Weak<JobManager>,
    /// Rate limit in bytes per second (0: none).
    pub(crate) speed: Cell<u64>,
    /// The current rate-limit slice: its start, its end and the bytes dispatched in it.
    slice: Cell<(tokio::time::Instant, tokio::time::Instant, u64)>,
    /// Raised when the work has returned, and when the job concluded.
    pub(crate) changed: Notify,
    pub(crate) txn: Rc<JobTxn>,
    pub(crate) io_status: Cell<IoStatus>,
    /// Edges to the nodes the job works on (QEMU's `job->nodes`).
    edges: RefCell<Vec<Rc<Child>>>,
    pub(crate) order: u64,
}

impl Job {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        me: &Weak<Job>,
        id: String,
        driver: Rc<dyn JobDriver>,
        opts: &crate::JobOptions,
        manager: Weak<JobManager>,
        txn: Rc<JobTxn>,
        order: u64,
    ) -> Job {
        let now = tokio::time::Instant::now();
        Job {
            me: me.clone(),
            id,
            driver,
            status: Cell::new(Status::Undefined),
            current: Cell::new(0),
            total: Cell::new(0),
            error: RefCell::new(None),
            failed: Cell::new(false),
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            cancelled: Cell::new(false),
            force_cancel: Cell::new(false),
            user_paused: Cell::new(false),
            pause_count: Cell::new(0),
            busy: Cell::new(false),
            started: Cell::new(false),
            deferred: Cell::new(false),
            wake: Notify::new(),
            manager,
            speed: Cell::new(opts.speed),
            slice: Cell::new((now, now, 0)),
            changed: Notify::new(),
            txn,
            io_status: Cell::new(IoStatus::Ok),
            edges: RefCell::new(Vec::new()),
            order,
        }
    }

    /// The job ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The current state.
    pub fn status(&self) -> Status {
        self.status.get()
    }

    /// Sets the progress (`current-progress`, `total-progress`).
    pub fn set_progress(&self, current: u64, total: u64) {
        self.current.set(current);
        self.total.set(total);
    }

    /// Whether the job was cancelled by force: it stops at once and ends cancelled (QEMU:
    /// `job_is_cancelled`).
    pub fn is_cancelled(&self) -> bool {
        self.force_cancel.get()
    }

    /// Whether any cancel was asked for, a soft one included (QEMU: `job_cancel_requested`).
    pub fn cancel_requested(&self) -> bool {
        self.cancelled.get()
    }

    /// Whether the job is `ready` (or `standby`, ready but paused).
    pub fn is_ready(&self) -> bool {
        matches!(self.status.get(), Status::Ready | Status::Standby)
    }

    /// Whether something (the user, a drain) asks the job to pause at its next pause point.
    pub fn pause_requested(&self) -> bool {
        self.should_pause()
    }

    /// Done `bytes` more of the work.
    pub fn progress_update(&self, bytes: u64) {
        self.current.set(self.current.get() + bytes);
        if self.current.get() > self.total.get() {
            self.total.set(self.current.get());
        }
    }

    /// `bytes` of work remain (the total is what is done plus that).
    pub fn progress_set_remaining(&self, bytes: u64) {
        self.total.set(self.current.get() + bytes);
    }

    /// `bytes` more work turned up.
    pub fn progress_increase_remaining(&self, bytes: u64) {
        self.total.set(self.total.get() + bytes);
    }

    /// The job has converged: `ready` and `BLOCK_JOB_READY` (QEMU:
    /// `job_transition_to_ready`).
    pub fn transition_to_ready(&self) {
        self.transition(Status::Ready);
        if self.driver.is_block_job()
            && let Some(m) = self.manager.upgrade()
        {
            m.events
                .emit(&crate::events::BlockJobReady(self.progress()));
        }
    }

    /// Sleeps up to `d`, not busy meanwhile; wakes early when the job is resumed, paused,
    /// cancelled or completed, or `also` is notified (QEMU: `job_sleep_ns`).
    pub async fn sleep(&self, d: std::time::Duration, also: &Notify) {
        if self.is_cancelled() {
            return;
        }
        self.set_busy(false);
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.wake.notified() => {}
            () = also.notified() => {}
        }
        self.set_busy(true);
    }

    /// Wakes the job where it sleeps or waits to be resumed.
    pub fn enter(&self) {
        self.wake.notify_waiters();
    }

    /// Whether the job finished its work (QEMU: `job_is_completed`).
    pub fn is_completed(&self) -> bool {
        matches!(
            self.status.get(),
            Status::Waiting | Status::Pending | Status::Aborting | Status::Concluded | Status::Null
        )
    }

    /// The rate limit (bytes per second, 0 for none).
    pub fn speed(&self) -> u64 {
        self.speed.get()
    }

    /// Works on `node` from now on: holds an edge named `name` to it, taking `perm` and
    /// sharing `shared`; drained sections of the node pause the job (QEMU:
    /// `block_job_add_bdrv`).
    ///
    /// # Errors
    /// A permission conflict.
    pub fn add_node(
        &self,
        graph: &Graph,
        node: &Rc<Node>,
        name: &str,
        perm: Perm,
        shared: Perm,
    ) -> Result<()> {
        let me: Weak<dyn RootParent> = self.me.clone();
        let edge = graph.attach_root(node, me, name, perm, shared)?;
        self.edges.borrow_mut().push(edge);
        Ok(())
    }

    /// Whether the job works on `node` (QEMU: `block_job_has_bdrv`).
    pub fn has_node(&self, node: &ferrite_block::Node) -> bool {
        self.edges
            .borrow()
            .iter()
            .any(|e| std::ptr::eq(Rc::as_ptr(&e.node()), node))
    }

    /// Lets go of every node the job works on (QEMU: `block_job_remove_all_bdrv`).
    pub fn remove_nodes(&self, graph: &Graph) {
        let edges = std::mem::take(&mut *self.edges.borrow_mut());
        for e in edges.iter().rev() {
            graph.detach_edge(e);
        }
    }

    /// Accounts `bytes` just moved and waits as long as the rate limit then asks (QEMU's
    /// ratelimit, as stream, commit and mirror use it: 100 ms slices; a slice overrun by a
    /// big chunk stretches until the average holds). Wakes early when the speed changes, or
    /// the job is cancelled or paused.
    pub async fn rate_limit(&self, bytes: u64) {
        self.rate_limit_account(bytes);
        self.wait_for_quota().await;
    }

    /// Waits while the current slice is over its quota, then accounts `bytes` about to be
    /// moved (block-copy's order, for backup: a chunk waits only for the chunks before it).
    pub async fn rate_limit_before(&self, bytes: u64) {
        self.wait_for_quota().await;
        self.rate_limit_account(bytes);
    }

    /// Accounts `bytes` moved without waiting, in the slice they were moved in (a new one
    /// if the last has ended): the next wait is for them (mirror's iteration issues a whole
    /// run of chunks, then its loop sleeps).
    pub fn rate_limit_account(&self, bytes: u64) {
        if self.speed.get() == 0 || self.is_cancelled() {
            return;
        }
        let now = tokio::time::Instant::now();
        let (mut start, mut end, mut used) = self.slice.get();
        if end < now {
            (start, end, used) = (now, now + SLICE, 0);
        }
        self.slice.set((start, end, used + bytes));
    }

    /// Sleeps while the current slice is over its quota (so even the first chunk of a slow
    /// job makes the next one wait): the slice stretches until the average holds.
    async fn wait_for_quota(&self) {
        loop {
            let speed = self.speed.get();
            if speed == 0 || self.is_cancelled() {
                return;
            }
            self.rate_limit_account(0);
            let quota = (speed / 10).max(1);
            let (start, _, used) = self.slice.get();
            if used < quota {
                return;
            }
            let end = start + SLICE.mul_f64(used as f64 / quota as f64);
            self.slice.set((start, end, used));
            self.set_busy(false);
            tokio::select! {
                () = tokio::time::sleep_until(end) => {}
                () = self.wake.notified() => {}
            }
            self.set_busy(true);
            self.pause_point().await;
        }
    }

    /// A request failed: `BLOCK_JOB_ERROR`, then what `policy` says. `Ok` means retry
    /// (after the user resumed a stopped job).
    ///
    /// # Errors
    /// The error's text when the policy reports it.
    pub async fn io_error(
        &self,
        read: bool,
        error: &std::io::Error,
        policy: ErrorPolicy,
    ) -> Result<(), String> {
        match self.error_action(read, error, policy) {
            BlockErrorAction::Report => Err(ferrite_qapi::os_msg(error)),
            BlockErrorAction::Stop => {
                self.pause_point().await;
                Ok(())
            }
            BlockErrorAction::Ignore => {
                // Retrying at once would spin on a lasting error.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                Ok(())
            }
        }
    }

    /// A request failed where the job's work cannot wait (one of several in flight):
    /// `BLOCK_JOB_ERROR`, and for `stop` the job pauses at its next pause point, stopped
    /// once however many requests fail (QEMU: `block_job_error_action`). The caller acts
    /// on `report` and `ignore`.
    pub fn error_action(
        &self,
        read: bool,
        error: &std::io::Error,
        policy: ErrorPolicy,
    ) -> BlockErrorAction {
        use ferrite_block::OnError;
        let nospace = error.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            OnError::Ignore => BlockErrorAction::Ignore,
            OnError::Stop => BlockErrorAction::Stop,
            OnError::Enospc if nospace => BlockErrorAction::Stop,
            _ => BlockErrorAction::Report,
        };
        if action == BlockErrorAction::Stop {
            if !self.user_paused.get() {
                self.user_paused.set(true);
                self.pause_count.set(self.pause_count.get() + 1);
            }
            self.io_status.set(if nospace {
                IoStatus::NoSpace
            } else {
                IoStatus::Failed
            });
        }
        if let Some(m) = self.manager.upgrade() {
            m.events.emit(&BlockJobError {
                device: self.id.clone(),
                operation: if read {
                    IoOperationType::Read
                } else {
                    IoOperationType::Write
                },
                action,
            });
        }
        action
    }

    /// Sleeps until cancelled (a job with nothing to do in the background), yielding to
    /// pause requests.
    pub async fn wait_cancelled(&self) {
        while !self.cancelled.get() {
            self.set_busy(false);
            self.wake.notified().await;
            self.set_busy(true);
            self.pause_point().await;
        }
    }

    /// Whether the job should stop at its next pause point.
    fn should_pause(&self) -> bool {
        self.pause_count.get() > 0 && !self.is_cancelled()
    }

    /// Where the job's work yields to pause requests: waits while paused.
    pub async fn pause_point(&self) {
        while self.should_pause() {
            self.enter_pause();
            self.set_busy(false);
            self.wake.notified().await;
        }
        // From here on the job runs again (it may have been resumed before it first ran,
        // as a job started inside a drained section is).
        self.busy.set(true);
        self.unpause();
    }

    /// The state change of a job stopping at a pause point.
    pub(crate) fn enter_pause(&self) {
        match self.status.get() {
            Status::Running => self.transition(Status::Paused),
            Status::Ready => self.transition(Status::Standby),
            _ => {}
        }
    }

    pub(crate) fn set_busy(&self, busy: bool) {
        self.busy.set(busy);
        if !busy {
            ferrite_block::notify_progress();
        }
    }

    /// Back to running (or ready) once nothing holds the job paused.
    pub(crate) fn unpause(&self) {
        if self.pause_count.get() == 0 || self.is_cancelled() {
            match self.status.get() {
                Status::Paused => self.transition(Status::Running),
                Status::Standby => self.transition(Status::Ready),
                _ => {}
            }
        }
    }

    /// One more reason to pause (QEMU: `job_pause`). A job that is idle pauses at once: in
    /// QEMU it is entered and reaches its pause point before the caller goes on.
    pub(crate) fn pause(&self) {
        self.pause_count.set(self.pause_count.get() + 1);
        if self.started.get() && !self.busy.get() && !self.deferred.get() {
            self.enter_pause();
        }
        self.wake.notify_waiters();
    }

    /// One reason to pause less (QEMU: `job_resume`).
    pub(crate) fn resume(&self) {
        self.pause_count
            .set(self.pause_count.get().saturating_sub(1));
        if self.pause_count.get() == 0 {
            self.unpause();
            self.wake.notify_waiters();
        }
    }

    /// Goes to state `to` and announces it.
    pub(crate) fn transition(&self, to: Status) {
        let from = self.status.get();
        debug_assert!(from.can_become(to), "job {}: {from:?} -> {to:?}", self.id);
        self.status.set(to);
        if from == to {
            return;
        }
        if let Some(m) = self.manager.upgrade() {
            m.events.emit(&JobStatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
    }

    /// QEMU's "Job 'x' in state 'y' cannot accept command verb 'z'".
    pub(crate) fn check_verb(&self, verb: Verb) -> Result<()> {
        let s = self.status.get();
        if s.accepts(verb) {
            return Ok(());
        }
        Err(Error::VerbRefused {
            id: self.id.clone(),
            state: s.as_str(),
            verb: verb.as_str(),
        })
    }

    /// Records a failure (the first one's text stays).
    pub(crate) fn fail(&self, error: String) {
        self.failed.set(true);
        if self.error.borrow().is_none() {
            *self.error.borrow_mut() = Some(error);
        }
    }

    /// Where the block job is, as its events say it.
    pub(crate) fn progress(&self) -> BlockJobProgress {
        BlockJobProgress {
            kind: self.driver.job_type(),
            device: self.id.clone(),
            len: self.total.get(),
            offset: self.current.get(),
            speed: self.speed.get(),
        }
    }

    /// `BlockJobInfo` for `query-block-jobs`.
    pub fn block_info(&self) -> QDict {
        let mut d = QDict::new()
            .with("device", self.id.as_str())
            .with("len", self.total.get())
            .with("offset", self.current.get())
            .with("speed", self.speed.get())
            .with("type", self.driver.job_type().as_str())
            .with("busy", self.busy.get())
            .with("paused", self.pause_count.get() > 0)
            .with("io-status", self.io_status.get().as_str())
            .with(
                "ready",
                matches!(self.status.get(), Status::Ready | Status::Standby),
            )
            .with("status", self.status.get().as_str())
            .with("auto-finalize", self.auto_finalize)
            .with("auto-dismiss", self.auto_dismiss);
        if let Some(e) = self.error.borrow().as_ref() {
            d.insert("error", e.as_str());
        }
        if let Some(extra) = self.driver.block_info(self) {
            for (k, v) in extra.iter() {
                d.insert(k, v.clone());
            }
        }
        d
    }

    /// `JobInfo` for `query-jobs`.
    pub fn info(&self) -> QDict {
        let mut d = QDict::new()
            .with("id", self.id.as_str())
            .with("type", self.driver.job_type().as_str())
            .with("status", self.status.get().as_str())
            .with("current-progress", self.current.get())
            .with("total-progress", self.total.get());
        if let Some(e) = self.error.borrow().as_ref() {
            d.insert("error", e.as_str());
        }
        d
    }
}

impl RootParent for Job {
    fn description(&self) -> String {
        // QEMU: child_job_get_parent_desc.
        format!("{} job '{}'", self.driver.job_type().as_str(), self.id)
    }

    fn drained_begin(&self) {
        self.pause();
    }

    fn drained_end(&self) {
        self.resume();
    }

    fn drained_poll(&self) -> bool {
        // An idle or finished job sends no request before it pauses (QEMU:
        // child_job_drained_poll), unless requests it sent are still in flight.
        if self.is_completed() {
            return false;
        }
        (self.busy.get() && !self.driver.in_own_drain()) || self.driver.has_io_in_flight()
    }

    fn stays_at_node(&self) -> bool {
        true
    }

    fn vertex(&self) -> Vertex {
        Vertex {
            kind: VertexKind::BlockJob,
            name: self.id.clone(),
            key: self.me.as_ptr() as usize,
            order: self.order,
        }
    }
}
