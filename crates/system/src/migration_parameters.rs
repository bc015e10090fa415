//! The migration parameters (QEMU: `migration/options.c`, `migration-hmp-cmds.c`): their
//! defaults, `migrate-set-parameters` (every check made on the parameters as they would
//! be, in QEMU's order, before any changes), `query-migrate-parameters`, and the human
//! monitor's `migrate_set_parameter` and `info migrate_parameters`.
//!
//! ferrite's machine state is small: of the values, `max-bandwidth` and `downtime-limit`
//! shape a migration (how fast the state goes, whether dirty bitmaps wait for postcopy)
//! and `block-bitmap-mapping` names the bitmaps; the others are kept and reported as QEMU
//! keeps them.

use crate::bitmap_migration::Mapping;
use ferrite_qapi::visit::{SIZE_HINT, parse_c_integer, parse_size};
use ferrite_qobject::{QDict, QObject};

/// How a parameter's value is typed in QMP, and read from the human monitor's text.
#[derive(Clone, Copy)]
enum Kind {
    /// An unsigned integer of this many bits (`uint8`, `uint32`): a C integer in HMP.
    UInt(u32),
    /// `size` or `uint64`: a size in HMP (bytes unless a suffix says otherwise).
    Size,
    /// A rate in bytes a second: a size in MiB unless a suffix says otherwise in HMP.
    Rate,
    Bool,
    Str,
    Enum(&'static [&'static str]),
}

/// A parameter's default.
#[derive(Clone, Copy)]
enum Initial {
    U(u64),
    B(bool),
    S(&'static str),
}

/// QAPI `MigrationParameter` but `block-bitmap-mapping` (kept apart: it is a list), in its
/// order, with the defaults of QEMU 10.0.
const PARAMETERS: &[(&str, Kind, Initial)] = &[
    ("announce-initial", Kind::Size, Initial::U(50)),
    ("announce-max", Kind::Size, Initial::U(550)),
    ("announce-rounds", Kind::Size, Initial::U(5)),
    ("announce-step", Kind::Size, Initial::U(100)),
    ("throttle-trigger-threshold", Kind::UInt(8), Initial::U(50)),
    ("cpu-throttle-initial", Kind::UInt(8), Initial::U(20)),
    ("cpu-throttle-increment", Kind::UInt(8), Initial::U(10)),
    ("cpu-throttle-tailslow", Kind::Bool, Initial::B(false)),
    ("tls-creds", Kind::Str, Initial::S("")),
    ("tls-hostname", Kind::Str, Initial::S("")),
    ("tls-authz", Kind::Str, Initial::S("")),
    ("max-bandwidth", Kind::Rate, Initial::U(128 << 20)),
    ("avail-switchover-bandwidth", Kind::Rate, Initial::U(0)),
    ("downtime-limit", Kind::Size, Initial::U(300)),
    ("x-checkpoint-delay", Kind::UInt(32), Initial::U(20000)),
    ("multifd-channels", Kind::UInt(8), Initial::U(2)),
    ("xbzrle-cache-size", Kind::Size, Initial::U(64 << 20)),
    ("max-postcopy-bandwidth", Kind::Size, Initial::U(0)),
    ("max-cpu-throttle", Kind::UInt(8), Initial::U(99)),
    (
        "multifd-compression",
        Kind::Enum(&["none", "zlib", "zstd"]),
        Initial::S("none"),
    ),
    ("multifd-zlib-level", Kind::UInt(8), Initial::U(1)),
    ("multifd-qatzip-level", Kind::UInt(8), Initial::U(1)),
    ("multifd-zstd-level", Kind::UInt(8), Initial::U(1)),
    ("x-vcpu-dirty-limit-period", Kind::Size, Initial::U(1000)),
    ("vcpu-dirty-limit", Kind::Size, Initial::U(1)),
    (
        "mode",
        Kind::Enum(&["normal", "cpr-reboot", "cpr-transfer"]),
        Initial::S("normal"),
    ),
    (
        "zero-page-detection",
        Kind::Enum(&["none", "legacy", "multifd"]),
        Initial::S("multifd"),
    ),
    ("direct-io", Kind::Bool, Initial::B(false)),
];

/// `info migrate_parameters`: each line's parameter and unit, in QEMU's order;
/// `block-bitmap-mapping` (when set) goes after `tls-authz`.
const INFO: &[(&str, &str)] = &[
    ("announce-initial", " ms"),
    ("announce-max", " ms"),
    ("announce-rounds", ""),
    ("announce-step", " ms"),
    ("throttle-trigger-threshold", ""),
    ("cpu-throttle-initial", ""),
    ("cpu-throttle-increment", ""),
    ("cpu-throttle-tailslow", ""),
    ("max-cpu-throttle", ""),
    ("tls-creds", ""),
    ("tls-hostname", ""),
    ("max-bandwidth", " bytes/second"),
    ("avail-switchover-bandwidth", " bytes/second"),
    ("downtime-limit", " ms"),
    ("x-checkpoint-delay", " ms"),
    ("multifd-channels", ""),
    ("multifd-compression", ""),
    ("zero-page-detection", ""),
    ("xbzrle-cache-size", " bytes"),
    ("max-postcopy-bandwidth", ""),
    ("tls-authz", ""),
    ("x-vcpu-dirty-limit-period", " ms"),
    ("vcpu-dirty-limit", " MB/s"),
    ("mode", ""),
    ("direct-io", ""),
];

/// QEMU's largest `downtime-limit`: 2000 seconds, in milliseconds.
const MAX_DOWNTIME_MS: u64 = 2000 * 1000;

/// The machine's migration parameters.
pub(crate) struct Parameters {
    values: QDict,
    mapping: Option<Mapping>,
}

impl Default for Parameters {
    fn default() -> Self {
        let mut values = QDict::new();
        for &(name, _, initial) in PARAMETERS {
            match initial {
                Initial::U(v) => values.insert(name, v),
                Initial::B(v) => values.insert(name, v),
                Initial::S(v) => values.insert(name, v),
            }
        }
        Parameters {
            values,
            mapping: None,
        }
    }
}

impl Parameters {
    /// An unsigned parameter's value.
    pub(crate) fn uint(&self, name: &str) -> u64 {
        uint(&self.values, name)
    }

    /// The `block-bitmap-mapping` parameter, if set.
    pub(crate) fn mapping(&self) -> Option<&Mapping> {
        self.mapping.as_ref()
    }

    /// `migrate-set-parameters` with `args` (checked against the schema); `has` says which
    /// migration capabilities are on.
    ///
    /// # Errors
    /// QEMU's text for the first value it would refuse; then nothing changes.
    pub(crate) fn set(&mut self, args: &QDict, has: impl Fn(&str) -> bool) -> Result<(), String> {
        let mut new = self.values.clone();
        for &(name, ..) in PARAMETERS {
            match args.get(name) {
                // The TLS names take null for "".
                Some(QObject::Null) => new.insert(name, ""),
                Some(v) => new.insert(name, v.clone()),
                None => {}
            }
        }
        let mapping = self.check(&new, args.get("block-bitmap-mapping"), has)?;
        self.values = new;
        if mapping.is_some() {
            self.mapping = mapping;
        }
        Ok(())
    }

    /// QEMU's checks of the parameters `new` would make, in its order (some look at the
    /// parameters as they are): a new mapping, parsed, if one is given.
    fn check(
        &self,
        new: &QDict,
        mapping: Option<&QObject>,
        has: impl Fn(&str) -> bool,
    ) -> Result<Option<Mapping>, String> {
        let u = |name: &str| uint(new, name);
        // QEMU's texts name most parameters with underscores.
        let expects = |param: &str, what: &str| {
            format!("Parameter '{}' expects {what}", param.replace('-', "_"))
        };
        let within = |param: &str, bounds: std::ops::RangeInclusive<u64>, what: &str| {
            if bounds.contains(&u(param)) {
                Ok(())
            } else {
                Err(expects(param, what))
            }
        };
        let integer = "an integer in the range of";
        within(
            "throttle-trigger-threshold",
            1..=100,
            &format!("{integer} 1 to 100"),
        )?;
        within(
            "cpu-throttle-initial",
            1..=99,
            &format!("{integer} 1 to 99"),
        )?;
        within(
            "cpu-throttle-increment",
            1..=99,
            &format!("{integer} 1 to 99"),
        )?;
        let most_downtime = format!("{integer} 0 to (2000 * 1000) ms");
        within("downtime-limit", 0..=MAX_DOWNTIME_MS, &most_downtime)?;
        within(
            "multifd-channels",
            1..=u64::MAX,
            "a value between 1 and 255",
        )?;
        within("multifd-zlib-level", 0..=9, "a value between 0 and 9")?;
        within("multifd-qatzip-level", 1..=9, "a value between 1 and 9")?;
        within("multifd-zstd-level", 0..=20, "a value between 0 and 20")?;
        let cache = u("xbzrle-cache-size");
        if cache < 4096 || !cache.is_power_of_two() {
            let what = "a power of two no less than the target page size";
            return Err(expects("xbzrle-cache-size", what));
        }
        let initial = u("cpu-throttle-initial");
        let what = format!("{integer} cpu_throttle_initial to 99");
        within("max-cpu-throttle", initial..=99, &what)?;
        within(
            "announce-initial",
            0..=100_000,
            "a value between 0 and 100000",
        )?;
        within("announce-max", 0..=100_000, "a value between 0 and 100000")?;
        within("announce-rounds", 0..=1000, "a value between 0 and 1000")?;
        within("announce-step", 1..=10_000, "a value between 0 and 10000")?;
        let mapping = mapping.map(Mapping::parse).transpose()?;
        let compressed_or_tls = |p: &QDict| {
            text(p, "multifd-compression") != "none" || !text(p, "tls-creds").is_empty()
        };
        if has("zero-copy-send") && compressed_or_tls(new) {
            return Err(
                "Zero copy only available for non-compressed non-TLS multifd migration".into(),
            );
        }
        // QEMU looks at the parameters as they are here.
        if has("mapped-ram") && compressed_or_tls(&self.values) {
            return Err(
                "Mapped-ram only available for non-compressed non-TLS multifd migration".into(),
            );
        }
        if !(1..=1000).contains(&u("x-vcpu-dirty-limit-period")) {
            // This one QEMU names as the schema does.
            let what = "a value between 1 and 1000";
            return Err(format!(
                "Parameter 'x-vcpu-dirty-limit-period' expects {what}"
            ));
        }
        if u("vcpu-dirty-limit") < 1 {
            return Err("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s".into());
        }
        Ok(mapping)
    }

    /// `query-migrate-parameters`.
    pub(crate) fn query(&self) -> QObject {
        let mut d = self.values.clone();
        if let Some(m) = &self.mapping {
            d.insert("block-bitmap-mapping", m.to_qobject());
        }
        d.into()
    }

    /// HMP `info migrate_parameters`.
    pub(crate) fn info(&self) -> String {
        let mut s = String::new();
        for &(name, unit) in INFO {
            let value = match self.values.get(name) {
                Some(QObject::Bool(b)) => (if *b { "on" } else { "off" }).to_owned(),
                Some(v) => match (kind(name), v.as_str()) {
                    (Some(Kind::Str), Some(t)) => format!("'{t}'"),
                    (_, Some(t)) => t.to_owned(),
                    _ => v.as_u64().unwrap_or_default().to_string(),
                },
                None => String::new(),
            };
            s += &format!("{name}: {value}{unit}\r\n");
            if name == "tls-authz" {
                s += &self.mapping.as_ref().map(Mapping::hmp).unwrap_or_default();
            }
        }
        s
    }
}

/// The argument of `migrate-set-parameters` that HMP's `migrate_set_parameter PARAM VALUE`
/// stands for, read as QEMU reads each parameter's text.
///
/// # Errors
/// What the monitor prints for a parameter or value it cannot read.
pub(crate) fn hmp_argument(param: &str, value: &str) -> Result<QDict, String> {
    let refused = |e: String| {
        let line = if e.ends_with('\n') { e } else { e + "\n" };
        Err(format!("Error: {line}").replace('\n', "\r\n"))
    };
    if param == "block-bitmap-mapping" {
        return refused("The block-bitmap-mapping parameter can only be set through QMP".into());
    }
    let Some(k) = kind(param) else {
        return refused(format!("invalid parameter value: {param}"));
    };
    let invalid_size = || refused(format!("Invalid size {value}"));
    let v: QObject = match k {
        Kind::UInt(bits) => {
            let Some((neg, n)) = parse_c_integer(value) else {
                return refused(format!("Parameter '{param}' expects uint64"));
            };
            // Negative numbers wrap, as strtoull has them.
            let n = if neg { n.wrapping_neg() } else { n };
            if n >> bits != 0 {
                return refused(format!("Parameter '{param}' expects uint{bits}_t"));
            }
            n.into()
        }
        Kind::Size => match parse_size(value) {
            None => return refused(format!("Parameter '{param}' expects {SIZE_HINT}")),
            Some(n) if param == "xbzrle-cache-size" && n > i64::MAX as u64 => {
                return invalid_size();
            }
            Some(n) => n.into(),
        },
        Kind::Rate => {
            // A bare number is in MiB.
            let bare = value.ends_with(|c: char| c.is_ascii_digit() || c == '.');
            let n = if bare {
                parse_size(&format!("{value}M"))
            } else {
                parse_size(value)
            };
            match n {
                Some(n) if n <= i64::MAX as u64 => n.into(),
                _ => return invalid_size(),
            }
        }
        Kind::Bool => match value {
            "on" | "yes" | "true" | "y" => true.into(),
            "off" | "no" | "false" | "n" => false.into(),
            _ => return refused(format!("Parameter '{param}' expects 'on' or 'off'")),
        },
        Kind::Str => value.into(),
        Kind::Enum(members) => {
            if !members.contains(&value) {
                return refused(format!(
                    "Parameter '{param}' does not accept value '{value}'"
                ));
            }
            value.into()
        }
    };
    Ok(QDict::new().with(param, v))
}

fn kind(name: &str) -> Option<Kind> {
    PARAMETERS.iter().find(|p| p.0 == name).map(|p| p.1)
}

fn uint(d: &QDict, name: &str) -> u64 {
    d.get(name).and_then(QObject::as_u64).unwrap_or(0)
}

fn text<'a>(d: &'a QDict, name: &str) -> &'a str {
    d.get(name).and_then(QObject::as_str).unwrap_or("")
}
