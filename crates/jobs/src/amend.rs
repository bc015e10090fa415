//! `x-blockdev-amend`: changing an open image's options, run as a job of type `amend`.

use crate::error::Result;
use crate::manager::JobManager;
use ferrite_block::{BlockBackend, DriverFactory, Graph, Node, Perm};
use ferrite_qapi::Args;
use std::rc::Rc;

/// `x-blockdev-amend`: starts an `amend` job (manual dismiss, as in QEMU).
///
/// # Errors
/// An unknown node, a driver change or a driver that cannot amend, a bad job ID, the
/// driver unable to ready the node (permissions another user holds).
pub fn qmp_x_blockdev_amend(jobs: &Rc<JobManager>, graph: &Rc<Graph>, args: &Args) -> Result<()> {
    let id = args.str("job-id")?.to_owned();
    let node = graph.lookup_node(args.str("node-name")?)?;
    let options = args
        .dict("options")
        .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'options' is missing"))?;
    let factory = ferrite_block::create::check_amend(graph, &node, &options)?;
    let force = args.bool_or("force", false);
    jobs.check_id(&id)?;
    let prepared = Prepared {
        factory: factory.clone(),
        graph: graph.clone(),
        node: node.clone(),
    };
    let job = crate::single_step::create(
        jobs,
        id,
        crate::JobType::Amend,
        Box::pin(async move {
            // The node must not go away under the amendment; what it may do to the image
            // is for the driver to ask (QEMU's amend job takes no permission either).
            let (g, n) = (&prepared.graph, &prepared.node);
            let hold =
                BlockBackend::new(g, n, Perm::empty(), Perm::all()).map_err(|e| e.to_string())?;
            let r = ferrite_block::create::amend(g, n, &options, force).await;
            drop(hold);
            drop(prepared);
            r.map_err(|e| e.to_string())
        }),
    )?;
    // As QEMU: the job is announced, then the driver readies the node; a refusal drops the
    // job (`null`) and fails the command.
    if let Err(e) = factory.amend_prepare(graph, &node) {
        jobs.early_fail(&job);
        return Err(e.into());
    }
    jobs.run_job(&job);
    Ok(())
}

/// Undoes the driver's preparation when the amendment ends, fails or is dropped.
struct Prepared {
    factory: Rc<dyn DriverFactory>,
    graph: Rc<Graph>,
    node: Rc<Node>,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        self.factory.amend_cleanup(&self.graph, &self.node);
    }
}
