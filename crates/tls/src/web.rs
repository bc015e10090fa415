//! TLS to web servers, for the `https` block driver (QEMU: libcurl over GnuTLS): the
//! server's certificate chains to the system's trusted CAs and names the URL's host, or,
//! with `sslverify=off`, nothing of it is checked. Refusals are in libcurl's words.
//!
//! The trusted CAs are read once from `SSL_CERT_FILE` when it is set, else from the
//! system's bundle (Debian's `/etc/ssl/certs/ca-certificates.crt`, and the other usual
//! places).

use crate::creds::provider;
use crate::peer::ServerCertJudge;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::io::{AsyncRead, AsyncWrite};
use x509_parser::prelude::*;

/// A connection to a web server, secured.
pub type WebStream<S> = tokio_rustls::client::TlsStream<S>;

/// Where systems keep their trusted CAs, in the order looked at.
const CA_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The system's trusted CAs, read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let from_env = std::env::var("SSL_CERT_FILE").ok();
            let bundle = from_env
                .iter()
                .map(String::as_str)
                .chain(CA_BUNDLES)
                .find_map(|path| std::fs::read(path).ok());
            if let Some(pem) = bundle {
                let certs = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
                store.add_parsable_certificates(certs);
            }
            Arc::new(store)
        })
        .clone()
}

/// The TLS set-up of one node's connections, made once: their sessions resume one another
/// (FTPS servers may ask that the data connections resume the control connection's).
pub struct WebTls {
    config: Arc<ClientConfig>,
    /// The certificate the last server showed (for a refusal's text).
    shown: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl WebTls {
    /// With `verify`, a server's certificate must chain to a trusted CA and name the host.
    ///
    /// # Errors
    /// The trusted CAs cannot be used.
    pub fn new(verify: bool) -> Result<WebTls, String> {
        let shown = Arc::new(Mutex::new(None));
        let verifier: Arc<dyn ServerCertVerifier> = if verify {
            let inner = WebPkiServerVerifier::builder_with_provider(system_roots(), provider())
                .build()
                .map_err(|e| format!("error setting certificate verify locations: {e}"))?;
            Arc::new(Remembering {
                inner,
                shown: shown.clone(),
            })
        } else {
            // A judge without trust checks only the handshake's signatures.
            Arc::new(ServerCertJudge::default())
        };
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("gnutls_handshake() failed: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(WebTls {
            config: Arc::new(config),
            shown,
        })
    }

    /// Runs the handshake with the server `host` on `stream`.
    ///
    /// # Errors
    /// libcurl's texts (over GnuTLS): "server certificate verification failed. ...", "SSL:
    /// certificate subject name (x) does not match target host name 'y'",
    /// "gnutls_handshake() failed: ...".
    pub async fn connect<S>(&self, stream: S, host: &str) -> Result<WebStream<S>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // An address is checked as one, and sent as no name (SNI carries host names only).
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_owned())
                .map_err(|_| format!("gnutls_handshake() failed: bad host name '{host}'"))?,
        };
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
            .map_err(|e| refusal(&e, host, &self.shown))
    }
}

/// libcurl's words for a failed handshake.
fn refusal(e: &io::Error, host: &str, shown: &Mutex<Option<CertificateDer<'static>>>) -> String {
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => {
            let cert = shown.lock().ok().and_then(|c| c.clone());
            let cn = cert
                .as_ref()
                .and_then(|c| common_name(c))
                .unwrap_or_default();
            format!("SSL: certificate subject name ({cn}) does not match target host name '{host}'")
        }
        Some(rustls::Error::InvalidCertificate(_)) => {
            "server certificate verification failed. CAfile: none CRLfile: none".into()
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "gnutls_handshake() failed: An unexpected TLS packet was received.".into()
        }
        Some(other) => format!("gnutls_handshake() failed: {other}"),
        None => "gnutls_handshake() failed: The TLS connection was non-properly terminated.".into(),
    }
}

/// The first common name of the certificate's subject.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    parsed
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok().map(str::to_owned))
}

/// The web PKI's verifier, keeping the certificate the server showed for the refusal's text.
#[derive(Debug)]
struct Remembering {
    inner: Arc<WebPkiServerVerifier>,
    shown: Arc<Mutex<Option<CertificateDer<'static>>>>,
}

impl ServerCertVerifier for Remembering {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut s) = self.shown.lock() {
            *s = Some(end_entity.clone().into_owned());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
