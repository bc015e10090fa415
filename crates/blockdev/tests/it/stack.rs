//! Jobs started inside drained sections, and backups stacking their filters on one source.

use crate::{World, args, wait_until};
use ferrite_jobs::Status;
use std::time::Duration;

async fn backup(w: &World, job: &str, target: &str, sync: &str, speed: u64) {
    ferrite_blockdev::transaction::qmp_single_action(
        &w.jobs,
        &w.graph,
        "blockdev-backup",
        &args(&format!(
            r#"{{"job-id":"{job}","device":"src","target":"{target}","sync":"{sync}","speed":{speed}}}"#
        )),
    )
    .await
    .expect("backup");
}

/// A job the transaction's drain resumed before it first ran is running, not idle: the
/// next drain waits for it to reach a pause point, and its states stay consistent to the
/// end. (It was once taken for idle and marked paused while it copied.)
#[tokio::test(flavor = "current_thread")]
async fn a_job_resumed_before_it_first_ran_is_busy_and_pauses_on_the_next_drain() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let w = World::new();
            w.add(
                r#"{"driver":"counting","node-name":"src","size":67108864,"latency-ns":50000000}"#,
            )
            .await;
            w.add(r#"{"driver":"null-co","node-name":"tgt","size":67108864}"#)
                .await;
            backup(&w, "j", "tgt", "full", 0).await;
            let job = w.jobs.find("j").expect("job");
            assert_eq!(job.status(), Status::Running);
            let src = w.graph.find("src").expect("src");
            // While its copies are in flight the job is busy (query-block-jobs says so).
            assert!(wait_until(Duration::from_secs(5), || src.in_flight() > 0).await);
            let busy = job.block_info().get("busy").and_then(|b| b.as_bool());
            assert_eq!(busy, Some(true));
            let drained = w.graph.drain(&src).await;
            assert_eq!(job.status(), Status::Paused);
            let before = w.counts.total();
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                w.counts.total(),
                before,
                "a request reached the drained node"
            );
            drop(drained);
            assert!(wait_until(Duration::from_secs(10), || w.jobs.find("j").is_err()).await);
            assert_eq!(
                w.statuses(),
                [
                    "created",
                    "running",
                    "paused",
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

/// Three backups of one source put three filters above it, each above the one before;
/// draining the source pauses all three jobs, and cancelling them takes the filters out.
#[tokio::test(flavor = "current_thread")]
async fn stacked_backups_all_pause_on_a_drain_of_their_source() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let w = World::new();
            w.add(r#"{"driver":"counting","node-name":"src","size":4194304}"#)
                .await;
            for t in ["t0", "t1", "t2"] {
                w.add(&format!(
                    r#"{{"driver":"null-co","node-name":"{t}","size":4194304}}"#
                ))
                .await;
            }
            backup(&w, "j0", "t0", "full", 1024).await;
            backup(&w, "j1", "t1", "none", 0).await;
            backup(&w, "j2", "t2", "full", 1024).await;
            let src = w.graph.find("src").expect("src");
            // The newest filter sits right above the source, the oldest on top.
            let above = src.users()[0].parent_node().expect("filter");
            assert_eq!(above.driver_name(), "copy-before-write");
            w.statuses();
            let drained = w.graph.drain(&src).await;
            let jobs: Vec<_> = ["j0", "j1", "j2"]
                .iter()
                .map(|j| w.jobs.find(j).expect("job"))
                .collect();
            assert!(jobs.iter().all(|j| j.status() == Status::Paused));
            drop(drained);
            assert!(jobs.iter().all(|j| j.status() == Status::Running));
            for j in &jobs {
                w.jobs.cancel_sync(j).await;
            }
            let names: Vec<String> = w
                .graph
                .nodes()
                .iter()
                .map(|n| n.name().to_owned())
                .collect();
            assert_eq!(names, ["src", "t0", "t1", "t2"]);
            assert!(src.users().is_empty());
        })
        .await;
}
