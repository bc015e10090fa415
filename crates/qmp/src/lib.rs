//! QMP monitors: what happens on one connection, from greeting to hang-up.
//!
//! Owns the session state machine (capabilities negotiation, then command mode), the checks
//! a request goes through before it reaches a command (in QEMU's order, with QEMU's texts),
//! the `id` echo, the out-of-band rules, and event delivery to every session in command mode.
//! Commands themselves are behind the [`Commands`] trait; the transport is any pair of async
//! byte streams (the daemon gets them from chardevs).
//!
//! QEMU counterparts: `monitor/qmp.c`, `monitor/monitor.c`, `qapi/qmp-dispatch.c`.

mod context;
mod dispatch;
mod events;
mod outbox;
mod session;

pub use context::{FdSource, NamedFds, SessionContext, current_session};
pub use dispatch::{CommandFuture, Commands};
pub use events::{Event, EventBus, Sleep};
pub use session::{Lifetime, Monitor, MonitorOptions};
