//! The QOM layer's errors, in QEMU's words (observed on qemu-storage-daemon 10.0.2); the
//! QMP edge and the command line turn them into `ferrite_qapi::Error`.

use ferrite_qapi::{ErrorClass, os_msg};
use std::io;

/// A refused object operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An object ID that is not an identifier (with QEMU's hint).
    #[error("Parameter 'id' expects an identifier")]
    InvalidId,
    /// An object ID already taken.
    #[error("attempt to add duplicate property '{0}' to object (type 'container')")]
    DuplicateId(String),
    /// A second `main-loop` object.
    #[error("only one main-loop instance allowed")]
    SecondMainLoop,
    /// A type the schema has and no object of which can be made here: a machine's
    /// (`memory-backend-ram`), or `authz-listfile` (QEMU's QOM calls it `authz-list-file`).
    #[error("invalid object type: {0}")]
    NoSuchType(String),
    /// TLS credentials that do not load (`ferrite-tls` words them as QEMU does).
    #[error("{0}")]
    Tls(String),
    /// A secret looked up by id that is not there or not usable (QEMU's texts).
    #[error("{0}")]
    SecretLookup(String),
    /// `object-del` of an unknown object.
    #[error("object '{0}' not found")]
    ObjectNotFound(String),
    /// `object-del` of an object something uses.
    #[error("object '{0}' is in use, can not be deleted")]
    InUse(String),
    /// A property an object does not have.
    #[error("Property '{0}' not found")]
    PropertyNotFound(String),
    /// A property of a type that does not have it (`qom-get`, `qom-set`).
    #[error("Property '{ty}.{name}' not found")]
    TypedPropertyNotFound {
        /// The object's type.
        ty: String,
        /// The property.
        name: String,
    },
    /// A property that can only be set at creation.
    #[error("Property cannot be set after initialization")]
    SetAfterInit,
    /// A negative event loop parameter.
    #[error("{0} value must be in range [0, 9223372036854775807]")]
    NegativeParam(String),
    /// Thread pool bounds that do not make a pool.
    #[error("bad thread-pool-min/thread-pool-max values")]
    ThreadPoolBounds,
    /// An encrypted secret's key (`keyid`) that is not an AES-256 key.
    #[error("Key should be 32 bytes in length")]
    SecretKeyLength,
    /// An encrypted secret without its IV.
    #[error("IV is required to decrypt secret")]
    SecretIvMissing,
    /// An IV of another length than a block.
    #[error("IV should be 16 bytes in length not {0}")]
    SecretIvLength(usize),
    /// Encrypted data that is not whole blocks.
    #[error("Length {0} must be a multiple of block size 16")]
    CipherLength(usize),
    /// Encrypted data of no blocks at all (QEMU reads out of bounds there).
    #[error("Encrypted secret data is empty: there is not even its padding")]
    SecretCiphertextEmpty,
    /// Decrypted data whose last byte is not a padding length.
    #[error("Incorrect number of padding bytes ({0}) found on decrypted data")]
    SecretPadding(u8),
    /// A `secret_keyring` of serial 0.
    #[error("'serial' should not be equal to 0")]
    KeyringSerialZero,
    /// A key the keyrings do not give.
    #[error("Unable to read serial key {serial:08x}: {reason}")]
    KeyringRead {
        /// The key's serial number.
        serial: i32,
        /// Why, as strerror words it.
        reason: String,
    },
    /// A secret with both `file` and `data`.
    #[error("'file' and 'data' are mutually exclusive")]
    SecretFileAndData,
    /// A secret with neither.
    #[error("Either 'file' or 'data' must be provided")]
    SecretNoData,
    /// A secret file that cannot be read (glib's text, curly quotes included).
    #[error("Unable to read {path}: Failed to open file \u{201c}{path}\u{201d}: {}", os_msg(.error))]
    SecretFile {
        /// The file.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// Bad base64 in a secret.
    #[error("Base64 data contains invalid characters")]
    Base64,
    /// Base64 from a file with NUL bytes in it.
    #[error("Base64 data contains embedded NUL characters")]
    Base64Nul,
    /// A negative `x-` limit of a throttle group.
    #[error("Property values cannot be negative")]
    NegativeThrottleProperty,
    /// A burst length past C's `unsigned int` (QEMU's text, its missing space included).
    #[error("{0} value must be in therange [0, 4294967295]")]
    BurstLengthRange(String),
    /// The same in a `limits` property (QEMU's text there has the space).
    #[error("{0} value must be in the range [0, 4294967295]")]
    LimitsBurstLengthRange(String),
    /// Total and read/write throttle limits together.
    #[error("bps/iops/max total values and read/write values cannot be used at the same time")]
    ThrottleTotalAndRw,
    /// `iops-size` without an iops limit.
    #[error("iops size requires an iops value to be set")]
    IopsSizeWithoutIops,
    /// A throttle limit out of range.
    #[error("bps/iops/max values must be within [0, {0}]")]
    ThrottleRange(i64),
    /// A throttle burst length of 0.
    #[error("the burst length cannot be 0")]
    BurstLengthZero,
    /// A burst length without a burst rate.
    #[error("burst length set without burst rate")]
    BurstLengthWithoutRate,
    /// A burst too long for its rate.
    #[error("burst length too high for this burst rate")]
    BurstLengthTooHigh,
    /// A burst rate without a base rate.
    #[error("bps_max/iops_max require corresponding bps/iops values")]
    MaxWithoutRate,
    /// A burst rate below the base rate.
    #[error("bps_max/iops_max cannot be lower than bps/iops")]
    MaxBelowRate,
    /// A QOM path that finds nothing (class `DeviceNotFound`).
    #[error("Device '{0}' not found")]
    PathNotFound(String),
    /// A partial QOM path that finds more than one object (`qom-list`; the other commands
    /// say they found none).
    #[error("Path '{0}' is ambiguous")]
    AmbiguousPath(String),
    /// A property that cannot be written (`type`, a child).
    #[error("Property '{ty}.{name}' is not writable")]
    ReadOnlyProperty {
        /// The object's type.
        ty: String,
        /// The property.
        name: String,
    },
    /// A property that can only be written (a `thread-context`'s `node-affinity`).
    #[error("Property '{ty}.{name}' is not readable")]
    WriteOnlyProperty {
        /// The object's type.
        ty: String,
        /// The property.
        name: String,
    },
    /// A `thread-context` given both a CPU and a node affinity while it is made.
    #[error("Mixing CPU and node affinity not supported")]
    MixedAffinity,
    /// A `thread-context`'s empty `cpu-affinity`.
    #[error("CPU list is empty")]
    EmptyCpuList,
    /// A `thread-context`'s empty `node-affinity`.
    #[error("Node list is empty")]
    EmptyNodeList,
    /// A `node-affinity` of nodes without CPUs (or that do not exist).
    #[error("The nodes select no CPUs")]
    NodesSelectNoCpus,
    /// The kernel refusing an affinity (CPUs that are not there).
    #[error("Setting CPU affinity failed: {}", os_msg(.0))]
    SetAffinity(io::Error),
    /// The kernel not telling a thread's affinity.
    #[error("Getting CPU affinity failed: {}", os_msg(.0))]
    GetAffinity(io::Error),
    /// A `thread-context`'s thread that did not start.
    #[error("Failed to create thread: {}", os_msg(.0))]
    ThreadStart(io::Error),
    /// A `pr-manager-helper` that cannot reach its helper.
    #[error("{0}")]
    PrHelper(String),
    /// `qom-list-properties` of an unknown type (class `DeviceNotFound`).
    #[error("Class '{0}' not found")]
    ClassNotFound(String),
    /// An unknown type where one is needed.
    #[error("unknown type")]
    UnknownType,
    /// An argument error from the QAPI layer.
    #[error(transparent)]
    Qapi(#[from] ferrite_qapi::Error),
}

impl From<Error> for ferrite_qapi::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Qapi(q) => q,
            Error::InvalidId => ferrite_qapi::Error::new(ErrorClass::GenericError, e.to_string())
                .with_hint(
                    "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.",
                ),
            Error::PathNotFound(_) | Error::ClassNotFound(_) => {
                ferrite_qapi::Error::new(ErrorClass::DeviceNotFound, e.to_string())
            }
            other => ferrite_qapi::Error::new(ErrorClass::GenericError, other.to_string()),
        }
    }
}

/// The result of a QOM operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;
