//! `x-blockdev-amend`: changing an open image's options, run as a job of type `amend`.

use crate::job::{Job, JobDriver, JobFuture, JobManager, JobOptions};
use ferrite_block::{Graph, Node, Perm};
use ferrite_qapi::{Args, Error};
use std::rc::Rc;

struct AmendJob {
    graph: Rc<Graph>,
    node: Rc<Node>,
    options: Args,
}

impl JobDriver for AmendJob {
    fn job_type(&self) -> &'static str {
        "amend"
    }

    fn run(self: Rc<Self>, job: Rc<Job>) -> JobFuture {
        Box::pin(async move {
            job.set_progress(0, 1);
            tokio::task::yield_now().await;
            // The image must not change under the amendment, nor go away.
            let hold = self
                .graph
                .attach(&self.node, "x-blockdev-amend", Perm::WRITE, Perm::all())
                .map_err(|e| e.desc)?;
            let r = ferrite_block::amend::amend(&self.node, &self.options).await;
            self.graph.detach(hold);
            job.set_progress(1, 1);
            r.map_err(|e| e.desc)
        })
    }
}

/// `x-blockdev-amend`: starts an `amend` job (manual dismiss, as in QEMU).
///
/// # Errors
/// An unknown node, a driver change or a driver that cannot amend, a bad job ID.
pub fn qmp_x_blockdev_amend(
    jobs: &Rc<JobManager>,
    graph: &Rc<Graph>,
    args: &Args,
) -> Result<(), Error> {
    let id = args.str("job-id")?.to_owned();
    let name = args.str("node-name")?;
    let node = graph
        .find(name)
        .ok_or_else(|| Error::generic(format!("Cannot find device='' nor node-name='{name}'")))?;
    let options = args
        .dict("options")
        .ok_or_else(|| Error::generic("Parameter 'options' is missing"))?;
    ferrite_block::amend::check(&node, &options)?;
    jobs.check_id(&id)?;
    jobs.start(
        JobOptions {
            id,
            auto_finalize: true,
            auto_dismiss: false,
            speed: 0,
        },
        Rc::new(AmendJob {
            graph: graph.clone(),
            node,
            options,
        }),
    )?;
    Ok(())
}
