//! Internal snapshots with VM state through ferrite's driver, checked by QEMU's tools: the
//! VM state area past the disk, a snapshot keeping it, going back to a snapshot (data, VM
//! state, size), and the image clean and readable by `qemu-img` and `qemu-io` afterwards.
//!
//! Needs `qemu-img` and `qemu-io` (scripts/setup.sh installs them).

use crate::drivers;
use ferrite_block::driver::NewSnapshot;
use ferrite_block::{BlockBackend, EventSink, Graph, Node, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::path::Path;
use std::process::Command;
use std::rc::Rc;

struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _event: &dyn ferrite_qapi::QapiEvent) {}
}

fn tool(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog).args(args).output().expect(prog);
    assert!(out.status.success(), "{prog} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A VM state that spans clusters and does not end on one.
fn vm_state(seed: u8) -> Vec<u8> {
    (0..100_000u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn snap(name: &str, vm_state_size: u64) -> NewSnapshot {
    NewSnapshot {
        vm_state_size,
        ..NewSnapshot::now(name, 0)
    }
}

async fn open(g: &Rc<Graph>, path: &Path) -> Rc<Node> {
    let file = QDict::new()
        .with("driver", "file")
        .with("filename", path.to_str().unwrap_or_default());
    g.blockdev_add(&Args::new(
        QDict::new()
            .with("driver", "qcow2")
            .with("node-name", "q")
            .with("file", QObject::Dict(file)),
    ))
    .await
    .expect("open in ferrite")
}

async fn work(path: &Path) {
    let g = Graph::new(Rc::new(NoEvents), drivers());
    let node = open(&g, path).await;
    let d = node.driver();
    let hold =
        BlockBackend::new(&g, &node, Perm::WRITE | Perm::RESIZE, Perm::all()).expect("attach");
    hold.write(0, vec![0x11; 128 << 10], ReqFlags::empty())
        .await
        .expect("write");
    d.save_vmstate(&node, 0, vm_state(1))
        .await
        .expect("save vm state");
    d.snapshot_create(&node, &snap("with-state", 100_000))
        .await
        .expect("snapshot");
    // Written again for the next snapshot: the first one's copy stays as it was.
    d.save_vmstate(&node, 0, vm_state(2))
        .await
        .expect("save vm state");
    hold.write(0, vec![0x22; 64 << 10], ReqFlags::empty())
        .await
        .expect("write");
    d.snapshot_create(&node, &snap("second", 100_000))
        .await
        .expect("snapshot");
    hold.write(0, vec![0x33; 192 << 10], ReqFlags::empty())
        .await
        .expect("write");
    hold.truncate(8 << 20).await.expect("grow");
    assert!(d.snapshot_goto(&node, "with-state").await.expect("goto"));
    assert_eq!(node.len(), 4 << 20, "the snapshot's size comes back");
    assert_eq!(
        hold.read(0, 128 << 10).await.expect("read"),
        vec![0x11; 128 << 10]
    );
    assert_eq!(
        hold.read(128 << 10, 64 << 10).await.expect("read"),
        vec![0; 64 << 10]
    );
    let state = d
        .load_vmstate(&node, 0, 100_000)
        .await
        .expect("load vm state");
    assert!(state == vm_state(1), "the first snapshot's VM state");
    // By ID as well as by name.
    assert!(d.snapshot_goto(&node, "2").await.expect("goto"));
    let state = d
        .load_vmstate(&node, 0, 100_000)
        .await
        .expect("load vm state");
    assert!(state == vm_state(2), "the second snapshot's VM state");
    assert_eq!(
        hold.read(0, 64 << 10).await.expect("read"),
        vec![0x22; 64 << 10]
    );
    assert!(!d.snapshot_goto(&node, "nope").await.expect("goto"));
    // The active image is written after a goto: copy-on-write of what snapshots share.
    hold.write(4096, vec![0x44; 4096], ReqFlags::empty())
        .await
        .expect("write");
    drop(hold);
    g.blockdev_del("q").await.expect("close");
}

fn run(cluster_opts: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("s.qcow2");
    let img_s = img.to_str().unwrap_or_default();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            cluster_opts,
            img_s,
            "4M",
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, work(&img));
    tool("qemu-img", &["check", img_s]);
    let list = tool("qemu-img", &["snapshot", "-l", img_s]);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(&rows[0][..4], ["1", "with-state", "97.7", "KiB"], "{list}");
    assert_eq!(&rows[1][..4], ["2", "second", "97.7", "KiB"], "{list}");
    // What ferrite left is what QEMU reads, now and after QEMU goes back to a snapshot.
    let reads = |img: &str, cmds: &[&str]| {
        let mut args = vec!["-f", "qcow2"];
        for c in cmds {
            args.extend(["-c", c]);
        }
        args.push(img);
        let out = tool("qemu-io", &args);
        assert!(!out.contains("verification failed"), "{out}");
    };
    reads(
        img_s,
        &[
            "read -P 0x22 0 4k",
            "read -P 0x44 4k 4k",
            "read -P 0x22 8k 56k",
        ],
    );
    tool("qemu-img", &["snapshot", "-a", "with-state", img_s]);
    reads(img_s, &["read -P 0x11 0 128k", "read -P 0 128k 64k"]);
    tool("qemu-img", &["check", img_s]);
}

#[test]
fn vm_state_and_snapshot_goto_leave_an_image_qemu_reads() {
    run("cluster_size=65536");
}

#[test]
fn vm_state_and_snapshot_goto_with_extended_l2_and_smaller_clusters() {
    run("cluster_size=16384,extended_l2=on");
}
