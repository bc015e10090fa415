//! The error every QMP command and event producer returns: a class and a message.

use std::fmt;

/// QEMU's `QapiErrorClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Almost every error.
    GenericError,
    /// Unknown or disabled command, or wrong negotiation state.
    CommandNotFound,
    /// A job or device that is not active.
    DeviceNotActive,
    /// A device, node or object that does not exist.
    DeviceNotFound,
    /// A KVM capability is missing.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A QMP error: what `{"error": {"class", "desc"}}` carries. `desc` is one phrase with no
/// trailing punctuation, matching qemu-storage-daemon's text wherever tools depend on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable message.
    pub desc: String,
}

impl Error {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Error {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Error {
            class,
            desc: desc.into(),
        }
    }

    /// Prefixes the message with context, as QEMU's `error_prepend` does.
    pub fn prepend(mut self, prefix: impl fmt::Display) -> Self {
        self.desc = format!("{prefix}{}", self.desc);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for Error {}

/// The C library's text for an errno, as QEMU prints it (`strerror`), without Rust's
/// " (os error N)" suffix.
pub fn os_msg(err: &std::io::Error) -> String {
    let text = err.to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}
