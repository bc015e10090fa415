//! What a mirror job and its `mirror_top` filter share: the dirty bitmap of what the target
//! still lacks, the chunks a copy or an active write is working on, the copy mode, and the
//! error policies every failing request applies.

use crate::job::{ErrorPolicy, Job};
use crate::types::{BlockErrorAction, MirrorCopyMode};
use ferrite_block::BlockBackend;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::units::UnitLocks;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::{Rc, Weak};
use tokio::sync::Notify;

/// The state a mirror job shares with its filter.
pub(crate) struct Shared {
    /// What the target lacks: set by writes through the filter, cleared as the job copies.
    /// Disabled (nothing marks it implicitly); it shows on the filter node, as in QEMU.
    pub(crate) bitmap: Rc<DirtyBitmap>,
    pub(crate) granularity: u64,
    /// The chunks (granules of the bitmap) a copy or an active write works on: a second
    /// request on a held chunk waits, so data reaches the target in the order it was read
    /// (QEMU's `in_flight_bitmap`).
    pub(crate) locks: UnitLocks,
    pub(crate) copy_mode: Cell<MirrorCopyMode>,
    /// Write-blocking and converged: every write is on both sides when it completes.
    pub(crate) actively_synced: Cell<bool>,
    /// The job (for its error policy and progress).
    pub(crate) job: RefCell<Weak<Job>>,
    /// The job has marked what the target lacks and copies: from now on, in write-blocking
    /// mode, writes go to the target too (QEMU sets `bs_opaque->job` here).
    pub(crate) copying: Cell<bool>,
    pub(crate) on_source_error: Cell<ErrorPolicy>,
    pub(crate) on_target_error: Cell<ErrorPolicy>,
    /// The job's way to the target (released at the end, before the graph changes).
    pub(crate) target: RefCell<Option<Rc<BlockBackend>>>,
    /// The job is ending: the filter asks nothing of the source any more.
    pub(crate) stop: Cell<bool>,
    /// An active commit: the target is the source's backing file.
    pub(crate) is_commit: bool,
    /// Why the job failed, once a request's failure was to be reported (QEMU's
    /// `s->ret < 0`): active writes stop copying, the job ends.
    pub(crate) failure: RefCell<Option<String>>,
    /// Raised when the bitmap gains dirty chunks or a request fails (wakes a job that
    /// sleeps in `ready`).
    pub(crate) dirtied: Notify,
    /// Active writes in flight, and their bytes (QEMU: `in_active_write_counter`,
    /// `active_write_bytes_in_flight`).
    pub(crate) active_writes: Cell<u32>,
    pub(crate) active_bytes: Cell<u64>,
}

impl Shared {
    pub(crate) fn new(
        bitmap: Rc<DirtyBitmap>,
        copy_mode: MirrorCopyMode,
        is_commit: bool,
    ) -> Rc<Shared> {
        Rc::new(Shared {
            granularity: bitmap.granularity(),
            bitmap,
            locks: UnitLocks::default(),
            copy_mode: Cell::new(copy_mode),
            actively_synced: Cell::new(false),
            job: RefCell::new(Weak::new()),
            copying: Cell::new(false),
            on_source_error: Cell::new(ErrorPolicy::Report),
            on_target_error: Cell::new(ErrorPolicy::Report),
            target: RefCell::new(None),
            stop: Cell::new(false),
            is_commit,
            failure: RefCell::new(None),
            dirtied: Notify::new(),
            active_writes: Cell::new(0),
            active_bytes: Cell::new(0),
        })
    }

    /// The chunks `offset..offset + len` touches.
    pub(crate) fn chunks(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset / self.granularity,
            (offset + len).div_ceil(self.granularity),
        )
    }

    /// Marks a range the target lacks; a sleeping job wakes.
    pub(crate) fn mark_dirty(&self, offset: u64, len: u64) {
        self.bitmap.set_range(offset, len);
        self.dirtied.notify_waiters();
    }

    /// A request failed (what it was to do is marked dirty again): `BLOCK_JOB_ERROR` and
    /// the side's policy at once, as QEMU's requests apply it; `stop` pauses the job once
    /// however many requests fail, `report` fails it.
    pub(crate) fn request_failed(&self, read: bool, error: &io::Error) {
        let policy = if read {
            self.on_source_error.get()
        } else {
            self.on_target_error.get()
        };
        let action = match self.job() {
            Some(job) => job.error_action(read, error, policy),
            None => BlockErrorAction::Report,
        };
        if action == BlockErrorAction::Report && self.failure.borrow().is_none() {
            *self.failure.borrow_mut() = Some(ferrite_qapi::os_msg(error));
        }
        self.dirtied.notify_waiters();
    }

    /// Whether a request's failure was to be reported: the job fails.
    pub(crate) fn has_failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    /// The job, if it is running.
    pub(crate) fn job(&self) -> Option<Rc<Job>> {
        self.job.borrow().upgrade()
    }

    /// Whether a write through the filter must also reach the target before it completes
    /// (QEMU: `should_copy_to_target`).
    pub(crate) fn copies_writes(&self) -> bool {
        self.copy_mode.get() == MirrorCopyMode::WriteBlocking
            && self.copying.get()
            && !self.has_failed()
            && !self.stop.get()
            && self.job().is_some_and(|j| !j.is_cancelled())
    }
}
