//! Locks on units of a node's address space (clusters, chunks): a request that must not
//! interleave with another on the same units holds them, and the other waits (QEMU's
//! serialising requests and in-flight bitmaps). Shared by qcow2's mapping changes, the
//! mirror's copies and copy-on-read.

use std::cell::RefCell;
use std::collections::BTreeSet;
use tokio::sync::Notify;

/// The units held, and a notification when some are let go.
#[derive(Default)]
pub struct UnitLocks {
    held: RefCell<BTreeSet<u64>>,
    released: Notify,
}

/// Units `first..end` held until dropped.
#[must_use = "the units are let go when this is dropped"]
pub struct UnitClaim<'a> {
    locks: &'a UnitLocks,
    first: u64,
    end: u64,
}

impl UnitLocks {
    /// Whether none of units `first..end` is held.
    pub fn is_free(&self, first: u64, end: u64) -> bool {
        self.held.borrow().range(first..end).next().is_none()
    }

    /// Whether unit `u` is held.
    pub fn is_held(&self, u: u64) -> bool {
        self.held.borrow().contains(&u)
    }

    /// Waits until none of units `first..end` is held.
    pub async fn wait_free(&self, first: u64, end: u64) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.is_free(first, end) {
                return;
            }
            released.await;
        }
    }

    /// Holds units `first..end` (which the caller found free) until [`UnitLocks::release`].
    pub fn hold(&self, first: u64, end: u64) {
        self.held.borrow_mut().extend(first..end);
    }

    /// Lets go of units `first..end`; whoever waits looks again.
    pub fn release(&self, first: u64, end: u64) {
        {
            let mut held = self.held.borrow_mut();
            for u in first..end {
                held.remove(&u);
            }
        }
        self.released.notify_waiters();
    }

    /// Waits until units `first..end` are free, then holds them until the claim is dropped.
    pub async fn claim(&self, first: u64, end: u64) -> UnitClaim<'_> {
        loop {
            self.wait_free(first, end).await;
            // Nothing ran between the look and the hold unless the wait yielded; look again.
            if self.is_free(first, end) {
                self.hold(first, end);
                return UnitClaim {
                    locks: self,
                    first,
                    end,
                };
            }
        }
    }
}

impl Drop for UnitClaim<'_> {
    fn drop(&mut self) {
        self.locks.release(self.first, self.end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_claim_waits_for_an_overlapping_one() {
        let locks = std::rc::Rc::new(UnitLocks::default());
        let first = locks.claim(2, 5).await;
        assert!(!locks.is_free(4, 6) && locks.is_free(5, 9));
        let l = locks.clone();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let waiter = tokio::task::spawn_local(async move {
                    let _c = l.claim(4, 6).await;
                    assert!(l.is_held(4));
                });
                tokio::task::yield_now().await;
                assert!(!waiter.is_finished());
                drop(first);
                waiter.await.unwrap();
            })
            .await;
        assert!(locks.is_free(0, 10));
    }
}
