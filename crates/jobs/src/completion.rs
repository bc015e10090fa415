//! What happens when a job's work returns (QEMU: job.c's `job_completed`,
//! `job_completed_txn_success`, `job_do_finalize`, `job_completed_txn_abort`,
//! `job_finalize_single`).
//!
//! A job that succeeded waits for the others of its transaction; once all have, they go
//! `pending`, and are finalized (at once, or on `job-finalize` when one of them asks for
//! it): every `prepare` first, then `commit` (or, if a prepare failed, `abort`) and `clean`
//! of each, its `BLOCK_JOB_*` event, and `concluded`. A job that failed or was cancelled
//! cancels the others and finalizes them all with `abort`.

use crate::job::Job;
use crate::manager::JobManager;
use crate::state::Status;
use std::rc::Rc;

impl JobManager {
    /// The job's work returned `r` (QEMU: `job_completed`).
    pub(crate) async fn completed(&self, job: &Rc<Job>, r: Result<(), String>) {
        job.set_busy(false);
        job.deferred.set(true);
        if let Err(e) = r {
            job.fail(e);
        }
        update_rc(job);
        job.changed.notify_waiters();
        if job.failed.get() {
            self.txn_abort(job).await;
        } else {
            self.txn_success(job).await;
        }
    }

    /// Success: `waiting` until every job of the transaction is done, then all `pending`,
    /// and finalized unless one of them waits for `job-finalize`.
    async fn txn_success(&self, job: &Rc<Job>) {
        job.transition(Status::Waiting);
        let group = job.txn.members();
        if group.iter().any(|j| !j.is_completed()) {
            return;
        }
        for j in &group {
            j.transition(Status::Pending);
            if !j.auto_finalize {
                self.announce_pending(j);
            }
        }
        if group.iter().all(|j| j.auto_finalize) {
            self.do_finalize(job).await;
        }
    }

    /// Finalizes `job`'s transaction: every `prepare`, then each job's commit or abort.
    pub(crate) async fn do_finalize(&self, job: &Rc<Job>) {
        let group = job.txn.members();
        for j in &group {
            if !j.failed.get()
                && let Err(e) = j.driver.clone().prepare(j.clone()).await
            {
                j.fail(e);
                update_rc(j);
            }
        }
        if group.iter().any(|j| j.failed.get()) {
            self.txn_abort(job).await;
        } else {
            for j in &group {
                self.finalize_single(j).await;
            }
        }
    }

    /// Failure: the other jobs of the transaction are force-cancelled; once each has
    /// stopped, all are finalized with `abort`.
    pub(crate) async fn txn_abort(&self, job: &Rc<Job>) {
        let txn = job.txn.clone();
        if txn.aborting.replace(true) {
            // Another job of the transaction is aborting it and handles everything.
            return;
        }
        for other in txn.members() {
            if !Rc::ptr_eq(&other, job) {
                self.cancel_async(&other, true);
            }
        }
        while let Some(other) = txn.members().into_iter().next() {
            if !other.is_completed() {
                if other.started.get() {
                    wait_completed(&other).await;
                } else {
                    other.deferred.set(true);
                    update_rc(&other);
                }
            }
            self.finalize_single(&other).await;
        }
    }

    /// One job's end: commit or abort, clean, its event, `concluded`.
    async fn finalize_single(&self, job: &Rc<Job>) {
        update_rc(job);
        if job.failed.get() {
            job.driver.clone().abort(job.clone()).await;
        } else {
            job.driver.clone().commit(job.clone()).await;
        }
        job.driver.clone().clean(job.clone()).await;
        self.announce_end(job);
        job.txn.remove(job);
        self.conclude(job);
    }
}

/// A cancelled job counts as failed ("Operation canceled"); a failed job is `aborting`
/// (QEMU: `job_update_rc`).
fn update_rc(job: &Job) {
    if !job.failed.get() && job.is_cancelled() {
        job.fail("Operation canceled".into());
    }
    if job.failed.get() {
        job.transition(Status::Aborting);
    }
}

/// Waits until `job`'s work has returned.
async fn wait_completed(job: &Job) {
    while !job.is_completed() {
        let changed = job.changed.notified();
        if job.is_completed() {
            return;
        }
        changed.await;
    }
}
