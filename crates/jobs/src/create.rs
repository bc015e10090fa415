//! `blockdev-create`: image creation run as a job of type `create`.

use crate::job::{Job, JobDriver, JobFuture, JobManager, JobOptions};
use ferrite_block::Graph;
use ferrite_qapi::{Args, Error};
use std::rc::Rc;

struct CreateJob {
    graph: Rc<Graph>,
    options: Args,
}

impl JobDriver for CreateJob {
    fn job_type(&self) -> &'static str {
        "create"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move {
            job.set_progress(0, 1);
            // Let `blockdev-create` return before the work starts, as in QEMU.
            tokio::task::yield_now().await;
            let r = ferrite_block::create::create(&self.graph, &self.options).await;
            job.set_progress(1, 1);
            r.map_err(|e| e.desc)
        })
    }
}

/// `blockdev-create`: starts a `create` job (manual dismiss, as in QEMU).
///
/// # Errors
/// A bad job ID or a driver that cannot create images.
pub fn qmp_blockdev_create(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
) -> Result<(), Error> {
    let id = args.str("job-id")?.to_owned();
    let options = args
        .dict("options")
        .ok_or_else(|| Error::generic("Parameter 'options' is missing"))?;
    jobs.check_id(&id)?;
    ferrite_block::create::check_driver(&options)?;
    jobs.start(
        JobOptions {
            id,
            auto_finalize: true,
            auto_dismiss: false,
            speed: 0,
        },
        Rc::new(CreateJob {
            graph: graph.clone(),
            options,
        }),
    )?;
    Ok(())
}
