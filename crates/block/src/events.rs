//! Where the block layer's events go (the daemon's event bus).

use ferrite_qobject::QDict;

/// Where the block layer sends its events (the daemon's event bus).
pub trait EventSink {
    /// Emits event `name` with `data`.
    fn emit(&self, name: &'static str, data: QDict);
}
