//! The checks of the program's own certificates when credentials load (QEMU's
//! `sanity-check`, on by default): each is valid now, a CA is a CA allowed to sign, an end
//! certificate is not a CA and may be used as it will be, and it was signed by the CA.

use crate::creds::os_msg;
use crate::peer::{self, Chain};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::*;

/// Whose certificate: the words QEMU's texts use.
fn role(server: bool, ca: bool) -> &'static str {
    match (ca, server) {
        (true, _) => "CA",
        (false, true) => "server",
        (false, false) => "client",
    }
}

fn readable(path: &str) -> bool {
    std::fs::File::open(path).is_ok()
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "Cannot load CA cert list {path}: Failed to open file \u{201c}{path}\u{201d}: {}",
            os_msg(&e)
        )
    })
}

/// Checks the program's certificate `cert` (if there and readable) and the CAs of `cacert`.
pub(crate) fn check(server: bool, cacert: &str, cert: Option<&str>) -> Result<(), String> {
    let own = match cert.filter(|p| readable(p)) {
        Some(path) => {
            let bytes = read(path)?;
            let der = CertificateDer::pem_slice_iter(&bytes)
                .next()
                .and_then(Result::ok)
                .ok_or_else(|| {
                    format!(
                        "Unable to import {} certificate {path}: Base64 decoding error.",
                        role(server, false)
                    )
                })?;
            Some((path, der))
        }
        None => None,
    };
    let cas: Vec<CertificateDer<'static>> = if readable(cacert) {
        let bytes = read(cacert)?;
        CertificateDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("Unable to import CA certificate list {cacert}"))?
    } else {
        Vec::new()
    };
    if let Some((path, der)) = &own {
        check_cert(der, path, server, false)?;
    }
    for der in &cas {
        check_cert(der, cacert, server, true)?;
    }
    if let Some((path, der)) = &own
        && !cas.is_empty()
    {
        let usage = if server {
            webpki::KeyUsage::server_auth()
        } else {
            webpki::KeyUsage::client_auth()
        };
        match peer::verify_chain(der, &[], &cas, &[], usage) {
            Chain::Trusted => {}
            Chain::Unusable => {
                return Err(format!(
                    "Unable to verify {} certificate {path} against CA certificate {cacert}",
                    role(server, false)
                ));
            }
            Chain::Refused(reason) => {
                return Err(format!(
                    "Our own certificate {path} failed validation against {cacert}: {reason}"
                ));
            }
        }
    }
    Ok(())
}

fn check_cert(der: &[u8], path: &str, server: bool, ca: bool) -> Result<(), String> {
    let who = role(server, ca);
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| {
        format!("Unable to import {who} certificate {path}: ASN1 parser: Error in DER parsing.")
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Err(format!("The {who} certificate {path} has expired"));
    }
    if validity.not_before.timestamp() > now {
        return Err(format!("The {who} certificate {path} is not yet active"));
    }
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if !ca {
                let end = if server { "server" } else { "client" };
                return Err(format!(
                    "The certificate {path} basic constraints show a CA, but we need one for a {end}"
                ));
            }
        }
        Ok(Some(_)) => {
            if ca {
                return Err(format!(
                    "The certificate {path} basic constraints do not show a CA"
                ));
            }
        }
        Ok(None) => {
            if ca {
                return Err(format!(
                    "The certificate {path} is missing basic constraints for a CA"
                ));
            }
        }
        Err(e) => {
            return Err(format!(
                "Unable to query certificate {path} basic constraints: {e}"
            ));
        }
    }
    if let Ok(Some(ku)) = cert.key_usage()
        && ku.critical
    {
        let usage = ku.value;
        if ca && !usage.key_cert_sign() {
            return Err(format!(
                "Certificate {path} usage does not permit certificate signing"
            ));
        }
        if !ca && !usage.digital_signature() {
            return Err(format!(
                "Certificate {path} usage does not permit digital signature"
            ));
        }
        if !ca && !usage.key_encipherment() {
            return Err(format!(
                "Certificate {path} usage does not permit key encipherment"
            ));
        }
    }
    if !ca
        && let Ok(Some(eku)) = cert.extended_key_usage()
        && eku.critical
    {
        let purposes = eku.value;
        let allowed = purposes.any
            || if server {
                purposes.server_auth
            } else {
                purposes.client_auth
            };
        if !allowed {
            let end = if server { "server" } else { "client" };
            return Err(format!(
                "Certificate {path} purpose does not allow use with a TLS {end}"
            ));
        }
    }
    Ok(())
}
