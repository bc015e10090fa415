//! Memory aligned for O_DIRECT: the kernel needs the buffer address, not just the file offset
//! and length, aligned to the device's block size.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

/// Alignment used for direct I/O buffers, offsets and lengths. 4 KiB satisfies every device
/// and file system ferrite runs on (512-byte devices accept it too).
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed, `DIRECT_ALIGN`-aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory with no thread affinity; moving it to an I/O worker
// thread and back is like moving a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout(len: usize) -> Layout {
        // `len.max(1)` keeps the layout non-zero-sized; DIRECT_ALIGN is a power of two.
        Layout::from_size_align(len.max(1), DIRECT_ALIGN).unwrap_or(Layout::new::<u8>())
    }

    /// A zeroed buffer of `len` bytes.
    ///
    /// # Panics
    /// If the allocation fails (as `Vec` does, via `handle_alloc_error`).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> AlignedBuf {
        let mut b = Self::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `zeroed` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        let b = AlignedBuf::zeroed(10000);
        assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        let c = AlignedBuf::copy_of(b"abc");
        assert_eq!(c.as_slice(), b"abc");
    }
}
