//! One connection to the server after the handshake: requests sent whole, each tagged with
//! a cookie, and a reader task that gathers each request's reply (simple, or structured
//! chunks in either framing) and hands it to the request waiting for it.

use super::handshake::{Framing, Negotiated};
use crate::proto::*;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

const ERROR_OFFSET: u16 = (1 << 15) + 2;

pub(crate) type Reader = Pin<Box<dyn AsyncRead>>;
pub(crate) type Writer = Pin<Box<dyn AsyncWrite>>;

/// What a request asks of the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Command {
    pub(crate) ty: u16,
    pub(crate) flags: u16,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// A request's answer: data read, one extent of block status, or nothing.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) data: Vec<u8>,
    /// (length, NBD status flags) of the first extent.
    pub(crate) extent: Option<(u64, u32)>,
}

/// A failure of a request: the server's error (final), or the connection's (the request
/// may be sent again on a new connection).
#[derive(Debug)]
pub(crate) enum Failure {
    Server(io::Error),
    Connection(io::Error),
}

type Pending = HashMap<u64, (Command, oneshot::Sender<Result<Answer, Failure>>)>;

/// A connected session.
pub(crate) struct Session {
    pub(crate) info: Negotiated,
    writer: tokio::sync::Mutex<Writer>,
    pending: Rc<RefCell<Pending>>,
    next_cookie: Cell<u64>,
    alive: Rc<Cell<bool>>,
    reader: tokio::task::JoinHandle<()>,
}

fn server_error(code: u32) -> io::Error {
    let errno = match code {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    };
    io::Error::from_raw_os_error(errno)
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("Protocol error: {what}"),
    )
}

impl Session {
    pub(crate) fn new(info: Negotiated, r: Reader, w: Writer) -> Rc<Session> {
        let pending: Rc<RefCell<Pending>> = Rc::default();
        let alive = Rc::new(Cell::new(true));
        let reader = tokio::task::spawn_local(read_loop(
            info.framing,
            BufReader::with_capacity(256 << 10, r),
            pending.clone(),
            alive.clone(),
        ));
        Rc::new(Session {
            info,
            writer: tokio::sync::Mutex::new(w),
            pending,
            next_cookie: Cell::new(1),
            alive,
            reader,
        })
    }

    /// Whether the connection still works.
    pub(crate) fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// A request's header in the negotiated framing (32 bytes extended, else 28).
    fn header(&self, cmd: Command, cookie: u64) -> Vec<u8> {
        let extended = self.info.framing == Framing::Extended;
        let mut h = Vec::with_capacity(32);
        let magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        h.extend_from_slice(&magic.to_be_bytes());
        h.extend_from_slice(&cmd.flags.to_be_bytes());
        h.extend_from_slice(&cmd.ty.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&cmd.offset.to_be_bytes());
        if extended {
            h.extend_from_slice(&cmd.len.to_be_bytes());
        } else {
            h.extend_from_slice(&(cmd.len as u32).to_be_bytes());
        }
        h
    }

    /// Sends `cmd` (with `payload` for a write) and waits for its answer.
    pub(crate) async fn request(&self, cmd: Command, payload: &[u8]) -> Result<Answer, Failure> {
        if !self.is_alive() {
            return Err(Failure::Connection(io::ErrorKind::NotConnected.into()));
        }
        let cookie = self.next_cookie.get();
        self.next_cookie.set(cookie + 1);
        let (tx, rx) = oneshot::channel();
        self.pending.borrow_mut().insert(cookie, (cmd, tx));
        let header = self.header(cmd, cookie);
        let sent = {
            let mut w = self.writer.lock().await;
            async {
                w.write_all(&header).await?;
                if !payload.is_empty() {
                    w.write_all(payload).await?;
                }
                w.flush().await
            }
            .await
        };
        if let Err(e) = sent {
            self.pending.borrow_mut().remove(&cookie);
            self.alive.set(false);
            return Err(Failure::Connection(e));
        }
        rx.await
            .unwrap_or_else(|_| Err(Failure::Connection(io::ErrorKind::BrokenPipe.into())))
    }

    /// Says goodbye (`NBD_CMD_DISC`) and ends the connection.
    pub(crate) async fn disconnect(&self) {
        if self.is_alive() {
            let disc = Command {
                ty: CMD_DISC,
                flags: 0,
                offset: 0,
                len: 0,
            };
            let header = self.header(disc, 0);
            let mut w = self.writer.lock().await;
            let _ = w.write_all(&header).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        }
        self.alive.set(false);
        self.reader.abort();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads replies until the connection ends; every request still waiting then fails as the
/// connection's failure.
async fn read_loop<R: AsyncRead + Unpin>(
    framing: Framing,
    mut r: R,
    pending: Rc<RefCell<Pending>>,
    alive: Rc<Cell<bool>>,
) {
    let mut partial: HashMap<u64, Partial> = HashMap::new();
    let end = loop {
        match read_one(framing, &mut r, &pending, &mut partial).await {
            Ok(()) => {}
            Err(e) => break e,
        }
    };
    tracing::debug!(error = %end, "NBD client connection ended");
    alive.set(false);
    for (_, (_, tx)) in pending.borrow_mut().drain() {
        let _ = tx.send(Err(Failure::Connection(io::Error::new(
            end.kind(),
            end.to_string(),
        ))));
    }
}

/// A structured reply being gathered: the answer so far, or the server's error.
#[derive(Default)]
struct Partial {
    answer: Answer,
    error: Option<io::Error>,
}

/// Reads one reply or chunk and delivers it when the request's answer is complete.
async fn read_one<R: AsyncRead + Unpin>(
    framing: Framing,
    r: &mut R,
    pending: &Rc<RefCell<Pending>>,
    partial: &mut HashMap<u64, Partial>,
) -> io::Result<()> {
    let magic = r.read_u32().await?;
    if magic == SIMPLE_REPLY_MAGIC {
        let error = r.read_u32().await?;
        let cookie = r.read_u64().await?;
        let Some((cmd, tx)) = pending.borrow_mut().remove(&cookie) else {
            return Err(protocol_error("unexpected cookie value"));
        };
        if error != 0 {
            let _ = tx.send(Err(Failure::Server(server_error(error))));
            return Ok(());
        }
        let mut answer = Answer::default();
        if cmd.ty == CMD_READ {
            answer.data = ferrite_block::io::pool::take(cmd.len as usize);
            r.read_exact(&mut answer.data).await?;
        }
        let _ = tx.send(Ok(answer));
        return Ok(());
    }
    let extended = match magic {
        STRUCTURED_REPLY_MAGIC if framing == Framing::Structured => false,
        EXTENDED_REPLY_MAGIC if framing == Framing::Extended => true,
        _ => return Err(protocol_error("unexpected reply magic")),
    };
    let flags = r.read_u16().await?;
    let ty = r.read_u16().await?;
    let cookie = r.read_u64().await?;
    let len = if extended {
        let _offset = r.read_u64().await?;
        r.read_u64().await?
    } else {
        u64::from(r.read_u32().await?)
    };
    if len > u64::from(MAX_BUFFER) + 4096 {
        return Err(protocol_error("Payload too large"));
    }
    let Some(cmd) = pending.borrow().get(&cookie).map(|(c, _)| *c) else {
        return Err(protocol_error("unexpected cookie value"));
    };
    let gathered = partial.entry(cookie).or_insert_with(|| {
        let mut p = Partial::default();
        if cmd.ty == CMD_READ {
            p.answer.data = vec![0u8; cmd.len as usize];
        }
        p
    });
    let answer = &mut gathered.answer;
    match ty {
        REPLY_TYPE_NONE => {}
        REPLY_TYPE_OFFSET_DATA if cmd.ty == CMD_READ && len >= 8 => {
            let at = r.read_u64().await?;
            let n = (len - 8) as usize;
            let start = at.checked_sub(cmd.offset).map(|s| s as usize);
            let fits = |s: &usize| s.checked_add(n).is_some_and(|e| e <= answer.data.len());
            match start.filter(fits) {
                Some(s) => r.read_exact(&mut answer.data[s..s + n]).await?,
                None => {
                    return Err(protocol_error(
                        "server sent chunk exceeding requested region",
                    ));
                }
            };
        }
        REPLY_TYPE_OFFSET_HOLE if cmd.ty == CMD_READ && len == 12 => {
            let at = r.read_u64().await?;
            let n = r.read_u32().await? as usize;
            let start = at.checked_sub(cmd.offset).map(|s| s as usize);
            let fits = |s: &usize| s.checked_add(n).is_some_and(|e| e <= answer.data.len());
            match start.filter(fits) {
                // The buffer starts zeroed; a hole leaves it so.
                Some(_) => {}
                None => {
                    return Err(protocol_error(
                        "server sent chunk exceeding requested region",
                    ));
                }
            }
        }
        REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT if cmd.ty == CMD_BLOCK_STATUS => {
            let mut payload = vec![0u8; len as usize];
            r.read_exact(&mut payload).await?;
            let ext = ty == REPLY_TYPE_BLOCK_STATUS_EXT;
            let first = if ext {
                payload.get(8..24).map(|d| {
                    let l = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
                    let s = u64::from_be_bytes(d[8..16].try_into().unwrap_or_default());
                    (l, s as u32)
                })
            } else {
                payload.get(4..12).map(|d| {
                    let l = u32::from_be_bytes(d[0..4].try_into().unwrap_or_default());
                    let s = u32::from_be_bytes(d[4..8].try_into().unwrap_or_default());
                    (u64::from(l), s)
                })
            };
            match first {
                Some(e) if answer.extent.is_none() => answer.extent = Some(e),
                Some(_) => {}
                None => {
                    return Err(protocol_error(
                        "invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS",
                    ));
                }
            }
        }
        // NBD_REPLY_TYPE_ERROR and NBD_REPLY_TYPE_ERROR_OFFSET: the first error is the
        // request's answer (the message and offset are not used).
        REPLY_TYPE_ERROR | ERROR_OFFSET if len >= 6 => {
            let error = r.read_u32().await?;
            let mut rest = vec![0u8; (len - 4) as usize];
            r.read_exact(&mut rest).await?;
            gathered.error.get_or_insert_with(|| server_error(error));
        }
        _ => return Err(protocol_error("unexpected structured reply chunk")),
    }
    if flags & REPLY_FLAG_DONE != 0 {
        let done = partial.remove(&cookie).unwrap_or_default();
        if let Some((_, tx)) = pending.borrow_mut().remove(&cookie) {
            let _ = tx.send(match done.error {
                Some(e) => Err(Failure::Server(e)),
                None => Ok(done.answer),
            });
        }
    }
    Ok(())
}
