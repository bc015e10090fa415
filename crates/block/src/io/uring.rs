//! The io_uring backend (`aio=io_uring`), run on the main thread as QEMU runs it in its event
//! loop: requests are submitted inline, and an eventfd registered with the ring wakes a reaper
//! task when completions arrive. No thread hop per request.

use super::{Fallocate, IoBackend, IoFuture};
use io_uring::{IoUring, opcode, types};
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

const ENTRIES: u32 = 1024;

enum Op {
    Read,
    Write,
    Other,
}

/// A request the kernel is working on: it owns the buffer and keeps the file open.
struct InFlight {
    op: Op,
    file: Arc<File>,
    offset: u64,
    buf: Vec<u8>,
    /// For O_DIRECT: the aligned buffer the kernel uses instead of `buf`.
    bounce: Option<super::aligned::AlignedBuf>,
    done: oneshot::Sender<io::Result<Vec<u8>>>,
}

struct Inner {
    ring: RefCell<IoUring>,
    /// Whether a task is scheduled to submit what has been queued: requests made in the same
    /// turn of the event loop go to the kernel in one system call, as QEMU batches them.
    submit_scheduled: std::cell::Cell<bool>,
    slots: RefCell<Vec<Option<InFlight>>>,
    free: RefCell<Vec<usize>>,
}

/// The io_uring backend. Creating it fails where the kernel refuses io_uring; callers then
/// fall back to the thread pool.
pub struct Uring {
    inner: Rc<Inner>,
}

impl Uring {
    /// Sets up the ring, its eventfd and the reaper task. Must run on the main thread inside
    /// the runtime's local task set.
    ///
    /// # Errors
    /// The kernel refusing io_uring (ENOSYS, EPERM under seccomp), or eventfd failing.
    pub fn new() -> io::Result<Uring> {
        let ring = IoUring::new(ENTRIES)?;
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        // SAFETY: `efd` is an open eventfd that the AsyncFd owns for its whole life, so the
        // descriptor stays valid and keeps referring to the same eventfd.
        let efd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let inner = Rc::new(Inner {
            ring: RefCell::new(ring),
            submit_scheduled: std::cell::Cell::new(false),
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        });
        let reaper = inner.clone();
        tokio::task::spawn_local(async move { reaper.reap_forever(efd).await });
        Ok(Uring { inner })
    }

    fn submit(
        &self,
        file: &Arc<File>,
        offset: u64,
        op: Op,
        buf: Vec<u8>,
        how: OpKind,
    ) -> IoFuture<Vec<u8>> {
        self.submit_with(file, offset, op, (buf, None), how)
    }

    fn submit_with(
        &self,
        file: &Arc<File>,
        offset: u64,
        op: Op,
        bufs: (Vec<u8>, Option<super::aligned::AlignedBuf>),
        how: OpKind,
    ) -> IoFuture<Vec<u8>> {
        let (done, rx) = oneshot::channel();
        let r = self.inner.push(file, offset, op, bufs, how, done);
        Box::pin(async move {
            r?;
            rx.await
                .unwrap_or_else(|_| Err(io::Error::other("io_uring request dropped")))
        })
    }
}

/// What to ask the kernel for.
#[derive(Clone, Copy)]
enum OpKind {
    Read,
    Write,
    Fsync,
    Fallocate { mode: i32, len: u64 },
}

impl Inner {
    fn push(
        self: &Rc<Self>,
        file: &Arc<File>,
        offset: u64,
        op: Op,
        (buf, bounce): (Vec<u8>, Option<super::aligned::AlignedBuf>),
        how: OpKind,
        done: oneshot::Sender<io::Result<Vec<u8>>>,
    ) -> io::Result<()> {
        let slot = self.free.borrow_mut().pop().unwrap_or_else(|| {
            let mut slots = self.slots.borrow_mut();
            slots.push(None);
            slots.len() - 1
        });
        let mut slots = self.slots.borrow_mut();
        let entry = slots[slot].insert(InFlight {
            op,
            file: file.clone(),
            offset,
            buf,
            bounce,
            done,
        });
        let fd = types::Fd(entry.file.as_raw_fd());
        // O_DIRECT requests use the aligned bounce buffer; others the request's own.
        let (ptr, len) = match entry.bounce.as_mut() {
            Some(b) => {
                let s = b.as_mut_slice();
                (s.as_mut_ptr(), s.len())
            }
            None => (entry.buf.as_mut_ptr(), entry.buf.len()),
        };
        let sqe = match how {
            OpKind::Read => opcode::Read::new(fd, ptr, len as u32)
                .offset(offset)
                .build(),
            OpKind::Write => opcode::Write::new(fd, ptr.cast_const(), len as u32)
                .offset(offset)
                .build(),
            OpKind::Fsync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        }
        .user_data(slot as u64);
        drop(slots);
        let mut ring = self.ring.borrow_mut();
        // SAFETY: the SQE points into `slots[slot]`'s buffer and file, which stay in place
        // (the Vec's heap buffer does not move, and the Arc keeps the fd open) until this
        // request's completion is reaped, the only place the slot is emptied.
        let pushed = unsafe { ring.submission().push(&sqe) }.is_ok()
            || (ring.submit().is_ok()
                // SAFETY: as above.
                && unsafe { ring.submission().push(&sqe) }.is_ok());
        if !pushed {
            drop(ring);
            self.slots.borrow_mut()[slot] = None;
            self.free.borrow_mut().push(slot);
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        drop(ring);
        if !self.submit_scheduled.replace(true) {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                me.submit_scheduled.set(false);
                // EBUSY/EAGAIN mean the completion queue is full: let the reaper drain it,
                // then try again, so that queued requests are never left behind.
                for _ in 0..1000 {
                    match me.ring.borrow_mut().submit() {
                        Ok(_) => return,
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                            ) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "io_uring submit failed");
                            return;
                        }
                    }
                    me.reap();
                    tokio::task::yield_now().await;
                }
            });
        }
        Ok(())
    }

    async fn reap_forever(self: Rc<Self>, efd: AsyncFd<OwnedFd>) {
        loop {
            let Ok(mut guard) = efd.readable().await else {
                return;
            };
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live 8-byte buffer from the eventfd.
            unsafe { libc::read(efd.get_ref().as_raw_fd(), counter.as_mut_ptr().cast(), 8) };
            guard.clear_ready();
            self.reap();
        }
    }

    fn reap(&self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .borrow_mut()
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in completions {
            let slot = slot as usize;
            let Some(entry) = self.slots.borrow_mut().get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.borrow_mut().push(slot);
            let InFlight {
                op,
                file,
                offset,
                mut buf,
                bounce,
                done,
            } = entry;
            if let (Op::Read, Some(b)) = (&op, &bounce) {
                buf.copy_from_slice(b.as_slice());
            }
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                let n = res as usize;
                match op {
                    // A short read of a regular file stops at its end: the rest reads as zero.
                    Op::Read => {
                        let mut buf = buf;
                        let end = buf.len();
                        buf[n.min(end)..].fill(0);
                        Ok(buf)
                    }
                    Op::Other => Ok(buf),
                    // A short write is rare (a signal, a full disk); finish it directly.
                    Op::Write if n < buf.len() => {
                        let written = bounce.as_ref().map_or(&buf[..], |b| b.as_slice());
                        let r = file.write_all_at(&written[n..], offset + n as u64);
                        super::pool::give(buf);
                        r.map(|()| Vec::new())
                    }
                    Op::Write => {
                        super::pool::give(buf);
                        Ok(Vec::new())
                    }
                }
            };
            let _ = done.send(result);
        }
    }
}

impl IoBackend for Uring {
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let mut buf = super::pool::take(len);
        // What the page cache holds is copied at once, as the thread pool does: the ring
        // would copy it at submission too, but report it only after an eventfd wake-up.
        if len <= super::nowait::NOWAIT_MAX {
            match super::nowait::read(file, offset, &mut buf) {
                Ok(p) if p.done == len || p.eof => {
                    buf[p.done..].fill(0);
                    return Box::pin(std::future::ready(Ok(buf)));
                }
                Ok(p) if p.done > 0 => {
                    // The rest from the ring, into the same buffer's tail.
                    let head = p.done;
                    let tail = self.submit(
                        file,
                        offset + head as u64,
                        Op::Read,
                        super::pool::take(len - head),
                        OpKind::Read,
                    );
                    return Box::pin(async move {
                        let t = tail.await?;
                        buf[head..].copy_from_slice(&t);
                        Ok(buf)
                    });
                }
                Ok(_) => {}
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            }
        }
        self.submit(file, offset, Op::Read, buf, OpKind::Read)
    }

    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        // Not through the ring: where the file system takes non-blocking buffered writes they
        // are done inline, as io_uring would; where it does not, io_uring would punt them to
        // its worker threads, and a write lane does the same for less (see `lane`).
        super::pwrite_buffered(file, offset, data)
    }

    fn pread_direct(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let bounce = super::aligned::AlignedBuf::zeroed(len);
        self.submit_with(
            file,
            offset,
            Op::Read,
            (super::pool::take(len), Some(bounce)),
            OpKind::Read,
        )
    }

    fn pwrite_direct(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let bounce = super::aligned::AlignedBuf::copy_of(&data);
        let f = self.submit_with(file, offset, Op::Write, (data, Some(bounce)), OpKind::Write);
        Box::pin(async move { f.await.map(drop) })
    }

    fn fdatasync(&self, file: &Arc<File>) -> IoFuture<()> {
        let f = self.submit(file, 0, Op::Other, Vec::new(), OpKind::Fsync);
        Box::pin(async move { f.await.map(drop) })
    }

    fn fallocate(&self, file: &Arc<File>, how: Fallocate, offset: u64, len: u64) -> IoFuture<()> {
        let mode = how.mode();
        let f = self.submit(
            file,
            offset,
            Op::Other,
            Vec::new(),
            OpKind::Fallocate { mode, len },
        );
        Box::pin(async move { f.await.map(drop) })
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }
}

#[cfg(test)]
mod tests {
    use super::{IoBackend, Uring};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    #[test]
    fn reads_partly_cached_partly_not_come_back_whole() {
        let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i % 251) as u8).collect();
        let mut t = tempfile::NamedTempFile::new().expect("temp file");
        // In 4 KiB writes, so the page cache holds small folios that can leave one by one.
        for chunk in data.chunks(4096) {
            t.write_all(chunk).expect("write");
        }
        t.as_file().sync_all().expect("sync");
        let f = Arc::new(std::fs::File::open(t.path()).expect("open"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, async {
            let Ok(ring) = Uring::new() else {
                eprintln!("skipped: io_uring is not available here");
                return;
            };
            for (offset, len) in [(32 << 10, 64 << 10), (0, 4096), (250 << 10, 64 << 10)] {
                // Written back, so the kernel may drop it: the second half of the range
                // leaves the page cache, the first half stays.
                // SAFETY: posix_fadvise on a descriptor `f` owns has no memory preconditions.
                unsafe {
                    libc::posix_fadvise(
                        f.as_raw_fd(),
                        (offset + len / 2) as libc::off_t,
                        0,
                        libc::POSIX_FADV_DONTNEED,
                    )
                };
                let got = ring.pread(&f, offset as u64, len).await.expect("read");
                let want: Vec<u8> = (offset..offset + len)
                    .map(|i| data.get(i).copied().unwrap_or(0))
                    .collect();
                assert!(got == want, "offset {offset} len {len}");
            }
        });
    }
}
