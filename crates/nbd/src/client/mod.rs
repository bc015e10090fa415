//! The `nbd` block driver (QEMU: `block/nbd.c`, `nbd/client.c`): a node whose data is an
//! export of an NBD server. `handshake.rs` negotiates, `session.rs` carries requests over
//! one connection, and the driver here maps block requests to NBD commands and reconnects
//! when the connection drops: within `reconnect-delay` requests wait and are sent again.

mod handshake;
mod session;

use crate::proto::*;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut, NameCreation, Node, OpenCtx, Registry};
use ferrite_qapi::{Args, os_msg};
use ferrite_qobject::QDict;
use ferrite_socket::{InetAddr, UnixAddr, VsockAddr};
use ferrite_tls::{Creds, Endpoint, Objects};
use handshake::{HandshakeError, Offer, greet, negotiate, start_tls};
use session::{Answer, Command, Failure, Session};
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Registers the `nbd` driver, which finds `tls-creds` through `tls`.
pub fn register(registry: &Registry, tls: Objects) {
    registry.register(Rc::new(NbdClientFactory { tls }));
}

/// Where the server listens.
#[derive(Debug, Clone)]
enum Server {
    Unix(UnixAddr),
    /// A host's or another machine's vsock port (the stream is a unix stream's type).
    Vsock(VsockAddr),
    Inet {
        addr: InetAddr,
        /// Without `ipv4`, `ipv6` or `to`: the address fits an `nbd://` file name.
        plain: bool,
    },
    /// A connected socket handed over by name or number: usable once (no reconnection).
    Fd {
        name: String,
        fd: Rc<RefCell<Option<OwnedFd>>>,
    },
}

impl Server {
    fn parse(opts: &Args) -> ferrite_block::Result<Server> {
        let server = opts
            .dict("server")
            .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'server' is missing"))?;
        let a = server;
        match a.str("type")? {
            "unix" => Ok(Server::Unix(UnixAddr::parse(&a)?)),
            "inet" => Ok(Server::Inet {
                addr: InetAddr::parse(&a)?,
                plain: ["ipv4", "ipv6", "to"].iter().all(|k| !a.has(k)),
            }),
            "fd" => {
                let name = a.str("str")?.to_owned();
                let fd = ferrite_socket::monitor_fd::take_socket(&name)
                    .map_err(ferrite_qapi::Error::generic)?;
                Ok(Server::Fd {
                    name,
                    fd: Rc::new(RefCell::new(Some(fd))),
                })
            }
            "vsock" => Ok(Server::Vsock(VsockAddr {
                cid: a.str("cid")?.to_owned(),
                port: a.str("port")?.to_owned(),
            })),
            other => Err(ferrite_qapi::Error::generic(format!(
                "Parameter 'type' does not accept value '{other}'"
            ))
            .into()),
        }
    }

    /// How QEMU names the address in errors.
    fn describe(&self) -> String {
        match self {
            Server::Unix(u) => u.path.clone(),
            Server::Inet { addr, .. } => addr.target(),
            Server::Vsock(v) => v.target(),
            Server::Fd { name, .. } => name.clone(),
        }
    }

    async fn connect(&self) -> Result<Stream, HandshakeError> {
        match self {
            Server::Unix(u) => Ok(Stream::Unix(
                ferrite_socket::unix::connect_async(u)
                    .await
                    .map_err(HandshakeError::Connect)?,
            )),
            Server::Inet { addr, .. } => {
                let s = ferrite_socket::inet::connect_async(addr)
                    .await
                    .map_err(HandshakeError::Connect)?;
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            Server::Vsock(v) => Ok(Stream::Unix(
                ferrite_socket::vsock::connect_async(v)
                    .await
                    .map_err(HandshakeError::Connect)?,
            )),
            Server::Fd { fd, .. } => {
                // Once connected, the socket is the connection's; a lost one cannot be
                // made again.
                let fd = fd
                    .borrow_mut()
                    .take()
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ECONNREFUSED))?;
                let std = std::os::unix::net::UnixStream::from(fd);
                std.set_nonblocking(true)?;
                Ok(Stream::Unix(tokio::net::UnixStream::from_std(std)?))
            }
        }
    }
}

/// A connection to the server.
enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// The client's TLS: its credentials and the name the server's certificate must have.
struct ClientTls {
    creds: Rc<Creds>,
    hostname: Option<String>,
}

/// Runs the handshake on a plain stream, split without a lock.
async fn handshake_plain<R, W>(r: R, w: W, target: &Target) -> Result<Rc<Session>, HandshakeError>
where
    R: tokio::io::AsyncRead + 'static,
    W: tokio::io::AsyncWrite + 'static,
{
    let mut r: session::Reader = Box::pin(r);
    let mut w: session::Writer = Box::pin(w);
    let offer = greet(&mut r, &mut w).await?;
    open_session(r, w, offer, target).await
}

/// Negotiates the export after the greeting (and STARTTLS) and makes the session.
async fn open_session(
    mut r: session::Reader,
    mut w: session::Writer,
    offer: Offer,
    target: &Target,
) -> Result<Rc<Session>, HandshakeError> {
    let info = negotiate(
        &mut r,
        &mut w,
        offer,
        &target.export,
        target.bitmap.as_deref(),
    )
    .await?;
    Ok(Session::new(info, r, w))
}

/// Greets, starts TLS and runs the rest of the handshake inside it.
async fn handshake_tls<S>(
    mut stream: S,
    target: &Target,
    tls: &ClientTls,
) -> Result<Rc<Session>, HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let offer = {
        let (mut r, mut w) = tokio::io::split(&mut stream);
        let offer = greet(&mut r, &mut w).await?;
        start_tls(&mut r, &mut w, offer).await?;
        offer
    };
    let secured = ferrite_tls::connect(&tls.creds, stream, tls.hostname.as_deref())
        .await
        .map_err(HandshakeError::Refused)?;
    let (r, w) = tokio::io::split(secured);
    open_session(Box::pin(r), Box::pin(w), offer, target)
        .await
        .map_err(|e| match e {
            // A server that judged this client and refused it hangs up without ending TLS:
            // QEMU's words for it.
            HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                HandshakeError::Refused(
                    "Failed to read option reply: Cannot read from TLS channel: The TLS \
                     connection was non-properly terminated."
                        .into(),
                )
            }
            other => other,
        })
}

/// Why a connection could not be made, in QEMU's words.
fn connect_error(server: &Server, e: HandshakeError) -> ferrite_block::Error {
    let text = match e {
        HandshakeError::Io(e) => format!(
            "Failed to connect to '{}': {}",
            server.describe(),
            os_msg(&e)
        ),
        HandshakeError::Connect(e) => e.to_string(),
        HandshakeError::Refused(t) => t,
    };
    ferrite_qapi::Error::generic(text).into()
}

/// What the driver needs to (re)connect.
struct Target {
    server: Server,
    export: String,
    bitmap: Option<String>,
    tls: Option<ClientTls>,
}

impl Target {
    async fn connect(&self) -> Result<Rc<Session>, HandshakeError> {
        let stream = self.server.connect().await?;
        match (stream, &self.tls) {
            (Stream::Unix(s), None) => {
                let (r, w) = s.into_split();
                handshake_plain(r, w, self).await
            }
            (Stream::Tcp(s), None) => {
                let (r, w) = s.into_split();
                handshake_plain(r, w, self).await
            }
            (Stream::Unix(s), Some(tls)) => handshake_tls(s, self, tls).await,
            (Stream::Tcp(s), Some(tls)) => handshake_tls(s, self, tls).await,
        }
    }
}

struct NbdClientFactory {
    tls: Objects,
}

impl DriverFactory for NbdClientFactory {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn name_creation(&self) -> NameCreation {
        NameCreation::ReuseExisting
    }

    fn parse_filename(&self, name: &str) -> Option<ferrite_block::Result<QDict>> {
        Some(
            ferrite_block::filename::nbd_parse_filename(name)
                .map_err(|e| ferrite_qapi::Error::generic(e).into()),
        )
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            // A name that is no NBD address (else its options would be here): QEMU's reason.
            if let Some(Err(why)) = opts
                .opt_str("filename")
                .map(ferrite_block::filename::nbd_parse_filename)
            {
                return Err(ferrite_qapi::Error::generic(why).into());
            }
            let server = Server::parse(opts)?;
            let tls = match opts.opt_str("tls-creds") {
                Some(id) => Some(ClientTls {
                    creds: self
                        .tls
                        .creds_for(id, Endpoint::Client)
                        .map_err(ferrite_qapi::Error::generic)?,
                    // Without `tls-hostname`, an inet server's host is the name to check.
                    hostname: opts
                        .opt_str("tls-hostname")
                        .map(str::to_owned)
                        .or(match &server {
                            Server::Inet { addr, .. } => Some(addr.host.clone()),
                            _ => None,
                        }),
                }),
                None => None,
            };
            let target = Target {
                server,
                export: opts.opt_str("export").unwrap_or("").to_owned(),
                bitmap: opts.opt_str("x-dirty-bitmap").map(str::to_owned),
                tls,
            };
            let open_timeout = Duration::from_secs(opts.opt_u64("open-timeout").unwrap_or(0));
            let deadline = Instant::now() + open_timeout;
            let session = loop {
                match target.connect().await {
                    Ok(s) => break s,
                    Err(HandshakeError::Io(_) | HandshakeError::Connect(_))
                        if Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(connect_error(&target.server, e)),
                }
            };
            if session.info.flags & FLAG_READ_ONLY != 0 {
                ctx.apply_auto_read_only(|| {
                    ferrite_qapi::Error::generic("NBD export is read-only").into()
                })?;
            }
            // As the node keeps them (QEMU's options are flat there): `server.host`...
            let mut strong = opts
                .dict("server")
                .map(|s| ferrite_block::filename::flat_server(s.as_dict()))
                .unwrap_or_default();
            for key in ["export", "tls-creds", "tls-hostname", "x-dirty-bitmap"] {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            Ok(Box::new(NbdClient {
                size: session.info.size,
                target,
                session: RefCell::new(Some(session)),
                reconnect_delay: Duration::from_secs(opts.opt_u64("reconnect-delay").unwrap_or(0)),
                lost_at: RefCell::new(None),
                connecting: tokio::sync::Mutex::new(()),
                no_wait: Cell::new(false),
                gave_up: Notify::new(),
                strong,
            }) as Box<dyn Driver>)
        })
    }
}

/// An open `nbd` node.
struct NbdClient {
    target: Target,
    size: u64,
    session: RefCell<Option<Rc<Session>>>,
    reconnect_delay: Duration,
    /// When the connection was found lost (the reconnect window starts there).
    lost_at: RefCell<Option<Instant>>,
    /// One connection attempt at a time; the other requests wait for its outcome (a server
    /// that serves one client, `qemu-nbd` without `-e`, leaves a second attempt unanswered).
    connecting: tokio::sync::Mutex<()>,
    /// A job that stopped by force gave up waiting: until a connection is made, requests
    /// fail at once instead of waiting for one (QEMU's `NBD_CLIENT_CONNECTING_NOWAIT`).
    no_wait: Cell<bool>,
    /// Wakes the requests waiting for a connection when `no_wait` is set.
    gave_up: Notify,
    strong: QDict,
}

impl NbdClient {
    /// The session to send on: the current one, or a new connection. Within
    /// `reconnect-delay` of losing the connection, waits for the server to come back.
    async fn session(&self) -> io::Result<Rc<Session>> {
        loop {
            if let Some(s) = self.alive() {
                return Ok(s);
            }
            let turn = self.connecting.lock().await;
            // Another request's attempt may have made one meanwhile.
            if let Some(s) = self.alive() {
                return Ok(s);
            }
            let lost = *self.lost_at.borrow_mut().get_or_insert_with(Instant::now);
            let attempt = tokio::select! {
                r = self.target.connect() => r.ok(),
                () = self.gave_up.notified() => None,
            };
            if let Some(s) = attempt {
                tracing::info!(export = self.target.export, "NBD client reconnected");
                *self.session.borrow_mut() = Some(s.clone());
                *self.lost_at.borrow_mut() = None;
                self.no_wait.set(false);
                return Ok(s);
            }
            drop(turn);
            if self.no_wait.get() || lost.elapsed() >= self.reconnect_delay {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = self.gave_up.notified() => {}
            }
        }
    }

    /// The current connection, if it still stands.
    fn alive(&self) -> Option<Rc<Session>> {
        self.session.borrow().clone().filter(|s| s.is_alive())
    }

    /// Sends `cmd`, again on a new connection if the connection fails and reconnecting is
    /// allowed (QEMU's `nbd_co_request` loop).
    async fn request(&self, cmd: Command, payload: &[u8]) -> io::Result<Answer> {
        loop {
            let s = self.session().await?;
            match s.request(cmd, payload).await {
                Ok(a) => return Ok(a),
                Err(Failure::Server(e)) => return Err(e),
                Err(Failure::Connection(e)) => {
                    tracing::debug!(error = %e, "NBD client connection lost");
                    if self.reconnect_delay.is_zero() {
                        return Err(io::Error::from_raw_os_error(libc::EIO));
                    }
                }
            }
        }
    }

    fn flags(&self) -> u16 {
        self.session.borrow().as_ref().map_or(0, |s| s.info.flags)
    }

    fn max_len(&self) -> u64 {
        self.session
            .borrow()
            .as_ref()
            .map_or(u64::from(MAX_BUFFER), |s| u64::from(s.info.max_block))
    }

    /// Splits `offset..offset + len` into requests the server takes.
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let max = self.max_len().max(1);
        let end = offset + len;
        (0..)
            .map(move |i| offset + i * max)
            .take_while(move |&at| at < end)
            .map(move |at| (at, max.min(end - at)))
    }
}

fn cmd(ty: u16, flags: u16, offset: u64, len: u64) -> Command {
    Command {
        ty,
        flags,
        offset,
        len,
    }
}

impl Driver for NbdClient {
    fn format_name(&self) -> &'static str {
        "nbd"
    }

    fn cancel_in_flight(&self, _node: &Node) {
        if self.alive().is_none() {
            self.no_wait.set(true);
            self.gave_up.notify_waiters();
        }
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.session
            .borrow()
            .as_ref()
            .map_or(1, |s| u64::from(s.info.min_block))
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            if (len as u64) <= self.max_len() {
                return Ok(self
                    .request(cmd(CMD_READ, 0, offset, len as u64), &[])
                    .await?
                    .data);
            }
            let mut out = Vec::with_capacity(len);
            for (at, n) in self.pieces(offset, len as u64) {
                let piece = self.request(cmd(CMD_READ, 0, at, n), &[]).await?.data;
                out.extend_from_slice(&piece);
                ferrite_block::io::pool::give(piece);
            }
            Ok(out)
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let fua = flags.contains(ReqFlags::FUA);
            let native_fua = fua && self.flags() & FLAG_SEND_FUA != 0;
            let f = if native_fua { CMD_FLAG_FUA } else { 0 };
            for (at, n) in self.pieces(offset, data.len() as u64) {
                let s = (at - offset) as usize;
                self.request(cmd(CMD_WRITE, f, at, n), &data[s..s + n as usize])
                    .await?;
            }
            ferrite_block::io::pool::give(data);
            if fua && !native_fua {
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let server = self.flags();
            if server & FLAG_SEND_WRITE_ZEROES == 0 {
                return ferrite_block::driver::write_zeroes_as_data(
                    offset,
                    len,
                    flags,
                    |at, zeroes| self.write(node, at, zeroes, flags),
                )
                .await;
            }
            let mut f = 0;
            if !flags.contains(ReqFlags::MAY_UNMAP) {
                f |= CMD_FLAG_NO_HOLE;
            }
            if flags.contains(ReqFlags::NO_FALLBACK) {
                if server & FLAG_SEND_FAST_ZERO == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                f |= CMD_FLAG_FAST_ZERO;
            }
            if flags.contains(ReqFlags::FUA) && server & FLAG_SEND_FUA != 0 {
                f |= CMD_FLAG_FUA;
            }
            self.ranged(CMD_WRITE_ZEROES, f, offset, len).await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.flags() & FLAG_SEND_TRIM == 0 {
                return Ok(());
            }
            self.ranged(CMD_TRIM, 0, offset, len).await
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(self.flush_now())
    }

    fn flushes_every_time(&self) -> bool {
        true
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let has_context = self
                .session
                .borrow()
                .as_ref()
                .is_some_and(|s| s.info.context.is_some());
            if !has_context {
                return Ok(Extent::data(len));
            }
            let ask = len.min(self.max_unpayloaded());
            let answer = self
                .request(cmd(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, offset, ask), &[])
                .await?;
            let Some((n, state)) = answer.extent.filter(|(n, _)| *n > 0) else {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            };
            Ok(Extent {
                len: n.min(len),
                data: state & STATE_HOLE == 0,
                zero: state & STATE_ZERO != 0,
                allocated: true,
            })
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        // An export's size is the server's: it cannot grow, and a smaller size is taken
        // as met (QEMU's inexact truncate, as `block_resize` and image creation ask it).
        Box::pin(async move {
            if size > self.size {
                return Err(io::Error::other("Cannot grow NBD nodes"));
            }
            Ok(())
        })
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn plain_filename(&self) -> Option<String> {
        let e = &self.target.export;
        Some(match &self.target.server {
            Server::Unix(u) if e.is_empty() => format!("nbd+unix://?socket={}", u.path),
            Server::Unix(u) => format!("nbd+unix:///{e}?socket={}", u.path),
            Server::Inet { addr, plain: true } if e.is_empty() => {
                format!("nbd://{}", addr.target())
            }
            Server::Inet { addr, plain: true } => format!("nbd://{}/{e}", addr.target()),
            // Not representable as a URL: the options say it.
            Server::Inet { .. } | Server::Vsock(_) | Server::Fd { .. } => return None,
        })
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn reopen_check(&self, _node: &Node, _opts: &Args) -> ferrite_block::Result<()> {
        Ok(())
    }

    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let session = self.session.borrow_mut().take();
            if let Some(s) = session {
                s.disconnect().await;
            }
            Ok(())
        })
    }
}

impl NbdClient {
    /// The longest range a command without payload may name: the length field's limit
    /// (32 bits, kept aligned, without extended headers).
    fn max_unpayloaded(&self) -> u64 {
        let extended = self
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| s.info.framing == handshake::Framing::Extended);
        if extended {
            1 << 62
        } else {
            u64::from(u32::MAX) & !0xfff
        }
    }

    /// A command on a range without payload (zeroing, trimming), in as many requests as its
    /// length needs.
    async fn ranged(&self, ty: u16, flags: u16, offset: u64, len: u64) -> io::Result<()> {
        let max = self.max_unpayloaded();
        let mut at = offset;
        while at < offset + len {
            let n = max.min(offset + len - at);
            self.request(cmd(ty, flags, at, n), &[]).await?;
            at += n;
        }
        Ok(())
    }

    async fn flush_now(&self) -> io::Result<()> {
        if self.flags() & FLAG_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(cmd(CMD_FLUSH, 0, 0, 0), &[]).await.map(|_| ())
    }
}
