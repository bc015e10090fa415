//! The transmission phase: requests in, replies out, up to `MAX_IN_FLIGHT` at a time.

use crate::handshake::{MetaContext, Mode, Session, skip};
use crate::proto::*;
use ferrite_block::{BlockBackend, ReqFlags};
use std::io;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

/// Requests one client may have in flight (QEMU's server allows 16).
const MAX_IN_FLIGHT: usize = 16;
/// Most block status descriptors in one reply (QEMU's: 1 MiB of them).
const MAX_EXTENTS: usize = 1 << 17;

struct Request {
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    /// 32 bits on the wire, 64 with extended headers.
    len: u64,
    /// The contexts a block status request's payload chose (extended headers); `None`:
    /// every negotiated one. Empty when the payload was not valid.
    contexts: Option<Vec<MetaContext>>,
}

/// What followed a request's header on the wire.
enum Body {
    None,
    /// A write's data.
    Data(Vec<u8>),
    /// A payload too big to take: refused unread, after which the stream cannot be
    /// followed and the connection closes, as QEMU's does.
    Unread,
}

/// Where replies go: each message is the buffers of one reply, written back to back by the
/// connection's writer task, which flushes once its queue is empty (replies that complete
/// together share a system call).
type Replies = mpsc::UnboundedSender<Vec<Vec<u8>>>;

fn send(w: &Replies, parts: Vec<Vec<u8>>) -> io::Result<()> {
    w.send(parts)
        .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
}

/// Writes replies until every sender is gone or the peer fails.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Vec<Vec<u8>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(parts) = next {
            for part in parts {
                if w.write_all(&part).await.is_err() {
                    return;
                }
                ferrite_block::io::pool::give(part);
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// What a request produced.
enum Outcome {
    Ok,
    Data(Vec<u8>),
    /// An error and, for structured replies, its message.
    Err(u32, String),
}

/// An I/O failure: the NBD errno, and the system's text for the message.
fn io_failure(e: &io::Error) -> Outcome {
    Outcome::Err(errno_to_nbd(e), ferrite_qapi::os_msg(e))
}

/// How a session's replies are framed.
#[derive(Clone, Copy)]
struct Framing(Mode);

impl Framing {
    /// A chunk header for `req`, with room for a small payload (data payloads are written
    /// separately).
    fn chunk(self, flags: u16, ty: u16, req: &Request, len: u64) -> Vec<u8> {
        let mut h = Vec::with_capacity(32 + (len as usize).min(256));
        if self.0 >= Mode::Extended {
            h.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&ty.to_be_bytes());
            h.extend_from_slice(&req.cookie.to_be_bytes());
            h.extend_from_slice(&req.offset.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
        } else {
            h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&ty.to_be_bytes());
            h.extend_from_slice(&req.cookie.to_be_bytes());
            h.extend_from_slice(&(len as u32).to_be_bytes());
        }
        h
    }

    fn error(self, req: &Request, error: u32, msg: &str) -> Vec<u8> {
        let mut c = self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, req, 6 + msg.len() as u64);
        c.extend_from_slice(&error.to_be_bytes());
        c.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        c.extend_from_slice(msg.as_bytes());
        c
    }

    /// The end of a reply that carries nothing.
    fn done(self, req: &Request) -> Vec<u8> {
        self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0)
    }
}

fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&error.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h
}

/// Serves requests until the client disconnects or `kicked` resolves.
pub(crate) async fn serve<R, W>(session: Session, mut r: R, w: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::task::spawn_local(write_replies(w, rx));
    let w: Replies = tx;
    let slots = std::sync::Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let export = session.export.clone();
    let session = Rc::new(session);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let mut req = tokio::select! {
            r = read_request(&mut r, session.mode) => r?,
            _ = export.kick.notified() => break,
        };
        if req.ty == CMD_DISC {
            break;
        }
        // A payload follows its header; read it before the next request.
        let body = read_body(&mut r, &session, &mut req).await?;
        let unread = matches!(body, Body::Unread);
        let session = session.clone();
        let w = w.clone();
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let _ = handle(&session, req, body, &w).await;
        });
        if unread {
            break;
        }
    }
    // Let requests in flight finish and reply before the connection closes.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(w);
    let _ = writer.await;
    Ok(())
}

/// Reads what follows a request's header: a write's data, or (with extended headers) a
/// payload the client announced with `NBD_CMD_FLAG_PAYLOAD_LEN`. A block status payload
/// narrows the request to some of the negotiated contexts and gives its real length; any
/// other command's payload is skipped and the request then fails on its flags, as QEMU's.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    session: &Session,
    req: &mut Request,
) -> io::Result<Body> {
    let announced = session.mode >= Mode::Extended && req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
    if req.ty != CMD_WRITE && !announced {
        return Ok(Body::None);
    }
    if req.len > u64::from(MAX_BUFFER) {
        return Ok(Body::Unread);
    }
    let len = req.len as usize;
    if req.ty == CMD_WRITE {
        return Ok(Body::Data(read_payload(r, len).await?));
    }
    if req.ty == CMD_BLOCK_STATUS {
        // An effective length, then the ids of the contexts wanted, each once.
        let fits = len % 4 == 0 && len >= 8 && len <= 8 + 4 * session.contexts.len();
        if fits {
            let bytes = read_payload(r, len).await?;
            let ids: Vec<u32> = bytes[8..]
                .chunks_exact(4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let known = ids
                .iter()
                .all(|id| session.contexts.iter().any(|c| c.id() == *id));
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            if known && unique.len() == ids.len() {
                req.len = u64::from_be_bytes(bytes[..8].try_into().unwrap_or_default());
                req.contexts = Some(
                    session
                        .contexts
                        .iter()
                        .copied()
                        .filter(|c| ids.contains(&c.id()))
                        .collect(),
                );
                return Ok(Body::None);
            }
        } else {
            skip(r, req.len).await?;
        }
        req.len = 0;
        req.contexts = Some(Vec::new());
        return Ok(Body::None);
    }
    skip(r, req.len).await?;
    req.len = 0;
    Ok(Body::None)
}

/// A write's payload. Small ones are read into fresh memory that is never zeroed first (the
/// socket fills it); large ones into a pooled buffer, which saves page faults.
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Vec<u8>> {
    if len >= ferrite_block::io::pool::MIN_POOLED {
        let mut buf = ferrite_block::io::pool::take(len);
        r.read_exact(&mut buf).await?;
        return Ok(buf);
    }
    let mut buf = Vec::with_capacity(len);
    r.take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(buf)
}

/// A request header: 28 bytes with a 32-bit length, or 32 with a 64-bit one once extended
/// headers are negotiated (each mode has its own magic).
async fn read_request<R: AsyncRead + Unpin>(r: &mut R, mode: Mode) -> io::Result<Request> {
    let extended = mode >= Mode::Extended;
    let mut h = [0u8; 32];
    let h = &mut h[..if extended { 32 } else { 28 }];
    r.read_exact(h).await?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request magic",
        ));
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        ty: u16::from_be_bytes([h[6], h[7]]),
        cookie: be64(&h[8..16]),
        offset: be64(&h[16..24]),
        len: if extended {
            be64(&h[24..32])
        } else {
            u64::from(u32::from_be_bytes([h[24], h[25], h[26], h[27]]))
        },
        contexts: None,
    })
}

/// A command's name in QEMU's messages.
fn cmd_name(ty: u16) -> &'static str {
    match ty {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write zeroes",
        CMD_BLOCK_STATUS => "block status",
        _ => "<unknown>",
    }
}

/// Checks a request before it runs: QEMU's rules, in QEMU's order (length, read-only,
/// bounds, then flags), each answered with EINVAL and QEMU's message.
fn validate(session: &Session, req: &Request, body: &Body) -> Result<(), (u32, String)> {
    let export = &session.export;
    let extended = session.mode >= Mode::Extended;
    // (flags the command takes, whether its length is a buffer's, whether it writes)
    let (valid, buffer, writes) = match req.ty {
        CMD_READ if session.mode >= Mode::Structured => (CMD_FLAG_FUA | CMD_FLAG_DF, true, false),
        CMD_READ => (CMD_FLAG_FUA, true, false),
        CMD_WRITE if extended => (CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN, true, true),
        CMD_WRITE => (CMD_FLAG_FUA, true, true),
        CMD_CACHE => (CMD_FLAG_FUA, true, false),
        CMD_TRIM => (CMD_FLAG_FUA, false, true),
        CMD_WRITE_ZEROES => (
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            false,
            true,
        ),
        CMD_BLOCK_STATUS if req.contexts.is_some() => (
            CMD_FLAG_FUA | CMD_FLAG_REQ_ONE | CMD_FLAG_PAYLOAD_LEN,
            false,
            false,
        ),
        CMD_BLOCK_STATUS => (CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, false, false),
        // FLUSH, and unknown types (refused once the common checks pass).
        _ => (CMD_FLAG_FUA, false, false),
    };
    if (buffer || matches!(body, Body::Unread)) && req.len > u64::from(MAX_BUFFER) {
        return Err((
            EINVAL,
            format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len),
        ));
    }
    if writes && !export.writable {
        return Err((EINVAL, "Export is read-only".into()));
    }
    let size = export.node().len();
    if req.offset > size || req.len > size - req.offset {
        return Err((
            EINVAL,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.len
            ),
        ));
    }
    if req.flags & !valid != 0 {
        return Err((
            EINVAL,
            format!(
                "unsupported flags for command {} (got {:#x})",
                cmd_name(req.ty),
                req.flags
            ),
        ));
    }
    match req.ty {
        CMD_READ | CMD_WRITE | CMD_CACHE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_FLUSH => Ok(()),
        CMD_BLOCK_STATUS if session.contexts.is_empty() => {
            Err((EINVAL, "CMD_BLOCK_STATUS not negotiated".into()))
        }
        CMD_BLOCK_STATUS if req.contexts.as_ref().is_some_and(|c| c.is_empty()) => {
            Err((EINVAL, "CMD_BLOCK_STATUS payload not valid".into()))
        }
        CMD_BLOCK_STATUS if req.len == 0 => Err((EINVAL, "need non-zero length".into())),
        CMD_BLOCK_STATUS => Ok(()),
        other => Err((EINVAL, format!("invalid request type ({other}) received"))),
    }
}

async fn handle(session: &Session, req: Request, body: Body, w: &Replies) -> io::Result<()> {
    if let Err((e, msg)) = validate(session, &req, &body) {
        return send_outcome(session, &req, Outcome::Err(e, msg), w).await;
    }
    let blk = &session.export.blk;
    // An export of an inactive node (`allow-inactive`) only reads (QEMU's server).
    if req.ty != CMD_READ && blk.node().is_some_and(|n| !n.is_active()) {
        let refused = Outcome::Err(EPERM, "export is inactive".into());
        return send_outcome(session, &req, refused, w).await;
    }
    let fua = req.flags & CMD_FLAG_FUA != 0 || session.export.writethrough;
    let flags = if fua {
        ReqFlags::FUA
    } else {
        ReqFlags::empty()
    };
    let map = |r: io::Result<()>| match r {
        Ok(()) => Outcome::Ok,
        Err(e) => io_failure(&e),
    };
    let outcome = match req.ty {
        CMD_READ => {
            // FUA on a read: what was written before it is made durable first (QEMU).
            if req.flags & CMD_FLAG_FUA != 0
                && let Err(e) = blk.flush().await
            {
                return send_outcome(session, &req, io_failure(&e), w).await;
            }
            if session.mode >= Mode::Structured && req.flags & CMD_FLAG_DF == 0 && req.len > 0 {
                return sparse_read(session, blk, &req, w).await;
            }
            match blk.read(req.offset, req.len as usize).await {
                Ok(d) => Outcome::Data(d),
                Err(e) => io_failure(&e),
            }
        }
        CMD_WRITE => {
            let Body::Data(data) = body else {
                return Err(io::ErrorKind::InvalidInput.into());
            };
            map(blk.write(req.offset, data, flags).await)
        }
        CMD_WRITE_ZEROES => {
            let mut zf = flags;
            if req.flags & CMD_FLAG_NO_HOLE == 0 {
                zf |= ReqFlags::MAY_UNMAP;
            }
            if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                if !blk.node().is_some_and(|n| n.can_fast_zero()) {
                    let out = Outcome::Err(ENOTSUP, String::new());
                    return send_outcome(session, &req, out, w).await;
                }
                zf |= ReqFlags::NO_FALLBACK;
            }
            map(blk.write_zeroes(req.offset, req.len, zf).await)
        }
        CMD_TRIM => {
            let r = blk.discard(req.offset, req.len).await;
            match r {
                Ok(()) if fua => map(blk.flush().await),
                other => map(other),
            }
        }
        CMD_FLUSH => map(blk.flush().await),
        CMD_CACHE => Outcome::Ok,
        CMD_BLOCK_STATUS => return block_status(session, blk, &req, w).await,
        _ => Outcome::Err(EINVAL, String::new()),
    };
    send_outcome(session, &req, outcome, w).await
}

async fn send_outcome(
    session: &Session,
    req: &Request,
    outcome: Outcome,
    w: &Replies,
) -> io::Result<()> {
    let frame = Framing(session.mode);
    let parts = match (session.mode, outcome) {
        (Mode::Simple, Outcome::Ok) => vec![simple_reply(req.cookie, 0)],
        (Mode::Simple, Outcome::Err(e, _)) => vec![simple_reply(req.cookie, e)],
        (Mode::Simple, Outcome::Data(d)) => vec![simple_reply(req.cookie, 0), d],
        // Like QEMU, a success without data gets a simple reply in structured mode; extended
        // headers leave no simple replies.
        (Mode::Structured, Outcome::Ok) => vec![simple_reply(req.cookie, 0)],
        (Mode::Extended, Outcome::Ok) => vec![frame.done(req)],
        (_, Outcome::Err(e, msg)) => vec![frame.error(req, e, &msg)],
        // A read of nothing: no data chunk, just the end (QEMU's NBD_REPLY_TYPE_NONE).
        (_, Outcome::Data(d)) if d.is_empty() => vec![frame.done(req)],
        (_, Outcome::Data(d)) => {
            let mut h = frame.chunk(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req,
                8 + d.len() as u64,
            );
            h.extend_from_slice(&req.offset.to_be_bytes());
            vec![h, d]
        }
    };
    send(w, parts)
}

/// A structured read that sends holes as hole chunks instead of zeroes.
async fn sparse_read(
    session: &Session,
    blk: &BlockBackend,
    req: &Request,
    w: &Replies,
) -> io::Result<()> {
    let frame = Framing(session.mode);
    let end = req.offset + req.len;
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut off = req.offset;
    while off < end {
        match blk.block_status(off, end - off).await {
            Ok(e) => {
                let hole = e.zero && !e.data;
                match pieces.last_mut() {
                    Some(last) if last.2 == hole => last.1 += e.len,
                    _ => pieces.push((off, e.len, hole)),
                }
                off += e.len;
            }
            Err(_) => {
                pieces.push((off, end - off, false));
                break;
            }
        }
    }
    let mut chunks: Vec<Vec<u8>> = Vec::with_capacity(pieces.len() * 2);
    for (i, (off, len, hole)) in pieces.iter().enumerate() {
        let flags = if i + 1 == pieces.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        if *hole {
            let mut c = frame.chunk(flags, REPLY_TYPE_OFFSET_HOLE, req, 12);
            c.extend_from_slice(&off.to_be_bytes());
            c.extend_from_slice(&(*len as u32).to_be_bytes());
            chunks.push(c);
        } else {
            match blk.read(*off, *len as usize).await {
                Ok(data) => {
                    let mut c = frame.chunk(flags, REPLY_TYPE_OFFSET_DATA, req, 8 + *len);
                    c.extend_from_slice(&off.to_be_bytes());
                    chunks.push(c);
                    chunks.push(data);
                }
                Err(e) => {
                    // Nothing has been sent yet: the whole read fails with one error chunk.
                    return send(w, vec![frame.error(req, errno_to_nbd(&e), "")]);
                }
            }
        }
    }
    send(w, chunks)
}

/// Block status: one chunk per context, 32-bit descriptors, or 64-bit ones with extended
/// headers. With `NBD_CMD_FLAG_REQ_ONE` a context's answer is one descriptor, as long as
/// the status stays the same.
async fn block_status(
    session: &Session,
    blk: &BlockBackend,
    req: &Request,
    w: &Replies,
) -> io::Result<()> {
    let frame = Framing(session.mode);
    let wide = session.mode >= Mode::Extended;
    let end = req.offset + req.len;
    let most = if req.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let longest = if wide { u64::MAX } else { u64::from(u32::MAX) };
    let contexts = req.contexts.as_ref().unwrap_or(&session.contexts);
    let mut replies = Vec::new();
    for ctx in contexts {
        let mut descs: Vec<(u64, u32)> = Vec::new();
        let mut off = req.offset;
        while off < end {
            let want = (end - off).min(longest & !511);
            let r = match ctx {
                MetaContext::BaseAllocation => blk.block_status(off, want).await.map(|e| {
                    let flags = (if e.data { 0 } else { STATE_HOLE })
                        | (if e.zero { STATE_ZERO } else { 0 });
                    (e.len, flags)
                }),
                MetaContext::AllocationDepth => blk.allocation_depth(off, want).await,
                MetaContext::DirtyBitmap(i) => {
                    Ok(session.export.bitmaps.get(*i).map_or((want, 0), |b| {
                        let (len, dirty) = b.extent(off, want);
                        (len, u32::from(dirty))
                    }))
                }
            };
            let (len, flags) = match r {
                Ok(x) => x,
                Err(err) => {
                    return send(w, vec![frame.error(req, errno_to_nbd(&err), "")]);
                }
            };
            let full = descs.len() == most;
            match descs.last_mut() {
                Some(last) if last.1 == flags && last.0 + len <= longest => last.0 += len,
                _ if full => break,
                _ => descs.push((len, flags)),
            }
            off += len;
        }
        let (ty, each) = if wide {
            (REPLY_TYPE_BLOCK_STATUS_EXT, 16)
        } else {
            (REPLY_TYPE_BLOCK_STATUS, 8)
        };
        let head = if wide { 8 } else { 4 };
        let mut c = frame.chunk(0, ty, req, head + each * descs.len() as u64);
        c.extend_from_slice(&ctx.id().to_be_bytes());
        if wide {
            c.extend_from_slice(&(descs.len() as u32).to_be_bytes());
        }
        for (len, flags) in descs {
            if wide {
                c.extend_from_slice(&len.to_be_bytes());
                c.extend_from_slice(&u64::from(flags).to_be_bytes());
            } else {
                c.extend_from_slice(&(len as u32).to_be_bytes());
                c.extend_from_slice(&flags.to_be_bytes());
            }
        }
        replies.push(c);
    }
    if let Some(last) = replies.last_mut() {
        // Set DONE on the final chunk (flags are bytes 4..6 of either header).
        last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    }
    send(w, replies)
}
