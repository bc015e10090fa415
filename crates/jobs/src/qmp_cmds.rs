//! The `job-*` commands and `query-jobs` (QEMU's job-qmp.c).

use crate::manager::JobManager;
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};

fn ok() -> Result<QObject, Error> {
    Ok(QDict::new().into())
}

/// Runs `job-*` or `block-job-*` command `name`, `query-jobs` or `query-block-jobs`; `None`
/// if it is not one of them.
pub async fn run(jobs: &JobManager, name: &str, args: &Args) -> Option<Result<QObject, Error>> {
    let r: crate::Result<()> = async {
        let id = || args.str("id");
        let device = || args.str("device");
        match name {
            "job-cancel" => jobs.cancel(id()?).await,
            "job-pause" => jobs.pause(id()?, false),
            "job-resume" => jobs.resume(id()?, false),
            "job-complete" => jobs.complete(id()?, false),
            "job-finalize" => jobs.finalize_cmd(id()?, false).await,
            "job-dismiss" => jobs.dismiss(id()?, false),
            "block-job-cancel" => {
                jobs.block_cancel(device()?, args.bool_or("force", false))
                    .await
            }
            "block-job-pause" => jobs.pause(device()?, true),
            "block-job-resume" => jobs.resume(device()?, true),
            "block-job-complete" => jobs.complete(device()?, true),
            "block-job-finalize" => jobs.finalize_cmd(id()?, true).await,
            "block-job-dismiss" => jobs.dismiss(id()?, true),
            "block-job-set-speed" => jobs.set_speed(device()?, args.opt_i64("speed").unwrap_or(0)),
            "block-job-change" => jobs.change(id()?, args),
            _ => Err(crate::Error::JobNotFound),
        }
    }
    .await;
    match name {
        "query-jobs" => Some(Ok(jobs.query())),
        "query-block-jobs" => Some(Ok(jobs.query_block())),
        n if n.starts_with("job-") || n.starts_with("block-job-") => {
            Some(r.map_err(Into::into).and_then(|()| ok()))
        }
        _ => None,
    }
}
