//! The NBD server's and exports' errors, in QEMU's words (observed on qemu-storage-daemon
//! 10.0.2); the QMP edge turns them into `ferrite_qapi::Error`.

use ferrite_qapi::ErrorClass;

/// A refused NBD server or export command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nbd-server-start` twice.
    #[error("NBD server already running")]
    AlreadyRunning,
    /// An export command without a server.
    #[error("NBD server not running")]
    NotRunning,
    /// `tls-creds` that are not a server's credentials (QEMU's texts, from `ferrite-tls`).
    #[error("{0}")]
    Tls(String),
    /// The address could not be listened on (QEMU's texts, from `ferrite-socket`).
    #[error(transparent)]
    Address(#[from] ferrite_socket::Error),
    /// An `fd` address naming no socket (QEMU's texts, from the monitor's descriptors).
    #[error("{0}")]
    Fd(String),
    /// An export name over NBD's 4096 bytes.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// An export name already taken.
    #[error("NBD server already has export named '{0}'")]
    NameInUse(String),
    /// A description over NBD's 4096 bytes.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// An exported bitmap that does not exist.
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    /// A bitmap named with its node (`{node, name}`) that the node lacks.
    #[error("Dirty bitmap '{0}' not found")]
    NodeBitmapNotFound(String),
    /// The node of a bitmap named with its node.
    #[error("Node '{0}' not found")]
    BitmapNodeNotFound(String),
    /// An exported bitmap another operation holds.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// An enabled bitmap on a read-only export of a writable node.
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    EnabledBitmapReadOnly(String),
    /// `nbd-server-remove` of an export of another type.
    #[error("Block export '{0}' is not an NBD export")]
    NotNbdExport(String),
    /// A failure of the block core.
    #[error(transparent)]
    Block(#[from] ferrite_block::Error),
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
    /// The export list's refusal.
    #[error(transparent)]
    Export(#[from] ferrite_export::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::Block(b) => b.into(),
            Error::Export(x) => x.into(),
            Error::Address(a) => a.into(),
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of an NBD command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
