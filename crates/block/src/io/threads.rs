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
        blocking(move || read_into(&file, offset, &mut buf).map(|()| buf))
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
