//! `mux` (and `mux=on`): up to four frontends share another chardev (the base).
//!
//! What any frontend writes goes to the base. Input goes to the frontend that has the focus
//! (the one attached last, until C-a c moves it on), after the escape sequences are taken
//! out: C-a h (help), C-a x (quit), C-a c (next frontend), C-a t (timestamps on output),
//! C-a C-a (a C-a), and C-a s and C-a b, which concern devices a storage daemon does not
//! have. Each connection of the base is one connection of every frontend.

use super::relay::{Inbox, OutQueue, next_chunk, until_set};
use super::{Connection, Writer};
use crate::registry::{Chardev, Frontend};
use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use std::time::Instant;
use tokio::io::AsyncWrite;
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

/// How many frontends a mux takes (QEMU's `MAX_MUX`).
pub(crate) const MAX_FRONTENDS: usize = 4;

/// The escape character, C-a.
const ESCAPE: u8 = 0x01;

const HELP: &[&str] = &[
    "% h    print this help\n\r",
    "% x    exit emulator\n\r",
    "% s    save disk data back to file (if -snapshot)\n\r",
    "% t    toggle console timestamps\n\r",
    "% b    send break (magic sysrq)\n\r",
    "% c    switch between console and monitor\n\r",
    "% %  sends %\n\r",
];

/// One connection of the base, shared by the frontends.
struct Session {
    out: Rc<OutQueue>,
    /// Each frontend's input, once it has taken this connection.
    inputs: RefCell<[Option<UnboundedSender<Vec<u8>>>; MAX_FRONTENDS]>,
    /// Input for a frontend that has not taken the connection yet.
    early: RefCell<[Vec<u8>; MAX_FRONTENDS]>,
    taken: Cell<[bool; MAX_FRONTENDS]>,
    ended: Cell<bool>,
    /// The base connection's `output_outlives_input`.
    output_outlives_input: bool,
}

/// Timestamps on output (C-a t).
#[derive(Default)]
struct Stamps {
    on: bool,
    start: Option<Instant>,
    line_start: bool,
}

impl Stamps {
    /// `data` with `[hh:mm:ss.mmm] ` before each line when timestamps are on.
    fn apply(&mut self, data: &[u8]) -> Vec<u8> {
        if !self.on {
            return data.to_vec();
        }
        let mut out = Vec::with_capacity(data.len() + 16);
        for &b in data {
            if self.line_start {
                let start = *self.start.get_or_insert_with(Instant::now);
                let ms = start.elapsed().as_millis();
                let secs = ms / 1000;
                out.extend_from_slice(
                    format!(
                        "[{:02}:{:02}:{:02}.{:03}] ",
                        secs / 3600,
                        (secs / 60) % 60,
                        secs % 60,
                        ms % 1000
                    )
                    .as_bytes(),
                );
                self.line_start = false;
            }
            out.push(b);
            if b == b'\n' {
                self.line_start = true;
            }
        }
        out
    }
}

struct Shared {
    attached: Cell<[bool; MAX_FRONTENDS]>,
    focus: Cell<Option<usize>>,
    escape: Cell<bool>,
    stamps: RefCell<Stamps>,
    session: RefCell<Option<Rc<Session>>>,
    changed: Notify,
    /// The base gives no more connections, or the mux was removed.
    finished: Cell<bool>,
    pumping: Cell<bool>,
    quit: Rc<dyn Fn()>,
}

/// A mux chardev.
pub(crate) struct Mux {
    base: RefCell<Option<Frontend>>,
    shared: Rc<Shared>,
}

impl Mux {
    /// A mux over `base`, which it has attached to as its frontend.
    pub(crate) fn new(base: Frontend, quit: Rc<dyn Fn()>) -> Mux {
        Mux {
            base: RefCell::new(Some(base)),
            shared: Rc::new(Shared {
                attached: Cell::new([false; MAX_FRONTENDS]),
                focus: Cell::new(None),
                escape: Cell::new(false),
                stamps: RefCell::default(),
                session: RefCell::new(None),
                changed: Notify::new(),
                finished: Cell::new(false),
                pumping: Cell::new(false),
                quit,
            }),
        }
    }

    /// The base chardev.
    pub(crate) fn base(&self) -> Option<Rc<Chardev>> {
        self.base.borrow().as_ref().map(|f| f.chardev().clone())
    }

    /// A free frontend slot, taken and given the focus.
    pub(crate) fn attach(&self) -> Option<usize> {
        let mut attached = self.shared.attached.get();
        let tag = attached.iter().position(|a| !a)?;
        attached[tag] = true;
        self.shared.attached.set(attached);
        self.shared.focus.set(Some(tag));
        if !self.shared.pumping.replace(true)
            && let Some(base) = self.base.borrow().as_ref()
        {
            tokio::task::spawn_local(pump(self.shared.clone(), base.clone()));
        }
        Some(tag)
    }

    /// Frontend `tag`'s next connection: its share of the base's next one.
    pub(crate) async fn accept(&self, tag: usize) -> Option<Connection> {
        let shared = &self.shared;
        loop {
            let changed = shared.changed.notified();
            if let Some(s) = shared.session.borrow().clone()
                && !s.ended.get()
                && !s.taken.get()[tag]
            {
                let mut taken = s.taken.get();
                taken[tag] = true;
                s.taken.set(taken);
                let (tx, rx) = unbounded_channel();
                let early = std::mem::take(&mut s.early.borrow_mut()[tag]);
                if !early.is_empty() {
                    let _ = tx.send(early);
                }
                s.inputs.borrow_mut()[tag] = Some(tx);
                return Some(Connection {
                    reader: Box::pin(Inbox::new(rx)),
                    writer: Box::pin(MuxWriter {
                        shared: shared.clone(),
                        out: s.out.clone(),
                    }) as Writer,
                    fds: None,
                    opened: true,
                    output_outlives_input: s.output_outlives_input,
                });
            }
            if shared.finished.get() {
                return None;
            }
            changed.await;
        }
    }

    /// Lets the base go (`chardev-remove` of the mux).
    pub(crate) fn close(&self) {
        self.shared.finished.set(true);
        self.shared.changed.notify_waiters();
        if let Some(base) = self.base.borrow_mut().take() {
            base.detach();
        }
    }
}

/// Serves the base's connections until it has no more or the mux is removed.
async fn pump(shared: Rc<Shared>, base: Frontend) {
    while !shared.finished.get() {
        let conn = tokio::select! {
            c = base.accept() => c,
            () = until_set(&shared.finished, &shared.changed) => None,
        };
        let Some(conn) = conn else { break };
        let session = Rc::new(Session {
            out: OutQueue::new(conn.writer),
            inputs: RefCell::default(),
            early: RefCell::default(),
            taken: Cell::new([false; MAX_FRONTENDS]),
            ended: Cell::new(false),
            output_outlives_input: conn.output_outlives_input,
        });
        *shared.session.borrow_mut() = Some(session.clone());
        shared.changed.notify_waiters();
        let mut reader = conn.reader;
        let mut buf = vec![0u8; 4096];
        while let Some(n) =
            next_chunk(&mut reader, &mut buf, &shared.finished, &shared.changed).await
        {
            shared.input(&session, &buf[..n]).await;
        }
        session.ended.set(true);
        *session.inputs.borrow_mut() = Default::default();
        session.out.close();
        *shared.session.borrow_mut() = None;
        base.disconnected();
    }
    shared.finished.set(true);
    shared.changed.notify_waiters();
}

impl Shared {
    /// Takes the escape sequences out of `data` and gives the rest to the frontend with the
    /// focus.
    async fn input(&self, session: &Session, data: &[u8]) {
        let mut plain = Vec::with_capacity(data.len());
        for &b in data {
            if self.escape.replace(false) {
                match b {
                    ESCAPE => plain.push(b),
                    b'h' | b'?' => self.write(session, &help_text()),
                    b'x' => {
                        self.deliver(session, std::mem::take(&mut plain));
                        self.write(session, b"QEMU: Terminated\n\r");
                        session.out.drained().await;
                        (self.quit)();
                        return;
                    }
                    b'c' => {
                        self.deliver(session, std::mem::take(&mut plain));
                        self.next_focus();
                    }
                    b't' => {
                        let mut s = self.stamps.borrow_mut();
                        s.on = !s.on;
                        s.start = None;
                        s.line_start = false;
                    }
                    // C-a s commits -snapshot overlays and C-a b sends a break to a serial
                    // device: a storage daemon has neither. Other letters do nothing.
                    _ => {}
                }
            } else if b == ESCAPE {
                self.escape.set(true);
            } else {
                plain.push(b);
            }
        }
        self.deliver(session, plain);
    }

    fn deliver(&self, session: &Session, data: Vec<u8>) {
        let Some(tag) = self.focus.get() else { return };
        if data.is_empty() {
            return;
        }
        match &session.inputs.borrow()[tag] {
            Some(tx) => {
                let _ = tx.send(data);
            }
            None => session.early.borrow_mut()[tag].extend(data),
        }
    }

    fn write(&self, session: &Session, data: &[u8]) {
        let data = self.stamps.borrow_mut().apply(data);
        session.out.push(&data);
    }

    fn next_focus(&self) {
        let attached = self.attached.get();
        let from = self.focus.get().map_or(0, |f| f + 1);
        let next = (from..MAX_FRONTENDS).chain(0..from).find(|&i| attached[i]);
        if next.is_some() {
            self.focus.set(next);
        }
    }
}

fn help_text() -> Vec<u8> {
    let mut text = b"\n\r".to_vec();
    for line in HELP {
        text.extend_from_slice(line.replace('%', "C-a").as_bytes());
    }
    text
}

/// A frontend's output: into the base's connection, with timestamps when they are on.
struct MuxWriter {
    shared: Rc<Shared>,
    out: Rc<OutQueue>,
}

impl AsyncWrite for MuxWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.out.poll_room(cx))?;
        let stamped = self.shared.stamps.borrow_mut().apply(data);
        self.out.push(&stamped);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.poll_drained(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.out.poll_drained(cx)
    }
}
