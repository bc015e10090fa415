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

/// What the handshake settled.
pub(crate) struct Session {
    pub(crate) export: Rc<Export>,
    pub(crate) structured: bool,
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

/// Transmission flags for an export.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
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
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
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
            &format!("export '{name}' not present"),
        )
        .await?;
        return Ok(None);
    };
    Ok(Some((export, rest)))
}

/// Runs the handshake. `Ok(None)`: the client went away or aborted.
pub(crate) async fn negotiate<R, W>(
    service: &NbdService,
    r: &mut R,
    w: &mut W,
) -> io::Result<Option<Session>>
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
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    // Without fixed newstyle the client can only name its export (QEMU hangs up on any
    // other option).
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let mut structured = false;
    let mut contexts: Vec<MetaContext> = Vec::new();
    loop {
        w.flush().await?;
        if r.read_u64().await? != IHAVEOPT {
            return Ok(None);
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION {
            // Skip what we will not hold, then refuse.
            tokio::io::copy(&mut (&mut *r).take(u64::from(len)), &mut tokio::io::sink()).await?;
            reply_err(w, opt, REP_ERR_TOO_BIG, "option payload too long").await?;
            continue;
        }
        if !fixed && opt != OPT_EXPORT_NAME {
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                // A C string, as QEMU reads it: a NUL ends the name.
                let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                let name = String::from_utf8_lossy(&data[..end]).into_owned();
                let Some(export) = service.export_by_name(&name) else {
                    return Ok(None);
                };
                let mut buf = Vec::with_capacity(134);
                buf.extend_from_slice(&export.node().len().to_be_bytes());
                buf.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&buf).await?;
                w.flush().await?;
                return Ok(Some(Session {
                    export,
                    structured,
                    contexts,
                }));
            }
            OPT_ABORT => {
                let _ = reply(w, opt, REP_ACK, &[]).await;
                let _ = w.flush().await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "no payload expected in 'list' option",
                    )
                    .await?;
                    continue;
                }
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
            OPT_STARTTLS => {
                reply_err(w, opt, REP_ERR_POLICY, "TLS not configured").await?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_err(w, opt, REP_ERR_INVALID, "no payload expected in option").await?;
                } else if structured {
                    reply_err(
                        w,
                        opt,
                        REP_ERR_INVALID,
                        "structured reply already negotiated",
                    )
                    .await?;
                } else {
                    structured = true;
                    reply(w, opt, REP_ACK, &[]).await?;
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
                p.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                reply(w, opt, REP_INFO, &p).await?;
                reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    w.flush().await?;
                    return Ok(Some(Session {
                        export,
                        structured,
                        contexts,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // Listing needs no structured replies; choosing does.
                if opt == OPT_SET_META_CONTEXT && !structured {
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
                }
                reply(w, opt, REP_ACK, &[]).await?;
            }
            _ => {
                reply_err(
                    w,
                    opt,
                    REP_ERR_UNSUP,
                    &format!("Unsupported option {opt:#x}"),
                )
                .await?;
            }
        }
    }
}
