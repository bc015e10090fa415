//! The NBD server and the export registry (QEMU: `blockdev-nbd.c`, `block/export/`).

use crate::error::{Error, Result};
use crate::export::Export;
use crate::handshake::{Outcome, Session, Tls};
use crate::{handshake, transmission};
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{Graph, Node, Perm};
use ferrite_export::{ExportInstance, ExportSetup, ExportType, Exports, LocalFut, RemoveMode};
use ferrite_qapi::Args;
use ferrite_socket::SocketAddress;
use ferrite_tls::{Creds, Endpoint, Objects};
use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::{Rc, Weak};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A running NBD server.
struct Server {
    accept: JoinHandle<()>,
    unlink: Option<PathBuf>,
}

/// A server's TLS: its credentials and the authorization object clients must pass.
struct ServerTls {
    creds: Rc<Creds>,
    authz: Option<String>,
}

/// The NBD service: the server (if started) and its exports (the `nbd` export type).
pub struct NbdService {
    me: Weak<NbdService>,
    graph: Rc<Graph>,
    /// The export list of every type, which the NBD exports are also in.
    all_exports: Weak<Exports>,
    exports: RefCell<Vec<Rc<Export>>>,
    server: RefCell<Option<Server>>,
    connections: Cell<usize>,
    /// How long a client may take to finish the handshake (0: forever).
    handshake_limit: Cell<u64>,
    /// The running server's `max-connections` (0: no limit).
    max_connections: Cell<usize>,
    /// How `tls-creds` and `tls-authz` ids are found.
    tls_objects: RefCell<Objects>,
}

/// QEMU's default limit on the handshake, in seconds.
const DEFAULT_HANDSHAKE_SECONDS: u64 = 10;

/// A listening address, in its flat (command line) or legacy (`data`-wrapped, QMP) form.
fn parse_addr(addr: &Args) -> Result<SocketAddress> {
    Ok(if addr.has("data") {
        SocketAddress::parse_legacy(addr)?
    } else {
        SocketAddress::parse(addr)?
    })
}

enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
    Vsock(ferrite_socket::vsock::Listener),
}

/// A connection accepted: vsock ones come as unix streams (see `ferrite_socket::vsock`).
enum Accepted {
    Unix(std::io::Result<tokio::net::UnixStream>),
    Tcp(std::io::Result<tokio::net::TcpStream>),
}

impl AnyListener {
    async fn accept(&self) -> Accepted {
        match self {
            AnyListener::Unix(l) => Accepted::Unix(l.accept().await.map(|(s, _)| s)),
            AnyListener::Vsock(l) => Accepted::Unix(l.accept().await),
            AnyListener::Tcp(l) => Accepted::Tcp(l.accept().await.map(|(s, _)| s)),
        }
    }
}

impl NbdService {
    /// A service with no server and no exports, registered as the `nbd` export type.
    pub fn new(graph: Rc<Graph>, all_exports: &Rc<Exports>) -> Rc<NbdService> {
        let nbd = Rc::new_cyclic(|me| NbdService {
            me: me.clone(),
            graph,
            all_exports: Rc::downgrade(all_exports),
            exports: RefCell::new(Vec::new()),
            server: RefCell::new(None),
            connections: Cell::new(0),
            handshake_limit: Cell::new(DEFAULT_HANDSHAKE_SECONDS),
            max_connections: Cell::new(0),
            tls_objects: RefCell::new(Objects::none()),
        });
        all_exports.register(nbd.clone());
        nbd
    }

    /// Lets `nbd-server-start` find the program's TLS objects.
    pub fn set_tls_objects(&self, objects: Objects) {
        *self.tls_objects.borrow_mut() = objects;
    }

    /// The export list of every type.
    pub fn all_exports(&self) -> Rc<Exports> {
        self.all_exports
            .upgrade()
            .expect("the export list outlives the NBD service")
    }

    pub(crate) fn export_by_name(&self, name: &str) -> Option<Rc<Export>> {
        self.exports
            .borrow()
            .iter()
            .find(|e| e.name == name && !e.shutting_down.get())
            .cloned()
    }

    pub(crate) fn exports(&self) -> Vec<Rc<Export>> {
        self.exports
            .borrow()
            .iter()
            .filter(|e| !e.shutting_down.get())
            .cloned()
            .collect()
    }

    /// Whether the server is listening.
    pub fn is_running(&self) -> bool {
        self.server.borrow().is_some()
    }

    /// The block graph the exports are in.
    pub fn graph(&self) -> &Rc<Graph> {
        &self.graph
    }

    /// Starts listening (`nbd-server-start`, `--nbd-server`).
    ///
    /// # Errors
    /// "NBD server already running", the address failing, or credentials that are not a
    /// server's.
    pub fn start(self: &Rc<Self>, opts: &Args) -> Result<()> {
        if self.is_running() {
            return Err(Error::AlreadyRunning);
        }
        let max = opts.opt_u64("max-connections").unwrap_or(0) as usize;
        self.max_connections.set(max);
        self.handshake_limit.set(
            opts.opt_u64("handshake-max-seconds")
                .unwrap_or(DEFAULT_HANDSHAKE_SECONDS),
        );
        let addr = opts
            .dict("addr")
            .ok_or_else(|| ferrite_qapi::Error::generic("Parameter 'addr' is missing"))?;
        // QEMU's backlog: the kernel's largest.
        let backlog = libc::SOMAXCONN;
        let fail = |e: std::io::Error| ferrite_socket::Error::Os {
            what: "Failed to listen on socket".into(),
            error: e,
        };
        let (listener, unlink) = match parse_addr(&addr)? {
            SocketAddress::Unix(u) => {
                let made = ferrite_socket::unix::listen(&u, backlog)?;
                made.listener.set_nonblocking(true).map_err(fail)?;
                let l = UnixListener::from_std(made.listener).map_err(fail)?;
                (AnyListener::Unix(l), made.file)
            }
            SocketAddress::Inet(a) => {
                let l = ferrite_socket::inet::listen(&a, backlog)?;
                l.set_nonblocking(true).map_err(fail)?;
                (
                    AnyListener::Tcp(TcpListener::from_std(l).map_err(fail)?),
                    None,
                )
            }
            SocketAddress::Vsock(v) => {
                let sock = ferrite_socket::vsock::listen(&v, backlog)?;
                let l = ferrite_socket::vsock::Listener::new(sock).map_err(fail)?;
                (AnyListener::Vsock(l), None)
            }
            SocketAddress::Fd(name) => {
                // A name the monitor keeps (`getfd`), or on the command line a number.
                let fd = ferrite_socket::monitor_fd::take_socket(&name).map_err(Error::Fd)?;
                let listener = match ferrite_socket::fd::listen(fd, backlog)? {
                    ferrite_socket::fd::Listener::Unix(l) => {
                        l.set_nonblocking(true).map_err(fail)?;
                        AnyListener::Unix(UnixListener::from_std(l).map_err(fail)?)
                    }
                    ferrite_socket::fd::Listener::Tcp(l) => {
                        l.set_nonblocking(true).map_err(fail)?;
                        AnyListener::Tcp(TcpListener::from_std(l).map_err(fail)?)
                    }
                };
                (listener, None)
            }
        };
        // As QEMU: the address is bound before the credentials are looked up. `tls-authz`
        // alone is accepted: it only acts with TLS.
        let tls = match opts.opt_str("tls-creds") {
            Some(id) => {
                let creds = self.tls_objects.borrow().creds_for(id, Endpoint::Server);
                let creds = creds.map_err(|e| {
                    if let Some(path) = &unlink {
                        let _ = std::fs::remove_file(path);
                    }
                    Error::Tls(e)
                })?;
                Some(Rc::new(ServerTls {
                    creds,
                    authz: opts.opt_str("tls-authz").map(str::to_owned),
                }))
            }
            None => None,
        };
        let me = self.clone();
        let accept =
            tokio::task::spawn_local(async move { me.accept_loop(listener, max, tls).await });
        *self.server.borrow_mut() = Some(Server { accept, unlink });
        Ok(())
    }

    async fn accept_loop(
        self: Rc<Self>,
        listener: AnyListener,
        max: usize,
        tls: Option<Rc<ServerTls>>,
    ) {
        let limit = std::sync::Arc::new(Semaphore::new(if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        }));
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            let tls = tls.clone();
            match listener.accept().await {
                Accepted::Unix(accepted) => match accepted {
                    Ok(s) => {
                        tokio::task::spawn_local(async move {
                            match tls {
                                Some(tls) => me.serve_tls_client(s, &tls).await,
                                None => {
                                    let (r, w) = s.into_split();
                                    me.serve_client(r, w).await;
                                }
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                },
                Accepted::Tcp(accepted) => match accepted {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        tokio::task::spawn_local(async move {
                            match tls {
                                Some(tls) => me.serve_tls_client(s, &tls).await,
                                None => {
                                    let (r, w) = s.into_split();
                                    me.serve_client(r, w).await;
                                }
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                },
            }
        }
    }

    /// Runs `handshake` within the server's `handshake-max-seconds`, so that a client that
    /// does not finish cannot hold a connection slot forever.
    async fn within_handshake_limit<T>(
        &self,
        handshake: impl Future<Output = std::io::Result<Option<T>>>,
    ) -> std::io::Result<Option<T>> {
        match self.handshake_limit.get() {
            0 => handshake.await,
            limit => tokio::time::timeout(std::time::Duration::from_secs(limit), handshake)
                .await
                .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        }
    }

    /// Serves one client of a server with TLS: the options before STARTTLS, the TLS
    /// handshake and QEMU's checks of the client, then the handshake and requests inside.
    async fn serve_tls_client<S>(&self, mut stream: S, tls: &ServerTls)
    where
        S: AsyncRead + AsyncWrite + std::os::fd::AsFd + Unpin + 'static,
    {
        self.connections.set(self.connections.get() + 1);
        let negotiated = self
            .within_handshake_limit(async {
                let greeting = {
                    // Unbuffered: nothing the client sends after STARTTLS may be read here.
                    let (mut r, mut w) = tokio::io::split(&mut stream);
                    let Some(greeting) = handshake::greet(&mut r, &mut w).await? else {
                        return Ok(None);
                    };
                    match handshake::options(self, &mut r, &mut w, greeting, Tls::Required).await? {
                        Outcome::StartTls => greeting,
                        Outcome::Session(_) | Outcome::Closed => return Ok(None),
                    }
                };
                let authz = self.tls_objects.borrow().authz.clone();
                let checked = tls.authz.as_deref().map(|id| (id, &authz));
                let secured = match ferrite_tls::accept(&tls.creds, stream, checked).await {
                    Ok(s) => s,
                    Err(e) => {
                        // What QEMU's server prints when a negotiation fails.
                        let msg = format!("option negotiation failed: {e}");
                        ferrite_block::report::error_report(&msg);
                        return Ok(None);
                    }
                };
                let (r, w) = tokio::io::split(secured);
                let mut r = BufReader::with_capacity(256 << 10, r);
                let mut w = BufWriter::with_capacity(256 << 10, w);
                Ok(
                    match handshake::options(self, &mut r, &mut w, greeting, Tls::Done).await? {
                        Outcome::Session(session) => Some((session, r, w)),
                        Outcome::StartTls | Outcome::Closed => None,
                    },
                )
            })
            .await;
        match negotiated {
            Ok(Some((session, r, w))) => Self::transmit(session, r, w).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "NBD handshake ended"),
        }
        self.connections.set(self.connections.get() - 1);
    }

    /// Serves an export's requests to a client that finished the handshake.
    async fn transmit<R, W>(session: Session, r: R, w: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + 'static,
    {
        let export = session.export.clone();
        export.client_joined();
        if let Err(e) = transmission::serve(session, r, w).await {
            tracing::debug!(error = %e, "NBD client ended");
        }
        export.client_left();
    }

    /// Serves one client on a connected stream: the handshake, then its requests, until
    /// it hangs up (the accept loops call this for every connection).
    pub async fn serve_client<R, W>(&self, r: R, w: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + 'static,
    {
        self.connections.set(self.connections.get() + 1);
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut w = BufWriter::with_capacity(256 << 10, w);
        let negotiated = self
            .within_handshake_limit(handshake::negotiate(self, &mut r, &mut w))
            .await;
        match negotiated {
            Ok(Some(session)) => Self::transmit(session, r, w).await,
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "NBD handshake ended"),
        }
        self.connections.set(self.connections.get() - 1);
    }

    /// Stops the server, removing every export (`nbd-server-stop`).
    ///
    /// # Errors
    /// "NBD server not running".
    pub async fn stop(&self) -> Result<()> {
        self.stop_server(true).await
    }

    /// Stops accepting and removes the exports; `nbd-server-stop` also removes a unix
    /// socket's file, the process's exit leaves it (as QEMU's programs do).
    async fn stop_server(&self, unlink: bool) -> Result<()> {
        let Some(server) = self.server.borrow_mut().take() else {
            return Err(Error::NotRunning);
        };
        server.accept.abort();
        if let Some(path) = server.unlink.filter(|_| unlink) {
            let _ = std::fs::remove_file(path);
        }
        self.all_exports().remove_type("nbd").await;
        Ok(())
    }

    /// Makes the NBD side of an export (`block-export-add`, `--export`, `nbd-server-add`)
    /// once the checks every type shares are done.
    ///
    /// # Errors
    /// QEMU's texts for a missing server, a name too long or taken, bitmaps that cannot be
    /// exported, and permission conflicts.
    fn create_export(&self, setup: &ExportSetup<'_>) -> Result<Rc<Export>> {
        if !self.is_running() {
            return Err(Error::NotRunning);
        }
        let opts = setup.opts;
        let node_name = opts.str("node-name")?;
        let name = opts.opt_str("name").unwrap_or(node_name).to_owned();
        if name.len() > crate::proto::MAX_STRING {
            return Err(Error::NameTooLong(name));
        }
        let description = opts.opt_str("description").map(str::to_owned);
        if let Some(d) = description
            .as_ref()
            .filter(|d| d.len() > crate::proto::MAX_STRING)
        {
            return Err(Error::DescriptionTooLong(d.clone()));
        }
        if self.export_by_name(&name).is_some() {
            return Err(Error::NameInUse(name));
        }
        // Clients may not resize the node under the export.
        let (perm, shared) = setup.blk.perm();
        setup.blk.set_perm(perm, shared - Perm::RESIZE)?;
        let bitmaps = self.export_bitmaps(&setup.node, opts, setup.writable)?;
        let export = Rc::new(Export {
            id: setup.id.to_owned(),
            name,
            description,
            initial_node: setup.node.clone(),
            blk: setup.blk.clone(),
            writable: setup.writable,
            writethrough: setup.writethrough,
            allocation_depth: opts.bool_or("allocation-depth", false),
            // One connection at a time cannot make use of multi-conn (QEMU then does not
            // offer it).
            multi_conn: self.max_connections.get() != 1,
            bitmaps: bitmaps.clone(),
            clients: Cell::new(0),
            shutting_down: Cell::new(false),
            kick: Default::default(),
            idle: Default::default(),
        });
        for b in &bitmaps {
            b.set_in_use(true);
        }
        self.exports.borrow_mut().push(export.clone());
        Ok(export)
    }

    /// The bitmaps `bitmaps` names: a name alone is looked up on the node and down its
    /// backing chain, `{node, name}` on that node (QEMU's rules and texts).
    fn export_bitmaps(
        &self,
        node: &Rc<Node>,
        opts: &Args,
        writable: bool,
    ) -> Result<Vec<Rc<DirtyBitmap>>, Error> {
        let mut out = Vec::new();
        let list = opts
            .get("bitmaps")
            .and_then(|b| b.as_list())
            .map(<[_]>::to_vec)
            .unwrap_or_default();
        for item in &list {
            let (bm, name) = if let Some(name) = item.as_str() {
                let mut at = Some(node.clone());
                let mut found = None;
                while let Some(n) = at {
                    if let Some(b) = n.bitmap(name) {
                        found = Some((b, n));
                        break;
                    }
                    at = n.child("backing").or_else(|| {
                        (n.driver_name() == "copy-before-write")
                            .then(|| n.child("file"))
                            .flatten()
                    });
                }
                let (bm, holder) = found.ok_or_else(|| Error::BitmapNotFound(name.to_owned()))?;
                // A read-only export of a bitmap that writes to its node keep changing
                // would not show a point in time (QEMU asks only of bitmaps named alone).
                if !writable && !holder.is_read_only() && holder.is_active() && bm.is_enabled() {
                    return Err(Error::EnabledBitmapReadOnly(name.to_owned()));
                }
                (bm, name.to_owned())
            } else {
                let d = item.as_dict().cloned().unwrap_or_default();
                let a = Args::new(d);
                let name = a.str("name")?.to_owned();
                let node_name = a.str("node")?;
                let n = self
                    .graph
                    .find_by_backend(node_name)
                    .or_else(|| self.graph.find(node_name))
                    .ok_or_else(|| Error::BitmapNodeNotFound(node_name.to_owned()))?;
                let bm = n
                    .bitmap(&name)
                    .ok_or_else(|| Error::NodeBitmapNotFound(name.clone()))?;
                (bm, name)
            };
            if bm.is_busy() || bm.is_inconsistent() {
                return Err(Error::BitmapBusy(name));
            }
            out.push(bm);
        }
        Ok(out)
    }

    /// Removes an NBD export (`nbd-server-remove`). As in QEMU the name is the export's
    /// ID (which `nbd-server-add` makes its NBD name too).
    ///
    /// # Errors
    /// QEMU's text for an export of another type; as [`Exports::del`].
    pub async fn del_by_id(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let all = self.all_exports();
        if all.type_of(id).is_some_and(|t| t != ExportType::name(self)) {
            return Err(Error::NotNbdExport(id.to_owned()));
        }
        Ok(all.del(id, mode).await?)
    }

    /// Disconnects an export's clients and lets go of its bitmaps.
    async fn shut_down(&self, export: &Rc<Export>) {
        export.disconnect_all().await;
        for b in &export.bitmaps {
            b.set_in_use(false);
        }
        self.exports.borrow_mut().retain(|e| !Rc::ptr_eq(e, export));
    }

    /// Stops the server if it runs (daemon exit; the export list ends the exports).
    pub async fn close(&self) {
        let _ = self.stop_server(false).await;
    }
}

impl ExportType for NbdService {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn supports_inactive(&self) -> bool {
        true
    }

    fn create<'a>(
        &'a self,
        setup: ExportSetup<'a>,
    ) -> LocalFut<'a, Result<Rc<dyn ExportInstance>, ferrite_qapi::Error>> {
        Box::pin(async move {
            let export = self.create_export(&setup)?;
            Ok(Rc::new(NbdExportHandle {
                service: self.me.clone(),
                export,
            }) as Rc<dyn ExportInstance>)
        })
    }
}

/// An NBD export as the export list sees it.
struct NbdExportHandle {
    service: Weak<NbdService>,
    export: Rc<Export>,
}

impl ExportInstance for NbdExportHandle {
    fn in_use(&self) -> bool {
        self.export.clients.get() > 0
    }

    fn shut_down(&self) -> LocalFut<'_, ()> {
        Box::pin(async move {
            if let Some(service) = self.service.upgrade() {
                service.shut_down(&self.export).await;
            } else {
                self.export.disconnect_all().await;
            }
        })
    }
}
