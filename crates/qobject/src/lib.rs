//! QEMU-compatible JSON for QMP and the command line.
//!
//! Owns the value type ([`QObject`], with integers, unsigned integers and doubles kept apart as
//! QEMU's `QNum` keeps them), the streaming parser that splits a byte stream into top-level
//! JSON values ([`JsonStreamer`]) and the formatter ([`to_json`]) that writes values the way
//! QEMU writes them: `", "`/`": "` separators, `%.17g` doubles, non-ASCII escaped, and dict
//! members in QEMU's hash-table order. It knows nothing of QMP itself.
//!
//! QEMU counterparts: `qobject/`, `qobject/json-lexer.c`, `json-streamer.c`, `json-parser.c`,
//! `qjson.c`, `util/unicode.c`. The behaviour was matched against qemu-storage-daemon 10.0.2.

mod format;
mod lexer;
mod parser;
mod streamer;
mod utf8;
mod value;

pub use format::{format_double, to_json, to_json_pretty};
pub use streamer::{JsonStreamer, Limits, ParseError};
pub use utf8::lossy_from_bytes;
pub use value::{QDict, QObject, QType};

/// Parses exactly one JSON value from `text` (a command-line `{...}` option, a test fixture).
///
/// # Errors
/// The first parse error, or "expecting value" when `text` holds no value, or when something
/// other than white space follows the first value.
pub fn from_json(text: &str) -> Result<QObject, ParseError> {
    let mut streamer = JsonStreamer::new();
    let mut results = Vec::new();
    streamer.feed(text.as_bytes(), |r| results.push(r));
    streamer.finish(|r| results.push(r));
    let mut results = results.into_iter();
    match (results.next(), results.next()) {
        (Some(first), None) => first,
        (Some(Err(e)), Some(_)) => Err(e),
        _ => Err(ParseError::new("expecting value")),
    }
}
