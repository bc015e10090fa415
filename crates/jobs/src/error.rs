//! The jobs' errors, in QEMU's words (observed on qemu-storage-daemon 10.0.2); the QMP edge
//! turns them into `ferrite_qapi::Error` with their class.

use ferrite_qapi::ErrorClass;

/// A refused job command or job setup.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `job-*` naming no job.
    #[error("Job not found")]
    JobNotFound,
    /// `block-job-*` naming no block job (class `DeviceNotActive`).
    #[error("Block job '{0}' not found")]
    BlockJobNotFound(String),
    /// A job ID that breaks QEMU's identifier rule.
    #[error("Invalid job ID '{0}'")]
    InvalidJobId(String),
    /// A job ID already taken.
    #[error("Job ID '{0}' already in use")]
    JobIdInUse(String),
    /// A verb the job's state does not accept.
    #[error("Job '{id}' in state '{state}' cannot accept command verb '{verb}'")]
    VerbRefused {
        /// The job.
        id: String,
        /// Its state.
        state: &'static str,
        /// The verb.
        verb: &'static str,
    },
    /// `block-job-cancel` without `force` of a job the user paused.
    #[error("The block job for device '{0}' is currently paused")]
    PausedByUser(String),
    /// A negative `speed` for `block-job-set-speed`.
    #[error("Parameter 'speed' expects a non-negative value")]
    NegativeSpeed,
    /// Pausing a job the user already paused.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// Resuming a job the user did not pause.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `job-complete` of a job without a completion step (or being cancelled).
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// `block-job-change` of a job without options to change.
    #[error("Job type does not support change")]
    ChangeUnsupported,
    /// Backup's `x-perf` `max-workers` out of range.
    #[error("max-workers must be between 1 and 2147483647")]
    MaxWorkers,
    /// Backup's `x-perf` `max-chunk` negative.
    #[error("max-chunk must be zero (which means no limit) or positive")]
    MaxChunk,
    /// Backup's `x-perf` `min-cluster-size` beyond a signed 64-bit number.
    #[error("min-cluster-size too large: {0} > 9223372036854775807")]
    MinClusterTooLarge(u64),
    /// A backup of a node to itself.
    #[error("Source and target cannot be the same")]
    SameSourceAndTarget,
    /// A backup's source or target that its driver gave up (its device name, empty for
    /// a plain node).
    #[error("Device is not inserted: {0}")]
    NotInserted(String),
    /// `drive-backup` of a node whose driver gave it up.
    #[error("Device has no medium")]
    NoMedium,
    /// `compress` asked of a backup whose target cannot store compressed clusters (its
    /// device name, empty for a plain node).
    #[error("Compression is not supported for this drive {0}")]
    CannotCompress(String),
    /// A backup between nodes of different sizes.
    #[error("Source and target image have different sizes")]
    DifferentSizes,
    /// Backup's `max-chunk` below the copy granularity.
    #[error("Required max-chunk ({max_chunk}) is less than backup cluster size ({cluster})")]
    MaxChunkBelowCluster {
        /// The `max-chunk` asked for.
        max_chunk: u64,
        /// The copy granularity.
        cluster: u64,
    },
    /// A job's filter came out without its children (a bug).
    #[error("The job's filter lost its children")]
    FilterLostChildren,
    /// `sync: incremental` or `bitmap` without a bitmap.
    #[error("must provide a valid bitmap name for '{0}' sync mode")]
    BitmapRequired(&'static str),
    /// `sync: incremental` with another bitmap mode than on-success.
    #[error("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'")]
    IncrementalMode,
    /// A bitmap that is not on the source.
    #[error("Bitmap '{0}' could not be found")]
    BitmapNotFound(String),
    /// A bitmap without a bitmap mode.
    #[error("Bitmap sync mode must be given when providing a bitmap")]
    BitmapModeRequired,
    /// A bitmap another operation holds.
    #[error("Bitmap '{0}' is currently in use by another operation and cannot be used")]
    BitmapBusy(String),
    /// A bitmap whose contents cannot be trusted.
    #[error("Bitmap '{0}' is inconsistent and cannot be used")]
    BitmapInconsistent(String),
    /// A bitmap with `sync: none`.
    #[error("sync mode 'none' does not produce meaningful bitmap outputs")]
    BitmapWithSyncNone,
    /// `bitmap-mode: never` with another sync mode than bitmap.
    #[error("Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{0}'")]
    NeverWithoutBitmapSync(&'static str),
    /// A bitmap mode without a bitmap.
    #[error("Cannot specify bitmap sync mode without a bitmap")]
    BitmapModeWithoutBitmap,
    /// Mirror with a sync mode it does not have (`incremental`, `bitmap`).
    #[error("Sync mode '{0}' not supported")]
    SyncModeNotSupported(&'static str),
    /// A mirror granularity out of range.
    #[error("Parameter 'granularity' expects a value in range [512B, 64MB]")]
    GranularityRange,
    /// A mirror granularity that is not a power of two.
    #[error("Parameter 'granularity' expects a power of 2")]
    GranularityPowerOfTwo,
    /// A negative mirror `buf-size`.
    #[error("Invalid parameter 'buf-size'")]
    InvalidBufSize,
    /// A mirror of a node to itself (through filters).
    #[error("Can't mirror node into itself")]
    MirrorIntoItself,
    /// A mirror target that is a filter above a node of the source's chain.
    #[error("Cannot mirror to a filter on top of a node in the source's backing chain")]
    MirrorToFilterInChain,
    /// `replaces` naming no node.
    #[error("Failed to find node with node-name='{0}'")]
    ReplaceNotFound(String),
    /// `replaces` naming a node the mirror cannot stand in for.
    #[error(
        "Cannot replace '{node}' by a node mirrored from '{source_node}', because it cannot be \
         guaranteed that doing so would not lead to an abrupt change of visible data"
    )]
    CannotReplace {
        /// The node to replace.
        node: String,
        /// The mirror's source.
        source_node: String,
    },
    /// `replaces` naming a node of another size.
    #[error("cannot replace image with a mirror image of different size")]
    ReplaceDifferentSize,
    /// At completion, `replaces` names a node that went away.
    #[error("Node name '{0}' not found")]
    ReplacedNodeGone(String),
    /// `block-job-change` to a copy mode that cannot be switched to.
    #[error("Change to copy mode '{0}' is not implemented")]
    CopyModeChange(&'static str),
    /// A new image of a format ferrite does not know.
    #[error("Unknown file format '{0}'")]
    UnknownFileFormat(String),
    /// A new target of a format without backing files, to be backed by the source.
    #[error("Backing file not supported for file format '{0}'")]
    BackingUnsupported(String),
    /// A new image over the very file its backing file is (QEMU's text, "Error: " and all).
    #[error("Error: Trying to create an image with the same filename as the backing file")]
    BackingIsTheImage,
    /// A new image of a format that cannot be created.
    #[error("Format driver '{0}' does not support image creation")]
    CannotCreateFormat(String),
    /// A commit whose top and base are one node (through filters).
    #[error("Invalid files for merge: top and base are the same")]
    SameTopAndBase,
    /// A stream base that is not below the node.
    #[error("'{base}' is not in the backing chain of '{top}'")]
    NotInBackingChain {
        /// The base.
        base: String,
        /// The node streamed into.
        top: String,
    },
    /// drive-mirror `replaces` without `node-name`.
    #[error("a node-name must be provided when replacing a named node of the graph")]
    ReplacesWithoutNodeName,
    /// A failure of the block core.
    #[error(transparent)]
    Block(#[from] ferrite_block::Error),
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::Block(b) => b.into(),
            Error::BlockJobNotFound(_) => {
                ferrite_qapi::Error::new(ErrorClass::DeviceNotActive, e.to_string())
            }
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a job operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
