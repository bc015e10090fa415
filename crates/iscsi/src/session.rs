//! One logged-in connection in the full-feature phase (RFC 7143): SCSI commands tagged
//! and numbered, sent whole through one writer task (immediate and unsolicited data with
//! them, the rest when the target asks with R2T), and a reader task that puts each answer
//! (data in, status, sense) with the command waiting for it. NOP-Outs every five seconds
//! find a target that went away, as QEMU's driver does.

use crate::login::LoggedIn;
use crate::pdu::{self, FINAL, Header, IMMEDIATE, NO_TAG, Pdu};
use crate::text::Negotiated;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};

/// How often a NOP-Out goes to the target, and how many may go unanswered (QEMU's).
const NOP_INTERVAL: Duration = Duration::from_secs(5);
const MAX_NOP_FAILURES: u32 = 3;

/// The status of a command the target failed or rejected outside SCSI (no SCSI status
/// has this value): it fails with EIO, the connection stays.
pub(crate) const NOT_SCSI: u8 = 0xff;

/// Which way a command's data goes.
pub(crate) enum Dir {
    None,
    /// Up to this many bytes come back.
    In(usize),
    Out(Bytes),
}

/// A command's answer.
#[derive(Debug, Default)]
pub(crate) struct Reply {
    /// The SCSI status (0: good).
    pub(crate) status: u8,
    pub(crate) sense: Vec<u8>,
    /// What came back (a read's buffer, as long as asked).
    pub(crate) data: Vec<u8>,
    /// How much of `data` the target sent.
    pub(crate) received: usize,
}

/// A command under way.
struct Task {
    tx: oneshot::Sender<io::Result<Reply>>,
    lun: [u8; 8],
    reply: Reply,
    data_out: Option<Bytes>,
}

/// A PDU for the writer: the header (digest included) and data, padded when sent.
struct Outgoing {
    head: Vec<u8>,
    data: Option<Bytes>,
}

struct State {
    negotiated: Negotiated,
    tasks: RefCell<HashMap<u32, Task>>,
    next_itt: Cell<u32>,
    cmdsn: Cell<u32>,
    exp_statsn: Cell<u32>,
    max_cmdsn: Cell<u32>,
    /// Commands waiting for the target's window to open, and everyone when it ends.
    window: Notify,
    alive: Cell<bool>,
    /// NOP-Outs not answered yet.
    nops_out: Cell<u32>,
    out: mpsc::UnboundedSender<Outgoing>,
}

/// A logged-in connection.
pub(crate) struct Session {
    state: Rc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A LUN as the 8 bytes of a PDU (SAM's peripheral or flat addressing).
pub(crate) fn lun_bytes(lun: u64) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
        b[1] = lun as u8;
    }
    b
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "iSCSI connection ended")
}

impl State {
    fn itt(&self) -> u32 {
        let mut itt = self.next_itt.get();
        while itt == NO_TAG || self.tasks.borrow().contains_key(&itt) {
            itt = itt.wrapping_add(1);
        }
        self.next_itt.set(itt.wrapping_add(1));
        itt
    }

    fn send(&self, h: &Header, data: Option<Bytes>) {
        let head = h.wire(self.negotiated.header_digest);
        if self.out.send(Outgoing { head, data }).is_err() {
            self.alive.set(false);
        }
    }

    /// What every target PDU says of the command window.
    fn saw_window(&self, p: &Pdu) {
        let exp = p.u32_at(28);
        let max = p.u32_at(32);
        // A MaxCmdSN below ExpCmdSN - 1 is invalid and ignored (RFC 7143, 4.2.2.1).
        if !pdu::sn_lt(max, exp.wrapping_sub(1)) && pdu::sn_lt(self.max_cmdsn.get(), max) {
            self.max_cmdsn.set(max);
            self.window.notify_waiters();
        }
    }

    fn saw_statsn(&self, statsn: u32) {
        let next = statsn.wrapping_add(1);
        if pdu::sn_lt(self.exp_statsn.get(), next) {
            self.exp_statsn.set(next);
        }
    }

    /// Ends the connection: every command still waiting fails.
    fn end(&self, why: &io::Error) {
        self.alive.set(false);
        let tasks: Vec<Task> = self.tasks.borrow_mut().drain().map(|(_, t)| t).collect();
        for t in tasks {
            let _ = t.tx.send(Err(io::Error::new(why.kind(), why.to_string())));
        }
        self.window.notify_waiters();
    }

    /// Data-Out PDUs for `len` bytes of a task's data from `offset`, at most one data
    /// segment each, the last one final.
    fn data_out(&self, itt: u32, ttt: u32, offset: usize, len: usize) {
        let (lun, data) = {
            let tasks = self.tasks.borrow();
            let Some(t) = tasks.get(&itt) else { return };
            let Some(data) = t.data_out.clone() else {
                return;
            };
            (t.lun, data)
        };
        let end = offset.saturating_add(len).min(data.len());
        let mut at = offset.min(end);
        let mut datasn = 0u32;
        while at < end {
            let n = (end - at).min(self.negotiated.max_send);
            let mut h = Header::new(pdu::DATA_OUT, if at + n == end { FINAL } else { 0 });
            h.0[8..16].copy_from_slice(&lun);
            h.set_u32(16, itt)
                .set_u32(20, ttt)
                .set_u32(28, self.exp_statsn.get())
                .set_u32(36, datasn)
                .set_u32(40, at as u32)
                .set_data_len(n);
            self.send(&h, Some(data.slice(at..at + n)));
            at += n;
            datasn += 1;
        }
    }
}

impl Session {
    /// Starts the full-feature phase on a connection that logged in.
    pub(crate) fn start(l: LoggedIn) -> Rc<Session> {
        let (rx_half, tx_half) = l.stream.into_split();
        let (out, queue) = mpsc::unbounded_channel();
        let state = Rc::new(State {
            negotiated: l.negotiated,
            tasks: RefCell::default(),
            next_itt: Cell::new(1),
            cmdsn: Cell::new(l.cmdsn),
            exp_statsn: Cell::new(l.exp_statsn),
            max_cmdsn: Cell::new(l.max_cmdsn),
            window: Notify::new(),
            alive: Cell::new(true),
            nops_out: Cell::new(0),
            out,
        });
        let writer = tokio::task::spawn_local(write_loop(tx_half, queue, state.clone()));
        let reader = tokio::task::spawn_local(read_loop(rx_half, state.clone()));
        let pinger = tokio::task::spawn_local(ping_loop(state.clone()));
        Rc::new(Session {
            state,
            tasks: vec![writer, reader, pinger],
        })
    }

    /// Sends a SCSI command to `lun` and waits for its answer.
    ///
    /// # Errors
    /// The connection ended before the answer came (the command may go again on a new
    /// one).
    pub(crate) async fn command(&self, lun: u64, cdb: &[u8], dir: Dir) -> io::Result<Reply> {
        let s = &self.state;
        // Wait for the target's window: CmdSN may not pass MaxCmdSN.
        loop {
            if !s.alive.get() {
                return Err(ended());
            }
            if !pdu::sn_lt(s.max_cmdsn.get(), s.cmdsn.get()) {
                break;
            }
            let opened = s.window.notified();
            opened.await;
        }
        let itt = s.itt();
        let cmdsn = s.cmdsn.get();
        s.cmdsn.set(cmdsn.wrapping_add(1));
        let lun = lun_bytes(lun);
        let (flags, expected, out) = match dir {
            Dir::None => (0u8, 0usize, None),
            Dir::In(n) => (0x40, n, None),
            Dir::Out(data) => (0x20, data.len(), Some(data)),
        };
        let neg = &s.negotiated;
        let immediate = match &out {
            Some(d) if neg.immediate_data => d.len().min(neg.first_burst).min(neg.max_send),
            _ => 0,
        };
        let unsolicited = match &out {
            Some(d) if !neg.initial_r2t => d.len().min(neg.first_burst),
            _ => immediate,
        };
        // The command is final unless unsolicited Data-Out PDUs follow it.
        let fin = if unsolicited > immediate { 0 } else { FINAL };
        let mut h = Header::new(pdu::SCSI_COMMAND, fin | flags | 1);
        h.0[8..16].copy_from_slice(&lun);
        h.set_u32(16, itt)
            .set_u32(20, expected as u32)
            .set_u32(24, cmdsn)
            .set_u32(28, s.exp_statsn.get())
            .set_data_len(immediate);
        let n = cdb.len().min(16);
        h.0[32..32 + n].copy_from_slice(&cdb[..n]);
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            data: if expected > 0 && flags == 0x40 {
                ferrite_block::io::pool::take(expected)
            } else {
                Vec::new()
            },
            ..Reply::default()
        };
        let first = out
            .as_ref()
            .filter(|_| immediate > 0)
            .map(|d| d.slice(..immediate));
        s.tasks.borrow_mut().insert(
            itt,
            Task {
                tx,
                lun,
                reply,
                data_out: out,
            },
        );
        s.send(&h, first);
        if unsolicited > immediate {
            s.data_out(itt, NO_TAG, immediate, unsolicited - immediate);
        }
        rx.await.unwrap_or_else(|_| Err(ended()))
    }

    /// Logs out (closing the session) and ends the connection; gives up on an answer
    /// after a second.
    pub(crate) async fn logout(&self) {
        let s = &self.state;
        if s.alive.get() {
            let itt = s.itt();
            let (tx, rx) = oneshot::channel();
            s.tasks.borrow_mut().insert(
                itt,
                Task {
                    tx,
                    lun: [0; 8],
                    reply: Reply::default(),
                    data_out: None,
                },
            );
            let mut h = Header::new(IMMEDIATE | pdu::LOGOUT_REQUEST, FINAL);
            h.set_u32(16, itt)
                .set_u32(24, s.cmdsn.get())
                .set_u32(28, s.exp_statsn.get());
            s.send(&h, None);
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
        self.kill();
    }

    /// Ends the connection now.
    pub(crate) fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.state.end(&ended());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn write_loop(
    w: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<Outgoing>,
    state: Rc<State>,
) {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    let pad = [0u8; 4];
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let sent: io::Result<()> = async {
            while let Some(o) = next.take() {
                w.write_all(&o.head).await?;
                if let Some(d) = o.data {
                    w.write_all(&d).await?;
                    w.write_all(&pad[..pdu::padding(d.len())]).await?;
                }
                next = queue.try_recv().ok();
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            state.end(&e);
            return;
        }
    }
}

async fn read_loop(r: OwnedReadHalf, state: Rc<State>) {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let why = loop {
        if let Err(e) = read_one(&mut r, &state).await {
            break e;
        }
        if !state.alive.get() {
            break ended();
        }
    };
    tracing::debug!(error = %why, "iSCSI connection ended");
    state.end(&why);
}

/// Reads one PDU from the target and acts on it.
async fn read_one(r: &mut BufReader<OwnedReadHalf>, s: &State) -> io::Result<()> {
    let bhs = pdu::read_header(r, s.negotiated.header_digest).await?;
    let len = pdu::data_len(&bhs);
    let opcode = bhs[0] & 0x3f;
    let itt = pdu::be32(&bhs[16..]);
    if opcode == pdu::DATA_IN {
        // The data goes straight into the read's buffer.
        let offset = pdu::be32(&bhs[40..]) as usize;
        // The buffer leaves its task while the data is read into it, and goes back after.
        let buf = s.tasks.borrow_mut().get_mut(&itt).and_then(|t| {
            let end = offset.checked_add(len)?;
            (end <= t.reply.data.len()).then(|| std::mem::take(&mut t.reply.data))
        });
        match buf {
            Some(mut buf) => {
                let read = r.read_exact(&mut buf[offset..offset + len]).await;
                if let Some(t) = s.tasks.borrow_mut().get_mut(&itt) {
                    t.reply.data = buf;
                    t.reply.received = t.reply.received.max(offset + len);
                }
                read?;
            }
            None => {
                let mut skip = vec![0u8; len];
                r.read_exact(&mut skip).await?;
            }
        }
        let mut pad = [0u8; 4];
        r.read_exact(&mut pad[..pdu::padding(len)]).await?;
        let p = Pdu {
            bhs,
            data: Vec::new(),
        };
        s.saw_window(&p);
        if bhs[1] & 0x01 != 0 {
            s.saw_statsn(p.u32_at(24));
            if let Some(mut t) = s.tasks.borrow_mut().remove(&itt) {
                t.reply.status = bhs[3];
                let _ = t.tx.send(Ok(t.reply));
            }
        }
        return Ok(());
    }
    let mut data = vec![0u8; len + pdu::padding(len)];
    r.read_exact(&mut data).await?;
    data.truncate(len);
    let p = Pdu { bhs, data };
    match opcode {
        pdu::SCSI_RESPONSE => {
            s.saw_window(&p);
            s.saw_statsn(p.u32_at(24));
            if let Some(mut t) = s.tasks.borrow_mut().remove(&itt) {
                if p.bhs[2] != 0 {
                    // The target failed the command outside SCSI (a "target failure"):
                    // the command fails, the connection is fine.
                    t.reply.status = NOT_SCSI;
                    let _ = t.tx.send(Ok(t.reply));
                    return Ok(());
                }
                t.reply.status = p.bhs[3];
                if p.data.len() >= 2 {
                    let n = usize::from(u16::from_be_bytes([p.data[0], p.data[1]]));
                    t.reply.sense = p.data[2..].iter().copied().take(n).collect();
                }
                let _ = t.tx.send(Ok(t.reply));
            }
        }
        pdu::R2T => {
            s.saw_window(&p);
            let ttt = p.u32_at(20);
            s.data_out(itt, ttt, p.u32_at(40) as usize, p.u32_at(44) as usize);
        }
        pdu::NOP_IN => {
            s.saw_window(&p);
            if itt != NO_TAG {
                s.saw_statsn(p.u32_at(24));
                s.nops_out.set(0);
            }
            let ttt = p.u32_at(20);
            if ttt != NO_TAG {
                // The target pings: answer with its tag and its data.
                let mut h = Header::new(IMMEDIATE | pdu::NOP_OUT, FINAL);
                h.0[8..16].copy_from_slice(&p.bhs[8..16]);
                h.set_u32(16, NO_TAG)
                    .set_u32(20, ttt)
                    .set_u32(24, s.cmdsn.get())
                    .set_u32(28, s.exp_statsn.get())
                    .set_data_len(p.data.len());
                let data = (!p.data.is_empty()).then(|| Bytes::from(p.data));
                s.send(&h, data);
            }
        }
        pdu::LOGOUT_RESPONSE => {
            s.saw_window(&p);
            s.saw_statsn(p.u32_at(24));
            if let Some(t) = s.tasks.borrow_mut().remove(&itt) {
                let _ = t.tx.send(Ok(Reply::default()));
            }
            return Err(ended());
        }
        pdu::REJECT => {
            s.saw_statsn(p.u32_at(24));
            // The rejected PDU's header follows: its task fails.
            let rejected = pdu::be32(p.data.get(16..).unwrap_or_default());
            if let Some(mut t) = s.tasks.borrow_mut().remove(&rejected) {
                t.reply.status = NOT_SCSI;
                let _ = t.tx.send(Ok(t.reply));
            }
        }
        pdu::ASYNC_MESSAGE => {
            s.saw_window(&p);
            s.saw_statsn(p.u32_at(24));
            // The target will drop the connection or the session, or asks for a logout:
            // log in again.
            if matches!(p.bhs[36], 1..=3) {
                return Err(ended());
            }
        }
        _ => {}
    }
    Ok(())
}

/// Sends a NOP-Out every [`NOP_INTERVAL`]; ends the connection when
/// [`MAX_NOP_FAILURES`] of them went unanswered (QEMU's message).
async fn ping_loop(state: Rc<State>) {
    loop {
        tokio::time::sleep(NOP_INTERVAL).await;
        if !state.alive.get() {
            return;
        }
        if state.nops_out.get() >= MAX_NOP_FAILURES {
            ferrite_block::report::error_report("iSCSI: NOP timeout. Reconnecting...");
            state.end(&ended());
            return;
        }
        state.nops_out.set(state.nops_out.get() + 1);
        let mut h = Header::new(IMMEDIATE | pdu::NOP_OUT, FINAL);
        h.set_u32(16, state.itt())
            .set_u32(20, NO_TAG)
            .set_u32(24, state.cmdsn.get())
            .set_u32(28, state.exp_statsn.get());
        state.send(&h, None);
    }
}
