//! `iothread` and `main-loop`: event loop tuning knobs. ferrite runs one main context, so
//! these record their settings (visible through QOM) but create no threads.

use super::{UserObject, check_prop};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use indexmap::IndexMap;
use std::any::Any;
use std::cell::RefCell;

pub(crate) struct EventLoop {
    iothread: bool,
    values: RefCell<IndexMap<&'static str, i64>>,
}

const BASE: &[(&str, i64)] = &[
    ("aio-max-batch", 0),
    ("thread-pool-min", 0),
    ("thread-pool-max", 64),
];
const IOTHREAD: &[(&str, i64)] = &[("poll-max-ns", 32768), ("poll-grow", 0), ("poll-shrink", 0)];

/// QEMU stores each parameter as an `int64` that may not be negative.
fn non_negative(name: &str, v: i64) -> Result<i64> {
    if v < 0 {
        return Err(Error::NegativeParam(name.to_owned()));
    }
    Ok(v)
}

/// The parameters' values as QEMU checks them while it sets them, before the object has
/// its id: in the order it sets them, its QDict's. That QDict is made from the QAPI
/// object, member by member in the schema's order (base first), whatever order the
/// client gave them in: two members of one hash bucket come out the later first. A main
/// loop (`applies_pool`) applies its thread pool's bounds as each is set, from the values
/// set so far; an iothread only once it is complete.
pub(crate) fn check_values(options: &Args, applies_pool: bool) -> Result<()> {
    let mut props = QDict::new();
    for &(name, _) in BASE.iter().chain(IOTHREAD) {
        if let Some(v) = options.get(name) {
            props.insert(name, v.clone());
        }
    }
    let mut so_far: IndexMap<&str, i64> = BASE.iter().copied().collect();
    for (name, v) in props.iter_qemu_order() {
        if let Some(v) = v.as_i64() {
            so_far.insert(name, non_negative(name, v)?);
            if applies_pool {
                check_pool_bounds(so_far["thread-pool-min"], so_far["thread-pool-max"])?;
            }
        }
    }
    Ok(())
}

/// The pool's bounds as QEMU checks them when it applies them.
fn check_pool_bounds(min: i64, max: i64) -> Result<()> {
    let int_max = i64::from(i32::MAX);
    if min > max || max <= 0 || min > int_max || max > int_max {
        return Err(Error::ThreadPoolBounds);
    }
    Ok(())
}

impl EventLoop {
    /// # Errors
    /// QEMU's texts for a negative parameter and for thread pool bounds that make no pool.
    pub(crate) fn create(options: &Args, iothread: bool) -> Result<EventLoop> {
        let mut values = IndexMap::new();
        let extra = if iothread { IOTHREAD } else { &[] };
        for &(name, default) in BASE.iter().chain(extra) {
            let v = match options.opt_i64(name) {
                Some(v) => non_negative(name, v)?,
                None => default,
            };
            values.insert(name, v);
        }
        let me = EventLoop {
            iothread,
            values: RefCell::new(values),
        };
        me.check_thread_pool()?;
        Ok(me)
    }

    /// The pool's bounds as QEMU checks them when it applies them.
    fn check_thread_pool(&self) -> Result<()> {
        let values = self.values.borrow();
        check_pool_bounds(values["thread-pool-min"], values["thread-pool-max"])
    }

    fn props_type(&self) -> &'static str {
        if self.iothread {
            "IothreadProperties"
        } else {
            "MainLoopProperties"
        }
    }
}

impl UserObject for EventLoop {
    fn type_name(&self) -> &'static str {
        if self.iothread {
            "iothread"
        } else {
            "main-loop"
        }
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        self.values.borrow().get(name).map(|v| Ok(QObject::Int(*v)))
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        let key = *self.values.borrow().keys().find(|k| **k == name)?;
        Some(check_prop(self.props_type(), name, value).and_then(|v| {
            if let Some(i) = v.as_i64() {
                let i = non_negative(name, i)?;
                // As QEMU: the value stays even when applying it fails.
                self.values.borrow_mut().insert(key, i);
                self.check_thread_pool()?;
            }
            Ok(())
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
