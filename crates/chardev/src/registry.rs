//! The chardevs by id, and one chardev's frontend bookkeeping.

use crate::backend::{Backend, Connection};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use indexmap::IndexMap;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

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
    /// Whether a frontend (a monitor) is attached.
    frontend: Cell<bool>,
    /// Whether the attached frontend has a live connection.
    connected: Cell<bool>,
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

    /// Whether a frontend is attached and its connection is up (`frontend-open`).
    pub fn frontend_open(&self) -> bool {
        self.frontend.get() && self.connected.get()
    }

    /// Whether the backend can serve an out-of-band capable monitor.
    pub fn supports_oob(&self) -> bool {
        self.backend.borrow().supports_oob()
    }

    /// Attaches a frontend.
    ///
    /// # Errors
    /// "Chardev 'x' is busy" if one is attached already.
    pub fn attach_frontend(&self) -> Result<()> {
        if self.frontend.replace(true) {
            return Err(Error::Busy(self.id.clone()));
        }
        Ok(())
    }

    /// Waits for the next connection; `None` when the backend will never give another.
    ///
    /// # Cancel safety
    /// Cancel safe: a connection accepted by a cancelled call is dropped, as if the peer had
    /// hung up at once.
    pub async fn accept(&self) -> Option<Connection> {
        let backend = self.backend.borrow().clone();
        let conn = backend.accept().await?;
        self.connected.set(true);
        Some(conn)
    }

    /// Marks the current connection closed (the frontend saw end of input or an error).
    pub fn disconnected(&self) {
        self.connected.set(false);
        self.backend.borrow().disconnected();
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

    fn tls_objects(&self) -> ferrite_tls::Objects {
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
        let backend = Backend::open(backend, origin, self.stdio_in_use(), &self.tls_objects())?;
        let dev = Rc::new(Chardev {
            id: id.to_owned(),
            backend: RefCell::new(Rc::new(backend)),
            frontend: Cell::new(false),
            connected: Cell::new(false),
        });
        self.devs.borrow_mut().insert(id.to_owned(), dev.clone());
        Ok(dev)
    }

    /// Replaces a chardev's backend (`chardev-change`).
    ///
    /// # Errors
    /// Unknown id, a frontend that cannot follow a backend change, or the new backend failing
    /// to open (the old one then stays).
    pub fn change(&self, id: &str, backend: &Args) -> Result<()> {
        let dev = self
            .get(id)
            .ok_or_else(|| Error::DoesNotExist(id.to_owned()))?;
        if dev.frontend.get() {
            return Err(Error::NoHotswap);
        }
        let stdio_elsewhere = self.all().iter().any(|d| d.id != id && d.kind() == "stdio");
        let new = Backend::open(backend, Origin::Qmp, stdio_elsewhere, &self.tls_objects())?;
        let old = dev.backend.replace(Rc::new(new));
        old.close();
        Ok(())
    }

    /// Removes a chardev (`chardev-remove`).
    ///
    /// # Errors
    /// Unknown id, or a frontend still attached.
    pub fn remove(&self, id: &str) -> Result<()> {
        let dev = self.get(id).ok_or_else(|| Error::NotFound(id.to_owned()))?;
        if dev.frontend.get() {
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
