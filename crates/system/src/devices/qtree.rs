//! The human monitor's `info qtree`: the machine's buses and the devices on them, as QEMU
//! prints its device tree (each bus lists its newest device first).
//!
//! ferrite's machine has no guest, so the tree holds what the block layer needs of the
//! board: its PCI host, the IDE and ISA bridges, the floppy controller and the parallel
//! port it carries, and every storage device. The floppy controller and its drives are
//! listed with all their properties, as QEMU lists them; other devices show where they sit
//! and which drive they use.

use super::{Device, Devices, Kind};
use crate::machine::Board;
use std::fmt::Write;
use std::rc::Rc;

/// One line of the tree, `depth` levels in.
struct Tree(String);

impl Tree {
    fn line(&mut self, depth: usize, text: impl AsRef<str>) {
        let _ = writeln!(self.0, "{:width$}{}", "", text.as_ref(), width = depth * 2);
    }

    fn bus(&mut self, depth: usize, name: &str, kind: &str) {
        self.line(depth, format!("bus: {name}"));
        self.line(depth + 1, format!("type {kind}"));
    }

    fn dev(&mut self, depth: usize, model: &str, id: Option<&str>) {
        self.line(
            depth,
            format!("dev: {model}, id \"{}\"", id.unwrap_or_default()),
        );
    }

    fn uint(&mut self, depth: usize, name: &str, v: u64) {
        self.line(depth, format!("{name} = {v} (0x{v:x})"));
    }

    fn size(&mut self, depth: usize, name: &str, v: u64) {
        self.line(depth, format!("{name} = {v} ({})", size_to_str(v)));
    }

    fn string(&mut self, depth: usize, name: &str, v: &str) {
        self.line(depth, format!("{name} = \"{v}\""));
    }
}

/// A size as QEMU prints it beside a property: three significant digits and a binary unit
/// (`512 B`, `4 KiB`, `4 GiB`).
fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // The unit: the power of 1024 below v * 1024 / 1000.
    let scaled = v as f64 * 1024.0 / 1000.0;
    let i = if scaled < 1.0 {
        0
    } else {
        ((scaled.log2().floor() as usize) / 10).min(UNITS.len() - 1)
    };
    let value = v as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", three_digits(value), UNITS[i])
}

/// `%.3g` for values under 1000: three significant digits, no trailing zeros.
fn three_digits(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let int_digits = x.abs().log10().floor() as i32 + 1;
    let decimals = (3 - int_digits).max(0) as usize;
    let text = format!("{x:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

impl Devices {
    /// `info qtree`.
    pub(crate) fn qtree(&self) -> String {
        let mut t = Tree(String::new());
        t.bus(0, "main-system-bus", "System");
        let board = self.machine.kind.board;
        let (host, pci_bus, pci_kind, ide, isa, bridge) = match board {
            Board::Pc => (
                "i440FX-pcihost",
                "pci.0",
                "PCI",
                "piix3-ide",
                "PIIX3",
                "i440FX",
            ),
            Board::Q35 => (
                "q35-pcihost",
                "pcie.0",
                "PCIE",
                "ich9-ahci",
                "ICH9-LPC",
                "mch",
            ),
            Board::None => return t.0,
        };
        let devices = self.all();
        t.dev(1, host, None);
        t.bus(2, pci_bus, pci_kind);
        for d in devices.iter().rev().filter(|d| d.model.kind.on_pci()) {
            self.pci_device(&mut t, 3, d, &devices);
        }
        t.dev(3, ide, None);
        for bus in (0..board.ide_buses()).rev() {
            let name = format!("ide.{bus}");
            t.bus(4, &name, "IDE");
            for d in devices
                .iter()
                .rev()
                .filter(|d| d.ide_slot.as_ref().is_some_and(|(b, _)| *b == name))
            {
                t.dev(5, d.model.name, d.id.as_deref());
                drive(&mut t, 6, d);
                if let Some((_, unit)) = &d.ide_slot {
                    t.uint(6, "unit", u64::from(*unit));
                }
            }
        }
        t.dev(3, isa, None);
        t.bus(4, "isa.0", "ISA");
        if self.fdc.get() {
            self.floppy_controller(&mut t, 5, &devices);
        }
        if self.parallel.get() {
            t.dev(5, "isa-parallel", None);
            t.uint(6, "index", 0);
            t.uint(6, "iobase", 0x378);
            t.uint(6, "irq", 7);
            t.string(6, "chardev", "parallel0");
        }
        t.dev(3, bridge, None);
        t.0
    }

    /// A device on the PCI bus, and what sits on the buses it provides.
    fn pci_device(&self, t: &mut Tree, depth: usize, d: &Device, devices: &[Rc<Device>]) {
        t.dev(depth, d.model.name, d.id.as_deref());
        let inner = match d.model.kind {
            Kind::VirtioBlk => "virtio-blk-device",
            Kind::VirtioScsi => "virtio-scsi-device",
            _ => {
                if let Some(bus) = &d.bus_name {
                    self.scsi_bus(t, depth + 1, bus, devices);
                }
                return;
            }
        };
        t.bus(depth + 1, "virtio-bus", "virtio-pci-bus");
        t.dev(depth + 2, inner, None);
        drive(t, depth + 3, d);
        if let Some(bus) = &d.bus_name {
            self.scsi_bus(t, depth + 3, bus, devices);
        }
    }

    /// A SCSI controller's bus and its disks.
    fn scsi_bus(&self, t: &mut Tree, depth: usize, bus: &str, devices: &[Rc<Device>]) {
        t.bus(depth, bus, "SCSI");
        for d in devices
            .iter()
            .rev()
            .filter(|d| matches!(d.model.kind, Kind::ScsiHd | Kind::ScsiCd))
            .filter(|d| {
                self.scsi_controller(d.bus.as_deref())
                    .is_some_and(|c| c.bus_name.as_deref() == Some(bus))
            })
        {
            t.dev(depth + 1, d.model.name, d.id.as_deref());
            drive(t, depth + 2, d);
        }
    }

    /// The floppy controller, its bus and its drives with every property QEMU lists.
    fn floppy_controller(&self, t: &mut Tree, depth: usize, devices: &[Rc<Device>]) {
        t.dev(depth, "isa-fdc", None);
        let p = depth + 1;
        t.uint(p, "iobase", 0x3f0);
        t.uint(p, "irq", 6);
        t.uint(p, "dma", 2);
        t.string(p, "fdtypeA", "auto");
        t.string(p, "fdtypeB", "auto");
        t.string(p, "fallback", "288");
        t.bus(p, "floppy-bus.0", "floppy-bus");
        for d in devices.iter().rev() {
            let Some((unit, drive_type)) = d.floppy else {
                continue;
            };
            t.dev(p + 1, "floppy", d.id.as_deref());
            let q = p + 2;
            let given = |name: &str, default: &'static str| -> String {
                d.given(name).unwrap_or(default).to_owned()
            };
            let size = |name: &str, default: u64| {
                d.given(name)
                    .and_then(ferrite_qapi::visit::parse_size)
                    .filter(|n| *n != 0 || default == 0)
                    .unwrap_or(default)
            };
            t.uint(q, "unit", u64::from(unit));
            drive(t, q, d);
            t.string(q, "backend_defaults", &given("backend_defaults", "auto"));
            t.size(q, "logical_block_size", size("logical_block_size", 512));
            t.size(q, "physical_block_size", size("physical_block_size", 512));
            t.size(q, "min_io_size", size("min_io_size", 0));
            t.size(q, "opt_io_size", size("opt_io_size", 0));
            t.size(
                q,
                "discard_granularity",
                size("discard_granularity", u64::from(u32::MAX)),
            );
            t.string(q, "write-cache", &given("write-cache", "auto"));
            t.line(q, format!("share-rw = {}", d.share_rw));
            t.string(q, "account-invalid", &given("account-invalid", "auto"));
            t.string(q, "account-failed", &given("account-failed", "auto"));
            t.string(q, "drive-type", drive_type);
        }
    }
}

/// A device's `drive` property: its drive's name, else its node's, else empty.
fn drive(t: &mut Tree, depth: usize, d: &Device) {
    let Some(blk) = &d.blk else { return };
    let name = blk.name();
    let name = if name.is_empty() {
        blk.node().map(|n| n.name().to_owned()).unwrap_or_default()
    } else {
        name
    };
    t.string(depth, "drive", &name);
}

#[cfg(test)]
mod tests {
    use super::size_to_str;

    #[test]
    fn sizes_print_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(u64::from(u32::MAX)), "4 GiB");
        assert_eq!(size_to_str(2 << 20), "2 MiB");
    }
}
