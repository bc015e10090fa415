//! The thread-pool backend (`aio=threads`): each request is a blocking syscall on tokio's
//! blocking pool.

use super::{Fallocate, IoBackend, IoFuture, blocking, fallocate_sync};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// The thread-pool backend.
#[derive(Debug, Default)]
pub struct ThreadPool;

/// Fills `buf` from `offset`, zero-filling past the end of the file.
fn read_into(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let len = buf.len();
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break, // end of file: the rest stays zero
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Reads at most this much on the calling thread when the page cache has it.
const NOWAIT_MAX: usize = 64 << 10;

/// Reads what the page cache already holds without blocking (`RWF_NOWAIT`), so a cached read
/// costs one syscall instead of a round trip through the thread pool. Returns how many bytes
/// were read, stopping at the first byte that would need the disk, or at the end of the file
/// (`eof`).
fn read_cached(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: `iov` describes `rest`, a live, exclusively borrowed buffer of exactly
        // `iov_len` bytes, and the descriptor belongs to `file`, open for the whole call.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &raw const iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match n {
            0 => return Ok((done, true)),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Not cached, or the kernel cannot tell without blocking.
                    Some(libc::EAGAIN | libc::EOPNOTSUPP) => return Ok((done, false)),
                    _ => return Err(e),
                }
            }
        }
    }
    Ok((done, false))
}

impl IoBackend for ThreadPool {
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let file = file.clone();
        // The buffer is allocated (and later freed) on the main thread, so memory does not
        // pile up in the worker threads' allocator arenas.
        let mut buf = super::pool::take(len);
        let mut done = 0;
        if len <= NOWAIT_MAX {
            match read_cached(&file, offset, &mut buf) {
                Ok((n, eof)) if n == len || eof => {
                    buf[n..].fill(0);
                    return Box::pin(async move { Ok(buf) });
                }
                Ok((n, _)) => done = n,
                Err(e) => return Box::pin(async move { Err(e) }),
            }
        }
        blocking(move || read_into(&file, offset + done as u64, &mut buf[done..]).map(|()| buf))
    }

    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let file = file.clone();
        // Hand the buffer back so that it is freed on the main thread, like reads' buffers.
        let w = blocking(move || file.write_all_at(&data, offset).map(|()| data));
        Box::pin(async move { w.await.map(super::pool::give) })
    }

    fn pread_direct(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let file = file.clone();
        let mut out = super::pool::take(len);
        blocking(move || {
            let mut bounce = super::aligned::AlignedBuf::zeroed(len);
            read_into(&file, offset, bounce.as_mut_slice())?;
            out.copy_from_slice(bounce.as_slice());
            Ok(out)
        })
    }

    fn pwrite_direct(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let file = file.clone();
        let w = blocking(move || {
            let bounce = super::aligned::AlignedBuf::copy_of(&data);
            file.write_all_at(bounce.as_slice(), offset).map(|()| data)
        });
        Box::pin(async move { w.await.map(super::pool::give) })
    }

    fn fdatasync(&self, file: &Arc<File>) -> IoFuture<()> {
        let file = file.clone();
        blocking(move || file.sync_data())
    }

    fn fallocate(&self, file: &Arc<File>, how: Fallocate, offset: u64, len: u64) -> IoFuture<()> {
        let file = file.clone();
        blocking(move || fallocate_sync(&file, how, offset, len))
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

#[cfg(test)]
mod tests {
    use super::{IoBackend, ThreadPool, read_cached};
    use std::io::Write;
    use std::sync::Arc;

    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, Arc<std::fs::File>) {
        let mut t = tempfile::NamedTempFile::new().expect("temp file");
        t.write_all(data).expect("write");
        t.flush().expect("flush");
        let f = Arc::new(std::fs::File::open(t.path()).expect("open"));
        (t, f)
    }

    #[test]
    fn cached_reads_stop_at_the_end_of_the_file() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_t, f) = file_with(&data);
        let mut buf = vec![0xff; 4096];
        // Just written, so cached: all of it, or (if the kernel cannot tell) nothing.
        let (n, eof) = read_cached(&f, 8192, &mut buf).expect("read");
        assert!(eof || n == 0, "read {n} bytes, eof {eof}");
        assert_eq!(buf[..n], data[8192..8192 + n]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_across_the_end_of_the_file_fill_zeroes_whichever_path_serves_them() {
        let data = vec![7u8; 5000];
        let (_t, f) = file_with(&data);
        for (offset, len) in [(0, 4096), (4096, 4096), (0, 100_000), (8192, 512)] {
            let got = ThreadPool.pread(&f, offset, len).await.expect("pread");
            let want: Vec<u8> = (offset..offset + len as u64)
                .map(|i| if i < 5000 { 7 } else { 0 })
                .collect();
            assert_eq!(got, want, "offset {offset} len {len}");
        }
    }
}
