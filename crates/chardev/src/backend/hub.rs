//! `hub`: one frontend on up to four chardevs at once. What the frontend writes goes to
//! every member that is connected; what any member sends is the frontend's input. As in
//! QEMU, the frontend's connection starts when the first member connects and ends when the
//! last one leaves.

use super::relay::{Inbox, OutQueue, next_chunk, until_set};
use super::{Connection, Writer};
use crate::registry::Frontend;
use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

/// How many chardevs a hub takes (QEMU's `MAX_HUB`).
pub(crate) const MAX_MEMBERS: usize = 4;

/// The time from the first member connecting to the last one leaving.
struct Session {
    /// The connected members' output queues.
    outs: RefCell<Vec<Option<Rc<OutQueue>>>>,
    input: RefCell<Option<UnboundedSender<Vec<u8>>>>,
    /// Input that came before the frontend took the connection.
    early: RefCell<Vec<u8>>,
    taken: Cell<bool>,
    ended: Cell<bool>,
}

struct Shared {
    session: RefCell<Option<Rc<Session>>>,
    connected: Cell<usize>,
    changed: Notify,
    closed: Cell<bool>,
}

/// A hub chardev.
pub(crate) struct Hub {
    members: RefCell<Vec<Frontend>>,
    shared: Rc<Shared>,
    started: Cell<bool>,
}

impl Hub {
    /// A hub over `members`, which it has attached to as their frontend.
    pub(crate) fn new(members: Vec<Frontend>) -> Hub {
        Hub {
            members: RefCell::new(members),
            shared: Rc::new(Shared {
                session: RefCell::new(None),
                connected: Cell::new(0),
                changed: Notify::new(),
                closed: Cell::new(false),
            }),
            started: Cell::new(false),
        }
    }

    /// The member chardevs.
    pub(crate) fn members(&self) -> Vec<Rc<crate::Chardev>> {
        self.members
            .borrow()
            .iter()
            .map(|m| m.chardev().clone())
            .collect()
    }

    /// The frontend's next connection. The members are served from the first call.
    pub(crate) async fn accept(&self) -> Option<Connection> {
        if !self.started.replace(true) {
            let count = self.members.borrow().len();
            for (i, m) in self.members.borrow().iter().enumerate() {
                tokio::task::spawn_local(serve_member(self.shared.clone(), m.clone(), i, count));
            }
        }
        loop {
            let changed = self.shared.changed.notified();
            if let Some(s) = self.shared.session.borrow().clone()
                && !s.ended.get()
                && !s.taken.replace(true)
            {
                let (tx, rx) = unbounded_channel();
                let early = std::mem::take(&mut *s.early.borrow_mut());
                if !early.is_empty() {
                    let _ = tx.send(early);
                }
                *s.input.borrow_mut() = Some(tx);
                return Some(Connection {
                    reader: Box::pin(Inbox::new(rx)),
                    writer: Box::pin(HubWriter(s)) as Writer,
                    fds: None,
                    opened: true,
                    output_outlives_input: false,
                });
            }
            if self.shared.closed.get() {
                return None;
            }
            changed.await;
        }
    }

    /// Lets the members go (`chardev-remove` of the hub).
    pub(crate) fn close(&self) {
        self.shared.closed.set(true);
        self.shared.changed.notify_waiters();
        for m in self.members.borrow_mut().drain(..) {
            m.detach();
        }
    }
}

/// Serves member `index`'s connections until it has no more or the hub is removed.
async fn serve_member(shared: Rc<Shared>, member: Frontend, index: usize, count: usize) {
    loop {
        let conn = tokio::select! {
            c = member.accept() => c,
            () = until_set(&shared.closed, &shared.changed) => None,
        };
        let Some(conn) = conn else { return };
        let session = {
            let mut current = shared.session.borrow_mut();
            match &*current {
                Some(s) if !s.ended.get() => s.clone(),
                _ => {
                    let s = Rc::new(Session {
                        outs: RefCell::new(vec![None; count]),
                        input: RefCell::new(None),
                        early: RefCell::default(),
                        taken: Cell::new(false),
                        ended: Cell::new(false),
                    });
                    *current = Some(s.clone());
                    s
                }
            }
        };
        let out = OutQueue::new(conn.writer);
        session.outs.borrow_mut()[index] = Some(out.clone());
        shared.connected.set(shared.connected.get() + 1);
        shared.changed.notify_waiters();
        let mut reader = conn.reader;
        let mut buf = vec![0u8; 4096];
        while let Some(n) = next_chunk(&mut reader, &mut buf, &shared.closed, &shared.changed).await
        {
            match &*session.input.borrow() {
                Some(tx) => {
                    let _ = tx.send(buf[..n].to_vec());
                }
                None => session.early.borrow_mut().extend_from_slice(&buf[..n]),
            }
        }
        out.close();
        session.outs.borrow_mut()[index] = None;
        let left = shared.connected.get() - 1;
        shared.connected.set(left);
        if left == 0 {
            session.ended.set(true);
            *session.input.borrow_mut() = None;
            *shared.session.borrow_mut() = None;
        }
        member.disconnected();
        if shared.closed.get() {
            return;
        }
    }
}

/// The frontend's output, to every connected member; it waits for the slowest one.
struct HubWriter(Rc<Session>);

impl AsyncWrite for HubWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.0.ended.get() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let outs: Vec<Rc<OutQueue>> = self.0.outs.borrow().iter().flatten().cloned().collect();
        for out in &outs {
            // A member whose connection failed is skipped, as a closed one is.
            if let Err(e) = ready!(out.poll_room(cx)) {
                tracing::debug!("hub member gone: {e}");
            }
        }
        for out in &outs {
            out.push(data);
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let outs: Vec<Rc<OutQueue>> = self.0.outs.borrow().iter().flatten().cloned().collect();
        for out in &outs {
            ready!(out.poll_drained(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
