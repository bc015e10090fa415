//! The export list and what every export type shares (QEMU: `blk_exp_add`,
//! `qmp_block_export_del`, `blk_exp_close_all`).

use crate::error::{Error, Result};
use crate::events::BlockExportDeleted;
use ferrite_block::{BlockBackend, EventSink, Graph, Node, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A future on the main thread.
pub type LocalFut<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// How an export is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse while clients are connected.
    Safe,
    /// Disconnect the clients.
    Hard,
}

impl RemoveMode {
    /// The QAPI `BlockExportRemoveMode` (absent: safe).
    pub fn parse(mode: Option<&str>) -> RemoveMode {
        match mode {
            Some("hard") => RemoveMode::Hard,
            _ => RemoveMode::Safe,
        }
    }
}

/// What a type is handed to make an export of: the checks every type shares are done, the
/// node is active (unless `allow-inactive`), and the backend holds `consistent-read`
/// (and `write` when writable) while sharing everything; the type may narrow that.
pub struct ExportSetup<'a> {
    /// The export's ID.
    pub id: &'a str,
    /// The exported node.
    pub node: Rc<Node>,
    /// The export's way to the node, removed by the export list when the export ends.
    pub blk: Rc<BlockBackend>,
    /// Whether clients may write.
    pub writable: bool,
    /// Whether every write is flushed before it is answered.
    pub writethrough: bool,
    /// Every option of `block-export-add`, the type's own included.
    pub opts: &'a Args,
}

/// An export type (QEMU: `BlockExportDriver`).
pub trait ExportType {
    /// The QAPI `BlockExportType` name.
    fn name(&self) -> &'static str;

    /// Whether exports of an inactive node are allowed (`allow-inactive`).
    fn supports_inactive(&self) -> bool {
        false
    }

    /// Starts an export on the prepared backend.
    ///
    /// # Errors
    /// The type's refusal, in QEMU's words.
    fn create<'a>(
        &'a self,
        setup: ExportSetup<'a>,
    ) -> LocalFut<'a, Result<Rc<dyn ExportInstance>, ferrite_qapi::Error>>;
}

/// A running export of some type.
pub trait ExportInstance {
    /// Whether clients hold the export (a safe removal is then refused).
    fn in_use(&self) -> bool;

    /// Ends the export: its clients are disconnected, its socket or mount is gone, and no
    /// request of it is still in flight when the future ends.
    fn shut_down(&self) -> LocalFut<'_, ()>;
}

/// One export in the list.
struct BlockExport {
    id: String,
    type_name: &'static str,
    /// The node when the export was made; `blk` follows it if the graph replaces it.
    initial_node: Rc<Node>,
    blk: Rc<BlockBackend>,
    instance: Rc<dyn ExportInstance>,
    shutting_down: Cell<bool>,
}

impl BlockExport {
    fn node(&self) -> Rc<Node> {
        self.blk.node().unwrap_or_else(|| self.initial_node.clone())
    }
}

/// Every export, of every type, and the registered types.
pub struct Exports {
    graph: Rc<Graph>,
    events: Rc<dyn EventSink>,
    types: RefCell<Vec<Rc<dyn ExportType>>>,
    list: RefCell<Vec<Rc<BlockExport>>>,
}

impl Exports {
    /// No exports and no types.
    pub fn new(graph: Rc<Graph>, events: Rc<dyn EventSink>) -> Rc<Exports> {
        Rc::new(Exports {
            graph,
            events,
            types: RefCell::new(Vec::new()),
            list: RefCell::new(Vec::new()),
        })
    }

    /// Makes a type available to `block-export-add`.
    pub fn register(&self, ty: Rc<dyn ExportType>) {
        self.types.borrow_mut().push(ty);
    }

    fn find(&self, id: &str) -> Option<Rc<BlockExport>> {
        self.list.borrow().iter().find(|e| e.id == id).cloned()
    }

    /// The type (`nbd`, `fuse`...) of the export with ID `id`.
    pub fn type_of(&self, id: &str) -> Option<&'static str> {
        self.find(id).map(|e| e.type_name)
    }

    /// Adds an export (`block-export-add`, `--export`), in QEMU's order of checks.
    ///
    /// # Errors
    /// QEMU's texts for a bad or taken ID, an unknown node, a writable export of a
    /// read-only node, activation failing, permission conflicts; the type's own refusals.
    pub async fn add(&self, opts: &Args) -> Result<()> {
        let id = opts.str("id")?;
        if !ferrite_qapi::id_wellformed(id) {
            return Err(Error::InvalidId(id.to_owned()));
        }
        if self.find(id).is_some() {
            return Err(Error::IdInUse(id.to_owned()));
        }
        let type_name = opts.str("type")?;
        let ty = self
            .types
            .borrow()
            .iter()
            .find(|t| t.name() == type_name)
            .cloned()
            .ok_or_else(|| {
                ferrite_qapi::Error::generic("No driver found for the requested export type")
            })?;
        let node = self.graph.lookup_node(opts.str("node-name")?)?;
        let writable = opts.bool_or("writable", false);
        if writable && node.is_read_only() {
            return Err(Error::ReadOnlyNode);
        }
        // The node moves to the export's iothread; where a user keeps it in another, the
        // export runs there instead, unless it must have its own (`fixed-iothread`).
        let fixed_iothread = opts.bool_or("fixed-iothread", false);
        if let Some(path) = opts.opt_str("iothread") {
            let iothread = self
                .graph
                .resolve_iothread(path)
                .ok_or_else(|| Error::NoSuchIothread(path.to_owned()))?;
            let moved = self.graph.move_to_iothread(&node, Some(&iothread), None);
            if fixed_iothread {
                moved?;
            }
        }
        if opts.bool_or("allow-inactive", false) {
            if !ty.supports_inactive() {
                return Err(Error::InactiveUnsupported);
            }
        } else if node.is_ejected() {
            // QEMU's activation fails without an error here (ENOMEDIUM), and its
            // `blk_exp_add` then gives up: the command succeeds and adds no export.
            return Ok(());
        } else if !node.is_active() {
            self.graph.activate(&node).await?;
        }
        let mut perm = Perm::CONSISTENT_READ;
        if writable {
            perm |= Perm::WRITE;
        }
        let blk = BlockBackend::new_empty(&self.graph);
        if opts.bool_or("allow-inactive", false) {
            blk.set_force_allow_inactivate();
        }
        blk.insert(&node, perm, Perm::all())?;
        blk.set_iothread(self.graph.iothread_of(&node).as_deref());
        blk.set_fixed_iothread(fixed_iothread);
        let setup = ExportSetup {
            id,
            node: node.clone(),
            blk: blk.clone(),
            writable,
            writethrough: opts.bool_or("writethrough", false),
            opts,
        };
        let instance = match ty.create(setup).await {
            Ok(i) => i,
            Err(e) => {
                blk.remove();
                return Err(e.into());
            }
        };
        self.list.borrow_mut().push(Rc::new(BlockExport {
            id: id.to_owned(),
            type_name: ty.name(),
            initial_node: node,
            blk,
            instance,
            shutting_down: Cell::new(false),
        }));
        Ok(())
    }

    /// Removes an export (`block-export-del`).
    ///
    /// # Errors
    /// An unknown ID, an export already shutting down, clients still connected in safe
    /// mode.
    pub async fn del(&self, id: &str, mode: RemoveMode) -> Result<()> {
        let export = self
            .find(id)
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if export.shutting_down.get() {
            return Err(Error::ShuttingDown(export.id.clone()));
        }
        if mode == RemoveMode::Safe && export.instance.in_use() {
            return Err(Error::StillInUse(export.id.clone()));
        }
        self.remove(&export).await;
        Ok(())
    }

    /// Ends an export: the type shuts it down, its node is released, and
    /// `BLOCK_EXPORT_DELETED` says it is gone.
    async fn remove(&self, export: &Rc<BlockExport>) {
        if export.shutting_down.replace(true) {
            return;
        }
        export.instance.shut_down().await;
        // QEMU detaches the export's backend under the graph's write lock, which drains
        // every node: running jobs pause and resume around it, whatever nodes they use.
        let everything = self.graph.drain_all().await;
        export.blk.remove();
        drop(everything);
        self.list.borrow_mut().retain(|e| !Rc::ptr_eq(e, export));
        self.events.emit(&BlockExportDeleted {
            id: export.id.clone(),
        });
    }

    /// Ends every export of one type, newest first (the NBD server stopping).
    pub async fn remove_type(&self, type_name: &str) {
        let of_type: Vec<_> = self
            .list
            .borrow()
            .iter()
            .rev()
            .filter(|e| e.type_name == type_name)
            .cloned()
            .collect();
        for e in of_type {
            self.remove(&e).await;
        }
    }

    /// Ends every export, newest first (daemon exit).
    pub async fn close_all(&self) {
        let all: Vec<_> = self.list.borrow().iter().rev().cloned().collect();
        for e in all {
            self.remove(&e).await;
        }
    }

    /// `query-block-exports`: newest first, as QEMU lists them.
    pub fn query(&self) -> Vec<QDict> {
        self.list
            .borrow()
            .iter()
            .rev()
            .map(|e| {
                QDict::new()
                    .with("id", e.id.as_str())
                    .with("type", e.type_name)
                    .with("node-name", e.node().name())
                    .with("shutting-down", e.shutting_down.get())
            })
            .collect()
    }
}
