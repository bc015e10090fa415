//! One connection to a web server: made (resolved, connected, secured), then HTTP/1.1
//! requests on it one after the other, their replies' heads parsed and bodies read by their
//! framing (a length, chunks, or the connection's end).

use crate::error::{Failure, Phase};
use crate::proxy::Proxy;
use crate::url::{Scheme, Url};
use ferrite_block::io::pool;
use ferrite_qapi::os_msg;
use ferrite_tls::WebTls;
use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The longest head a reply may have.
const MAX_HEAD: usize = 100 << 10;
/// The most read from the connection into one piece of a body.
const PIECE: usize = 256 << 10;

/// A connection's byte stream, plain or secured.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<ferrite_tls::WebStream<TcpStream>>),
}

impl Stream {
    /// `tcp` secured by a TLS handshake with `host`.
    pub(crate) async fn secure(
        tcp: TcpStream,
        tls: &WebTls,
        host: &str,
    ) -> Result<Stream, Failure> {
        let secured = tls.connect(tcp, host).await.map_err(Failure::Tls)?;
        Ok(Stream::Tls(Box::new(secured)))
    }
}

/// Resolves `host` and connects to the first of its addresses that takes the connection
/// (`proxy`: the host is a proxy, as failures say).
pub(crate) async fn dial(
    host: &str,
    port: u16,
    phase: &Cell<Phase>,
    proxy: bool,
) -> Result<TcpStream, Failure> {
    let started = Instant::now();
    phase.set(Phase::Resolving);
    let unresolved = || match proxy {
        true => Failure::ResolveProxy(host.to_owned()),
        false => Failure::Resolve(host.to_owned()),
    };
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|_| unresolved())?
        .collect();
    if addrs.is_empty() {
        return Err(unresolved());
    }
    phase.set(Phase::Connecting);
    for addr in addrs {
        if let Ok(s) = TcpStream::connect(addr).await {
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
    }
    Err(Failure::Connect {
        host: host.to_owned(),
        port,
        after: started.elapsed(),
    })
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A reply's status and head.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    /// Names in lower case, in the order received.
    headers: Vec<(String, String)>,
    /// HTTP/1.0: the connection ends after the reply unless it says otherwise.
    http10: bool,
}

impl Reply {
    /// The first header of this name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, when there is one that reads as a number.
    pub(crate) fn content_length(&self) -> Option<u64> {
        self.header("content-length")?.trim().parse().ok()
    }

    /// Whether the server says it takes byte ranges (`Accept-Ranges: bytes`, exactly that).
    pub(crate) fn accepts_ranges(&self) -> bool {
        self.header("accept-ranges")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("bytes"))
    }

    /// Where a redirection leads, if this is one.
    pub(crate) fn redirection(&self) -> Option<&str> {
        matches!(self.status, 301 | 302 | 303 | 307 | 308)
            .then(|| self.header("location"))
            .flatten()
    }

    fn keeps_alive(&self) -> bool {
        let connection = self.header("connection").unwrap_or("");
        let says = |token: &str| {
            connection
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        };
        if self.http10 {
            says("keep-alive")
        } else {
            !says("close")
        }
    }

    /// How the body is framed; a reply to HEAD has none.
    pub(crate) fn framing(&self, head: bool) -> Framing {
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if head || self.status < 200 || self.status == 204 || self.status == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = self.content_length() {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        }
    }
}

/// How a reply's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A connection to a server.
pub(crate) struct Conn {
    io: BufReader<Stream>,
    /// Where it leads (scheme, host, port; the target is that of the last request).
    pub(crate) origin: Url,
    /// The proxy it goes through.
    pub(crate) via: Option<Proxy>,
    /// Whether another request may follow the last reply on it.
    reusable: bool,
}

impl Conn {
    /// Connects to `url`'s server (or its proxy) and, for `https`, runs the TLS handshake,
    /// through a `CONNECT` tunnel when there is a proxy (`proxy`: it, and the request).
    pub(crate) async fn open(
        url: &Url,
        tls: &WebTls,
        phase: &Cell<Phase>,
        proxy: Option<(&Proxy, &str)>,
    ) -> Result<Conn, Failure> {
        let tcp = match proxy {
            Some((p, _)) => dial(&p.host, p.port, phase, true).await?,
            None => dial(&url.host, url.port, phase, false).await?,
        };
        let conn = |stream| Conn {
            io: BufReader::with_capacity(64 << 10, stream),
            origin: url.clone(),
            via: proxy.map(|(p, _)| p.clone()),
            reusable: true,
        };
        let stream = match (url.scheme, proxy) {
            (Scheme::Https, tunnel) => {
                let tcp = match tunnel {
                    Some((_, request)) => {
                        let mut c = conn(Stream::Plain(tcp));
                        let reply = c.round_trip(request).await?;
                        match reply.status {
                            200..300 => {}
                            // libcurl's failure on an error status, as for any request.
                            407 => return Err(Failure::Status(407)),
                            other => return Err(Failure::Tunnel(other)),
                        }
                        match c.io.into_inner() {
                            Stream::Plain(tcp) => tcp,
                            Stream::Tls(_) => return Err(Failure::Tunnel(reply.status)),
                        }
                    }
                    None => tcp,
                };
                Stream::secure(tcp, tls, &url.host).await?
            }
            _ => Stream::Plain(tcp),
        };
        phase.set(Phase::Transferring {
            received: 0,
            total: None,
        });
        Ok(conn(stream))
    }

    /// Whether another request may be sent on it.
    pub(crate) fn reusable(&self) -> bool {
        self.reusable
    }

    /// Sends a request's head and reads the reply's (skipping interim `1xx` replies).
    pub(crate) async fn round_trip(&mut self, request: &str) -> Result<Reply, Failure> {
        self.reusable = false;
        let w = self.io.get_mut();
        w.write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::Send(os_msg(&e)))?;
        w.flush().await.map_err(|e| Failure::Send(os_msg(&e)))?;
        loop {
            let reply = self.read_head().await?;
            if !(100..200).contains(&reply.status) {
                self.reusable = reply.keeps_alive();
                return Ok(reply);
            }
        }
    }

    async fn read_head(&mut self) -> Result<Reply, Failure> {
        let mut status_line = Vec::new();
        let n = self.read_line(&mut status_line, 0).await?;
        if n == 0 {
            return Err(Failure::EmptyReply);
        }
        let line = String::from_utf8_lossy(&status_line);
        let mut words = line.split_whitespace();
        let version = words.next().unwrap_or("");
        let http10 = match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            v if v.starts_with("HTTP/") => return Err(Failure::Weird),
            _ => return Err(Failure::NotHttp),
        };
        let status = words
            .next()
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..1000).contains(s))
            .ok_or(Failure::Weird)?;
        let mut headers = Vec::new();
        let mut total = n;
        loop {
            let mut raw = Vec::new();
            let n = self.read_line(&mut raw, total).await?;
            if n == 0 {
                return Err(Failure::Recv(
                    "Connection closed within the reply's head".into(),
                ));
            }
            total += n;
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end_matches(['\r', '\n']);
            if text.is_empty() {
                break;
            }
            if let Some((name, value)) = text.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        Ok(Reply {
            status,
            headers,
            http10,
        })
    }

    /// One line, its end included; 0 at the connection's end.
    async fn read_line(&mut self, out: &mut Vec<u8>, so_far: usize) -> Result<usize, Failure> {
        let limit = (MAX_HEAD.saturating_sub(so_far) + 1) as u64;
        let n = (&mut self.io)
            .take(limit)
            .read_until(b'\n', out)
            .await
            .map_err(|e| Failure::Recv(os_msg(&e)))?;
        if so_far + n > MAX_HEAD {
            return Err(Failure::Recv("reply head too large".into()));
        }
        Ok(n)
    }

    /// Reads the body framed by `framing`, giving it to `sink` piece by piece as it arrives
    /// and counting it in `phase`. `sink` says how much more it wants; once it wants no
    /// more, the rest is left unread and the connection is not used again.
    pub(crate) async fn read_body(
        &mut self,
        framing: Framing,
        phase: &Cell<Phase>,
        sink: &mut dyn FnMut(Vec<u8>) -> u64,
    ) -> Result<(), Failure> {
        let total = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let mut received = 0u64;
        let mut count = |n: u64| {
            received += n;
            phase.set(Phase::Transferring { received, total });
        };
        let reusable = self.reusable;
        self.reusable = false;
        match framing {
            Framing::Length(n) => {
                if self.copy(n, &mut count, sink).await? < n {
                    return Ok(());
                }
            }
            Framing::Chunked => loop {
                let mut line = Vec::new();
                if self.read_line(&mut line, 0).await? == 0 {
                    return Err(Failure::Recv(
                        "connection closed within a chunked body".into(),
                    ));
                }
                let text = String::from_utf8_lossy(&line);
                let size = text.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size, 16)
                    .map_err(|_| Failure::Recv("bad chunk size in the body".into()))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let mut t = Vec::new();
                        if self.read_line(&mut t, 0).await? == 0 || t.trim_ascii().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                if self.copy(size, &mut count, sink).await? < size {
                    return Ok(());
                }
                let mut crlf = Vec::new();
                self.read_line(&mut crlf, 0).await?;
            },
            Framing::UntilClose => {
                self.copy(u64::MAX, &mut count, sink).await?;
                return Ok(());
            }
        }
        self.reusable = reusable;
        Ok(())
    }

    /// Up to `n` bytes to `sink`, stopping early when it wants no more or, with `n` of
    /// `u64::MAX`, at the connection's end. Returns how many were read.
    async fn copy(
        &mut self,
        n: u64,
        count: &mut dyn FnMut(u64),
        sink: &mut dyn FnMut(Vec<u8>) -> u64,
    ) -> Result<u64, Failure> {
        let mut done = 0u64;
        while done < n {
            // What the reader already holds first, then straight from the connection.
            let buffered = self.io.buffer();
            let piece = if buffered.is_empty() {
                let want = (n - done).min(PIECE as u64) as usize;
                let mut piece = pool::take(want);
                let got = self
                    .io
                    .get_mut()
                    .read(&mut piece)
                    .await
                    .map_err(|e| Failure::Recv(os_msg(&e)))?;
                if got == 0 {
                    pool::give(piece);
                    if n == u64::MAX {
                        break;
                    }
                    return Err(Failure::Short(n - done));
                }
                piece.truncate(got);
                piece
            } else {
                let take = buffered
                    .len()
                    .min((n - done).min(usize::MAX as u64) as usize);
                let piece = pool::copy_of(&buffered[..take]);
                self.io.consume(take);
                piece
            };
            done += piece.len() as u64;
            count(piece.len() as u64);
            if sink(piece) == 0 {
                break;
            }
        }
        Ok(done)
    }
}
