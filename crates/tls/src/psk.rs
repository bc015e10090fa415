//! `tls-creds-psk` (QEMU: `crypto/tlscredspsk.c`): a pre-shared key per user name, in a
//! directory's `keys.psk` (lines `name:hexkey`, as GnuTLS's `psktool` writes them). A
//! client takes its key when the object is created; a server reads the file at each
//! handshake, as GnuTLS does, so keys added meanwhile are found.

use crate::creds::{Endpoint, os_msg, path_of};

const PSK_FILE: &str = "keys.psk";
const DH_PARAMS: &str = "dh-params.pem";
/// The user name a client goes by when none is given (QEMU's).
const DEFAULT_USERNAME: &str = "qemu";

/// What a `tls-creds-psk` object was created with.
#[derive(Debug, Clone)]
pub struct PskOptions {
    /// The directory of `keys.psk`.
    pub dir: Option<String>,
    /// The end they are for.
    pub endpoint: Endpoint,
    /// The client's user name (its PSK identity).
    pub username: Option<String>,
}

/// Loaded pre-shared-key credentials.
#[derive(Debug)]
pub struct PskCreds {
    options: PskOptions,
    /// The key file.
    file: String,
    /// A client's identity and key.
    own: Option<(String, Vec<u8>)>,
}

impl PskCreds {
    /// Loads the credentials as QEMU does when the object completes.
    ///
    /// # Errors
    /// QEMU's texts: a user name given to a server, a file that is not there, a user the
    /// file does not name.
    pub fn load(options: PskOptions) -> Result<PskCreds, String> {
        let dir = options.dir.as_deref();
        if options.endpoint == Endpoint::Server {
            if options.username.is_some() {
                return Err("username should not be set when endpoint=server".into());
            }
            if let Some(path) = path_of(dir, DH_PARAMS, false)? {
                // Keys are agreed by elliptic curves only: the parameters are read, as
                // QEMU reads them, and not used.
                std::fs::read(&path).map_err(|e| {
                    format!("Failed to open file \u{201c}{path}\u{201d}: {}", os_msg(&e))
                })?;
            }
        }
        let file = path_of(dir, PSK_FILE, true)?.unwrap_or_default();
        let own = match options.endpoint {
            Endpoint::Server => None,
            Endpoint::Client => {
                let user = options.username.as_deref().unwrap_or(DEFAULT_USERNAME);
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("Cannot read PSK file {file}: {}", os_msg(&e)))?;
                let key = find_key(&text, user)
                    .ok_or_else(|| format!("Username {user} not found in PSK file {file}"))?;
                Some((user.to_owned(), key))
            }
        };
        Ok(PskCreds { options, file, own })
    }

    /// The end they are for.
    pub fn endpoint(&self) -> Endpoint {
        self.options.endpoint
    }

    /// What they were created with.
    pub fn options(&self) -> &PskOptions {
        &self.options
    }

    /// A client's identity and key.
    pub(crate) fn own(&self) -> Option<(&str, &[u8])> {
        self.own.as_ref().map(|(u, k)| (u.as_str(), k.as_slice()))
    }

    /// A server's key for `identity`, read from the file now; `None` for a user it does not
    /// name (or a file that cannot be read).
    pub(crate) fn key_of(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let user = std::str::from_utf8(identity).ok()?;
        let text = std::fs::read_to_string(&self.file).ok()?;
        find_key(&text, user)
    }
}

/// The key of `user` in a key file's text: the first line `user:HEX` (GnuTLS decodes the hex;
/// a key that is not hex is no key).
fn find_key(text: &str, user: &str) -> Option<Vec<u8>> {
    let line = text.lines().find(|l| {
        l.strip_prefix(user)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    hex(line[user.len() + 1..].trim_end())
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_by_whole_user_names() {
        let text = "alice2:00ff\nalice:0102aB\nbob:zz\n";
        assert_eq!(find_key(text, "alice"), Some(vec![1, 2, 0xab]));
        assert_eq!(find_key(text, "alice2"), Some(vec![0, 0xff]));
        assert_eq!(find_key(text, "bob"), None);
        assert_eq!(find_key(text, "ali"), None);
        assert_eq!(find_key(text, "carol"), None);
    }

    #[test]
    fn texts_are_qemus() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let opts = |endpoint, username: Option<&str>| PskOptions {
            dir: Some(d.clone()),
            endpoint,
            username: username.map(str::to_owned),
        };
        let e = PskCreds::load(opts(Endpoint::Client, Some("x"))).unwrap_err();
        assert_eq!(
            e,
            format!("Unable to access credentials {d}/keys.psk: No such file or directory")
        );
        let e = PskCreds::load(opts(Endpoint::Server, Some("x"))).unwrap_err();
        assert_eq!(e, "username should not be set when endpoint=server");
        std::fs::write(dir.path().join("keys.psk"), "alice:0011\n").unwrap();
        let e = PskCreds::load(opts(Endpoint::Client, None)).unwrap_err();
        assert_eq!(
            e,
            format!("Username qemu not found in PSK file {d}/keys.psk")
        );
        let c = PskCreds::load(opts(Endpoint::Client, Some("alice"))).unwrap();
        assert_eq!(c.own(), Some(("alice", &[0u8, 0x11][..])));
        let s = PskCreds::load(opts(Endpoint::Server, None)).unwrap();
        assert_eq!(s.key_of(b"alice"), Some(vec![0, 0x11]));
        std::fs::write(dir.path().join("keys.psk"), "alice:0011\nbob:22\n").unwrap();
        assert_eq!(s.key_of(b"bob"), Some(vec![0x22]));
    }
}
