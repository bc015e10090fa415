//! Removable media: opening and closing trays, taking media out and putting them in
//! (`eject`, `blockdev-open-tray`, `blockdev-close-tray`, `blockdev-remove-medium`,
//! `blockdev-insert-medium`, `blockdev-change-medium`), with `DEVICE_TRAY_MOVED` when a
//! tray moves. Without a guest nothing locks a tray, so a tray opens when asked.

use super::{Device, Devices, Kind, block_error, generic};
use ferrite_block::{BlockBackend, Node, Perm};
use ferrite_qapi::{Args, Error};
use ferrite_qmp::Event;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// A drive a medium command names, and the device it is attached to.
struct Slot {
    blk: Rc<BlockBackend>,
    device: Option<Rc<Device>>,
    /// How messages name it: the device id or the drive name the command gave.
    label: String,
}

impl Slot {
    /// Whether media can come and go: a drive without a device takes anything.
    fn removable(&self) -> bool {
        self.device
            .as_ref()
            .is_none_or(|d| d.model.kind.removable())
    }

    fn has_tray(&self) -> bool {
        self.device
            .as_ref()
            .is_some_and(|d| d.model.kind.has_tray())
    }

    fn tray_open(&self) -> bool {
        self.blk.medium().tray_open
    }
}

/// Why a tray did not open; some callers go on regardless (QEMU's `do_open_tray` codes).
enum TrayRefusal {
    /// No such drive or device, or it takes no removable media: every caller stops.
    Fatal(Error),
    /// The device has no tray (a floppy drive, a drive without a device).
    NoTray(Error),
    /// The guest holds the tray locked; it was asked to open it.
    Locked(Error),
}

impl TrayRefusal {
    fn into_error(self) -> Error {
        match self {
            TrayRefusal::Fatal(e) | TrayRefusal::NoTray(e) | TrayRefusal::Locked(e) => e,
        }
    }
}

fn read_only_for(mode: Option<&str>, retained: bool) -> bool {
    match mode {
        Some("read-only") => true,
        Some("read-write") => false,
        _ => retained,
    }
}

impl Devices {
    /// The drive `device` (a drive name) or `id` (a device) names, and its device.
    fn slot(&self, device: Option<&str>, id: Option<&str>) -> Result<Slot, Error> {
        let blk = self.named_drive(device, id)?;
        let label = id.or(device).unwrap_or_default();
        let device = self
            .list
            .borrow()
            .iter()
            .find(|d| d.blk.as_ref().is_some_and(|b| Rc::ptr_eq(b, &blk)))
            .cloned();
        Ok(Slot {
            blk,
            device,
            label: label.to_owned(),
        })
    }

    /// The device learns that its medium went (`load` false) or came: a CD-ROM's tray
    /// follows, a floppy drive gives up or takes its permissions; a tray that moved is
    /// announced.
    ///
    /// # Errors
    /// A loaded floppy that cannot take write access to a writable medium.
    fn change_media(&self, slot: &Slot, load: bool) -> Result<(), Error> {
        let Some(dev) = slot.device.as_ref().filter(|d| d.model.kind.removable()) else {
            return Ok(());
        };
        let was_open = slot.tray_open();
        if dev.model.kind == Kind::Floppy {
            let (perm, shared) = match slot.blk.node() {
                Some(node) if load => dev.model.kind.perms(dev.share_rw, &node),
                _ => (Perm::empty(), Perm::all()),
            };
            slot.blk.set_perm(perm, shared).map_err(block_error)?;
        } else {
            let mut medium = slot.blk.medium();
            medium.tray_open = !load;
            slot.blk.set_medium(medium);
        }
        let open = slot.tray_open();
        if open != was_open {
            let id = dev.id.clone().unwrap_or_else(|| dev.path.clone());
            self.events.emit(Event {
                name: "DEVICE_TRAY_MOVED",
                data: Some(
                    QDict::new()
                        .with("device", slot.blk.name())
                        .with("id", id)
                        .with("tray-open", open),
                ),
            });
        }
        Ok(())
    }

    fn open_tray(&self, slot: &Slot, force: bool) -> Result<(), TrayRefusal> {
        if !slot.removable() {
            return Err(TrayRefusal::Fatal(generic(format!(
                "Device '{}' is not removable",
                slot.label
            ))));
        }
        if !slot.has_tray() {
            return Err(TrayRefusal::NoTray(generic(format!(
                "Device '{}' does not have a tray",
                slot.label
            ))));
        }
        if slot.tray_open() {
            return Ok(());
        }
        let mut medium = slot.blk.medium();
        if medium.locked {
            if !force {
                // A guest would be asked to open it; there is none to answer.
                return Err(TrayRefusal::Locked(generic(format!(
                    "Device '{}' is locked and force was not specified, wait for tray to \
                     open and try again",
                    slot.label
                ))));
            }
            medium.locked = false;
            slot.blk.set_medium(medium);
        }
        self.change_media(slot, false).map_err(TrayRefusal::Fatal)
    }

    fn close_tray(&self, slot: &Slot) -> Result<(), Error> {
        if !slot.removable() {
            return Err(generic(format!("Device '{}' is not removable", slot.label)));
        }
        if !slot.has_tray() || !slot.tray_open() {
            return Ok(());
        }
        self.change_media(slot, true)
    }

    async fn remove_medium(&self, slot: &Slot) -> Result<(), Error> {
        if slot.device.is_some() {
            if !slot.removable() {
                return Err(generic(format!("Device '{}' is not removable", slot.label)));
            }
            if slot.has_tray() && !slot.tray_open() {
                return Err(generic(format!(
                    "Tray of device '{}' is not open",
                    slot.label
                )));
            }
        }
        let Some(node) = slot.blk.node() else {
            return Ok(());
        };
        self.graph
            .check_op(&node, ferrite_block::BlockOp::Eject)
            .map_err(block_error)?;
        slot.blk.remove();
        // The nodes a drive opened itself go with it.
        self.graph.close_inline(&node).await;
        if !slot.has_tray() {
            // Without a tray, taking the medium out is what tells the device.
            self.change_media(slot, false)?;
        }
        Ok(())
    }

    fn insert_medium(&self, slot: &Slot, node: &Rc<Node>) -> Result<(), Error> {
        if slot.device.is_some() {
            if !slot.removable() {
                return Err(generic("Device is not removable"));
            }
            if slot.has_tray() && !slot.tray_open() {
                return Err(generic("Tray of the device is not open"));
            }
        }
        if slot.blk.node().is_some() {
            return Err(generic("There already is a medium in the device"));
        }
        let (perm, shared) = match &slot.device {
            Some(d) => d.model.kind.perms(d.share_rw, node),
            None => (Perm::empty(), Perm::all()),
        };
        if let Some(d) = &slot.device {
            // The medium joins the device's iothread.
            self.graph
                .move_to_iothread(node, d.iothread.as_deref(), Some(&slot.blk))
                .map_err(block_error)?;
        }
        slot.blk.insert(node, perm, shared).map_err(block_error)?;
        if !slot.has_tray()
            && let Err(e) = self.change_media(slot, true)
        {
            slot.blk.remove();
            return Err(e);
        }
        Ok(())
    }

    /// Runs a medium command, `None` for a command that is not one.
    pub(crate) async fn run_medium_command(
        &self,
        name: &str,
        args: &Args,
    ) -> Option<Result<QObject, Error>> {
        let r = match name {
            "eject" => self.eject(args).await,
            "blockdev-open-tray" => self.qmp_open_tray(args),
            "blockdev-close-tray" => self
                .slot(args.opt_str("device"), args.opt_str("id"))
                .and_then(|slot| self.close_tray(&slot)),
            "blockdev-remove-medium" => match self.slot(None, args.opt_str("id")) {
                Ok(slot) => self.remove_medium(&slot).await,
                Err(e) => Err(e),
            },
            "blockdev-insert-medium" => self.qmp_insert_medium(args),
            "blockdev-change-medium" => self.change_medium(args).await,
            _ => return None,
        };
        Some(r.map(|()| QObject::Dict(QDict::new())))
    }

    async fn eject(&self, args: &Args) -> Result<(), Error> {
        let slot = self.slot(args.opt_str("device"), args.opt_str("id"))?;
        match self.open_tray(&slot, args.bool_or("force", false)) {
            Ok(()) | Err(TrayRefusal::NoTray(_)) => {}
            Err(e) => return Err(e.into_error()),
        }
        self.remove_medium(&slot).await
    }

    fn qmp_open_tray(&self, args: &Args) -> Result<(), Error> {
        let slot = self.slot(args.opt_str("device"), args.opt_str("id"))?;
        match self.open_tray(&slot, args.bool_or("force", false)) {
            Err(TrayRefusal::Fatal(e)) => Err(e),
            _ => Ok(()),
        }
    }

    fn qmp_insert_medium(&self, args: &Args) -> Result<(), Error> {
        let slot = self.slot(None, args.opt_str("id"))?;
        let name = args.str("node-name")?;
        let node = self
            .graph
            .find(name)
            .ok_or_else(|| generic(format!("Node '{name}' not found")))?;
        let used = self
            .graph
            .backends()
            .iter()
            .any(|b| b.node().is_some_and(|n| Rc::ptr_eq(&n, &node)));
        if used {
            return Err(generic(format!("Node '{name}' is already in use")));
        }
        self.insert_medium(&slot, &node)
    }

    /// `blockdev-change-medium`: opens the new medium first, then opens the tray, takes the
    /// old medium out, puts the new one in and closes the tray; the new medium is dropped
    /// if a step fails.
    async fn change_medium(&self, args: &Args) -> Result<(), Error> {
        let slot = self.slot(args.opt_str("device"), args.opt_str("id"))?;
        let root = slot.blk.root_state();
        let read_only = read_only_for(args.opt_str("read-only-mode"), root.read_only);
        let extra = QDict::new().with("read-only", read_only).with(
            "detect-zeroes",
            if root.detect_zeroes { "on" } else { "off" },
        );
        let medium = self
            .graph
            .open_image(args.str("filename")?, args.opt_str("format"), extra)
            .await
            .map_err(Error::from)?;
        let r = self
            .swap_medium(&slot, &medium, args.bool_or("force", false))
            .await;
        if r.is_err() {
            self.graph.close_inline(&medium).await;
        }
        r
    }

    async fn swap_medium(&self, slot: &Slot, medium: &Rc<Node>, force: bool) -> Result<(), Error> {
        match self.open_tray(slot, force) {
            Ok(()) | Err(TrayRefusal::NoTray(_)) => {}
            Err(e) => return Err(e.into_error()),
        }
        self.remove_medium(slot).await?;
        self.insert_medium(slot, medium)?;
        self.close_tray(slot)
    }
}
