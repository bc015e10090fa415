//! The driver registry: a factory per driver, registered by the program at start-up
//! (QEMU: `BlockDriver` and `bdrv_register`). The core opens, creates, amends and probes
//! images only through these factories; it names no driver itself.

use crate::driver::Driver;
use crate::error::Error;
use crate::graph::Graph;
use crate::node::Node;
use crate::open::OpenCtx;
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

/// A boxed future of the registry's operations.
pub type LocalFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, Error>> + 'a>>;

/// What a driver is, for listings and for the graph's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Reaches storage itself (`file`, `null-co`, `nbd`).
    Protocol,
    /// Interprets its `file` child's bytes as an image (`raw`, `qcow2`).
    Format,
    /// Passes requests on to one child, doing something on the way (`copy-before-write`).
    Filter,
}

/// How a protocol makes its part of an image created by file name (QEMU's
/// `bdrv_co_create_file`, for the targets `drive-backup`, `drive-mirror` and
/// `blockdev-snapshot-sync` make).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameCreation {
    /// It cannot: "Protocol driver 'X' does not support image creation".
    Unsupported,
    /// Through the driver's own `create`, at the location the file name gives.
    Create,
    /// Storage that is reused, never made (QEMU's `bdrv_co_create_opts_simple`: NBD exports,
    /// iSCSI LUNs, host devices): the target must exist; it is opened, grown where it can be
    /// and its first sector zeroed.
    ReuseExisting,
}

/// A driver: how to open a node of it, and, where it can, create and amend images.
pub trait DriverFactory {
    /// The driver name (a `BlockdevDriver` value).
    fn name(&self) -> &'static str;

    /// What kind of driver it is.
    fn kind(&self) -> DriverKind;

    /// Whether QEMU opens this driver as a protocol (its own `bdrv_file_open`): the node
    /// takes its name before anything else opens. Otherwise QEMU opens a `file` it is given
    /// first (to probe its format), so that child's errors come before the node's name's.
    fn opens_as_protocol(&self) -> bool {
        self.kind() == DriverKind::Protocol
    }

    /// Opens a node from `ctx`'s options: opens the children it needs through `ctx` and
    /// returns the driver instance.
    ///
    /// # Errors
    /// QEMU's texts for bad options and for the storage failing.
    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>>;

    /// Whether `blockdev-create` can make images of this driver.
    fn can_create(&self) -> bool {
        false
    }

    /// Creates an image (`blockdev-create`'s `BlockdevCreateOptions`).
    ///
    /// # Errors
    /// QEMU's texts for bad options and for the storage failing.
    fn create<'a>(&'a self, _graph: &'a Rc<Graph>, _opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(async { Err(Error::CannotCreate) })
    }

    /// How an image created by file name gets this protocol's part.
    fn name_creation(&self) -> NameCreation {
        if self.can_create() && self.kind() == DriverKind::Protocol {
            NameCreation::Create
        } else {
            NameCreation::Unsupported
        }
    }

    /// The options of a node of this driver opened by file name (QEMU's
    /// `bdrv_parse_filename`, as image creation by name reuses a target): `None` where the
    /// driver takes `filename` as an option of its own.
    ///
    /// # Errors
    /// QEMU's texts for a name the driver cannot read.
    fn parse_filename(&self, _name: &str) -> Option<crate::Result<QDict>> {
        None
    }

    /// The options of a node of this protocol given the name `name` with the protocol
    /// named as its format (QEMU's `bdrv_fill_options`): as the name's prefix says where
    /// that names this protocol, else as the driver reads names ([`parse_filename`]);
    /// `None` where neither reads it.
    ///
    /// # Errors
    /// The driver's reason for a name it cannot read.
    ///
    /// [`parse_filename`]: DriverFactory::parse_filename
    fn options_of_name(&self, name: &str) -> Option<crate::Result<QDict>> {
        let by_prefix = crate::filename::protocol_options(name);
        if by_prefix.get("driver").and_then(|d| d.as_str()) == Some(self.name()) {
            return Some(Ok(by_prefix));
        }
        self.parse_filename(name)
    }

    /// The options QEMU's image creation by file name (`bdrv_img_create`, for
    /// `drive-backup`, `drive-mirror` and `blockdev-snapshot-sync` targets) gives this
    /// format's create, made from `blockdev-create`'s (`driver`, `file`, `size`, and
    /// `backing-file`/`backing-fmt` for an overlay): what that path rounds or checks
    /// that `blockdev-create` does not.
    ///
    /// # Errors
    /// QEMU's texts for what that path refuses.
    fn by_name_create_options(&self, opts: QDict) -> crate::Result<QDict> {
        Ok(opts)
    }

    /// The creation options QEMU's "Formatting 'FILE', fmt=FORMAT ..." line shows after
    /// the format for an image of `size` bytes over `backing` (file name, format): those
    /// with values, in the format's own order.
    fn formatting_options(&self, size: u64, backing: Option<(&str, &str)>) -> String {
        format!("size={size}{}", backing_options(backing))
    }

    /// Whether `x-blockdev-amend` can change images of this driver.
    fn can_amend(&self) -> bool {
        false
    }

    /// Changes an open image's options (`x-blockdev-amend`); `force` lets through what
    /// QEMU refuses without it (overwriting or erasing the last key slot).
    ///
    /// # Errors
    /// QEMU's texts for changes the driver refuses.
    fn amend<'a>(
        &'a self,
        _graph: &'a Graph,
        _node: &'a Rc<Node>,
        _opts: &'a Args,
        _force: bool,
    ) -> LocalFut<'a, ()> {
        Box::pin(async { Err(Error::CannotAmend) })
    }

    /// Readies `node` for an amendment before its job runs, when `x-blockdev-amend` is
    /// given (QEMU's `bdrv_amend_pre_run`): a refusal here fails the command itself. What
    /// it sets up lasts until [`DriverFactory::amend_cleanup`].
    ///
    /// # Errors
    /// The permissions the amendment needs cannot be had.
    fn amend_prepare(&self, _graph: &Graph, _node: &Rc<Node>) -> crate::Result<()> {
        Ok(())
    }

    /// Undoes [`DriverFactory::amend_prepare`] once the amendment ended or was dropped.
    fn amend_cleanup(&self, _graph: &Graph, _node: &Rc<Node>) {}

    /// Whether an image starting with `head` is of this format (probing an image whose
    /// format is not given).
    fn probe(&self, _head: &[u8]) -> bool {
        false
    }

    /// Whether an image whose contents no format recognises is of this format by its file
    /// name (QEMU's low-scoring name probes: `.dmg`).
    fn probe_name(&self, _filename: &str) -> bool {
        false
    }

    /// Whether images of this format can have a backing file (an external snapshot's
    /// overlay must).
    fn supports_backing(&self) -> bool {
        false
    }

    /// Whether a node of this driver needs a non-empty `filename` (QEMU's
    /// `bdrv_needs_filename`: the drivers that open a host file).
    fn needs_filename(&self) -> bool {
        false
    }

    /// Checks a file name a protocol node of this driver is opened by (QEMU's
    /// `bdrv_parse_filename` refusals).
    ///
    /// # Errors
    /// A name this driver takes no node from.
    fn check_filename(&self, _name: &str) -> crate::Result<()> {
        Ok(())
    }

    /// The options of a node of this driver, which QEMU opens as a protocol
    /// ([`opens_as_protocol`]), opened by the name `name` (QEMU's `bdrv_fill_options`):
    /// what the driver reads from the name, or the name as its `filename` option.
    ///
    /// # Errors
    /// The driver's reason for a name it cannot read.
    ///
    /// [`opens_as_protocol`]: DriverFactory::opens_as_protocol
    fn read_name(&self, name: &str) -> crate::Result<QDict> {
        self.check_filename(name)?;
        match self.options_of_name(name) {
            Some(options) => options,
            None => Ok(QDict::new().with("filename", name)),
        }
    }
}

/// Every driver the program knows.
#[derive(Default)]
pub struct Registry {
    factories: RefCell<Vec<Rc<dyn DriverFactory>>>,
    /// Images are opened for a system emulator, which refuses what QEMU keeps only for its
    /// tools (QEMU's `bdrv_uses_whitelist`: AES-encrypted qcow2).
    for_emulator: std::cell::Cell<bool>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Rc<Registry> {
        Rc::default()
    }

    /// Marks the registry as a system emulator's (see [`Registry::for_emulator`]).
    pub fn set_for_emulator(&self) {
        self.for_emulator.set(true);
    }

    /// Whether images are opened for a system emulator (QEMU's `bdrv_uses_whitelist`).
    pub fn for_emulator(&self) -> bool {
        self.for_emulator.get()
    }

    /// Adds a driver.
    pub fn register(&self, factory: Rc<dyn DriverFactory>) {
        let mut f = self.factories.borrow_mut();
        f.retain(|x| x.name() != factory.name());
        f.push(factory);
    }

    /// The driver called `name`.
    pub fn get(&self, name: &str) -> Option<Rc<dyn DriverFactory>> {
        self.factories
            .borrow()
            .iter()
            .find(|f| f.name() == name)
            .cloned()
    }

    /// Every driver name, sorted (QEMU's `bdrv_iterate_format` order).
    pub fn names(&self) -> Vec<&'static str> {
        let mut n: Vec<&'static str> = self.factories.borrow().iter().map(|f| f.name()).collect();
        n.sort_unstable();
        n
    }

    /// The format an image starting with `head` (in a file named `filename`, where known)
    /// has: the first format that recognises its contents, else its name, raw otherwise.
    pub fn probe(&self, head: &[u8], filename: Option<&str>) -> &'static str {
        let factories = self.factories.borrow();
        let formats = || factories.iter().filter(|f| f.kind() == DriverKind::Format);
        formats()
            .find(|f| f.probe(head))
            .or_else(|| filename.and_then(|n| formats().find(|f| f.probe_name(n))))
            .map_or("raw", |f| f.name())
    }

    /// What `-drive format=help` prints: the drivers that may be opened read-write, then
    /// those that may be opened read-only (every driver, both times, as a QEMU built
    /// without a format whitelist says).
    pub fn format_help(&self) -> String {
        let names = self.names().join(" ");
        format!("Supported formats: {names}\nSupported formats (read-only): {names}\n")
    }
}

/// `backing_file=... backing_fmt=...` for a "Formatting" line, led by a space; nothing
/// without a backing file.
pub fn backing_options(backing: Option<(&str, &str)>) -> String {
    backing
        .map(|(file, format)| format!(" backing_file={file} backing_fmt={format}"))
        .unwrap_or_default()
}
