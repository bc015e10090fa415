//! Memory the block layer does not own, filled by a read in place: a virtual machine's RAM
//! shared with a vhost-user front end. A read into it costs one copy (the kernel's, from the
//! page cache) instead of a copy into a buffer and another out of it.
//!
//! The memory is only ever reached through raw pointers (by the kernel in `preadv`, or by
//! `ptr::copy` here), never through Rust references: another process may read or write it at
//! any time, as a guest may with its own buffers.

use std::any::Any;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

/// Caller-owned memory a read fills: segments in order, kept mapped by `keep`.
#[derive(Clone)]
pub struct ForeignBuf {
    /// (address, length) of each segment, in order.
    segments: Vec<(usize, usize)>,
    len: usize,
    /// Whatever keeps the segments mapped (for a guest, its memory map).
    keep: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for ForeignBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignBuf")
            .field("segments", &self.segments.len())
            .field("len", &self.len)
            .finish()
    }
}

impl ForeignBuf {
    /// Memory made of `segments` (pointer, length), in order.
    ///
    /// # Safety
    /// Every segment must stay valid for writes of its length for as long as `keep` (or a
    /// clone of the buffer) lives, and no Rust reference to that memory may exist meanwhile.
    pub unsafe fn new(segments: Vec<(*mut u8, usize)>, keep: Arc<dyn Any + Send + Sync>) -> Self {
        let segments: Vec<(usize, usize)> = segments
            .into_iter()
            .filter(|&(_, l)| l > 0)
            .map(|(p, l)| (p as usize, l))
            .collect();
        let len = segments.iter().map(|&(_, l)| l).sum();
        ForeignBuf {
            segments,
            len,
            keep,
        }
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `len` bytes from `at` (clamped to the buffer).
    pub fn slice(&self, at: usize, len: usize) -> ForeignBuf {
        let end = at.saturating_add(len).min(self.len);
        let mut segments = Vec::new();
        let mut pos = 0;
        for &(addr, l) in &self.segments {
            let (s, e) = (pos.max(at), (pos + l).min(end));
            if s < e {
                segments.push((addr + (s - pos), e - s));
            }
            pos += l;
            if pos >= end {
                break;
            }
        }
        ForeignBuf {
            len: end.saturating_sub(at.min(end)),
            segments,
            keep: self.keep.clone(),
        }
    }

    /// Copies `data` in from byte `at` (what does not fit is left out).
    pub fn write_at(&self, at: usize, data: &[u8]) {
        let mut pos = 0;
        for &(addr, l) in &self.segments {
            let (s, e) = (pos.max(at), (pos + l).min(at.saturating_add(data.len())));
            if s < e {
                // SAFETY: `s..e` lies inside this segment (valid for writes while `keep`
                // lives, see `new`) and inside `data`; `data` is ours, so they cannot overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr().add(s - at),
                        (addr as *mut u8).add(s - pos),
                        e - s,
                    );
                }
            }
            pos += l;
        }
    }

    /// Zeroes the bytes from `at` to the end.
    pub fn zero_from(&self, at: usize) {
        let mut pos = 0;
        for &(addr, l) in &self.segments {
            let s = pos.max(at);
            if s < pos + l {
                // SAFETY: `s..pos + l` lies inside this segment, valid for writes (see `new`).
                unsafe { std::ptr::write_bytes((addr as *mut u8).add(s - pos), 0, pos + l - s) };
            }
            pos += l;
        }
    }

    /// Reads from `file` at `offset` into the whole buffer; bytes past the end of the file
    /// read as zero. With `nowait`, only what the page cache holds: returns how many bytes
    /// were read (everything when the file ended first), possibly fewer without an error.
    pub(crate) fn pread(
        &self,
        file: &std::fs::File,
        offset: u64,
        nowait: bool,
    ) -> io::Result<usize> {
        let mut done = 0;
        while done < self.len {
            let rest = self.slice(done, self.len - done);
            let iov: Vec<libc::iovec> = rest
                .segments
                .iter()
                .take(1024)
                .map(|&(addr, l)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: l,
                })
                .collect();
            let at = libc::off_t::try_from(offset + done as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
            // SAFETY: each iovec is a segment of this buffer, valid for writes while `self`
            // (and so `keep`) lives, which it does for the whole call; the descriptor is
            // `file`'s, open for the call.
            let n = unsafe {
                libc::preadv2(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, at, flags)
            };
            match n {
                0 => {
                    self.zero_from(done);
                    return Ok(self.len);
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EAGAIN | libc::EOPNOTSUPP) if nowait => return Ok(done),
                        _ => return Err(e),
                    }
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::ForeignBuf;
    use crate::io::file_with;
    use std::sync::Arc;

    /// A buffer over three pieces of one vector, in a scrambled order.
    fn scattered(mem: &mut [u8]) -> ForeignBuf {
        let base = mem.as_mut_ptr();
        // SAFETY: the three segments lie inside `mem`, which outlives the buffer in each test
        // and is not touched through a reference while it is used.
        unsafe {
            ForeignBuf::new(
                vec![(base.add(100), 50), (base, 30), (base.add(200), 20)],
                Arc::new(()),
            )
        }
    }

    #[test]
    fn writes_slices_and_zeroes_follow_the_segments() {
        let mut mem = vec![0xeeu8; 256];
        let buf = scattered(&mut mem);
        assert_eq!(buf.len(), 100);
        let data: Vec<u8> = (0..100).collect();
        buf.write_at(0, &data);
        buf.slice(40, 20).zero_from(5);
        assert_eq!(mem[100..140], data[..40]);
        assert_eq!(mem[140..145], data[40..45]);
        assert!(mem[145..150].iter().all(|&b| b == 0));
        assert!(mem[0..10].iter().all(|&b| b == 0));
        assert_eq!(mem[10..30], data[60..80]);
        assert_eq!(mem[200..220], data[80..100]);
        assert_eq!(mem[30], 0xee);
    }

    #[test]
    fn reads_fill_every_segment_and_zero_past_the_end_of_the_file() {
        let data: Vec<u8> = (0..90u8).collect();
        let (_t, f) = file_with(&data);
        let mut mem = vec![0xeeu8; 256];
        let buf = scattered(&mut mem);
        assert_eq!(buf.pread(&f, 5, false).expect("pread"), 100);
        assert_eq!(mem[100..150], data[5..55]);
        assert_eq!(mem[0..30], data[55..85]);
        assert_eq!(mem[200..205], data[85..90]);
        assert!(mem[205..220].iter().all(|&b| b == 0));
    }
}
