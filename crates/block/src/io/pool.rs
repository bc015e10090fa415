//! Reuse of large request buffers. Large buffers come from mmap and go back to the system when
//! freed (see the daemon's allocator set-up), which costs page faults on every request; the
//! pool keeps a bounded number for reuse, so steady streaming reuses memory and memory use
//! stays bounded when the stream stops. One pool serves every thread: a buffer filled on an
//! export's own thread (FUSE, vhost-user) is often freed on the main thread.

use std::sync::Mutex;

/// Buffers smaller than this are left to the allocator.
pub const MIN_POOLED: usize = 64 << 10;
/// Buffers kept at most.
const MAX_POOLED: usize = 24;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` bytes, contents unspecified (callers overwrite it).
pub fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        let reused = POOL.lock().ok().and_then(|mut p| {
            let i = p
                .iter()
                .position(|b| b.capacity() >= len && b.capacity() <= len * 2)?;
            Some(p.swap_remove(i))
        });
        if let Some(mut b) = reused {
            // Shrinking keeps the old bytes; only growth is filled.
            b.resize(len, 0);
            return b;
        }
    }
    vec![0u8; len]
}

/// A buffer holding a copy of `data` (a request's bytes lent only for a while).
pub fn copy_of(data: &[u8]) -> Vec<u8> {
    let mut buf = take(data.len());
    buf.copy_from_slice(data);
    buf
}

/// A pooled buffer lent to something that frees it at its own time (`Bytes::from_owner`
/// of a write in flight, a reply being read): back to the pool when dropped.
pub struct Pooled(pub Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.0));
    }
}

/// Hands a buffer back for reuse. Its bytes stay as they are: the next taker overwrites
/// them, and not zeroing a megabyte per request is the point.
pub fn give(buf: Vec<u8>) {
    if buf.capacity() < MIN_POOLED {
        return;
    }
    if let Ok(mut p) = POOL.lock() {
        if p.len() < MAX_POOLED {
            p.push(buf);
        }
    }
}
