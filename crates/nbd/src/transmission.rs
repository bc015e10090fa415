//! The transmission phase: requests in, replies out, up to `MAX_IN_FLIGHT` at a time.

use crate::handshake::{MetaContext, Session};
use crate::proto::*;
use ferrite_block::{BlockBackend, ReqFlags};
use std::io;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

/// Requests one client may have in flight (QEMU's server allows 16).
const MAX_IN_FLIGHT: usize = 16;
/// Most block status descriptors in one reply.
const MAX_EXTENTS: usize = 1 << 16;

struct Request {
    flags: u16,
    ty: u16,
    cookie: u64,
    offset: u64,
    len: u32,
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

fn simple_reply(cookie: u64, error: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&error.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h
}

/// A chunk header, with room for a small payload (data payloads are written separately).
fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + (len as usize).min(256));
    h.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&ty.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h
}

fn error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let mut c = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    c.extend_from_slice(&error.to_be_bytes());
    c.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    c.extend_from_slice(msg.as_bytes());
    c
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
        let req = tokio::select! {
            r = read_request(&mut r) => r?,
            _ = export.kick.notified() => break,
        };
        if req.ty == CMD_DISC {
            break;
        }
        // A write's payload follows its header; read it before the next request. One too
        // big for a buffer is refused unread, and then the stream cannot be followed: the
        // error goes out and the connection closes, as QEMU's does.
        let unreadable = req.ty == CMD_WRITE && req.len > MAX_BUFFER;
        let payload = if req.ty == CMD_WRITE && !unreadable {
            Some(read_payload(&mut r, req.len as usize).await?)
        } else {
            None
        };
        let session = session.clone();
        let w = w.clone();
        tokio::task::spawn_local(async move {
            let _permit = permit;
            let _ = handle(&session, req, payload, &w).await;
        });
        if unreadable {
            break;
        }
    }
    // Let requests in flight finish and reply before the connection closes.
    let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(w);
    let _ = writer.await;
    Ok(())
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

async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Request> {
    let mut h = [0u8; 28];
    r.read_exact(&mut h).await?;
    let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if magic != REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad request magic",
        ));
    }
    Ok(Request {
        flags: u16::from_be_bytes([h[4], h[5]]),
        ty: u16::from_be_bytes([h[6], h[7]]),
        cookie: u64::from_be_bytes(h[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(h[16..24].try_into().unwrap_or_default()),
        len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
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
fn validate(session: &Session, req: &Request, has_payload: bool) -> Result<(), (u32, String)> {
    let export = &session.export;
    // (flags the command takes, whether its length is a buffer's, whether it writes)
    let (valid, buffer, writes) = match req.ty {
        CMD_READ if session.structured => (CMD_FLAG_FUA | CMD_FLAG_DF, true, false),
        CMD_READ => (CMD_FLAG_FUA, true, false),
        CMD_WRITE => (CMD_FLAG_FUA, true, true),
        CMD_CACHE => (CMD_FLAG_FUA, true, false),
        CMD_TRIM => (CMD_FLAG_FUA, false, true),
        CMD_WRITE_ZEROES => (
            CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            false,
            true,
        ),
        CMD_BLOCK_STATUS => (CMD_FLAG_FUA | CMD_FLAG_REQ_ONE, false, false),
        // FLUSH, and unknown types (refused once the common checks pass).
        _ => (CMD_FLAG_FUA, false, false),
    };
    if buffer && req.len > MAX_BUFFER {
        return Err((
            EINVAL,
            format!("len ({}) is larger than max len ({MAX_BUFFER})", req.len),
        ));
    }
    if req.ty == CMD_WRITE && !has_payload {
        return Err((EINVAL, String::new()));
    }
    if writes && !export.writable {
        return Err((EINVAL, "Export is read-only".into()));
    }
    let size = export.node().len();
    if req.offset > size || u64::from(req.len) > size - req.offset {
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
        CMD_BLOCK_STATUS if req.len == 0 => Err((EINVAL, "need non-zero length".into())),
        CMD_BLOCK_STATUS => Ok(()),
        other => Err((EINVAL, format!("invalid request type ({other}) received"))),
    }
}

async fn handle(
    session: &Session,
    req: Request,
    payload: Option<Vec<u8>>,
    w: &Replies,
) -> io::Result<()> {
    if let Err((e, msg)) = validate(session, &req, payload.is_some()) {
        return send_outcome(session, &req, Outcome::Err(e, msg), w).await;
    }
    let blk = &session.export.blk;
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
            if session.structured && req.flags & CMD_FLAG_DF == 0 && req.len > 0 {
                return sparse_read(blk, &req, w).await;
            }
            match blk.read(req.offset, req.len as usize).await {
                Ok(d) => Outcome::Data(d),
                Err(e) => io_failure(&e),
            }
        }
        CMD_WRITE => map(blk
            .write(req.offset, payload.unwrap_or_default(), flags)
            .await),
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
            map(blk.write_zeroes(req.offset, u64::from(req.len), zf).await)
        }
        CMD_TRIM => {
            let r = blk.discard(req.offset, u64::from(req.len)).await;
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
    let parts = match (session.structured, outcome) {
        (false, Outcome::Ok) => vec![simple_reply(req.cookie, 0)],
        (false, Outcome::Err(e, _)) => vec![simple_reply(req.cookie, e)],
        (false, Outcome::Data(d)) => vec![simple_reply(req.cookie, 0), d],
        // Like QEMU, a success without data gets a simple reply even in structured mode.
        (true, Outcome::Ok) => vec![simple_reply(req.cookie, 0)],
        (true, Outcome::Err(e, msg)) => vec![error_chunk(req.cookie, e, &msg)],
        // A read of nothing: no data chunk, just the end (QEMU's NBD_REPLY_TYPE_NONE).
        (true, Outcome::Data(d)) if d.is_empty() => {
            vec![chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            )]
        }
        (true, Outcome::Data(d)) => {
            let mut h = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + d.len() as u32,
            );
            h.extend_from_slice(&req.offset.to_be_bytes());
            vec![h, d]
        }
    };
    send(w, parts)
}

/// A structured read that sends holes as hole chunks instead of zeroes.
async fn sparse_read(blk: &BlockBackend, req: &Request, w: &Replies) -> io::Result<()> {
    let end = req.offset + u64::from(req.len);
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
            let mut c = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, req.cookie, 12);
            c.extend_from_slice(&off.to_be_bytes());
            c.extend_from_slice(&(*len as u32).to_be_bytes());
            chunks.push(c);
        } else {
            match blk.read(*off, *len as usize).await {
                Ok(data) => {
                    let mut c =
                        chunk_header(flags, REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + *len as u32);
                    c.extend_from_slice(&off.to_be_bytes());
                    chunks.push(c);
                    chunks.push(data);
                }
                Err(e) => {
                    // Nothing has been sent yet: the whole read fails with one error chunk.
                    return send(w, vec![error_chunk(req.cookie, errno_to_nbd(&e), "")]);
                }
            }
        }
    }
    send(w, chunks)
}

async fn block_status(
    session: &Session,
    blk: &BlockBackend,
    req: &Request,
    w: &Replies,
) -> io::Result<()> {
    let end = req.offset + u64::from(req.len);
    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
    let mut replies = Vec::new();
    for ctx in &session.contexts {
        let mut descs: Vec<(u32, u32)> = Vec::new();
        let mut off = req.offset;
        while off < end && descs.len() < MAX_EXTENTS {
            let want = (end - off).min(u64::from(u32::MAX) & !511);
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
                    return send(w, vec![error_chunk(req.cookie, errno_to_nbd(&err), "")]);
                }
            };
            match descs.last_mut() {
                Some(last) if last.1 == flags && u64::from(last.0) + len <= u64::from(u32::MAX) => {
                    last.0 += len as u32;
                }
                _ => descs.push((len as u32, flags)),
            }
            off += len;
            if one {
                break;
            }
        }
        let mut c = chunk_header(
            0,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            4 + 8 * descs.len() as u32,
        );
        c.extend_from_slice(&ctx.id().to_be_bytes());
        for (len, flags) in descs {
            c.extend_from_slice(&len.to_be_bytes());
            c.extend_from_slice(&flags.to_be_bytes());
        }
        replies.push(c);
    }
    if let Some(last) = replies.last_mut() {
        // Set DONE on the final chunk (flags are bytes 4..6 of the header).
        last[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    }
    send(w, replies)
}
