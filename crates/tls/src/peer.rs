//! The peer, judged by QEMU's rules once the handshake is done (QEMU:
//! `qcrypto_tls_session_check_credentials`): its certificate chains to a trusted CA, is not
//! revoked and is valid now; a client's distinguished name passes the server's
//! authorization object; a server's certificate names the host the client asked for.
//!
//! During the handshake rustls only checks that the peer holds the key of the certificate
//! it sent (`AnyClientCert`, `AnyServerCert`).

use crate::creds::{Trust, provider};
use crate::priority::{Profile, PublicKey};
use crate::{AuthzLookup, Endpoint, Found, dn};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use x509_parser::prelude::*;

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// A server's verifier that asks for a client certificate, takes any, and takes none.
#[derive(Debug)]
pub(crate) struct AnyClientCert {
    hints: Vec<DistinguishedName>,
    /// The signature schemes the session's priority allows (all when `None`).
    schemes: Option<Vec<SignatureScheme>>,
}

/// The handshake's signature checks both verifiers make alike: only that the peer holds the
/// key of the certificate it showed (the certificate itself is judged by [`check`]).
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            let all = algorithms().supported_schemes();
            match &self.schemes {
                Some(allowed) => all.into_iter().filter(|s| allowed.contains(s)).collect(),
                None => all,
            }
        }
    };
}

impl AnyClientCert {
    pub(crate) fn new(
        hints: Vec<DistinguishedName>,
        schemes: Option<Vec<SignatureScheme>>,
    ) -> AnyClientCert {
        AnyClientCert { hints, schemes }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// A client's verifier that judges the server's certificate by QEMU's rules and keeps the
/// verdict for after the handshake, letting the handshake itself go on: QEMU's client
/// judges once the handshake is done, so its refusal is what the user sees even when the
/// server has hung up on the client in the meantime.
#[derive(Debug, Default)]
pub(crate) struct ServerCertJudge {
    trust: Option<Arc<Trust>>,
    hostname: Option<String>,
    /// How strong the server's certificates must be (the session's priority says).
    profile: Option<Profile>,
    /// The signature schemes the session's priority allows (all when `None`).
    schemes: Option<Vec<SignatureScheme>>,
    verdict: Arc<Mutex<Option<String>>>,
}

impl ServerCertJudge {
    /// A judge for one connection; its refusal, if any, lands in `verdict`.
    pub(crate) fn new(
        trust: Arc<Trust>,
        hostname: Option<String>,
        profile: Profile,
        schemes: Option<Vec<SignatureScheme>>,
        verdict: Arc<Mutex<Option<String>>>,
    ) -> ServerCertJudge {
        ServerCertJudge {
            trust: Some(trust),
            hostname,
            profile: Some(profile),
            schemes,
            verdict,
        }
    }
}

impl ServerCertVerifier for ServerCertJudge {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(trust) = &self.trust {
            let mut chain = vec![end_entity.clone()];
            chain.extend(intermediates.iter().cloned());
            let profile = self.profile.unwrap_or(Profile::Low);
            let hostname = self.hostname.as_deref();
            if let Err(refusal) = check(trust, &chain, None, hostname, profile) {
                if let Ok(mut v) = self.verdict.lock() {
                    *v = Some(refusal);
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

/// What a chain check found.
pub(crate) enum Chain {
    Trusted,
    /// The CA certificates themselves are unusable.
    Unusable,
    /// Refused, with GnuTLS's reason.
    Refused(&'static str),
}

/// Checks `cert` (with `intermediates`) against the CA certificates `cas` and `crls`.
pub(crate) fn verify_chain(
    cert: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    cas: &[CertificateDer<'_>],
    crls: &[CertificateRevocationListDer<'_>],
    usage: webpki::KeyUsage,
) -> Chain {
    let anchors: Vec<_> = cas
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    if anchors.is_empty() {
        return Chain::Unusable;
    }
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return Chain::Refused("The certificate is not trusted");
    };
    let crls: Vec<webpki::CertRevocationList<'_>> = crls
        .iter()
        .filter_map(|c| webpki::OwnedCertRevocationList::from_der(c).ok())
        .map(webpki::CertRevocationList::from)
        .collect();
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = crls.iter().collect();
    let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
        .ok()
        .map(|b| {
            b.with_depth(webpki::RevocationCheckDepth::Chain)
                .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                .build()
        });
    let result = ee.verify_for_usage(
        algorithms().all,
        &anchors,
        intermediates,
        UnixTime::now(),
        usage,
        revocation,
        None,
    );
    match result {
        Ok(_) => Chain::Trusted,
        // GnuTLS does not hold a certificate to its extended key usage when verifying;
        // the load-time purpose check does.
        Err(webpki::Error::RequiredEkuNotFoundContext(_)) => Chain::Trusted,
        Err(webpki::Error::UnknownIssuer) => {
            Chain::Refused("The certificate hasn't got a known issuer")
        }
        Err(webpki::Error::CertRevoked) => Chain::Refused("The certificate has been revoked"),
        Err(_) => Chain::Refused("The certificate is not trusted"),
    }
}

/// A certificate's public key, as GnuTLS's profiles weigh it.
fn public_key(cert: &X509Certificate<'_>) -> PublicKey {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => modulus_bits(rsa.modulus),
        Ok(x509_parser::public_key::PublicKey::DSA(y)) => modulus_bits(y),
        Ok(x509_parser::public_key::PublicKey::EC(point)) => {
            PublicKey::Curve(u32::try_from(point.key_size()).unwrap_or(0))
        }
        _ => match spki.algorithm.algorithm.to_id_string().as_str() {
            "1.3.101.112" => PublicKey::Curve(256),
            "1.3.101.113" => PublicKey::Curve(448),
            _ => PublicKey::Other,
        },
    }
}

/// The size in bits of a big-endian unsigned integer.
fn modulus_bits(n: &[u8]) -> PublicKey {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    let bits = n
        .first()
        .map_or(0, |top| (n.len() * 8) as u32 - top.leading_zeros());
    PublicKey::FiniteField(bits)
}

/// Whether every certificate of the peer's chain, and the CA that issued its last, has a
/// key `profile` accepts (GnuTLS weighs the issuer's key of each link and the peer's own).
fn strong_enough(
    certs: &[X509Certificate<'_>],
    cas: &[CertificateDer<'_>],
    profile: Profile,
) -> bool {
    let issuer = certs.last().and_then(|top| {
        cas.iter()
            .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
            .find(|ca| ca.subject().as_raw() == top.issuer().as_raw())
    });
    certs
        .iter()
        .chain(issuer.as_ref())
        .all(|c| profile.accepts(public_key(c)))
}

/// Judges the peer's `certs` (its chain, its own first) as QEMU does after the handshake:
/// a server's client by the authorization object `authz` (an id and how to find it), a
/// client's server by `hostname`; keys by the session's verification `profile`. Returns
/// the peer's distinguished name, if checked.
pub(crate) fn check(
    trust: &Trust,
    certs: &[CertificateDer<'_>],
    authz: Option<(&str, &AuthzLookup)>,
    hostname: Option<&str>,
    profile: Profile,
) -> Result<Option<String>, String> {
    if !trust.verify_peer {
        return Ok(None);
    }
    let Some((own, intermediates)) = certs.split_first() else {
        return Err("Verify failed: No certificate was found.".into());
    };
    let usage = match trust.endpoint {
        Endpoint::Server => webpki::KeyUsage::client_auth(),
        Endpoint::Client => webpki::KeyUsage::server_auth(),
    };
    match verify_chain(own, intermediates, &trust.cas, &trust.crls, usage) {
        Chain::Trusted => {}
        Chain::Unusable => return Err("The certificate hasn't got a known issuer".into()),
        Chain::Refused(reason) => return Err(reason.into()),
    }
    let parsed: Vec<_> = certs
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
        .collect();
    if !strong_enough(&parsed, &trust.cas, profile) {
        return Err("The certificate uses an insecure algorithm".into());
    }
    let now = UnixTime::now().as_secs() as i64;
    let mut name = None;
    for (i, der) in certs.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| "Cannot import certificate: ASN1 parser: Error in DER parsing.")?;
        if cert.validity().not_after.timestamp() < now {
            return Err("The certificate has expired".into());
        }
        if cert.validity().not_before.timestamp() > now {
            return Err("The certificate is not yet activated".into());
        }
        if i > 0 {
            continue;
        }
        let dname = dn::format(cert.subject());
        if let Some((id, lookup)) = authz {
            let allowed = match lookup(id) {
                Found::Yes(authz) => authz.is_allowed(&dname)?,
                Found::OtherType => return Err(format!("Object '{id}' is not a QAuthZ subclass")),
                Found::Missing => return Err(format!("Cannot find QAuthZ object ID {id}")),
            };
            if !allowed {
                return Err(format!("TLS x509 authz check for {dname} is denied"));
            }
        }
        match hostname {
            Some(host) if !matches_host(&cert, host) => {
                return Err(format!("Certificate does not match the hostname {host}"));
            }
            Some(_) => {}
            None if trust.endpoint == Endpoint::Client => {
                return Err("No hostname for certificate validation".into());
            }
            None => {}
        }
        name = Some(dname);
    }
    Ok(name)
}

/// Whether `cert` is for `host`, as GnuTLS decides: an address must be one of its IP
/// alternative names; a name one of its DNS names (a leading `*.` standing for one label),
/// or, when it has neither DNS nor IP alternative names, its common name.
fn matches_host(cert: &X509Certificate<'_>, host: &str) -> bool {
    let sans: Vec<GeneralName<'_>> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|e| e.value.general_names.clone())
        .unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let want = match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        return sans
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == want.as_slice()));
    }
    // An address among the alternative names also keeps the common name out of it.
    let named = sans
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName(_) | GeneralName::IPAddress(_)));
    if named {
        return sans
            .iter()
            .any(|n| matches!(n, GeneralName::DNSName(d) if name_matches(d, host)));
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .any(|cn| name_matches(cn, host))
}

fn name_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    let pattern = pattern.trim_end_matches('.');
    if let Some(rest) = pattern.strip_prefix("*.") {
        return match host.split_once('.') {
            Some((first, tail)) => !first.is_empty() && tail.eq_ignore_ascii_case(rest),
            None => false,
        };
    }
    pattern.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_stand_for_one_label() {
        assert!(name_matches("iotests.qemu.org", "IOTESTS.qemu.org"));
        assert!(name_matches("*.qemu.org", "iotests.qemu.org"));
        assert!(!name_matches("*.qemu.org", "a.b.qemu.org"));
        assert!(!name_matches("*.qemu.org", "qemu.org"));
        assert!(!name_matches("localhost", "iotests.qemu.org"));
    }
}
