//! `tls-creds-x509` (QEMU: `crypto/tlscredsx509.c`, `crypto/tlscreds.c`): the files of a
//! directory, found, checked and loaded when the object is created, in QEMU's order and
//! with its texts; then the rustls configurations a session starts from.

use crate::peer;
use crate::priority::{self, Kind, Priority};
use crate::sanity;
use ferrite_crypto::Pkcs8Error;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::{
    CipherSuite, ClientConfig, DistinguishedName, NamedGroup, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};
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
    /// The priority string of its sessions (GnuTLS's syntax; QEMU's default when `None`).
    pub priority: Option<String>,
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
    /// Why a session cannot start though GnuTLS would take the priority string: it allows
    /// nothing rustls can do.
    unusable: Option<String>,
    /// The signature schemes the priority allows the peer (all when `None`).
    schemes: Option<Vec<SignatureScheme>>,
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

/// What rustls can negotiate within a priority: its cipher suites, groups and versions
/// that the priority allows, in its order of preference, and the signature schemes it
/// allows the peer.
struct Negotiable {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static SupportedProtocolVersion>,
    schemes: Option<Vec<SignatureScheme>>,
}

impl Default for Negotiable {
    /// Everything rustls has.
    fn default() -> Negotiable {
        Negotiable {
            provider: provider(),
            versions: rustls::ALL_VERSIONS.to_vec(),
            schemes: None,
        }
    }
}

/// rustls's crypto narrowed to what `priority` (GnuTLS's syntax) allows; `Ok(None)` for a
/// string GnuTLS refuses (sessions fail before they need a configuration).
///
/// # Errors
/// A string that allows nothing rustls has.
fn negotiable(priority: &str) -> Result<Option<Negotiable>, String> {
    let Ok(p) = Priority::parse(priority) else {
        return Ok(None);
    };
    let rank = |kind, name: &str| p.list(kind).iter().position(|n| *n == name);
    let mut base = rustls::crypto::ring::default_provider();
    let mut suites: Vec<_> = base
        .cipher_suites
        .iter()
        .filter_map(|s| {
            let (tls13, kx, cipher) = suite_names(s.suite())?;
            let version = if tls13 { "TLS1.3" } else { "TLS1.2" };
            let allowed = p.allows(Kind::Version, version)
                && p.allows(Kind::Mac, "AEAD")
                && kx.is_none_or(|kx| p.allows(Kind::Kx, kx));
            if !allowed {
                return None;
            }
            Some((rank(Kind::Cipher, cipher)?, *s))
        })
        .collect();
    suites.sort_by_key(|(rank, _)| *rank);
    base.cipher_suites = suites.into_iter().map(|(_, s)| s).collect();
    let mut groups: Vec<_> = base
        .kx_groups
        .iter()
        .filter_map(|g| Some((rank(Kind::Group, group_name(g.name())?)?, *g)))
        .collect();
    groups.sort_by_key(|(rank, _)| *rank);
    base.kx_groups = groups.into_iter().map(|(_, g)| g).collect();
    let versions: Vec<_> = [&rustls::version::TLS13, &rustls::version::TLS12]
        .into_iter()
        .filter(|v| base.cipher_suites.iter().any(|s| s.version() == *v))
        .collect();
    if versions.is_empty() || base.kx_groups.is_empty() {
        return Err(format!(
            "TLS handshake failed: the TLS priority '{priority}' allows nothing ferrite can \
             negotiate with x509 credentials (TLS 1.2 or 1.3; AES-128-GCM, AES-256-GCM or \
             CHACHA20-POLY1305, with ECDHE-RSA or ECDHE-ECDSA in TLS 1.2; groups X25519, \
             SECP256R1 or SECP384R1)"
        ));
    }
    Ok(Some(Negotiable {
        provider: Arc::new(base),
        versions,
        schemes: Some(verify_schemes(&p)),
    }))
}

/// A rustls suite as GnuTLS names its parts: whether it is TLS 1.3's, its key exchange
/// (TLS 1.2's only) and its cipher.
fn suite_names(suite: CipherSuite) -> Option<(bool, Option<&'static str>, &'static str)> {
    Some(match suite {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => (true, None, "AES-128-GCM"),
        CipherSuite::TLS13_AES_256_GCM_SHA384 => (true, None, "AES-256-GCM"),
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => (true, None, "CHACHA20-POLY1305"),
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => {
            (false, Some("ECDHE-ECDSA"), "AES-128-GCM")
        }
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => {
            (false, Some("ECDHE-ECDSA"), "AES-256-GCM")
        }
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (false, Some("ECDHE-ECDSA"), "CHACHA20-POLY1305")
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            (false, Some("ECDHE-RSA"), "AES-128-GCM")
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            (false, Some("ECDHE-RSA"), "AES-256-GCM")
        }
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (false, Some("ECDHE-RSA"), "CHACHA20-POLY1305")
        }
        _ => return None,
    })
}

/// The signature schemes `p` allows, by the names GnuTLS gives them (an ECDSA scheme by
/// either of its names).
fn verify_schemes(p: &Priority) -> Vec<SignatureScheme> {
    use SignatureScheme as S;
    let names = |s: SignatureScheme| -> &'static [&'static str] {
        match s {
            S::RSA_PKCS1_SHA1 => &["RSA-SHA1"],
            S::ECDSA_SHA1_Legacy => &["ECDSA-SHA1"],
            S::RSA_PKCS1_SHA256 => &["RSA-SHA256"],
            S::RSA_PKCS1_SHA384 => &["RSA-SHA384"],
            S::RSA_PKCS1_SHA512 => &["RSA-SHA512"],
            S::ECDSA_NISTP256_SHA256 => &["ECDSA-SHA256", "ECDSA-SECP256R1-SHA256"],
            S::ECDSA_NISTP384_SHA384 => &["ECDSA-SHA384", "ECDSA-SECP384R1-SHA384"],
            S::ECDSA_NISTP521_SHA512 => &["ECDSA-SHA512", "ECDSA-SECP521R1-SHA512"],
            S::RSA_PSS_SHA256 => &["RSA-PSS-RSAE-SHA256"],
            S::RSA_PSS_SHA384 => &["RSA-PSS-RSAE-SHA384"],
            S::RSA_PSS_SHA512 => &["RSA-PSS-RSAE-SHA512"],
            S::ED25519 => &["EDDSA-ED25519"],
            S::ED448 => &["EDDSA-ED448"],
            _ => &[],
        }
    };
    provider()
        .signature_verification_algorithms
        .supported_schemes()
        .into_iter()
        .filter(|s| names(*s).iter().any(|n| p.allows(Kind::Sign, n)))
        .collect()
}

/// A rustls group as GnuTLS names it.
fn group_name(group: NamedGroup) -> Option<&'static str> {
    Some(match group {
        NamedGroup::X25519 => "X25519",
        NamedGroup::secp256r1 => "SECP256R1",
        NamedGroup::secp384r1 => "SECP384R1",
        _ => return None,
    })
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
        let priority = options.priority.as_deref().unwrap_or(priority::DEFAULT);
        let (negotiable, unusable) = match negotiable(priority) {
            Ok(n) => (n, None),
            Err(e) => (None, Some(e)),
        };
        let negotiable = negotiable.unwrap_or_default();
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
            unusable,
            schemes: negotiable.schemes.clone(),
        };
        if server {
            let (chain, key) = own.ok_or("the server needs a certificate and a key")?;
            let config = creds.server_config(&negotiable, chain, key)?;
            creds.server = Some(Arc::new(config));
        } else {
            creds.client = Some(creds.client_config(&negotiable, own)?);
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

    /// The server's configuration, for a session whose priority GnuTLS took.
    pub(crate) fn server_for_session(&self) -> Result<Arc<ServerConfig>, String> {
        self.for_session(&self.server)
    }

    /// The client's configuration, for a session whose priority GnuTLS took; its
    /// certificate verifier is still to be set per connection.
    pub(crate) fn client_for_session(&self) -> Result<ClientConfig, String> {
        self.for_session(&self.client)
    }

    fn for_session<C: Clone>(&self, config: &Option<C>) -> Result<C, String> {
        if let Some(e) = &self.unusable {
            return Err(e.clone());
        }
        config
            .clone()
            .ok_or_else(|| "Credentials endpoint doesn't match session".to_owned())
    }

    /// The signature schemes the priority allows the peer (all when `None`).
    pub(crate) fn verify_schemes(&self) -> Option<Vec<SignatureScheme>> {
        self.schemes.clone()
    }

    fn server_config(
        &self,
        negotiable: &Negotiable,
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
        let verifier = Arc::new(peer::AnyClientCert::new(hints, self.schemes.clone()));
        let mut config = ServerConfig::builder_with_provider(negotiable.provider.clone())
            .with_protocol_versions(&negotiable.versions)
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
        negotiable: &Negotiable,
        own: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientConfig, String> {
        let builder = ClientConfig::builder_with_provider(negotiable.provider.clone())
            .with_protocol_versions(&negotiable.versions)
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
