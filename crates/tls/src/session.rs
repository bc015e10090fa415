//! A TLS session on a connected stream (QEMU: `io/channel-tls.c`, `crypto/tlssession.c`):
//! the handshake, then the peer judged by `peer.rs` (x509 credentials; QEMU judges nothing
//! of a PSK peer beyond the handshake itself).

use crate::peer::{self, ServerCertJudge};
use crate::tls13::{self, PskStream};
use crate::{AuthzLookup, Endpoint, PskCreds, X509Creds};
use rustls::pki_types::ServerName;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS credentials of any kind a session takes.
#[derive(Debug)]
pub enum Creds {
    /// `tls-creds-x509`.
    X509(Box<X509Creds>),
    /// `tls-creds-psk`.
    Psk(PskCreds),
}

impl Creds {
    /// The end they are for.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Creds::X509(c) => c.endpoint(),
            Creds::Psk(c) => c.endpoint(),
        }
    }
}

/// An established session: rustls's (x509) or ferrite's own (PSK).
pub enum TlsStream<S> {
    /// A server's x509 session.
    Server(Box<tokio_rustls::server::TlsStream<S>>),
    /// A client's x509 session.
    Client(Box<tokio_rustls::client::TlsStream<S>>),
    /// A PSK session, either end.
    Psk(Box<PskStream<S>>),
}

/// The server's end of a session.
pub type ServerStream<S> = TlsStream<S>;
/// The client's end of a session.
pub type ClientStream<S> = TlsStream<S>;

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            TlsStream::Psk(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            TlsStream::Psk(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TlsStream::Psk(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TlsStream::Psk(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Runs the server's handshake on `stream` and judges the client: its certificate, and its
/// name by the authorization object `authz` (an id found through `lookup`).
///
/// A client refused after the handshake is cut off at once (a reset, as QEMU's server
/// closing on what the client already sent).
///
/// # Errors
/// QEMU's texts: "TLS handshake failed: ..." or the check that refused.
pub async fn accept<S>(
    creds: &Creds,
    stream: S,
    authz: Option<(&str, &AuthzLookup)>,
) -> Result<ServerStream<S>, String>
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin,
{
    let creds = match creds {
        Creds::X509(c) => c,
        Creds::Psk(c) if c.endpoint() == Endpoint::Server => {
            let psk = tls13::accept(stream, |id| c.key_of(id))
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            return Ok(TlsStream::Psk(Box::new(psk)));
        }
        Creds::Psk(_) => return Err("Credentials endpoint doesn't match session".into()),
    };
    let config = creds
        .server()
        .ok_or("Credentials endpoint doesn't match session")?;
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
    if let Err(refusal) = peer::check(creds.trust(), certs, authz, None) {
        cut_off(tls).await;
        return Err(refusal);
    }
    Ok(TlsStream::Server(Box::new(tls)))
}

/// Ends a refused client's connection as QEMU's server does: QEMU judges the client when
/// its first request is already on the way and closes the socket with it unread, so the
/// client learns of the refusal as a reset when it reads the answer. The request is waited
/// for (a second at most), left unread, and the socket closed.
async fn cut_off<S>(tls: tokio_rustls::server::TlsStream<S>)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin,
{
    if let Ok(fd) = tls.get_ref().0.as_fd().try_clone_to_owned() {
        let _ = tokio::task::spawn_blocking(move || {
            let mut polled = [rustix::event::PollFd::new(
                &fd,
                rustix::event::PollFlags::IN,
            )];
            let second = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let _ = rustix::event::poll(&mut polled, Some(&second));
        })
        .await;
    }
    drop(tls);
}

/// Runs the client's handshake on `stream` and judges the server's certificate, which must
/// name `hostname`.
///
/// # Errors
/// QEMU's texts: the check that refused, or "TLS handshake failed: ...".
pub async fn connect<S>(
    creds: &Creds,
    stream: S,
    hostname: Option<&str>,
) -> Result<ClientStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let creds = match creds {
        Creds::X509(c) => c,
        Creds::Psk(c) => {
            let (identity, key) = c
                .own()
                .ok_or("Credentials endpoint doesn't match session")?;
            let psk = tls13::connect(stream, identity.as_bytes(), key)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            return Ok(TlsStream::Psk(Box::new(psk)));
        }
    };
    let mut config = match creds.client() {
        Some(c) if creds.endpoint() == Endpoint::Client => c,
        _ => return Err("Credentials endpoint doesn't match session".into()),
    };
    let verdict = Arc::new(Mutex::new(None));
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(ServerCertJudge::new(
            creds.trust().clone(),
            hostname.map(str::to_owned),
            verdict.clone(),
        )));
    // The name is judged by the verifier; SNI is off, so this one is only a placeholder.
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await;
    if let Some(refusal) = verdict.lock().ok().and_then(|mut v| v.take()) {
        return Err(refusal);
    }
    result
        .map(|s| TlsStream::Client(Box::new(s)))
        .map_err(|e| format!("TLS handshake failed: {e}"))
}
