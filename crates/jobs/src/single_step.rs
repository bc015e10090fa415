//! Jobs whose work is one step (`blockdev-create`, `x-blockdev-amend`, the VM snapshot
//! jobs): progress 0 of 1, the work once the command has returned (as in QEMU), then 1 of
//! 1; the user dismisses them.

use crate::error::Error;
use crate::job::{Job, JobDriver, JobFuture};
use crate::manager::{JobManager, JobOptions};
use crate::types::JobType;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// The step itself; its error is the job's `error`.
pub type Step = Pin<Box<dyn Future<Output = Result<(), String>>>>;

struct SingleStep {
    kind: JobType,
    step: RefCell<Option<Step>>,
}

impl JobDriver for SingleStep {
    fn job_type(&self) -> JobType {
        self.kind
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move {
            job.set_progress(0, 1);
            // Let the command return before the work starts, as in QEMU.
            tokio::task::yield_now().await;
            let step = self.step.borrow_mut().take();
            let r = match step {
                Some(s) => s.await,
                None => Ok(()),
            };
            job.set_progress(1, 1);
            r
        })
    }
}

/// Starts job `id` of type `kind` doing `step` (manual dismiss, as in QEMU).
///
/// # Errors
/// A bad or duplicate job ID.
pub fn start(jobs: &Rc<JobManager>, id: String, kind: JobType, step: Step) -> Result<(), Error> {
    let job = create(jobs, id, kind, step)?;
    jobs.run_job(&job);
    Ok(())
}

/// Creates job `id` of type `kind` that will do `step`, announced (`created`) but not
/// started: the caller runs it, or drops it early.
///
/// # Errors
/// A bad or duplicate job ID.
pub(crate) fn create(
    jobs: &Rc<JobManager>,
    id: String,
    kind: JobType,
    step: Step,
) -> Result<Rc<Job>, Error> {
    jobs.create(
        JobOptions {
            id,
            auto_finalize: true,
            auto_dismiss: false,
            speed: 0,
        },
        Rc::new(SingleStep {
            kind,
            step: RefCell::new(Some(step)),
        }),
        None,
    )
}
