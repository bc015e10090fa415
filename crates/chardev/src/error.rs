//! The character devices' errors, in QEMU's words (observed on qemu-storage-daemon
//! 10.0.2); the QMP edge and the command line turn them into `ferrite_qapi::Error`.

use ferrite_qapi::{ErrorClass, os_msg};
use std::io;

/// A refused chardev operation or option.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that cannot be opened (`file` backend, `logfile`).
    #[error("Could not open '{path}': {}", os_msg(.error))]
    Open {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// A socket operation that failed (`Failed to bind socket to 'x'`...).
    #[error("{what} '{target}': {}", os_msg(.error))]
    Socket {
        /// What failed.
        what: &'static str,
        /// The address.
        target: String,
        /// Why.
        error: io::Error,
    },
    /// TLS asked of a socket that cannot have it, or credentials that will not do (QEMU's
    /// texts).
    #[error("{0}")]
    Tls(String),
    /// telnet, tn3270 and websocket sockets.
    #[error("telnet, tn3270 and websocket sockets are not supported by ferrite")]
    SocketProtocolUnsupported,
    /// An `fd` address in QMP.
    #[error("only QEMU supports file descriptor passing")]
    FdOverQmp,
    /// An `fd` that is not a number.
    #[error("Unable to parse FD number {0}")]
    FdNumber(String),
    /// An `fd` that is not open.
    #[error("File descriptor '{0}' is not open")]
    FdNotOpen(String),
    /// An `fd` that is not a socket.
    #[error("File descriptor '{0}' is not a socket")]
    FdNotSocket(String),
    /// Two stdio chardevs.
    #[error("cannot use stdio by multiple character devices")]
    StdioTwice,
    /// An unknown backend.
    #[error("'{0}' is not a valid char driver name")]
    UnknownBackend(String),
    /// A ring buffer size that is not a power of two.
    #[error("size of ringbuf chardev must be power of two")]
    RingbufSize,
    /// A chardev a frontend uses.
    #[error("Chardev '{0}' is busy")]
    Busy(String),
    /// `chardev-add` of an ID already taken.
    #[error("Chardev with id '{0}' already exists")]
    Exists(String),
    /// `--chardev` of an ID already taken.
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    DuplicateProperty(String),
    /// `chardev-change` of an unknown chardev.
    #[error("Chardev '{0}' does not exist")]
    DoesNotExist(String),
    /// `chardev-change` of a chardev whose user cannot switch.
    #[error("Chardev user does not support chardev hotswap")]
    NoHotswap,
    /// An unknown chardev.
    #[error("Chardev '{0}' not found")]
    NotFound(String),
    /// `ringbuf-*` on an unknown device.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// `ringbuf-*` on another kind of chardev.
    #[error("{0} is not a ringbuf device")]
    NotRingbuf(String),
    /// `ringbuf-read` of nothing.
    #[error("size must be greater than zero")]
    ReadSize,
    /// `ringbuf-write` with bad base64.
    #[error("Base64 data contains invalid characters")]
    Base64,
    /// A boolean option with another value.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsBool(String),
    /// A number option with another value.
    #[error("Parameter '{0}' expects a number")]
    ExpectsNumber(String),
    /// A size option with another value.
    #[error("Parameter '{0}' expects a size")]
    ExpectsSize(String),
    /// `--chardev` without a backend.
    #[error("Parameter 'backend' is missing")]
    BackendMissing,
    /// An option the backend does not take.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// `--chardev` without an ID.
    #[error("chardev: no id specified")]
    NoId,
    /// Multiplexed chardevs (not in ferrite).
    #[error("mux chardevs are not supported by ferrite")]
    MuxUnsupported,
    /// A TCP socket without a port.
    #[error("chardev: socket: no port given")]
    NoPort,
    /// A file chardev without a path.
    #[error("chardev: file: no filename given")]
    NoFilename,
    /// A pipe chardev without a path.
    #[error("chardev: pipe: no device path given")]
    NoPipePath,
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a chardev operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
