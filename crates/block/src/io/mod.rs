//! File I/O off the main thread: positioned reads and writes, flush, fallocate, truncate and
//! SEEK_DATA/SEEK_HOLE behind one [`IoBackend`] trait, with a thread-pool backend (QEMU's
//! `aio=threads`, the default) and an io_uring backend (`aio=io_uring`).
//!
//! Buffers are owned and move with the request, so a request never borrows from its caller
//! across an await.

pub mod aligned;
mod foreign;
mod lane;
mod nowait;
mod placement;
pub mod pool;
mod threads;
mod uring;

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;

pub use foreign::ForeignBuf;
pub use lane::background;
pub use nowait::{NOWAIT_MAX, read_cached};
pub use threads::ThreadPool;
pub use uring::Uring;

/// A boxed I/O future (the block layer is single-threaded, so no `Send`).
pub type IoFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>>>>;

/// What `fallocate` should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallocate {
    /// Deallocate the range; it then reads as zeroes.
    PunchHole,
    /// Make the range read as zeroes, keeping it allocated.
    ZeroRange,
    /// Allocate the range (preallocation).
    Allocate,
}

impl Fallocate {
    /// The `fallocate(2)` mode.
    pub(crate) fn mode(self) -> i32 {
        match self {
            Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE,
            Fallocate::Allocate => 0,
        }
    }
}

/// The operations a file node needs from the operating system.
pub trait IoBackend {
    /// Reads exactly `len` bytes at `offset`; bytes past the end of the file read as zero.
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>>;
    /// Writes all of `data` at `offset`.
    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()>;
    /// Reads with O_DIRECT: `offset` and `len` are multiples of [`aligned::DIRECT_ALIGN`];
    /// the I/O goes through an aligned buffer.
    fn pread_direct(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>>;
    /// Writes with O_DIRECT; alignment as for [`IoBackend::pread_direct`].
    fn pwrite_direct(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()>;
    /// Reads `dest.len()` bytes at `offset` into `dest`; bytes past the end of the file read
    /// as zero. What the page cache holds (up to 64 KiB) is read on the
    /// calling thread, the rest on the thread pool, straight into `dest` either way.
    fn pread_into(&self, file: &Arc<File>, offset: u64, dest: ForeignBuf) -> IoFuture<()> {
        let mut done = 0;
        if dest.len() <= nowait::NOWAIT_MAX {
            match dest.pread(file, offset, true) {
                Ok(n) if n == dest.len() => return Box::pin(std::future::ready(Ok(()))),
                Ok(n) => done = n,
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            }
        }
        let file = file.clone();
        blocking(move || {
            dest.slice(done, dest.len() - done)
                .pread(&file, offset + done as u64, false)
                .map(drop)
        })
    }
    /// Makes written data durable.
    fn fdatasync(&self, file: &Arc<File>) -> IoFuture<()>;
    /// Punches, zeroes or allocates a range.
    fn fallocate(&self, file: &Arc<File>, how: Fallocate, offset: u64, len: u64) -> IoFuture<()>;
    /// The backend's name, as `aio=` spells it.
    fn name(&self) -> &'static str;
}

/// Whether `buf` is all zero bytes (in 64-byte blocks the compiler vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    for b in blocks.by_ref() {
        if b.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// A buffered write: done on the calling thread when the page cache takes it at once (see
/// [`nowait`]) or the file's recent writes were cheap (see [`placement`]), otherwise (what is
/// left of it) on the file's write lane (see [`lane`]).
fn pwrite_buffered(file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
    let writes = placement::of(file);
    let mut done = 0;
    if data.len() <= nowait::NOWAIT_MAX {
        match nowait::write(&writes, file, offset, &data) {
            Ok(p) => done = p.done,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        }
        if done < data.len() && writes.inline(offset + done as u64, data.len() - done) {
            let result = writes.timed(|| {
                std::os::unix::fs::FileExt::write_all_at(
                    &**file,
                    &data[done..],
                    offset + done as u64,
                )
            });
            pool::give(data);
            return Box::pin(std::future::ready(result));
        }
    }
    if done == data.len() {
        pool::give(data);
        return Box::pin(std::future::ready(Ok(())));
    }
    // Only a write the kernel cut short (dirty-page throttling) leaves a tail to copy.
    let rest = if done == 0 {
        data
    } else {
        data[done..].to_vec()
    };
    let w = lane::pwrite(file, writes, offset + done as u64, rest);
    // The buffer comes back so that it is freed (or reused) on the calling thread.
    Box::pin(async move { w.await.map(pool::give) })
}

/// Runs a blocking file operation on the thread pool.
pub fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> IoFuture<T> {
    Box::pin(async move {
        tokio::task::spawn_blocking(f)
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    })
}

/// `lseek(SEEK_DATA/SEEK_HOLE)`: the next offset at or after `offset` that starts data
/// (`data == true`) or a hole. `None` past the end (ENXIO).
pub fn seek(file: &File, offset: u64, data: bool) -> io::Result<Option<u64>> {
    let whence = if data {
        libc::SEEK_DATA
    } else {
        libc::SEEK_HOLE
    };
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a descriptor `file` owns has no memory-safety preconditions.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// `fallocate(2)`.
pub fn fallocate_sync(file: &File, how: Fallocate, offset: u64, len: u64) -> io::Result<()> {
    let mode = how.mode();
    let (off, len) = (
        i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
    );
    // SAFETY: fallocate on a descriptor `file` owns has no memory-safety preconditions.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A temporary file holding `data`, open for reading and writing (for the backends' tests).
#[cfg(test)]
pub(crate) fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, Arc<File>) {
    use std::io::Write;
    let mut t = tempfile::NamedTempFile::new().expect("temp file");
    t.write_all(data).expect("write");
    t.flush().expect("flush");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(t.path())
        .expect("open");
    (t, Arc::new(f))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_on_the_calling_thread_never_overtake_the_lanes() {
        const PAGES: u32 = 256;
        let (_t, f) = super::file_with(&vec![0u8; PAGES as usize * 4096]);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&rt, async {
            // In each page a partial write (which goes to the lane) and then a write of the
            // whole page (which could run at once), all made before any is awaited.
            let mut writes = Vec::new();
            for page in 0..PAGES {
                let at = u64::from(page) * 4096;
                writes.push(super::pwrite_buffered(&f, at + 100, vec![1; 300]));
                writes.push(super::pwrite_buffered(
                    &f,
                    at,
                    page.to_le_bytes().repeat(1024),
                ));
            }
            for w in writes {
                w.await.expect("write");
            }
        });
        for page in 0..PAGES {
            let mut got = vec![0u8; 4096];
            f.read_exact_at(&mut got, u64::from(page) * 4096)
                .expect("read");
            let whole = got == page.to_le_bytes().repeat(1024);
            assert!(whole, "page {page}: the partial write landed last");
        }
    }
}
