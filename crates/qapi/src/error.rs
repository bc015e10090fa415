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
    /// Advice that the command line prints on a line of its own after the message (QEMU's
    /// `error_append_hint`); QMP replies leave it out.
    pub hint: Option<String>,
}

impl Error {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Error {
            class: ErrorClass::GenericError,
            desc: desc.into(),
            hint: None,
        }
    }

    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Error {
            class,
            desc: desc.into(),
            hint: None,
        }
    }

    /// Adds a hint for the command line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The message with its hint, as the command line prints it.
    pub fn cli_text(&self) -> String {
        match &self.hint {
            Some(h) => format!("{}\n{h}", self.desc),
            None => self.desc.clone(),
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
