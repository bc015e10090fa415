//! A one-way switch that tasks of the main thread wait on: start-up over, quit asked for.

use std::cell::Cell;
use tokio::sync::Notify;

/// Closed until [`Latch::open`]; open for good after.
#[derive(Default)]
pub(crate) struct Latch {
    open: Cell<bool>,
    opened: Notify,
}

impl Latch {
    /// Opens the latch and wakes every waiter.
    pub(crate) fn open(&self) {
        self.open.set(true);
        self.opened.notify_waiters();
    }

    /// Waits until it is open.
    pub(crate) async fn wait(&self) {
        while !self.open.get() {
            // One thread: nothing opens the latch between the check and the wait's start.
            self.opened.notified().await;
        }
    }
}
