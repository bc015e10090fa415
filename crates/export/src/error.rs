//! What `block-export-add` and `block-export-del` refuse whatever the export type, in QEMU's
//! words (observed on qemu-storage-daemon 10.0.2).

use ferrite_qapi::ErrorClass;

/// A refused export command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An export ID that breaks QEMU's identifier rule.
    #[error("Invalid block export id")]
    InvalidId(String),
    /// An export ID already taken.
    #[error("Block export id '{0}' is already in use")]
    IdInUse(String),
    /// A writable export of a read-only node.
    #[error("Cannot export read-only node as writable")]
    ReadOnlyNode,
    /// `iothread` naming no iothread object.
    #[error("iothread \"{0}\" not found")]
    NoSuchIothread(String),
    /// `allow-inactive` for a type that needs an active node.
    #[error("Export type does not support inactive exports")]
    InactiveUnsupported,
    /// An unknown export.
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// Removing an export twice.
    #[error("export '{0}' is already shutting down")]
    ShuttingDown(String),
    /// A safe removal of an export with clients.
    #[error("export '{0}' still in use")]
    StillInUse(String),
    /// A failure of the block core.
    #[error(transparent)]
    Block(#[from] ferrite_block::Error),
    /// What the export type refused, or an argument error.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::Block(b) => b.into(),
            Error::StillInUse(_) => {
                ferrite_qapi::Error::new(ErrorClass::GenericError, e.to_string())
                    .with_hint("Use mode='hard' to force client disconnect")
            }
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of an export command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
