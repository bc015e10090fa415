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

impl IoBackend for ThreadPool {
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let file = file.clone();
        // The buffer is allocated (and later freed) on the main thread, so memory does not
        // pile up in the worker threads' allocator arenas.
        let mut buf = super::pool::take(len);
        let mut done = 0;
        if len <= super::nowait::NOWAIT_MAX {
            match super::nowait::read(&file, offset, &mut buf) {
                Ok(p) if p.done == len || p.eof => {
                    buf[p.done..].fill(0);
                    return Box::pin(async move { Ok(buf) });
                }
                Ok(p) => done = p.done,
                Err(e) => return Box::pin(async move { Err(e) }),
            }
        }
        blocking(move || read_into(&file, offset + done as u64, &mut buf[done..]).map(|()| buf))
    }

    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        super::pwrite_buffered(file, offset, data)
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
    use super::{IoBackend, ThreadPool};
    use crate::io::file_with;

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
