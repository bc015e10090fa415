//! Events: formatted once, delivered to every session in command mode.

use crate::outbox::Outbox;
use ferrite_qobject::{QDict, QObject, to_json, to_json_pretty};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An event: a name from the schema and its data.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name (`JOB_STATUS_CHANGE`).
    pub name: &'static str,
    /// Its data, if the event carries any.
    pub data: Option<QDict>,
}

/// How the bus waits out a rate limit: the monitor's clock (QEMU's is the virtual one
/// under qtest).
pub type Sleep = Rc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()>>>>;

/// Events a guest or an image can raise at any rate: at most one a second of each (per
/// source where QEMU tells sources apart), the last one held back going out when the
/// second ends, as QEMU's monitor limits them.
const RATE_LIMITED: [(&str, Option<&str>); 9] = [
    ("RTC_CHANGE", None),
    ("BLOCK_IO_ERROR", Some("qom-path")),
    ("WATCHDOG", None),
    ("BALLOON_CHANGE", None),
    ("QUORUM_REPORT_BAD", Some("node-name")),
    ("QUORUM_FAILURE", None),
    ("VSERPORT_CHANGE", Some("id")),
    ("MEMORY_DEVICE_SIZE_CHANGE", Some("qom-path")),
    ("HV_BALLOON_STATUS_REPORT", None),
];

const EVENT_RATE: Duration = Duration::from_secs(1);

/// A rate-limited event and its source.
type ThrottleKey = (&'static str, Option<String>);

/// The subscribers: every session in command mode.
#[derive(Default)]
pub struct EventBus {
    subscribers: RefCell<Vec<Weak<Outbox>>>,
    /// Rate-limited events sent less than a second ago, with the one held back, if any.
    throttled: RefCell<HashMap<ThrottleKey, Option<QObject>>>,
    sleep: RefCell<Option<Sleep>>,
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Rc<Self> {
        Rc::default()
    }

    pub(crate) fn subscribe(&self, outbox: &Rc<Outbox>) {
        self.subscribers.borrow_mut().push(Rc::downgrade(outbox));
    }

    /// Waits out rate limits with `sleep` instead of the host's clock.
    pub fn set_sleep(&self, sleep: Sleep) {
        *self.sleep.borrow_mut() = Some(sleep);
    }

    /// Sends an event to every session in command mode, stamped with the wall clock; a
    /// rate-limited one (`QUORUM_REPORT_BAD`...) waits while one of its kind went out less
    /// than a second ago (only the newest waiting is sent).
    pub fn emit(self: &Rc<Self>, event: Event) {
        let key = RATE_LIMITED
            .iter()
            .find(|(name, _)| *name == event.name)
            .map(|(name, field)| {
                let source = field.and_then(|f| {
                    event
                        .data
                        .as_ref()
                        .and_then(|d| d.get(f))
                        .and_then(QObject::as_str)
                        .map(str::to_owned)
                });
                (*name, source)
            });
        let msg = Self::stamped(event);
        let Some(key) = key else {
            self.deliver(&msg);
            return;
        };
        if let Some(held) = self.throttled.borrow_mut().get_mut(&key) {
            *held = Some(msg);
            return;
        }
        self.deliver(&msg);
        self.throttled.borrow_mut().insert(key.clone(), None);
        let bus = Rc::downgrade(self);
        let sleep = self.sleep.borrow().clone();
        tokio::task::spawn_local(async move {
            loop {
                match &sleep {
                    Some(sleep) => sleep(EVENT_RATE).await,
                    None => tokio::time::sleep(EVENT_RATE).await,
                }
                let Some(bus) = bus.upgrade() else { return };
                let held = bus
                    .throttled
                    .borrow_mut()
                    .get_mut(&key)
                    .and_then(Option::take);
                match held {
                    Some(msg) => bus.deliver(&msg),
                    None => {
                        bus.throttled.borrow_mut().remove(&key);
                        return;
                    }
                }
            }
        });
    }

    /// The message for `event`, stamped with the wall clock now.
    fn stamped(event: Event) -> QObject {
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
        QObject::Dict(msg)
    }

    fn deliver(&self, msg: &QObject) {
        let mut compact: Option<Rc<str>> = None;
        let mut pretty: Option<Rc<str>> = None;
        let mut subs = self.subscribers.borrow_mut();
        subs.retain(|w| w.upgrade().is_some_and(|o| !o.is_closed()));
        for outbox in subs.iter().filter_map(Weak::upgrade) {
            let text = if outbox.pretty {
                pretty.get_or_insert_with(|| wire_text(msg, true)).clone()
            } else {
                compact.get_or_insert_with(|| wire_text(msg, false)).clone()
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
