//! Jobs: the generic job state machine (QEMU's job.c: states, transitions, verbs, events,
//! `query-jobs`) and the jobs built on it (`blockdev-create`, `x-blockdev-amend`, `blockdev-backup`, `transaction`).
//!
//! Everything runs on the daemon's main thread; a job's work is a local task.

mod amend;
mod backup;
mod create;
mod job;
pub mod qmp_cmds;
mod single_step;
mod state;
mod transaction;

pub use amend::qmp_x_blockdev_amend;
pub use backup::{qmp_blockdev_backup, qmp_drive_backup};
pub use create::qmp_blockdev_create;
pub use job::{ErrorPolicy, Job, JobDriver, JobFuture, JobManager, JobOptions, JobTxn};
pub use state::{Status, Verb};
pub use transaction::qmp_transaction;
