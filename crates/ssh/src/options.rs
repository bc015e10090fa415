//! A node's options (`BlockdevOptionsSsh`): where the file is and how the server is
//! judged.

use ferrite_qapi::{Args, Error};
use ferrite_socket::InetAddr;

/// The hash `host-key-check` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashKind {
    Md5,
    Sha1,
    Sha256,
}

impl HashKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HashKind::Md5 => "md5",
            HashKind::Sha1 => "sha1",
            HashKind::Sha256 => "sha256",
        }
    }
}

/// How the server's key is judged (`SshHostKeyCheck`; `known_hosts` unless said).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostKeyCheck {
    None,
    Hash { kind: HashKind, hash: String },
    KnownHosts,
}

/// Where the file is and as whom it is reached.
#[derive(Debug, Clone)]
pub(crate) struct Location {
    pub(crate) host: String,
    pub(crate) port: String,
    /// The whole server address, for connecting as QEMU does.
    pub(crate) server: InetAddr,
    /// Without `ipv4`, `ipv6`, `to` or `numeric`: the address fits an `ssh://` name.
    pub(crate) plain: bool,
    pub(crate) path: String,
    pub(crate) user: Option<String>,
    pub(crate) check: HostKeyCheck,
}

impl Location {
    /// Reads `BlockdevOptionsSsh` (checked by the schema).
    ///
    /// # Errors
    /// A member the schema leaves to the driver is missing.
    pub(crate) fn parse(opts: &Args) -> Result<Location, Error> {
        let server = opts
            .dict("server")
            .ok_or_else(|| Error::generic("Parameter 'server' is missing"))?;
        let check = match opts.dict("host-key-check") {
            None => HostKeyCheck::KnownHosts,
            Some(c) => match c.str("mode")? {
                "none" => HostKeyCheck::None,
                "hash" => HostKeyCheck::Hash {
                    kind: match c.str("type")? {
                        "md5" => HashKind::Md5,
                        "sha1" => HashKind::Sha1,
                        _ => HashKind::Sha256,
                    },
                    hash: c.str("hash")?.to_owned(),
                },
                _ => HostKeyCheck::KnownHosts,
            },
        };
        Ok(Location {
            host: server.str("host")?.to_owned(),
            port: server.str("port")?.to_owned(),
            server: InetAddr::parse(&server)?,
            plain: ["ipv4", "ipv6", "to", "numeric"]
                .iter()
                .all(|k| !server.has(k)),
            path: opts.str("path")?.to_owned(),
            user: opts.opt_str("user").map(str::to_owned),
            check,
        })
    }

    /// The node's file name (QEMU's `ssh_refresh_filename`): `ssh://USER@HOST:PORT/PATH`,
    /// with the user the session logged in as; none when the address has options a URL
    /// cannot carry.
    pub(crate) fn file_name(&self, user: &str) -> Option<String> {
        self.plain
            .then(|| format!("ssh://{user}@{}:{}{}", self.host, self.port, self.path))
    }
}
