//! The QAPI layer: one schema for every QMP command, event and type, and what it drives.
//!
//! The schema is written once, in ferrite's own schema language (`schema/*.qapi`, described in
//! [`schema()`]), and from it come: argument checking with QEMU's error texts before any side
//! effect ([`visit`]), in strict (QMP) and keyval (command line) flavours; `query-commands`;
//! and `query-qmp-schema` in QEMU's introspection format ([`introspect`]). There is no second
//! list of commands anywhere.
//!
//! Also owns [`Error`], the only error type that reaches the wire.
//!
//! QEMU counterparts: `qapi/*.json`, `scripts/qapi/`, `qapi/qobject-input-visitor.c`,
//! `qapi/qapi-visit-core.c`, `qapi/error.json`.

mod args;
pub mod base64;
mod enums;
mod error;
mod event;
pub mod introspect;
pub mod qemu_opts;
pub mod schema;
pub mod visit;

pub use args::Args;
pub use enums::{QapiEnum, check_enum};
pub use error::{Error, ErrorClass, os_msg};
pub use event::{QapiEvent, check_event};
pub use schema::{Schema, schema, use_system_schema};

/// The property every QOM container has. QEMU adds each object and chardev to its container
/// (`/objects`, `/chardevs`) as a property named by its id, so no id can be this one.
pub const QOM_CONTAINER_PROPERTY: &str = "type";

/// QEMU's identifier rule (`id_wellformed`) for object ids, node names and job ids: a letter,
/// then letters, digits, `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}
