//! The NBD server and the export registry (QEMU: `blockdev-nbd.c`, `block/export/`).

use crate::error::{Error, Result};
use crate::export::Export;
use crate::{handshake, transmission};
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{BlockBackend, EventSink, Graph, Node, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// A running NBD server.
struct Server {
    accept: JoinHandle<()>,
    unlink: Option<String>,
}

/// The NBD service: the server (if started) and every export.
pub struct NbdService {
    graph: Rc<Graph>,
    events: Rc<dyn EventSink>,
    exports: RefCell<Vec<Rc<Export>>>,
    server: RefCell<Option<Server>>,
    connections: Cell<usize>,
    /// How long a client may take to finish the handshake (0: forever).
    handshake_limit: Cell<u64>,
    /// The running server's `max-connections` (0: no limit).
    max_connections: Cell<usize>,
}

/// QEMU's default limit on the handshake, in seconds.
const DEFAULT_HANDSHAKE_SECONDS: u64 = 10;

/// How an export is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect the clients.
    Hard,
}

/// A listening address, in its flat or legacy (`data`-wrapped) form.
fn parse_addr(addr: &Args) -> Result<(String, Args)> {
    let ty = addr.str("type")?.to_owned();
    let inner = addr.dict("data").unwrap_or_else(|| addr.clone());
    Ok((ty, inner))
}

enum AnyListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl NbdService {
    /// A service with no server and no exports.
    pub fn new(graph: Rc<Graph>, events: Rc<dyn EventSink>) -> Rc<NbdService> {
        Rc::new(NbdService {
            graph,
            events,
            exports: RefCell::new(Vec::new()),
            server: RefCell::new(None),
            connections: Cell::new(0),
            handshake_limit: Cell::new(DEFAULT_HANDSHAKE_SECONDS),
            max_connections: Cell::new(0),
        })
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
    /// "NBD server already running", TLS (not supported yet), or the address failing.
    pub fn start(self: &Rc<Self>, opts: &Args, from_cli: bool) -> Result<()> {
        if self.is_running() {
            return Err(Error::AlreadyRunning);
        }
        // `tls-authz` alone is accepted, as QEMU accepts it: it only acts with TLS.
        if opts.has("tls-creds") {
            return Err(Error::TlsUnsupported);
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
        let (ty, a) = parse_addr(&addr)?;
        let (listener, unlink) = match ty.as_str() {
            "unix" => {
                let path = a.str("path")?.to_owned();
                let fail = |e: std::io::Error| Error::BindUnix {
                    path: path.clone(),
                    error: e,
                };
                let _ = std::fs::remove_file(&path);
                let l = std::os::unix::net::UnixListener::bind(&path).map_err(fail)?;
                l.set_nonblocking(true).map_err(fail)?;
                (
                    AnyListener::Unix(UnixListener::from_std(l).map_err(fail)?),
                    Some(path),
                )
            }
            "inet" => {
                let target = format!("{}:{}", a.str("host")?, a.str("port")?);
                let fail = |e: std::io::Error| Error::BindInet(e);
                let l = std::net::TcpListener::bind(target.as_str()).map_err(fail)?;
                l.set_nonblocking(true).map_err(fail)?;
                (
                    AnyListener::Tcp(TcpListener::from_std(l).map_err(fail)?),
                    None,
                )
            }
            "fd" if from_cli => {
                return Err(Error::FdUnsupported);
            }
            _ => return Err(Error::FdOverQmp),
        };
        let me = self.clone();
        let accept = tokio::task::spawn_local(async move { me.accept_loop(listener, max).await });
        *self.server.borrow_mut() = Some(Server { accept, unlink });
        Ok(())
    }

    async fn accept_loop(self: Rc<Self>, listener: AnyListener, max: usize) {
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
            match &listener {
                AnyListener::Unix(l) => match l.accept().await {
                    Ok((s, _)) => {
                        let (r, w) = s.into_split();
                        tokio::task::spawn_local(async move {
                            me.serve_client(r, w).await;
                            drop(permit);
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                },
                AnyListener::Tcp(l) => match l.accept().await {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        let (r, w) = s.into_split();
                        tokio::task::spawn_local(async move {
                            me.serve_client(r, w).await;
                            drop(permit);
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                },
            }
        }
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
        // A client that does not finish the handshake in time is dropped, so that it cannot
        // hold a connection slot forever.
        let limit = self.handshake_limit.get();
        let negotiated = if limit == 0 {
            handshake::negotiate(self, &mut r, &mut w).await
        } else {
            tokio::time::timeout(
                std::time::Duration::from_secs(limit),
                handshake::negotiate(self, &mut r, &mut w),
            )
            .await
            .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
        };
        match negotiated {
            Ok(Some(session)) => {
                let export = session.export.clone();
                export.client_joined();
                if let Err(e) = transmission::serve(session, r, w).await {
                    tracing::debug!(error = %e, "NBD client ended");
                }
                export.client_left();
            }
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
        let Some(server) = self.server.borrow_mut().take() else {
            return Err(Error::NotRunning);
        };
        server.accept.abort();
        if let Some(path) = server.unlink {
            let _ = std::fs::remove_file(path);
        }
        let all: Vec<Rc<Export>> = self.exports.borrow().iter().rev().cloned().collect();
        for e in all {
            self.remove(&e).await;
        }
        Ok(())
    }

    /// Adds an export (`block-export-add`, `--export`, `nbd-server-add`).
    ///
    /// # Errors
    /// QEMU's texts for a missing server, duplicate id or name, unknown node, and permission
    /// conflicts (a writable export of a read-only node).
    pub async fn add(&self, opts: &Args) -> Result<()> {
        let id = opts.str("id")?;
        // QEMU's order: the export's id and node first (any export type), then what the NBD
        // server needs.
        if !ferrite_qapi::id_wellformed(id) {
            return Err(Error::InvalidId(id.to_owned()));
        }
        if self.exports.borrow().iter().any(|e| e.id == id) {
            return Err(Error::IdInUse(id.to_owned()));
        }
        let node_name = opts.str("node-name")?;
        let node = self.graph.lookup_node(node_name)?;
        if !self.is_running() {
            return Err(Error::NotRunning);
        }
        let name = opts.opt_str("name").unwrap_or(node_name).to_owned();
        if name.len() > crate::proto::MAX_STRING {
            return Err(Error::NameTooLong(name));
        }
        if self.exports.borrow().iter().any(|e| e.name == name) {
            return Err(Error::NameInUse(name));
        }
        let writable = opts.bool_or("writable", false);
        let bitmaps = self.export_bitmaps(&node, opts, writable)?;
        if opts.has("iothread") {
            return Err(Error::IothreadUnsupported);
        }
        // An inactive node becomes active for its export (QEMU's default without
        // `allow-inactive`).
        if !node.is_active() {
            self.graph.activate(&node).await?;
        }
        if writable && node.is_read_only() {
            return Err(Error::ReadOnlyNode);
        }
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm |= Perm::WRITE;
        }
        let shared = Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED;
        let blk = BlockBackend::new(&self.graph, &node, perm, shared)?;
        let export = Rc::new(Export {
            id: id.to_owned(),
            name,
            description: opts.opt_str("description").map(str::to_owned),
            initial_node: node,
            blk,
            removed: Cell::new(false),
            writable,
            writethrough: opts.bool_or("writethrough", false),
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
        self.exports.borrow_mut().push(export);
        Ok(())
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
                        found = Some(b);
                        break;
                    }
                    at = n.child("backing").or_else(|| {
                        (n.driver_name() == "copy-before-write")
                            .then(|| n.child("file"))
                            .flatten()
                    });
                }
                (found, name.to_owned())
            } else {
                let d = item.as_dict().cloned().unwrap_or_default();
                let a = Args::new(d);
                let name = a.str("name")?.to_owned();
                let n = self.graph.lookup(a.str("node")?)?;
                (n.bitmap(&name), name)
            };
            let bm = bm.ok_or_else(|| Error::BitmapNotFound(name.clone()))?;
            if bm.is_busy() || bm.is_inconsistent() {
                return Err(Error::BitmapBusy(name));
            }
            if !writable && !node.is_read_only() && bm.is_enabled() {
                return Err(Error::EnabledBitmapReadOnly(name));
            }
            out.push(bm);
        }
        Ok(out)
    }

    /// Removes an export by id (`block-export-del`).
    ///
    /// # Errors
    /// Unknown id, or clients still connected in safe mode.
    pub async fn del(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let export = self
            .exports
            .borrow()
            .iter()
            .find(|e| e.id == id)
            .cloned()
            .ok_or_else(|| Error::ExportNotFound(id.to_owned()))?;
        self.del_export(&export, mode).await
    }

    /// Removes an export by NBD name (`nbd-server-remove`).
    ///
    /// # Errors
    /// As [`NbdService::del`], with QEMU's text for an unknown name.
    pub async fn del_by_name(&self, name: &str, mode: RemoveMode) -> Result<()> {
        // Without a server there are no NBD exports: QEMU answers "not found".
        let export = self
            .export_by_name(name)
            .ok_or_else(|| Error::ExportNotFound(name.to_owned()))?;
        self.del_export(&export, mode).await
    }

    async fn del_export(&self, export: &Rc<Export>, mode: RemoveMode) -> Result<()> {
        if export.shutting_down.get() {
            return Err(Error::ShuttingDown(export.id.clone()));
        }
        if mode == RemoveMode::Safe && export.clients.get() > 0 {
            return Err(Error::StillInUse(export.id.clone()));
        }
        self.remove(export).await;
        Ok(())
    }

    /// Disconnects an export's clients, releases its node and announces its end.
    async fn remove(&self, export: &Rc<Export>) {
        export.disconnect_all().await;
        if !export.removed.replace(true) {
            export.blk.remove();
            for b in &export.bitmaps {
                b.set_in_use(false);
            }
        }
        self.exports.borrow_mut().retain(|e| !Rc::ptr_eq(e, export));
        self.events.emit(&crate::events::BlockExportDeleted {
            id: export.id.clone(),
        });
    }

    /// Closes every export and the server (daemon exit).
    pub async fn close_all(&self) {
        if self.stop().await.is_err() {
            let all: Vec<Rc<Export>> = self.exports.borrow().iter().rev().cloned().collect();
            for e in all {
                self.remove(&e).await;
            }
        }
    }

    /// `query-block-exports`.
    pub fn query(&self) -> Vec<QDict> {
        self.exports
            .borrow()
            .iter()
            .rev()
            .map(|e| {
                QDict::new()
                    .with("id", e.id.as_str())
                    .with("type", "nbd")
                    .with("node-name", e.node().name())
                    .with("shutting-down", e.shutting_down.get())
            })
            .collect()
    }
}
