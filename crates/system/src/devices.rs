//! Device stand-ins: what a guest would see of a disk, a CD-ROM or a floppy drive is here
//! only as far as the block layer sees it. Each drive device holds a `BlockBackend` with the
//! permissions the real device takes, a qdev id or a generated path, and (for CD-ROMs and
//! floppies) a tray. `-device`, `device_add` and `device_del` go through [`Devices`].

use crate::drive::{DriveDevice, MadeBy};
use crate::machine::Machine;
use ferrite_block::{BlockBackend, Graph, Medium, Perm};
use ferrite_qapi::{Error, ErrorClass};
use ferrite_qmp::{Event, EventBus};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

mod floppy;
mod medium;
pub(crate) mod qtree;

/// What kind of thing a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A disk of its own on PCI (`virtio-blk-pci`).
    VirtioBlk,
    /// A SCSI controller on PCI: provides a SCSI bus (runs in an iothread if asked).
    VirtioScsi,
    /// The LSI 53C895A SCSI controller on PCI: a SCSI bus in the main loop.
    Lsi,
    /// A PCI bridge.
    PciBridge,
    /// A disk or CD-ROM on a SCSI bus.
    ScsiHd,
    ScsiCd,
    /// A disk or CD-ROM on an IDE bus.
    IdeHd,
    IdeCd,
    /// A floppy drive.
    Floppy,
}

impl Kind {
    /// Whether the device takes a `drive` property.
    fn has_drive(self) -> bool {
        !matches!(self, Kind::VirtioScsi | Kind::Lsi | Kind::PciBridge)
    }

    /// Whether it provides a SCSI bus.
    fn is_scsi_host(self) -> bool {
        matches!(self, Kind::VirtioScsi | Kind::Lsi)
    }

    /// Whether its medium can be removed (a tray).
    fn removable(self) -> bool {
        matches!(self, Kind::ScsiCd | Kind::IdeCd | Kind::Floppy)
    }

    fn is_ide(self) -> bool {
        matches!(self, Kind::IdeHd | Kind::IdeCd)
    }

    /// Whether the medium goes in through a tray (CD-ROMs; floppy disks go in without).
    fn has_tray(self) -> bool {
        matches!(self, Kind::ScsiCd | Kind::IdeCd)
    }

    /// Whether it can work without a medium.
    fn may_be_empty(self) -> bool {
        self.removable()
    }

    /// Whether it only reads.
    fn read_only(self) -> bool {
        matches!(self, Kind::ScsiCd | Kind::IdeCd)
    }

    /// What the device takes and shares of the medium `node`.
    fn perms(self, share_rw: bool, node: &ferrite_block::Node) -> (Perm, Perm) {
        let mut perm = Perm::CONSISTENT_READ;
        if !self.read_only() && !node.is_read_only() {
            perm |= Perm::WRITE;
        }
        let mut shared = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE;
        if share_rw {
            shared |= Perm::WRITE;
        }
        (perm, shared)
    }

    fn on_pci(self) -> bool {
        matches!(
            self,
            Kind::VirtioBlk | Kind::VirtioScsi | Kind::Lsi | Kind::PciBridge
        )
    }
}

/// A device model `-device help` lists.
pub(crate) struct Model {
    pub(crate) name: &'static str,
    pub(crate) alias: Option<&'static str>,
    pub(crate) bus: &'static str,
    pub(crate) category: &'static str,
    pub(crate) desc: &'static str,
    kind: Kind,
    /// Properties beyond `drive`, `id` and `bus` it accepts.
    props: &'static [&'static str],
}

const DRIVE_PROPS: &[&str] = &[
    "share-rw",
    "write-cache",
    "serial",
    "logical_block_size",
    "physical_block_size",
    "min_io_size",
    "opt_io_size",
    "discard_granularity",
    "werror",
    "rerror",
    "bootindex",
];

const STORAGE: &str = "Storage devices";
const BRIDGES: &str = "Controller/Bridge/Hub devices";

/// The models there are.
pub(crate) const MODELS: &[Model] = &[
    Model {
        name: "virtio-blk-pci",
        alias: Some("virtio-blk"),
        bus: "PCI",
        category: STORAGE,
        desc: "",
        kind: Kind::VirtioBlk,
        props: &[
            "share-rw",
            "write-cache",
            "serial",
            "logical_block_size",
            "physical_block_size",
            "discard_granularity",
            "werror",
            "rerror",
            "bootindex",
            "iothread",
            "num-queues",
            "queue-size",
            "addr",
            "config-wce",
            "scsi",
            "discard",
            "write-zeroes",
        ],
    },
    Model {
        name: "virtio-scsi-pci",
        alias: Some("virtio-scsi"),
        bus: "PCI",
        category: STORAGE,
        desc: "",
        kind: Kind::VirtioScsi,
        props: &["iothread", "num_queues", "addr"],
    },
    Model {
        name: "lsi53c895a",
        alias: Some("lsi"),
        bus: "PCI",
        category: STORAGE,
        desc: "",
        kind: Kind::Lsi,
        props: &["addr"],
    },
    Model {
        name: "pci-bridge",
        alias: None,
        bus: "PCI",
        category: BRIDGES,
        desc: "Standard PCI Bridge",
        kind: Kind::PciBridge,
        props: &["chassis_nr", "addr", "shpc", "msi"],
    },
    Model {
        name: "pcie-root-port",
        alias: None,
        bus: "PCI",
        category: BRIDGES,
        desc: "PCI Express Root Port",
        kind: Kind::PciBridge,
        props: &[
            "chassis",
            "slot",
            "port",
            "addr",
            "multifunction",
            "bus-reserve",
            "io-reserve",
            "mem-reserve",
            "pref32-reserve",
            "pref64-reserve",
            "hotplug",
        ],
    },
    Model {
        name: "scsi-hd",
        alias: None,
        bus: "SCSI",
        category: STORAGE,
        desc: "virtual SCSI disk",
        kind: Kind::ScsiHd,
        props: DRIVE_PROPS,
    },
    Model {
        name: "scsi-cd",
        alias: None,
        bus: "SCSI",
        category: STORAGE,
        desc: "virtual SCSI CD-ROM",
        kind: Kind::ScsiCd,
        props: DRIVE_PROPS,
    },
    Model {
        name: "ide-hd",
        alias: None,
        bus: "IDE",
        category: STORAGE,
        desc: "virtual IDE disk",
        kind: Kind::IdeHd,
        props: DRIVE_PROPS,
    },
    Model {
        name: "ide-cd",
        alias: None,
        bus: "IDE",
        category: STORAGE,
        desc: "virtual IDE CD-ROM",
        kind: Kind::IdeCd,
        props: DRIVE_PROPS,
    },
    Model {
        name: "floppy",
        alias: None,
        bus: "floppy-bus",
        category: STORAGE,
        desc: "virtual floppy drive",
        kind: Kind::Floppy,
        props: &[
            "unit",
            "drive-type",
            "share-rw",
            "write-cache",
            "logical_block_size",
            "physical_block_size",
            "min_io_size",
            "opt_io_size",
            "discard_granularity",
            "backend_defaults",
            "account-invalid",
            "account-failed",
        ],
    },
];

fn model(name: &str) -> Option<&'static Model> {
    MODELS
        .iter()
        .find(|m| m.name == name || m.alias == Some(name))
}

/// A device on the machine.
pub(crate) struct Device {
    pub(crate) id: Option<String>,
    pub(crate) model: &'static Model,
    /// Its QOM path (`/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`).
    pub(crate) path: String,
    /// The drive it uses.
    pub(crate) blk: Option<Rc<BlockBackend>>,
    /// Whether the backend came from `-drive` and goes when the device goes (QEMU's
    /// auto-deletion of legacy drives).
    auto_del: bool,
    /// A `device_del` waits for the guest (a PCI device: until the next reset here): when
    /// it was asked for, on the machine's virtual clock (ms).
    unplug_asked_ms: Cell<Option<u64>>,
    /// For a SCSI controller: its bus's name (`ID.0`).
    bus_name: Option<String>,
    /// Others may write the drive too.
    share_rw: bool,
    /// An IDE device's bus and unit.
    ide_slot: Option<(String, u32)>,
    /// The iothread its requests run in (its own `iothread`, or its SCSI controller's):
    /// the nodes it uses are in that iothread for as long as it uses them.
    iothread: Option<String>,
    /// The bus it was put on, if one was named.
    bus: Option<String>,
    /// The properties it was given (by `-device`, the board or `-global`), as given.
    pub(crate) given: Vec<(String, String)>,
    /// A floppy drive's unit and drive type.
    pub(crate) floppy: Option<(u32, &'static str)>,
}

impl Device {
    /// The value given for property `name`.
    pub(crate) fn given(&self, name: &str) -> Option<&str> {
        self.given
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Device {
    /// The path query-block reports as `qdev`: the id, else the canonical path (of the
    /// virtio device inside a virtio-blk proxy).
    fn qdev(&self) -> String {
        if self.model.kind == Kind::VirtioBlk {
            return format!("{}/virtio-backend", self.path);
        }
        self.id.clone().unwrap_or_else(|| self.path.clone())
    }
}

/// The machine's devices.
pub(crate) struct Devices {
    machine: Rc<Machine>,
    graph: Rc<Graph>,
    /// Whether an absolute QOM path names an object outside the machine (a user object, a
    /// chardev): such a path is no device.
    other_object: Box<dyn Fn(&str) -> bool>,
    events: Rc<EventBus>,
    /// Jobs on a drive that goes with its device are cancelled.
    jobs: Rc<ferrite_jobs::JobManager>,
    list: RefCell<Vec<Rc<Device>>>,
    /// Anonymous devices made so far (`device[N]` counts them all).
    anon: Cell<u32>,
    /// The machine waits for an incoming migration (`-incoming`).
    incoming: Cell<bool>,
    /// `-global DRIVER.PROPERTY=VALUE`: defaults for every device of a model.
    globals: RefCell<Vec<(String, String, String)>>,
    /// Drives whose `-drive` interface is not `none`: the board connects them itself.
    auto_connected: RefCell<Vec<String>>,
    /// Whether the board has a floppy controller (the PC always; the Q35 when a floppy
    /// drive is given).
    fdc: Cell<bool>,
    /// Whether the board has a parallel port (the default one).
    pub(crate) parallel: Cell<bool>,
}

fn generic(text: impl Into<String>) -> Error {
    Error::generic(text.into())
}

/// A block layer failure as a device reports it: a `GenericError` with the block layer's
/// text, and its hint for the command line ("Is another process using the image ...?").
pub(crate) fn block_error(e: ferrite_block::Error) -> Error {
    let e = Error::from(e);
    Error {
        class: ferrite_qapi::ErrorClass::GenericError,
        ..e
    }
}

/// A drive device's `logical_block_size` and `physical_block_size` (512 unless given).
///
/// # Errors
/// QEMU's texts for a size that is not a power of two in range, and for a logical size
/// over the physical one.
fn block_sizes<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<(u64, u64), Error> {
    const MIN: u64 = 512;
    const MAX: u64 = 2 << 20;
    let size = |name: &str| -> Result<u64, Error> {
        let Some(v) = get(name) else { return Ok(MIN) };
        let n = ferrite_qapi::visit::parse_size(v).ok_or_else(|| {
            generic(format!(
                "Parameter '{name}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.\n"
            ))
        })?;
        if n == 0 {
            return Ok(MIN);
        }
        if !(MIN..=MAX).contains(&n) || !n.is_power_of_two() {
            return Err(generic(format!(
                "parameter {name} must be a power of 2 between {MIN} and {MAX}"
            )));
        }
        Ok(n)
    };
    let (logical, physical) = (size("logical_block_size")?, size("physical_block_size")?);
    if logical > physical {
        return Err(generic(
            "logical_block_size > physical_block_size not supported",
        ));
    }
    Ok((logical, physical))
}

/// A property's value as the command line or QMP gave it.
fn prop_str(v: &QObject) -> String {
    match v {
        QObject::String(s) => s.clone(),
        QObject::Bool(b) => if *b { "on" } else { "off" }.into(),
        other => ferrite_qobject::to_json(other),
    }
}

/// An unsigned property of `bits` bits, read as QEMU's option visitor reads it (C's
/// integer syntax; a negative number wraps and is then out of range).
fn prop_uint(name: &str, v: &str, bits: u32) -> Result<u64, Error> {
    let (neg, mag) = ferrite_qapi::visit::parse_c_integer(v)
        .ok_or_else(|| generic(format!("Parameter '{name}' expects integer")))?;
    let u = if neg { mag.wrapping_neg() } else { mag };
    if bits < 64 && u >> bits != 0 {
        return Err(generic(format!("Parameter '{name}' expects uint{bits}_t")));
    }
    Ok(u)
}

/// The queues a virtio device is given, as its properties are set (types and ranges).
struct Queues {
    count: Option<u64>,
    size: Option<u64>,
}

impl Queues {
    fn parse<'a>(kind: Kind, get: &impl Fn(&str) -> Option<&'a str>) -> Result<Queues, Error> {
        Ok(match kind {
            Kind::VirtioBlk => Queues {
                count: get("num-queues")
                    .map(|v| prop_uint("num-queues", v, 16))
                    .transpose()?,
                size: get("queue-size")
                    .map(|v| prop_uint("queue-size", v, 16))
                    .transpose()?,
            },
            Kind::VirtioScsi => Queues {
                count: get("num_queues")
                    .map(|v| prop_uint("num_queues", v, 32))
                    .transpose()?,
                size: None,
            },
            _ => Queues {
                count: None,
                size: None,
            },
        })
    }

    /// The checks of the device's realize step. More than 1024 virtio-blk queues would
    /// abort QEMU; ferrite refuses them.
    fn check(&self, kind: Kind) -> Result<(), Error> {
        const MAX: u64 = 1024;
        match kind {
            Kind::VirtioBlk => {
                match self.count {
                    Some(0) => return Err(generic("num-queues property must be larger than 0")),
                    Some(n) if n > MAX => {
                        return Err(generic(format!(
                            "num-queues property must be at most {MAX}"
                        )));
                    }
                    _ => {}
                }
                match self.size {
                    Some(n) if n <= 2 => Err(generic(format!(
                        "invalid queue-size property ({n}), must be > 2"
                    ))),
                    Some(n) if !n.is_power_of_two() || n > MAX => Err(generic(format!(
                        "invalid queue-size property ({n}), must be a power of 2 (max {MAX})"
                    ))),
                    _ => Ok(()),
                }
            }
            Kind::VirtioScsi => match self.count {
                // Two of the virtqueues are the controller's own.
                Some(n) if n == 0 || n > MAX - 2 => Err(generic(format!(
                    "Invalid number of queues (= {n}), must be a positive integer less than {}.",
                    MAX - 2
                ))),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

fn prop_bool(model: &str, name: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(generic(format!(
            "Property '{model}.{name}' doesn't take value '{v}'"
        ))),
    }
}

impl Devices {
    pub(crate) fn new(
        machine: Rc<Machine>,
        graph: Rc<Graph>,
        events: Rc<EventBus>,
        jobs: Rc<ferrite_jobs::JobManager>,
        other_object: Box<dyn Fn(&str) -> bool>,
    ) -> Rc<Self> {
        let devices = Rc::new(Devices {
            machine: machine.clone(),
            graph,
            other_object,
            events,
            jobs,
            list: RefCell::new(Vec::new()),
            anon: Cell::new(0),
            incoming: Cell::new(false),
            globals: RefCell::new(Vec::new()),
            auto_connected: RefCell::new(Vec::new()),
            fdc: Cell::new(machine.kind.board.has_floppy()),
            parallel: Cell::new(false),
        });
        let weak = Rc::downgrade(&devices);
        machine.on_reset(Box::new(move || {
            // The reset's unplugs happen after the command returns, as QEMU's main loop
            // does them once the reset request is seen; they are the unplugs asked for
            // before the reset, not one asked for while the task waits its turn.
            let Some(d) = weak.upgrade() else { return };
            let pending = d.pending_unplugs();
            let weak = weak.clone();
            tokio::task::spawn_local(async move {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                if let Some(d) = weak.upgrade() {
                    d.finish_unplugs(pending).await;
                }
            });
        }));
        devices
    }

    /// Every device, in the order they were made.
    pub(crate) fn all(&self) -> Vec<Rc<Device>> {
        self.list.borrow().clone()
    }

    /// The device at QOM path `path`.
    pub(crate) fn find_by_path(&self, path: &str) -> Option<Rc<Device>> {
        self.list.borrow().iter().find(|d| d.path == path).cloned()
    }

    /// The device `id` names, as QEMU's `find_device_state` resolves it: a path under
    /// `/machine/peripheral` (so a device's id), or from the root if it starts with `/`.
    ///
    /// # Errors
    /// "Device 'x' not found" (DeviceNotFound), or "x is not a device" for an object that
    /// is something else (a container, a user object).
    pub(crate) fn find_device_state(&self, id: &str) -> Result<Rc<Device>, Error> {
        let full = if id.starts_with('/') {
            id.to_owned()
        } else {
            format!("/machine/peripheral/{id}")
        };
        // QEMU's resolution skips empty path elements.
        let parts: Vec<&str> = full.split('/').filter(|p| !p.is_empty()).collect();
        let path = format!("/{}", parts.join("/"));
        if let Some(dev) = self.list.borrow().iter().find(|d| d.path == path) {
            return Ok(dev.clone());
        }
        let container = matches!(
            path.as_str(),
            "/" | "/machine"
                | "/machine/peripheral"
                | "/machine/peripheral-anon"
                | "/machine/unattached"
        );
        if container || (self.other_object)(&path) {
            return Err(generic(format!("{id} is not a device")));
        }
        Err(Error::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        ))
    }

    /// The device with qdev id `id`.
    pub(crate) fn find(&self, id: &str) -> Option<Rc<Device>> {
        self.list
            .borrow()
            .iter()
            .find(|d| d.id.as_deref() == Some(id))
            .cloned()
    }

    /// `qom-get` and `qom-set` of a device's `drive` property (`None` for any other path or
    /// property, which the object tree answers): the backend's name, or its node's; a new
    /// node for the device's backend, under QEMU's checks.
    pub(crate) async fn qom_drive(
        &self,
        args: &ferrite_qapi::Args,
        set: bool,
    ) -> Option<Result<QObject, Error>> {
        let path = args.opt_str("path")?;
        if args.opt_str("property")? != "drive" {
            return None;
        }
        let dev = self
            .list
            .borrow()
            .iter()
            .find(|d| d.path == path || (!path.starts_with('/') && d.id.as_deref() == Some(path)))
            .cloned()?;
        let blk = dev.blk.clone()?;
        if !set {
            let name = blk.name();
            let name = if name.is_empty() {
                blk.node().map(|n| n.name().to_owned()).unwrap_or_default()
            } else {
                name
            };
            return Some(Ok(QObject::from(name)));
        }
        let Some(value) = args.get("value").and_then(QObject::as_str) else {
            return Some(Err(generic(
                "Invalid parameter type for 'drive', expected: string",
            )));
        };
        let Some(node) = self.graph.find(value) else {
            return Some(Err(generic(format!(
                "Cannot find device='' nor node-name='{value}'"
            ))));
        };
        let Some(root) = blk.root() else {
            return Some(Err(generic("Device needs media, but drive is empty")));
        };
        Some(
            self.graph
                .retarget_edge(&root, &node)
                .await
                .map(|()| QObject::Dict(QDict::new()))
                .map_err(Error::from),
        )
    }

    /// The drive of the device `id` (a qdev id or a QOM path, as QEMU's `blk_by_qdev_id`
    /// finds it: a virtio-blk proxy has none, its `virtio-backend` child has).
    ///
    /// # Errors
    /// QEMU's texts for no such device (DeviceNotFound) and for a device without a drive.
    pub(crate) fn drive_of(&self, id: &str) -> Result<Rc<BlockBackend>, Error> {
        // The virtio-blk device inside the proxy, by its path or relative to the devices'
        // container (QEMU resolves `ID/virtio-backend` there).
        let backend_child = id.strip_suffix("/virtio-backend").and_then(|p| {
            self.find_device_state(p)
                .ok()
                .filter(|d| d.model.kind == Kind::VirtioBlk)
        });
        let (dev, backend_child) = match backend_child {
            Some(d) => (d, true),
            None => (self.find_device_state(id)?, false),
        };
        if dev.model.kind == Kind::VirtioBlk && !backend_child {
            return Err(generic("Device does not have a block device backend"));
        }
        dev.blk
            .clone()
            .ok_or_else(|| generic("Device does not have a block device backend"))
    }

    /// The drive a command names by `device` (a drive's name) or `id` (its device's):
    /// exactly one of them (QEMU's `qmp_get_blk`).
    ///
    /// # Errors
    /// QEMU's texts for both or neither given, and for no such drive or device.
    pub(crate) fn named_drive(
        &self,
        device: Option<&str>,
        id: Option<&str>,
    ) -> Result<Rc<BlockBackend>, Error> {
        match (device, id) {
            (None, Some(id)) => self.drive_of(id),
            (Some(name), None) => self
                .graph
                .backends()
                .into_iter()
                .find(|b| !name.is_empty() && b.name() == name)
                .ok_or_else(|| {
                    Error::new(
                        ErrorClass::DeviceNotFound,
                        format!("Device '{name}' not found"),
                    )
                }),
            _ => Err(generic("Need exactly one of 'device' and 'id'")),
        }
    }

    /// `-device` or `device_add`: `props` holds `driver`, maybe `id` and `bus`, and the
    /// model's properties.
    ///
    /// # Errors
    /// QEMU's texts: an unknown model, a property the model lacks, a missing or unknown
    /// drive, a drive in use, no bus for the device, a duplicate id.
    pub(crate) fn add(&self, props: &QDict) -> Result<Rc<Device>, Error> {
        self.add_at(props, None, false)
    }

    /// `device_add` on a running board. QEMU takes its arguments unchecked (`'gen': false`):
    /// a `bus` or `id` that is not a string counts as absent, a `driver` that is not one as
    /// missing, and the id need not be an identifier. Then, as `add`, except that the bus
    /// must take hot-plugged devices (IDE and floppy buses, and a root bus for PCI Express
    /// root ports, do not).
    ///
    /// # Errors
    /// As `add`, and "Bus 'ide.1' does not support hotplugging".
    pub(crate) fn hotplug(&self, props: &QDict) -> Result<Rc<Device>, Error> {
        let mut props = props.clone();
        for key in ["bus", "id"] {
            if !matches!(props.get(key), None | Some(QObject::String(_))) {
                props.remove(key);
            }
        }
        if !matches!(props.get("driver"), Some(QObject::String(_))) {
            return Err(generic("Parameter 'driver' is missing"));
        }
        self.add_at(&props, None, true)
    }

    /// Refuses a device hot-plugged on a bus that takes none (QEMU's
    /// `qdev_hotplug_allowed`): `bus` as given or as [`Devices::check_bus`] found it.
    fn check_hotpluggable(&self, model: &Model, bus: Option<&str>) -> Result<(), Error> {
        let fixed = match model.kind {
            Kind::IdeHd | Kind::IdeCd => Some(self.default_ide_bus(bus)),
            Kind::Floppy => Some(bus.unwrap_or("floppy-bus.0").to_owned()),
            _ if model.name == "pcie-root-port" => Some(bus.map_or_else(
                || self.machine.kind.board.root_bus().to_owned(),
                str::to_owned,
            )),
            _ => None,
        };
        match fixed {
            Some(bus) => Err(generic(format!("Bus '{bus}' does not support hotplugging"))),
            None => Ok(()),
        }
    }

    /// `drive_del`: the drive's medium goes (its nodes close if nothing else holds them)
    /// and so does its name; a device keeps the backend, empty (QEMU hides it).
    pub(crate) async fn drive_del(&self, blk: &Rc<BlockBackend>) {
        let node = blk.node();
        blk.remove();
        blk.set_name("");
        if let Some(node) = node {
            self.graph.close_inline(&node).await;
        }
    }

    /// `-global DRIVER.PROPERTY=VALUE`, in the order given.
    pub(crate) fn add_global(&self, driver: &str, property: &str, value: &str) {
        self.globals
            .borrow_mut()
            .push((driver.into(), property.into(), value.into()));
    }

    /// Drive `name` came with an interface: the board connects it to a device of its own.
    pub(crate) fn note_auto_connected(&self, name: &str) {
        self.auto_connected.borrow_mut().push(name.into());
    }

    /// The board gets a floppy controller (a Q35 given a floppy drive).
    pub(crate) fn add_floppy_controller(&self) {
        self.fdc.set(true);
    }

    /// Devices made from now on are for a machine waiting for an incoming migration.
    pub(crate) fn set_incoming(&self, on: bool) {
        self.incoming.set(on);
    }

    /// The incoming migration is over (the machine left `inmigrate`): each device stops
    /// sharing what it shared only for the migration's sake, as QEMU's BlockBackends do
    /// when the run state changes. A node still inactive takes the device's permissions
    /// when it is activated. A conflict is reported and the device keeps sharing.
    pub(crate) fn migration_done(&self) {
        self.incoming.set(false);
        for dev in self.all() {
            let Some(blk) = &dev.blk else { continue };
            let Some(node) = blk.node() else { continue };
            let (perm, shared) = dev.model.kind.perms(dev.share_rw, &node);
            if let Err(e) = blk.set_perm(perm, shared) {
                ferrite_block::report::error_report(&block_error(e).desc);
            }
        }
    }

    /// The board's firmware flash devices.
    pub(crate) fn flash_slots(&self) -> u32 {
        self.machine.kind.board.flash_slots()
    }

    /// IDE units on each bus of the machine.
    pub(crate) fn ide_units(&self) -> u32 {
        self.machine.kind.board.ide_units()
    }

    /// The drives the board's floppy controller takes.
    pub(crate) fn floppy_units(&self) -> u32 {
        if self.machine.kind.board == crate::machine::Board::None {
            0
        } else {
            2
        }
    }

    /// The board's IDE buses (`ide.0` and up).
    pub(crate) fn ide_buses(&self) -> u32 {
        self.machine.kind.board.ide_buses()
    }

    /// Makes the devices the board makes for `-drive if=ide|floppy`, once every drive is
    /// known: IDE devices by index, then floppies, under `/machine/unattached` (numbered
    /// after the board's own devices there, as QEMU's `pc` and `q35` number them).
    ///
    /// # Errors
    /// The first device that cannot be made; the drives are left to the caller.
    pub(crate) fn add_board_devices(&self, mut wanted: Vec<&DriveDevice>) -> Result<(), Error> {
        wanted.sort_by_key(|d| (d.made_by, d.index));
        let floppy = |d: &DriveDevice| d.made_by == MadeBy::BoardFloppy;
        let ide = wanted.iter().filter(|d| !floppy(d)).count() as u32;
        let floppies = wanted.len() as u32 - ide;
        let q35 = self.machine.kind.board == crate::machine::Board::Q35;
        // The parallel port comes before the floppy drives (and on the Q35 before the
        // IDE ones).
        let parallel = u32::from(self.parallel.get());
        let (ide_base, floppy_base) = if q35 {
            (
                13 + parallel + if floppies > 0 { floppies + 1 } else { 0 },
                9 + parallel,
            )
        } else {
            (4, 10 + ide + parallel)
        };
        let (mut next_ide, mut next_floppy) = (ide_base, floppy_base);
        for d in wanted {
            let counter = if floppy(d) {
                &mut next_floppy
            } else {
                &mut next_ide
            };
            let path = format!("/machine/unattached/device[{counter}]");
            *counter += 1;
            self.add_at(&d.props, Some(path), false)?;
        }
        Ok(())
    }

    /// [`Devices::add`], at a path the board chose.
    fn add_at(
        &self,
        props: &QDict,
        board_path: Option<String>,
        hotplug: bool,
    ) -> Result<Rc<Device>, Error> {
        let id = props.get("id").map(prop_str);
        // The command line's options check their id as they are parsed, before anything.
        if !hotplug
            && let Some(id) = &id
            && !ferrite_qapi::id_wellformed(id)
        {
            return Err(generic("Parameter 'id' expects an identifier"));
        }
        let driver = props
            .get("driver")
            .map(prop_str)
            .ok_or_else(|| generic("Parameter 'driver' is missing"))?;
        let model = model(&driver)
            .ok_or_else(|| generic(format!("'{driver}' is not a valid device model name")))?;
        // QEMU's order: the bus, whether it takes the device now, the id, the properties.
        let bus = self.check_bus(model, props.get("bus").map(prop_str))?;
        if hotplug {
            self.check_hotpluggable(model, bus.as_deref())?;
        }
        // The devices' container has a property `type` of its own: no child may take it.
        if let Some(id) = &id
            && (self.find(id).is_some() || id == "type")
        {
            return Err(generic(format!("Duplicate device ID '{id}'")));
        }
        let known = |k: &str| {
            if model.props.contains(&k)
                || (k == "drive" && model.kind.has_drive())
                || (k == "unit" && model.kind.is_ide())
            {
                return Ok(());
            }
            Err(generic(format!(
                "Property '{}.{k}' not found",
                if model.kind == Kind::VirtioBlk {
                    "virtio-blk-pci"
                } else {
                    model.name
                }
            )))
        };
        let mut values: Vec<(String, String)> = Vec::new();
        for (k, v) in props.iter() {
            if matches!(k, "driver" | "id" | "bus") {
                continue;
            }
            known(k)?;
            values.push((k.to_owned(), prop_str(v)));
        }
        // `-global`s of the model, under what the device is given (a drive excepted:
        // both is a conflict, found once the global's drive is taken).
        let globals: Vec<(String, String)> = self
            .globals
            .borrow()
            .iter()
            .filter(|(driver, _, _)| driver == model.name)
            .map(|(_, p, v)| (p.clone(), v.clone()))
            .collect();
        let global_drive = globals
            .iter()
            .find(|(p, _)| p == "drive")
            .map(|(_, v)| v.clone());
        for (p, v) in &globals {
            known(p).map_err(|e| {
                generic(format!(
                    "can't apply global {}.{p}={v}: {}",
                    model.name, e.desc
                ))
            })?;
            if p != "drive" && !values.iter().any(|(k, _)| k == p) {
                values.push((p.clone(), v.clone()));
            }
        }
        let user_drive = values
            .iter()
            .find(|(k, _)| k == "drive")
            .map(|(_, v)| v.clone());
        if let Some(d) = &global_drive
            && user_drive.is_none()
        {
            values.push(("drive".into(), d.clone()));
        }
        let get = |name: &str| {
            values
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        // Properties whose setting can fail: the iothread link (an empty one is none),
        // the queues' numbers.
        let iothread = match model.kind {
            Kind::VirtioBlk | Kind::VirtioScsi => get("iothread")
                .filter(|path| !path.is_empty())
                .map(|path| self.iothread_link(path))
                .transpose()?,
            _ => None,
        };
        let queues = Queues::parse(model.kind, &get)?;
        let ide_slot = if model.kind.is_ide() {
            Some(self.ide_slot(bus.as_deref(), get("unit"))?)
        } else {
            None
        };
        // `write-cache`: the device's choice over the drive's, unless `auto`.
        let write_cache = match get("write-cache") {
            None | Some("auto") => None,
            Some("on") => Some(true),
            Some("off") => Some(false),
            Some(v) => {
                return Err(generic(format!(
                    "Parameter 'write-cache' does not accept value '{v}'"
                )));
            }
        };
        // The drive, and the permissions the device takes on it.
        let share_rw = get("share-rw")
            .map(|v| prop_bool(model.name, "share-rw", v))
            .transpose()?
            .unwrap_or(false);
        let inner = if model.kind == Kind::VirtioBlk {
            "virtio-blk-device"
        } else {
            model.name
        };
        let drive_type = match (model.kind, get("drive-type")) {
            (Kind::Floppy, t) => Some(floppy::parse_type(t.unwrap_or("auto"))?),
            _ => None,
        };
        let block_sizes = block_sizes(&get)?;
        if let Some(d) = &global_drive {
            // QEMU sets a device's globals as it makes it, before what it is given.
            self.backend_for(inner, d).map_err(|e| {
                generic(format!(
                    "can't apply global {}.drive={d}: {}",
                    model.name, e.desc
                ))
            })?;
            if let Some(u) = &user_drive {
                return Err(generic(format!(
                    "-global {}.drive=... conflicts with drive={u}",
                    model.name
                )));
            }
        }
        let (blk, auto_del) = match (model.kind.has_drive(), get("drive")) {
            (false, _) => (None, false),
            (true, None) if model.kind.may_be_empty() => {
                (Some(BlockBackend::new_empty(&self.graph)), false)
            }
            (true, None) => return Err(generic("drive property not set")),
            (true, Some(name)) => {
                let (blk, legacy) = self.backend_for(inner, name)?;
                (Some(blk), legacy)
            }
        };
        let floppy = match drive_type {
            Some(wanted) => {
                let unit = floppy::unit(get("unit"), |u| {
                    self.list
                        .borrow()
                        .iter()
                        .any(|d| d.floppy.is_some_and(|(x, _)| x == u))
                })?;
                let (logical, physical) = block_sizes;
                floppy::check_block_sizes(logical, physical)?;
                let len = blk.as_ref().and_then(|b| b.node()).map(|n| n.len());
                Some((unit, floppy::pick_type(wanted, len)))
            }
            None => None,
        };
        if let Some(blk) = &blk
            && blk.node().is_none()
            && !model.kind.may_be_empty()
        {
            return Err(generic("Device needs media, but drive is empty"));
        }
        queues.check(model.kind)?;
        let iothread = match model.kind {
            Kind::VirtioBlk | Kind::VirtioScsi => iothread,
            Kind::ScsiHd | Kind::ScsiCd => self
                .scsi_controller(bus.as_deref())
                .and_then(|c| c.iothread.clone()),
            _ => None,
        };
        if let Some(blk) = &blk
            && let Some(node) = blk.node()
        {
            // Where the device runs its I/O (QEMU's AioContext rules): a SCSI disk's drive
            // stays where its node is unless its HBA runs in an iothread (one that cannot,
            // LSI, refuses a node in one); other devices take their drive into the main loop
            // first, and into their own iothread after.
            let at = self.graph.iothread_of(&node);
            let moves: Vec<Option<String>> = match model.kind {
                Kind::ScsiHd | Kind::ScsiCd => match self.scsi_controller(bus.as_deref()) {
                    Some(hba) if hba.model.kind == Kind::Lsi && at.is_some() => {
                        return Err(generic("HBA does not support iothreads"));
                    }
                    Some(hba) if hba.iothread.is_some() => vec![hba.iothread.clone()],
                    _ => vec![],
                },
                Kind::VirtioBlk if iothread.is_some() => vec![None, iothread.clone()],
                _ => vec![None],
            };
            for iothread in moves {
                self.graph
                    .move_to_iothread(&node, iothread.as_deref(), Some(blk))
                    .map_err(block_error)?;
            }
            if matches!(model.kind, Kind::IdeHd) && node.is_read_only() {
                return Err(generic("Block node is read-only"));
            }
            let (perm, shared) = model.kind.perms(share_rw, &node);
            // During an incoming migration a device shares everything: an export may write
            // the image before the guest owns it (QEMU defers its shared permissions).
            let shared = if self.incoming.get() {
                Perm::all()
            } else {
                shared
            };
            blk.set_perm(perm, shared).map_err(block_error)?;
        }
        let path = match (&id, board_path) {
            (_, Some(path)) => path,
            (Some(id), None) => format!("/machine/peripheral/{id}"),
            (None, None) => {
                let n = self.anon.get();
                self.anon.set(n + 1);
                format!("/machine/peripheral-anon/device[{n}]")
            }
        };
        let bus_name = model
            .kind
            .is_scsi_host()
            .then(|| format!("{}.0", id.clone().unwrap_or_else(|| path.clone())));
        let device = Rc::new(Device {
            id,
            model,
            path,
            blk,
            auto_del,
            unplug_asked_ms: Cell::new(None),
            bus_name,
            share_rw,
            ide_slot,
            iothread,
            bus,
            given: values,
            floppy,
        });
        if let Some(blk) = &device.blk {
            blk.set_device(Some(&device.qdev()));
            if let Some(on) = write_cache {
                blk.set_write_cache(on);
            }
            if model.kind != Kind::Floppy {
                blk.iostatus_enable();
            }
            if model.kind.removable() {
                blk.set_medium(Medium {
                    removable: true,
                    has_tray: model.kind.has_tray(),
                    tray_open: false,
                    locked: false,
                });
            }
        }
        self.list.borrow_mut().push(device.clone());
        Ok(device)
    }

    /// The iothread a device's `iothread` link names (an id or a QOM path), as QEMU sets a
    /// link property.
    ///
    /// # Errors
    /// "Device 'x' not found", or the object's type is not `iothread`.
    fn iothread_link(&self, path: &str) -> Result<String, Error> {
        if let Some(id) = self.graph.resolve_iothread(path) {
            return Ok(id);
        }
        let id = path.strip_prefix("/objects/").unwrap_or(path);
        match self.graph.object_type(id) {
            Some(_) => Err(generic(
                "Invalid parameter type for 'iothread', expected: iothread",
            )),
            None => Err(Error::new(
                ErrorClass::DeviceNotFound,
                format!("Device '{path}' not found"),
            )),
        }
    }

    /// The backend for `drive=name`: a drive's backend (not yet attached to a device), or a
    /// new one on the node of that name.
    fn backend_for(&self, inner: &str, name: &str) -> Result<(Rc<BlockBackend>, bool), Error> {
        let named = self.graph.backends().into_iter().find(|b| b.name() == name);
        if let Some(blk) = named {
            if blk.device().is_some() {
                if self.auto_connected.borrow().iter().any(|n| n == name) {
                    return Err(generic(format!(
                        "Drive '{name}' is already in use because it has been automatically \
                         connected to another device (did you need 'if=none' in the drive \
                         options?)"
                    )));
                }
                return Err(generic(format!(
                    "Drive '{name}' is already in use by another device"
                )));
            }
            return Ok((blk, true));
        }
        let Some(node) = self.graph.find(name) else {
            return Err(generic(format!(
                "Property '{inner}.drive' can't find value '{name}'"
            )));
        };
        let blk = BlockBackend::new(&self.graph, &node, Perm::empty(), Perm::all())
            .map_err(block_error)?;
        Ok((blk, false))
    }

    /// The unit an IDE device takes on `bus` (when not named, the bus QEMU's search finds
    /// first: the last one): `unit`, or the master's place, or the slave's when the master
    /// is taken.
    ///
    /// # Errors
    /// QEMU's texts for a unit beyond the two a bus has and for a unit in use.
    /// The IDE bus a device goes on: `bus`, or the one QEMU's search meets first (the
    /// last the board made).
    fn default_ide_bus(&self, bus: Option<&str>) -> String {
        bus.map_or_else(
            || {
                format!(
                    "ide.{}",
                    self.machine.kind.board.ide_buses().saturating_sub(1)
                )
            },
            str::to_owned,
        )
    }

    fn ide_slot(&self, bus: Option<&str>, unit: Option<&str>) -> Result<(String, u32), Error> {
        let board = self.machine.kind.board;
        let bus = self.default_ide_bus(bus);
        let units = board.ide_units();
        let used = |u: u32| {
            self.list
                .borrow()
                .iter()
                .any(|d| d.ide_slot.as_ref() == Some(&(bus.clone(), u)))
        };
        let unit = match unit {
            Some(u) => u
                .parse::<u32>()
                .map_err(|_| generic("Parameter 'unit' expects integer"))?,
            None => u32::from(used(0)),
        };
        if unit >= units {
            return Err(generic(format!(
                "Can't create IDE unit {unit}, bus supports only {units} units"
            )));
        }
        if used(unit) {
            return Err(generic(format!("IDE unit {unit} is in use")));
        }
        Ok((bus, unit))
    }

    /// Checks that the machine has a bus for `model` (`bus` names one).
    /// The SCSI controller of bus `bus` (`ID.0`), or the first one.
    fn scsi_controller(&self, bus: Option<&str>) -> Option<Rc<Device>> {
        self.list
            .borrow()
            .iter()
            .find(|d| {
                d.model.kind.is_scsi_host()
                    && bus.is_none_or(|b| {
                        d.bus_name.as_deref() == Some(b) || d.id.as_deref() == Some(b)
                    })
            })
            .cloned()
    }

    fn check_bus(&self, model: &Model, bus: Option<String>) -> Result<Option<String>, Error> {
        let board = self.machine.kind.board;
        let no_bus = || {
            generic(format!(
                "No '{}' bus found for device '{}'",
                model.bus, model.name
            ))
        };
        let bus = match bus {
            Some(path) if path.starts_with('/') => Some(self.bus_by_path(model, &path)?),
            Some(path) if path.contains('/') => Some(self.bus_by_relative_path(&path)?),
            other => other,
        };
        if let Some(bus) = bus.as_deref() {
            if !self.bus_exists(bus) {
                return Err(generic(format!("Bus '{bus}' not found")));
            }
            let provider = self.list.borrow().iter().find_map(|d| {
                if d.bus_name.as_deref() == Some(bus) && d.model.kind.is_scsi_host() {
                    Some("SCSI")
                } else if d.model.kind == Kind::PciBridge && d.id.as_deref() == Some(bus) {
                    Some("PCI")
                } else {
                    None
                }
            });
            let bus_type = if bus.starts_with("ide.") {
                Some("IDE")
            } else if bus == "pcie.0" {
                Some("PCIE")
            } else if bus.starts_with("pci") {
                Some("PCI")
            } else {
                provider
            };
            // A PCI Express bus is a PCI bus too.
            if let Some(ty) = bus_type
                && ty != model.bus
                && !(ty == "PCIE" && model.bus == "PCI")
            {
                return Err(generic(format!(
                    "Device '{}' can't go on {ty} bus",
                    model.name
                )));
            }
            return Ok(Some(bus.to_owned()));
        }
        let ok = match model.kind {
            k if k.on_pci() => board.has_pci(),
            Kind::ScsiHd | Kind::ScsiCd => self
                .list
                .borrow()
                .iter()
                .any(|d| d.model.kind.is_scsi_host()),
            Kind::IdeHd | Kind::IdeCd => board.ide_buses() > 0,
            Kind::Floppy => self.fdc.get(),
            _ => true,
        };
        if ok { Ok(None) } else { Err(no_bus()) }
    }

    /// Whether the machine has a bus of that name.
    fn bus_exists(&self, bus: &str) -> bool {
        let board = self.machine.kind.board;
        self.list.borrow().iter().any(|d| {
            // A SCSI controller's bus is `ID.0`; a bridge's is named as the bridge.
            d.bus_name.as_deref() == Some(bus)
                || (d.model.kind == Kind::PciBridge && d.id.as_deref() == Some(bus))
        }) || bus.starts_with("pci")
            || bus
                .strip_prefix("ide.")
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| n < board.ide_buses())
            || bus == "pcie.0"
    }

    /// The bus a relative path names, as QEMU's `qbus_find` walks it: a bus found by its
    /// name, then in turn a device on it (by ID) and one of that device's buses; a path
    /// that ends at a device means its one bus.
    ///
    /// # Errors
    /// "Bus 'x' not found" (the first element's, or a device's), "Device 'x' not found"
    /// (DeviceNotFound), "Device 'x' has no child bus", "Bus 'path' is full" (a virtio
    /// proxy's bus).
    fn bus_by_relative_path(&self, path: &str) -> Result<String, Error> {
        let (first, rest) = path.split_once('/').unwrap_or((path, ""));
        let mut parts = rest.split('/').filter(|p| !p.is_empty());
        if !self.bus_exists(first) {
            return Err(generic(format!("Bus '{first}' not found")));
        }
        let mut bus = first.to_owned();
        while let Some(dev_id) = parts.next() {
            let child_bus = self
                .list
                .borrow()
                .iter()
                .find(|d| {
                    d.id.as_deref() == Some(dev_id) && d.bus.as_deref().is_none_or(|b| b == bus)
                })
                .map(|d| match d.model.kind {
                    Kind::PciBridge => d.id.clone().map(|b| (b, false)),
                    Kind::Lsi => d.bus_name.clone().map(|b| (b, false)),
                    // A virtio proxy's one bus is a virtio bus, which its device fills.
                    Kind::VirtioBlk | Kind::VirtioScsi => Some(("virtio-bus".to_owned(), true)),
                    _ => None,
                })
                .ok_or_else(|| {
                    Error::new(
                        ErrorClass::DeviceNotFound,
                        format!("Device '{dev_id}' not found"),
                    )
                })?;
            let full = match (parts.next(), child_bus) {
                (None, Some((b, full))) => {
                    bus = b;
                    full
                }
                (None, None) => {
                    return Err(generic(format!("Device '{dev_id}' has no child bus")));
                }
                (Some(want), Some((b, full))) if want == b => {
                    bus = b;
                    full
                }
                (Some(want), _) => return Err(generic(format!("Bus '{want}' not found"))),
            };
            if full && parts.clone().next().is_none() {
                return Err(generic(format!("Bus '{path}' is full")));
            }
        }
        Ok(bus)
    }

    /// The bus an absolute path names, as QEMU's `qbus_find` walks it from the system bus:
    /// devices and their buses in turn. Of the system bus's devices ferrite has the board's
    /// PCI host bridge, whose one bus is the root bus.
    ///
    /// # Errors
    /// QEMU's texts for a device that is not there (DeviceNotFound), a bus that is not,
    /// and the system bus itself, which takes none of ferrite's devices.
    fn bus_by_path(&self, model: &Model, path: &str) -> Result<String, Error> {
        let board = self.machine.kind.board;
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let Some(first) = parts.next() else {
            return Err(generic(format!(
                "Device '{}' can't go on System bus",
                model.name
            )));
        };
        if !board.has_pci() || first != board.host_bridge() {
            return Err(Error::new(
                ErrorClass::DeviceNotFound,
                format!("Device '{first}' not found"),
            ));
        }
        match (parts.next(), parts.next()) {
            (None, _) => Ok(board.root_bus().to_owned()),
            (Some(bus), None) if bus == board.root_bus() => Ok(bus.to_owned()),
            (Some(bus), None) => Err(generic(format!("Bus '{bus}' not found"))),
            (Some(_), Some(dev)) => Err(Error::new(
                ErrorClass::DeviceNotFound,
                format!("Device '{dev}' not found"),
            )),
        }
    }

    /// `device_del`: a device on a bus that unplugs at once goes now (DEVICE_DELETED); a PCI
    /// device waits for the guest to let it go, which without a guest happens at the next
    /// `system_reset`.
    ///
    /// # Errors
    /// "Device 'x' not found" (DeviceNotFound), a bus without hot-unplug.
    pub(crate) async fn del(&self, id: &str) -> Result<(), Error> {
        let dev = self.find_device_state(id)?;
        // QEMU lets a request be repeated once the machine's virtual clock has moved past
        // the first one (a guest that booted after it missed it); one made before the clock
        // ever moved holds until the unplug is done.
        let now_ms = ferrite_block::clock::vm_clock_ns() / 1_000_000;
        if let Some(asked) = dev.unplug_asked_ms.get()
            && (asked == 0 || asked > now_ms)
        {
            return Err(generic(format!(
                "Device {id} is already in the process of unplug"
            )));
        }
        match dev.model.kind {
            k if k.on_pci() => {
                dev.unplug_asked_ms.set(Some(now_ms));
                Ok(())
            }
            Kind::ScsiHd | Kind::ScsiCd => {
                self.remove(&dev).await;
                Ok(())
            }
            Kind::IdeHd | Kind::IdeCd => Err(generic("Bus 'ide.0' does not support hotplugging")),
            _ => Err(generic("Bus 'floppy-bus.0' does not support hotplugging")),
        }
    }

    /// The devices whose unplug waits for a reset.
    fn pending_unplugs(&self) -> Vec<Rc<Device>> {
        self.list
            .borrow()
            .iter()
            .filter(|d| d.unplug_asked_ms.get().is_some())
            .cloned()
            .collect()
    }

    /// Unplugs `pending` (those still present: a device may have gone meanwhile).
    async fn finish_unplugs(&self, pending: Vec<Rc<Device>>) {
        for d in pending {
            if self.list.borrow().iter().any(|x| Rc::ptr_eq(x, &d)) {
                self.remove(&d).await;
            }
        }
    }

    /// Removes a device (and what sits on its bus), releasing its drive; a node only the
    /// device's drive held that the monitor did not add (an overlay `blockdev-snapshot-sync`
    /// made, a `-drive`'s image) is closed and goes, as QEMU's last reference does.
    fn remove<'a>(
        &'a self,
        dev: &'a Rc<Device>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> {
        Box::pin(self.remove_now(dev))
    }

    async fn remove_now(&self, dev: &Rc<Device>) {
        if dev.bus_name.is_some() {
            // The SCSI devices sit on this controller's bus (the devices do not record
            // which controller's when there are several: all of them go).
            let children: Vec<_> = self
                .list
                .borrow()
                .iter()
                .filter(|d| matches!(d.model.kind, Kind::ScsiHd | Kind::ScsiCd))
                .cloned()
                .collect();
            for c in children {
                self.remove(&c).await;
            }
        }
        self.list.borrow_mut().retain(|d| !Rc::ptr_eq(d, dev));
        if let Some(blk) = &dev.blk {
            blk.set_device(None);
            blk.set_medium(Medium::default());
            if dev.auto_del || blk.name().is_empty() {
                let node = blk.node();
                if dev.auto_del
                    && let Some(node) = &node
                {
                    self.jobs.cancel_jobs_on(node).await;
                }
                blk.remove();
                blk.set_name("");
                if let Some(node) = node {
                    self.graph.close_inline(&node).await;
                }
            }
        }
        if dev.model.kind == Kind::VirtioBlk {
            self.emit_deleted(None, format!("{}/virtio-backend", dev.path));
        }
        self.emit_deleted(dev.id.clone(), dev.path.clone());
    }

    fn emit_deleted(&self, device: Option<String>, path: String) {
        let mut data = QDict::new();
        if let Some(d) = device {
            data.insert("device", d);
        }
        data.insert("path", path);
        self.events.emit(Event {
            name: "DEVICE_DELETED",
            data: Some(data),
        });
    }
}
