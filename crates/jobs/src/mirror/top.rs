//! `mirror_top`: the filter a mirror job puts above its source (QEMU's `bdrv_mirror_top`).
//! Reads pass through; every write reaches the source and then marks what the target now
//! lacks, or, in write-blocking mode, is written to the target too before it completes.
//! Its child is named `backing`, as QEMU names it.

use super::state::Shared;
use ferrite_block::driver::{BoxFut, Driver, ReqFlags, unsupported};
use ferrite_block::{Child, Node, OpenCtx, Perm};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use std::io;
use std::rc::Rc;

/// Opens the filter of one mirror job, sharing the job's state.
pub(crate) struct MirrorTopFactory(pub(crate) Rc<Shared>);

impl DriverFactory for MirrorTopFactory {
    fn name(&self) -> &'static str {
        "mirror_top"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let source = ctx.open_child("backing").await?;
            Ok(Box::new(MirrorTop {
                shared: self.0.clone(),
                source,
            }) as Box<dyn Driver>)
        })
    }
}

/// How a write changes the source (and, actively mirrored, the target).
enum Write {
    Data(Vec<u8>),
    Zeroes,
    Discard,
}

impl Write {
    /// The same change for the target: data gets its own copy.
    fn for_target(&self) -> Write {
        match self {
            Write::Data(d) => Write::Data(d.clone()),
            Write::Zeroes => Write::Zeroes,
            Write::Discard => Write::Discard,
        }
    }
}

struct MirrorTop {
    shared: Rc<Shared>,
    source: Rc<Child>,
}

impl MirrorTop {
    async fn do_write(
        &self,
        write: Write,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let shared = &self.shared;
        let active = shared.copies_writes();
        let (first, end) = shared.chunks(offset, len);
        // The caller may not keep its buffer the same while both sides are written: the
        // target gets its own copy (QEMU's bounce buffer).
        let for_target = active.then(|| write.for_target());
        if active {
            // Copies of these chunks that read the old data land first.
            shared.locks.wait_free(first, end).await;
            shared.locks.hold(first, end);
            shared.active_writes.set(shared.active_writes.get() + 1);
        }
        let r = match write {
            Write::Data(d) => self.source.write(offset, d, flags).await,
            Write::Zeroes => self.source.write_zeroes(offset, len, flags).await,
            Write::Discard => self.source.discard(offset, len).await,
        };
        if !active {
            shared.actively_synced.set(false);
            shared.mark_dirty(offset, len);
        }
        if active {
            if r.is_ok()
                && let Some(w) = for_target
            {
                self.write_target(w, offset, len, flags).await;
            }
            shared.active_writes.set(shared.active_writes.get() - 1);
            shared.locks.release(first, end);
        }
        r
    }

    /// The write, mirrored: only whole chunks clear their dirty bit; a partial chunk that
    /// is dirty anyway is left to the background copy (QEMU: `do_sync_target_write`).
    async fn write_target(&self, write: Write, offset: u64, len: u64, flags: ReqFlags) {
        let shared = &self.shared;
        let g = shared.granularity;
        let bitmap = &shared.bitmap;
        let (mut at, mut n, mut skip) = (offset, len, 0u64);
        if at % g != 0 && bitmap.get(at / g) {
            let head = at.next_multiple_of(g) - at;
            if n <= head {
                return;
            }
            (at, n, skip) = (at + head, n - head, head);
        }
        if (at + n) % g != 0 && bitmap.get((at + n - 1) / g) {
            let tail = (at + n) % g;
            if n <= tail {
                return;
            }
            n -= tail;
        }
        let (clean_from, clean_to) = (at.next_multiple_of(g), (at + n) / g * g);
        if clean_from < clean_to {
            bitmap.reset_range(clean_from, clean_to - clean_from);
        }
        let Some(target) = shared.target.borrow().clone() else {
            return;
        };
        let job = shared.job();
        if let Some(j) = &job {
            j.progress_increase_remaining(n);
        }
        shared.active_bytes.set(shared.active_bytes.get() + n);
        let r = match write {
            Write::Data(d) => {
                let part = d[skip as usize..(skip + n) as usize].to_vec();
                target.write(at, part, flags).await
            }
            Write::Zeroes => target.write_zeroes(at, n, flags).await,
            Write::Discard => target.discard(at, n).await,
        };
        shared.active_bytes.set(shared.active_bytes.get() - n);
        match r {
            Ok(()) => {
                if let Some(j) = &job {
                    j.progress_update(n);
                }
            }
            Err(e) => {
                // The whole area, aligned out, is for the background copy again.
                let from = at / g * g;
                shared.mark_dirty(from, (at + n).next_multiple_of(g) - from);
                shared.actively_synced.set(false);
                shared.request_failed(false, &e);
            }
        }
    }
}

impl Driver for MirrorTop {
    ferrite_block::forward_to_child!(self.source; len, read, flush, block_status);

    fn format_name(&self) -> &'static str {
        "mirror_top"
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        let len = data.len() as u64;
        Box::pin(self.do_write(Write::Data(data), offset, len, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.do_write(Write::Zeroes, offset, len, flags))
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(self.do_write(Write::Discard, offset, len, ReqFlags::empty()))
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        unsupported()
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        if self.shared.stop.get() {
            // The job is ending: nothing is forwarded to the source any more.
            return (Perm::empty(), Perm::all());
        }
        if self.shared.is_commit {
            // Above the base of a commit: consistent reads are not to be had there, and
            // the base below must stay writable.
            return (perm - Perm::CONSISTENT_READ, shared | Perm::WRITE);
        }
        (perm, shared)
    }

    fn plain_filename(&self) -> Option<String> {
        Some(self.source.node().filename())
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<ferrite_block::bitmap::DirtyBitmap>> {
        vec![self.shared.bitmap.clone()]
    }

    fn cluster_size(&self) -> Option<u64> {
        self.source.node().driver().cluster_size()
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("backing")
    }
}
