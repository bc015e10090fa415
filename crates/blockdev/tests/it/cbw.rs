//! Copy-before-write holds a guest write for the copy of its own cluster only, also when the
//! background copy has that cluster in flight inside a longer run: with 64 KiB clusters and a
//! target whose writes cost their size, a write to a cluster of a megabyte run is not held
//! for the whole run. The backup still shows the point in time, and its progress counts each
//! byte once.

use crate::{World, args, wait_until};
use ferrite_block::driver::ReqFlags;
use ferrite_block::{BlockBackend, Perm};
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
/// A megabyte written to the target takes about 100 ms, 64 KiB about 6 ms.
const TARGET: &str =
    r#"{"driver":"counting","node-name":"tgt","size":4194304,"write-ns-per-kib":100000}"#;

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i / 65536) as u8 ^ 0x5a)
        .collect()
}

/// Starts a backup of a patterned source, writes to `guest_at` while the background copy is
/// writing its runs, and returns how long the guest write took; checks the target and the
/// job's progress at the end.
async fn guest_write_during_backup(perf: &str, guest_at: u64) -> Duration {
    let w = World::new();
    w.add(r#"{"driver":"counting","node-name":"src","size":4194304}"#)
        .await;
    w.add(TARGET).await;
    let src = w.graph.find("src").expect("src");
    let guest = BlockBackend::new(
        &w.graph,
        &src,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::all(),
    )
    .expect("guest backend");
    guest
        .write(0, pattern(0, SIZE as usize), ReqFlags::empty())
        .await
        .expect("fill");
    let writes_before = w.counts.writes.get();
    ferrite_blockdev::transaction::qmp_single_action(
        &w.jobs,
        &w.graph,
        "blockdev-backup",
        &args(&format!(
            r#"{{"job-id":"j","device":"src","target":"tgt","sync":"full"{perf}}}"#
        )),
    )
    .await
    .expect("backup");
    // The source answers at once, so the runs have been read and are being written.
    assert!(
        wait_until(Duration::from_secs(5), || w.counts.writes.get()
            > writes_before)
        .await,
        "the backup wrote nothing"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    let start = Instant::now();
    guest
        .write(guest_at, vec![0xee; 4096], ReqFlags::empty())
        .await
        .expect("guest write");
    let held = start.elapsed();
    assert!(wait_until(Duration::from_secs(30), || w.jobs.find("j").is_err()).await);
    let completed = w
        .events
        .take()
        .into_iter()
        .find(|(name, _)| name == "BLOCK_JOB_COMPLETED")
        .expect("BLOCK_JOB_COMPLETED")
        .1;
    assert!(completed.get("error").is_none(), "{completed:?}");
    let (offset, len) = (
        completed.get("offset").and_then(|v| v.as_u64()),
        completed.get("len").and_then(|v| v.as_u64()),
    );
    assert_eq!(
        (offset, len),
        (Some(SIZE), Some(SIZE)),
        "progress counts a byte twice or never"
    );
    // The target holds the point in time; the source the guest's write.
    let tgt = w.graph.find("tgt").expect("tgt");
    let reader = BlockBackend::new(&w.graph, &tgt, Perm::CONSISTENT_READ, Perm::all())
        .expect("target backend");
    let got = reader.read(0, SIZE as usize).await.expect("read target");
    assert!(
        got == pattern(0, SIZE as usize),
        "the target lost the point in time"
    );
    let now = guest.read(guest_at, 4096).await.expect("read source");
    assert_eq!(now, vec![0xee; 4096]);
    held
}

#[tokio::test(flavor = "current_thread")]
async fn a_write_into_a_megabyte_run_waits_for_its_own_64k_cluster_only() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            // Cluster 5 lies in the first run (clusters 0-15, about 100 ms to write).
            let held = guest_write_during_backup("", 5 * 65536 + 512).await;
            assert!(
                held < Duration::from_millis(50),
                "the guest write was held {held:?}, as long as the whole run"
            );
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn with_megabyte_clusters_a_write_waits_for_its_cluster_once() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            // One cluster per run: the copy of its own cluster is the run (about 100 ms).
            let held = guest_write_during_backup(
                r#","x-perf":{"min-cluster-size":1048576}"#,
                (2 << 20) + 4096,
            )
            .await;
            assert!(
                held < Duration::from_millis(250),
                "the guest write was held {held:?}"
            );
        })
        .await;
}
