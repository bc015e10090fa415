//! The machine's state as `savevm` keeps it in an image's VM state area and `loadvm` reads
//! it back. The layout is QEMU's migration stream: the magic and version, a configuration
//! section naming the machine type, one full section per device (its QOM path and model
//! as the section's name, its state as JSON), the end mark and the description of the
//! sections that follows it. ferrite's machine has no
//! CPU and no RAM, so its devices' state is all there is: a tray's position and lock.
//!
//! Reading refuses what QEMU refuses, in its words: a stream of another machine type, and
//! a section for a device this machine does not have (every stream QEMU writes starts with
//! sections ferrite has no device for, and QEMU refuses ferrite's sections the same way).

use crate::bitmap_migration;
use crate::devices::Devices;
use ferrite_block::Medium;
use ferrite_qobject::{QDict, QObject};

/// `QEMU_VM_FILE_MAGIC` ("QEVM").
const MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
const VERSION: u32 = 3;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SECTION_FOOTER: u8 = 0x7e;
const VMDESCRIPTION: u8 = 0x06;
const CONFIGURATION: u8 = 0x07;
/// `QEMU_VM_COMMAND`: a command to the destination in the stream.
const COMMAND: u8 = 0x08;
/// `MIG_CMD_POSTCOPY_RUN`: the destination runs now; the rest of the stream follows.
const POSTCOPY_RUN: u16 = 5;
const EOF: u8 = 0x00;
/// The version of ferrite's device sections.
const DEVICE_VERSION: u32 = 1;

/// Why a stream was refused: what QEMU reports, and the errno its loader returns.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LoadError {
    pub(crate) report: String,
    pub(crate) errno: i32,
    /// The stream ended before it was whole (more of it may be on its way).
    pub(crate) short: bool,
}

fn invalid(report: impl Into<String>) -> LoadError {
    LoadError {
        report: report.into(),
        errno: libc::EINVAL,
        short: false,
    }
}

/// The name a device's section goes by: its QOM path and its model.
fn section_name(path: &str, model: &str) -> String {
    format!("{path}/{model}")
}

/// The name of QEMU's section for the run state the machine had (`globalstate`).
const GLOBAL_STATE: &str = "globalstate";

/// QEMU's `globalstate` section's body: the run state's name NUL-terminated in 32 bytes
/// after its length, whether the machine was suspended, and padding (104 bytes).
fn global_state(runstate: &str) -> Vec<u8> {
    let name = &runstate.as_bytes()[..runstate.len().min(31)];
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&(name.len() as u32 + 1).to_be_bytes());
    let mut field = [0u8; 32];
    field[..name.len()].copy_from_slice(name);
    b.extend_from_slice(&field);
    b.extend_from_slice(&[1, 0]);
    b.extend_from_slice(&[0u8; 66]);
    b
}

/// Starts a full section named `name`.
fn section_header(out: &mut Vec<u8>, id: u32, name: &str, version: u32) {
    section_header_of(out, SECTION_FULL, id, name, version);
}

fn section_header_of(out: &mut Vec<u8>, kind: u8, id: u32, name: &str, version: u32) {
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    // A section name is at most 255 bytes long (its length is one byte).
    let name = &name.as_bytes()[..name.len().min(255)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
}

/// The stream of the machine `machine` (its type's name) in run state `runstate` and its
/// devices now, with the dirty bitmaps that migrate (QEMU's live `dirty-bitmap` section:
/// started, then ended, before the devices' sections).
pub(crate) fn save(
    machine: &str,
    runstate: &str,
    devices: &Devices,
    bitmaps: &[bitmap_migration::Outgoing],
) -> Vec<u8> {
    let mut out = save_first(machine, runstate, devices, bitmaps, false);
    out.extend(save_end(devices, bitmaps, false));
    out
}

/// The bitmaps' section id: after the devices'.
fn bitmap_section_id(devices: &Devices) -> u32 {
    devices.all().len() as u32 + 1
}

/// The section that ends the bitmaps' migration: their bits, then each one's end.
fn bitmap_end(out: &mut Vec<u8>, devices: &Devices, bitmaps: &[bitmap_migration::Outgoing]) {
    let id = bitmap_section_id(devices);
    out.push(SECTION_END);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&bitmap_migration::end_body(bitmaps));
    out.push(SECTION_FOOTER);
    out.extend_from_slice(&id.to_be_bytes());
}

/// What the destination needs before it runs: the whole stream but its end, or for a
/// postcopy migration with bitmaps everything but their bits, closed by QEMU's
/// `POSTCOPY_RUN` command ([`save_end`] is the rest).
pub(crate) fn save_first(
    machine: &str,
    runstate: &str,
    devices: &Devices,
    bitmaps: &[bitmap_migration::Outgoing],
    postcopy: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.push(CONFIGURATION);
    out.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    out.extend_from_slice(machine.as_bytes());
    let id = bitmap_section_id(devices);
    let postcopy = postcopy && !bitmaps.is_empty();
    if !bitmaps.is_empty() {
        section_header_of(&mut out, SECTION_START, id, bitmap_migration::SECTION, 1);
        out.extend_from_slice(&bitmap_migration::start_body(bitmaps));
        out.push(SECTION_FOOTER);
        out.extend_from_slice(&id.to_be_bytes());
        if !postcopy {
            bitmap_end(&mut out, devices, bitmaps);
        }
    }
    section_header(&mut out, 0, GLOBAL_STATE, 1);
    out.extend_from_slice(&global_state(runstate));
    out.push(SECTION_FOOTER);
    out.extend_from_slice(&0u32.to_be_bytes());
    for (id, dev) in devices.all().iter().enumerate() {
        let id = id as u32 + 1;
        let name = section_name(&dev.path, dev.model.name);
        let mut state = QDict::new();
        if let Some(blk) = &dev.blk {
            let m = blk.medium();
            state.insert("tray-open", m.tray_open);
            state.insert("tray-locked", m.locked);
        }
        let json = ferrite_qobject::to_json(&QObject::from(state));
        section_header(&mut out, id, &name, DEVICE_VERSION);
        out.extend_from_slice(&(json.len() as u32).to_be_bytes());
        out.extend_from_slice(json.as_bytes());
        out.push(SECTION_FOOTER);
        out.extend_from_slice(&id.to_be_bytes());
    }
    if postcopy {
        out.push(COMMAND);
        out.extend_from_slice(&POSTCOPY_RUN.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    out
}

/// The rest of the stream after [`save_first`]: a postcopy migration's bitmaps, then the
/// end mark and the description of the sections.
pub(crate) fn save_end(
    devices: &Devices,
    bitmaps: &[bitmap_migration::Outgoing],
    postcopy: bool,
) -> Vec<u8> {
    let mut rest = Vec::new();
    if postcopy && !bitmaps.is_empty() {
        bitmap_end(&mut rest, devices, bitmaps);
    }
    let out_end = &mut rest;
    out_end.push(EOF);
    // What the sections were, for tools that read streams (QEMU expects it after the end).
    let described: Vec<QObject> = devices
        .all()
        .iter()
        .map(|d| {
            QDict::new()
                .with("name", section_name(&d.path, d.model.name))
                .with("instance_id", 0u64)
                .into()
        })
        .collect();
    let description = ferrite_qobject::to_json(
        &QDict::new()
            .with("page_size", 4096u64)
            .with("devices", QObject::List(described))
            .into(),
    );
    out_end.push(VMDESCRIPTION);
    out_end.extend_from_slice(&(description.len() as u32).to_be_bytes());
    out_end.extend_from_slice(description.as_bytes());
    rest
}

/// A cursor over a stream; running off its end is QEMU's `-EIO` from a short read.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
    /// A read ran past the end (an error it led to may say otherwise).
    ran_short: bool,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LoadError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(LoadError {
                report: "Unexpected end of the VM state".into(),
                errno: libc::EIO,
                short: true,
            });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, LoadError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, LoadError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl bitmap_migration::Source for Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let got = Reader::take(self, n).ok();
        self.ran_short |= got.is_none();
        got
    }
}

/// Reads a live section's part for the bitmaps and its footer.
fn bitmap_part(
    r: &mut Reader<'_>,
    bitmaps: &mut bitmap_migration::Loader,
    id: u32,
) -> Result<(), LoadError> {
    bitmaps.read(r).map_err(invalid)?;
    if r.u8()? != SECTION_FOOTER || r.u32()? != id {
        return Err(invalid(format!(
            "Missing section footer for {}",
            bitmap_migration::SECTION
        )));
    }
    Ok(())
}

/// Reads the second part of a postcopy stream `bytes` (from [`Loaded::postcopy`]): the
/// bitmaps' section `id`'s parts up to the end of the stream, into `bitmaps`.
///
/// # Errors
/// QEMU's reports for a section it cannot take; a stream cut short.
pub(crate) fn load_rest(
    bytes: &[u8],
    id: u32,
    bitmaps: &mut bitmap_migration::Loader,
) -> Result<(), LoadError> {
    let mut r = Reader {
        b: bytes,
        at: 0,
        ran_short: false,
    };
    loop {
        match r.u8()? {
            EOF => return Ok(()),
            SECTION_PART | SECTION_END if r.u32()? == id => bitmap_part(&mut r, bitmaps, id)?,
            other => return Err(invalid(format!("Unknown savevm section type {other}"))),
        }
    }
}

/// A device's state as its section holds it.
pub(crate) struct DeviceState {
    /// The device's QOM path.
    pub(crate) path: String,
    tray: Option<(bool, bool)>,
}

impl DeviceState {
    /// Puts the saved tray position and lock back into `medium`.
    pub(crate) fn restore(&self, medium: &mut Medium) {
        if let Some((open, locked)) = self.tray
            && medium.has_tray
        {
            medium.tray_open = open;
            medium.locked = locked;
        }
    }
}

impl Loaded {
    /// Puts each device's saved state back.
    pub(crate) fn restore(&self, devices: &Devices) {
        for s in &self.devices {
            if let Some(blk) = devices.find_by_path(&s.path).and_then(|d| d.blk.clone()) {
                let mut medium = blk.medium();
                s.restore(&mut medium);
                blk.set_medium(medium);
            }
        }
    }
}

/// What a stream held: the run state the machine had (QEMU's global state) and the state
/// of each device it has a section for.
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) runstate: Option<String>,
    pub(crate) devices: Vec<DeviceState>,
    /// The dirty bitmaps that came with the machine.
    pub(crate) bitmaps: bitmap_migration::Loader,
    /// A postcopy stream: where its second part starts (after `POSTCOPY_RUN`), and the id
    /// of the bitmaps' section, whose parts follow there.
    pub(crate) postcopy: Option<(usize, u32)>,
}

/// Reads a stream `bytes` long (the rest of the area is not looked at) for the machine
/// `machine` with `devices`: the state of each device it has a section for.
///
/// # Errors
/// QEMU's reports for a stream that is not one, another machine type, a section for no
/// device here, a section cut short.
pub(crate) fn load(bytes: &[u8], machine: &str, devices: &Devices) -> Result<Loaded, LoadError> {
    let mut r = Reader {
        b: bytes,
        at: 0,
        ran_short: false,
    };
    let mut out = Loaded::default();
    match load_from(&mut r, machine, devices, &mut out) {
        Ok(()) => Ok(out),
        Err(e) => Err(LoadError {
            short: e.short || r.ran_short,
            ..e
        }),
    }
}

/// [`load`] on a reader.
fn load_from(
    r: &mut Reader<'_>,
    machine: &str,
    devices: &Devices,
    out: &mut Loaded,
) -> Result<(), LoadError> {
    if r.u32()? != MAGIC {
        return Err(invalid("Not a migration stream"));
    }
    match r.u32()? {
        VERSION => {}
        2 => {
            return Err(invalid(
                "SaveVM v2 format is obsolete and don't work anymore",
            ));
        }
        _ => return Err(invalid("Unsupported migration stream version")),
    }
    if r.u8()? != CONFIGURATION {
        return Err(invalid("Configuration section missing"));
    }
    let len = r.u32()? as usize;
    let theirs = String::from_utf8_lossy(r.take(len)?).into_owned();
    if theirs != machine {
        return Err(invalid(format!(
            "Machine type received is '{theirs}' and local is '{machine}'"
        )));
    }
    let here = devices.all();
    let mut bitmap_section = None;
    loop {
        match r.u8()? {
            EOF => return Ok(()),
            SECTION_PART | SECTION_END => {
                let id = r.u32()?;
                if bitmap_section != Some(id) {
                    return Err(invalid(format!("Unknown savevm section {id}")));
                }
                bitmap_part(r, &mut out.bitmaps, id)?;
            }
            COMMAND => {
                let b = r.take(4)?;
                let (cmd, len) = (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                );
                match (cmd, len, bitmap_section) {
                    (POSTCOPY_RUN, 0, Some(id)) => {
                        out.postcopy = Some((r.at, id));
                        return Ok(());
                    }
                    _ => {
                        return Err(invalid(format!(
                            "Unknown or unsupported migration command {cmd} (length {len})"
                        )));
                    }
                }
            }
            // A section that starts an iteration (QEMU's RAM) has the same header.
            kind @ (SECTION_FULL | SECTION_START) => {
                let id = r.u32()?;
                let name_len = usize::from(r.u8()?);
                let name = String::from_utf8_lossy(r.take(name_len)?).into_owned();
                let instance = r.u32()?;
                let version = r.u32()?;
                if kind == SECTION_START && name == bitmap_migration::SECTION {
                    bitmap_section = Some(id);
                    bitmap_part(r, &mut out.bitmaps, id)?;
                    continue;
                }
                if kind == SECTION_FULL && name == GLOBAL_STATE {
                    let body = r.take(104)?;
                    let field = &body[4..36];
                    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
                    out.runstate = Some(String::from_utf8_lossy(&field[..end]).into_owned());
                    if r.u8()? != SECTION_FOOTER || r.u32()? != id {
                        return Err(invalid(format!("Missing section footer for {name}")));
                    }
                    continue;
                }
                let dev = here.iter().find(|d| {
                    kind == SECTION_FULL
                        && section_name(&d.path, d.model.name) == name
                        && instance == 0
                });
                let Some(dev) = dev else {
                    return Err(invalid(format!(
                        "Unknown savevm section or instance '{name}' {instance}. Make sure \
                         that your current VM setup matches your saved VM setup, including \
                         any hotplugged devices"
                    )));
                };
                if version > DEVICE_VERSION {
                    return Err(invalid(format!(
                        "savevm: unsupported version {version} for '{name}' v{DEVICE_VERSION}"
                    )));
                }
                let len = r.u32()? as usize;
                let json = r.take(len)?;
                let state = std::str::from_utf8(json)
                    .ok()
                    .and_then(|t| ferrite_qobject::from_json(t).ok());
                let Some(QObject::Dict(state)) = state else {
                    return Err(invalid(format!(
                        "error while loading state for instance 0x0 of device '{name}'"
                    )));
                };
                if r.u8()? != SECTION_FOOTER || r.u32()? != id {
                    return Err(invalid(format!("Missing section footer for {name}")));
                }
                let flag = |k: &str| state.get(k).and_then(QObject::as_bool);
                out.devices.push(DeviceState {
                    path: dev.path.clone(),
                    tray: flag("tray-open").zip(flag("tray-locked")),
                });
            }
            other => return Err(invalid(format!("Unknown savevm section type {other}"))),
        }
    }
}
