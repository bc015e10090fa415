//! The queues as `vhost-user-backend` sees them, with their kicks kept for the main thread.
//!
//! `vhost-user-backend` answers the protocol on its own thread and would also watch each
//! queue's kick eventfd on a worker thread of its own, which then has to hand every batch of
//! requests to the main thread: two thread wake-ups per batch where one will do (profiled:
//! a third of the main thread's time went to wake-up paths). [`MainVring`] is the library's
//! `VringRwLock` with one difference: it keeps the kick eventfd from the library, so the
//! library never watches it, and the main thread waits on it itself ([`super::queue`]).

use super::backend::Memory;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard, RwLockWriteGuard};
use tokio::sync::Notify;
use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{Error as QueueError, QueueT};

/// What the protocol thread and the main thread share of one queue.
pub(crate) struct QueueSlot {
    /// The queue itself (the library's state: addresses, indices, call eventfd).
    pub(crate) vring: VringRwLock,
    /// The kick eventfd the front end gave, and how many times one was given.
    kick: Mutex<(Option<Arc<OwnedFd>>, u64)>,
    /// Set when the front end's connection is over.
    closed: AtomicBool,
    /// Wakes the queue's task on the main thread when anything above changes.
    pub(crate) changed: Notify,
}

impl QueueSlot {
    /// The current kick eventfd and its generation.
    pub(crate) fn kick(&self) -> (Option<Arc<OwnedFd>>, u64) {
        self.kick
            .lock()
            .map(|k| k.clone())
            .unwrap_or((None, u64::MAX))
    }

    /// Whether the queue may be served: started (a kick given, not stopped) and enabled.
    pub(crate) fn runnable(state: &VringState<Memory>) -> bool {
        state.get_queue().ready() && state.is_enabled()
    }

    /// Whether the connection is over.
    pub(crate) fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends the queue's service (the front end left).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_one();
    }
}

thread_local! {
    /// The queues made on this thread since [`take_made`] last ran (the library makes a
    /// connection's queues, in order, when the daemon for it is made).
    static MADE: RefCell<Vec<Arc<QueueSlot>>> = const { RefCell::new(Vec::new()) };
}

/// The queues the library made on this thread since the last call, in queue order.
pub(crate) fn take_made() -> Vec<Arc<QueueSlot>> {
    MADE.with(|m| std::mem::take(&mut *m.borrow_mut()))
}

/// The library's vring, but the kick stays with us.
#[derive(Clone)]
pub(crate) struct MainVring(Arc<QueueSlot>);

impl<'a> VringStateGuard<'a, Memory> for MainVring {
    type G = RwLockReadGuard<'a, VringState<Memory>>;
}

impl<'a> VringStateMutGuard<'a, Memory> for MainVring {
    type G = RwLockWriteGuard<'a, VringState<Memory>>;
}

impl VringT<Memory> for MainVring {
    fn new(mem: Memory, max_queue_size: u16) -> Result<Self, QueueError> {
        let slot = Arc::new(QueueSlot {
            vring: VringRwLock::new(mem, max_queue_size)?,
            kick: Mutex::new((None, 0)),
            closed: AtomicBool::new(false),
            changed: Notify::new(),
        });
        MADE.with(|m| m.borrow_mut().push(slot.clone()));
        Ok(MainVring(slot))
    }

    fn get_ref(&self) -> RwLockReadGuard<'_, VringState<Memory>> {
        self.0.vring.get_ref()
    }

    fn get_mut(&self) -> RwLockWriteGuard<'_, VringState<Memory>> {
        self.0.vring.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.0.vring.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.vring.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.0.vring.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.0.vring.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.0.vring.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.vring.set_enabled(enabled);
        self.0.changed.notify_one();
    }

    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), QueueError> {
        self.0.vring.set_queue_info(desc, avail, used)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.vring.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.vring.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.0.vring.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.0.vring.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.vring.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.vring.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        // Under the queue's lock: once `GET_VRING_BASE` has made it not ready, the main
        // thread pops nothing more (it checks under the same lock).
        self.0.vring.set_queue_ready(ready);
        self.0.changed.notify_one();
    }

    fn set_kick(&self, file: Option<File>) {
        // The queue starts when its kick arrives (vhost-user: "start ring upon receiving a
        // kick"), which the library would do on seeing the kick it no longer sees.
        let started = file.is_some();
        if let Ok(mut k) = self.0.kick.lock() {
            k.0 = file.map(|f| Arc::new(OwnedFd::from(f)));
            k.1 += 1;
        }
        if started {
            self.0.vring.set_queue_ready(true);
        }
        self.0.changed.notify_one();
    }

    fn read_kick(&self) -> io::Result<bool> {
        // The library reads a kick only from a queue its worker watches, never ours.
        Ok(self.0.vring.get_ref().is_enabled())
    }

    fn set_call(&self, file: Option<File>) {
        self.0.vring.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.vring.set_err(file)
    }
}
