//! A job and the registry of jobs: life cycle (created, running, waiting, pending,
//! concluded, null, or aborting), user verbs, events and `query-jobs` (QEMU's job.c and
//! job-qmp.c).

use crate::state::{Status, Verb};
use ferrite_block::EventSink;
use ferrite_qapi::{Error, id_wellformed};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use tokio::sync::Notify;

/// The job's main work: `Ok` when done, `Err(text)` on failure.
pub type JobFuture = Pin<Box<dyn Future<Output = Result<(), String>>>>;

/// What a kind of job does; the state machine around it is [`Job`]'s.
pub trait JobDriver {
    /// The `JobType` name (`create`, `backup`...).
    fn job_type(&self) -> &'static str;

    /// The main work. It should call [`Job::pause_point`] between steps so that pause and
    /// cancel take effect.
    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture;

    /// Block jobs (backup...) also show in `query-block-jobs`, answer `block-job-*` and emit
    /// `BLOCK_JOB_*` events.
    fn is_block_job(&self) -> bool {
        false
    }
}

/// One job.
pub struct Job {
    id: String,
    driver: Rc<dyn JobDriver>,
    status: Cell<Status>,
    current: Cell<u64>,
    total: Cell<u64>,
    error: RefCell<Option<String>>,
    auto_finalize: bool,
    auto_dismiss: bool,
    cancelled: Cell<bool>,
    user_paused: Cell<bool>,
    pause_count: Cell<u32>,
    busy: Cell<bool>,
    wake: Notify,
    manager: std::rc::Weak<JobManager>,
    /// Rate limit in bytes per second (0: none).
    speed: Cell<u64>,
    /// The current rate-limit slice: its start, its end and the bytes dispatched in it.
    slice: Cell<(tokio::time::Instant, tokio::time::Instant, u64)>,
    /// Set when the job has finished (concluded or gone).
    done: Notify,
    /// The jobs that complete or fail together with this one (`completion-mode: grouped`).
    txn: Option<Rc<JobTxn>>,
    /// `ok`, or why the job stopped on an error (`failed`, `nospace`).
    io_status: Cell<&'static str>,
}

/// Jobs that complete or fail as one (a grouped transaction's backups).
#[derive(Default)]
pub struct JobTxn {
    jobs: RefCell<Vec<std::rc::Weak<Job>>>,
}

impl JobTxn {
    fn members(&self) -> Vec<Rc<Job>> {
        self.jobs
            .borrow()
            .iter()
            .filter_map(std::rc::Weak::upgrade)
            .collect()
    }
}

/// What a block job does when a request fails (`on-source-error`, `on-target-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorPolicy {
    /// Fail the job (also `auto`: a storage daemon's devices report).
    Report,
    /// Carry on, retrying what failed.
    Ignore,
    /// Pause the job as if the user had, until `block-job-resume`.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

impl ErrorPolicy {
    /// From the QAPI value (absent: report).
    pub fn parse(v: Option<&str>) -> ErrorPolicy {
        match v {
            Some("ignore") => ErrorPolicy::Ignore,
            Some("stop") => ErrorPolicy::Stop,
            Some("enospc") => ErrorPolicy::Enospc,
            _ => ErrorPolicy::Report,
        }
    }
}

/// Rate limiting works in slices of this length (QEMU's).
const SLICE: std::time::Duration = std::time::Duration::from_millis(100);

impl Job {
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

    /// Whether cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.get()
    }

    /// The rate limit (bytes per second, 0 for none).
    pub fn speed(&self) -> u64 {
        self.speed.get()
    }

    /// Waits as long as the rate limit asks before moving `bytes`, then accounts them
    /// (QEMU's ratelimit: 100 ms slices; a slice overrun by a big chunk stretches until the
    /// average holds). Wakes early when the speed changes, or the job is cancelled or paused.
    pub async fn rate_limit(&self, bytes: u64) {
        loop {
            let speed = self.speed.get();
            if speed == 0 || self.cancelled.get() {
                return;
            }
            let quota = (speed / 10).max(1);
            let now = tokio::time::Instant::now();
            let (mut start, mut end, mut used) = self.slice.get();
            if end < now {
                (start, end, used) = (now, now + SLICE, 0);
            }
            if used < quota {
                self.slice.set((start, end, used + bytes));
                return;
            }
            let slices = used as f64 / quota as f64;
            end = start + SLICE.mul_f64(slices);
            self.slice.set((start, end, used));
            self.busy.set(false);
            tokio::select! {
                () = tokio::time::sleep_until(end) => {}
                () = self.wake.notified() => {}
            }
            self.busy.set(true);
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
        let nospace = error.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc if nospace => "stop",
            _ => "report",
        };
        if action == "stop" {
            self.user_paused.set(true);
            self.pause_count.set(self.pause_count.get() + 1);
            self.io_status
                .set(if nospace { "nospace" } else { "failed" });
        }
        if let Some(m) = self.manager.upgrade() {
            m.events.emit(
                "BLOCK_JOB_ERROR",
                QDict::new()
                    .with("device", self.id.as_str())
                    .with("operation", if read { "read" } else { "write" })
                    .with("action", action),
            );
        }
        match action {
            "report" => Err(ferrite_qapi::os_msg(error)),
            "stop" => {
                self.pause_point().await;
                Ok(())
            }
            _ => {
                // Retrying at once would spin on a lasting error.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                Ok(())
            }
        }
    }

    /// A pause and resume as QEMU's drain at a block job's start shows them to clients
    /// (`paused`, `running`).
    pub fn drain_blip(&self) {
        if self.status.get() == Status::Running {
            self.transition(Status::Paused);
            self.transition(Status::Running);
        }
    }

    /// Sleeps until cancelled (a job with nothing to do in the background), yielding to
    /// pause requests.
    pub async fn wait_cancelled(&self) {
        while !self.cancelled.get() {
            self.busy.set(false);
            self.wake.notified().await;
            self.busy.set(true);
            self.pause_point().await;
        }
    }

    /// Where the job's work yields to pause requests: waits while paused.
    pub async fn pause_point(&self) {
        while self.pause_count.get() > 0 && !self.cancelled.get() {
            match self.status.get() {
                Status::Running => self.transition(Status::Paused),
                Status::Ready => self.transition(Status::Standby),
                _ => {}
            }
            self.busy.set(false);
            self.wake.notified().await;
            self.busy.set(true);
        }
        self.unpause();
    }

    /// Back to running (or ready) once nothing holds the job paused.
    fn unpause(&self) {
        if self.pause_count.get() == 0 || self.cancelled.get() {
            match self.status.get() {
                Status::Paused => self.transition(Status::Running),
                Status::Standby => self.transition(Status::Ready),
                _ => {}
            }
        }
    }

    fn transition(&self, to: Status) {
        let from = self.status.get();
        debug_assert!(from.can_become(to), "job {}: {from:?} -> {to:?}", self.id);
        self.status.set(to);
        if let Some(m) = self.manager.upgrade() {
            m.events.emit(
                "JOB_STATUS_CHANGE",
                QDict::new()
                    .with("id", self.id.as_str())
                    .with("status", to.as_str()),
            );
        }
    }

    fn check_verb(&self, verb: Verb) -> Result<(), Error> {
        let s = self.status.get();
        if s.accepts(verb) {
            return Ok(());
        }
        Err(Error::generic(format!(
            "Job '{}' in state '{}' cannot accept command verb '{}'",
            self.id,
            s.as_str(),
            verb.as_str()
        )))
    }

    fn block_event_data(&self) -> QDict {
        QDict::new()
            .with("device", self.id.as_str())
            .with("len", self.total.get())
            .with("offset", self.current.get())
            .with("speed", self.speed.get())
            .with("type", self.driver.job_type())
    }

    /// `BlockJobInfo` for `query-block-jobs`.
    pub fn block_info(&self) -> QDict {
        let mut d = self
            .block_event_data()
            .with("busy", self.busy.get())
            .with("paused", self.pause_count.get() > 0)
            .with("io-status", self.io_status.get())
            .with("ready", false)
            .with("status", self.status.get().as_str())
            .with("auto-finalize", self.auto_finalize)
            .with("auto-dismiss", self.auto_dismiss);
        if let Some(e) = self.error.borrow().as_ref() {
            d.insert("error", e.as_str());
        }
        d
    }

    /// `JobInfo` for `query-jobs`.
    pub fn info(&self) -> QDict {
        let mut d = QDict::new()
            .with("id", self.id.as_str())
            .with("type", self.driver.job_type())
            .with("status", self.status.get().as_str())
            .with("current-progress", self.current.get())
            .with("total-progress", self.total.get());
        if let Some(e) = self.error.borrow().as_ref() {
            d.insert("error", e.as_str());
        }
        d
    }
}

/// Every job, by ID.
pub struct JobManager {
    jobs: RefCell<Vec<Rc<Job>>>,
    events: Rc<dyn EventSink>,
}

/// How to start a job.
pub struct JobOptions {
    pub id: String,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Rate limit in bytes per second (block jobs; 0: none).
    pub speed: u64,
}

impl JobManager {
    /// No jobs yet; events go to `events`.
    pub fn new(events: Rc<dyn EventSink>) -> Rc<JobManager> {
        Rc::new(JobManager {
            jobs: RefCell::new(Vec::new()),
            events,
        })
    }

    /// A job by ID (`job-*` commands: "Job not found").
    ///
    /// # Errors
    /// QEMU's "Job not found".
    pub fn find(&self, id: &str) -> Result<Rc<Job>, Error> {
        self.jobs
            .borrow()
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| Error::generic("Job not found"))
    }

    /// Checks a new job's ID: well formed and unused.
    ///
    /// # Errors
    /// QEMU's "Invalid job ID" and "Job ID already in use".
    pub fn check_id(&self, id: &str) -> Result<(), Error> {
        if !id_wellformed(id) {
            return Err(Error::generic(format!("Invalid job ID '{id}'")));
        }
        if self.jobs.borrow().iter().any(|j| j.id == id) {
            return Err(Error::generic(format!("Job ID '{id}' already in use")));
        }
        Ok(())
    }

    /// Creates and starts a job: `created`, `running`, then its work in the background.
    ///
    /// # Errors
    /// A bad or duplicate ID.
    pub fn start(
        self: &Rc<Self>,
        opts: JobOptions,
        driver: Rc<dyn JobDriver>,
    ) -> Result<Rc<Job>, Error> {
        let job = self.create(opts, driver, None)?;
        self.run_job(&job);
        Ok(job)
    }

    /// Creates a job (`created`) without starting it: a transaction starts its jobs only
    /// once every action is prepared. Jobs sharing `txn` complete or fail together.
    ///
    /// # Errors
    /// A bad or duplicate ID.
    pub fn create(
        self: &Rc<Self>,
        opts: JobOptions,
        driver: Rc<dyn JobDriver>,
        txn: Option<Rc<JobTxn>>,
    ) -> Result<Rc<Job>, Error> {
        self.check_id(&opts.id)?;
        let job = Rc::new(Job {
            id: opts.id,
            driver,
            status: Cell::new(Status::Undefined),
            current: Cell::new(0),
            total: Cell::new(0),
            error: RefCell::new(None),
            auto_finalize: opts.auto_finalize,
            auto_dismiss: opts.auto_dismiss,
            cancelled: Cell::new(false),
            user_paused: Cell::new(false),
            pause_count: Cell::new(0),
            busy: Cell::new(true),
            wake: Notify::new(),
            manager: Rc::downgrade(self),
            speed: Cell::new(opts.speed),
            slice: Cell::new((tokio::time::Instant::now(), tokio::time::Instant::now(), 0)),
            done: Notify::new(),
            txn: txn.clone(),
            io_status: Cell::new("ok"),
        });
        if let Some(t) = &txn {
            t.jobs.borrow_mut().push(Rc::downgrade(&job));
        }
        self.jobs.borrow_mut().push(job.clone());
        job.transition(Status::Created);
        Ok(job)
    }

    /// Starts a created job: `running`, then its work in the background.
    pub fn run_job(self: &Rc<Self>, job: &Rc<Job>) {
        job.transition(Status::Running);
        let me = self.clone();
        let j = job.clone();
        let driver = job.driver.clone();
        tokio::task::spawn_local(async move {
            let r = driver.run(j.clone()).await;
            me.finish(&j, r).await;
        });
    }

    /// Drops a created job that never started (its transaction failed): it ends without
    /// `BLOCK_JOB_*` events.
    pub fn abort_unstarted(&self, job: &Rc<Job>) {
        if job.status.get() != Status::Created {
            return;
        }
        job.cancelled.set(true);
        job.transition(Status::Aborting);
        job.transition(Status::Concluded);
        job.done.notify_waiters();
        self.dismiss_now(job);
    }

    /// After the work: waiting, then (once every job of its transaction is waiting) pending
    /// and finalize now or on `job-finalize`; a failure fails the whole transaction.
    async fn finish(&self, job: &Rc<Job>, r: Result<(), String>) {
        job.busy.set(false);
        let r = if job.cancelled.get() {
            Err(String::new())
        } else {
            r
        };
        match r {
            Ok(()) => {
                job.transition(Status::Waiting);
                let group = job
                    .txn
                    .as_ref()
                    .map_or_else(|| vec![job.clone()], |t| t.members());
                if group.iter().all(|j| j.status.get() == Status::Waiting) {
                    for j in &group {
                        j.transition(Status::Pending);
                    }
                    for j in &group {
                        self.pending(j);
                    }
                }
            }
            Err(e) => {
                if !e.is_empty() {
                    *job.error.borrow_mut() = Some(e);
                } else if job.error.borrow().is_none() {
                    *job.error.borrow_mut() = Some("Operation canceled".into());
                }
                job.transition(Status::Aborting);
                self.fail_group(job);
                self.announce_end(job);
                self.conclude(job);
            }
        }
    }

    /// A pending job: finalized now, or announced and left for `job-finalize`.
    fn pending(&self, job: &Rc<Job>) {
        if job.auto_finalize {
            self.finalize(job);
        } else if job.driver.is_block_job() {
            self.events.emit(
                "BLOCK_JOB_PENDING",
                QDict::new()
                    .with("type", job.driver.job_type())
                    .with("id", job.id.as_str()),
            );
        }
    }

    /// One job of a transaction failed: the others are cancelled; those already done with
    /// their work end at once.
    fn fail_group(&self, failed: &Rc<Job>) {
        let Some(t) = &failed.txn else {
            return;
        };
        for j in t.members() {
            if Rc::ptr_eq(&j, failed) || j.cancelled.get() {
                continue;
            }
            match j.status.get() {
                Status::Waiting | Status::Pending => {
                    j.cancelled.set(true);
                    *j.error.borrow_mut() = Some("Operation canceled".into());
                    j.transition(Status::Aborting);
                    self.announce_end(&j);
                    self.conclude(&j);
                }
                Status::Concluded | Status::Null | Status::Aborting => {}
                _ => self.cancel_job(&j),
            }
        }
    }

    fn finalize(&self, job: &Rc<Job>) {
        self.announce_end(job);
        self.conclude(job);
    }

    /// `BLOCK_JOB_COMPLETED` (success, or failure with its error) or `BLOCK_JOB_CANCELLED`.
    fn announce_end(&self, job: &Job) {
        if !job.driver.is_block_job() {
            return;
        }
        if job.cancelled.get() {
            self.events
                .emit("BLOCK_JOB_CANCELLED", job.block_event_data());
            return;
        }
        let mut d = job.block_event_data();
        if let Some(e) = job.error.borrow().as_ref() {
            d.insert("error", e.as_str());
        }
        self.events.emit("BLOCK_JOB_COMPLETED", d);
    }

    fn conclude(&self, job: &Rc<Job>) {
        job.transition(Status::Concluded);
        job.done.notify_waiters();
        if job.auto_dismiss {
            self.dismiss_now(job);
        }
    }

    fn dismiss_now(&self, job: &Rc<Job>) {
        job.transition(Status::Null);
        self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, job));
    }

    /// Cancels `job` and waits until it has concluded (QEMU's `job_cancel_sync`).
    pub async fn cancel_sync(&self, job: &Rc<Job>) {
        let done = job.done.notified();
        if matches!(job.status.get(), Status::Concluded | Status::Null) {
            return;
        }
        if job.check_verb(Verb::Cancel).is_ok() {
            self.cancel_job(job);
        }
        if !matches!(job.status.get(), Status::Concluded | Status::Null) {
            done.await;
        }
    }

    /// At exit: force-cancels every job still running and waits for them (QSD's quit).
    pub async fn cancel_all(&self) {
        let jobs: Vec<Rc<Job>> = self.jobs.borrow().clone();
        for j in &jobs {
            self.cancel_sync(j).await;
        }
    }

    /// `query-block-jobs`: the block jobs, newest first.
    pub fn query_block(&self) -> QObject {
        QObject::List(
            self.jobs
                .borrow()
                .iter()
                .rev()
                .filter(|j| j.driver.is_block_job())
                .map(|j| QObject::Dict(j.block_info()))
                .collect(),
        )
    }

    /// A block job by its device name (the job ID) for `block-job-*`.
    ///
    /// # Errors
    /// QEMU's `DeviceNotActive` "Block job 'X' not found".
    pub fn find_block(&self, id: &str) -> Result<Rc<Job>, Error> {
        self.jobs
            .borrow()
            .iter()
            .find(|j| j.id == id && j.driver.is_block_job())
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ferrite_qapi::ErrorClass::DeviceNotActive,
                    format!("Block job '{id}' not found"),
                )
            })
    }

    /// `block-job-cancel`: without `force`, a job the user paused refuses.
    ///
    /// # Errors
    /// Unknown job, the state's refusal, or a paused job without force.
    pub fn block_cancel(&self, id: &str, force: bool) -> Result<(), Error> {
        let job = self.find_block(id)?;
        job.check_verb(Verb::Cancel)?;
        if job.user_paused.get() && !force {
            return Err(Error::generic(format!(
                "The block job for device '{id}' is currently paused"
            )));
        }
        self.cancel_job(&job);
        Ok(())
    }

    /// `block-job-set-speed`.
    ///
    /// # Errors
    /// Unknown job, a negative speed, or the state's refusal.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<(), Error> {
        let job = self.find_block(id)?;
        let speed = u64::try_from(speed)
            .map_err(|_| Error::generic("Parameter 'speed' expects a non-negative value"))?;
        job.check_verb(Verb::SetSpeed)?;
        job.speed.set(speed);
        job.wake.notify_waiters();
        Ok(())
    }

    /// `block-job-change`: no job kind here has options to change (mirror's copy-mode would).
    ///
    /// # Errors
    /// Unknown job, the state's refusal, or QEMU's "Job type does not support change".
    pub fn change(&self, id: &str, _args: &ferrite_qapi::Args) -> Result<(), Error> {
        let job = self.find_block(id)?;
        job.check_verb(Verb::Change)?;
        Err(Error::generic("Job type does not support change"))
    }

    /// `query-jobs`.
    pub fn query(&self) -> QObject {
        // QEMU lists the newest job first.
        QObject::List(
            self.jobs
                .borrow()
                .iter()
                .rev()
                .map(|j| QObject::Dict(j.info()))
                .collect(),
        )
    }

    /// `job-cancel` (always forced).
    ///
    /// # Errors
    /// Unknown job, or a state that does not accept cancel.
    pub fn cancel(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Cancel)?;
        self.cancel_job(&job);
        Ok(())
    }

    fn cancel_job(&self, job: &Rc<Job>) {
        job.cancelled.set(true);
        if job.user_paused.replace(false) {
            job.pause_count.set(job.pause_count.get().saturating_sub(1));
        }
        job.wake.notify_waiters();
        if job.status.get() == Status::Pending {
            job.transition(Status::Aborting);
            *job.error.borrow_mut() = Some("Operation canceled".into());
            self.fail_group(job);
            self.announce_end(job);
            self.conclude(job);
        }
    }

    /// `job-pause`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept pause, or a job already paused.
    pub fn pause(&self, id: &str, block: bool) -> Result<(), Error> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Pause)?;
        if job.user_paused.get() {
            return Err(Error::generic("Job is already paused"));
        }
        job.user_paused.set(true);
        job.pause_count.set(job.pause_count.get() + 1);
        // An idle job (sleeping, not in the middle of I/O) pauses at once.
        if !job.busy.get() {
            match job.status.get() {
                Status::Running => job.transition(Status::Paused),
                Status::Ready => job.transition(Status::Standby),
                _ => {}
            }
        }
        job.wake.notify_waiters();
        Ok(())
    }

    /// `job-resume`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept resume, or a job not paused by the user.
    pub fn resume(&self, id: &str, block: bool) -> Result<(), Error> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Resume)?;
        if !job.user_paused.get() {
            return Err(Error::generic("Can't resume a job that was not paused"));
        }
        job.user_paused.set(false);
        job.pause_count.set(job.pause_count.get().saturating_sub(1));
        job.io_status.set("ok");
        job.unpause();
        job.wake.notify_waiters();
        Ok(())
    }

    /// The job for a `block-job-*` verb, or for a `job-*` one.
    ///
    /// # Errors
    /// The lookup's error.
    pub fn lookup(&self, id: &str, block: bool) -> Result<Rc<Job>, Error> {
        if block {
            self.find_block(id)
        } else {
            self.find(id)
        }
    }

    /// `job-complete`: no job kind here has a completion step yet.
    ///
    /// # Errors
    /// Unknown job, or the state's or the kind's refusal.
    pub fn complete(&self, id: &str, block: bool) -> Result<(), Error> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Complete)?;
        Err(Error::generic(format!(
            "The active block job '{id}' cannot be completed"
        )))
    }

    /// `job-finalize`.
    ///
    /// # Errors
    /// Unknown job, or not pending.
    pub fn finalize_cmd(&self, id: &str, block: bool) -> Result<(), Error> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Finalize)?;
        // A transaction's jobs finalize together.
        let group = job
            .txn
            .as_ref()
            .map_or_else(|| vec![job.clone()], |t| t.members());
        for j in group.iter().filter(|j| j.status.get() == Status::Pending) {
            self.finalize(j);
        }
        Ok(())
    }

    /// `job-dismiss`.
    ///
    /// # Errors
    /// Unknown job, or not concluded.
    pub fn dismiss(&self, id: &str, block: bool) -> Result<(), Error> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Dismiss)?;
        self.dismiss_now(&job);
        Ok(())
    }
}
