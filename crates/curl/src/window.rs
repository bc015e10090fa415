//! A window of the image: a byte range asked of the server in one transfer (a read and
//! what is read ahead after it), filled as the reply arrives and kept afterwards for the
//! reads it covers. Readers take their bytes as soon as they have arrived, not when the
//! whole transfer is over (QEMU's readers of a transfer under way wait for its end).

use ferrite_block::io::pool;
use std::cell::{Cell, RefCell};
use tokio::sync::Notify;

/// How a window's transfer went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Underway,
    Done,
    Failed,
}

/// A range of the image and the bytes of it received so far.
pub(crate) struct Window {
    pub(crate) start: u64,
    /// The range's length.
    pub(crate) len: u64,
    /// The bytes received, in order, as the connection gave them.
    pieces: RefCell<Vec<Vec<u8>>>,
    filled: Cell<u64>,
    outcome: Cell<Outcome>,
    changed: Notify,
}

impl Window {
    pub(crate) fn new(start: u64, len: u64) -> Window {
        Window {
            start,
            len,
            pieces: RefCell::new(Vec::new()),
            filled: Cell::new(0),
            outcome: Cell::new(Outcome::Underway),
            changed: Notify::new(),
        }
    }

    /// Whether `offset..end` lies in the range.
    pub(crate) fn covers(&self, offset: u64, end: u64) -> bool {
        offset >= self.start && end <= self.start + self.len
    }

    pub(crate) fn outcome(&self) -> Outcome {
        self.outcome.get()
    }

    /// Adds received bytes (beyond the range: dropped); returns how many more it wants.
    pub(crate) fn push(&self, mut piece: Vec<u8>) -> u64 {
        let room = self.len - self.filled.get();
        piece.truncate(room.min(piece.len() as u64) as usize);
        if piece.is_empty() {
            pool::give(piece);
        } else {
            self.filled.set(self.filled.get() + piece.len() as u64);
            self.pieces.borrow_mut().push(piece);
            self.changed.notify_waiters();
        }
        self.len - self.filled.get()
    }

    /// Ends the transfer; a window that did not fill fails.
    pub(crate) fn finish(&self, ok: bool) {
        let ok = ok && self.filled.get() == self.len;
        self.outcome
            .set(if ok { Outcome::Done } else { Outcome::Failed });
        self.changed.notify_waiters();
    }

    /// Waits until the bytes up to `end` have arrived (true) or the transfer failed first.
    pub(crate) async fn wait_until(&self, end: u64) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.start + self.filled.get() >= end {
                return true;
            }
            if self.outcome.get() != Outcome::Underway {
                return false;
            }
            changed.await;
        }
    }

    /// Copies the received bytes from `offset` on into `dst`.
    pub(crate) fn copy_out(&self, offset: u64, dst: &mut [u8]) {
        let mut skip = offset - self.start;
        let mut at = 0;
        for piece in self.pieces.borrow().iter() {
            if at == dst.len() {
                break;
            }
            let len = piece.len() as u64;
            if skip >= len {
                skip -= len;
                continue;
            }
            let from = &piece[skip as usize..];
            let n = from.len().min(dst.len() - at);
            dst[at..at + n].copy_from_slice(&from[..n]);
            at += n;
            skip = 0;
        }
    }
}

impl Drop for Window {
    /// The pieces' buffers go back for the next transfers.
    fn drop(&mut self) {
        for piece in self.pieces.get_mut().drain(..) {
            pool::give(piece);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_as_they_went_in() {
        let w = Window::new(100, 10);
        assert_eq!(w.push(vec![1, 2, 3]), 7);
        assert_eq!(w.push(vec![4, 5, 6, 7, 8, 9, 10, 11, 12]), 0);
        let mut dst = [0u8; 5];
        w.copy_out(102, &mut dst);
        assert_eq!(dst, [3, 4, 5, 6, 7]);
        w.finish(true);
        assert_eq!(w.outcome(), Outcome::Done);
        assert!(w.covers(100, 110) && !w.covers(99, 101) && !w.covers(105, 111));
        let short = Window::new(0, 4);
        short.push(vec![1]);
        short.finish(true);
        assert_eq!(short.outcome(), Outcome::Failed);
    }
}
