//! Write lanes: buffered writes performed in order by a few long-lived threads, handed over
//! and handed back in batches.
//!
//! A buffered write of a few KiB costs the kernel a few microseconds; handing it to a pool
//! thread and waking the main thread for its completion costs more than that in futex waits
//! and context switches (strace showed ten futex calls per 4 KiB write). And ext4 takes the
//! inode's lock exclusively for a buffered write, so pool threads writing the same file only
//! queue up behind each other in the kernel. A lane is one thread that writes whatever has
//! been queued for it, oldest first: the main thread wakes it only when it sleeps, and it
//! wakes the main thread only when no completion is already waiting to be collected, so a
//! burst of requests costs one wake-up each way. A file always uses the same lane (chosen by
//! its descriptor), so its writes reach the kernel in the order they were made, without locks.
//!
//! `RWF_NOWAIT` would let the main thread write to the page cache directly, as reads do, but
//! ext4 (and most file systems) refuse it for buffered writes.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use tokio::sync::{Notify, oneshot};

use super::IoFuture;
use super::placement::FileWrites;

/// How many lanes there are. Files map to lanes by descriptor, so up to this many files are
/// written in parallel.
const LANES: usize = 4;

/// A write waiting in a lane.
struct Job {
    file: Arc<File>,
    /// The file's record: what this write cost, and that it is done.
    writes: Arc<FileWrites>,
    /// Where to report: the collector of the thread that made the request.
    to: Arc<Completions>,
    offset: u64,
    data: Vec<u8>,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// A finished write, waiting for the main thread to pass its result on.
struct Done {
    result: io::Result<Vec<u8>>,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// One lane: its queue and its thread.
struct Lane {
    queue: Mutex<VecDeque<Job>>,
    /// Set by the lane just before it parks; whoever clears it owes the lane an unpark.
    parked: AtomicBool,
    thread: Thread,
}

/// What the lanes share with the main thread's collector.
struct Completions {
    done: Mutex<Vec<Done>>,
    /// Set once the collector has been notified of completions it has not yet taken.
    pending: AtomicBool,
    notify: Notify,
}

/// The lanes, or `None` when their threads could not be started (the caller then uses the
/// thread pool).
static LANES_STATE: OnceLock<Option<Vec<Arc<Lane>>>> = OnceLock::new();

thread_local! {
    /// This thread's collector, started on first use in the runtime that awaits the writes
    /// (and again if that runtime has gone and another awaits them).
    static COLLECTOR: std::cell::RefCell<Option<(Arc<Completions>, tokio::task::JoinHandle<()>)>> =
        const { std::cell::RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A lane never panics while holding a lock (it only moves values in and out), so a
    // poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lanes() -> Option<&'static [Arc<Lane>]> {
    LANES_STATE
        .get_or_init(|| {
            (0..LANES)
                .map(|i| {
                    let (tx, rx) = std::sync::mpsc::channel::<Arc<Lane>>();
                    let handle = std::thread::Builder::new()
                        .name(format!("write-lane-{i}"))
                        .spawn(move || {
                            if let Ok(lane) = rx.recv() {
                                run(&lane);
                            }
                        })
                        .map_err(|e| tracing::warn!(error = %e, "no write lanes"))
                        .ok()?;
                    let lane = Arc::new(Lane {
                        queue: Mutex::new(VecDeque::new()),
                        parked: AtomicBool::new(false),
                        thread: handle.thread().clone(),
                    });
                    let _ = tx.send(lane.clone());
                    Some(lane)
                })
                .collect()
        })
        .as_deref()
}

/// This thread's collector's queue, starting the collector if none runs.
fn completions() -> Arc<Completions> {
    COLLECTOR.with(|c| {
        let mut c = c.borrow_mut();
        if let Some((completions, task)) = c.as_ref() {
            if !task.is_finished() {
                return completions.clone();
            }
        }
        let completions = Arc::new(Completions {
            done: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            notify: Notify::new(),
        });
        let task = tokio::task::spawn_local(collect(completions.clone()));
        *c = Some((completions.clone(), task));
        completions
    })
}

/// A lane's loop: write what is queued, oldest first; park when there is nothing.
fn run(lane: &Lane) {
    loop {
        let job = lock(&lane.queue).pop_front();
        let Some(Job {
            file,
            writes,
            to,
            offset,
            data,
            done,
        }) = job
        else {
            lane.parked.store(true, Ordering::SeqCst);
            // A job queued between the pop and the store found `parked` false and did not
            // unpark: look once more before sleeping.
            if !lock(&lane.queue).is_empty() {
                lane.parked.store(false, Ordering::SeqCst);
                continue;
            }
            std::thread::park();
            lane.parked.store(false, Ordering::SeqCst);
            continue;
        };
        let result = write(&file, &writes, offset, data);
        drop(file);
        lock(&to.done).push(Done { result, done });
        if !to.pending.swap(true, Ordering::SeqCst) {
            to.notify.notify_one();
        }
    }
}

/// Writes `data` at `offset`, recording what it cost; resolves to the buffer.
fn write(file: &File, writes: &FileWrites, offset: u64, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let started = std::time::Instant::now();
    let result = file.write_all_at(&data, offset).map(|()| data);
    writes.record(started.elapsed());
    writes.dequeued();
    result
}

/// The main thread's side: passes finished writes' results to their requests.
async fn collect(completions: Arc<Completions>) {
    loop {
        completions.notify.notified().await;
        // Cleared before taking, so a completion pushed after the take notifies again.
        completions.pending.store(false, Ordering::SeqCst);
        let done = std::mem::take(&mut *lock(&completions.done));
        for Done { result, done } in done {
            let _ = done.send(result);
        }
    }
}

/// Writes all of `data` at `offset` on `file`'s lane. Resolves to the buffer, so that the
/// caller frees or reuses it on its own thread.
///
/// Must be awaited inside a `LocalSet`: the first call starts the collector there.
pub(super) fn pwrite(
    file: &Arc<File>,
    writes: Arc<FileWrites>,
    offset: u64,
    data: Vec<u8>,
) -> IoFuture<Vec<u8>> {
    writes.queued();
    let Some(lanes) = lanes() else {
        // No lane threads (the system refused them): the thread pool does it.
        let file = file.clone();
        return super::blocking(move || write(&file, &writes, offset, data));
    };
    let lane = &lanes[file.as_raw_fd().unsigned_abs() as usize % LANES];
    let (done, rx) = oneshot::channel();
    lock(&lane.queue).push_back(Job {
        file: file.clone(),
        writes,
        to: completions(),
        offset,
        data,
        done,
    });
    if lane.parked.swap(false, Ordering::SeqCst) {
        lane.thread.unpark();
    }
    Box::pin(async move {
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("write lane dropped a request")))
    })
}

#[cfg(test)]
mod tests {
    use super::pwrite;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    fn run_local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn writes_to_one_file_land_in_the_order_they_were_made() {
        let t = tempfile::tempfile().expect("temp file");
        let f = Arc::new(t);
        run_local(async {
            // All queued before any is awaited: the lane must still apply them in order.
            let writes: Vec<_> = (0..2000u32)
                .map(|i| {
                    pwrite(
                        &f,
                        Default::default(),
                        u64::from(i % 7) * 512,
                        i.to_le_bytes().repeat(128),
                    )
                })
                .collect();
            for w in writes {
                w.await.expect("write");
            }
        });
        for slot in 0..7u32 {
            let last = (0..2000u32).rev().find(|i| i % 7 == slot).expect("a write");
            let mut got = vec![0u8; 512];
            f.read_exact_at(&mut got, u64::from(slot) * 512)
                .expect("read");
            assert_eq!(got, last.to_le_bytes().repeat(128), "slot {slot}");
        }
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_its_completions() {
        let f: Arc<File> = Arc::new(tempfile::tempfile().expect("temp file"));
        for round in 0..3u8 {
            run_local(async {
                pwrite(&f, Default::default(), 0, vec![round; 4096])
                    .await
                    .expect("write");
            });
            let mut got = vec![0u8; 4096];
            f.read_exact_at(&mut got, 0).expect("read");
            assert!(got.iter().all(|&b| b == round));
        }
    }

    #[test]
    fn failures_come_back_to_the_request() {
        let path = tempfile::NamedTempFile::new().expect("temp file");
        let ro = Arc::new(File::open(path.path()).expect("open read-only"));
        let e = run_local(async { pwrite(&ro, Default::default(), 0, vec![1; 512]).await })
            .expect_err("EBADF");
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
