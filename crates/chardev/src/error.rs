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
    /// Socket options that do not go together (QEMU's texts).
    #[error("{0}")]
    SocketOptions(&'static str),
    /// A UDP chardev whose remote address has no port.
    #[error("remote port not specified")]
    NoRemotePort,
    /// telnet, tn3270 and websocket sockets.
    #[error("telnet, tn3270 and websocket sockets are not supported by ferrite")]
    SocketProtocolUnsupported,
    /// An `fd` address in QMP that names no socket the monitor keeps (QEMU's texts).
    #[error("{0}")]
    Fd(String),
    /// An `fd` address to connect to again: its socket is gone with the first connection.
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
    /// An option's value not of its type.
    #[error(transparent)]
    Value(#[from] ferrite_qapi::qemu_opts::ValueError),
    /// `--chardev` without a backend (named by the chardev's id).
    #[error("chardev: \"{0}\" missing backend")]
    BackendMissing(String),
    /// An option the backend does not take.
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    /// `--chardev` without an ID.
    #[error("chardev: no id specified")]
    NoId,
    /// A serial chardev without a device.
    #[error("chardev: serial/tty: no device path given")]
    NoSerialPath,
    /// A parallel chardev without a device.
    #[error("chardev: parallel: no device path given")]
    NoParallelPath,
    /// A device that is not a parallel port.
    #[error("not a parallel port: {}", os_msg(.0))]
    NotParallel(io::Error),
    /// A UDP chardev without a remote port.
    #[error("chardev: udp: remote port not specified")]
    NoUdpPort,
    /// A UDP address that is not an inet one.
    #[error("socket type unsupported for datagram")]
    NotDatagram,
    /// A socket address that could not be resolved, listened on or connected to.
    #[error(transparent)]
    Address(#[from] ferrite_socket::Error),
    /// A system call that failed, with QEMU's words for what it was doing.
    #[error("{what}: {}", os_msg(.error))]
    Os {
        /// What failed.
        what: String,
        /// Why.
        error: io::Error,
    },
    /// The pseudo-terminal could not be made.
    #[error("Failed to create PTY: {}", os_msg(.0))]
    Pty(io::Error),
    /// The pseudo-terminal's link could not be made.
    #[error("Failed to create PTY symlink: {}", os_msg(.0))]
    PtySymlink(io::Error),
    /// A mux chardev without a base.
    #[error("chardev: mux: no chardev given")]
    NoMuxBase,
    /// A mux whose base does not exist.
    #[error("mux: base chardev {0} not found")]
    MuxBaseNotFound(String),
    /// A chardev that already has a frontend (a monitor, a mux, a hub).
    #[error("chardev '{0}' is already in use")]
    InUse(String),
    /// A fifth frontend on a mux.
    #[error("too many uses of multiplexed chardev '{0}' (maximum is 4)")]
    MuxTooMany(String),
    /// A hub without members.
    #[error("hub: 'chardevs' list is not defined")]
    HubEmpty,
    /// A hub member that does not exist.
    #[error("hub: chardev can't be found by id '{0}'")]
    HubMemberNotFound(String),
    /// A hub over a hub or a mux.
    #[error(
        "hub: multiplexers and hub devices can't be stacked, check chardev '{0}', chardev should not be a hub device or have 'mux=on' enabled"
    )]
    HubStacked(String),
    /// A hub of more than four members (named by the hub's id).
    #[error("hub: too many uses of chardevs '{0}' (maximum is 4)")]
    HubTooMany(String),
    /// `chardev-change` of a mux or a hub.
    #[error("For mux or hub device hotswap is not supported yet")]
    NoHotswapOfMux,
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
            Error::Address(a) => a.into(),
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a chardev operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
