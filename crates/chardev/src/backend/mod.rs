//! The backends, and the connection a frontend reads and writes.

mod fd_stream;
mod file;
mod hostdev;
mod hub;
mod log;
mod mux;
mod pty;
mod relay;
mod ringbuf;
mod scm;
mod socket;
mod udp;

pub(crate) use ringbuf::Ring;
pub use scm::PassedFds;

use crate::error::{Error, Result};
use crate::registry::{self, ChardevRegistry, Origin};
use ferrite_qapi::Args;
use std::pin::Pin;
use std::rc::Rc;
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
    /// Whether the backend tells its frontend it is open (QEMU's `CHR_EVENT_OPENED`): a
    /// monitor greets only then. A `udp` chardev never does.
    pub opened: bool,
    /// Whether the output stays usable when the input ends (QEMU's fd chardevs: `stdio`,
    /// `pipe`, `file`), where a socket's peer hangs up both ways.
    pub output_outlives_input: bool,
}

/// An open backend.
pub(crate) enum Backend {
    Socket(Box<socket::Socket>),
    File(file::FileBackend),
    HostDev(hostdev::HostDev),
    Pty(pty::Pty),
    Udp(udp::Udp),
    Mux(mux::Mux),
    Hub(hub::Hub),
    Null,
    Ring(Ring),
}

/// What opening a backend needs besides its options.
pub(crate) struct OpenContext<'a> {
    /// The chardev's id.
    pub label: &'a str,
    pub origin: Origin,
    /// Whether another chardev uses standard input and output.
    pub stdio_taken: bool,
    pub registry: &'a ChardevRegistry,
}

impl Backend {
    /// Opens the backend a checked `ChardevBackend` describes.
    pub(crate) fn open(spec: &Args, cx: &OpenContext<'_>) -> Result<Backend> {
        let kind = spec.str("type")?;
        let data = spec.dict("data").unwrap_or_default();
        if !crate::opts::has_driver(kind) {
            return Err(Error::UnknownBackend(kind.to_owned()));
        }
        let log = log::LogFile::open(&data)?;
        Ok(match kind {
            "socket" => Backend::Socket(Box::new(socket::Socket::open(
                &data,
                cx.origin,
                log,
                &cx.registry.tls_objects(),
            )?)),
            "file" => Backend::File(file::FileBackend::file(&data, log)?),
            "pipe" => Backend::File(file::FileBackend::pipe(&data, log)?),
            "serial" => Backend::HostDev(hostdev::HostDev::serial(&data, log)?),
            "parallel" => Backend::HostDev(hostdev::HostDev::parallel(&data, log)?),
            "pty" => {
                // QEMU prints where a terminal is to standard output, which a monitor's
                // command does not reach and a stdio chardev owns.
                let announce = cx.origin == Origin::CommandLine && !cx.stdio_taken;
                Backend::Pty(pty::Pty::open(&data, cx.label, announce, log)?)
            }
            "udp" => Backend::Udp(udp::Udp::open(&data, log)?),
            "stdio" => {
                if cx.stdio_taken {
                    return Err(Error::StdioTwice);
                }
                Backend::File(file::FileBackend::stdio(log))
            }
            "null" => Backend::Null,
            "ringbuf" | "memory" => Backend::Ring(Ring::new(&data, kind == "memory")?),
            "mux" => {
                let name = data.str("chardev")?;
                let base = cx
                    .registry
                    .get(name)
                    .ok_or_else(|| Error::MuxBaseNotFound(name.to_owned()))?;
                Backend::Mux(mux::Mux::new(
                    base.attach_frontend()?,
                    cx.registry.quit_hook(),
                ))
            }
            "hub" => Backend::Hub(hub::Hub::new(hub_members(&data, cx)?)),
            other => return Err(Error::UnknownBackend(other.to_owned())),
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Backend::Socket(_) => "socket",
            Backend::File(f) => f.kind(),
            Backend::HostDev(d) => d.kind(),
            Backend::Pty(_) => "pty",
            Backend::Udp(_) => "udp",
            Backend::Mux(_) => "mux",
            Backend::Hub(_) => "hub",
            Backend::Null => "null",
            Backend::Ring(r) => r.kind(),
        }
    }

    pub(crate) fn filename(&self) -> String {
        match self {
            Backend::Socket(s) => s.filename(),
            Backend::Pty(p) => p.filename(),
            other => other.kind().to_owned(),
        }
    }

    /// What `chardev-add` and `chardev-change` return: the terminal of a `pty`.
    pub(crate) fn pty_device(&self) -> Option<&str> {
        match self {
            Backend::Pty(p) => Some(p.device()),
            _ => None,
        }
    }

    /// Whether a monitor on this backend may offer the `oob` capability: QEMU offers it only
    /// where the chardev can be polled from the monitor's I/O thread.
    pub(crate) fn supports_oob(&self) -> bool {
        match self {
            Backend::Socket(_) | Backend::File(_) | Backend::Pty(_) | Backend::Udp(_) => true,
            Backend::HostDev(d) => d.kind() == "serial",
            Backend::Mux(m) => m.base().is_some_and(|b| b.supports_oob()),
            Backend::Hub(_) => true,
            Backend::Null | Backend::Ring(_) => false,
        }
    }

    /// Takes a frontend slot: the mux's number for it (the focus moves to it), 0 elsewhere.
    pub(crate) fn attach(&self, label: &str, others: usize) -> Result<usize> {
        match self {
            Backend::Mux(m) => m
                .attach()
                .ok_or_else(|| Error::MuxTooMany(label.to_owned())),
            _ if others > 0 => Err(Error::InUse(label.to_owned())),
            _ => Ok(0),
        }
    }

    /// The chardevs a mux or a hub is made of.
    pub(crate) fn parts(&self) -> Vec<Rc<registry::Chardev>> {
        match self {
            Backend::Mux(m) => m.base().into_iter().collect(),
            Backend::Hub(h) => h.members(),
            _ => Vec::new(),
        }
    }

    /// Whether this is a mux or a hub (neither may be a hub's member).
    pub(crate) fn multiplexes(&self) -> bool {
        matches!(self, Backend::Mux(_) | Backend::Hub(_))
    }

    pub(crate) async fn accept(&self, tag: usize) -> Option<Connection> {
        match self {
            Backend::Socket(s) => s.accept().await,
            Backend::File(f) => f.accept(),
            Backend::HostDev(d) => d.accept(),
            Backend::Pty(p) => p.accept().await,
            Backend::Udp(u) => u.accept(),
            Backend::Mux(m) => m.accept(tag).await,
            Backend::Hub(h) => h.accept().await,
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
        match self {
            Backend::Socket(s) => s.close(),
            Backend::Pty(p) => p.close(),
            Backend::HostDev(d) => d.close(),
            Backend::Mux(m) => m.close(),
            Backend::Hub(h) => h.close(),
            _ => {}
        }
    }

    pub(crate) fn ring(&self) -> Option<&Ring> {
        match self {
            Backend::Ring(r) => Some(r),
            _ => None,
        }
    }
}

/// A hub's members, attached to it: QEMU's checks, member by member in its order. Members
/// attached before a failure are let go again.
fn hub_members(data: &Args, cx: &OpenContext<'_>) -> Result<Vec<registry::Frontend>> {
    let names: Vec<String> = data
        .get("chardevs")
        .and_then(ferrite_qobject::QObject::as_list)
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    if names.is_empty() {
        return Err(Error::HubEmpty);
    }
    let mut members: Vec<registry::Frontend> = Vec::new();
    let attach = |name: &str, attached: usize| -> Result<registry::Frontend> {
        let dev = cx
            .registry
            .get(name)
            .ok_or_else(|| Error::HubMemberNotFound(name.to_owned()))?;
        if dev.with_backend(Backend::multiplexes) {
            return Err(Error::HubStacked(name.to_owned()));
        }
        if attached >= hub::MAX_MEMBERS {
            return Err(Error::HubTooMany(cx.label.to_owned()));
        }
        dev.attach_frontend()
    };
    for name in &names {
        match attach(name, members.len()) {
            Ok(f) => members.push(f),
            Err(e) => {
                for m in members {
                    m.detach();
                }
                return Err(e);
            }
        }
    }
    Ok(members)
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
        opened: true,
        output_outlives_input: false,
    })
}
