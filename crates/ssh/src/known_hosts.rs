//! The host key check against `known_hosts` files, as libssh judges them for QEMU: the
//! user's `~/.ssh/known_hosts`, then the system's `/etc/ssh/ssh_known_hosts`; host
//! patterns with wildcards and negation, hashed names (`|1|salt|hash`), `[host]:port` for
//! ports other than 22; `@revoked` and `@cert-authority` lines do not vouch for a key.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit, Mac};
use std::path::{Path, PathBuf};

/// What the files say of a server's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A line for the host holds this key.
    Known,
    /// A line for the host holds another key of the same type.
    Changed,
    /// Lines for the host hold keys of other types only.
    OtherType,
    /// No line names the host.
    Unknown,
}

/// One key line: the key type and its wire form.
struct Entry {
    kind: String,
    blob: Vec<u8>,
}

/// The files libssh reads, in its order: the user's then the system's (or those the ssh
/// configuration names instead).
pub(crate) fn files(home: Option<&Path>, cfg: &crate::config::HostConfig) -> Vec<PathBuf> {
    let mut out = Vec::new();
    match (&cfg.user_known_hosts, home) {
        (Some(f), _) => out.push(f.clone()),
        (None, Some(h)) => out.push(h.join(".ssh/known_hosts")),
        (None, None) => {}
    }
    out.push(
        cfg.global_known_hosts
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/ssh/ssh_known_hosts")),
    );
    out
}

/// How known_hosts names a server: `host`, or `[host]:port` off port 22.
pub(crate) fn host_key_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The keys the files hold for `name` (in [`host_key_name`]'s form).
fn entries(files: &[PathBuf], name: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(hosts), Some(kind), Some(key)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !hosts_match(hosts, name) {
                continue;
            }
            if let Ok(blob) = STANDARD.decode(key) {
                out.push(Entry {
                    kind: kind.to_owned(),
                    blob,
                });
            }
        }
    }
    out
}

/// The key types the files hold for `name`, in the order they come (what libssh asks the
/// server for first).
pub(crate) fn known_types(files: &[PathBuf], name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in entries(files, name) {
        if !out.contains(&e.kind) {
            out.push(e.kind);
        }
    }
    out
}

/// What the files say of `name`'s key of type `kind` and wire form `blob`.
pub(crate) fn check(files: &[PathBuf], name: &str, kind: &str, blob: &[u8]) -> Verdict {
    let found = entries(files, name);
    if found.iter().any(|e| e.kind == kind && e.blob == blob) {
        Verdict::Known
    } else if found.iter().any(|e| e.kind == kind) {
        Verdict::Changed
    } else if found.is_empty() {
        Verdict::Unknown
    } else {
        Verdict::OtherType
    }
}

/// Whether a line's host field names `name`: a hashed name, or patterns of which one
/// matches and no negated one does.
fn hosts_match(field: &str, name: &str) -> bool {
    if let Some(hashed) = field.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut matched = false;
    for pattern in field.split(',') {
        if let Some(negated) = pattern.strip_prefix('!') {
            if wildcard(negated.as_bytes(), name.as_bytes()) {
                return false;
            }
        } else if wildcard(pattern.as_bytes(), name.as_bytes()) {
            matched = true;
        }
    }
    matched
}

/// `salt|hash` (both base64) against HMAC-SHA1(salt, name).
fn hashed_match(field: &str, name: &str) -> bool {
    let Some((salt, hash)) = field.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// `*` and `?` patterns, case-insensitive as host names are.
pub(crate) fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard(rest, &name[1..]),
        Some((c, rest)) => name
            .split_first()
            .is_some_and(|(n, tail)| n.eq_ignore_ascii_case(c) && wildcard(rest, tail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, Vec<PathBuf>) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("known_hosts");
        std::fs::write(&p, text).unwrap();
        (d, vec![p])
    }

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIBPg";

    #[test]
    fn lines_are_judged_as_libssh_judges_them() {
        let blob = STANDARD.decode(KEY).unwrap();
        let name = host_key_name("127.0.0.1", 2222);
        let (_d, f) = file(&format!("# c\n[127.0.0.1]:2222 ssh-ed25519 {KEY} me\n"));
        assert_eq!(check(&f, &name, "ssh-ed25519", &blob), Verdict::Known);
        assert_eq!(check(&f, &name, "ssh-ed25519", b"x"), Verdict::Changed);
        assert_eq!(check(&f, &name, "ssh-rsa", &blob), Verdict::OtherType);
        assert_eq!(
            check(&f, "127.0.0.1", "ssh-ed25519", &blob),
            Verdict::Unknown
        );
        let (_d, f) = file(&format!("@revoked [127.0.0.1]:2222 ssh-ed25519 {KEY}\n"));
        assert_eq!(check(&f, &name, "ssh-ed25519", &blob), Verdict::Unknown);
        let (_d, f) = file(&format!("[127.0.0.*]:2222,!*.9 ssh-ed25519 {KEY}\n"));
        assert_eq!(check(&f, &name, "ssh-ed25519", &blob), Verdict::Known);
        assert_eq!(known_types(&f, &name), ["ssh-ed25519"]);
        assert_eq!(check(&[], &name, "ssh-ed25519", &blob), Verdict::Unknown);
    }

    #[test]
    fn hashed_names_match_their_host_only() {
        // `ssh-keygen -H` of "[127.0.0.1]:2222".
        let salt = STANDARD.encode(b"0123456789abcdefghij");
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"0123456789abcdefghij").unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let hash = STANDARD.encode(mac.finalize().into_bytes());
        let field = format!("|1|{salt}|{hash}");
        assert!(hosts_match(&field, "[127.0.0.1]:2222"));
        assert!(!hosts_match(&field, "127.0.0.1"));
        assert!(!hosts_match("|1|!!|??", "127.0.0.1"));
    }

    #[test]
    fn negation_wins_over_a_match() {
        assert!(hosts_match("*.example.com", "a.EXAMPLE.com"));
        assert!(!hosts_match(
            "*.example.com,!b.example.com",
            "b.example.com"
        ));
        assert!(!hosts_match("!a", "a"));
        assert!(hosts_match("h?st", "host"));
    }
}
