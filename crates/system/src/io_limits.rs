//! A drive's own I/O limits (QEMU's legacy throttling): `block_set_io_throttle` and the
//! `-drive throttling.*` options put a drive's reads and writes through a throttle group,
//! by default one of its own named after the drive, that `query-block` reports.

use ferrite_block::clock::Clock;
use ferrite_block::{BlockBackend, Graph};
use ferrite_qapi::{Args, Error};
use ferrite_qom::ThrottleConfig;
use ferrite_storage_daemon::front_end::throttle_limits;

/// `block_set_io_throttle`'s argument names and the limits they set.
const QMP_NAMES: [(&str, &str); 19] = [
    ("bps", "bps-total"),
    ("bps_rd", "bps-read"),
    ("bps_wr", "bps-write"),
    ("iops", "iops-total"),
    ("iops_rd", "iops-read"),
    ("iops_wr", "iops-write"),
    ("bps_max", "bps-total-max"),
    ("bps_rd_max", "bps-read-max"),
    ("bps_wr_max", "bps-write-max"),
    ("iops_max", "iops-total-max"),
    ("iops_rd_max", "iops-read-max"),
    ("iops_wr_max", "iops-write-max"),
    ("bps_max_length", "bps-total-max-length"),
    ("bps_rd_max_length", "bps-read-max-length"),
    ("bps_wr_max_length", "bps-write-max-length"),
    ("iops_max_length", "iops-total-max-length"),
    ("iops_rd_max_length", "iops-read-max-length"),
    ("iops_wr_max_length", "iops-write-max-length"),
    ("iops_size", "iops-size"),
];

/// The limits `block_set_io_throttle` asks for.
fn config_from_qmp(args: &Args) -> ThrottleConfig {
    let mut config = ThrottleConfig::default();
    for (arg, limit) in QMP_NAMES {
        if let Some(v) = args.opt_i64(arg) {
            config.set_value(limit, v);
        }
    }
    config
}

/// Whether any average rate is set: all zero turns throttling off.
fn enabled(config: &ThrottleConfig) -> bool {
    ["bps", "iops"].iter().any(|kind| {
        ["total", "read", "write"]
            .iter()
            .any(|dir| config.bucket(kind, dir).avg != 0)
    })
}

/// Gives `blk` the limits `config` (checked first): a drive not yet throttled joins
/// `group`, or `default_group` when none is named; a throttled one moves to `group` when
/// one is named; limits of all zero take the drive out of its group. A group made here leaks
/// on `clock`.
///
/// # Errors
/// QEMU's texts for limits that do not make sense.
pub(crate) fn apply(
    graph: &Graph,
    blk: &BlockBackend,
    config: &ThrottleConfig,
    group: Option<&str>,
    default_group: &str,
    clock: Clock,
) -> Result<(), Error> {
    config
        .validate()
        .map_err(|e| Error::generic(e.to_string()))?;
    if !enabled(config) {
        blk.set_throttle(None);
        return Ok(());
    }
    let current = blk.throttle_group();
    let join = match (&current, group) {
        (None, _) => Some(group.unwrap_or(default_group)),
        (Some(g), Some(name)) if g.name() != name => Some(name),
        _ => None,
    };
    if let Some(name) = join {
        blk.set_throttle(Some(graph.throttle_groups().join_or_create(name, clock)));
    }
    if let Some(g) = blk.throttle_group() {
        g.set_limits(throttle_limits(config));
    }
    Ok(())
}

/// `block_set_io_throttle` on the drive `blk` that `device` or `id` named.
///
/// # Errors
/// "Device has no medium"; QEMU's texts for limits that do not make sense.
pub(crate) fn qmp_block_set_io_throttle(
    graph: &Graph,
    blk: &BlockBackend,
    args: &Args,
) -> Result<(), Error> {
    if blk.node().is_none() {
        return Err(Error::generic("Device has no medium"));
    }
    let default_group = args
        .opt_str("device")
        .or(args.opt_str("id"))
        .unwrap_or_default();
    apply(
        graph,
        blk,
        &config_from_qmp(args),
        args.opt_str("group"),
        default_group,
        // Made now, on the clock the program runs on (the virtual one under qtest).
        Clock::current(),
    )
}

/// `-drive`'s old names of the I/O limits (`iops_wr=...`) become their `throttling.*`
/// names, as QEMU renames them before anything else; giving both is refused.
///
/// # Errors
/// QEMU's text for an option given under both names.
pub(crate) fn rename_legacy_limits(opts: &mut ferrite_qobject::QDict) -> Result<(), Error> {
    const RENAMES: [(&str, &str); 14] = [
        ("iops", "iops-total"),
        ("iops_rd", "iops-read"),
        ("iops_wr", "iops-write"),
        ("bps", "bps-total"),
        ("bps_rd", "bps-read"),
        ("bps_wr", "bps-write"),
        ("iops_max", "iops-total-max"),
        ("iops_rd_max", "iops-read-max"),
        ("iops_wr_max", "iops-write-max"),
        ("bps_max", "bps-total-max"),
        ("bps_rd_max", "bps-read-max"),
        ("bps_wr_max", "bps-write-max"),
        ("iops_size", "iops-size"),
        ("group", "group"),
    ];
    for (from, to) in RENAMES {
        let Some(value) = opts.remove(from) else {
            continue;
        };
        if !matches!(
            opts.get("throttling"),
            Some(ferrite_qobject::QObject::Dict(_))
        ) {
            opts.insert("throttling", ferrite_qobject::QDict::new());
        }
        if let Some(ferrite_qobject::QObject::Dict(t)) = opts.get_mut("throttling") {
            if t.get(to).is_some() {
                return Err(Error::generic(format!(
                    "'throttling.{to}' and its alias '{from}' can't be used at the same time"
                )));
            }
            t.insert(to, value);
        }
    }
    Ok(())
}

/// The limits of `-drive throttling.NAME=VALUE` options (taken out of `opts`) and the
/// group they name.
///
/// # Errors
/// A value that is not a number; an unknown name, in QEMU's words for an option the
/// drive's `format` does not take.
pub(crate) fn config_from_drive(
    opts: &mut ferrite_qobject::QDict,
    format: &str,
) -> Result<Option<(ThrottleConfig, Option<String>)>, Error> {
    let Some(ferrite_qobject::QObject::Dict(throttling)) = opts.remove("throttling") else {
        return Ok(None);
    };
    let mut config = ThrottleConfig::default();
    let mut group = None;
    for (k, v) in throttling.iter() {
        let text = match v {
            ferrite_qobject::QObject::String(s) => s.clone(),
            other => ferrite_qobject::to_json(other),
        };
        if k == "group" {
            group = Some(text);
            continue;
        }
        if !config.set_value(k, 0) {
            return Err(Error::generic(format!(
                "Block format '{format}' does not support the option 'throttling.{k}'"
            )));
        }
        let n: i64 = text
            .parse()
            .map_err(|_| Error::generic(format!("Parameter 'throttling.{k}' expects a number")))?;
        config.set_value(k, n);
    }
    Ok(Some((config, group)))
}
