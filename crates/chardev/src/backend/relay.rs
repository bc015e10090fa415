//! What `mux` and `hub` build their connections from: an output queue drained into another
//! chardev's connection, and input handed over a channel.

use super::{Reader, Writer};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;
use tokio::sync::mpsc::UnboundedReceiver;

/// Bytes queued beyond this make writers wait: a peer that does not read holds its writers
/// back instead of growing the queue without end.
const QUEUE_LIMIT: usize = 1 << 20;

/// Output for one connection of another chardev, written by a task of its own so that
/// several writers can share it.
pub(crate) struct OutQueue {
    buf: RefCell<VecDeque<u8>>,
    more: Notify,
    /// Writers waiting for room, or for the queue to empty.
    waiting: RefCell<Vec<Waker>>,
    /// The connection failed or ended: writes fail.
    closed: Cell<bool>,
}

impl OutQueue {
    /// A queue drained into `writer` until [`OutQueue::close`] or a write error.
    pub(crate) fn new(mut writer: Writer) -> Rc<OutQueue> {
        let q = Rc::new(OutQueue {
            buf: RefCell::default(),
            more: Notify::new(),
            waiting: RefCell::default(),
            closed: Cell::new(false),
        });
        let me = q.clone();
        tokio::task::spawn_local(async move {
            loop {
                let chunk: Vec<u8> = {
                    let mut buf = me.buf.borrow_mut();
                    let n = buf.len().min(64 << 10);
                    buf.drain(..n).collect()
                };
                if chunk.is_empty() {
                    me.wake();
                    if me.closed.get() {
                        return;
                    }
                    me.more.notified().await;
                    continue;
                }
                if writer.write_all(&chunk).await.is_err() || writer.flush().await.is_err() {
                    me.close();
                    return;
                }
                me.wake();
            }
        });
        q
    }

    fn wake(&self) {
        for w in self.waiting.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Queues `data` whatever the queue holds.
    pub(crate) fn push(&self, data: &[u8]) {
        if !self.closed.get() {
            self.buf.borrow_mut().extend(data);
            self.more.notify_one();
        }
    }

    /// Whether there is room to queue more (an error once the connection has ended).
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.closed.get() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.buf.borrow().len() >= QUEUE_LIMIT {
            self.waiting.borrow_mut().push(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// Whether everything queued has been written.
    pub(crate) fn poll_drained(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.borrow().is_empty() || self.closed.get() {
            return Poll::Ready(Ok(()));
        }
        self.waiting.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }

    /// Waits until everything queued has been written.
    pub(crate) async fn drained(&self) {
        let _ = std::future::poll_fn(|cx| self.poll_drained(cx)).await;
    }

    /// Ends the queue: what is still queued is written, later writes fail.
    pub(crate) fn close(&self) {
        self.closed.set(true);
        self.more.notify_one();
        self.wake();
    }
}

/// Input handed over a channel, read as a byte stream; it ends when the sender is dropped.
pub(crate) struct Inbox {
    rx: UnboundedReceiver<Vec<u8>>,
    cur: Vec<u8>,
    at: usize,
}

impl Inbox {
    pub(crate) fn new(rx: UnboundedReceiver<Vec<u8>>) -> Inbox {
        Inbox {
            rx,
            cur: Vec::new(),
            at: 0,
        }
    }
}

impl AsyncRead for Inbox {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.at >= self.cur.len() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(data)) => {
                    self.cur = data;
                    self.at = 0;
                }
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = (self.cur.len() - self.at).min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.cur[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

/// Waits until `flag` is set; whoever sets it wakes `changed`'s waiters.
pub(crate) async fn until_set(flag: &Cell<bool>, changed: &Notify) {
    loop {
        let notified = changed.notified();
        if flag.get() {
            return;
        }
        notified.await;
    }
}

/// The next bytes `reader` gives into `buf`: `None` at its end, on an error, or once `stop`
/// is set.
pub(crate) async fn next_chunk(
    reader: &mut Reader,
    buf: &mut [u8],
    stop: &Cell<bool>,
    changed: &Notify,
) -> Option<usize> {
    let n = tokio::select! {
        r = reader.read(buf) => r.unwrap_or(0),
        () = until_set(stop, changed) => 0,
    };
    (n > 0).then_some(n)
}
