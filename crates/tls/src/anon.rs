//! `tls-creds-anon` (QEMU: `crypto/tlscredsanon.c`): no identity on either end. A server
//! may have Diffie-Hellman parameters in its directory's `dh-params.pem` (PKCS #3, as
//! `certtool --generate-dh-params` writes them); without them it uses RFC 7919's
//! ffdhe2048 (QEMU has GnuTLS generate a group at load; GnuTLS itself uses RFC 7919's
//! groups with clients that name them, as every GnuTLS client does).

use crate::creds::{Endpoint, os_msg, path_of};
use crate::tls12::DhGroup;

const DH_PARAMS: &str = "dh-params.pem";

/// What a `tls-creds-anon` object was created with.
#[derive(Debug, Clone)]
pub struct AnonOptions {
    /// The directory of `dh-params.pem`.
    pub dir: Option<String>,
    /// The end they are for.
    pub endpoint: Endpoint,
}

/// Loaded anonymous credentials.
#[derive(Debug)]
pub struct AnonCreds {
    options: AnonOptions,
    /// A server's group.
    pub(crate) group: DhGroup,
}

impl AnonCreds {
    /// Loads the credentials as QEMU does when the object completes.
    ///
    /// # Errors
    /// QEMU's texts: a directory that cannot be read, parameters that do not load.
    pub fn load(options: AnonOptions) -> Result<AnonCreds, String> {
        let mut group = DhGroup::ffdhe2048();
        if options.endpoint == Endpoint::Server
            && let Some(path) = path_of(options.dir.as_deref(), DH_PARAMS, false)?
        {
            let text = std::fs::read(&path).map_err(|e| {
                format!("Failed to open file \u{201c}{path}\u{201d}: {}", os_msg(&e))
            })?;
            group = dh_params(&text)
                .map_err(|e| format!("Unable to load DH parameters from {path}: {e}"))?;
        }
        Ok(AnonCreds { options, group })
    }

    /// The end they are for.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// What they were created with.
    pub fn options(&self) -> &AnonOptions {
        &self.options
    }
}

/// The group of a PEM `DH PARAMETERS` block: DER `SEQUENCE { INTEGER p, INTEGER g, ... }`.
/// Failures in GnuTLS's words.
fn dh_params(pem: &[u8]) -> Result<DhGroup, &'static str> {
    const HEADER: &[u8] = b"-----BEGIN DH PARAMETERS-----";
    let at = pem
        .windows(HEADER.len())
        .position(|w| w == HEADER)
        .ok_or("Base64 unexpected header error.")?;
    let decoding = "Base64 decoding error.";
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem[at..]).map_err(|_| decoding)?;
    let der = block.contents;
    let group = der_item(&der, 0x30).and_then(|(seq, _)| {
        let (p, rest) = der_item(seq, 0x02)?;
        let (g, _) = der_item(rest, 0x02)?;
        DhGroup::new(p, g)
    });
    group.ok_or("ASN1 parser: Error in DER parsing.")
}

/// A DER item of tag `tag` at the start of `b`: (its contents, what follows).
fn der_item(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let first = *b.get(1)?;
    let (len, at) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, &x| acc << 8 | usize::from(x));
        (len, 2 + n)
    };
    let contents = b.get(at..at.checked_add(len)?)?;
    Some((contents, &b[at + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dh_parameters_load_from_certtools_pem() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("certtool")
            .args(["--generate-dh-params", "--bits", "2048", "--outfile"])
            .arg(dir.path().join("dh-params.pem"))
            .output();
        let Ok(out) = out else {
            eprintln!("certtool is missing: the PEM is not tested");
            return;
        };
        assert!(out.status.success());
        let d = dir.path().to_str().unwrap().to_owned();
        let c = AnonCreds::load(AnonOptions {
            dir: Some(d.clone()),
            endpoint: Endpoint::Server,
        })
        .unwrap();
        assert_ne!(c.group, DhGroup::ffdhe2048());
        std::fs::write(dir.path().join("dh-params.pem"), "junk").unwrap();
        let e = AnonCreds::load(AnonOptions {
            dir: Some(d.clone()),
            endpoint: Endpoint::Server,
        })
        .unwrap_err();
        assert_eq!(
            e,
            format!(
                "Unable to load DH parameters from {d}/dh-params.pem: Base64 unexpected header error."
            )
        );
    }
}
