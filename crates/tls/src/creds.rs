//! `tls-creds-x509` (QEMU: `crypto/tlscredsx509.c`, `crypto/tlscreds.c`): the files of a
//! directory, found, checked and loaded when the object is created, in QEMU's order and
//! with its texts; then the rustls configurations a session starts from.

use crate::peer;
use crate::sanity;
use ferrite_crypto::Pkcs8Error;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::{ClientConfig, DistinguishedName, ServerConfig};
use std::sync::Arc;

/// Which end of a connection the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The end that connects.
    Client,
    /// The end that listens.
    Server,
}

impl Endpoint {
    /// Its name in QAPI.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Client => "client",
            Endpoint::Server => "server",
        }
    }
}

/// What a `tls-creds-x509` object was created with.
#[derive(Debug, Clone)]
pub struct X509Options {
    /// The directory of the files.
    pub dir: Option<String>,
    /// The end they are for.
    pub endpoint: Endpoint,
    /// Whether the peer's certificate is checked (QEMU's default: yes).
    pub verify_peer: bool,
    /// Whether the program's own certificates are checked at load (default: yes).
    pub sanity_check: bool,
    /// The password of an encrypted private key (`passwordid`'s secret), or why it could
    /// not be had: QEMU looks it up only once it reads the key.
    pub key_password: Option<Result<String, String>>,
}

pub(crate) const CA_CERT: &str = "ca-cert.pem";
const CA_CRL: &str = "ca-crl.pem";
const SERVER_CERT: &str = "server-cert.pem";
const SERVER_KEY: &str = "server-key.pem";
const CLIENT_CERT: &str = "client-cert.pem";
const CLIENT_KEY: &str = "client-key.pem";
const DH_PARAMS: &str = "dh-params.pem";

/// What the peer is judged against (shared with the verifier a client's handshake runs).
#[derive(Debug)]
pub(crate) struct Trust {
    pub(crate) endpoint: Endpoint,
    pub(crate) verify_peer: bool,
    /// The trusted CA certificates.
    pub(crate) cas: Vec<CertificateDer<'static>>,
    /// The revocation lists.
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
}

/// Loaded x509 credentials.
pub struct X509Creds {
    options: X509Options,
    trust: Arc<Trust>,
    server: Option<Arc<ServerConfig>>,
    client: Option<ClientConfig>,
}

impl std::fmt::Debug for X509Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Creds")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The path of `name` in `dir`; `None` for an optional file that is not there.
pub(crate) fn path_of(
    dir: Option<&str>,
    name: &str,
    required: bool,
) -> Result<Option<String>, String> {
    let Some(dir) = dir else {
        return if required {
            Err("Missing 'dir' property value".into())
        } else {
            Ok(None)
        };
    };
    let path = format!("{dir}/{name}");
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => Ok(None),
        Err(e) => Err(format!(
            "Unable to access credentials {path}: {}",
            os_msg(&e)
        )),
    }
}

/// An OS error as `strerror` words it.
pub(crate) fn os_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// The crypto rustls uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// GnuTLS's words for a file it could not read.
const FILE_ERROR: &str = "Error while reading file.";

fn pem_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|_| FILE_ERROR.to_owned())?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| "Base64 decoding error.".to_owned())?;
    if certs.is_empty() {
        return Err("No certificate was found.".into());
    }
    Ok(certs)
}

impl X509Creds {
    /// Loads the credentials as QEMU does when the object completes.
    ///
    /// # Errors
    /// QEMU's texts: a file that must be there and is not, a sanity check that fails, a
    /// file that does not load.
    pub fn load(options: X509Options) -> Result<X509Creds, String> {
        let dir = options.dir.as_deref();
        let server = options.endpoint == Endpoint::Server;
        let (cacert, cacrl, cert, key, dh) = if server {
            let cacert = path_of(dir, CA_CERT, true)?;
            let cacrl = path_of(dir, CA_CRL, false)?;
            let cert = path_of(dir, SERVER_CERT, true)?;
            let key = path_of(dir, SERVER_KEY, true)?;
            let dh = path_of(dir, DH_PARAMS, false)?;
            (cacert, cacrl, cert, key, dh)
        } else {
            let cacert = path_of(dir, CA_CERT, true)?;
            let cert = path_of(dir, CLIENT_CERT, false)?;
            let key = path_of(dir, CLIENT_KEY, false)?;
            (cacert, None, cert, key, None)
        };
        // Required above, so there.
        let cacert = cacert.unwrap_or_default();
        if options.sanity_check {
            sanity::check(server, &cacert, cert.as_deref())?;
        }
        let cas = pem_certs(&cacert)
            .map_err(|e| format!("Cannot load CA certificate '{cacert}': {e}"))?;
        let own =
            match (&cert, &key) {
                (Some(cert), Some(key)) => {
                    let password = match &options.key_password {
                        Some(Err(e)) => return Err(e.clone()),
                        Some(Ok(p)) => Some(p.as_str()),
                        None => None,
                    };
                    Some(load_pair(cert, key, password).map_err(|e| {
                        format!("Cannot load certificate '{cert}' & key '{key}': {e}")
                    })?)
                }
                _ => None,
            };
        let crls = match &cacrl {
            Some(path) => load_crls(path).map_err(|e| format!("Cannot load CRL '{path}': {e}"))?,
            None => Vec::new(),
        };
        if let Some(path) = &dh {
            // rustls agrees keys by elliptic curves only: the parameters are read, as QEMU
            // reads them, and not used.
            std::fs::read(path).map_err(|e| {
                format!("Failed to open file \u{201c}{path}\u{201d}: {}", os_msg(&e))
            })?;
        }
        let mut creds = X509Creds {
            trust: Arc::new(Trust {
                endpoint: options.endpoint,
                verify_peer: options.verify_peer,
                cas,
                crls,
            }),
            options,
            server: None,
            client: None,
        };
        if server {
            let (chain, key) = own.ok_or("the server needs a certificate and a key")?;
            creds.server = Some(Arc::new(creds.server_config(chain, key)?));
        } else {
            creds.client = Some(creds.client_config(own)?);
        }
        Ok(creds)
    }

    /// The end the credentials are for.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// What the object was created with.
    pub fn options(&self) -> &X509Options {
        &self.options
    }

    pub(crate) fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    pub(crate) fn server(&self) -> Option<Arc<ServerConfig>> {
        self.server.clone()
    }

    /// The client's configuration, its certificate verifier still to be set per
    /// connection.
    pub(crate) fn client(&self) -> Option<ClientConfig> {
        self.client.clone()
    }

    fn server_config(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ServerConfig, String> {
        // Like GnuTLS's server in QEMU, a client certificate is asked for (with the CA
        // names) but not required by the handshake: `peer.rs` judges it afterwards.
        let hints = self
            .trust
            .cas
            .iter()
            .filter_map(|der| {
                x509_parser::parse_x509_certificate(der)
                    .ok()
                    .map(|(_, c)| DistinguishedName::from(c.subject().as_raw().to_vec()))
            })
            .collect();
        let verifier = Arc::new(peer::AnyClientCert::new(hints));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| e.to_string())?;
        // No session is resumed, so no ticket is sent: the handshake ends with the client's
        // Finished, and a client that hangs up after judging the server's certificate does
        // so after the handshake, as with QEMU's server.
        config.send_tls13_tickets = 0;
        Ok(config)
    }

    fn client_config(
        &self,
        own: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(peer::ServerCertJudge::default()));
        let mut config = match own {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        // QEMU's client names no server in its hello.
        config.enable_sni = false;
        Ok(config)
    }
}

/// GnuTLS's words for a key it could not decrypt.
const DECRYPTION_FAILED: &str = "Decryption has failed.";

/// A private key from its PEM file: plain, or PKCS #8 encrypted with `password` (PBES2, as
/// `certtool --to-p8 --password` and `openssl pkcs8 -topk8` write them).
fn private_key(bytes: &[u8], password: Option<&str>) -> Result<PrivateKeyDer<'static>, String> {
    let encrypted = x509_parser::pem::Pem::iter_from_buffer(bytes)
        .filter_map(Result::ok)
        .find(|pem| pem.label == "ENCRYPTED PRIVATE KEY");
    let Some(pem) = encrypted else {
        return PrivateKeyDer::from_pem_slice(bytes)
            .map_err(|_| "The requested data were not available.".to_owned());
    };
    let password = password.ok_or(DECRYPTION_FAILED)?;
    match ferrite_crypto::decrypt_pkcs8(&pem.contents, password.as_bytes()) {
        Ok(der) => Ok(PrivateKeyDer::Pkcs8(der.into())),
        Err(Pkcs8Error::WrongPassword) => Err(DECRYPTION_FAILED.to_owned()),
        Err(Pkcs8Error::Malformed) => Err("ASN1 parser: Error in DER parsing.".to_owned()),
        Err(Pkcs8Error::Unsupported(oid)) => Err(format!(
            "the key is encrypted with {oid}, which ferrite cannot decrypt (it takes PBES2 with PBKDF2 and AES-CBC)"
        )),
    }
}

fn load_pair(
    cert: &str,
    key: &str,
    password: Option<&str>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = pem_certs(cert)?;
    let bytes = std::fs::read(key).map_err(|_| FILE_ERROR.to_owned())?;
    let key = private_key(&bytes, password)?;
    // A key that does not fit the certificate would only fail at the first handshake.
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| e.to_string())?;
    let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
    if certified.keys_match().is_err() {
        return Err("The public key does not match the certificate.".into());
    }
    Ok((chain, key))
}

fn load_crls(path: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|_| FILE_ERROR.to_owned())?;
    CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "Base64 decoding error.".to_owned())
}
