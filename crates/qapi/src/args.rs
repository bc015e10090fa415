//! Reading checked command arguments.

use crate::error::Error;
use ferrite_qobject::{QDict, QObject};

/// A command's arguments after schema checking: every member has its declared type, so the
/// getters only ask whether it is present.
#[derive(Debug, Clone, Default)]
pub struct Args(QDict);

impl Args {
    /// Wraps a checked dict.
    pub fn new(dict: QDict) -> Self {
        Args(dict)
    }

    /// The raw value of a member.
    pub fn get(&self, name: &str) -> Option<&QObject> {
        self.0.get(name)
    }

    /// Whether a member is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    /// A required string member.
    ///
    /// # Errors
    /// "Parameter 'x' is missing" if absent (the schema makes that a handler bug).
    pub fn str(&self, name: &str) -> Result<&str, Error> {
        self.opt_str(name).ok_or_else(|| missing(name))
    }

    /// An optional string member.
    pub fn opt_str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(QObject::as_str)
    }

    /// An optional boolean member.
    pub fn opt_bool(&self, name: &str) -> Option<bool> {
        self.0.get(name).and_then(QObject::as_bool)
    }

    /// A boolean member with its default.
    pub fn bool_or(&self, name: &str, default: bool) -> bool {
        self.opt_bool(name).unwrap_or(default)
    }

    /// A required signed integer member.
    ///
    /// # Errors
    /// As [`Args::str`].
    pub fn i64(&self, name: &str) -> Result<i64, Error> {
        self.opt_i64(name).ok_or_else(|| missing(name))
    }

    /// An optional signed integer member.
    pub fn opt_i64(&self, name: &str) -> Option<i64> {
        self.0.get(name).and_then(QObject::as_i64)
    }

    /// A required unsigned integer member.
    ///
    /// # Errors
    /// When it is missing.
    pub fn u64(&self, name: &str) -> Result<u64, Error> {
        self.opt_u64(name).ok_or_else(|| missing(name))
    }

    /// An optional unsigned integer member (negative input was wrapped by the checker).
    pub fn opt_u64(&self, name: &str) -> Option<u64> {
        self.0.get(name).and_then(QObject::as_u64)
    }

    /// A nested struct member.
    pub fn dict(&self, name: &str) -> Option<Args> {
        self.0
            .get(name)
            .and_then(QObject::as_dict)
            .cloned()
            .map(Args)
    }

    /// The whole dict.
    pub fn as_dict(&self) -> &QDict {
        &self.0
    }

    /// The whole dict, owned.
    pub fn into_dict(self) -> QDict {
        self.0
    }
}

fn missing(name: &str) -> Error {
    Error::generic(format!("Parameter '{name}' is missing"))
}
