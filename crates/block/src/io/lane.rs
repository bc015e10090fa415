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
//! Except that a client's writes go ahead of a job's background copy queued before them, when
//! they overlap none of it (see [`background`]): a guest's write, or the copy-before-write it
//! waits for, should not wait behind a backup's sixteen queued megabytes. Writes in flight
//! together may land in either order anyway (NBD and virtio promise nothing else);
//! overlapping ones keep theirs. After a few client writes one background write goes, so a
//! busy client does not stop a job.
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

/// Client writes written in a row, at most, while a background write waits.
const CLIENT_BURST: u32 = 8;

tokio::task_local! {
    /// Set while a job's background copy runs (see [`background`]).
    static BACKGROUND: ();
}

/// Runs `f` as a job's background work: its buffered writes yield to clients' writes on
/// their lane.
pub async fn background<F: std::future::Future>(f: F) -> F::Output {
    BACKGROUND.scope((), f).await
}

/// A lane's waiting writes.
#[derive(Default)]
struct Queue {
    /// Clients' writes that overlap no write in `background`, oldest first.
    client: VecDeque<Job>,
    /// Background writes, and client writes that overlap one of them, oldest first.
    background: VecDeque<Job>,
    /// Client writes taken since the last background one.
    client_run: u32,
}

impl Queue {
    fn push(&mut self, job: Job, background: bool) {
        let end = job.offset + job.data.len() as u64;
        let overlaps = |q: &Job| {
            Arc::ptr_eq(&q.file, &job.file)
                && q.offset < end
                && job.offset < q.offset + q.data.len() as u64
        };
        if background || self.background.iter().any(overlaps) {
            self.background.push_back(job);
        } else {
            self.client.push_back(job);
        }
    }

    fn pop(&mut self) -> Option<Job> {
        if !self.client.is_empty() && (self.background.is_empty() || self.client_run < CLIENT_BURST)
        {
            self.client_run += 1;
            return self.client.pop_front();
        }
        self.client_run = 0;
        self.background
            .pop_front()
            .or_else(|| self.client.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.client.is_empty() && self.background.is_empty()
    }
}

/// One lane: its queue and its thread.
struct Lane {
    queue: Mutex<Queue>,
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
                        queue: Mutex::new(Queue::default()),
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

/// A lane's loop: write what is queued (see [`Queue::pop`]); park when there is nothing.
fn run(lane: &Lane) {
    loop {
        let job = lock(&lane.queue).pop();
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
    let result = writes.timed(|| file.write_all_at(&data, offset).map(|()| data));
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
    let background = BACKGROUND.try_with(|()| ()).is_ok();
    lock(&lane.queue).push(
        Job {
            file: file.clone(),
            writes,
            to: completions(),
            offset,
            data,
            done,
        },
        background,
    );
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
    use super::{CLIENT_BURST, Job, Queue, pwrite};
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

    fn job(file: &Arc<File>, offset: u64, len: usize) -> Job {
        let (done, _) = tokio::sync::oneshot::channel();
        Job {
            file: file.clone(),
            writes: Default::default(),
            to: Arc::new(super::Completions {
                done: Default::default(),
                pending: Default::default(),
                notify: Default::default(),
            }),
            offset,
            data: vec![0; len],
            done,
        }
    }

    fn order(q: &mut Queue) -> Vec<u64> {
        std::iter::from_fn(|| q.pop().map(|j| j.offset)).collect()
    }

    #[test]
    fn client_writes_go_ahead_of_background_ones_they_do_not_overlap() {
        let f = Arc::new(tempfile::tempfile().expect("temp file"));
        let g = Arc::new(tempfile::tempfile().expect("temp file"));
        let mut q = Queue::default();
        // A backup's megabytes, then a guest's writes: one beside them, one inside the
        // second, one over the first but in another file, one inside the one that had to
        // wait (so it waits too).
        q.push(job(&f, 0, 1 << 20), true);
        q.push(job(&f, 1 << 20, 1 << 20), true);
        q.push(job(&f, 8 << 20, 4096), false);
        q.push(job(&f, (1 << 20) + 4096, 4096), false);
        q.push(job(&g, 4096, 4096), false);
        q.push(job(&f, (1 << 20) + 4096 + 512, 512), false);
        assert_eq!(
            order(&mut q),
            [
                8 << 20,
                4096,
                0,
                1 << 20,
                (1 << 20) + 4096,
                (1 << 20) + 4096 + 512
            ]
        );
    }

    #[test]
    fn a_busy_client_does_not_stop_the_background() {
        let f = Arc::new(tempfile::tempfile().expect("temp file"));
        let mut q = Queue::default();
        q.push(job(&f, 1 << 30, 1 << 20), true);
        for k in 0..2 * u64::from(CLIENT_BURST) {
            q.push(job(&f, k * 4096, 4096), false);
        }
        let got = order(&mut q);
        assert_eq!(got[CLIENT_BURST as usize], 1 << 30, "{got:?}");
    }
}
