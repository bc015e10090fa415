//! Where a buffered write runs: on the calling thread, or on its file's write lane.
//!
//! A buffered write that fills whole pages the page cache can take costs ext4 a few
//! microseconds, less than handing it to a lane and its completion back (two wake-ups, each a
//! context switch, and on a virtual machine an exit per idle processor woken): done on the
//! calling thread, random 4 KiB writes run about 1.6x as fast. But the same write into the
//! large folios a sequential writer leaves costs ext4 tens of microseconds, and one that meets
//! dirty-page throttling or a journal commit sleeps for milliseconds: those belong on a lane,
//! where they overlap with the caller's other work. The file system does not say in advance
//! which it will be (ext4 refuses `RWF_NOWAIT` for buffered writes), so each open file keeps
//! what its recent writes cost, wherever they ran, and a write runs on the calling thread only
//! while that is low.
//!
//! Order: a write runs on the calling thread only when none of the file's writes from this
//! thread waits on its lane, so writes still reach the kernel in the order they were made.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A write whose file's recent writes cost more than this goes to the lane: about what the
/// hand-off costs the calling thread.
const INLINE_MAX_COST: Duration = Duration::from_micros(12);

/// A write that took this long slept (dirty-page throttling, a journal commit, reading from
/// the disk): the next ones go to the lane at once.
const STALL_NS: u32 = 1_000_000;

/// What one open file's writes have been costing.
#[derive(Debug, Default)]
pub(super) struct FileWrites {
    /// The recent cost of one write, in nanoseconds: a moving average (each write moves it a
    /// sixteenth of the way to its own cost, so that a write preempted now and then does not
    /// count), except that a stall sets it, sending the next hundred or so writes to the lane.
    cost_ns: AtomicU32,
    /// Writes handed to the lane that it has not finished.
    on_lane: AtomicU32,
    /// The file system refused a non-blocking write (see `nowait`): not asked again.
    pub(super) refuses_nowait: AtomicBool,
}

impl FileWrites {
    /// Whether a write of `len` bytes at `offset` should run on the calling thread: it fills
    /// whole pages (so the kernel never reads a page to merge it), nothing of this file waits
    /// on the lane, and recent writes were cheap.
    pub(super) fn inline(&self, offset: u64, len: usize) -> bool {
        let page = page_size();
        offset % page == 0
            && len as u64 % page == 0
            && self.on_lane.load(Ordering::Acquire) == 0
            && self.cost_ns.load(Ordering::Relaxed) <= INLINE_MAX_COST.as_nanos() as u32
    }

    /// Runs `write` and records what it cost.
    pub(super) fn timed<T>(&self, write: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let r = write();
        self.record(started.elapsed());
        r
    }

    /// Records what a write cost.
    pub(super) fn record(&self, took: Duration) {
        let sample = u32::try_from(took.as_nanos()).unwrap_or(u32::MAX);
        // One writer updates at a time in practice (the calling thread or the lane); a lost
        // update only delays the estimate by a write.
        let old = self.cost_ns.load(Ordering::Relaxed);
        let new = if sample >= STALL_NS {
            sample
        } else if sample >= old {
            old + (sample - old) / 16
        } else {
            old - (old - sample) / 16
        };
        self.cost_ns.store(new, Ordering::Relaxed);
    }

    /// A write was handed to the lane.
    pub(super) fn queued(&self) {
        self.on_lane.fetch_add(1, Ordering::AcqRel);
    }

    /// The lane finished a write (it has reached the kernel).
    pub(super) fn dequeued(&self) {
        self.on_lane.fetch_sub(1, Ordering::AcqRel);
    }
}

fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no memory-safety preconditions.
        let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// An open file (by the allocation its weak reference keeps) and its record.
type Entry = (Weak<File>, Arc<FileWrites>);

thread_local! {
    /// Each open file's record, by descriptor. The weak reference keeps the `File`'s
    /// allocation, so a pointer match means the same open file even when the descriptor
    /// number has been reused.
    static FILES: RefCell<HashMap<RawFd, Entry>> = RefCell::new(HashMap::new());
}

/// `file`'s record on this thread.
pub(super) fn of(file: &Arc<File>) -> Arc<FileWrites> {
    FILES.with(|files| {
        let mut files = files.borrow_mut();
        let fd = file.as_raw_fd();
        match files.get(&fd) {
            Some((weak, writes)) if std::ptr::eq(weak.as_ptr(), Arc::as_ptr(file)) => {
                writes.clone()
            }
            _ => {
                let writes = Arc::new(FileWrites::default());
                files.insert(fd, (Arc::downgrade(file), writes.clone()));
                writes
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{FileWrites, INLINE_MAX_COST};
    use std::time::Duration;

    #[test]
    fn a_stall_sends_writes_to_the_lane_at_once_and_a_steady_cost_soon() {
        let w = FileWrites::default();
        assert!(w.inline(0, 4096), "a new file starts on the calling thread");
        assert!(
            !w.inline(512, 4096) && !w.inline(0, 512),
            "partial pages go to the lane"
        );
        w.record(Duration::from_millis(2));
        assert!(!w.inline(0, 4096));
        let mut writes = 0;
        while !w.inline(0, 4096) {
            w.record(Duration::from_micros(3));
            writes += 1;
        }
        assert!(
            (50..200).contains(&writes),
            "{writes} cheap writes to recover"
        );
        // One preempted write does not count; writes that all cost more soon do.
        for _ in 0..200 {
            w.record(Duration::from_micros(3));
        }
        w.record(INLINE_MAX_COST * 10);
        assert!(w.inline(0, 4096));
        let mut writes = 0;
        while w.inline(0, 4096) {
            w.record(INLINE_MAX_COST * 3);
            writes += 1;
        }
        assert!(writes < 20, "{writes} costly writes to notice");
    }

    #[test]
    fn nothing_runs_inline_while_the_lane_holds_a_write_of_the_file() {
        let w = FileWrites::default();
        w.queued();
        assert!(!w.inline(0, 4096));
        w.dequeued();
        assert!(w.inline(0, 4096));
    }

    #[test]
    fn a_reused_descriptor_number_gets_a_fresh_record() {
        let f = std::sync::Arc::new(tempfile::tempfile().expect("temp file"));
        let a = super::of(&f);
        a.record(Duration::from_secs(1));
        assert!(std::sync::Arc::ptr_eq(&a, &super::of(&f)));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&*f);
        drop(f);
        let g = std::sync::Arc::new(tempfile::tempfile().expect("temp file"));
        if std::os::fd::AsRawFd::as_raw_fd(&*g) == fd {
            assert!(super::of(&g).inline(0, 4096));
        }
    }
}
