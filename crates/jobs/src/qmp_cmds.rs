//! The `job-*` commands and `query-jobs` (QEMU's job-qmp.c).

use crate::job::JobManager;
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};

fn ok() -> Result<QObject, Error> {
    Ok(QDict::new().into())
}

/// Runs `job-*` command `name` or `query-jobs`; `None` if it is not one of them.
pub fn run(jobs: &JobManager, name: &str, args: &Args) -> Option<Result<QObject, Error>> {
    let id = || args.str("id");
    Some(match name {
        "query-jobs" => Ok(jobs.query()),
        "job-cancel" => id().and_then(|i| jobs.cancel(i)).and_then(|()| ok()),
        "job-pause" => id().and_then(|i| jobs.pause(i)).and_then(|()| ok()),
        "job-resume" => id().and_then(|i| jobs.resume(i)).and_then(|()| ok()),
        "job-complete" => id().and_then(|i| jobs.complete(i)).and_then(|()| ok()),
        "job-finalize" => id().and_then(|i| jobs.finalize_cmd(i)).and_then(|()| ok()),
        "job-dismiss" => id().and_then(|i| jobs.dismiss(i)).and_then(|()| ok()),
        _ => return None,
    })
}
