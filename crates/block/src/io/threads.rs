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

/// Reads `len` bytes at `offset`, zero-filling past the end of the file.
pub(crate) fn read_full(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break, // end of file: the rest stays zero
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

impl IoBackend for ThreadPool {
    fn pread(&self, file: &Arc<File>, offset: u64, len: usize) -> IoFuture<Vec<u8>> {
        let file = file.clone();
        blocking(move || read_full(&file, offset, len))
    }

    fn pwrite(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> IoFuture<()> {
        let file = file.clone();
        blocking(move || file.write_all_at(&data, offset))
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
