//! The way to an open remote file, step by step as QEMU's `connect_to_ssh` takes it: the
//! TCP connection, the SSH session, the server's key judged, the user authenticated
//! (`none`, then public keys: the agent's, then `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`,
//! as libssh's `ssh_userauth_publickey_auto`), SFTP started and the file opened. Each
//! failure in QEMU's words, libssh's quoted inside them.

use crate::config;
use crate::known_hosts::{self, Verdict};
use crate::options::{HashKind, HostKeyCheck, Location};
use crate::sftp::Sftp;
use base64::Engine;
use russh::client::{self, AuthResult, Handle};
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey};
use sha2::Digest;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Receives the server's key during the key exchange; it is judged once the session is up,
/// where QEMU judges it.
struct KeyKeeper(Arc<Mutex<Option<PublicKey>>>);

impl client::Handler for KeyKeeper {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key
            && let Ok(mut kept) = self.0.lock()
        {
            *kept = Some(key.clone());
        }
        Ok(true)
    }
}

/// A session with the file open.
pub(crate) struct Remote {
    ssh: Handle<KeyKeeper>,
    pub(crate) sftp: Sftp,
    pub(crate) handle: Vec<u8>,
    /// The file's size at open.
    pub(crate) size: u64,
    /// The user name in the node's file name.
    pub(crate) user: String,
}

/// The local account: its name (the default remote user) and home (where `~/.ssh` is), from
/// the password database as libssh and GLib take them.
pub(crate) fn local_account() -> (Option<String>, Option<PathBuf>) {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid out-parameter; getpwuid_r fills it with
    // pointers into `buf`, which outlives their use below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: the pointers are valid for the sizes given.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &raw mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &raw mut found,
        )
    };
    let field = |p: *const libc::c_char| {
        (!p.is_null()).then(|| {
            // SAFETY: on success the fields are NUL-terminated strings inside `buf`, which
            // lives until the function returns.
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        })
    };
    if rc != 0 || found.is_null() {
        return (None, std::env::var_os("HOME").map(PathBuf::from));
    }
    (field(pwd.pw_name), field(pwd.pw_dir).map(PathBuf::from))
}

/// Connects to `loc`'s server and opens its file with `SSH_FXF_*` `flags` (creating it
/// with `mode` if asked).
///
/// # Errors
/// QEMU's texts.
pub(crate) async fn open(loc: &Location, flags: u32, mode: Option<u32>) -> Result<Remote, String> {
    let (account, home) = local_account();
    let user = match &loc.user {
        Some(u) => u.clone(),
        None => account
            .clone()
            .ok_or("Can't get user name: No such file or directory")?,
    };
    // Any C int passes QEMU's check; what is no port fails to resolve.
    let port: i32 = loc
        .port
        .parse()
        .map_err(|_| "Use only numeric port value".to_owned())?;
    let stream = connect_tcp(loc).await?;
    let port = u16::try_from(port).unwrap_or_default();
    if user.is_empty() {
        return Err(
            "failed to set the user in the libssh session: Invalid argument in \
                    ssh_options_set (libssh error code: 2)"
                .into(),
        );
    }
    let cfg = config::for_host(&config::Asker {
        home: home.as_deref(),
        local_user: account.as_deref().unwrap_or_default(),
        remote_user: &user,
        host: &loc.host,
    });
    let known_files = known_hosts::files(home.as_deref(), &cfg);
    let known_name =
        known_hosts::host_key_name(cfg.host_name.as_deref().unwrap_or(&loc.host), port);
    let mut preferred = russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(CIPHERS),
        ..Default::default()
    };
    if loc.check == HostKeyCheck::KnownHosts {
        preferred.key = key_order(&known_hosts::known_types(&known_files, &known_name)).into();
    }
    let config = Arc::new(client::Config {
        preferred,
        window_size: 16 << 20,
        ..Default::default()
    });
    let kept = Arc::new(Mutex::new(None));
    let handshake = client::connect_stream(config, stream, KeyKeeper(kept.clone()));
    let mut ssh = tokio::time::timeout(CONNECT_WAIT, handshake)
        .await
        .map_err(|_| {
            format!(
                "failed to establish SSH session: Timeout connecting to {} (libssh error \
                 code: 2)",
                loc.host
            )
        })?
        .map_err(|e| {
            format!(
                "failed to establish SSH session: {} (libssh error code: 2)",
                session_error(&e)
            )
        })?;
    let key = kept
        .lock()
        .ok()
        .and_then(|mut k| k.take())
        .ok_or("failed to read remote host key")?;
    check_host_key(&loc.check, &key, &known_files, &known_name)?;
    let identities = default_identities(home.as_deref())
        .chain(cfg.identities)
        .collect::<Vec<_>>();
    authenticate(&mut ssh, &user, &identities).await?;
    let channel = ssh.channel_open_session().await.map_err(|e| {
        format!(
            "failed to create sftp handle: {} (libssh error code: 2)",
            session_error(&e)
        )
    })?;
    let sftp = Sftp::start(channel).await.map_err(|e| {
        format!("failed to initialize sftp handle: {e} (libssh error code: 2, sftp error code: 0)")
    })?;
    let handle = sftp
        .open(&loc.path, flags, mode)
        .await
        .map_err(|e| format!("failed to open remote file '{}': {e}", loc.path))?;
    let attrs = sftp
        .fstat(&handle)
        .await
        .map_err(|e| format!("failed to read file attributes: {e}"))?;
    Ok(Remote {
        ssh,
        sftp,
        handle,
        size: attrs.size.unwrap_or(0),
        user,
    })
}

/// How long the SSH handshake may take (libssh's default timeout, as QEMU leaves it).
const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long closing the file may wait for the server.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Ciphers in ferrite's order: AES-GCM first (the CPU does AES; libssh under QEMU starts
/// with ChaCha20), then russh's others.
const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_256_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_128_CTR,
];

/// The host key algorithms to ask for: those `known_hosts` holds for the server first, as
/// libssh orders them, so the server shows the key the file vouches for.
fn key_order(known: &[String]) -> Vec<Algorithm> {
    let all = russh::Preferred::DEFAULT.key.to_vec();
    let mut out: Vec<Algorithm> = Vec::new();
    for kind in known {
        out.extend(all.iter().filter(|a| key_type(a) == kind).cloned());
    }
    let rest: Vec<Algorithm> = all.into_iter().filter(|a| !out.contains(a)).collect();
    out.extend(rest);
    out
}

/// The key type a host key algorithm shows (`ssh-rsa` for each RSA signature hash).
fn key_type(a: &Algorithm) -> &str {
    match a {
        Algorithm::Rsa { .. } => "ssh-rsa",
        other => other.as_str(),
    }
}

/// libssh's words for a session that could not be set up.
fn session_error(e: &russh::Error) -> String {
    match e {
        russh::Error::Disconnect
        | russh::Error::HUP
        | russh::Error::IO(_)
        | russh::Error::SendError
        | russh::Error::RecvError => "Socket error: disconnected".into(),
        other => other.to_string(),
    }
}

/// The TCP connection to the server's first address that answers (QEMU's
/// `inet_connect_saddr`).
async fn connect_tcp(loc: &Location) -> Result<tokio::net::TcpStream, String> {
    let s = ferrite_socket::inet::connect_async(&loc.server)
        .await
        .map_err(|e| e.to_string())?;
    if let Err(e) = s.set_nodelay(true) {
        ferrite_block::report::warn_report(&format!(
            "can't set TCP_NODELAY for the ssh server {}: {}",
            loc.host,
            ferrite_qapi::os_msg(&e)
        ));
    }
    Ok(s)
}

/// Judges the server's key as `host-key-check` says.
fn check_host_key(
    check: &HostKeyCheck,
    key: &PublicKey,
    known_files: &[PathBuf],
    known_name: &str,
) -> Result<(), String> {
    let blob = key
        .to_bytes()
        .map_err(|_| "failed reading the hash of the server SSH key".to_owned())?;
    let kind = key_type(&key.algorithm()).to_owned();
    match check {
        HostKeyCheck::None => Ok(()),
        HostKeyCheck::Hash {
            kind: hash,
            hash: want,
        } => {
            let got = match hash {
                HashKind::Md5 => md5::Md5::digest(&blob).to_vec(),
                HashKind::Sha1 => sha1::Sha1::digest(&blob).to_vec(),
                HashKind::Sha256 => sha2::Sha256::digest(&blob).to_vec(),
            };
            if fingerprint_matches(&got, want) {
                return Ok(());
            }
            let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
            let name = hash.as_str();
            Err(format!(
                "remote host {kind} key fingerprint '{name}:{hex}' does not match \
                 host_key_check '{name}:{want}'"
            ))
        }
        HostKeyCheck::KnownHosts => match known_hosts::check(known_files, known_name, &kind, &blob)
        {
            Verdict::Known => Ok(()),
            Verdict::Changed => {
                let fp = base64::engine::general_purpose::STANDARD_NO_PAD
                    .encode(sha2::Sha256::digest(&blob));
                Err(format!(
                    "host key ({kind} key with fingerprint SHA256:{fp}) does not match the one \
                     in known_hosts; this may be a possible attack"
                ))
            }
            Verdict::OtherType => {
                Err("host key for this server not found, another type exists".into())
            }
            Verdict::Unknown => Err("no host key was found in known_hosts".into()),
        },
    }
}

/// QEMU's comparison: hex digits, upper or lower case, with any `:` between bytes, and
/// nothing after the last.
fn fingerprint_matches(hash: &[u8], text: &str) -> bool {
    let mut t = text.as_bytes();
    for &b in hash {
        while let [b':', rest @ ..] = t {
            t = rest;
        }
        let [h, l, rest @ ..] = t else {
            return false;
        };
        let (Some(h), Some(l)) = ((*h as char).to_digit(16), (*l as char).to_digit(16)) else {
            return false;
        };
        if (h * 16 + l) as u8 != b {
            return false;
        }
        t = rest;
    }
    t.is_empty()
}

/// libssh's identity files: `~/.ssh/id_ed25519`, `id_ecdsa`, `id_rsa`.
fn default_identities(home: Option<&std::path::Path>) -> impl Iterator<Item = PathBuf> + '_ {
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .into_iter()
        .filter_map(move |n| Some(home?.join(".ssh").join(n)))
}

/// `none`, then each public key libssh would try: the agent's, then the identity files
/// (the default ones, then those the ssh configuration names) that load without a
/// passphrase.
async fn authenticate(
    ssh: &mut Handle<KeyKeeper>,
    user: &str,
    identities: &[PathBuf],
) -> Result<(), String> {
    const DENIED: &str = "failed to authenticate using publickey authentication and the \
                          identities held by your ssh-agent";
    let methods = match ssh.authenticate_none(user).await {
        Ok(AuthResult::Success) => return Ok(()),
        Ok(AuthResult::Failure {
            remaining_methods, ..
        }) => remaining_methods,
        Err(e) => {
            return Err(format!(
                "failed to authenticate using none authentication: {} (libssh error code: 2)",
                session_error(&e)
            ));
        }
    };
    if !methods.contains(&russh::MethodKind::PublicKey) {
        return Err(DENIED.into());
    }
    let rsa_hash = ssh.best_supported_rsa_hash().await.ok().flatten().flatten();
    let hash_for = |k: &Algorithm| {
        matches!(k, Algorithm::Rsa { .. })
            .then_some(rsa_hash)
            .flatten()
    };
    if let Ok(mut agent) = russh::keys::agent::client::AgentClient::connect_env().await
        && let Ok(ids) = agent.request_identities().await
    {
        for id in ids {
            let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id else {
                continue;
            };
            let hash = hash_for(&key.algorithm());
            if let Ok(AuthResult::Success) = ssh
                .authenticate_publickey_with(user, key, hash, &mut agent)
                .await
            {
                return Ok(());
            }
        }
    }
    for path in identities {
        let Ok(key) = russh::keys::load_secret_key(path, None) else {
            continue;
        };
        let hash = hash_for(&key.algorithm());
        let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
        if let Ok(AuthResult::Success) = ssh.authenticate_publickey(user, key).await {
            return Ok(());
        }
    }
    Err(DENIED.into())
}

impl Remote {
    /// Closes the file and ends the session; a server that does not answer within
    /// [`CLOSE_WAIT`] is left behind (QEMU would wait for it for ever).
    pub(crate) async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.sftp.close(&self.handle)).await;
        let _ = self
            .ssh
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_as_in_qemu() {
        let h = [0xa4, 0x25, 0x0f];
        assert!(fingerprint_matches(&h, "a4250f"));
        assert!(fingerprint_matches(&h, "A4:25:0F"));
        assert!(fingerprint_matches(&h, "a4::25:0f"));
        assert!(!fingerprint_matches(&h, "a4250f:"));
        assert!(!fingerprint_matches(&h, "a4250"));
        assert!(!fingerprint_matches(&h, "a4250f00"));
        assert!(!fingerprint_matches(&h, "zz"));
    }

    #[test]
    fn known_key_types_are_asked_for_first() {
        let order = key_order(&["ssh-rsa".to_owned()]);
        assert_eq!(key_type(&order[0]), "ssh-rsa");
        assert_eq!(order.len(), russh::Preferred::DEFAULT.key.len());
        assert_eq!(key_order(&[]), russh::Preferred::DEFAULT.key.to_vec());
    }
}
