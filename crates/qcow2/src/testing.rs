//! A workout for an image of unknown health, shared by the damaged-image property tests and
//! the coverage-guided fuzz target: every step may fail, none may panic or hang.

use ferrite_block::driver::NewSnapshot;
use ferrite_block::{BlockBackend, Graph, Node, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// How much of an image the workout reads, at most.
const READ_SPAN: u64 = 4 << 20;
/// Where the workout writes, at most.
const WRITE_SPAN: u64 = 1 << 20;

/// Opens a qcow2 node `q` over `file` (a protocol node's options) and uses it: reads and
/// block status over its start, then writes, zeroes, a discard, a compressed write, a VM
/// snapshot taken and gone back to, a resize, and a read, and closes it. Returns how many
/// of the reads succeeded (none if it did not open).
pub async fn exercise(g: &Rc<Graph>, file: QDict) -> usize {
    exercise_format(g, "qcow2", file).await
}

/// Reads and asks the block status of a node's start (its first 4 MiB) through a
/// backend of its own; returns how many reads succeeded.
pub async fn read_start(g: &Rc<Graph>, node: &Rc<Node>) -> usize {
    let size = node.len();
    let mut reads = 0;
    if let Ok(reader) = BlockBackend::new(g, node, Perm::CONSISTENT_READ, Perm::all()) {
        let mut off = 0;
        while off < size.min(READ_SPAN) {
            let n = (size - off).min(128 << 10);
            reads += usize::from(reader.read(off, n as usize).await.is_ok());
            let _ = node.block_status(off, n).await;
            off += n;
        }
        reader.remove();
    }
    reads
}

/// [`exercise`] for a node of format `driver` (another format fails the qcow2-only steps,
/// which is part of the workout).
pub async fn exercise_format(g: &Rc<Graph>, driver: &str, file: QDict) -> usize {
    let opts = QDict::new()
        .with("driver", driver)
        .with("node-name", "q")
        .with("file", QObject::Dict(file));
    let Ok(node) = g.blockdev_add(&Args::new(opts)).await else {
        return 0;
    };
    let size = node.len();
    let reads = read_start(g, &node).await;
    if let Ok(hold) = BlockBackend::new(g, &node, Perm::WRITE | Perm::RESIZE, Perm::all()) {
        let end = size.min(WRITE_SPAN);
        if end > 8192 {
            let _ = hold.write(4096, vec![0x5a; 4096], ReqFlags::empty()).await;
            let _ = hold
                .write(end - 8192, vec![0xa5; 8192], ReqFlags::empty())
                .await;
            let _ = hold.write_zeroes(0, 4096, ReqFlags::MAY_UNMAP).await;
            let _ = hold.discard(65536, 65536).await;
            let _ = hold.write_compressed(0, vec![7; 65536]).await;
            // A VM snapshot: state past the disk, a snapshot keeping it, back to it.
            let d = node.driver();
            let _ = d.save_vmstate(&node, 0, vec![9; 70_000]).await;
            let snap = NewSnapshot {
                vm_state_size: 70_000,
                ..NewSnapshot::now("fz", 0)
            };
            let _ = d.snapshot_create(&node, &snap).await;
            let _ = hold.write(4096, vec![0x3c; 4096], ReqFlags::empty()).await;
            let _ = d.snapshot_goto(&node, "fz").await;
            let _ = d.load_vmstate(&node, 0, 70_000).await;
        }
        let _ = hold.truncate(size + (64 << 10)).await;
        let _ = hold.read(0, 4096).await;
    }
    let _ = g.blockdev_del("q").await;
    reads
}
