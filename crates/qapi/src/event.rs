//! Events as typed values: each event a layer emits is a type implementing [`QapiEvent`],
//! and [`check_event`] checks one against the schema's declaration (the daemon does so for
//! every event in debug builds; each layer's tests do so for every event type).

use crate::schema::schema;
use crate::visit::{Mode, check_object};
use ferrite_qobject::{QDict, QObject};

/// An event declared in the schema.
pub trait QapiEvent {
    /// The event's name (`JOB_STATUS_CHANGE`).
    fn name(&self) -> &'static str;
    /// Its `data` member, if the event has one.
    fn data(&self) -> Option<QDict>;
}

/// Whether `event` is declared and its data has the declared members and types.
///
/// # Errors
/// What does not match.
pub fn check_event(event: &dyn QapiEvent) -> Result<(), String> {
    let name = event.name();
    let decl = schema()
        .event(name)
        .ok_or_else(|| format!("event {name} is not in the schema"))?;
    match (&decl.data, event.data()) {
        (None, None) => Ok(()),
        (Some(ty), Some(data)) => check_object(schema(), ty, &QObject::Dict(data), Mode::Strict)
            .map(drop)
            .map_err(|e| format!("event {name}: {}", e.desc)),
        (Some(_), None) => Err(format!("event {name} carries no data but declares some")),
        (None, Some(_)) => Err(format!("event {name} carries data it does not declare")),
    }
}
