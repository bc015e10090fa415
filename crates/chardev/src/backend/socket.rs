//! `socket`: listen on or connect to a unix or TCP address, or use an inherited socket fd;
//! with `tls-creds`, each connection runs TLS (QEMU's rules: TCP or an inherited listening
//! fd only; a handshake that fails drops that connection, the chardev waits for the next).

use super::Connection;
use super::log::LogFile;
use crate::error::{Error, Result};
use crate::registry::Origin;
use ferrite_qapi::Args;
use ferrite_socket::SocketAddress;
use std::cell::{Cell, RefCell};
use std::os::fd::AsFd;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// Where the socket is: as the user gave it, then, for a listener, as the kernel bound it
/// (QEMU names a listening chardev by its local address: numbers, the port a range gave, the
/// file a unix socket without a path got).
#[derive(Clone)]
struct Addr {
    at: SocketAddress,
    nodelay: bool,
}

impl Addr {
    fn parse(data: &Args) -> Result<Addr> {
        let addr = data
            .dict("addr")
            .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'addr' is missing"))?;
        Ok(Addr {
            at: SocketAddress::parse_legacy(&addr)?,
            nodelay: data.bool_or("nodelay", false),
        })
    }

    /// QEMU's `SocketAddress_to_str`.
    fn describe(&self) -> String {
        self.at.describe()
    }

    /// What "Failed to connect to '...'" names.
    fn target(&self) -> String {
        self.at.target()
    }

    /// A connected unix socket's name: QEMU reads the path from the socket, where an
    /// abstract name reads as empty.
    fn connected_unix(&self) -> String {
        match &self.at {
            SocketAddress::Unix(u) if u.abstract_ns => "unix:".to_owned(),
            other => other.describe(),
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
    /// Its connections come as unix streams (see `ferrite_socket::vsock`).
    Vsock(ferrite_socket::vsock::Listener),
}

/// A connected socket before anything runs on it.
enum Raw {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// TLS on every connection (`tls-creds`, `tls-authz`).
struct Tls {
    creds: Rc<ferrite_tls::Creds>,
    /// The authorization object a server judges clients by.
    authz: Option<String>,
    objects: ferrite_tls::Objects,
    /// The name a client expects in the server's certificate (the address's host).
    hostname: Option<String>,
}

/// A socket chardev.
pub(crate) struct Socket {
    addr: Addr,
    /// Whether this is the listening end (with no listener when it listens on nothing).
    server: bool,
    listener: Option<Listener>,
    /// A connection made before any frontend asked (client mode, or `wait=on`).
    pending: RefCell<Option<Connection>>,
    /// The connected peer, for `filename`.
    peer: RefCell<Option<String>>,
    reconnect: Option<Duration>,
    /// Client mode: whether the one connection has been used (and may be re-made).
    used: Cell<bool>,
    log: Option<LogFile>,
    /// A unix socket path this chardev created and removes on close.
    unlink: Option<PathBuf>,
    tls: Option<Tls>,
    /// Client mode with TLS: the connection made at creation, its handshake still to run.
    pending_raw: RefCell<Option<Raw>>,
}

fn io_err(what: &'static str, target: &str, e: &std::io::Error) -> Error {
    Error::Socket {
        what,
        target: target.to_owned(),
        error: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl Socket {
    pub(crate) fn open(
        data: &Args,
        origin: Origin,
        log: Option<LogFile>,
        objects: &ferrite_tls::Objects,
    ) -> Result<Self> {
        let addr = Addr::parse(data)?;
        // QMP's ChardevSocket defaults to a server; QemuOpts to a client.
        let server = data.bool_or("server", origin == Origin::Qmp);
        let reconnect = data
            .opt_i64("reconnect-ms")
            .or_else(|| data.opt_i64("reconnect").map(|s| s.saturating_mul(1000)))
            .filter(|&ms| ms > 0)
            .map(|ms| Duration::from_millis(ms as u64));
        // QEMU looks the credentials up before it checks the socket's options.
        let tls = Tls::from_options(data, &addr, server, objects)?;
        check_options(data, &addr, server)?;
        if data.bool_or("telnet", false)
            || data.bool_or("tn3270", false)
            || data.bool_or("websocket", false)
        {
            return Err(Error::SocketProtocolUnsupported);
        }
        let mut sock = Socket {
            addr: addr.clone(),
            server,
            listener: None,
            pending: RefCell::new(None),
            peer: RefCell::new(None),
            reconnect,
            used: Cell::new(false),
            log,
            unlink: None,
            tls,
            pending_raw: RefCell::new(None),
        };
        if let SocketAddress::Fd(fd) = &addr.at {
            if server && fd.is_empty() {
                // QEMU listens on nothing then: the chardev stays disconnected, as no client
                // can come (where QEMU, told to wait for one, waits for good, this does not).
            } else if origin == Origin::Qmp {
                // A name the monitor keeps (`getfd`).
                let owned = ferrite_socket::monitor_fd::take_socket(fd).map_err(Error::Fd)?;
                sock.adopt(owned, fd, server)?;
            } else {
                sock.adopt_fd(fd, server)?;
            }
        } else if server {
            sock.listen()?;
        } else if sock.tls.is_some() {
            let raw = sock.connect_raw()?;
            *sock.pending_raw.borrow_mut() = Some(raw);
        } else {
            match sock.connect_now() {
                Ok(conn) => *sock.pending.borrow_mut() = Some(conn),
                // With `reconnect`, QEMU connects in the background: a first attempt that
                // fails is retried as a lost connection is.
                Err(_) if sock.reconnect.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(sock)
    }

    fn listen(&mut self) -> Result<()> {
        let fail = |e: std::io::Error| ferrite_socket::Error::Os {
            what: "Failed to listen on socket".into(),
            error: e,
        };
        match &mut self.addr.at {
            SocketAddress::Unix(u) => {
                let made = ferrite_socket::unix::listen(u, 1)?;
                if let Some(file) = &made.file {
                    u.path = file.to_string_lossy().into_owned();
                }
                self.unlink = made.file;
                made.listener.set_nonblocking(true).map_err(fail)?;
                let l = UnixListener::from_std(made.listener).map_err(fail)?;
                self.listener = Some(Listener::Unix(l));
            }
            SocketAddress::Inet(a) => {
                let l = ferrite_socket::inet::listen(a, 1)?;
                if let Ok(local) = l.local_addr() {
                    a.host = local.ip().to_string();
                    a.port = local.port().to_string();
                }
                l.set_nonblocking(true).map_err(fail)?;
                let l = TcpListener::from_std(l).map_err(fail)?;
                self.listener = Some(Listener::Tcp(l));
            }
            SocketAddress::Vsock(v) => {
                let sock = ferrite_socket::vsock::listen(v, 1)?;
                let l = ferrite_socket::vsock::Listener::new(sock).map_err(fail)?;
                self.listener = Some(Listener::Vsock(l));
            }
            SocketAddress::Fd(_) => {}
        }
        Ok(())
    }

    fn connect_now(&self) -> Result<Connection> {
        Ok(match self.connect_raw()? {
            Raw::Unix(s) => self.wrap_unix(s),
            Raw::Tcp(s) => self.wrap_tcp(s),
        })
    }

    fn connect_raw(&self) -> Result<Raw> {
        let target = self.addr.target();
        let fail = |e: std::io::Error| io_err("Failed to connect to", &target, &e);
        match &self.addr.at {
            SocketAddress::Unix(u) => {
                let s = ferrite_socket::unix::connect(u)?;
                s.set_nonblocking(true).map_err(fail)?;
                *self.peer.borrow_mut() = Some(self.addr.connected_unix());
                Ok(Raw::Unix(UnixStream::from_std(s).map_err(fail)?))
            }
            SocketAddress::Inet(a) => {
                let s = ferrite_socket::inet::connect(a)?;
                s.set_nonblocking(true).map_err(fail)?;
                let s = TcpStream::from_std(s).map_err(fail)?;
                let _ = s.set_nodelay(self.addr.nodelay);
                *self.peer.borrow_mut() = Some(tcp_desc(&s, false));
                Ok(Raw::Tcp(s))
            }
            SocketAddress::Vsock(v) => {
                let s = ferrite_socket::vsock::connect(v)?;
                s.set_nonblocking(true).map_err(fail)?;
                *self.peer.borrow_mut() = Some(self.addr.describe());
                Ok(Raw::Unix(UnixStream::from_std(s).map_err(fail)?))
            }
            SocketAddress::Fd(_) => Err(Error::FdOverQmp),
        }
    }

    /// Takes over a socket the parent process left open as fd `fd`.
    fn adopt_fd(&mut self, fd: &str, server: bool) -> Result<()> {
        let num: i32 = fd.parse().map_err(|_| Error::FdNumber(fd.to_owned()))?;
        let bad = || Error::FdNotSocket(fd.to_owned());
        // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number fails with EBADF.
        if num < 0 || unsafe { libc::fcntl(num, libc::F_GETFD) } < 0 {
            return Err(Error::FdNotOpen(fd.to_owned()));
        }
        ferrite_socket::fd::family(num).ok_or_else(bad)?;
        // SAFETY: the descriptor is open (checked above), is a socket (getsockname succeeded)
        // and was handed to this process on the command line to own; nothing else in the
        // daemon refers to it, so taking ownership cannot double-close it.
        let owned = unsafe { OwnedFd::from_raw_fd(num) };
        self.adopt(owned, fd, server)
    }

    /// Takes over socket `owned` (named `fd` in messages), listening on it or connected.
    fn adopt(&mut self, owned: OwnedFd, fd: &str, server: bool) -> Result<()> {
        let bad = || Error::FdNotSocket(fd.to_owned());
        let family = ferrite_socket::fd::family(owned.as_raw_fd()).ok_or_else(bad)?;
        let fail = |e: std::io::Error| io_err("Failed to use socket", fd, &e);
        match (family, server) {
            (libc::AF_UNIX, true) => {
                let l = std::os::unix::net::UnixListener::from(owned);
                l.set_nonblocking(true).map_err(fail)?;
                self.listener = Some(Listener::Unix(UnixListener::from_std(l).map_err(fail)?));
            }
            (libc::AF_UNIX, false) => {
                let s = std::os::unix::net::UnixStream::from(owned);
                s.set_nonblocking(true).map_err(fail)?;
                let conn = self.wrap_unix(UnixStream::from_std(s).map_err(fail)?);
                *self.pending.borrow_mut() = Some(conn);
            }
            (libc::AF_INET | libc::AF_INET6, true) => {
                let l = std::net::TcpListener::from(owned);
                l.set_nonblocking(true).map_err(fail)?;
                self.listener = Some(Listener::Tcp(TcpListener::from_std(l).map_err(fail)?));
            }
            (libc::AF_INET | libc::AF_INET6, false) => {
                let s = std::net::TcpStream::from(owned);
                s.set_nonblocking(true).map_err(fail)?;
                let conn = self.wrap_tcp(TcpStream::from_std(s).map_err(fail)?);
                *self.pending.borrow_mut() = Some(conn);
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    fn wrap_unix(&self, s: UnixStream) -> Connection {
        let (r, w) = s.into_split();
        let fds = std::rc::Rc::new(super::PassedFds::default());
        Connection {
            reader: Box::pin(super::scm::ScmReader::new(r, fds.clone())),
            writer: LogFile::tee(self.log.clone(), Box::pin(w)),
            fds: Some(fds),
            opened: true,
            output_outlives_input: false,
        }
    }

    fn wrap_tcp(&self, s: TcpStream) -> Connection {
        let (r, w) = s.into_split();
        Connection {
            reader: Box::pin(r),
            writer: LogFile::tee(self.log.clone(), Box::pin(w)),
            fds: None,
            opened: true,
            output_outlives_input: false,
        }
    }

    fn is_server(&self) -> bool {
        self.server
    }

    /// Whether startup must wait for a client first (`server=on,wait=on`).
    pub(crate) async fn wait_for_client(&self) {
        if self.pending.borrow().is_some() {
            return;
        }
        if let Some(conn) = self.accept_listener().await {
            *self.pending.borrow_mut() = Some(conn);
        }
    }

    async fn accept_listener(&self) -> Option<Connection> {
        loop {
            let result = match self.listener.as_ref()? {
                Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                    *self.peer.borrow_mut() =
                        Some(format!("{},server=on", self.addr.connected_unix()));
                    Raw::Unix(s)
                }),
                Listener::Vsock(l) => l.accept().await.map(|s| {
                    *self.peer.borrow_mut() = Some(self.addr.describe());
                    Raw::Unix(s)
                }),
                Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                    if self.addr.nodelay {
                        let _ = s.set_nodelay(true);
                    }
                    *self.peer.borrow_mut() = Some(tcp_desc(&s, true));
                    Raw::Tcp(s)
                }),
            };
            match result {
                Ok(raw) => {
                    // A client whose handshake fails is dropped; the next one is awaited.
                    if let Some(conn) = self.start(raw).await {
                        return Some(conn);
                    }
                }
                // Transient accept failures (EMFILE, ECONNABORTED) must not end the chardev.
                Err(e) => {
                    tracing::warn!(error = %e, "chardev accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub(crate) async fn accept(&self) -> Option<Connection> {
        if let Some(conn) = self.pending.borrow_mut().take() {
            self.used.set(true);
            return Some(conn);
        }
        if self.is_server() {
            return self.accept_listener().await;
        }
        let made = self.pending_raw.borrow_mut().take();
        if let Some(raw) = made {
            self.used.set(true);
            if let Some(conn) = self.start(raw).await {
                return Some(conn);
            }
        }
        // Client mode: the connection made at creation is gone; reconnect if asked to.
        let delay = self.reconnect?;
        loop {
            tokio::time::sleep(delay).await;
            match self.connect_raw() {
                Ok(raw) => {
                    if let Some(conn) = self.start(raw).await {
                        return Some(conn);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "chardev reconnect failed"),
            }
        }
    }

    /// A connection ready for its frontend: as it is, or once its TLS handshake is done
    /// (`None` when that fails, as QEMU's chardev disconnects).
    async fn start(&self, raw: Raw) -> Option<Connection> {
        let Some(tls) = &self.tls else {
            return Some(match raw {
                Raw::Unix(s) => self.wrap_unix(s),
                Raw::Tcp(s) => self.wrap_tcp(s),
            });
        };
        let result = match raw {
            Raw::Unix(s) => self.handshake(tls, s).await,
            Raw::Tcp(s) => self.handshake(tls, s).await,
        };
        match result {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::warn!(error = %e, "chardev TLS handshake failed");
                *self.peer.borrow_mut() = None;
                None
            }
        }
    }

    async fn handshake<S>(&self, tls: &Tls, s: S) -> std::result::Result<Connection, String>
    where
        S: AsyncRead + AsyncWrite + AsFd + Unpin + 'static,
    {
        if self.is_server() {
            let authz = tls.authz.as_deref().map(|id| (id, &tls.objects.authz));
            let stream = ferrite_tls::accept(&tls.creds, s, authz).await?;
            Ok(self.wrap_stream(stream))
        } else {
            let stream = ferrite_tls::connect(&tls.creds, s, tls.hostname.as_deref()).await?;
            Ok(self.wrap_stream(stream))
        }
    }

    /// A stream that carries no descriptors (TLS).
    fn wrap_stream<S: AsyncRead + AsyncWrite + 'static>(&self, s: S) -> Connection {
        let (r, w) = tokio::io::split(s);
        Connection {
            reader: Box::pin(r),
            writer: LogFile::tee(self.log.clone(), Box::pin(w)),
            fds: None,
            opened: true,
            output_outlives_input: false,
        }
    }

    pub(crate) fn disconnected(&self) {
        *self.peer.borrow_mut() = None;
    }

    pub(crate) fn filename(&self) -> String {
        if let Some(peer) = self.peer.borrow().as_ref() {
            return peer.clone();
        }
        // QEMU marks a listening unix or TCP socket, not a vsock one.
        let vsock = matches!(self.addr.at, SocketAddress::Vsock(_));
        let server = if self.is_server() && !vsock {
            ",server=on"
        } else {
            ""
        };
        format!("disconnected:{}{server}", self.addr.describe())
    }

    pub(crate) fn close(&self) {
        if let Some(path) = &self.unlink {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Tls {
    /// The TLS a socket's options ask for: its credentials, found by id.
    fn from_options(
        data: &Args,
        addr: &Addr,
        server: bool,
        objects: &ferrite_tls::Objects,
    ) -> Result<Option<Tls>> {
        let endpoint = if server {
            ferrite_tls::Endpoint::Server
        } else {
            ferrite_tls::Endpoint::Client
        };
        let Some(id) = data.opt_str("tls-creds") else {
            return Ok(None);
        };
        let creds = objects.creds_for(id, endpoint).map_err(Error::Tls)?;
        let authz = data.opt_str("tls-authz").map(str::to_owned);
        let hostname = match &addr.at {
            SocketAddress::Inet(a) => Some(a.host.clone()),
            _ => None,
        };
        Ok(Some(Tls {
            creds,
            authz,
            objects: objects.clone(),
            hostname,
        }))
    }
}

/// The checks of a socket's options that depend on its address and on its side, in
/// QEMU's order and words (`qmp_chardev_validate_socket`). `reconnect` and `wait` count
/// when given at all (the command line gives `wait` to every server).
fn check_options(data: &Args, addr: &Addr, server: bool) -> Result<()> {
    let refuse = |text: &'static str| Err(Error::SocketOptions(text));
    let tls = data.opt_str("tls-creds").is_some();
    let reconnect = data.get("reconnect").is_some();
    match addr.at {
        SocketAddress::Fd(_) if reconnect => {
            return refuse("'reconnect' option is incompatible with 'fd' address type");
        }
        SocketAddress::Fd(_) if tls && !server => {
            return refuse("'tls_creds' option is incompatible with 'fd' address type as client");
        }
        SocketAddress::Unix(_) if tls => {
            return refuse("'tls_creds' option is incompatible with 'unix' address type");
        }
        SocketAddress::Vsock(_) if tls => {
            return refuse("'tls_creds' option is incompatible with 'vsock' address type");
        }
        _ => {}
    }
    if data.opt_str("tls-authz").is_some() && !tls {
        return refuse("'tls_authz' option requires 'tls_creds' option");
    }
    if server {
        if reconnect {
            return refuse("'reconnect' option is incompatible with socket in server listen mode");
        }
    } else if data.bool_or("websocket", false) {
        return refuse("Websocket client is not implemented");
    } else if data.get("wait").is_some() {
        return refuse("'wait' option is incompatible with socket in client connect mode");
    }
    if reconnect && data.get("reconnect-ms").is_some() {
        return refuse("'reconnect' and 'reconnect-ms' are mutually exclusive");
    }
    Ok(())
}

/// QEMU's connected TCP filename: `tcp:LOCAL:PORT[,server=on] <-> PEER:PORT`.
fn tcp_desc(s: &TcpStream, server: bool) -> String {
    let fmt = |a: std::io::Result<std::net::SocketAddr>| match a {
        Ok(std::net::SocketAddr::V6(v6)) => format!("[{}]:{}", v6.ip(), v6.port()),
        Ok(a) => a.to_string(),
        Err(_) => "?".to_owned(),
    };
    let server = if server { ",server=on" } else { "" };
    format!(
        "tcp:{}{server} <-> {}",
        fmt(s.local_addr()),
        fmt(s.peer_addr())
    )
}
