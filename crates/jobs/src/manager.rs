//! Every job by ID (QEMU: job.c's job list and job-qmp.c): creating and starting jobs, the
//! user's verbs, the queries, and what happens when a job's work returns (see
//! `completion.rs`).

use crate::error::{Error, Result};
use crate::events::{BlockJobCancelled, BlockJobCompleted, BlockJobPending};
use crate::job::{Job, JobDriver, JobTxn};
use crate::state::{Status, Verb};
use ferrite_block::{EventSink, IoStatus};
use ferrite_qapi::id_wellformed;
use ferrite_qobject::QObject;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Every job, by ID.
pub struct JobManager {
    pub(crate) jobs: RefCell<Vec<Rc<Job>>>,
    pub(crate) events: Rc<dyn EventSink>,
    next_order: Cell<u64>,
}

/// How to start a job.
pub struct JobOptions {
    /// The job ID.
    pub id: String,
    /// Finalize without waiting for `job-finalize`.
    pub auto_finalize: bool,
    /// Go away once concluded, without waiting for `job-dismiss`.
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
            next_order: Cell::new(0),
        })
    }

    /// A job by ID (`job-*` commands: "Job not found").
    ///
    /// # Errors
    /// QEMU's "Job not found".
    pub fn find(&self, id: &str) -> Result<Rc<Job>> {
        self.jobs
            .borrow()
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or(Error::JobNotFound)
    }

    /// Checks a new job's ID: well formed and unused.
    ///
    /// # Errors
    /// QEMU's "Invalid job ID" and "Job ID already in use".
    pub fn check_id(&self, id: &str) -> Result<()> {
        if !id_wellformed(id) {
            return Err(Error::InvalidJobId(id.to_owned()));
        }
        if self.jobs.borrow().iter().any(|j| j.id == id) {
            return Err(Error::JobIdInUse(id.to_owned()));
        }
        Ok(())
    }

    /// Creates and starts a job: `created`, `running`, then its work in the background.
    ///
    /// # Errors
    /// A bad or duplicate ID.
    pub fn start(self: &Rc<Self>, opts: JobOptions, driver: Rc<dyn JobDriver>) -> Result<Rc<Job>> {
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
    ) -> Result<Rc<Job>> {
        self.check_id(&opts.id)?;
        let txn = txn.unwrap_or_default();
        let order = self.next_order.get();
        self.next_order.set(order + 1);
        let job = Rc::new_cyclic(|me| {
            Job::new(
                me,
                opts.id.clone(),
                driver,
                &opts,
                Rc::downgrade(self),
                txn.clone(),
                order,
            )
        });
        txn.jobs.borrow_mut().push(Rc::downgrade(&job));
        self.jobs.borrow_mut().push(job.clone());
        job.transition(Status::Created);
        Ok(job)
    }

    /// Starts a created job: `running`, then its work in the background. As QEMU's job
    /// coroutine runs until its first pause point before `job_start` returns, a job that
    /// must pause (drained, or paused by the user) is `paused` when this returns.
    pub fn run_job(self: &Rc<Self>, job: &Rc<Job>) {
        job.started.set(true);
        job.busy.set(true);
        job.transition(Status::Running);
        if job.pause_count.get() > 0 && !job.is_cancelled() {
            job.enter_pause();
            job.set_busy(false);
        }
        // A job starts paused only inside its command's own drained section, and QEMU's
        // resumes before the command returns: either way it has begun by then.
        job.driver.begin(job);
        let me = self.clone();
        let j = job.clone();
        tokio::task::spawn_local(async move {
            j.pause_point().await;
            let r = j.driver.clone().run(j.clone()).await;
            me.completed(&j, r).await;
        });
    }

    /// Drops a created job that never started (its transaction failed): its `abort` and
    /// `clean` phases run, and it ends without `BLOCK_JOB_*` events.
    pub async fn abort_unstarted(&self, job: &Rc<Job>) {
        if job.status.get() != Status::Created {
            return;
        }
        job.cancelled.set(true);
        job.force_cancel.set(true);
        self.completed(job, Ok(())).await;
    }

    /// `BLOCK_JOB_COMPLETED` (success, or failure with its error) or `BLOCK_JOB_CANCELLED`.
    pub(crate) fn announce_end(&self, job: &Job) {
        if !job.driver.is_block_job() || !job.started.get() {
            return;
        }
        if job.is_cancelled() {
            self.events.emit(&BlockJobCancelled(job.progress()));
            return;
        }
        self.events.emit(&BlockJobCompleted {
            progress: job.progress(),
            error: job.error.borrow().clone(),
        });
    }

    /// `BLOCK_JOB_PENDING`.
    pub(crate) fn announce_pending(&self, job: &Job) {
        if job.driver.is_block_job() {
            self.events.emit(&BlockJobPending {
                kind: job.driver.job_type(),
                id: job.id.clone(),
            });
        }
    }

    /// The end of a job: `concluded`, and gone at once with auto-dismiss (or when it never
    /// started).
    pub(crate) fn conclude(&self, job: &Rc<Job>) {
        job.transition(Status::Concluded);
        job.changed.notify_waiters();
        if job.auto_dismiss || !job.started.get() {
            self.dismiss_now(job);
        }
    }

    /// Drops a created job whose setup failed after it was announced: straight to `null`
    /// (QEMU: `job_early_fail`).
    pub fn early_fail(&self, job: &Rc<Job>) {
        if job.status.get() == Status::Created {
            job.txn.remove(job);
            self.dismiss_now(job);
        }
    }

    fn dismiss_now(&self, job: &Rc<Job>) {
        job.driver.free(job);
        job.transition(Status::Null);
        self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, job));
    }

    /// Cancels `job` and waits until it has concluded (QEMU's `job_cancel_sync`).
    pub async fn cancel_sync(&self, job: &Rc<Job>) {
        if matches!(job.status.get(), Status::Concluded | Status::Null) {
            return;
        }
        if job.check_verb(Verb::Cancel).is_ok() {
            self.cancel_job(job, true).await;
        }
        while !matches!(job.status.get(), Status::Concluded | Status::Null) {
            let changed = job.changed.notified();
            if matches!(job.status.get(), Status::Concluded | Status::Null) {
                break;
            }
            changed.await;
        }
    }

    /// At exit (QEMU's `job_cancel_sync_all`): until no job is left, the newest is
    /// force-cancelled and waited for, or dismissed once it has concluded, so that every
    /// job ends in `null`.
    pub async fn cancel_all(&self) {
        loop {
            let newest = self.jobs.borrow().last().cloned();
            let Some(job) = newest else { break };
            match job.status.get() {
                Status::Null => self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, &job)),
                Status::Concluded => self.dismiss_now(&job),
                _ => self.cancel_sync(&job).await,
            }
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

    /// Every block job's I/O status goes back to ok (`cont`, QEMU's
    /// `block_job_iostatus_reset`); a job an error paused stays paused.
    pub fn reset_block_iostatus(&self) {
        for j in self
            .jobs
            .borrow()
            .iter()
            .filter(|j| j.driver.is_block_job())
        {
            j.io_status.set(IoStatus::Ok);
        }
    }

    /// A block job by its device name (the job ID) for `block-job-*`.
    ///
    /// # Errors
    /// QEMU's `DeviceNotActive` "Block job 'X' not found".
    pub fn find_block(&self, id: &str) -> Result<Rc<Job>> {
        self.jobs
            .borrow()
            .iter()
            .find(|j| j.id == id && j.driver.is_block_job())
            .cloned()
            .ok_or_else(|| Error::BlockJobNotFound(id.to_owned()))
    }

    /// `block-job-cancel`: without `force`, a job the user paused refuses.
    ///
    /// # Errors
    /// Unknown job, the state's refusal, or a paused job without force.
    pub async fn block_cancel(&self, id: &str, force: bool) -> Result<()> {
        let job = self.find_block(id)?;
        job.check_verb(Verb::Cancel)?;
        if job.user_paused.get() && !force {
            return Err(Error::PausedByUser(id.to_owned()));
        }
        self.cancel_job(&job, force).await;
        Ok(())
    }

    /// `block-job-set-speed`.
    ///
    /// # Errors
    /// Unknown job, a negative speed, or the state's refusal.
    pub fn set_speed(&self, id: &str, speed: i64) -> Result<()> {
        let job = self.find_block(id)?;
        let speed = u64::try_from(speed).map_err(|_| Error::NegativeSpeed)?;
        job.check_verb(Verb::SetSpeed)?;
        job.speed.set(speed);
        job.wake.notify_waiters();
        Ok(())
    }

    /// `block-job-change`.
    ///
    /// # Errors
    /// Unknown job, the state's refusal, or the job kind's.
    pub fn change(&self, id: &str, args: &ferrite_qapi::Args) -> Result<()> {
        let job = self.find_block(id)?;
        job.check_verb(Verb::Change)?;
        job.driver.change(&job, args)
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
    pub async fn cancel(&self, id: &str) -> Result<()> {
        let job = self.find(id)?;
        job.check_verb(Verb::Cancel)?;
        self.cancel_job(&job, true).await;
        Ok(())
    }

    /// Asks a job to stop (QEMU: `job_cancel_async`): cancelled, resumed if the user
    /// paused it, woken.
    pub(crate) fn cancel_async(&self, job: &Rc<Job>, force: bool) {
        let force = job.driver.cancel(job, force);
        if job.user_paused.replace(false) {
            job.io_status.set(IoStatus::Ok);
            job.resume();
        }
        if force || !job.deferred.get() {
            job.cancelled.set(true);
            // A soft cancel does not undo an earlier forced one.
            job.force_cancel.set(job.force_cancel.get() || force);
        }
        job.wake.notify_waiters();
    }

    /// QEMU's `job_cancel`: a job that never started or already finished its work ends
    /// here; a running one when its work returns.
    async fn cancel_job(&self, job: &Rc<Job>, force: bool) {
        self.cancel_async(job, force);
        if !job.started.get() {
            self.completed(job, Ok(())).await;
        } else if job.deferred.get() {
            if job.is_cancelled() {
                self.txn_abort(job).await;
            }
        } else {
            // QEMU enters the job at once: one that stops without waiting for I/O has ended
            // (and said so) before the command returns.
            tokio::task::yield_now().await;
        }
    }

    /// Cancels the jobs that work on `node` (QEMU's `blockdev_mark_auto_del`: a drive
    /// going with its device takes its jobs with it).
    pub async fn cancel_jobs_on(&self, node: &ferrite_block::Node) {
        let jobs: Vec<_> = self
            .jobs
            .borrow()
            .iter()
            .filter(|j| j.has_node(node))
            .cloned()
            .collect();
        for job in jobs {
            self.cancel_job(&job, false).await;
        }
    }

    /// `job-pause`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept pause, or a job already paused.
    pub fn pause(&self, id: &str, block: bool) -> Result<()> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Pause)?;
        if job.user_paused.get() {
            return Err(Error::AlreadyPaused);
        }
        job.user_paused.set(true);
        job.pause();
        Ok(())
    }

    /// `job-resume`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept resume, or a job not paused by the user.
    pub fn resume(&self, id: &str, block: bool) -> Result<()> {
        let job = self.lookup(id, block)?;
        // QEMU asks whether the user paused it before whether its state takes the verb.
        if !job.user_paused.get() {
            return Err(Error::NotPaused);
        }
        job.check_verb(Verb::Resume)?;
        job.user_paused.set(false);
        job.io_status.set(IoStatus::Ok);
        job.resume();
        Ok(())
    }

    /// The job for a `block-job-*` verb, or for a `job-*` one.
    ///
    /// # Errors
    /// The lookup's error.
    pub fn lookup(&self, id: &str, block: bool) -> Result<Rc<Job>> {
        if block {
            self.find_block(id)
        } else {
            self.find(id)
        }
    }

    /// `job-complete`.
    ///
    /// # Errors
    /// Unknown job, the state's refusal, a job being cancelled, or the kind's refusal.
    pub fn complete(&self, id: &str, block: bool) -> Result<()> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Complete)?;
        if job.cancelled.get() {
            return Err(Error::CannotComplete(id.to_owned()));
        }
        job.driver.complete(&job)
    }

    /// `job-finalize`.
    ///
    /// # Errors
    /// Unknown job, or not pending.
    pub async fn finalize_cmd(&self, id: &str, block: bool) -> Result<()> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Finalize)?;
        self.do_finalize(&job).await;
        Ok(())
    }

    /// `job-dismiss`.
    ///
    /// # Errors
    /// Unknown job, or not concluded.
    pub fn dismiss(&self, id: &str, block: bool) -> Result<()> {
        let job = self.lookup(id, block)?;
        job.check_verb(Verb::Dismiss)?;
        self.dismiss_now(&job);
        Ok(())
    }
}
