//! A TLS session on a connected stream (QEMU: `io/channel-tls.c`, `crypto/tlssession.c`):
//! the handshake, then the peer judged by `peer.rs`.

use crate::peer::{self, ServerCertJudge};
use crate::{AuthzLookup, Endpoint, X509Creds};
use rustls::pki_types::ServerName;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncWrite};

/// The server's end of a session.
pub type ServerStream<S> = tokio_rustls::server::TlsStream<S>;
/// The client's end of a session.
pub type ClientStream<S> = tokio_rustls::client::TlsStream<S>;

/// Runs the server's handshake on `stream` and judges the client: its certificate, and its
/// name by the authorization object `authz` (an id found through `lookup`).
///
/// A client refused after the handshake is cut off at once (a reset, as QEMU's server
/// closing on what the client already sent).
///
/// # Errors
/// QEMU's texts: "TLS handshake failed: ..." or the check that refused.
pub async fn accept<S>(
    creds: &X509Creds,
    stream: S,
    authz: Option<(&str, &AuthzLookup)>,
) -> Result<ServerStream<S>, String>
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin,
{
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
    Ok(tls)
}

/// Ends a refused client's connection as QEMU's server does: QEMU judges the client when
/// its first request is already on the way and closes the socket with it unread, so the
/// client learns of the refusal as a reset when it reads the answer. The request is waited
/// for (a second at most), left unread, and the socket closed.
async fn cut_off<S>(tls: ServerStream<S>)
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
    creds: &X509Creds,
    stream: S,
    hostname: Option<&str>,
) -> Result<ClientStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
    result.map_err(|e| format!("TLS handshake failed: {e}"))
}
