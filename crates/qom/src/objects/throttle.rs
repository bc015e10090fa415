//! `throttle-group`: I/O limits shared by the throttle filter nodes that name the group.

use super::{UserObject, check_prop, frozen};
use crate::error::{Error, Result};
use crate::node::PropInfo;
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::any::Any;
use std::cell::RefCell;

/// Declares the limit names once: `LIMITS` in `ThrottleLimits` order, and the QOM properties,
/// which are `limits` plus an unstable flat `x-<name>` for each.
macro_rules! limits {
    ($($name:literal),* $(,)?) => {
        const LIMITS: &[&str] = &[$($name),*];

        /// QOM properties of a throttle group.
        pub(crate) const PROPS: &[PropInfo] = &[
            PropInfo { name: "limits", ty: "ThrottleLimits", description: None },
            $(PropInfo { name: concat!("x-", $name), ty: "int", description: None }),*
        ];
    };
}

limits!(
    "iops-total",
    "iops-total-max",
    "iops-total-max-length",
    "iops-read",
    "iops-read-max",
    "iops-read-max-length",
    "iops-write",
    "iops-write-max",
    "iops-write-max-length",
    "bps-total",
    "bps-total-max",
    "bps-total-max-length",
    "bps-read",
    "bps-read-max",
    "bps-read-max-length",
    "bps-write",
    "bps-write-max",
    "bps-write-max-length",
    "iops-size",
);

/// Largest rate QEMU accepts.
const THROTTLE_VALUE_MAX: i64 = 1_000_000_000_000_000;

/// A leaky bucket's settings: average rate, burst rate and burst length in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Average rate (0: unlimited).
    pub avg: i64,
    /// Burst rate (0: none).
    pub max: i64,
    /// Burst length in seconds.
    pub burst_length: i64,
}

/// A throttle group's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleConfig {
    values: [i64; LIMITS.len()],
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let mut values = [0; LIMITS.len()];
        for (i, name) in LIMITS.iter().enumerate() {
            if name.ends_with("-max-length") {
                values[i] = 1;
            }
        }
        ThrottleConfig { values }
    }
}

impl ThrottleConfig {
    fn index(name: &str) -> Option<usize> {
        LIMITS.iter().position(|n| *n == name)
    }

    fn get(&self, name: &str) -> i64 {
        Self::index(name).map_or(0, |i| self.values[i])
    }

    /// The bucket for a kind (`bps`, `iops`) and direction (`total`, `read`, `write`).
    pub fn bucket(&self, kind: &str, dir: &str) -> Bucket {
        Bucket {
            avg: self.get(&format!("{kind}-{dir}")),
            max: self.get(&format!("{kind}-{dir}-max")),
            burst_length: self.get(&format!("{kind}-{dir}-max-length")),
        }
    }

    /// Sets limit `name` (`bps-total`, `iops-read-max`...); false for a name there is not.
    pub fn set_value(&mut self, name: &str, value: i64) -> bool {
        match Self::index(name) {
            Some(i) => {
                self.values[i] = value;
                true
            }
            None => false,
        }
    }

    /// Bytes per I/O operation for iops accounting (0: every request counts once).
    pub fn iops_size(&self) -> i64 {
        self.get("iops-size")
    }

    fn to_qobject(&self) -> QObject {
        let mut d = QDict::new();
        for (name, v) in LIMITS.iter().zip(self.values) {
            d.insert(*name, v);
        }
        d.into()
    }

    /// QEMU's validity rules, in its order.
    ///
    /// # Errors
    /// QEMU's text for the first rule broken.
    pub fn validate(&self) -> Result<()> {
        // Totals beside per-direction limits, averages and bursts each on their own.
        for field in ["", "-max"] {
            for kind in ["bps", "iops"] {
                let set = |dir: &str| self.get(&format!("{kind}-{dir}{field}")) != 0;
                if set("total") && (set("read") || set("write")) {
                    return Err(Error::ThrottleTotalAndRw);
                }
            }
        }
        if self.iops_size() != 0
            && ["total", "read", "write"]
                .iter()
                .all(|dir| self.bucket("iops", dir).avg == 0)
        {
            return Err(Error::IopsSizeWithoutIops);
        }
        for kind in ["bps", "iops"] {
            for dir in ["total", "read", "write"] {
                let b = self.bucket(kind, dir);
                if !(0..=THROTTLE_VALUE_MAX).contains(&b.avg)
                    || !(0..=THROTTLE_VALUE_MAX).contains(&b.max)
                {
                    return Err(Error::ThrottleRange(THROTTLE_VALUE_MAX));
                }
                // QEMU keeps the length unsigned: `limits` may give a negative one, which
                // is then a huge length.
                let burst_length = b.burst_length as u64;
                if burst_length == 0 {
                    return Err(Error::BurstLengthZero);
                }
                if burst_length > 1 && b.max == 0 {
                    return Err(Error::BurstLengthWithoutRate);
                }
                if b.max != 0 && burst_length > (THROTTLE_VALUE_MAX / b.max) as u64 {
                    return Err(Error::BurstLengthTooHigh);
                }
                if b.max != 0 && b.avg == 0 {
                    return Err(Error::MaxWithoutRate);
                }
                if b.max != 0 && b.max < b.avg {
                    return Err(Error::MaxBelowRate);
                }
            }
        }
        if self.iops_size() < 0 {
            return Err(Error::ThrottleRange(THROTTLE_VALUE_MAX));
        }
        Ok(())
    }

    fn apply(&mut self, limits: &QDict) {
        for (name, v) in limits.iter() {
            if let (Some(i), Some(v)) = (Self::index(name), v.as_i64()) {
                self.values[i] = v;
            }
        }
    }
}

/// A throttle group.
pub struct ThrottleGroup {
    config: RefCell<ThrottleConfig>,
    /// Made on qemu-system's command line, before the accelerator: its buckets leak on the
    /// host's clock even under qtest (QEMU's `-object` groups are made that early).
    host_clock: std::cell::Cell<bool>,
}

/// The group's properties as QEMU sets them, one at a time in its dict order: an `x-`
/// limit is checked alone (not negative, a burst length within 32 bits); `limits` has its
/// burst lengths checked (in QEMU's order) and the whole configuration so far judged. A
/// later property overrides an earlier one's value.
fn set_in_qemu_order(options: &Args) -> Result<ThrottleConfig> {
    let mut config = ThrottleConfig::default();
    for (key, value) in options.as_dict().iter_qemu_order() {
        if key == "limits" {
            let Some(limits) = value.as_dict() else {
                continue;
            };
            for kind in [
                "bps-total",
                "bps-read",
                "bps-write",
                "iops-total",
                "iops-read",
                "iops-write",
            ] {
                let name = format!("{kind}-max-length");
                if limits
                    .get(&name)
                    .and_then(QObject::as_i64)
                    .is_some_and(|v| v > i64::from(u32::MAX))
                {
                    return Err(Error::LimitsBurstLengthRange(name));
                }
            }
            config.apply(limits);
            config.validate()?;
            continue;
        }
        let Some(name) = key.strip_prefix("x-").filter(|n| LIMITS.contains(n)) else {
            continue;
        };
        let value = value.as_i64().unwrap_or_default();
        if value < 0 {
            return Err(Error::NegativeThrottleProperty);
        }
        if name.ends_with("-max-length") && value > i64::from(u32::MAX) {
            return Err(Error::BurstLengthRange(key.to_owned()));
        }
        if let Some(i) = ThrottleConfig::index(name) {
            config.values[i] = value;
        }
    }
    Ok(config)
}

/// The properties as QEMU checks them while it sets them, before the group has its id.
pub(crate) fn check_values(options: &Args) -> Result<()> {
    set_in_qemu_order(options).map(drop)
}

impl ThrottleGroup {
    pub(crate) fn create(options: &Args) -> Result<ThrottleGroup> {
        let config = set_in_qemu_order(options)?;
        // Judged whole once every property is set (QEMU's completion).
        config.validate()?;
        Ok(ThrottleGroup {
            config: RefCell::new(config),
            host_clock: std::cell::Cell::new(false),
        })
    }

    /// The current limits.
    pub fn config(&self) -> ThrottleConfig {
        self.config.borrow().clone()
    }

    /// Whether the group keeps the host's clock under qtest.
    pub fn host_clock(&self) -> bool {
        self.host_clock.get()
    }

    /// Keeps the host's clock under qtest (made before the accelerator).
    pub fn set_host_clock(&self) {
        self.host_clock.set(true);
    }

    /// Replaces the limits (a drive's `block_set_io_throttle` naming the group).
    pub fn set_config(&self, config: ThrottleConfig) {
        *self.config.borrow_mut() = config;
    }
}

impl UserObject for ThrottleGroup {
    fn type_name(&self) -> &'static str {
        "throttle-group"
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        let config = self.config.borrow();
        if name == "limits" {
            return Some(Ok(config.to_qobject()));
        }
        let limit = name.strip_prefix("x-")?;
        ThrottleConfig::index(limit).map(|i| Ok(QObject::Int(config.values[i])))
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        if name == "limits" {
            return Some(
                check_prop("ThrottleGroupProperties", name, value).and_then(|v| {
                    let mut new = self.config.borrow().clone();
                    if let Some(d) = v.as_dict() {
                        new.apply(d);
                    }
                    new.validate()?;
                    *self.config.borrow_mut() = new;
                    Ok(())
                }),
            );
        }
        let limit = name.strip_prefix("x-")?;
        ThrottleConfig::index(limit)?;
        Some(Err(frozen()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
