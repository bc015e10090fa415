//! Writes the server took UNSTABLE (in its memory) and has not committed: kept until a
//! COMMIT says, by its verifier, that they reached stable storage; sent again when the
//! verifier says the server restarted meanwhile and lost them. libnfs (so QEMU) keeps
//! nothing, and a server that restarts between a write and the next flush loses that
//! write without a word.
//!
//! What is kept is bounded; writes past the bound are remembered only by their verifier,
//! and a COMMIT that shows those lost fails the flush rather than pretend.

use crate::nfs3::Verifier;
use bytes::Bytes;
use std::cell::{Cell, RefCell};

/// The most bytes of uncommitted writes kept for sending again.
const BUDGET: usize = 64 << 20;

/// A write the server took into its memory.
pub(crate) struct Held {
    pub(crate) offset: u64,
    pub(crate) data: Bytes,
    verifier: Verifier,
}

/// The writes since the last COMMIT.
#[derive(Default)]
pub(crate) struct Uncommitted {
    held: RefCell<Vec<Held>>,
    bytes: Cell<usize>,
    /// The verifiers of writes past the budget, not kept.
    unkept: RefCell<Vec<Verifier>>,
}

/// What one COMMIT covers: the writes answered before it was sent.
#[derive(Default)]
pub(crate) struct Covered {
    pub(crate) held: Vec<Held>,
    unkept: Vec<Verifier>,
}

impl Covered {
    /// Whether every write was committed under `verifier` (the server did not restart).
    pub(crate) fn all_under(&self, verifier: &Verifier) -> bool {
        self.held.iter().all(|h| &h.verifier == verifier)
            && self.unkept.iter().all(|v| v == verifier)
    }

    /// Whether writes that were not kept are lost (committed under another verifier).
    pub(crate) fn lost_unkept(&self, verifier: &Verifier) -> bool {
        self.unkept.iter().any(|v| v != verifier)
    }
}

impl Uncommitted {
    /// The server took `data` at `offset` into memory under `verifier`.
    pub(crate) fn took(&self, offset: u64, data: Bytes, verifier: Verifier) {
        if self.bytes.get() + data.len() <= BUDGET {
            self.bytes.set(self.bytes.get() + data.len());
            self.held.borrow_mut().push(Held {
                offset,
                data,
                verifier,
            });
        } else {
            let mut unkept = self.unkept.borrow_mut();
            if !unkept.contains(&verifier) {
                unkept.push(verifier);
            }
        }
    }

    /// The writes so far, for a COMMIT about to be sent.
    pub(crate) fn take(&self) -> Covered {
        self.bytes.set(0);
        Covered {
            held: self.held.take(),
            unkept: self.unkept.take(),
        }
    }

    /// A COMMIT failed: its writes are uncommitted still (before those taken since).
    pub(crate) fn put_back(&self, mut c: Covered) {
        let bytes: usize = c.held.iter().map(|h| h.data.len()).sum();
        self.bytes.set(self.bytes.get() + bytes);
        let mut held = self.held.borrow_mut();
        c.held.append(&mut held);
        *held = c.held;
        let mut unkept = self.unkept.borrow_mut();
        for v in c.unkept {
            if !unkept.contains(&v) {
                unkept.push(v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_under_another_verifier_shows_the_writes_lost() {
        let u = Uncommitted::default();
        u.took(0, Bytes::from_static(b"abc"), [1; 8]);
        u.took(8, Bytes::from_static(b"def"), [1; 8]);
        let c = u.take();
        assert!(c.all_under(&[1; 8]));
        assert!(!c.all_under(&[2; 8]));
        assert!(!c.lost_unkept(&[2; 8]));
        u.took(16, Bytes::from_static(b"ghi"), [2; 8]);
        u.put_back(c);
        let c = u.take();
        let offsets: Vec<u64> = c.held.iter().map(|h| h.offset).collect();
        assert_eq!(offsets, [0, 8, 16]);
        assert!(u.take().held.is_empty());
    }

    #[test]
    fn writes_past_the_budget_are_remembered_by_verifier() {
        let u = Uncommitted::default();
        u.took(0, Bytes::from(vec![0; BUDGET]), [1; 8]);
        u.took(0, Bytes::from_static(b"x"), [3; 8]);
        let c = u.take();
        assert_eq!(c.held.len(), 1);
        assert!(c.lost_unkept(&[1; 8]));
        assert!(!c.lost_unkept(&[3; 8]));
    }
}
