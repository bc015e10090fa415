//! The chardevs by id, and one chardev's frontend bookkeeping.

use crate::backend::{Backend, Connection, OpenContext};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use indexmap::IndexMap;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

/// Where a chardev's configuration came from; a few defaults and rules differ (QEMU parses
/// `--chardev` with QemuOpts and `chardev-add` with QAPI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `--chardev` on the command line: numeric `fd=` means an inherited descriptor.
    CommandLine,
    /// `chardev-add`/`chardev-change`: `fd` addresses need fd passing, which a storage
    /// daemon does not have.
    Qmp,
}

/// A character device.
pub struct Chardev {
    id: String,
    backend: RefCell<Rc<Backend>>,
    /// How many frontends (monitors; a mux or hub over it) are attached: at most one, or
    /// four on a mux.
    frontends: Cell<usize>,
    /// Whether an attached frontend has a live connection.
    connected: Cell<bool>,
    /// The mux or hub this chardev is part of: it is open for its frontend only while that
    /// one is open for its own.
    part_of: RefCell<Weak<Chardev>>,
}

/// A frontend's hold on a chardev: its connections come through it. A mux tells its
/// frontends apart by `tag`.
#[derive(Clone)]
pub struct Frontend {
    dev: Rc<Chardev>,
    tag: usize,
}

impl Frontend {
    /// The chardev.
    pub fn chardev(&self) -> &Rc<Chardev> {
        &self.dev
    }

    /// Waits for the next connection; `None` when the backend will never give another.
    ///
    /// # Cancel safety
    /// Cancel safe: a connection accepted by a cancelled call is dropped, as if the peer had
    /// hung up at once.
    pub async fn accept(&self) -> Option<Connection> {
        let backend = self.dev.backend.borrow().clone();
        let conn = backend.accept(self.tag).await?;
        self.dev.connected.set(true);
        Some(conn)
    }

    /// Marks the current connection closed (the frontend saw end of input or an error).
    pub fn disconnected(&self) {
        self.dev.connected.set(false);
        self.dev.backend.borrow().disconnected();
    }

    /// Lets the chardev go (a mux or hub removed).
    pub(crate) fn detach(&self) {
        let n = self.dev.frontends.get().saturating_sub(1);
        self.dev.frontends.set(n);
        if n == 0 {
            self.dev.connected.set(false);
        }
    }
}

impl Chardev {
    /// The chardev's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The backend kind, as in `ChardevBackendKind`.
    pub fn kind(&self) -> &'static str {
        self.backend.borrow().kind()
    }

    /// The `filename` shown by `query-chardev`.
    pub fn filename(&self) -> String {
        self.backend.borrow().filename()
    }

    /// Whether a frontend is attached and listening (`frontend-open`), connected or not. A
    /// mux's base, or a hub's member, is open while the mux or hub is.
    pub fn frontend_open(&self) -> bool {
        self.frontends.get() > 0
            && self
                .part_of
                .borrow()
                .upgrade()
                .is_none_or(|whole| whole.frontend_open())
    }

    /// Whether a frontend has a live connection (a socket's `connected` property).
    pub fn connected(&self) -> bool {
        self.frontends.get() > 0 && self.connected.get()
    }

    /// Whether the backend can serve an out-of-band capable monitor.
    pub fn supports_oob(&self) -> bool {
        self.backend.borrow().supports_oob()
    }

    /// Attaches a frontend.
    ///
    /// # Errors
    /// "chardev 'x' is already in use" if one is attached already (a mux takes four).
    pub fn attach_frontend(self: &Rc<Self>) -> Result<Frontend> {
        let tag = self
            .backend
            .borrow()
            .attach(&self.id, self.frontends.get())?;
        self.frontends.set(self.frontends.get() + 1);
        Ok(Frontend {
            dev: self.clone(),
            tag,
        })
    }

    /// Waits for a first client of a listening socket (`--chardev ...,server=on,wait=on`).
    pub async fn wait_for_client(&self) {
        let backend = self.backend.borrow().clone();
        backend.wait_for_client().await;
    }

    /// Runs `f` on the current backend.
    pub(crate) fn with_backend<T>(&self, f: impl FnOnce(&Backend) -> T) -> T {
        f(&self.backend.borrow())
    }
}

/// All chardevs, by id (QEMU's `/chardevs` container).
#[derive(Default)]
pub struct ChardevRegistry {
    devs: RefCell<IndexMap<String, Rc<Chardev>>>,
    /// The program's TLS objects, for sockets with `tls-creds`.
    tls: RefCell<Option<ferrite_tls::Objects>>,
    /// What a mux's C-a x does: ends the program.
    quit: RefCell<Option<Rc<dyn Fn()>>>,
}

impl ChardevRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// How `tls-creds` and `tls-authz` find the program's objects.
    pub fn set_tls_objects(&self, objects: ferrite_tls::Objects) {
        *self.tls.borrow_mut() = Some(objects);
    }

    /// What C-a x on a mux does: asks the program to end.
    pub fn set_quit_hook(&self, quit: Rc<dyn Fn()>) {
        *self.quit.borrow_mut() = Some(quit);
    }

    pub(crate) fn quit_hook(&self) -> Rc<dyn Fn()> {
        self.quit.borrow().clone().unwrap_or_else(|| Rc::new(|| {}))
    }

    pub(crate) fn tls_objects(&self) -> ferrite_tls::Objects {
        self.tls
            .borrow()
            .clone()
            .unwrap_or_else(ferrite_tls::Objects::none)
    }

    /// A chardev by id.
    pub fn get(&self, id: &str) -> Option<Rc<Chardev>> {
        self.devs.borrow().get(id).cloned()
    }

    /// Every chardev, in creation order.
    pub fn all(&self) -> Vec<Rc<Chardev>> {
        self.devs.borrow().values().cloned().collect()
    }

    /// Creates a chardev from a checked `ChardevBackend`.
    ///
    /// # Errors
    /// A duplicate id (worded per `origin`'s QEMU text), or the backend failing to open.
    pub fn add(&self, id: &str, backend: &Args, origin: Origin) -> Result<Rc<Chardev>> {
        if self.devs.borrow().contains_key(id) {
            return Err(match origin {
                Origin::Qmp => Error::Exists(id.to_owned()),
                Origin::CommandLine => Error::DuplicateProperty(id.to_owned()),
            });
        }
        let backend = self.open(id, backend, origin, self.stdio_in_use())?;
        // QEMU opens the backend, then adds the chardev to its container, where this id is
        // the container's own property.
        if id == ferrite_qapi::QOM_CONTAINER_PROPERTY {
            backend.close();
            return Err(Error::DuplicateProperty(id.to_owned()));
        }
        let dev = Rc::new(Chardev {
            id: id.to_owned(),
            backend: RefCell::new(Rc::new(backend)),
            frontends: Cell::new(0),
            connected: Cell::new(false),
            part_of: RefCell::new(Weak::new()),
        });
        for part in dev.with_backend(Backend::parts) {
            *part.part_of.borrow_mut() = Rc::downgrade(&dev);
        }
        self.devs.borrow_mut().insert(id.to_owned(), dev.clone());
        Ok(dev)
    }

    /// `--chardev ...,mux=on`: the backend as `<id>-base`, and a mux named `id` over it.
    ///
    /// # Errors
    /// As [`ChardevRegistry::add`].
    pub fn add_muxed(&self, id: &str, backend: &Args, origin: Origin) -> Result<Rc<Chardev>> {
        let base = format!("{id}-base");
        self.add(&base, backend, origin)?;
        let mux = ferrite_qobject::QDict::new().with("type", "mux").with(
            "data",
            ferrite_qobject::QDict::new().with("chardev", base.as_str()),
        );
        self.add(id, &Args::new(mux), origin)
    }

    fn open(&self, id: &str, spec: &Args, origin: Origin, stdio_taken: bool) -> Result<Backend> {
        Backend::open(
            spec,
            &OpenContext {
                label: id,
                origin,
                stdio_taken,
                registry: self,
            },
        )
    }

    /// The first half of `chardev-change`: a chardev without a frontend is removed, to be
    /// made anew by `chardev-add`'s path, as QEMU does it (so a failure there leaves none).
    ///
    /// # Errors
    /// Unknown id, a mux or hub, or a frontend that cannot follow a backend change.
    pub fn remove_for_change(&self, id: &str) -> Result<()> {
        let dev = self
            .get(id)
            .ok_or_else(|| Error::DoesNotExist(id.to_owned()))?;
        if dev.with_backend(Backend::multiplexes) {
            return Err(Error::NoHotswapOfMux);
        }
        if dev.frontends.get() > 0 {
            return Err(Error::NoHotswap);
        }
        self.devs.borrow_mut().shift_remove(id);
        dev.backend.borrow().close();
        Ok(())
    }

    /// Removes a chardev (`chardev-remove`).
    ///
    /// # Errors
    /// Unknown id, or a frontend still attached.
    pub fn remove(&self, id: &str) -> Result<()> {
        let dev = self.get(id).ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if dev.frontends.get() > 0 {
            return Err(Error::Busy(id.to_owned()));
        }
        self.devs.borrow_mut().shift_remove(id);
        dev.backend.borrow().close();
        Ok(())
    }

    /// Closes every backend (daemon exit): listening sockets are unlinked.
    pub fn close_all(&self) {
        for dev in self.devs.borrow_mut().drain(..) {
            dev.1.backend.borrow().close();
        }
    }

    fn stdio_in_use(&self) -> bool {
        self.devs.borrow().values().any(|d| d.kind() == "stdio")
    }
}
