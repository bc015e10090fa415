//! Events: formatted once, delivered to every session in command mode.

use crate::outbox::Outbox;
use ferrite_qobject::{QDict, QObject, to_json, to_json_pretty};
use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

/// An event: a name from the schema and its data.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name (`JOB_STATUS_CHANGE`).
    pub name: &'static str,
    /// Its data, if the event carries any.
    pub data: Option<QDict>,
}

/// The subscribers: every session in command mode.
#[derive(Default)]
pub struct EventBus {
    subscribers: RefCell<Vec<Weak<Outbox>>>,
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Rc<Self> {
        Rc::default()
    }

    pub(crate) fn subscribe(&self, outbox: &Rc<Outbox>) {
        self.subscribers.borrow_mut().push(Rc::downgrade(outbox));
    }

    /// Sends an event to every session in command mode, stamped with the wall clock.
    pub fn emit(&self, event: Event) {
        let (seconds, micros) = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_micros())),
            Err(_) => (-1, -1),
        };
        let mut msg = QDict::new().with("event", event.name);
        if let Some(data) = event.data {
            msg.insert("data", data);
        }
        msg.insert(
            "timestamp",
            QDict::new()
                .with("seconds", seconds)
                .with("microseconds", micros),
        );
        let msg = QObject::Dict(msg);
        let mut compact: Option<Rc<str>> = None;
        let mut pretty: Option<Rc<str>> = None;
        let mut subs = self.subscribers.borrow_mut();
        subs.retain(|w| w.upgrade().is_some_and(|o| !o.is_closed()));
        for outbox in subs.iter().filter_map(Weak::upgrade) {
            let text = if outbox.pretty {
                pretty.get_or_insert_with(|| wire_text(&msg, true)).clone()
            } else {
                compact
                    .get_or_insert_with(|| wire_text(&msg, false))
                    .clone()
            };
            outbox.push_event(text);
        }
    }
}

/// A message as it goes on the wire: every line ends in CR LF.
pub(crate) fn wire_text(msg: &QObject, pretty: bool) -> Rc<str> {
    let text = if pretty {
        to_json_pretty(msg).replace('\n', "\r\n")
    } else {
        to_json(msg)
    };
    format!("{text}\r\n").into()
}
