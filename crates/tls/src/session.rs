//! A TLS session on a connected stream (QEMU: `io/channel-tls.c`, `crypto/tlssession.c`):
//! the handshake, then the peer judged by `peer.rs` (x509 credentials; QEMU judges nothing
//! of a PSK peer beyond the handshake itself).

use crate::peer::{self, ServerCertJudge};
use crate::priority::{self, Kind, Priority};
use crate::record::OwnTlsStream;
use crate::{AnonCreds, AuthzLookup, Endpoint, PskCreds, X509Creds, tls12, tls13};
use rustls::pki_types::ServerName;
use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS credentials of any kind a session takes, and the priority string its sessions use.
#[derive(Debug)]
pub struct Creds {
    kind: CredsKind,
    /// The object's `priority`; QEMU reads it at each session, so a new value counts from
    /// the next one.
    priority: RefCell<Option<String>>,
}

/// The kinds of credentials.
#[derive(Debug)]
pub enum CredsKind {
    /// `tls-creds-x509`.
    X509(Box<X509Creds>),
    /// `tls-creds-psk`.
    Psk(PskCreds),
    /// `tls-creds-anon`.
    Anon(AnonCreds),
}

impl Creds {
    /// Credentials whose sessions use `priority` (GnuTLS's syntax; QEMU's default when
    /// `None`); x509 credentials keep the one they were loaded with.
    pub fn new(kind: CredsKind, priority: Option<String>) -> Creds {
        let priority = match &kind {
            CredsKind::X509(c) => c.options().priority.clone(),
            _ => priority,
        };
        Creds {
            kind,
            priority: RefCell::new(priority),
        }
    }

    /// Which kind they are.
    pub fn kind(&self) -> &CredsKind {
        &self.kind
    }

    /// The end they are for.
    pub fn endpoint(&self) -> Endpoint {
        match &self.kind {
            CredsKind::X509(c) => c.endpoint(),
            CredsKind::Psk(c) => c.endpoint(),
            CredsKind::Anon(c) => c.endpoint(),
        }
    }

    /// The priority string the next session uses, as set.
    pub fn priority(&self) -> Option<String> {
        self.priority.borrow().clone()
    }

    /// Sets the priority string of the sessions to come.
    pub fn set_priority(&self, priority: Option<String>) {
        *self.priority.borrow_mut() = priority;
    }

    /// The priority a session starts with, as QEMU sets it (`crypto/tlssession.c`): the
    /// object's or the default, with what QEMU adds for PSK and anonymous credentials;
    /// a string GnuTLS refuses, refused in QEMU's words.
    fn session_priority(&self) -> Result<Priority, String> {
        let own = self.priority();
        let base = own.as_deref().unwrap_or(priority::DEFAULT);
        let (full, refused) = match &self.kind {
            CredsKind::X509(_) => (base.to_owned(), "Cannot set default TLS session priority"),
            CredsKind::Psk(_) => (
                format!("{base}:+ECDHE-PSK:+DHE-PSK:+PSK"),
                "Unable to set TLS session priority",
            ),
            CredsKind::Anon(_) => (
                format!("{base}:+ANON-DH"),
                "Unable to set TLS session priority",
            ),
        };
        Priority::parse(&full).map_err(|e| format!("{refused} {full}: {e}"))
    }
}

/// The suites of ferrite's own TLS 1.3 with a PSK that `p` allows.
fn psk_suites(p: &Priority) -> Result<Vec<tls13::Suite>, String> {
    let suites = &tls13::Suite::ALL;
    own_suites(p, "TLS1.3", suites, tls13::Suite::cipher, PSK_SUITES)
}

/// The suites of ferrite's own anonymous TLS 1.2 that `p` allows.
fn anon_suites(p: &Priority) -> Result<Vec<tls12::Suite>, String> {
    let suites = &tls12::Suite::ALL;
    own_suites(p, "TLS1.2", suites, tls12::Suite::cipher, ANON_SUITES)
}

/// Of ferrite's own `suites` for `version`, those `p` allows (by cipher and the AEAD MAC),
/// or a clear refusal when it allows none: `what` says what ferrite would need.
fn own_suites<T: Copy>(
    p: &Priority,
    version: &str,
    suites: &[T],
    cipher: impl Fn(T) -> &'static str,
    what: &str,
) -> Result<Vec<T>, String> {
    let allowed: Vec<T> = if p.allows(Kind::Version, version) && p.allows(Kind::Mac, "AEAD") {
        suites
            .iter()
            .copied()
            .filter(|s| p.allows(Kind::Cipher, cipher(*s)))
            .collect()
    } else {
        Vec::new()
    };
    if allowed.is_empty() {
        return Err(format!(
            "TLS handshake failed: the TLS priority allows nothing ferrite can negotiate with \
             these credentials ({what})"
        ));
    }
    Ok(allowed)
}

const PSK_SUITES: &str = "TLS 1.3 with AES-128-GCM or CHACHA20-POLY1305";
const ANON_SUITES: &str = "TLS 1.2 with ANON-DH and AES-128-GCM or AES-256-GCM";

/// An established session: rustls's (x509) or ferrite's own (PSK, anonymous).
pub enum TlsStream<S> {
    /// A server's x509 session.
    Server(Box<tokio_rustls::server::TlsStream<S>>),
    /// A client's x509 session.
    Client(Box<tokio_rustls::client::TlsStream<S>>),
    /// A session of ferrite's own TLS, either end.
    Own(Box<OwnTlsStream<S>>),
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
            TlsStream::Own(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
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
            TlsStream::Own(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TlsStream::Own(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsStream::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TlsStream::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TlsStream::Own(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
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
    if creds.endpoint() != Endpoint::Server {
        return Err("Credentials endpoint doesn't match session".into());
    }
    let priority = creds.session_priority()?;
    let creds = match creds.kind() {
        CredsKind::X509(c) => c,
        CredsKind::Psk(c) => {
            let suites = psk_suites(&priority)?;
            let s = tls13::accept(stream, |id| c.key_of(id), &suites).await;
            return own_session(s);
        }
        CredsKind::Anon(c) => {
            let suites = anon_suites(&priority)?;
            return own_session(tls12::accept(stream, &c.group, &suites).await);
        }
    };
    let config = creds.server_for_session()?;
    let tls = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await
        .map_err(handshake_failed)?;
    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
    if let Err(refusal) = peer::check(creds.trust(), certs, authz, None, priority.profile()) {
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
    if creds.endpoint() != Endpoint::Client {
        return Err("Credentials endpoint doesn't match session".into());
    }
    let priority = creds.session_priority()?;
    let creds = match creds.kind() {
        CredsKind::X509(c) => c,
        CredsKind::Psk(c) => {
            let (identity, key) = c
                .own()
                .ok_or("Credentials endpoint doesn't match session")?;
            let suites = psk_suites(&priority)?;
            return own_session(tls13::connect(stream, identity.as_bytes(), key, &suites).await);
        }
        CredsKind::Anon(_) => {
            let suites = anon_suites(&priority)?;
            return own_session(tls12::connect(stream, &suites).await);
        }
    };
    let mut config = creds.client_for_session()?;
    let verdict = Arc::new(Mutex::new(None));
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(ServerCertJudge::new(
            creds.trust().clone(),
            hostname.map(str::to_owned),
            priority.profile(),
            creds.verify_schemes(),
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
        .map_err(handshake_failed)
}

/// A failed rustls handshake in QEMU's words; a peer that hung up midway in GnuTLS's.
fn handshake_failed(e: io::Error) -> String {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        return "TLS handshake failed: The TLS connection was non-properly terminated.".into();
    }
    format!("TLS handshake failed: {e}")
}

/// A handshake of ferrite's own TLS as a session, or its failure in QEMU's words.
fn own_session<S>(r: crate::wire::Result<OwnTlsStream<S>>) -> Result<TlsStream<S>, String> {
    r.map(|s| TlsStream::Own(Box::new(s)))
        .map_err(|e| format!("TLS handshake failed: {e}"))
}
