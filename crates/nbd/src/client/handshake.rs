//! The client's side of the handshake (QEMU: `nbd/client.c`): fixed newstyle, extended
//! headers or else structured replies, one meta context, and `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME` from a server without it), with QEMU's texts for what goes wrong.

use crate::proto::*;
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The option reply magic.
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The largest minimum block size a server may ask for.
const MAX_MIN_BLOCK: u32 = 64 << 10;
/// Holes are all-zero for `base:allocation`.
const BASE_ALLOCATION: &str = "base:allocation";

/// How replies are framed after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Framing {
    Simple,
    Structured,
    Extended,
}

/// What the handshake settled.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub(crate) framing: Framing,
    pub(crate) size: u64,
    pub(crate) flags: u16,
    pub(crate) min_block: u32,
    pub(crate) max_block: u32,
    /// The id of the meta context block status answers for, if the server has it.
    pub(crate) context: Option<u32>,
}

/// A handshake failure: the connection failing, or the server refusing (QEMU's text).
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Io(io::Error),
    /// No connection could be made (resolution, refusal...), in QEMU's words.
    Connect(ferrite_socket::Error),
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

type Result<T> = std::result::Result<T, HandshakeError>;

fn refused<T>(text: impl Into<String>) -> Result<T> {
    Err(HandshakeError::Refused(text.into()))
}

struct OptionReply {
    ty: u32,
    data: Vec<u8>,
}

async fn send_option<W: AsyncWrite + Unpin>(w: &mut W, option: u32, data: &[u8]) -> Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg).await?;
    w.flush().await?;
    Ok(())
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut R, option: u32) -> Result<OptionReply> {
    let magic = r.read_u64().await?;
    if magic != OPTION_REPLY_MAGIC {
        return refused(format!("Unexpected option reply magic {magic:#x}"));
    }
    let opt = r.read_u32().await?;
    if opt != option {
        return refused(format!("Unexpected option type {opt} (expected {option})"));
    }
    let ty = r.read_u32().await?;
    let len = r.read_u32().await?;
    if len > MAX_OPTION {
        return refused(format!("server's option reply of {len} bytes is too long"));
    }
    let mut data = vec![0u8; len as usize];
    r.read_exact(&mut data).await?;
    Ok(OptionReply { ty, data })
}

/// The server's error reply to an option, in QEMU's words where it has them.
fn option_error(option: &str, reply: &OptionReply) -> String {
    let msg = String::from_utf8_lossy(&reply.data);
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(": {msg}")
    };
    match reply.ty {
        REP_ERR_UNKNOWN => "Requested export not available".to_owned(),
        // The server wants TLS first: QEMU's words, which name the option by number.
        REP_ERR_TLS_REQD => "TLS negotiation required before option 7 (go)".to_owned(),
        REP_ERR_POLICY => format!("Server refused the option {option} by policy{detail}"),
        REP_ERR_INVALID => format!("Server considers the option {option} invalid{detail}"),
        _ => format!(
            "Server rejected the option {option} ({:#x}){detail}",
            reply.ty
        ),
    }
}

/// Asks for extended headers, then for structured replies where they are not offered.
async fn negotiate_framing<R, W>(r: &mut R, w: &mut W) -> Result<Framing>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    for (option, framing) in [
        (OPT_EXTENDED_HEADERS, Framing::Extended),
        (OPT_STRUCTURED_REPLY, Framing::Structured),
    ] {
        send_option(w, option, &[]).await?;
        let reply = read_reply(r, option).await?;
        if reply.ty == REP_ACK {
            return Ok(framing);
        }
    }
    Ok(Framing::Simple)
}

/// An option's data starting with the export name (length first).
fn named(export: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + export.len() + 16);
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data
}

/// Sets the one meta context block status answers for; `None` when the server lacks it.
async fn negotiate_context<R, W>(
    r: &mut R,
    w: &mut W,
    export: &str,
    context: &str,
) -> Result<Option<u32>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut data = named(export);
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&(context.len() as u32).to_be_bytes());
    data.extend_from_slice(context.as_bytes());
    send_option(w, OPT_SET_META_CONTEXT, &data).await?;
    let mut id = None;
    loop {
        let reply = read_reply(r, OPT_SET_META_CONTEXT).await?;
        match reply.ty {
            REP_META_CONTEXT if reply.data.len() >= 4 => {
                let name = String::from_utf8_lossy(&reply.data[4..]);
                if name == context {
                    id = Some(u32::from_be_bytes([
                        reply.data[0],
                        reply.data[1],
                        reply.data[2],
                        reply.data[3],
                    ]));
                }
            }
            REP_ACK => return Ok(id),
            ty if ty & (1 << 31) != 0 => return Ok(None),
            _ => return refused("Unexpected reply to NBD_OPT_SET_META_CONTEXT"),
        }
    }
}

/// `NBD_OPT_GO`: the export's size, flags and block sizes; `None` from a server that does
/// not know the option.
async fn go<R, W>(r: &mut R, w: &mut W, export: &str) -> Result<Option<(u64, u16, u32, u32)>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut data = named(export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(w, OPT_GO, &data).await?;
    let (mut size, mut flags) = (None, 0u16);
    let (mut min, mut max) = (1u32, MAX_BUFFER);
    loop {
        let reply = read_reply(r, OPT_GO).await?;
        let d = &reply.data;
        match reply.ty {
            REP_INFO if d.len() >= 2 => match u16::from_be_bytes([d[0], d[1]]) {
                INFO_EXPORT if d.len() >= 12 => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap_or_default()));
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                INFO_BLOCK_SIZE if d.len() >= 14 => {
                    min = u32::from_be_bytes(d[2..6].try_into().unwrap_or_default());
                    max = u32::from_be_bytes(d[10..14].try_into().unwrap_or_default());
                    // QEMU's checks: a power of two up to 64 KiB, and a maximum that is a
                    // multiple of it.
                    if !min.is_power_of_two() || min > MAX_MIN_BLOCK {
                        return refused(format!("server minimum block size {min} is not valid"));
                    }
                    if max < min || max % min != 0 {
                        return refused(format!(
                            "server maximum block size {max} is not a multiple of the \
                             minimum {min}"
                        ));
                    }
                }
                _ => {}
            },
            REP_ACK => {
                let Some(size) = size else {
                    return refused("Server did not send export size");
                };
                // Requests are split at 32 MiB whatever the server takes.
                let max = max.min(MAX_BUFFER / min * min);
                return Ok(Some((size, flags, min, max)));
            }
            REP_ERR_UNSUP => return Ok(None),
            ty if ty & (1 << 31) != 0 => return refused(option_error("NBD_OPT_GO", &reply)),
            _ => {}
        }
    }
}

/// What the server's greeting offered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offer {
    /// Fixed newstyle: options may be refused and others tried.
    fixed: bool,
    /// The zeroes after an `EXPORT_NAME` reply are left out.
    no_zeroes: bool,
}

/// Reads the server's greeting and answers it.
pub(crate) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<Offer>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let magic = r.read_u64().await?;
    if magic != NBDMAGIC {
        return refused(format!("Bad initial magic received: {magic:#x}"));
    }
    let style = r.read_u64().await?;
    if style != IHAVEOPT {
        return refused("Server using oldstyle negotiation");
    }
    let server_flags = r.read_u16().await?;
    let mut client_flags = 0u32;
    if server_flags & FLAG_FIXED_NEWSTYLE != 0 {
        client_flags |= FLAG_C_FIXED_NEWSTYLE;
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    if no_zeroes {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    w.write_all(&client_flags.to_be_bytes()).await?;
    w.flush().await?;
    Ok(Offer {
        fixed: server_flags & FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes,
    })
}

/// Asks the server to start TLS (`NBD_OPT_STARTTLS`); on `Ok` the TLS handshake follows.
pub(crate) async fn start_tls<R, W>(r: &mut R, w: &mut W, offer: Offer) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !offer.fixed {
        return refused("Server does not support STARTTLS");
    }
    send_option(w, OPT_STARTTLS, &[]).await?;
    let reply = read_reply(r, OPT_STARTTLS).await?;
    let refusal = match reply.ty {
        REP_ACK => return Ok(()),
        REP_ERR_UNSUP => "Server don't support STARTTLS option",
        REP_ERR_POLICY => "Denied by server for option 5 (starttls)",
        REP_ERR_INVALID => "Invalid parameters for option 5 (starttls)",
        REP_ERR_PLATFORM => "Server lacks support for option 5 (starttls)",
        _ => "Unknown error code when asking for option 5 (starttls)",
    };
    // As QEMU's client: the server is told the haggling is over.
    let _ = send_option(w, OPT_ABORT, &[]).await;
    refused(refusal)
}

/// Runs the rest of the handshake for `export`, with block status from `context`
/// (`base:allocation` unless a dirty bitmap is read through it).
pub(crate) async fn negotiate<R, W>(
    r: &mut R,
    w: &mut W,
    offer: Offer,
    export: &str,
    bitmap: Option<&str>,
) -> Result<Negotiated>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Offer { fixed, no_zeroes } = offer;
    if export.len() > MAX_STRING {
        return refused("export name too long to send to server");
    }
    let framing = if fixed {
        negotiate_framing(r, w).await?
    } else {
        Framing::Simple
    };
    let context_name = bitmap.unwrap_or(BASE_ALLOCATION);
    let context = if framing >= Framing::Structured {
        negotiate_context(r, w, export, context_name).await?
    } else {
        None
    };
    if let Some(b) = bitmap {
        if context.is_none() {
            return refused(format!("requested x-dirty-bitmap {b} not found"));
        }
    }
    let answered = if fixed { go(r, w, export).await? } else { None };
    let (size, flags, min_block, max_block) = match answered {
        Some(a) => a,
        None => {
            send_option(w, OPT_EXPORT_NAME, export.as_bytes()).await?;
            let size = r.read_u64().await?;
            let flags = r.read_u16().await?;
            if !no_zeroes {
                let mut zeroes = [0u8; 124];
                r.read_exact(&mut zeroes).await?;
            }
            (size, flags, 1, MAX_BUFFER)
        }
    };
    Ok(Negotiated {
        framing,
        size,
        flags,
        min_block,
        max_block,
        context,
    })
}
