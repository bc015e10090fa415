//! Page-cache I/O on the calling thread, without blocking (`RWF_NOWAIT`): what the page cache
//! can serve or take right now costs one system call instead of a hand-off to another thread.
//! Whatever would wait (data not cached, a lock held, dirty-page throttling) is left for the
//! caller to hand off.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::placement::FileWrites;

/// Requests at most this large are tried on the calling thread.
pub const NOWAIT_MAX: usize = 64 << 10;

/// How far a non-blocking transfer got.
pub(super) struct Partial {
    /// Bytes transferred from the start.
    pub done: usize,
    /// A read reached the end of the file.
    pub eof: bool,
}

fn transfer(
    file: &File,
    offset: u64,
    buf: *mut u8,
    len: usize,
    write: Option<&FileWrites>,
) -> io::Result<Partial> {
    let mut done = 0;
    while done < len {
        let iov = libc::iovec {
            // SAFETY: `done < len`, so the pointer stays inside the caller's buffer.
            iov_base: unsafe { buf.add(done) }.cast(),
            iov_len: len - done,
        };
        let at = (offset + done as u64) as libc::off_t;
        // SAFETY: `iov` describes the rest of a live buffer of `len` bytes that the caller
        // borrows for this call (exclusively when reading), and the descriptor belongs to
        // `file`, open for the whole call.
        let n = unsafe {
            if write.is_some() {
                libc::pwritev2(file.as_raw_fd(), &raw const iov, 1, at, libc::RWF_NOWAIT)
            } else {
                libc::preadv2(file.as_raw_fd(), &raw const iov, 1, at, libc::RWF_NOWAIT)
            }
        };
        match n {
            0 if write.is_none() => return Ok(Partial { done, eof: true }),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Would block, or the file system cannot tell without blocking.
                    Some(libc::EAGAIN) => return Ok(Partial { done, eof: false }),
                    Some(libc::EOPNOTSUPP) => {
                        if let Some(w) = write {
                            w.refuses_nowait.store(true, Ordering::Relaxed);
                        }
                        return Ok(Partial { done, eof: false });
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(Partial { done, eof: false })
}

/// Reads what the page cache already holds into `buf`, stopping at the first byte that would
/// need the disk or at the end of the file.
pub(super) fn read(file: &Arc<File>, offset: u64, buf: &mut [u8]) -> io::Result<Partial> {
    transfer(file, offset, buf.as_mut_ptr(), buf.len(), None)
}

/// Reads what the page cache holds of `buf.len()` bytes at `offset` of `file`, without
/// blocking: the bytes read, and whether the file ended there (for drivers reading files
/// of their own, as vvfat reads the files of its directory).
///
/// # Errors
/// The read's, other than that it would block.
pub fn read_cached(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let p = transfer(file, offset, buf.as_mut_ptr(), buf.len(), None)?;
    Ok((p.done, p.eof))
}

/// Writes as much of `data` as the page cache takes without blocking. File systems that
/// refuse non-blocking buffered writes (ext4, tmpfs; XFS and btrfs take them) are remembered
/// in `writes` and not asked again.
pub(super) fn write(
    writes: &FileWrites,
    file: &Arc<File>,
    offset: u64,
    data: &[u8],
) -> io::Result<Partial> {
    if writes.refuses_nowait.load(Ordering::Relaxed) {
        return Ok(Partial {
            done: 0,
            eof: false,
        });
    }
    // The kernel only reads through this pointer for a write.
    transfer(
        file,
        offset,
        data.as_ptr().cast_mut(),
        data.len(),
        Some(writes),
    )
}

#[cfg(test)]
mod tests {
    use crate::io::file_with;
    use std::os::unix::fs::FileExt;

    #[test]
    fn cached_reads_stop_at_the_end_of_the_file() {
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_t, f) = file_with(&data);
        let mut buf = vec![0xff; 4096];
        // Just written, so cached: all of it, or (if the kernel cannot tell) nothing.
        let p = super::read(&f, 8192, &mut buf).expect("read");
        assert!(p.eof || p.done == 0, "read {} bytes, eof {}", p.done, p.eof);
        assert_eq!(buf[..p.done], data[8192..8192 + p.done]);
    }

    #[test]
    fn writes_land_whole_or_are_left_to_the_caller_and_refusal_is_remembered() {
        let (_t, f) = file_with(&[0u8; 16384]);
        let writes = crate::io::placement::FileWrites::default();
        for round in 0..2u8 {
            let data = vec![round + 1; 4096];
            let p = super::write(&writes, &f, 4096, &data).expect("write");
            let mut got = vec![0u8; 4096];
            f.read_exact_at(&mut got, 4096).expect("read back");
            if p.done == 4096 {
                assert_eq!(got, data);
            } else {
                // The file system refused (ext4, tmpfs) or would have blocked.
                assert!(p.done < 4096);
                assert_eq!(got[..p.done], data[..p.done]);
            }
        }
    }
}
