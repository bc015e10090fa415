//! Drained sections pause running jobs for real: the job stops at its pause point, nothing
//! it would copy reaches the node while the section lasts, and the job's events are
//! `paused` then `running`.

use crate::{World, args, wait_until};
use ferrite_jobs::Status;
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn a_drain_pauses_a_rate_limited_backup_and_no_request_reaches_the_source() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let w = World::new();
            w.add(r#"{"driver":"counting","node-name":"src","size":16777216}"#)
                .await;
            w.add(r#"{"driver":"null-co","node-name":"tgt","size":16777216}"#)
                .await;
            ferrite_blockdev::transaction::qmp_single_action(
                &w.jobs,
                &w.graph,
                "blockdev-backup",
                &args(
                    r#"{"job-id":"j","device":"src","target":"tgt","sync":"full","speed":8388608}"#,
                ),
            )
            .await
            .expect("backup");
            // The transaction's own drain paused the job once as it started.
            assert_eq!(w.statuses(), ["created", "running", "paused", "running"]);
            assert!(wait_until(Duration::from_secs(5), || w.counts.reads.get() > 0).await);

            let src = w.graph.find("src").expect("src");
            let job = w.jobs.find("j").expect("job");
            let drained = w.graph.drain(&src).await;
            assert_eq!(job.status(), Status::Paused);
            assert_eq!(src.in_flight(), 0);
            let before = w.counts.total();
            // At 8 MiB/s the job would copy a chunk every 125 ms.
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                w.counts.total(),
                before,
                "a request reached the drained node"
            );
            assert_eq!(job.status(), Status::Paused);
            drop(drained);
            assert_eq!(job.status(), Status::Running);
            assert_eq!(w.statuses(), ["paused", "running"]);
            assert!(
                wait_until(Duration::from_secs(5), || w.counts.total() > before).await,
                "the job did not go on after the drain"
            );
            w.jobs.cancel_sync(&job).await;
            assert_eq!(w.statuses(), ["aborting", "concluded", "null"]);
            // The filter went: the source has no user left.
            assert!(src.users().is_empty());
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_job_created_in_a_drained_section_starts_paused_and_runs_when_it_ends() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let w = World::new();
            w.add(r#"{"driver":"counting","node-name":"src","size":4194304}"#)
                .await;
            w.add(r#"{"driver":"null-co","node-name":"tgt","size":4194304}"#)
                .await;
            let src = w.graph.find("src").expect("src");
            let drained = w.graph.drain(&src).await;
            let r = ferrite_blockdev::transaction::qmp_single_action(
                &w.jobs,
                &w.graph,
                "blockdev-backup",
                &args(r#"{"job-id":"j","device":"src","target":"tgt","sync":"full"}"#),
            )
            .await;
            assert!(r.is_ok(), "{r:?}");
            let job = w.jobs.find("j").expect("job");
            assert_eq!(job.status(), Status::Paused);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(w.counts.total(), 0, "the job copied while drained");
            drop(drained);
            assert!(wait_until(Duration::from_secs(5), || w.jobs.find("j").is_err()).await);
            assert_eq!(w.counts.reads.get() * (1 << 20), 4 << 20);
            assert_eq!(
                w.statuses(),
                [
                    "created",
                    "running",
                    "paused",
                    "running",
                    "waiting",
                    "pending",
                    "concluded",
                    "null"
                ]
            );
        })
        .await;
}
