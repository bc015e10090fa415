//! `-drive` (QEMU: `blockdev.c`'s `drive_new`): the legacy way to make a drive. Its options
//! become a format node over a protocol node, opened with the options QEMU derives from
//! `cache`, `aio`, `readonly`...; the node is held by a `BlockBackend` named by `id`, and an
//! interface other than `none` puts a device on the machine with it.

use crate::devices::Devices;
use ferrite_block::clock::Clock;
use ferrite_block::{BlockBackend, Graph, OnError, Perm, RootState};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// What `-drive` made.
pub(crate) struct Drive {
    pub(crate) blk: Rc<BlockBackend>,
    /// The device its interface puts on the machine, made once every drive is known.
    pub(crate) device: Option<DriveDevice>,
    /// Why no device can take it (an interface the board lacks).
    pub(crate) orphan: Option<String>,
}

/// Who makes a drive's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum MadeBy {
    /// The board's init, by index: IDE devices first, then floppies, unattached to any
    /// `-device`.
    BoardIde,
    BoardFloppy,
    /// A `-device` of its own, after the command line's (`if=virtio`).
    Device,
}

/// The device for a drive's interface.
pub(crate) struct DriveDevice {
    pub(crate) props: QDict,
    pub(crate) made_by: MadeBy,
    pub(crate) index: u32,
}

/// Interfaces and how their default ids are spelled (`units`: IDE units on each bus).
fn default_id(interface: &str, index: u32, media_cd: bool, units: u32) -> String {
    match interface {
        "ide" => format!(
            "ide{}-{}{}",
            index / units,
            if media_cd { "cd" } else { "hd" },
            index % units
        ),
        "scsi" => format!("scsi0-{}{index}", if media_cd { "cd" } else { "hd" }),
        other => format!("{other}{index}"),
    }
}

fn generic(text: impl Into<String>) -> Error {
    Error::generic(text.into())
}

fn on_off(key: &str, v: &str) -> Result<bool, Error> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(generic(format!("Parameter '{key}' expects 'on' or 'off'"))),
    }
}

/// `werror=` or `rerror=`: an action QEMU's drives take on that kind of error (`enospc`
/// is for writes only).
fn error_action(v: Option<&str>, read: bool) -> Result<(), Error> {
    match v {
        None | Some("ignore" | "stop" | "report") => Ok(()),
        Some("enospc") if !read => Ok(()),
        Some(other) => Err(generic(format!(
            "'{other}' invalid {} error action",
            if read { "read" } else { "write" }
        ))),
    }
}

/// Takes option `k` out of `opts`, as the command line spelled it.
fn take_text(opts: &mut QDict, k: &str) -> Option<String> {
    opts.remove(k).map(|v| match v {
        QObject::String(s) => s,
        other => ferrite_qobject::to_json(&other),
    })
}

/// `d` with every scalar as the command line spells it (a `json:` name's typed values
/// join `-drive`'s text options).
fn as_text(d: QDict) -> QDict {
    let mut out = QDict::new();
    for (k, v) in d {
        let v = match v {
            QObject::Dict(inner) => QObject::Dict(as_text(inner)),
            QObject::Bool(b) => QObject::String(if b { "on" } else { "off" }.into()),
            QObject::String(t) => QObject::String(t),
            other => QObject::String(ferrite_qobject::to_json(&other)),
        };
        out.insert(k, v);
    }
    out
}

/// Adds to `given` what `from` has and it lacks, level by level (a name's options under
/// the user's).
fn fill_in(given: &mut QDict, from: QDict) {
    for (k, v) in from {
        match (given.get_mut(&k), v) {
            (Some(QObject::Dict(mine)), QObject::Dict(theirs)) => fill_in(mine, theirs),
            (Some(_), _) => {}
            (None, v) => given.insert(k, v),
        }
    }
}

/// `snapshot=on` (and `-snapshot`): a qcow2 overlay over `image` in the temporary
/// directory takes the writes, and goes with the program (QEMU's temporary snapshot). Its
/// file is unlinked once open, so nothing is left behind whatever way the program ends.
async fn temporary_overlay(
    graph: &Rc<Graph>,
    image: &Rc<ferrite_block::Node>,
    read_only: bool,
) -> Result<Rc<ferrite_block::Node>, Error> {
    let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/var/tmp".into());
    let path = (0..100)
        .map(|i| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            // Six characters after `vl.`, as QEMU's temporary files are named.
            let mut n = u64::from(nanos ^ std::process::id()).wrapping_mul(0x9e37_79b9) + i;
            let tail: String = (0..6)
                .map(|_| {
                    const ALNUM: &[u8] =
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
                    let c = ALNUM[(n % 62) as usize] as char;
                    n /= 62;
                    c
                })
                .collect();
            format!("{dir}/vl.{tail}")
        })
        .find(|p| !std::path::Path::new(p).exists())
        .ok_or_else(|| generic("Could not get temporary filename"))?;
    // Made as mkstemp makes it first (QEMU's words when that fails).
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            generic(format!(
                "Could not open temporary file '{path}': {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
    ferrite_blockdev::snapshot_cmds::create_overlay(graph, image, &path, "qcow2", false)
        .await
        .map_err(|e| generic(format!("Could not create temporary overlay '{path}': {e}")))?;
    let opts = QDict::new()
        .with("driver", "qcow2")
        .with(
            "file",
            QDict::new()
                .with("driver", "file")
                .with("filename", path.as_str()),
        )
        .with("backing", image.name())
        .with("read-only", read_only)
        .with("cache", QDict::new().with("no-flush", true));
    let overlay = graph.open_inline(&Args::new(opts)).await;
    let _ = std::fs::remove_file(&path);
    Ok(overlay?)
}

/// `cache=`: whether it bypasses the host's cache and whether it ignores flushes.
fn cache_flags(cache: Option<&str>) -> Result<(bool, bool), Error> {
    match cache {
        None | Some("writeback") | Some("writethrough") => Ok((false, false)),
        Some("none") | Some("directsync") => Ok((true, false)),
        Some("unsafe") => Ok((false, true)),
        Some(_) => Err(generic("invalid cache option")),
    }
}

/// A child given by `filename` without a driver is a file, as `-drive` infers it (QEMU
/// would look at a protocol prefix; ferrite has only the file protocol by name).
fn default_protocols(node: &mut QDict) {
    for key in ["file", "backing", "image", "raw", "test"] {
        if let Some(QObject::Dict(child)) = node.get_mut(key) {
            if child.get("driver").is_none() && child.get("filename").is_some() {
                child.insert("driver", "file");
            }
            default_protocols(child);
        }
    }
    if let Some(QObject::List(children)) = node.get_mut("children") {
        for c in children.iter_mut() {
            if let QObject::Dict(c) = c {
                default_protocols(c);
            }
        }
    }
}

/// Children of a node that takes several (quorum's `children.N`) given by their file
/// alone: their format is the image's, probed (QEMU probes such data children).
async fn probe_children(graph: &Graph, node: &mut QDict) -> Result<(), Error> {
    // Also below the node: a quorum under a raw node (`file.children.N...`).
    for key in ["file", "backing", "image", "raw", "test"] {
        if let Some(QObject::Dict(child)) = node.get_mut(key) {
            Box::pin(probe_children(graph, child)).await?;
        }
    }
    // blkverify's image under test is such a child too.
    if node.get("driver").and_then(QObject::as_str) == Some("blkverify")
        && let Some(QObject::Dict(test)) = node.get_mut("test")
    {
        probe_data_child(graph, test).await?;
    }
    let Some(QObject::List(children)) = node.get_mut("children") else {
        return Ok(());
    };
    for child in children.iter_mut() {
        if let QObject::Dict(child) = child {
            probe_data_child(graph, child).await?;
        }
    }
    Ok(())
}

/// A data child given without a driver: its format probed from its file, which is given
/// by name (`filename`, or `file.filename`) or by options (`file.driver=blkdebug,...`).
async fn probe_data_child(graph: &Graph, child: &mut QDict) -> Result<(), Error> {
    if child.get("driver").is_some() {
        return Ok(());
    }
    if let Some(path) = child.remove("filename") {
        child.insert("file", QDict::new().with("filename", path));
    }
    let Some(QObject::Dict(file)) = child.get_mut("file") else {
        return Ok(());
    };
    let format = match (
        file.get("driver"),
        file.get("filename").and_then(QObject::as_str),
    ) {
        (Some(_), _) => probe_described(graph, file).await?,
        (None, Some(path)) => graph.probe_image(path).await?,
        (None, None) => return Ok(()),
    };
    child.insert("driver", format);
    Ok(())
}

/// The format of what a protocol node described by its options shows (`file.driver=
/// blkdebug,file.image.filename=...`): the node opened, with its children's drivers filled
/// in as the drive's will be, then probed.
async fn probe_described(graph: &Graph, proto: &QDict) -> Result<&'static str, Error> {
    if let Some(e) = missing_named_child(proto) {
        return Err(e);
    }
    let mut proto = proto.clone();
    Box::pin(probe_children(graph, &mut proto)).await?;
    default_protocols(&mut proto);
    Ok(graph.probe_cli_options(&proto).await?)
}

/// The options of the node a drive's name opens where `file.driver` names a driver QEMU
/// opens as a protocol: what that driver reads from the name, under the `file.*` options
/// given. `None` where no such driver is given.
fn name_read_by_given_driver(
    graph: &Graph,
    opts: &QDict,
    path: &str,
) -> Result<Option<QDict>, Error> {
    let Some(QObject::Dict(given)) = opts.get("file") else {
        return Ok(None);
    };
    let Some(factory) = given
        .get("driver")
        .and_then(QObject::as_str)
        .and_then(|d| graph.registry().get(d))
        .filter(|f| f.opens_as_protocol())
    else {
        return Ok(None);
    };
    let mut proto = given.clone();
    fill_in(&mut proto, as_text(factory.read_name(path)?));
    Ok(Some(proto))
}

/// Counts of drives per interface, for default ids and indexes.
#[derive(Default)]
pub(crate) struct DriveCounter {
    used: std::collections::HashMap<String, u32>,
    /// The interfaces and indexes drives have taken.
    taken: Vec<(String, u32)>,
}

impl DriveCounter {
    fn next(&mut self, interface: &str) -> u32 {
        let n = self.used.entry(interface.to_owned()).or_insert(0);
        let v = *n;
        *n += 1;
        v
    }

    /// Whether a drive has taken `index` on `interface`.
    pub(crate) fn taken(&self, interface: &str, index: u32) -> bool {
        self.taken
            .iter()
            .any(|(i, n)| i == interface && *n == index)
    }

    /// Whether a drive has `interface`.
    pub(crate) fn any(&self, interface: &str) -> bool {
        self.taken.iter().any(|(i, _)| i == interface)
    }
}

/// Creates the drive `text` describes (and its device).
///
/// # Errors
/// QEMU's texts where they are known ("Duplicate ID 'x' for drive", "unsupported bus type
/// 'x'", "Unknown driver 'x'", the open failing).
/// `-drive` is QEMU's flat option syntax, where `KEY=VALUE` and `KEY.SUB=VALUE` come together
/// (`file=NAME` beside `file.locking=off`, `cache=none` beside `cache.writeback=off`); keyval
/// would take them for one key used two ways. Returns the text without the `KEY=` item when
/// both kinds are there, and its value.
fn take_flat(text: &str, key: &str) -> (String, Option<String>) {
    let mut items: Vec<String> = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                cur.push_str(",,");
            }
            ',' => items.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    items.push(cur);
    let nested = format!("{key}.");
    let flat = format!("{key}=");
    let has_nested = items.iter().any(|i| i.starts_with(&nested));
    let Some(at) = items.iter().position(|i| i.starts_with(&flat)) else {
        return (text.to_owned(), None);
    };
    if !has_nested {
        return (text.to_owned(), None);
    }
    let value = items.remove(at)[flat.len()..].replace(",,", ",");
    (items.join(","), Some(value))
}

/// A drive's `stats-intervals.N` (seconds), in order.
fn stats_intervals(value: Option<QObject>) -> Result<Vec<u32>, Error> {
    let items = match value {
        None => return Ok(Vec::new()),
        Some(QObject::List(items)) => items,
        Some(QObject::Dict(mut d)) => {
            let mut items = Vec::new();
            while let Some(v) = d.remove(&items.len().to_string()) {
                items.push(v);
            }
            if let Some((k, _)) = d.iter().next() {
                return Err(generic(format!("Invalid option stats-intervals.{k}")));
            }
            items
        }
        Some(_) => return Err(generic("The specification of stats-intervals is invalid")),
    };
    items
        .into_iter()
        .map(|v| match v {
            QObject::String(s) => s
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0 && s.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| generic(format!("Invalid interval length: {s}"))),
            QObject::Int(n) => u32::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| generic(format!("Invalid interval length: {n}"))),
            _ => Err(generic("The specification of stats-intervals is invalid")),
        })
        .collect()
}

/// What QEMU's `bdrv_open` says of options `opts` (for child `key`) that cannot open a node:
/// a protocol without its file name or server, a format or filter without its file; the
/// file is looked at first, as QEMU opens it first.
fn missing_child(opts: &QDict, key: &str) -> Option<Error> {
    let driver = opts.get("driver").and_then(QObject::as_str);
    let has_filename = opts
        .get("filename")
        .and_then(QObject::as_str)
        .is_some_and(|f| !f.is_empty());
    match driver {
        Some(d @ ("file" | "host_device" | "host_cdrom")) if !has_filename => Some(generic(
            format!("The '{d}' block driver requires a file name"),
        )),
        Some("nbd") if opts.get("server").is_none() && !has_filename => {
            Some(generic("NBD server address missing"))
        }
        // Protocols, and drivers whose children have other names.
        Some(
            "file" | "host_device" | "host_cdrom" | "nbd" | "null-co" | "null-aio" | "ssh" | "http"
            | "https" | "ftp" | "ftps" | "blkdebug" | "blkverify" | "quorum",
        ) => None,
        _ => match opts.get("file") {
            Some(QObject::Dict(child)) => missing_child(child, "file"),
            Some(_) => None,
            None if driver.is_none() && has_filename => None,
            None => Some(generic(format!(
                "A block device must be specified for \"{key}\""
            ))),
        },
    }
}

/// The children a driver that names its own (not `file`) opens first on `-drive`, where no
/// schema checks them before the driver (QEMU's `bdrv_open_child` texts, in the order the
/// driver opens them): blkverify's `raw` then `test`, blkdebug's `image`, and quorum's
/// count of `children`; in the node's file first.
fn missing_named_child(opts: &QDict) -> Option<Error> {
    // A format opens its file first.
    if let Some(QObject::Dict(file)) = opts.get("file")
        && let Some(e) = missing_named_child(file)
    {
        return Some(e);
    }
    let named: &[&str] = match opts.get("driver").and_then(QObject::as_str) {
        Some("blkverify") => &["raw", "test"],
        Some("blkdebug") => &["image"],
        Some("quorum") => {
            let none = match opts.get("children") {
                Some(QObject::List(l)) => l.is_empty(),
                Some(_) => false,
                None => true,
            };
            return none.then(|| generic("Number of provided children must be 1 or more"));
        }
        _ => &[],
    };
    named
        .iter()
        .find(|k| opts.get(k).is_none())
        .map(|k| generic(format!("A block device must be specified for \"{k}\"")))
}

/// QEMU's refusal of backing options for a node (or its file) whose driver has no backing
/// file, which it gives once the node is open.
fn backing_unsupported(opts: &QDict) -> Option<Error> {
    let with_backing = ["qcow2", "qcow", "qed", "vmdk"];
    let driver = opts.get("driver").and_then(QObject::as_str);
    if let Some(QObject::Dict(file)) = opts.get("file")
        && let Some(e) = backing_unsupported(file)
    {
        return Some(e);
    }
    (opts.get("backing").is_some() && driver.is_some_and(|d| !with_backing.contains(&d)))
        .then(|| generic("Driver doesn't support backing files"))
}

/// The file a protocol node's options name, for probing the format of what it holds.
fn image_path(proto: &QDict) -> Result<String, Error> {
    match proto.get("filename").and_then(QObject::as_str) {
        Some(path) => Ok(path.to_owned()),
        None => Err(generic("Must specify either driver or file")),
    }
}

pub(crate) async fn add(
    graph: &Rc<Graph>,
    devices: &Devices,
    counter: &mut DriveCounter,
    text: &str,
    snapshot_all: bool,
) -> Result<Drive, Error> {
    let (text, file_name) = take_flat(text, "file");
    let (text, flat_cache) = take_flat(&text, "cache");
    let parsed = ferrite_storage_daemon::front_end::keyval::parse(&text, None)?;
    let mut opts = parsed.value;
    crate::io_limits::rename_legacy_limits(&mut opts)?;
    // `readonly` is the old name of `read-only`, which QEMU renames after the limits.
    if let Some(v) = opts.remove("read-only") {
        if opts.get("readonly").is_some() {
            return Err(generic(
                "'read-only' and its alias 'readonly' can't be used at the same time",
            ));
        }
        opts.insert("readonly", v);
    }
    let file_is_name = file_name.is_some() || matches!(opts.get("file"), Some(QObject::String(_)));
    let cache_is_mode = matches!(opts.get("cache"), Some(QObject::String(_)));
    // `cache.writeback` is the drive's, not the node's.
    let writeback = match opts.get_mut("cache") {
        Some(QObject::Dict(c)) => {
            let v = c.remove("writeback");
            if c.is_empty() {
                opts.remove("cache");
            }
            v
        }
        _ => None,
    };
    let stats_intervals = stats_intervals(opts.remove("stats-intervals"))?;
    let mut take = |k: &str| take_text(&mut opts, k);
    let interface = take("if").unwrap_or_else(|| "ide".into());
    if !matches!(
        interface.as_str(),
        "none" | "ide" | "scsi" | "floppy" | "virtio" | "pflash" | "mtd" | "sd" | "xen"
    ) {
        return Err(generic(format!("unsupported bus type '{interface}'")));
    }
    let media_cd = match take("media").as_deref() {
        None | Some("disk") => false,
        Some("cdrom") => true,
        Some(m) => return Err(generic(format!("'{m}' invalid media"))),
    };
    let index = match take("index") {
        Some(i) => i
            .parse()
            .map_err(|_| generic("Parameter 'index' expects a number"))?,
        None => counter.next(&interface),
    };
    let units = devices.ide_units();
    let id = take("id").unwrap_or_else(|| default_id(&interface, index, media_cd, units));
    if graph.backends().iter().any(|b| b.name() == id) {
        return Err(generic(format!("Duplicate ID '{id}' for drive")));
    }
    counter.taken.push((interface.clone(), index));
    // `file` is the image's name, unless `file.*` options describe the protocol node.
    let file = if file_is_name {
        file_name.or_else(|| take("file")).filter(|f| !f.is_empty())
    } else {
        None
    };
    let format = match (take("format"), take("driver")) {
        (Some(_), Some(_)) => return Err(generic("Cannot specify both 'driver' and 'format'")),
        (format, driver) => format.or(driver),
    };
    if let Some(protocol) = file
        .as_deref()
        .and_then(ferrite_block::filename::unknown_protocol)
    {
        return Err(generic(format!("Unknown protocol '{protocol}'")));
    }
    // `cache=MODE`; `cache.*` alone stay for the node.
    let cache = match flat_cache {
        Some(c) => Some(c),
        None if cache_is_mode => take("cache"),
        None => None,
    };
    cache_flags(cache.as_deref())?;
    let writeback = match writeback {
        Some(QObject::String(v)) => on_off("cache.writeback", &v)?,
        Some(_) => return Err(generic("Parameter 'cache.writeback' expects 'on' or 'off'")),
        None => !matches!(cache.as_deref(), Some("writethrough" | "directsync")),
    };
    let aio = take("aio");
    if aio
        .as_deref()
        .is_some_and(|a| !matches!(a, "threads" | "native" | "io_uring"))
    {
        return Err(generic("invalid aio option"));
    }
    let read_only = take("readonly")
        .map(|v| on_off("readonly", &v))
        .transpose()?
        .unwrap_or(false)
        || media_cd;
    let snapshot = take("snapshot")
        .map(|v| on_off("snapshot", &v))
        .transpose()?
        .unwrap_or(snapshot_all);
    let account_invalid = take("stats-account-invalid")
        .map(|v| on_off("stats-account-invalid", &v))
        .transpose()?
        .unwrap_or(true);
    let account_failed = take("stats-account-failed")
        .map(|v| on_off("stats-account-failed", &v))
        .transpose()?
        .unwrap_or(true);
    let werror = take("werror");
    let rerror = take("rerror");
    // `serial` and `addr` are no drive options since QEMU 9: the format refuses them.
    for k in ["bus", "unit", "copy-on-read"] {
        take(k);
    }
    let throttling =
        crate::io_limits::config_from_drive(&mut opts, format.as_deref().unwrap_or("raw"))?;
    // The drive's own option, set on the node once it is open (QEMU sets
    // `bs->detect_zeroes` itself, so `unmap` needs no `discard=unmap` here).
    let detect_zeroes = match take_text(&mut opts, "detect-zeroes").as_deref() {
        None => None,
        Some(v @ ("off" | "on" | "unmap")) => Some(ferrite_block::DetectZeroes::parse(Some(v))),
        Some(v) => return Err(generic(format!("invalid parameter value: {v}"))),
    };
    error_action(werror.as_deref(), false)?;
    error_action(rerror.as_deref(), true)?;
    let blk = BlockBackend::new_empty(graph);
    blk.set_name(&id);
    blk.set_accounting(account_invalid, account_failed);
    for seconds in stats_intervals {
        blk.add_stats_interval(seconds);
    }
    blk.set_write_cache(writeback);
    blk.set_root_state(RootState {
        read_only,
        detect_zeroes: detect_zeroes.is_some_and(|d| d != ferrite_block::DetectZeroes::Off),
    });
    blk.set_on_error(
        OnError::parse(rerror.as_deref()),
        OnError::parse(werror.as_deref().or(Some("enospc"))),
    );
    // Without a file, the options may still describe a node (`driver=throttle,file.*`).
    let describes_node = file.is_some() || format.is_some() || !opts.is_empty();
    if describes_node {
        let probed = format.is_none();
        let format = match format {
            Some(f) => {
                if graph.registry().get(&f).is_none() {
                    return Err(generic(format!("Unknown driver '{f}'")));
                }
                f
            }
            None => match &file {
                // A driver given for the name's node that reads names itself opens it as it
                // reads it (`file.driver=file` takes `nbd://...` as a file's name).
                Some(path) => match name_read_by_given_driver(graph, &opts, path)? {
                    Some(proto) => probe_described(graph, &proto).await?.to_owned(),
                    None => graph.probe_image(path).await?.to_owned(),
                },
                None => match opts.get("file") {
                    // The image's file is opened first, then its format is probed.
                    Some(QObject::Dict(proto)) => {
                        if let Some(e) = missing_child(proto, "file") {
                            return Err(e);
                        }
                        match image_path(proto) {
                            Ok(path) => graph.probe_image(&path).await?.to_owned(),
                            Err(_) if proto.get("driver").is_some() => {
                                probe_described(graph, proto).await?.to_owned()
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    _ => return Err(generic("Must specify either driver or file")),
                },
            },
        };
        // The format node's options: what is left, with the protocol node under `file`.
        let mut node = opts;
        node.insert("driver", format.as_str());
        let mut proto = match node.remove("file") {
            Some(QObject::Dict(d)) => d,
            _ => QDict::new(),
        };
        let protocol = matches!(format.as_str(), "file" | "host_device" | "host_cdrom");
        // An `nfs:` name that is no NFS URL: QEMU's reason (the driver parses the name).
        if let Some(Err(why)) = file
            .as_deref()
            .filter(|p| p.starts_with("nfs:"))
            .map(ferrite_block::filename::nfs_url)
        {
            return Err(generic(why));
        }
        // So is a name of a protocol that reads names of its own (`nbd:`, `ssh:`).
        if let Some(path) = file.as_deref() {
            let by_prefix = ferrite_block::filename::protocol_options(path);
            if by_prefix.get("filename").is_some()
                && let Some(Some(Err(e))) = by_prefix
                    .get("driver")
                    .and_then(QObject::as_str)
                    .and_then(|d| graph.registry().get(d))
                    .map(|f| f.parse_filename(path))
            {
                return Err(e.into());
            }
        }
        // A name whose protocol is the driver itself (`driver=blkdebug`,
        // `file=blkdebug::IMAGE`) describes that node, not its file; so does any name given
        // to a protocol that reads names of its own (`file=off,format=nbd`).
        let reads_names = graph
            .registry()
            .get(&format)
            .filter(|f| !protocol && f.opens_as_protocol());
        let named = match file.as_deref() {
            Some(p) => {
                let by_prefix = ferrite_block::filename::protocol_options(p);
                let prefix_names_format =
                    by_prefix.get("driver").and_then(QObject::as_str) == Some(format.as_str());
                match reads_names.and_then(|f| f.options_of_name(p)) {
                    Some(options) => Some(as_text(options?)),
                    None if prefix_names_format => Some(as_text(by_prefix)),
                    None => None,
                }
            }
            None => None,
        };
        match &file {
            Some(_) if named.is_some() && !protocol => {
                for (k, v) in named.unwrap_or_default() {
                    if node.get(&k).is_none() {
                        node.insert(k, v);
                    }
                }
            }
            Some(path) if protocol => {
                node.insert("filename", path.as_str());
            }
            Some(path) => {
                let proto_driver = proto
                    .get("driver")
                    .and_then(QObject::as_str)
                    .and_then(|d| graph.registry().get(d));
                // A driver given for the name's node that QEMU opens as a protocol
                // (`file.driver=blkdebug`, `file.driver=null-co`) reads the name itself;
                // otherwise the name's prefix says what it is (`blkdebug:CONFIG:IMAGE` a
                // blkdebug node over the image's file).
                let reads_name = proto_driver.as_ref().filter(|f| f.opens_as_protocol());
                let mut file = as_text(match reads_name {
                    Some(f) => f.read_name(path)?,
                    None => ferrite_block::filename::protocol_options(path),
                });
                if let Some(a) = &aio {
                    // `aio` is a POSIX file's option; other protocols have no such choice.
                    let posix = |d: &QDict| {
                        matches!(
                            d.get("driver").and_then(QObject::as_str),
                            Some("file" | "host_device" | "host_cdrom")
                        )
                    };
                    let top_posix = posix(&file);
                    match file.get_mut("image") {
                        Some(QObject::Dict(image)) if posix(image) => {
                            image.insert("aio", a.as_str())
                        }
                        Some(_) => {}
                        None if top_posix => file.insert("aio", a.as_str()),
                        None => {}
                    }
                }
                if proto.is_empty() {
                    proto = file;
                } else if reads_name.is_none()
                    && proto_driver.is_some_and(|f| f.kind() != ferrite_block::DriverKind::Protocol)
                {
                    // `file.driver=FORMAT`: the name is that format's own file.
                    proto.insert("file", file);
                } else {
                    // `file.*` options on top of what the name says.
                    fill_in(&mut proto, file);
                }
                node.insert("file", proto);
            }
            None if !proto.is_empty() => {
                node.insert("file", proto);
            }
            None => {}
        }
        if protocol && let Some(a) = &aio {
            node.insert("aio", a.as_str());
        }
        if read_only {
            node.insert("read-only", "on");
        }
        // A drive falls back to reading an image it may not write (QEMU's -drive default).
        if node.get("auto-read-only").is_none() {
            node.insert("auto-read-only", "on");
        }
        let (direct, no_flush) = cache_flags(cache.as_deref())?;
        if direct || no_flush {
            // `cache=` gives the defaults; `cache.direct`, `cache.no-flush` win.
            let mut given = match node.remove("cache") {
                Some(QObject::Dict(c)) => c,
                _ => QDict::new(),
            };
            for (key, on) in [("direct", direct), ("no-flush", no_flush)] {
                if given.get(key).is_none() {
                    given.insert(key, if on { "on" } else { "off" });
                }
            }
            node.insert("cache", given);
        }
        if file.is_none()
            && let Some(e) = missing_child(&node, "file")
        {
            return Err(e);
        }
        probe_children(graph, &mut node).await?;
        default_protocols(&mut node);
        if let Some(e) = backing_unsupported(&node) {
            return Err(e);
        }
        // Options for the backing file the image names come without a driver, which the
        // schema wants: they go to the format as they are.
        let implicit_backing = match node.get("backing") {
            Some(QObject::Dict(b)) if b.get("driver").is_none() => node.remove("backing"),
            _ => None,
        };
        if snapshot {
            // The image is only read: writes go to the temporary overlay.
            node.insert("read-only", "on");
        }
        if let Some(e) = missing_named_child(&node) {
            return Err(e);
        }
        let mut checked = graph.check_drive_options(&node)?;
        if let Some(b) = implicit_backing {
            checked.insert("backing", b);
        }
        let n = graph.open_inline(&Args::new(checked)).await?;
        if probed {
            graph.opened_probed(&n);
        }
        if let Some(d) = detect_zeroes {
            n.set_detect_zeroes(d);
        }
        n.keep_cli_text(&node);
        // QEMU turns `aio` into an open flag, not an option a reopen must give again.
        if aio.is_some() {
            n.mark_flag_option("aio");
        }
        let n = if snapshot {
            match temporary_overlay(graph, &n, read_only).await {
                Ok(top) => top,
                Err(e) => {
                    graph.release_inline(&n);
                    return Err(e);
                }
            }
        } else {
            n
        };
        // A drive's backend reads the image as one until a device says what it needs
        // (QEMU's `blk_new_open`, given read-only as an option, not as a flag: it takes no
        // write), so no overlay goes under it unseen.
        if let Err(e) = blk.insert(&n, Perm::CONSISTENT_READ, Perm::all()) {
            graph.release_inline(&n);
            return Err(e.into());
        }
    }
    if let Some((config, group)) = throttling
        && let Err(e) = crate::io_limits::apply(
            graph,
            &blk,
            &config,
            group.as_deref(),
            &id,
            // QEMU makes a command line's drives before its accelerator: their groups
            // keep the host's clock under qtest (iotest mirror-change-copy-mode relies on
            // it), as `-object throttle-group` ones do.
            Clock::Host,
        )
    {
        blk.remove();
        blk.set_name("");
        return Err(e);
    }
    if interface != "none" {
        devices.note_auto_connected(&id);
    }
    let device = match interface.as_str() {
        "virtio" => Some("virtio-blk-pci"),
        "ide" if media_cd => Some("ide-cd"),
        "ide" if index / units < devices.ide_buses() => Some("ide-hd"),
        // The floppy controller has two drives (and no bus numbers: QEMU counts its
        // units on); the `none` machine has none.
        "floppy" if index < devices.floppy_units() => Some("floppy"),
        "none" => None,
        "xen" => {
            blk.remove();
            return Err(generic("No 'xen-bus' bus found for device 'xen-disk'"));
        }
        "pflash" if index < devices.flash_slots() => {
            // The board's firmware flash reads and writes the drive itself, sharing it with
            // anyone; it has no tray and keeps no I/O status.
            if let Some(node) = blk.node() {
                let mut perm = Perm::CONSISTENT_READ;
                if !node.is_read_only() {
                    perm |= Perm::WRITE;
                }
                if let Err(e) = blk.set_perm(perm, Perm::all()) {
                    blk.remove();
                    blk.set_name("");
                    return Err(crate::devices::block_error(e));
                }
            }
            blk.set_device(Some(&format!("/machine/system.flash{index}")));
            None
        }
        other => {
            // The boards have no SCSI controller, SD card or MTD of their own, nor IDE
            // buses past their last: the drive is an orphan, which QEMU reports once the
            // machine is made.
            let units = match other {
                "scsi" => 7,
                "ide" => units,
                "floppy" => u32::MAX,
                _ => 1,
            };
            return Ok(Drive {
                blk,
                device: None,
                orphan: Some(format!(
                    "machine type does not support if={other},bus={},unit={}",
                    index / units,
                    index % units
                )),
            });
        }
    };
    let device = device.map(|model| {
        let mut props = QDict::new()
            .with("driver", model)
            .with("drive", id.as_str());
        if interface == "ide" {
            // QEMU's -drive if=ide: the units of each bus in turn, by index.
            props.insert("bus", format!("ide.{}", index / units));
            props.insert("unit", (index % units).to_string());
        }
        if interface == "floppy" {
            props.insert("unit", index.to_string());
        }
        let made_by = match interface.as_str() {
            "ide" => MadeBy::BoardIde,
            "floppy" => MadeBy::BoardFloppy,
            _ => MadeBy::Device,
        };
        DriveDevice {
            props,
            made_by,
            index,
        }
    });
    Ok(Drive {
        blk,
        device,
        orphan: None,
    })
}
