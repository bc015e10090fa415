//! The io_uring backend (`aio=io_uring`): one ring on a submission thread. Requests arrive
//! over a channel; an eventfd read kept armed in the ring wakes the thread for new work, so
//! it can sleep in the kernel waiting for either kind of event.

use super::{Fallocate, IoBackend, IoFuture};
use io_uring::{IoUring, opcode, types};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::mpsc;
use tokio::sync::oneshot;

enum Op {
    Read { len: usize },
    Write { data: Vec<u8> },
    Fsync,
    Fallocate { mode: i32, len: u64 },
}

struct Request {
    file: Arc<File>,
    offset: u64,
    op: Op,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

/// An in-flight request: keeps its buffer and file alive until the kernel is done with them.
struct InFlight {
    req: Request,
    buf: Vec<u8>,
}

const WAKE: u64 = u64::MAX;
const ENTRIES: u32 = 256;

/// The io_uring backend. Creating it fails where the kernel refuses io_uring; callers then
/// fall back to the thread pool.
pub struct Uring {
    tx: mpsc::Sender<Request>,
    wake: Arc<OwnedFd>,
}

impl Uring {
    /// Sets up the ring and its thread.
    ///
    /// # Errors
    /// The kernel refusing io_uring (ENOSYS, EPERM under seccomp), or eventfd failing.
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::new(ENTRIES)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::channel();
        let thread_wake = wake.clone();
        std::thread::Builder::new()
            .name("ferrite-uring".into())
            .spawn(move || run(ring, rx, thread_wake))?;
        Ok(Uring { tx, wake })
    }

    fn submit(&self, file: &Arc<File>, offset: u64, op: Op) -> IoFuture<Vec<u8>> {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Request {
            file: file.clone(),
            offset,
            op,
            done,
        });
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd, which is what eventfd expects.
        unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        Box::pin(async move {
            sent.map_err(|_| io::Error::other("io_uring thread is gone"))?;
            rx.await
                .unwrap_or_else(|_| Err(io::Error::other("io_uring request dropped")))
        })
    }
}

impl IoBackend for Uring {
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        self.submit(file, offset, Op::Read { len })
    }

    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let f = self.submit(file, offset, Op::Write { data });
        Box::pin(async move { f.await.map(drop) })
    }

    fn fdatasync(&self, file: &Arc<File>) -> IoFuture<()> {
        let f = self.submit(file, 0, Op::Fsync);
        Box::pin(async move { f.await.map(drop) })
    }

    fn fallocate(&self, file: &Arc<File>, how: Fallocate, offset: u64, len: u64) -> IoFuture<()> {
        let mode = match how {
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
            Fallocate::Allocate => 0,
        };
        let f = self.submit(file, offset, Op::Fallocate { mode, len });
        Box::pin(async move { f.await.map(drop) })
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

fn run(mut ring: IoUring, rx: mpsc::Receiver<Request>, wake: Arc<OwnedFd>) {
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    loop {
        if !wake_armed {
            let sqe = opcode::Read::new(types::Fd(wake.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE);
            // SAFETY: `wake_buf` lives on this thread's stack for the whole loop, and the
            // eventfd is kept open by `wake`; the kernel writes at most 8 bytes into it.
            if unsafe { ring.submission().push(&sqe) }.is_ok() {
                wake_armed = true;
            }
        }
        let mut disconnected = false;
        loop {
            match rx.try_recv() {
                Ok(req) => {
                    let slot = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    let buf = match &req.op {
                        Op::Read { len } => vec![0u8; *len],
                        _ => Vec::new(),
                    };
                    slots[slot] = Some(InFlight { req, buf });
                    let Some(inflight) = slots[slot].as_mut() else {
                        continue;
                    };
                    let sqe = build_sqe(inflight, slot as u64);
                    while ring.submission().is_full() {
                        if ring.submit().is_err() {
                            break;
                        }
                        reap(&mut ring, &mut slots, &mut free, &mut wake_armed);
                    }
                    // SAFETY: the buffer and file the SQE points at are owned by `slots[slot]`,
                    // which is only emptied when this SQE's completion is reaped.
                    let _ = unsafe { ring.submission().push(&sqe) };
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if disconnected && slots.iter().all(Option::is_none) {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(error = %e, "io_uring wait failed");
            }
        }
        reap(&mut ring, &mut slots, &mut free, &mut wake_armed);
    }
}

fn build_sqe(inflight: &mut InFlight, user_data: u64) -> io_uring::squeue::Entry {
    let fd = types::Fd(inflight.req.file.as_raw_fd());
    let offset = inflight.req.offset;
    match &inflight.req.op {
        Op::Read { len } => opcode::Read::new(fd, inflight.buf.as_mut_ptr(), *len as u32)
            .offset(offset)
            .build(),
        Op::Write { data } => opcode::Write::new(fd, data.as_ptr(), data.len() as u32)
            .offset(offset)
            .build(),
        Op::Fsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
            .offset(offset)
            .mode(*mode)
            .build(),
    }
    .user_data(user_data)
}

fn reap(
    ring: &mut IoUring,
    slots: &mut [Option<InFlight>],
    free: &mut Vec<usize>,
    wake_armed: &mut bool,
) {
    let completions: Vec<(u64, i32)> = ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    for (user_data, res) in completions {
        if user_data == WAKE {
            *wake_armed = false;
            continue;
        }
        let slot = user_data as usize;
        let Some(InFlight { req, mut buf }) = slots.get_mut(slot).and_then(Option::take) else {
            continue;
        };
        free.push(slot);
        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else {
            finish_short(&req, &mut buf, res as usize).map(|()| buf)
        };
        let _ = req.done.send(result);
    }
}

/// Completes a short read or write synchronously (rare: end of file or a signal).
fn finish_short(req: &Request, buf: &mut [u8], done: usize) -> io::Result<()> {
    match &req.op {
        Op::Read { len } if done < *len => {
            let rest = super::threads::read_full(&req.file, req.offset + done as u64, len - done)?;
            buf[done..].copy_from_slice(&rest);
            Ok(())
        }
        Op::Write { data } if done < data.len() => req
            .file
            .write_all_at(&data[done..], req.offset + done as u64),
        _ => Ok(()),
    }
}
