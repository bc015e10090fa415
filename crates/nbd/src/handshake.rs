//! The fixed-newstyle handshake: option haggling until the client picks an export.

use crate::export::Export;
use crate::proto::*;
use crate::service::NbdService;
use std::io;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A negotiated meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaContext {
    BaseAllocation,
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` for the export's bitmap at this index.
    DirtyBitmap(usize),
}

impl MetaContext {
    fn name(self, export: &Export) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(i) => format!(
                "qemu:dirty-bitmap:{}",
                export.bitmaps.get(i).map_or("", |b| b.name())
            ),
        }
    }

    pub(crate) fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 0,
            MetaContext::AllocationDepth => 1,
            MetaContext::DirtyBitmap(i) => 2 + i as u32,
        }
    }
}

/// Whether LIST query `q` names context `name`: exactly, or (when listing) as its namespace
/// (`base:`, `qemu:`) or `qemu:dirty-bitmap:` for every bitmap.
fn query_matches(q: &str, name: &str, listing: bool) -> bool {
    q == name
        || (listing
            && (q == "qemu:dirty-bitmap:" && name.starts_with(q)
                || (q.ends_with(':') && q.matches(':').count() == 1 && name.starts_with(q))))
}

/// How requests and replies are framed; each mode builds on the one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// 28-byte requests, simple replies.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY`: replies to reads and errors in chunks.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS`: 32-byte requests with 64-bit lengths, every reply a
    /// 32-byte chunk header, 64-bit block status extents.
    Extended,
}

/// What the handshake settled.
pub(crate) struct Session {
    pub(crate) export: Rc<Export>,
    pub(crate) mode: Mode,
    pub(crate) contexts: Vec<MetaContext>,
}

async fn reply<W: AsyncWrite + Unpin>(w: &mut W, opt: u32, ty: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&ty.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await
}

async fn reply_err<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    ty: u32,
    msg: &str,
) -> io::Result<()> {
    reply(w, opt, ty, msg.as_bytes()).await
}

/// Transmission flags for an export. `stat_payload`: whether to offer block status
/// requests that name their contexts (extended headers only).
pub(crate) fn transmission_flags(export: &Export, mode: Mode, stat_payload: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_CACHE | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.writable {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    } else {
        flags |= FLAG_READ_ONLY;
    }
    // Every connection goes through the same node and a flush flushes the whole node, so
    // the multi-conn guarantee holds for writable exports too.
    if export.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if mode >= Mode::Structured {
        flags |= FLAG_SEND_DF;
    }
    if mode >= Mode::Extended && stat_payload {
        flags |= FLAG_BLOCK_STAT_PAYLOAD;
    }
    flags
}

/// An option's name in QEMU's messages.
fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        OPT_EXTENDED_HEADERS => "extended headers",
        _ => "<unknown>",
    }
}

/// Reads and drops `len` bytes of a payload the server does not use.
pub(crate) async fn skip<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    if tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await? < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn take_u32(data: &[u8], at: &mut usize) -> Option<u32> {
    let b = data.get(*at..*at + 4)?;
    *at += 4;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u16(data: &[u8], at: &mut usize) -> Option<u16> {
    let b = data.get(*at..*at + 2)?;
    *at += 2;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn take_str(data: &[u8], at: &mut usize, len: usize) -> Option<String> {
    let b = data.get(*at..*at + len)?;
    *at += len;
    String::from_utf8(b.to_vec()).ok()
}

/// The export an option names; replies to a malformed option or an unknown name instead.
async fn export_for<W: AsyncWrite + Unpin, T>(
    service: &NbdService,
    w: &mut W,
    opt: u32,
    parsed: Option<(String, T)>,
) -> io::Result<Option<(Rc<Export>, T)>> {
    let Some((name, rest)) = parsed else {
        reply_err(w, opt, REP_ERR_INVALID, "request data has wrong length").await?;
        return Ok(None);
    };
    let Some(export) = service.export_by_name(&name) else {
        reply_err(
            w,
            opt,
            REP_ERR_UNKNOWN,
            &format!("export '{}' not present", sanitize_name(&name)),
        )
        .await?;
        return Ok(None);
    };
    Ok(Some((export, rest)))
}

/// What the client said in its greeting.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Greeting {
    /// Fixed newstyle: options may be refused and retried.
    fixed: bool,
    /// The 124 zero bytes after an `EXPORT_NAME` reply are left out.
    no_zeroes: bool,
}

/// Where the connection stands on TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// The server has no credentials: STARTTLS is refused.
    Off,
    /// The server has credentials and the client has not started TLS: every option but
    /// STARTTLS is refused.
    Required,
    /// The connection is encrypted.
    Done,
}

/// How the option haggling ended.
pub(crate) enum Outcome {
    /// An export was picked.
    Session(Session),
    /// The client asked for TLS and was told yes: the TLS handshake comes next.
    StartTls,
    /// The client went away or aborted, or was dropped.
    Closed,
}

/// Sends the server's greeting and reads the client's. `Ok(None)`: flags QEMU refuses.
pub(crate) async fn greet<R, W>(r: &mut R, w: &mut W) -> io::Result<Option<Greeting>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    Ok(Some(Greeting {
        // Without fixed newstyle the client can only name its export (QEMU hangs up on
        // any other option).
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    }))
}

/// Runs the whole handshake of a server without TLS. `Ok(None)`: the client went away or
/// aborted.
pub(crate) async fn negotiate<R, W>(
    service: &NbdService,
    r: &mut R,
    w: &mut W,
) -> io::Result<Option<Session>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(greeting) = greet(r, w).await? else {
        return Ok(None);
    };
    Ok(match options(service, r, w, greeting, Tls::Off).await? {
        Outcome::Session(session) => Some(session),
        Outcome::StartTls | Outcome::Closed => None,
    })
}

/// Before TLS, QEMU answers every option but STARTTLS with `TLS_REQD`. `Some`: how the
/// haggling ends here; `None`: the client may go on.
async fn before_tls<R, W>(
    r: &mut R,
    w: &mut W,
    greeting: Greeting,
    opt: u32,
    len: u32,
) -> io::Result<Option<Outcome>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !greeting.fixed {
        return Ok(Some(Outcome::Closed));
    }
    match opt {
        OPT_STARTTLS if len > 0 => {
            // A client that cannot start TLS properly is dropped.
            skip(r, u64::from(len)).await?;
            reply_err(
                w,
                opt,
                REP_ERR_INVALID,
                "option 'starttls' has unexpected length",
            )
            .await?;
            w.flush().await?;
            Ok(Some(Outcome::Closed))
        }
        OPT_STARTTLS => {
            reply(w, opt, REP_ACK, &[]).await?;
            w.flush().await?;
            Ok(Some(Outcome::StartTls))
        }
        // No way to answer: the connection ends.
        OPT_EXPORT_NAME => Ok(Some(Outcome::Closed)),
        _ => {
            skip(r, u64::from(len)).await?;
            let msg = format!("Option 0x{opt:x} not permitted before TLS");
            let sent = reply_err(w, opt, REP_ERR_TLS_REQD, &msg).await;
            if opt == OPT_ABORT {
                let _ = w.flush().await;
                return Ok(Some(Outcome::Closed));
            }
            sent?;
            Ok(None)
        }
    }
}

/// Haggles over options until the client picks an export, asks for TLS (`tls` is
/// `Required`) or leaves.
pub(crate) async fn options<R, W>(
    service: &NbdService,
    r: &mut R,
    w: &mut W,
    greeting: Greeting,
    tls: Tls,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Greeting { fixed, no_zeroes } = greeting;
    let mut mode = Mode::Simple;
    let mut contexts: Vec<MetaContext> = Vec::new();
    // The export the contexts were chosen on: they do not carry over to another.
    let mut contexts_of: Option<Rc<Export>> = None;
    let keep_contexts_for = |export: &Rc<Export>, of: &Option<Rc<Export>>| {
        of.as_ref().is_some_and(|e| Rc::ptr_eq(e, export))
    };
    loop {
        w.flush().await?;
        if r.read_u64().await? != IHAVEOPT {
            return Ok(Outcome::Closed);
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_BUFFER {
            return Ok(Outcome::Closed);
        }
        if tls == Tls::Required {
            match before_tls(r, w, greeting, opt, len).await? {
                Some(outcome) => return Ok(outcome),
                None => continue,
            }
        }
        // QEMU hangs up on any option but EXPORT_NAME from a client without fixed
        // newstyle.
        if !fixed && opt != OPT_EXPORT_NAME {
            return Ok(Outcome::Closed);
        }
        if opt == OPT_ABORT {
            // Whatever its payload: acknowledged, and the connection ends.
            let _ = reply(w, opt, REP_ACK, &[]).await;
            let _ = w.flush().await;
            return Ok(Outcome::Closed);
        }
        // Options that take no payload: one is refused without holding it.
        let empty_only = matches!(
            opt,
            OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS
        );
        let parsed = matches!(
            opt,
            OPT_EXPORT_NAME | OPT_INFO | OPT_GO | OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT
        );
        if len > 0 && (empty_only || !parsed) || len > MAX_OPTION {
            skip(r, u64::from(len)).await?;
            if empty_only {
                let msg = format!("option '{}' has unexpected length", opt_name(opt));
                reply_err(w, opt, REP_ERR_INVALID, &msg).await?;
            } else if parsed {
                // Longer than any well-formed option of its kind: refused unread, where
                // QEMU would read it all.
                reply_err(w, opt, REP_ERR_TOO_BIG, "option payload too long").await?;
            } else {
                let msg = format!("Unsupported option {opt} ({})", opt_name(opt));
                reply_err(w, opt, REP_ERR_UNSUP, &msg).await?;
            }
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                // A C string, as QEMU reads it: a NUL ends the name.
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                let name = String::from_utf8_lossy(&data[..end]).into_owned();
                // Its reply has no room for the framing extended headers need: QEMU hangs up.
                if mode >= Mode::Extended {
                    return Ok(Outcome::Closed);
                }
                let Some(export) = service.export_by_name(&name) else {
                    return Ok(Outcome::Closed);
                };
                if !keep_contexts_for(&export, &contexts_of) {
                    contexts.clear();
                }
                let mut buf = Vec::with_capacity(134);
                buf.extend_from_slice(&export.node().len().to_be_bytes());
                let flags = transmission_flags(&export, mode, !contexts.is_empty());
                buf.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&buf).await?;
                w.flush().await?;
                return Ok(Outcome::Session(Session {
                    export,
                    mode,
                    contexts,
                }));
            }
            OPT_LIST => {
                for e in service.exports() {
                    let mut payload = Vec::new();
                    payload.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    payload.extend_from_slice(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        payload.extend_from_slice(d.as_bytes());
                    }
                    reply(w, opt, REP_SERVER, &payload).await?;
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS if tls == Tls::Done => {
                reply_err(w, opt, REP_ERR_INVALID, "TLS already enabled").await?;
            }
            OPT_STARTTLS => {
                reply_err(w, opt, REP_ERR_POLICY, "TLS not configured").await?;
            }
            OPT_STRUCTURED_REPLY | OPT_EXTENDED_HEADERS => {
                let refusal = if mode >= Mode::Extended {
                    // Asking for less than extended headers after them is a protocol
                    // error of its own.
                    let ty = if opt == OPT_STRUCTURED_REPLY {
                        REP_ERR_EXT_HEADER_REQD
                    } else {
                        REP_ERR_INVALID
                    };
                    Some((ty, "extended headers already negotiated"))
                } else if opt == OPT_STRUCTURED_REPLY && mode >= Mode::Structured {
                    Some((REP_ERR_INVALID, "structured reply already negotiated"))
                } else {
                    None
                };
                match refusal {
                    Some((ty, msg)) => reply_err(w, opt, ty, msg).await?,
                    None => {
                        mode = if opt == OPT_STRUCTURED_REPLY {
                            Mode::Structured
                        } else {
                            Mode::Extended
                        };
                        reply(w, opt, REP_ACK, &[]).await?;
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                let mut at = 0;
                let parsed = (|| {
                    let nlen = take_u32(&data, &mut at)? as usize;
                    let name = take_str(&data, &mut at, nlen)?;
                    let n = take_u16(&data, &mut at)?;
                    let mut reqs = Vec::new();
                    for _ in 0..n {
                        reqs.push(take_u16(&data, &mut at)?);
                    }
                    (at == data.len()).then_some((name, reqs))
                })();
                if parsed.as_ref().is_some_and(|(name, _)| name.contains('\0')) {
                    let what = if opt == OPT_GO { "go" } else { "info" };
                    let msg = format!("Unexpected embedded NUL in option {what}");
                    reply_err(w, opt, REP_ERR_INVALID, &msg).await?;
                    continue;
                }
                let Some((export, reqs)) = export_for(service, w, opt, parsed).await? else {
                    continue;
                };
                if opt == OPT_GO && !keep_contexts_for(&export, &contexts_of) {
                    contexts.clear();
                }
                if reqs.contains(&INFO_NAME) {
                    let mut p = INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(export.name.as_bytes());
                    reply(w, opt, REP_INFO, &p).await?;
                }
                if reqs.contains(&INFO_DESCRIPTION)
                    && let Some(d) = &export.description
                {
                    let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    p.extend_from_slice(d.as_bytes());
                    reply(w, opt, REP_INFO, &p).await?;
                }
                let min = export.node().request_alignment() as u32;
                let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                p.extend_from_slice(&min.to_be_bytes());
                p.extend_from_slice(&4096u32.max(min).to_be_bytes());
                p.extend_from_slice(&MAX_BUFFER.to_be_bytes());
                reply(w, opt, REP_INFO, &p).await?;
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&export.node().len().to_be_bytes());
                let stat_payload = !contexts.is_empty() || opt == OPT_INFO;
                let flags = transmission_flags(&export, mode, stat_payload);
                p.extend_from_slice(&flags.to_be_bytes());
                reply(w, opt, REP_INFO, &p).await?;
                reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    w.flush().await?;
                    return Ok(Outcome::Session(Session {
                        export,
                        mode,
                        contexts,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // Listing needs no structured replies; choosing does.
                if opt == OPT_SET_META_CONTEXT && mode < Mode::Structured {
                    reply_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "request option 'set meta context' when structured reply is not negotiated",
                    )
                    .await?;
                    continue;
                }
                let mut at = 0;
                let parsed = (|| {
                    let nlen = take_u32(&data, &mut at)? as usize;
                    let name = take_str(&data, &mut at, nlen)?;
                    let n = take_u32(&data, &mut at)?;
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        let qlen = take_u32(&data, &mut at)? as usize;
                        queries.push(take_str(&data, &mut at, qlen)?);
                    }
                    (at == data.len()).then_some((name, queries))
                })();
                let Some((export, queries)) = export_for(service, w, opt, parsed).await? else {
                    continue;
                };
                let mut available = vec![MetaContext::BaseAllocation];
                if export.allocation_depth {
                    available.push(MetaContext::AllocationDepth);
                }
                available.extend((0..export.bitmaps.len()).map(MetaContext::DirtyBitmap));
                let listing = opt == OPT_LIST_META_CONTEXT;
                let selected: Vec<MetaContext> = available
                    .into_iter()
                    .filter(|c| {
                        (listing && queries.is_empty())
                            || queries
                                .iter()
                                .any(|q| query_matches(q, &c.name(&export), listing))
                    })
                    .collect();
                for c in &selected {
                    let mut p = c.id().to_be_bytes().to_vec();
                    p.extend_from_slice(c.name(&export).as_bytes());
                    reply(w, opt, REP_META_CONTEXT, &p).await?;
                }
                if opt == OPT_SET_META_CONTEXT {
                    contexts = selected;
                    contexts_of = Some(export);
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            _ => {
                let msg = format!("Unsupported option {opt} ({})", opt_name(opt));
                reply_err(w, opt, REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
}

/// An export name as an error reply quotes it: cut at 80 bytes, with "..." after (a
/// client may send 4 KiB of name; QEMU's server cuts it the same way).
fn sanitize_name(name: &str) -> String {
    if name.len() < 80 {
        return name.to_owned();
    }
    let mut end = 80;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &name[..end])
}
