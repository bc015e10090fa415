//! The block commands' errors, in QEMU's words (observed on qemu-storage-daemon 10.0.2);
//! the QMP edge turns them into `ferrite_qapi::Error`.

use ferrite_qapi::{ErrorClass, os_msg};
use std::io;

/// A refused block command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command naming a device and a node name, neither found.
    #[error("Cannot find device='{device}' nor node-name='{node}'")]
    NotFound {
        /// The device given (empty if none).
        device: String,
        /// The node name given (empty if none).
        node: String,
    },
    /// An action that cannot join a grouped transaction.
    #[error("Action '{0}' does not support transaction property completion-mode = grouped")]
    NotGroupable(String),
    /// The `abort` action.
    #[error("Transaction aborted using Abort action")]
    Aborted,
    /// A transaction action ferrite does not have.
    #[error("Transaction action '{0}' is not supported by ferrite yet")]
    UnsupportedAction(String),
    /// A VM snapshot given an empty device list.
    #[error("At least one device is required for snapshot")]
    VmSnapshotNoDevices,
    /// A VM snapshot's device list naming a node there is not.
    #[error("No block device node '{0}'")]
    VmSnapshotNoSuchNode(String),
    /// A node a VM snapshot covers that cannot take one.
    #[error("Device '{0}' is writable but does not support snapshots")]
    VmSnapshotUnsupported(String),
    /// Deleting a VM snapshot failed on a node.
    #[error(
        "Could not delete snapshot '{name}' on '{device}': Failed to remove snapshot from snapshot list"
    )]
    VmSnapshotDelete {
        /// The snapshot.
        name: String,
        /// The node's drive or node name.
        device: String,
    },
    /// Taking a VM snapshot failed on a node.
    #[error("Could not create snapshot '{name}' on '{device}'")]
    VmSnapshotCreate {
        /// The snapshot.
        name: String,
        /// The node's drive or node name.
        device: String,
    },
    /// Loading a VM snapshot failed on a node.
    #[error("Could not load snapshot '{name}' on '{device}': {reason}")]
    VmSnapshotLoad {
        /// The snapshot.
        name: String,
        /// The node's drive or node name.
        device: String,
        /// Why.
        reason: String,
    },
    /// `vmstate` naming a node that cannot take snapshots.
    #[error("vmstate block device '{0}' does not support snapshots")]
    VmStateUnsupported(String),
    /// `vmstate` naming a node there is not.
    #[error("vmstate block device '{0}' does not exist")]
    VmStateMissing(String),
    /// No node can take the VM state.
    #[error("no block device can store vmstate for snapshot")]
    NoVmStateNode,
    /// A snapshot overlay already in use.
    #[error("The overlay is already in use")]
    OverlayInUse,
    /// A snapshot overlay that has a backing file already.
    #[error("The overlay already has a backing image")]
    OverlayHasBacking,
    /// A filter node as a snapshot overlay.
    #[error("Filters cannot be used as overlays")]
    OverlayIsFilter,
    /// A snapshot overlay of a format without backing files.
    #[error("The overlay does not support backing images")]
    OverlayWithoutBacking,
    /// A snapshot of a node named by `node-name` without a name for the overlay.
    #[error("New overlay node-name missing")]
    OverlayNameMissing,
    /// `snapshot-node-name` already taken.
    #[error("New overlay node-name already in use")]
    OverlayNameInUse,
    /// `change-backing-file` on a node that has parents.
    #[error("Need a root block node")]
    NeedRootNode,
    /// `block-stream` with two ways to name its base (QEMU's text names both).
    #[error("'{0}' and '{1}' cannot be specified at the same time")]
    Exclusive(&'static str, &'static str),
    /// A backing file name found nowhere in the chain.
    #[error("Can't find '{0}' in the backing chain")]
    NotInChain(String),
    /// `base-node` that is not below `device`.
    #[error("Node '{node}' is not a backing image of '{device}'")]
    NotABackingImage {
        /// The base node.
        node: String,
        /// The device.
        device: String,
    },
    /// A filter as `bottom`.
    #[error("Node '{0}' is a filter, use a non-filter node as 'bottom'")]
    BottomIsFilter(String),
    /// `bottom` outside the device's chain.
    #[error("Node '{bottom}' is not in a chain starting from '{device}'")]
    BottomNotInChain {
        /// The bottom node.
        bottom: String,
        /// The device.
        device: String,
    },
    /// `backing-file` when streaming everything.
    #[error("backing file specified, but streaming the entire chain")]
    BackingFileWithoutBase,
    /// A command naming a drive without a medium.
    #[error("Device '{0}' has no medium")]
    NoMedium(String),
    /// A root node, or a node below it, that its driver gave up (QEMU's `bdrv_is_inserted`
    /// failing in `qmp_get_root_bs`).
    #[error("Device has no medium")]
    NotInserted,
    /// A bitmap command naming an unknown node.
    #[error("Node '{0}' not found")]
    BitmapNodeNotFound(String),
    /// `block-dirty-bitmap-merge` with an empty `bitmaps` list.
    #[error("Parameter 'bitmaps' expects a non-empty list of bitmaps to merge")]
    NothingToMerge,
    /// `x-blockdev-change` with both `child` and `node`.
    #[error("The parameters child and node are in conflict")]
    ChildAndNode,
    /// `x-blockdev-change` with neither.
    #[error("Either child or node must be specified")]
    ChildOrNode,
    /// `x-blockdev-change` naming a child the parent does not have.
    #[error("Node '{parent}' does not have child '{child}'")]
    NoSuchChild {
        /// The parent.
        parent: String,
        /// The child's edge name.
        child: String,
    },
    /// `x-blockdev-change` adding a child to a driver that takes no more.
    #[error("The node {0} does not support adding a child")]
    CannotAddChild(String),
    /// `x-blockdev-change` removing a child from a driver that cannot lose one.
    #[error("The node {0} does not support removing a child")]
    CannotRemoveChild(String),
    /// `x-blockdev-set-iothread` of a node a BlockBackend uses, without `force`.
    #[error(
        "Node {0} is associated with a BlockBackend and could be in use (use force=true to \
         override this check)"
    )]
    NodeHasBackend(String),
    /// `x-blockdev-set-iothread` naming no iothread.
    #[error("Cannot find iothread {0}")]
    NoSuchIothread(String),
    /// `blockdev-set-active` of all nodes failing.
    #[error("Failed to inactivate all nodes: {}", os_msg(.0))]
    InactivateAllFailed(io::Error),
    /// `block-commit` of an unknown device (class `DeviceNotFound`, which libvirt probes).
    #[error("Device '{0}' not found")]
    CommitDeviceNotFound(String),
    /// A node-name and a file name for the same end of a commit.
    #[error("'{0}-node' and '{0}' are mutually exclusive")]
    NodeAndFile(&'static str),
    /// A commit end outside the device's chain.
    #[error("'{0}' is not in this backing file chain")]
    NotInThisChain(String),
    /// A commit top given by a file name that nothing in the chain has.
    #[error("Top image file {0} not found")]
    TopNotFound(String),
    /// A commit with nothing below its top.
    #[error("There is no backimg image")]
    NoBackingImage,
    /// A commit of a node into itself.
    #[error("cannot commit an image into itself")]
    CommitIntoItself,
    /// `backing-file` for an active commit.
    #[error("'backing-file' specified, but 'top' {0}")]
    BackingFileForActive(&'static str),
    /// `change-backing-file` on an image without a backing file.
    #[error("not allowing backing file change on an image without a backing file")]
    NoBackingFile,
    /// `change-backing-file` naming a node outside the device's chain.
    #[error("image file not found")]
    ImageNotInChain,
    /// Writing the new backing file name failed.
    #[error("Could not change backing file to '{name}': {}", os_msg(.error))]
    ChangeBackingFile {
        /// The new name.
        name: String,
        /// Why.
        error: io::Error,
    },
    /// An internal snapshot of a read-only node.
    #[error("Device '{0}' is read only")]
    DeviceReadOnly(String),
    /// An internal snapshot of a format without them.
    #[error(
        "Block format '{format}' used by device '{device}' does not support internal snapshots"
    )]
    NoInternalSnapshots {
        /// The node's format.
        format: String,
        /// The device given.
        device: String,
    },
    /// An internal snapshot without a name.
    #[error("Name is empty")]
    SnapshotNameEmpty,
    /// An internal snapshot name already taken.
    #[error("Snapshot with name '{name}' already exists on device '{device}'")]
    SnapshotExists {
        /// The name.
        name: String,
        /// The device given.
        device: String,
    },
    /// Taking an internal snapshot failed.
    #[error("Failed to create snapshot '{name}' on device '{device}': {}", os_msg(.error))]
    SnapshotFailed {
        /// The name.
        name: String,
        /// The device given.
        device: String,
        /// Why.
        error: io::Error,
    },
    /// Deleting an internal snapshot without a name or an ID.
    #[error("Name or id must be provided")]
    NameOrIdRequired,
    /// Looking for an internal snapshot in a format without them.
    #[error("Failed to get a snapshot list: {}", os_msg(.0))]
    SnapshotListFailed(io::Error),
    /// Deleting an internal snapshot of a read-only image (qcow2's words).
    #[error("Failed to remove snapshot from snapshot list: {}", os_msg(.0))]
    SnapshotListRemoveFailed(io::Error),
    /// Deleting an internal snapshot failed.
    #[error("{}", os_msg(.0))]
    SnapshotDeleteFailed(io::Error),
    /// Deleting an internal snapshot that does not exist.
    #[error("Snapshot with id '{id}' and name '{name}' does not exist on device '{device}'")]
    NoSuchSnapshot {
        /// The ID given, or "null".
        id: String,
        /// The name given, or "null".
        name: String,
        /// The device given.
        device: String,
    },
    /// A bitmap that is not on the node.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),
    /// A bitmap another operation holds.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// A bitmap stored in an image opened read-only.
    #[error("Bitmap '{0}' is readonly and cannot be modified")]
    BitmapReadOnly(String),
    /// A bitmap whose contents cannot be trusted.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// `block-dirty-bitmap-add` without a name.
    #[error("Bitmap name cannot be empty")]
    BitmapNameEmpty,
    /// A bitmap granularity that is not a power of two of at least 512.
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    /// A bitmap name over 1023 bytes.
    #[error("Bitmap name too long: {0}")]
    BitmapNameTooLong(String),
    /// A bitmap on a node whose driver gave it up, which has no length.
    #[error("could not get length of device: No medium found")]
    BitmapNodeEjected,
    /// A persistent bitmap on a node that cannot store any.
    #[error("Can't store persistent bitmaps to {0}: Operation not supported")]
    NoPersistentBitmaps(String),
    /// A persistent bitmap on an image that cannot take it.
    #[error("Can't make bitmap '{name}' persistent in '{node}': {why}")]
    CannotPersist {
        /// The bitmap.
        name: String,
        /// The node.
        node: String,
        /// Why.
        why: String,
    },
    /// A bitmap name already taken on the node.
    #[error("Bitmap already exists: {0}")]
    BitmapExists(String),
    /// A merge source that is neither a name nor `{node, name}`.
    #[error("Invalid bitmap reference")]
    InvalidBitmapReference,
    /// Merging bitmaps of different granularity or size.
    #[error("Bitmaps are incompatible and can't be merged")]
    BitmapsIncompatible,
    /// A failure of the block core.
    #[error(transparent)]
    Block(#[from] ferrite_block::Error),
    /// A failure of a job's setup.
    #[error(transparent)]
    Job(#[from] ferrite_jobs::Error),
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::Block(b) => b.into(),
            Error::Job(j) => j.into(),
            Error::CommitDeviceNotFound(_) => {
                ferrite_qapi::Error::new(ErrorClass::DeviceNotFound, e.to_string())
            }
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a block command.
pub type Result<T, E = Error> = std::result::Result<T, E>;
