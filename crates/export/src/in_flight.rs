//! Requests of an export in flight, so that its end can wait for them.

use std::cell::Cell;
use std::rc::Rc;
use tokio::sync::Notify;

/// A count of requests being answered, and a way to wait until there are none.
#[derive(Default)]
pub struct InFlight {
    count: Cell<usize>,
    idle: Notify,
}

/// One request counted in flight until dropped.
pub struct InFlightGuard(Rc<InFlight>);

impl InFlight {
    /// Counts a request until the guard is dropped.
    pub fn begin(self: &Rc<Self>) -> InFlightGuard {
        self.count.set(self.count.get() + 1);
        InFlightGuard(self.clone())
    }

    /// Waits until no request is in flight.
    pub async fn wait_idle(&self) {
        while self.count.get() > 0 {
            self.idle.notified().await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let n = self.0.count.get() - 1;
        self.0.count.set(n);
        if n == 0 {
            self.0.idle.notify_waiters();
        }
    }
}
