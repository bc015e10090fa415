//! Jobs: the generic job state machine (QEMU's job.c: states, transitions, verbs, phases,
//! transactions, events, `query-jobs`) and the jobs built on it (`blockdev-create`,
//! `x-blockdev-amend`, backup, whose QMP commands run as transactions in
//! `ferrite-blockdev`, and mirror).
//!
//! Everything runs on the daemon's main thread; a job's work is a local task.

mod amend;
pub mod backup;
pub mod commit;
mod commit_now;
mod completion;
mod create;
mod error;
pub mod events;
mod job;
mod manager;
pub mod mirror;
pub mod qmp_cmds;
mod single_step;
pub use single_step::{Step as OneStep, start as start_one_step};
mod state;
pub mod stream;
mod types;

pub use amend::qmp_x_blockdev_amend;
pub use commit_now::commit_now;
pub use create::qmp_blockdev_create;
pub use error::{Error, Result};
pub use job::{ErrorPolicy, Job, JobDriver, JobFuture, JobTxn, PhaseFuture};
pub use manager::{JobManager, JobOptions};
pub use state::{Status, Verb};
pub use types::{
    BitmapSyncMode, BlockErrorAction, IoOperationType, JobType, MirrorCopyMode, MirrorSyncMode,
};
