//! The block core's errors. Each variant's text is QEMU's (observed on qemu-storage-daemon
//! 10.0.2) and is written once, here; the QMP edge turns an [`Error`] into a
//! `ferrite_qapi::Error` with its class.

use ferrite_qapi::{ErrorClass, os_msg};
use std::io;

/// A failure of a block core operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node moved to another iothread while a user that stays in its own uses it.
    #[error("Cannot change iothread of active block backend")]
    IothreadInUse,
    /// A node looked up by a command that takes a device or a node name.
    #[error("Cannot find device='{0}' nor node-name='{0}'")]
    NotFound(String),
    /// A drive named by a command that takes a device or a node name has no medium.
    #[error("Device '{0}' has no medium")]
    NoMedium(String),
    /// A node looked up by node name only.
    #[error("Cannot find device='' nor node-name='{0}'")]
    NodeNotFound(String),
    /// A node looked up by a command that says "device".
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// `blockdev-del` and `blockdev-reopen` of an unknown node.
    #[error("Failed to find node with node-name='{0}'")]
    NoSuchNode(String),
    /// A reopen or a snapshot making a node a child of itself or of one below it.
    #[error("Making '{child}' a {edge} child of '{parent}' would create a cycle")]
    ChildCycle {
        /// The would-be child.
        child: String,
        /// The edge (`file`).
        edge: String,
        /// The node reopened.
        parent: String,
    },
    /// A reopen changing a backing link a job relies on.
    #[error("Cannot change frozen '{edge}' link from '{parent}' to '{child}'")]
    FrozenChild {
        /// The edge (`backing`).
        edge: String,
        /// The node reopened.
        parent: String,
        /// Its child now.
        child: String,
    },
    /// A job's chain runs through a link that leaves the graph with another job (a commit's
    /// filter).
    #[error("Cannot freeze '{link}' link to '{node}'")]
    CannotFreeze {
        /// The link's name (`backing`, `file`).
        link: String,
        /// The node it points to.
        node: String,
    },
    /// A job's chain runs through a link another job holds already.
    #[error("Cannot change '{edge}' link from '{parent}' to '{child}'")]
    ChainFrozen {
        /// The link's name (`backing`, `file`).
        edge: String,
        /// The node above it.
        parent: String,
        /// The node it points to.
        child: String,
    },
    /// A reopen of a node with a backing file that does not say what becomes of it.
    #[error("backing is missing for '{0}'")]
    BackingMissing(String),
    /// A reopen replacing a child a job put in.
    #[error("Cannot replace implicit {edge} child of {parent}")]
    ImplicitChild {
        /// The edge (`file`).
        edge: String,
        /// The node reopened.
        parent: String,
    },
    /// A node name that breaks QEMU's identifier rule.
    #[error("Invalid node-name: '{0}'")]
    InvalidNodeName(String),
    /// A node name over 31 bytes.
    #[error("Node name too long")]
    NodeNameTooLong,
    /// A node longer than QEMU allows (`BDRV_MAX_LENGTH`).
    #[error("Could not refresh total sector count: File too large")]
    TooLarge,
    /// A node name a device (a named block backend) already has.
    #[error("node-name={0} is conflicting with a device id")]
    NodeNameIsDeviceId(String),
    /// A node name already taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNodeName(String),
    /// `blockdev-add` without a node name.
    #[error("'node-name' must be specified for the root node")]
    RootNodeNameMissing,
    /// `blockdev-reopen` without a node name.
    #[error("node-name not specified")]
    ReopenNodeNameMissing,
    /// A required child option that is absent (where no schema asked for it first: an
    /// image opened by name, a `-drive`).
    #[error("A block device must be specified for \"{0}\"")]
    MissingChild(String),
    /// A child given as neither a node name nor options.
    #[error("Invalid child reference")]
    InvalidChildRef,
    /// A format no driver knows.
    #[error("Unknown driver '{0}'")]
    UnknownDriver(String),
    /// A file name whose prefix names no protocol (`foo:bar`).
    #[error("Unknown protocol '{0}'")]
    UnknownProtocol(String),
    /// `detect-zeroes=unmap` without `discard=unmap`.
    #[error(
        "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
    )]
    DetectZeroesUnmapWithoutDiscard,
    /// A driver that opens a file, given none (QEMU's `bdrv_needs_filename`).
    #[error("The '{0}' block driver requires a file name")]
    FilenameRequired(String),
    /// `force-share=on` on a writable node.
    #[error("force-share=on can only be used with read-only images")]
    ForceShareWritable,
    /// `blockdev-reopen` of a node whose driver cannot reopen (QEMU's drivers without
    /// `bdrv_reopen_prepare`: quorum, blkverify, the job filters...).
    #[error("Block format '{format}' used by node '{node}' does not support reopening files")]
    ReopenUnsupported {
        /// The node's driver.
        format: String,
        /// The node's drive name, else its node name.
        node: String,
    },
    /// A reopen that changes what cannot change.
    #[error("Cannot change the option '{0}'")]
    CannotChange(String),
    /// A reopen that leaves out an option that has no default to go back to.
    #[error("Option '{0}' cannot be reset to its default value")]
    CannotReset(String),
    /// Two users of a node that cannot both have what they take.
    #[error(
        "Permission conflict on node '{node}': permissions '{perms}' are both required by {user} and unshared by {other}."
    )]
    PermissionConflict {
        /// The node.
        node: String,
        /// The permissions in conflict, named and joined.
        perms: String,
        /// Who takes them.
        user: String,
        /// Who does not share them.
        other: String,
    },
    /// A reopen making a node read-only while a user still writes to it.
    #[error("Read-only block node '{0}' cannot support read-write users")]
    ReadOnlyWithWriters(String),
    /// A writer on a read-only node.
    #[error("Block node is read-only")]
    ReadOnly,
    /// A writer without the resize permission on a node whose size is not a multiple of
    /// its request alignment.
    #[error(
        "Cannot get 'write' permission without 'resize': Image size is not a multiple of request alignment"
    )]
    UnalignedSize,
    /// A node a job or another operation holds (QEMU's op blockers).
    #[error("Node '{node}' is busy: {reason}")]
    Busy {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// Writing back before a read-write to read-only reopen failed.
    #[error("Could not write back before reopening read-only: {}", os_msg(.0))]
    WriteBack(io::Error),
    /// Preparing a read-only image for writing failed.
    #[error("Could not prepare the image for writing: {}", os_msg(.0))]
    PrepareWritable(io::Error),
    /// `block_resize` to a negative size.
    #[error("Parameter 'size' expects a >0 size")]
    NegativeSize,
    /// `block_resize` of a read-only node.
    #[error("Image is read-only")]
    ImageReadOnly,
    /// A size past the longest node QEMU has (`BDRV_MAX_LENGTH`).
    #[error("offset({0}) exceeds maximum({max})", max = crate::MAX_LENGTH)]
    OffsetTooLarge(u64),
    /// A filter that a job inserts failed to open (QEMU's `bdrv_insert_node`).
    #[error("Could not create node: {0}")]
    CreateNode(Box<Error>),
    /// Inactivating a node an active node uses.
    #[error("Node has active parent node")]
    ActiveParent,
    /// Inactivating failed (EPERM: a user still writes the node).
    #[error("Failed to inactivate node: {}", os_msg(.0))]
    InactivateFailed(io::Error),
    /// Activating failed: the format could not read its image again (QEMU's qcow2 and qed
    /// say "Could not reopen qcow2 layer: ...").
    #[error("Could not reopen {driver} layer: {}", os_msg(.error))]
    ActivateFailed {
        /// The format.
        driver: String,
        /// Why.
        error: io::Error,
    },
    /// An inactive node as the child of an active one.
    #[error("Inactive '{child}' can't be a {edge} child of active '{parent}'")]
    InactiveChild {
        /// The inactive node.
        child: String,
        /// The edge.
        edge: String,
        /// The active parent.
        parent: String,
    },
    /// More than reading asked of an inactive node.
    #[error("Permission '{0}' unavailable on inactive node")]
    InactivePermission(String),
    /// A backing file given to a node whose driver has none.
    #[error("Driver '{driver}' of node '{node}' does not support backing files")]
    BackingUnsupported {
        /// The node's driver.
        driver: String,
        /// The node.
        node: String,
    },
    /// `block_resize` of a driver that cannot resize.
    #[error("Image format driver does not support resize")]
    ResizeUnsupported,
    /// Resizing failed: an OS error, or the driver's own reason (said as it is).
    #[error("{}", resize_msg(.0))]
    Resize(io::Error),
    /// `blockdev-del` of a node an export or a device uses.
    #[error("Node {0} is in use")]
    InUseByRoot(String),
    /// `blockdev-del` of a node the monitor did not add.
    #[error("Node {0} is not owned by the monitor")]
    NotMonitorOwned(String),
    /// `blockdev-del` of a node another node uses.
    #[error("Block device {0} is in use")]
    InUse(String),
    /// `blockdev-create` with a driver that cannot create images.
    #[error("Driver does not support blockdev-create")]
    CannotCreate,
    /// `blockdev-create` with a driver of the schema's that is not here (`blkreplay`).
    #[error("Block driver '{0}' not found or not supported")]
    NoSuchDriverToCreate(String),
    /// An image created by file name over a protocol that cannot make its part.
    #[error("Protocol driver '{0}' does not support image creation")]
    ProtocolCannotCreate(String),
    /// An image created by file name over storage that is only reused (an NBD export, a
    /// host device) that could not be opened.
    #[error(
        "Protocol driver '{driver}' does not support creating new images, so an existing \
         image must be selected as the target; however, opening the given target as an \
         existing image failed: {cause}"
    )]
    NoExistingTarget {
        /// The protocol.
        driver: String,
        /// Why the open failed.
        cause: Box<Error>,
    },
    /// Reused storage whose first sector could not be zeroed.
    #[error("Failed to clear the new image's first sector: {}", os_msg(.0))]
    ClearFirstSector(io::Error),
    /// `x-blockdev-amend` naming another driver than the node's.
    #[error("x-blockdev-amend doesn't support changing the block driver")]
    AmendChangesDriver,
    /// `x-blockdev-amend` with a driver that cannot amend.
    #[error("Driver does not support x-blockdev-amend")]
    CannotAmend,
    /// A block-copy granularity that is not a power of two.
    #[error("Cannot create block-copy-state: min-cluster-size needs to be a power of 2")]
    MinClusterSize,
    /// A backend outlived its graph.
    #[error("The block graph is gone")]
    GraphGone,
    /// A relative backing file name for an image whose own name is not a plain path.
    #[error("Cannot use relative backing file names for '{0}'")]
    RelativeBackingName(String),
    /// No file under a node names the directory relative names are taken from.
    #[error("Cannot generate a base directory for {0} nodes")]
    NoBaseDirectory(String),
    /// The backing file an image names failed to open (the error names the file itself:
    /// "Could not open 'PATH': ...").
    #[error("Could not open backing file: {0}")]
    BackingOpen(Box<Error>),
    /// The backing file format an image names is not one ferrite has.
    #[error("Could not open backing file: Unknown driver '{0}'")]
    UnknownBackingDriver(String),
    /// A driver's own error, as its text says, with advice for the command line.
    #[error("{error}")]
    Driver {
        /// The driver's error.
        error: Box<dyn std::error::Error>,
        /// A line of advice the command line prints after the message (QEMU's hint).
        hint: Option<String>,
    },
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl Error {
    /// A driver's error.
    pub fn driver(e: impl std::error::Error + 'static) -> Error {
        Error::Driver {
            error: Box::new(e),
            hint: None,
        }
    }

    /// A driver's error with a line of advice for the command line.
    pub fn driver_with_hint(e: impl std::error::Error + 'static, hint: String) -> Error {
        Error::Driver {
            error: Box::new(e),
            hint: Some(hint),
        }
    }

    /// Prefixes the text with context, as QEMU's `error_prepend` does (an error that stays
    /// what it was, with more said first).
    pub fn prepend(self, prefix: impl std::fmt::Display) -> Error {
        let hint = match &self {
            Error::Driver { hint, .. } => hint.clone(),
            _ => None,
        };
        Error::Driver {
            error: Box::new(Prepended(format!("{prefix}{self}"))),
            hint,
        }
    }
}

/// An error text with context put before it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Prepended(String);

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::Driver {
                error,
                hint: Some(hint),
            } => ferrite_qapi::Error::new(ErrorClass::GenericError, error.to_string())
                .with_hint(hint),
            // QEMU answers every one of these with the generic class (even "Device 'x' not
            // found", whose schema documents DeviceNotFound).
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a block core operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// "Could not resize file: <strerror>" for an OS error (QEMU's file driver's text: a file's
/// truncate is what fails with one); a driver's own message as it is.
fn resize_msg(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(_) => format!("Could not resize file: {}", os_msg(e)),
        None => e.to_string(),
    }
}
