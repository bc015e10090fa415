//! Guest clusters a request is changing: a request that may change a cluster's mapping holds
//! it so that no other such request sees the mapping half-updated (QEMU serialises the
//! same way through its in-flight allocation list).

use std::cell::RefCell;
use std::collections::HashSet;
use tokio::sync::Notify;

#[derive(Default)]
pub(crate) struct Claims {
    held: RefCell<HashSet<u64>>,
    released: Notify,
}

/// Holds guest clusters `[first, last]` until dropped.
pub(crate) struct Claim<'a> {
    claims: &'a Claims,
    first: u64,
    last: u64,
}

impl Claims {
    /// Waits until no one holds any of `[first, last]`, then holds them.
    pub(crate) async fn claim(&self, first: u64, last: u64) -> Claim<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.borrow_mut();
                if !(first..=last).any(|c| held.contains(&c)) {
                    held.extend(first..=last);
                    return Claim {
                        claims: self,
                        first,
                        last,
                    };
                }
            }
            released.await;
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held.borrow_mut();
        for c in self.first..=self.last {
            held.remove(&c);
        }
        drop(held);
        self.claims.released.notify_waiters();
    }
}
