//! The backends, and the connection a frontend reads and writes.

mod file;
mod log;
mod ringbuf;
mod scm;
mod socket;

pub(crate) use ringbuf::Ring;
pub use scm::PassedFds;

use crate::error::{Error, Result};
use crate::registry::Origin;
use ferrite_qapi::Args;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};

/// The input half of a connection.
pub type Reader = Pin<Box<dyn AsyncRead>>;
/// The output half of a connection.
pub type Writer = Pin<Box<dyn AsyncWrite>>;

/// One connection of a frontend to its backend.
pub struct Connection {
    /// Bytes from the peer.
    pub reader: Reader,
    /// Bytes to the peer.
    pub writer: Writer,
    /// Descriptors the peer passed (unix sockets only).
    pub fds: Option<std::rc::Rc<PassedFds>>,
}

/// An open backend.
pub(crate) enum Backend {
    Socket(Box<socket::Socket>),
    File(file::FileBackend),
    Null,
    Ring(Ring),
}

impl Backend {
    /// Opens the backend a checked `ChardevBackend` describes.
    pub(crate) fn open(
        spec: &Args,
        origin: Origin,
        stdio_taken: bool,
        tls: &ferrite_tls::Objects,
    ) -> Result<Backend> {
        let kind = spec.str("type")?;
        let data = spec.dict("data").unwrap_or_default();
        let log = log::LogFile::open(&data)?;
        Ok(match kind {
            "socket" => Backend::Socket(Box::new(socket::Socket::open(&data, origin, log, tls)?)),
            "file" => Backend::File(file::FileBackend::file(&data, log)?),
            "pipe" => Backend::File(file::FileBackend::pipe(&data, log)?),
            "stdio" => {
                if stdio_taken {
                    return Err(Error::StdioTwice);
                }
                Backend::File(file::FileBackend::stdio(log))
            }
            "null" => Backend::Null,
            "ringbuf" | "memory" => Backend::Ring(Ring::new(&data, kind == "memory")?),
            other => {
                return Err(Error::UnknownBackend(other.to_owned()));
            }
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Backend::Socket(_) => "socket",
            Backend::File(f) => f.kind(),
            Backend::Null => "null",
            Backend::Ring(r) => r.kind(),
        }
    }

    pub(crate) fn filename(&self) -> String {
        match self {
            Backend::Socket(s) => s.filename(),
            other => other.kind().to_owned(),
        }
    }

    /// Whether a monitor on this backend may offer the `oob` capability: QEMU offers it only
    /// where the chardev can be polled from the monitor's I/O thread.
    pub(crate) fn supports_oob(&self) -> bool {
        matches!(self, Backend::Socket(_) | Backend::File(_))
    }

    pub(crate) async fn accept(&self) -> Option<Connection> {
        match self {
            Backend::Socket(s) => s.accept().await,
            Backend::File(f) => f.accept(),
            Backend::Null => idle_once(),
            Backend::Ring(r) => r.connect(),
        }
    }

    /// Socket servers with `wait=on`: waits for the first client before startup goes on.
    pub(crate) async fn wait_for_client(&self) {
        if let Backend::Socket(s) = self {
            s.wait_for_client().await;
        }
    }

    pub(crate) fn disconnected(&self) {
        if let Backend::Socket(s) = self {
            s.disconnected();
        }
    }

    pub(crate) fn close(&self) {
        if let Backend::Socket(s) = self {
            s.close();
        }
    }

    pub(crate) fn ring(&self) -> Option<&Ring> {
        match self {
            Backend::Ring(r) => Some(r),
            _ => None,
        }
    }
}

/// A reader that never yields data and never ends: a backend with no input.
pub(crate) struct NoInput;

impl AsyncRead for NoInput {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        _buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// The null backend's connection: no input, output discarded.
fn idle_once() -> Option<Connection> {
    Some(Connection {
        reader: Box::pin(NoInput),
        writer: Box::pin(tokio::io::sink()),
        fds: None,
    })
}
