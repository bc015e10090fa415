//! What `~/.ssh/config` and `/etc/ssh/ssh_config` say for a server, as far as it changes
//! what QEMU's driver does through libssh (QEMU has libssh read them; it sets the user, the
//! port and the socket itself, so those lines do not count): the identity files to try
//! after the default ones, the name the server goes by in `known_hosts` (`HostName`), and
//! other `known_hosts` files. `Host` blocks with patterns and negation, `Include`, and
//! `Match all`; other `Match` blocks do not apply. The first value given wins.

use std::path::{Path, PathBuf};

/// What the files say for one server.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct HostConfig {
    /// `IdentityFile`s, in order, expanded.
    pub(crate) identities: Vec<PathBuf>,
    /// `HostName`.
    pub(crate) host_name: Option<String>,
    /// `UserKnownHostsFile`, expanded.
    pub(crate) user_known_hosts: Option<PathBuf>,
    /// `GlobalKnownHostsFile`, expanded.
    pub(crate) global_known_hosts: Option<PathBuf>,
}

/// Who asks, for the files' `%` tokens and `~`.
pub(crate) struct Asker<'a> {
    pub(crate) home: Option<&'a Path>,
    pub(crate) local_user: &'a str,
    pub(crate) remote_user: &'a str,
    pub(crate) host: &'a str,
}

/// Reads the user's file then the system's for `asker.host`.
pub(crate) fn for_host(asker: &Asker<'_>) -> HostConfig {
    let mut out = HostConfig::default();
    if let Some(home) = asker.home {
        read_file(&home.join(".ssh/config"), asker, &mut out, 0);
    }
    read_file(Path::new("/etc/ssh/ssh_config"), asker, &mut out, 0);
    out
}

/// Files included from included files stop here (a loop stops too).
const MAX_INCLUDE_DEPTH: usize = 16;

fn read_file(path: &Path, asker: &Asker<'_>, out: &mut HostConfig, depth: usize) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    read_text(&text, asker, out, depth);
}

fn read_text(text: &str, asker: &Asker<'_>, out: &mut HostConfig, depth: usize) {
    // Lines before the first `Host` apply to every server.
    let mut applies = true;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.find(|c: char| c.is_ascii_whitespace() || c == '=') {
            Some(i) => (
                &line[..i],
                line[i..].trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '='),
            ),
            None => (line, ""),
        };
        let value = value.trim().trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "host" => applies = host_matches(value, asker.host),
            "match" => applies = value.eq_ignore_ascii_case("all"),
            _ if !applies => {}
            "include" if depth < MAX_INCLUDE_DEPTH => {
                for pattern in value.split_ascii_whitespace() {
                    for f in included(pattern, asker.home) {
                        read_file(&f, asker, out, depth + 1);
                    }
                }
            }
            "identityfile" => out.identities.push(expand(value, asker)),
            "hostname" if out.host_name.is_none() => out.host_name = Some(value.to_owned()),
            "userknownhostsfile" if out.user_known_hosts.is_none() => {
                if let Some(first) = value.split_ascii_whitespace().next() {
                    out.user_known_hosts = Some(expand(first, asker));
                }
            }
            "globalknownhostsfile" if out.global_known_hosts.is_none() => {
                if let Some(first) = value.split_ascii_whitespace().next() {
                    out.global_known_hosts = Some(expand(first, asker));
                }
            }
            _ => {}
        }
    }
}

/// A `Host` line's patterns against `host`: one matches and no negated one does.
fn host_matches(patterns: &str, host: &str) -> bool {
    let mut matched = false;
    for p in patterns.split_ascii_whitespace() {
        match p.strip_prefix('!') {
            Some(neg) if crate::known_hosts::wildcard(neg.as_bytes(), host.as_bytes()) => {
                return false;
            }
            Some(_) => {}
            None => matched |= crate::known_hosts::wildcard(p.as_bytes(), host.as_bytes()),
        }
    }
    matched
}

/// The files an `Include` names: relative names under `~/.ssh`, `*` and `?` in the file
/// name part, in name order.
fn included(pattern: &str, home: Option<&Path>) -> Vec<PathBuf> {
    let path = match (pattern.strip_prefix("~/"), home) {
        (Some(rest), Some(h)) => h.join(rest),
        _ if pattern.starts_with('/') => PathBuf::from(pattern),
        _ => match home {
            Some(h) => h.join(".ssh").join(pattern),
            None => return Vec::new(),
        },
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return vec![path];
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| crate::known_hosts::wildcard(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// `~` and libssh's `%` tokens: `%d` the ssh directory (`~/.ssh`: libssh's meaning, not
/// OpenSSH's home), `%u` local user, `%r` remote user, `%h` host, `%%`.
fn expand(value: &str, asker: &Asker<'_>) -> PathBuf {
    let home = asker
        .home
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ssh_dir = format!("{home}/.ssh");
    let value = match value.strip_prefix("~/") {
        Some(rest) => format!("{home}/{rest}"),
        None => value.to_owned(),
    };
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&ssh_dir),
            Some('u') => out.push_str(asker.local_user),
            Some('r') => out.push_str(asker.remote_user),
            Some('h') => out.push_str(asker.host),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    PathBuf::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker(home: &Path) -> Asker<'_> {
        Asker {
            home: Some(home),
            local_user: "me",
            remote_user: "them",
            host: "db.example.com",
        }
    }

    #[test]
    fn host_blocks_apply_to_their_hosts_only() {
        let home = Path::new("/h");
        let mut out = HostConfig::default();
        read_text(
            "IdentityFile ~/.ssh/all\n\
             Host *.example.com !web.example.com\n  IdentityFile %d/%r@%h\n  \
             HostName=10.0.0.9\n  UserKnownHostsFile ~/kh other\n\
             Host web.example.com\n  IdentityFile /nope\n\
             Match user x\n  IdentityFile /nope2\n\
             Match all\n  HostName later\n",
            &asker(home),
            &mut out,
            0,
        );
        assert_eq!(
            out.identities,
            [
                PathBuf::from("/h/.ssh/all"),
                PathBuf::from("/h/.ssh/them@db.example.com")
            ]
        );
        assert_eq!(out.host_name.as_deref(), Some("10.0.0.9"));
        assert_eq!(out.user_known_hosts, Some(PathBuf::from("/h/kh")));
        assert!(!host_matches("* !db.example.com", "db.example.com"));
    }

    #[test]
    fn includes_are_read_in_name_order() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(".ssh/conf.d")).unwrap();
        std::fs::write(d.path().join(".ssh/conf.d/b.conf"), "IdentityFile /b\n").unwrap();
        std::fs::write(d.path().join(".ssh/conf.d/a.conf"), "IdentityFile /a\n").unwrap();
        std::fs::write(d.path().join(".ssh/conf.d/c.txt"), "IdentityFile /c\n").unwrap();
        std::fs::write(
            d.path().join(".ssh/config"),
            "Include conf.d/*.conf\nInclude config\n",
        )
        .unwrap();
        let out = for_host(&asker(d.path()));
        assert_eq!(
            out.identities[..2],
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
