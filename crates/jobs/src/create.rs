//! `blockdev-create`: image creation run as a job of type `create`.

use crate::error::Result;
use crate::manager::JobManager;
use ferrite_block::Graph;
use ferrite_qapi::Args;
use std::rc::Rc;

/// `blockdev-create`: starts a `create` job (manual dismiss, as in QEMU).
///
/// # Errors
/// A bad job ID or a driver that cannot create images.
pub fn qmp_blockdev_create(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let id = args.str("job-id")?.to_owned();
    let options = args
        .dict("options")
        .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'options' is missing"))?;
    // QEMU looks at the driver before it makes the job.
    ferrite_block::create::check_driver(graph, &options)?;
    jobs.check_id(&id)?;
    let graph = graph.clone();
    crate::single_step::start(
        jobs,
        id,
        crate::JobType::Create,
        Box::pin(async move {
            ferrite_block::create::create(&graph, &options)
                .await
                .map_err(|e| e.to_string())
        }),
    )
}
