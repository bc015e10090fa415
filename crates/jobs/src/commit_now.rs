//! Committing an image into its backing file at once, without a job (QEMU: `bdrv_commit`,
//! the human monitor's `commit`): what the image allocates is copied down, the image is
//! emptied so that it reads as its backing file, and the graph stays as it was.

use crate::commit::CommitTopFactory;
use ferrite_block::{BlockBackend, BlockOp, Graph, Node, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::io;
use std::rc::Rc;

/// How much is copied per request (QEMU's `COMMIT_BUF_SIZE`).
const STEP: u64 = 2 << 20;

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Commits `top` into its backing file. The backing file is opened for writing for the
/// while if it was read-only, and grown to `top`'s size if it is smaller.
///
/// # Errors
/// ENOTSUP without a backing file, EBUSY when a job or another user holds the nodes, the
/// I/O failing (what was copied stays copied; `top` is emptied only after all of it).
pub async fn commit_now(graph: &Rc<Graph>, top: &Rc<Node>) -> io::Result<()> {
    let Some(base) = top.child("backing") else {
        return Err(errno(libc::ENOTSUP));
    };
    if graph.check_op(top, BlockOp::CommitSource).is_err()
        || graph.check_op(&base, BlockOp::CommitTarget).is_err()
    {
        return Err(errno(libc::EBUSY));
    }
    let was_read_only = base.is_read_only();
    if was_read_only {
        graph
            .set_read_only(&base, false)
            .map_err(|_| errno(libc::EACCES))?;
    }
    let r = copy_down(graph, top, &base).await;
    if was_read_only {
        let _ = graph.reopen_read_only(&base).await;
    }
    r
}

/// Copies under a `commit_top` filter put between `top` and `base`: it asks nothing of
/// `base`, so the copy may write there whatever `top`'s users forbid (QEMU does the same).
async fn copy_down(graph: &Rc<Graph>, top: &Rc<Node>, base: &Rc<Node>) -> io::Result<()> {
    let opts = QDict::new()
        .with("driver", "commit_top")
        .with("backing", base.name());
    let filter = graph
        .insert_filter(base, &Args::new(opts), &CommitTopFactory)
        .await
        .map_err(|_| errno(libc::EBUSY))?;
    filter.set_implicit();
    let r = copy_under_filter(graph, top, base).await;
    let _ = graph.remove_filter(&filter).await;
    r
}

async fn copy_under_filter(graph: &Rc<Graph>, top: &Rc<Node>, base: &Rc<Node>) -> io::Result<()> {
    let len = top.len();
    let base_perm = if base.len() < len {
        Perm::WRITE | Perm::RESIZE
    } else {
        Perm::WRITE
    };
    let to_base =
        BlockBackend::new(graph, base, base_perm, Perm::all()).map_err(|_| errno(libc::EBUSY))?;
    let from_top = BlockBackend::new(graph, top, Perm::CONSISTENT_READ, Perm::all())
        .map_err(|_| errno(libc::EBUSY))?;
    // Nobody else writes while the data moves (QEMU runs this in one go).
    let _drained = graph.drain(top).await;
    to_base.set_queue_requests(false);
    from_top.set_queue_requests(false);
    if base.len() < len {
        to_base.truncate(len).await?;
    }
    let mut offset = 0;
    while offset < len {
        let want = STEP.min(len - offset);
        let (allocated, n) = top
            .is_allocated_above(Some(base), false, offset, want)
            .await?;
        let n = n.max(1).min(want);
        if allocated {
            let data = from_top.read(offset, n as usize).await?;
            to_base.write(offset, data, ReqFlags::empty()).await?;
        }
        offset += n;
    }
    to_base.flush().await?;
    match top.driver().make_empty(top).await {
        Ok(()) => from_top.flush().await,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Ok(()),
        Err(e) => Err(e),
    }
}
