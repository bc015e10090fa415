//! The qcow2 driver's errors, in QEMU's words; they reach the core as
//! [`ferrite_block::Error::Driver`].

use ferrite_qapi::os_msg;
use std::io;

/// Why an image's header is refused (QEMU: `qcow2_do_open`'s checks).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("Image is not in qcow2 format")]
    NotQcow2,
    #[error("Unsupported qcow2 version {0}")]
    Version(u32),
    #[error("Unsupported cluster size: 2^{0}")]
    ClusterBits(u32),
    #[error("qcow2 header too short")]
    TooShort,
    #[error("qcow2 header exceeds cluster size")]
    TooLong,
    #[error("Invalid backing file offset")]
    BackingOffset,
    #[error("Unsupported qcow2 feature(s): {0}")]
    UnknownFeatures(String),
    #[error("qcow2: Image is corrupt; cannot be opened read/write")]
    Corrupt,
    #[error("Unsupported subcluster size: {0}")]
    SubclusterSize(u64),
    #[error("Reference count entry width too large; may not exceed 64 bits")]
    RefcountWidth,
    #[error("qcow2: Compression type incompatible feature bit must not be set")]
    CompressionBitSet,
    #[error("qcow2: Compression type incompatible feature bit must be set")]
    CompressionBitUnset,
    #[error("qcow2: unknown compression type: {0}")]
    CompressionType(u8),
    #[error("Reference count table too large")]
    ReftableTooLarge,
    #[error("Image does not contain a reference count table")]
    NoReftable,
    #[error("Reference count table offset invalid")]
    ReftableOffset,
    #[error("Snapshot table too large")]
    SnapshotTableTooLarge,
    #[error("Snapshot table offset invalid")]
    SnapshotTableOffset,
    #[error("Active L1 table too large")]
    L1TooLarge,
    #[error("Active L1 table offset invalid")]
    L1Offset,
    #[error("Image is too big")]
    TooBig,
    #[error("L1 table is too small")]
    L1TooSmall,
    #[error("Backing file name too long")]
    BackingNameTooLong,
    #[error("Header extension too large")]
    ExtensionTooLarge,
    #[error("CRYPTO header extension only expected with LUKS encryption method")]
    CryptoUnexpected,
    #[error(transparent)]
    Bitmaps(#[from] crate::format::bitmap_dir::BitmapError),
    #[error("ERROR: ext_backing_format: len={0} too large (>=16)")]
    BackingFormatTooLong(usize),
    #[error("Cannot fit the header and its extensions in one cluster")]
    DoesNotFit,
}

/// A failure of the qcow2 driver.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The header is refused.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Reading the header failed.
    #[error("Could not read qcow2 header: {}", os_msg(.0))]
    ReadHeader(io::Error),
    /// Writing a new image's header failed.
    #[error("Could not write qcow2 header: {}", os_msg(.0))]
    WriteHeader(io::Error),
    #[error(transparent)]
    Snapshots(crate::format::snapshot_table::TableError),
    #[error("Could not repair dirty image: {}", os_msg(.0))]
    RepairDirty(io::Error),
    #[error("Can't update bitmap directory: {}", os_msg(.0))]
    UpdateBitmapDirectory(io::Error),
    #[error("Could not update qcow2 header: {}", os_msg(.0))]
    UpdateHeader(io::Error),
    #[error(
        "Encrypted qcow2 images with AES encryption, extended L2 entries or an external data \
         file are not supported by ferrite"
    )]
    EncryptedLayout,
    #[error("Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators")]
    AesInEmulator,
    #[error("Parameter 'encrypt.key-secret' is required for cipher")]
    KeySecretRequired,
    #[error("Unsupported encryption method {0}")]
    EncryptionMethod(i32),
    #[error("No encryption in image header, but options specified format '{0}'")]
    EncryptionNotInHeader(String),
    #[error("Header reported '{header}' encryption format but options specify '{given}'")]
    EncryptionFormatMismatch { header: &'static str, given: String },
    #[error("Missing CRYPTO header for crypt method {0}")]
    MissingCryptoHeader(u32),
    #[error("data-file-raw requires a data file")]
    DataFileRawWithout,
    #[error("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")]
    LazyRefcountsV2,
    #[error(transparent)]
    LoadBitmaps(#[from] crate::format::bitmap_dir::BitmapError),
    #[error("Cache clean interval too big")]
    CleanInterval,
    #[error("Value '{value}' is out of range for parameter '{name}'")]
    OutOfRange { value: i64, name: String },
    #[error("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")]
    CacheSizes,
    #[error("l2-cache-size may not exceed cache-size")]
    L2CacheTooBig,
    #[error("refcount-cache-size may not exceed cache-size")]
    RefcountCacheTooBig,
    #[error("L2 cache entry size must be a power of two between 512 and the cluster size ({0})")]
    L2CacheEntrySize(u64),
    #[error("image is not encrypted, can't amend")]
    AmendUnencrypted,
    #[error("'data-file' can only be set for images with an external data file")]
    DataFileNotExpected,
    #[error("'data-file' is required for this image")]
    DataFileRequired,
    #[error("Could not resize image: {}", os_msg(.0))]
    ResizeImage(io::Error),
    /// A new length refused, in QEMU's words.
    #[error("Could not resize image: {0}")]
    ResizeRefused(String),
    #[error("Could not flush: {}", os_msg(.0))]
    Flush(io::Error),
    /// `blockdev-create` option checks.
    #[error(transparent)]
    Create(#[from] CreateError),
}

/// Why `blockdev-create` refuses qcow2 options (QEMU: `qcow2_co_create`'s checks).
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error("Image size must be a multiple of 512 bytes")]
    Size,
    #[error("Cluster size must be a power of two between 512 and 2048k")]
    ClusterSize,
    #[error(
        "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    ExtendedL2V2,
    #[error("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")]
    ExtendedL2ClusterSize,
    #[error(
        "{0} only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    V3Only(&'static str),
    #[error("Refcount width must be a power of two and may not exceed 64 bits")]
    RefcountWidth,
    #[error(
        "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)"
    )]
    RefcountWidthV2,
    #[error("Backing format cannot be used without backing file")]
    BackingFormatWithoutFile,
    #[error(
        "Backing file and preallocation can only be used at the same time if extended_l2 is on"
    )]
    BackingAndPreallocation,
    #[error(
        "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    CompressionV2,
    #[error("Creating qcow2 images with AES encryption is not supported by ferrite")]
    Encrypted,
    #[error("data-file-raw requires data-file")]
    DataFileRawWithoutFile,
    #[error(
        "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
    )]
    DataFileV2,
    #[error("Invalid node reference")]
    NodeReference,
}

impl From<Error> for ferrite_block::Error {
    fn from(e: Error) -> Self {
        ferrite_block::Error::driver(e)
    }
}

impl From<HeaderError> for ferrite_block::Error {
    fn from(e: HeaderError) -> Self {
        ferrite_block::Error::driver(Error::Header(e))
    }
}

impl From<CreateError> for ferrite_block::Error {
    fn from(e: CreateError) -> Self {
        ferrite_block::Error::driver(Error::Create(e))
    }
}
