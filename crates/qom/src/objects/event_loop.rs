//! `iothread` and `main-loop`: event loop tuning knobs. ferrite runs one main context, so
//! these record their settings (visible through QOM) but create no threads.

use super::{UserObject, check_prop};
use crate::error::Result;
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
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

impl EventLoop {
    pub(crate) fn create(options: &Args, iothread: bool) -> EventLoop {
        let mut values = IndexMap::new();
        let extra = if iothread { IOTHREAD } else { &[] };
        for &(name, default) in BASE.iter().chain(extra) {
            values.insert(name, options.opt_i64(name).unwrap_or(default));
        }
        EventLoop {
            iothread,
            values: RefCell::new(values),
        }
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
        Some(check_prop(self.props_type(), name, value).map(|v| {
            if let Some(i) = v.as_i64() {
                self.values.borrow_mut().insert(key, i);
            }
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
