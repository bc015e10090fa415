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
    let id = || args.str("id");
    let device = || args.str("device");
    let r = match name {
        "query-jobs" => return Some(Ok(jobs.query())),
        "query-block-jobs" => return Some(Ok(jobs.query_block())),
        "job-cancel" => match id() {
            Ok(i) => jobs.cancel(i).await,
            Err(e) => Err(e),
        },
        "job-pause" => id().and_then(|i| jobs.pause(i, false)),
        "job-resume" => id().and_then(|i| jobs.resume(i, false)),
        "job-complete" => id().and_then(|i| jobs.complete(i, false)),
        "job-finalize" => match id() {
            Ok(i) => jobs.finalize_cmd(i, false).await,
            Err(e) => Err(e),
        },
        "job-dismiss" => id().and_then(|i| jobs.dismiss(i, false)),
        "block-job-cancel" => match device() {
            Ok(d) => jobs.block_cancel(d, args.bool_or("force", false)).await,
            Err(e) => Err(e),
        },
        "block-job-pause" => device().and_then(|d| jobs.pause(d, true)),
        "block-job-resume" => device().and_then(|d| jobs.resume(d, true)),
        "block-job-complete" => device().and_then(|d| jobs.complete(d, true)),
        "block-job-finalize" => match id() {
            Ok(i) => jobs.finalize_cmd(i, true).await,
            Err(e) => Err(e),
        },
        "block-job-dismiss" => id().and_then(|i| jobs.dismiss(i, true)),
        "block-job-set-speed" => {
            device().and_then(|d| jobs.set_speed(d, args.opt_i64("speed").unwrap_or(0)))
        }
        "block-job-change" => id().and_then(|i| jobs.change(i, args)),
        _ => return None,
    };
    Some(r.and_then(|()| ok()))
}
