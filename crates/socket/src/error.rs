//! Why a socket could not be made, in QEMU's words (`util/qemu-sockets.c`).

use ferrite_qapi::os_msg;
use std::io;

/// A socket address that could not be resolved, listened on or connected to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An inet address with both IPv4 and IPv6 turned off.
    #[error("Cannot disable IPv4 and IPv6 at same time")]
    NoAddressFamily,
    /// A host and port that do not resolve.
    #[error("address resolution failed for {host}:{port}: {reason}")]
    Resolve {
        /// The host, as given.
        host: String,
        /// The port, as given.
        port: String,
        /// `getaddrinfo`'s words.
        reason: String,
    },
    /// A unix socket path longer than a socket address holds.
    #[error("UNIX socket path '{path}' is too long")]
    PathTooLong {
        /// The path (or abstract name).
        path: String,
        /// How many bytes would fit.
        limit: usize,
    },
    /// A vsock CID or port that is no decimal `unsigned int` (`cid 'x'`, `port 'x'`).
    #[error("Failed to parse {0}")]
    Parse(String),
    /// A system call that failed, with QEMU's words for what it was doing
    /// ("Failed to bind socket", "Failed to connect to 'host:port'"...).
    #[error("{what}: {}", os_msg(.error))]
    Os {
        /// What failed.
        what: String,
        /// Why.
        error: io::Error,
    },
}

impl Error {
    pub(crate) fn os(what: impl Into<String>, error: impl Into<io::Error>) -> Error {
        Error::Os {
            what: what.into(),
            error: error.into(),
        }
    }
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        let qapi = ferrite_qapi::Error::generic(e.to_string());
        match e {
            Error::PathTooLong { limit, .. } => {
                qapi.with_hint(format!("Path must be less than {limit} bytes"))
            }
            _ => qapi,
        }
    }
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
