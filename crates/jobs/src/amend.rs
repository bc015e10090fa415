//! `x-blockdev-amend`: changing an open image's options, run as a job of type `amend`.

use crate::error::Result;
use crate::manager::JobManager;
use ferrite_block::{BlockBackend, Graph, Perm};
use ferrite_qapi::Args;
use std::rc::Rc;

/// `x-blockdev-amend`: starts an `amend` job (manual dismiss, as in QEMU).
///
/// # Errors
/// An unknown node, a driver change or a driver that cannot amend, a bad job ID.
pub fn qmp_x_blockdev_amend(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let id = args.str("job-id")?.to_owned();
    let node = graph.lookup_node(args.str("node-name")?)?;
    let options = args
        .dict("options")
        .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'options' is missing"))?;
    ferrite_block::create::check_amend(graph, &node, &options)?;
    let force = args.bool_or("force", false);
    jobs.check_id(&id)?;
    let graph = graph.clone();
    crate::single_step::start(
        jobs,
        id,
        crate::JobType::Amend,
        Box::pin(async move {
            // The image must not change under the amendment, nor go away.
            let hold = BlockBackend::new(&graph, &node, Perm::WRITE, Perm::all())?;
            let r = ferrite_block::create::amend(&graph, &node, &options, force).await;
            drop(hold);
            r
        }),
    )
}
