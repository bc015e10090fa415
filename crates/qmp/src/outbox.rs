//! A session's outgoing messages, written by their own task so that events and responses
//! interleave only between messages and a slow reader blocks nobody else.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// Bytes a client may leave unread before its session's command processing waits.
pub(crate) const HIGH_WATER: usize = 1 << 20;
/// Bytes of undelivered events after which a client that does not read is dropped.
pub(crate) const EVENT_LIMIT: usize = 64 << 20;

#[derive(Default)]
pub(crate) struct Outbox {
    queue: RefCell<VecDeque<Rc<str>>>,
    queued_bytes: Cell<usize>,
    wake_writer: Notify,
    drained: Notify,
    closed: Cell<bool>,
    pub(crate) pretty: bool,
}

impl Outbox {
    pub(crate) fn new(pretty: bool) -> Rc<Self> {
        Rc::new(Outbox {
            pretty,
            ..Default::default()
        })
    }

    /// Queues one message (already formatted, with its line end).
    pub(crate) fn push(&self, msg: Rc<str>) {
        if self.closed.get() {
            return;
        }
        self.queued_bytes.set(self.queued_bytes.get() + msg.len());
        self.queue.borrow_mut().push_back(msg);
        self.wake_writer.notify_one();
    }

    /// Queues an event, or closes the session if its client has stopped reading.
    pub(crate) fn push_event(&self, msg: Rc<str>) {
        if self.queued_bytes.get() > EVENT_LIMIT {
            tracing::warn!("QMP client is not reading; dropping the connection");
            self.close();
            return;
        }
        self.push(msg);
    }

    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.wake_writer.notify_one();
        self.drained.notify_waiters();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Waits until the unwritten output is below the high-water mark.
    pub(crate) async fn wait_writable(&self) {
        while self.queued_bytes.get() > HIGH_WATER && !self.closed.get() {
            self.drained.notified().await;
        }
    }

    /// Waits until the outbox is closed (its peer failed, or the monitor ends).
    pub(crate) async fn closed(&self) {
        while !self.closed.get() {
            self.drained.notified().await;
        }
    }

    /// Waits until everything queued has been written (or the connection failed).
    pub(crate) async fn flushed(&self) {
        while self.queued_bytes.get() > 0 && !self.closed.get() {
            self.drained.notified().await;
        }
    }

    /// Writes queued messages until the outbox is closed and empty, or the peer fails.
    pub(crate) async fn run_writer(&self, mut writer: crate::session::Writer) {
        loop {
            let batch: Vec<Rc<str>> = self.queue.borrow_mut().drain(..).collect();
            if batch.is_empty() {
                if self.closed.get() {
                    break;
                }
                let _ = writer.flush().await;
                self.drained.notify_waiters();
                self.wake_writer.notified().await;
                continue;
            }
            let mut failed = false;
            for msg in &batch {
                if writer.write_all(msg.as_bytes()).await.is_err() {
                    failed = true;
                    break;
                }
            }
            // Counted out only once flushed: a writer that buffers (standard output's does,
            // on a thread of its own) has not written it before, and an exit waiting for
            // the outbox to drain would lose it.
            if failed || writer.flush().await.is_err() {
                self.queue.borrow_mut().clear();
                self.queued_bytes.set(0);
                self.close();
                break;
            }
            let written: usize = batch.iter().map(|m| m.len()).sum();
            self.queued_bytes.set(self.queued_bytes.get() - written);
            if self.queue.borrow().is_empty() {
                self.drained.notify_waiters();
            }
        }
        let _ = writer.flush().await;
        let _ = writer.shutdown().await;
        self.drained.notify_waiters();
    }
}
