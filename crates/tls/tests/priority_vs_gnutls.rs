//! `Priority::parse` against GnuTLS itself: `gnutls-cli --priority S --list` prints what
//! GnuTLS makes of a string (or why it refuses it). Strings from a list of the ones people
//! write and from random combinations of keywords and modifiers; for each, the verdict and
//! the lists of versions, ciphers, MACs and groups must be GnuTLS's.

use ferrite_tls::{Kind, Priority, PriorityError};
use std::process::Command;

/// GnuTLS's reading of `s`: its error, or its lines of versions, ciphers, MACs and groups.
fn gnutls(s: &str) -> Option<Result<[Vec<String>; 4], PriorityError>> {
    let out = Command::new("gnutls-cli")
        .args(["--priority", s, "--list"])
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("Syntax error at") {
        return Some(Err(PriorityError::Invalid));
    }
    if text.contains("No or insufficient priorities") {
        return Some(Err(PriorityError::Insufficient));
    }
    let line = |head: &str, prefix: &str| -> Vec<String> {
        let l = text
            .lines()
            .find_map(|l| l.strip_prefix(head))
            .unwrap_or_else(|| panic!("{s:?}: no {head} in {text}"));
        if l.trim() == "none" {
            return Vec::new();
        }
        l.split(", ")
            .map(|n| n.trim().trim_start_matches(prefix).to_ascii_uppercase())
            .collect()
    };
    Some(Ok([
        line("Protocols: ", "VERS-"),
        line("Ciphers: ", ""),
        line("MACs: ", ""),
        line("Groups: ", "GROUP-"),
    ]))
}

fn ours(s: &str) -> Result<[Vec<String>; 4], PriorityError> {
    let p = Priority::parse(s)?;
    let names = |k| p.list(k).iter().map(|n| n.to_string()).collect();
    Ok([
        names(Kind::Version),
        names(Kind::Cipher),
        names(Kind::Mac),
        names(Kind::Group),
    ])
}

/// Strings people write (the keywords alone are the `HEADS` below).
const WRITTEN: &[&str] = &[
    "normal",
    "@SYSTEM",
    "NORMAL:%COMPAT",
    "NORMAL:-VERS-TLS1.0:-VERS-TLS1.1",
    "NORMAL:-VERS-ALL:+VERS-TLS1.3",
    "NORMAL:-VERS-ALL:+VERS-TLS1.2",
    "NORMAL:+ANON-DH",
    "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK",
    "SECURE256:+SECURE128:-VERS-TLS-ALL:+VERS-TLS1.2:+VERS-TLS1.3:-RSA:-DHE-DSS",
    "NONE:+VERS-TLS1.2:+AES-256-GCM:+ECDHE-RSA:+AEAD:+SIGN-ALL:+CURVE-ALL:+COMP-NULL",
    "NONE:+VERS-TLS1.3:+AES-128-GCM:+AEAD:+GROUP-X25519:+SIGN-ALL",
    "NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305",
    "NORMAL:-GROUP-ALL:+GROUP-X25519",
    "NORMAL:-KX-ALL",
    "NORMAL:-MAC-ALL",
    "NORMAL:-SIGN-ALL",
    "NORMAL:+SRP",
    "NORMAL:+NULL",
    "NORMAL:",
    "NORMAL::%COMPAT",
    "NORMAL: -VERS-TLS1.3",
    "NORMAL:-VERS-TLS1.3 ",
    "SUITEB192:+NORMAL",
    "NORMAL:SECURE256",
    "NORMAL:NONE",
    "NORMAL:+FOO",
    "NORMAL:%PROFILE_HIGH:%SERVER_PRECEDENCE",
    "NORMAL:+CTYPE-CLI-ALL:+CTYPE-SRV-X509",
    "NORMAL:+MAC-FOO:+COMP-ZLIB",
    "NONE:+VERS-TLS1.2:+VKO-GOST-12:+GOST28147-TC26Z-CNT:+GOST28147-TC26Z-IMIT:+SIGN-ALL",
    "NONE:+VERS-TLS1.2:+VKO-GOST-12:+GOST28147-TC26Z-CNT:+SHA1:+SIGN-ALL",
];

/// The pieces random strings are made of.
const HEADS: &[&str] = &[
    "NORMAL",
    "NONE",
    "PFS",
    "SECURE128",
    "SECURE192",
    "SECURE256",
    "SUITEB128",
    "SUITEB192",
    "PERFORMANCE",
    "LEGACY",
    "SECURE",
];
const MODS: &[&str] = &[
    "VERS-ALL",
    "VERS-TLS-ALL",
    "VERS-DTLS-ALL",
    "VERS-TLS1.3",
    "VERS-TLS1.2",
    "VERS-TLS1.1",
    "VERS-TLS1.0",
    "VERS-DTLS1.2",
    "CIPHER-ALL",
    "AES-128-GCM",
    "AES-256-GCM",
    "CHACHA20-POLY1305",
    "AES-128-CBC",
    "AES-256-CBC",
    "AES-128-CCM",
    "AES-256-CCM",
    "MAC-ALL",
    "SHA1",
    "SHA256",
    "SHA384",
    "AEAD",
    "KX-ALL",
    "RSA",
    "DHE-RSA",
    "ECDHE-RSA",
    "ECDHE-ECDSA",
    "PSK",
    "DHE-PSK",
    "ECDHE-PSK",
    "ANON-DH",
    "ANON-ECDH",
    "GROUP-ALL",
    "GROUP-EC-ALL",
    "GROUP-DH-ALL",
    "GROUP-X25519",
    "GROUP-SECP256R1",
    "GROUP-SECP384R1",
    "GROUP-FFDHE2048",
    "CURVE-ALL",
    "SIGN-ALL",
    "SIGN-RSA-SHA256",
    "SIGN-RSA-PSS-RSAE-SHA256",
    "SIGN-ECDSA-SECP256R1-SHA256",
    "SECURE128",
    "SECURE192",
    "NORMAL",
    "SRP",
    "RSA-PSK",
    "DHE-DSS",
    "NULL",
    "SHA512",
    "MD5",
    "GROUP-GOST-ALL",
    "GROUP-X448",
    "SIGN-RSA-SHA1",
    "SIGN-EdDSA-Ed25519",
    "COMP-NULL",
    "CTYPE-X509",
    "MAC-SHA256",
    "ARCFOUR-128",
    "CAMELLIA-128-GCM",
    "CAMELLIA-256-CBC",
    "3DES-CBC",
    "SRP-RSA",
    "VKO-GOST-12",
    "GOST28147-TC26Z-CNT",
    "GOST28147-TC26Z-IMIT",
    "AES-128-CCM-8",
    "SIGN-RSA-MD5",
    "SIGN-GOSTR341012-256",
];

/// A small deterministic generator (xorshift), so a failure names a string that can be
/// tried again.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn random_strings(count: usize) -> Vec<String> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    (0..count)
        .map(|_| {
            let mut s = HEADS[rng.below(HEADS.len())].to_owned();
            for _ in 0..rng.below(6) + 1 {
                s.push(':');
                match rng.below(20) {
                    0 => s.push_str("%COMPAT"),
                    1 => s.push_str("%SERVER_PRECEDENCE"),
                    _ => {
                        s.push(['+', '-', '-', '!'][rng.below(4)]);
                        s.push_str(MODS[rng.below(MODS.len())]);
                    }
                }
            }
            s
        })
        .collect()
}

#[test]
fn priority_strings_read_as_gnutls_reads_them() {
    if gnutls("NORMAL").is_none() {
        eprintln!("skipped: gnutls-cli (gnutls-bin) is not installed");
        return;
    }
    let count = std::env::var("FERRITE_PRIORITY_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(400);
    let mut differ = Vec::new();
    let strings = HEADS
        .iter()
        .chain(WRITTEN)
        .map(|s| s.to_string())
        .chain(random_strings(count));
    for s in strings {
        let theirs = gnutls(&s).expect("gnutls-cli ran");
        let mine = ours(&s);
        if theirs != mine {
            differ.push(format!("{s:?}\n  gnutls:  {theirs:?}\n  ferrite: {mine:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "{} differ:\n{}",
        differ.len(),
        differ.join("\n")
    );
}
