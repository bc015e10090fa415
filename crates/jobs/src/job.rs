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
}

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

    /// Where the job's work yields to pause requests: waits while paused.
    pub async fn pause_point(&self) {
        while self.pause_count.get() > 0 && !self.cancelled.get() {
            let from = self.status.get();
            if from == Status::Running {
                self.transition(Status::Paused);
            } else if from == Status::Ready {
                self.transition(Status::Standby);
            }
            self.busy.set(false);
            self.wake.notified().await;
            self.busy.set(true);
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
        self.check_id(&opts.id)?;
        let job = Rc::new(Job {
            id: opts.id,
            driver: driver.clone(),
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
        });
        self.jobs.borrow_mut().push(job.clone());
        job.transition(Status::Created);
        job.transition(Status::Running);
        let me = self.clone();
        let j = job.clone();
        tokio::task::spawn_local(async move {
            let r = driver.run(j.clone()).await;
            me.finish(&j, r).await;
        });
        Ok(job)
    }

    /// After the work: waiting, pending, then finalize now or on `job-finalize`.
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
                job.transition(Status::Pending);
                if job.auto_finalize {
                    self.finalize(job);
                }
            }
            Err(e) => {
                if !e.is_empty() {
                    *job.error.borrow_mut() = Some(e);
                } else if job.error.borrow().is_none() {
                    *job.error.borrow_mut() = Some("Operation canceled".into());
                }
                job.transition(Status::Aborting);
                self.conclude(job);
            }
        }
    }

    fn finalize(&self, job: &Rc<Job>) {
        self.conclude(job);
    }

    fn conclude(&self, job: &Rc<Job>) {
        job.transition(Status::Concluded);
        if job.auto_dismiss {
            self.dismiss_now(job);
        }
    }

    fn dismiss_now(&self, job: &Rc<Job>) {
        job.transition(Status::Null);
        self.jobs.borrow_mut().retain(|j| !Rc::ptr_eq(j, job));
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
        job.cancelled.set(true);
        if job.user_paused.replace(false) {
            job.pause_count.set(job.pause_count.get().saturating_sub(1));
        }
        job.wake.notify_waiters();
        if job.status.get() == Status::Pending {
            job.transition(Status::Aborting);
            *job.error.borrow_mut() = Some("Operation canceled".into());
            self.conclude(&job);
        }
        Ok(())
    }

    /// `job-pause`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept pause, or a job already paused.
    pub fn pause(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Pause)?;
        if job.user_paused.get() {
            return Err(Error::generic("Job is already paused"));
        }
        job.user_paused.set(true);
        job.pause_count.set(job.pause_count.get() + 1);
        Ok(())
    }

    /// `job-resume`.
    ///
    /// # Errors
    /// Unknown job, a state that does not accept resume, or a job not paused by the user.
    pub fn resume(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Resume)?;
        if !job.user_paused.get() {
            return Err(Error::generic("Can't resume a job that was not paused"));
        }
        job.user_paused.set(false);
        job.pause_count.set(job.pause_count.get().saturating_sub(1));
        job.wake.notify_waiters();
        Ok(())
    }

    /// `job-complete`: no job kind here has a completion step yet.
    ///
    /// # Errors
    /// Unknown job, or the state's or the kind's refusal.
    pub fn complete(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Complete)?;
        Err(Error::generic(format!(
            "The active block job '{id}' cannot be completed"
        )))
    }

    /// `job-finalize`.
    ///
    /// # Errors
    /// Unknown job, or not pending.
    pub fn finalize_cmd(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Finalize)?;
        self.finalize(&job);
        Ok(())
    }

    /// `job-dismiss`.
    ///
    /// # Errors
    /// Unknown job, or not concluded.
    pub fn dismiss(&self, id: &str) -> Result<(), Error> {
        let job = self.find(id)?;
        job.check_verb(Verb::Dismiss)?;
        self.dismiss_now(&job);
        Ok(())
    }
}
