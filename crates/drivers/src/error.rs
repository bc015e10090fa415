//! The drivers' errors, in QEMU's words; they reach the core as
//! [`ferrite_block::Error::Driver`].

use ferrite_qapi::os_msg;
use std::io;

/// An error in QEMU's words that needs no variant of its own.
pub(crate) fn generic(text: impl Into<String>) -> ferrite_block::Error {
    ferrite_qapi::Error::generic(text).into()
}

/// Refuses the first of the size options `keys` given a negative number, in the order QEMU
/// reads a node's options (its `QemuOpts` size type takes no sign).
pub(crate) fn refuse_negative_sizes(opts: &ferrite_qapi::Args, keys: &[&str]) -> Result<(), Error> {
    match opts.as_dict().iter_qemu_order().find_map(|(k, v)| {
        let n = v.as_i64().filter(|n| *n < 0 && keys.contains(&k))?;
        Some((k, n))
    }) {
        Some((name, value)) => Err(Error::NegativeSizeOption {
            value,
            name: name.to_owned(),
        }),
        None => Ok(()),
    }
}

/// A failure of one of this crate's drivers.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A file that cannot be opened.
    #[error("Could not open '{path}': {}", os_msg(.error))]
    Open {
        /// The file name.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// A descriptor set (`/dev/fdset/N`) that cannot give the file, in QEMU's words.
    #[error("{0}")]
    Fdset(String),
    /// `file` on something that is not a regular file.
    #[error("'{driver}' driver requires '{path}' to be a regular file")]
    NotARegularFile {
        /// The driver.
        driver: &'static str,
        /// The file name.
        path: String,
    },
    /// `host_device` on something that is not a device.
    #[error("'{driver}' driver requires '{path}' to be either a character or block device")]
    NotADevice {
        /// The driver.
        driver: &'static str,
        /// The file name.
        path: String,
    },
    /// A `compress` filter over a format that cannot store compressed clusters.
    #[error("Compression is not supported for underlying format: {0}")]
    CannotCompress(String),
    /// A throttle filter naming a group that does not exist.
    #[error("Throttle group '{0}' does not exist")]
    NoThrottleGroup(String),
    /// A copy-on-read `bottom` that names no node.
    #[error("Bottom node '{0}' not found")]
    BottomNotFound(String),
    /// A copy-on-read `bottom` that is a filter.
    #[error("Bottom node '{0}' is a filter")]
    BottomIsFilter(String),
    /// A `pr-manager` (persistent reservations of SCSI devices) that is no object.
    #[error("No persistent reservation manager with id '{0}'")]
    NoPrManager(String),
    /// A `pr-manager` naming an object of another type.
    #[error("Object with id '{0}' is not a persistent reservation manager")]
    NotPrManager(String),
    /// `aio=native` needs O_DIRECT.
    #[error("aio=native was specified, but it requires cache.direct=on, which was not specified.")]
    NativeAioWithoutDirect,
    /// Another process holds a lock the node needs (QEMU's image locking).
    #[error("Failed to get {what}\"{perm}\" lock")]
    Lock {
        /// `""` for a permission the node takes, `"shared "` for one it shares.
        what: &'static str,
        /// The permission's name.
        perm: &'static str,
        /// The image file.
        path: String,
    },
    /// Setting a lock byte failed.
    #[error("Failed to lock byte {byte}: {error}")]
    LockByte {
        /// The byte offset.
        byte: i64,
        /// Why.
        error: io::Error,
    },
    /// `blockdev-create` of a file with an `extent-size-hint` beyond 32 bits.
    #[error("Extent size hint is too large")]
    ExtentSizeHintTooLarge,
    /// A preallocation mode the file driver does not have.
    #[error("Unsupported preallocation mode: {0}")]
    UnsupportedPreallocation(String),
    /// Creating the file failed.
    #[error("Could not create '{path}': {}", os_msg(.error))]
    Create {
        /// The file name.
        path: String,
        /// Why.
        error: io::Error,
    },
    /// A preallocated file asked to be shorter than it is.
    #[error("Cannot use preallocation for shrinking files")]
    PreallocateShrinking,
    /// Allocating the new file's length (`falloc`) failed.
    #[error("Could not preallocate new data: {}", os_msg(.0))]
    Preallocate(io::Error),
    /// Writing the new file's zeroes (`full`) failed.
    #[error("Could not write zeros for preallocation: {}", os_msg(.0))]
    WriteZeros(io::Error),
    /// Flushing the new file's zeroes failed.
    #[error("Could not flush file to disk: {}", os_msg(.0))]
    FlushFile(io::Error),
    /// Cutting a file whose preallocation failed back to its old length failed too.
    #[error("Failed to restore old file length: {}", os_msg(.0))]
    RestoreLength(io::Error),
    /// Sizing the new file failed.
    #[error("Could not resize file: {}", os_msg(.0))]
    ResizeFile(io::Error),
    /// `null-co` with a negative size.
    #[error("size must be non-negative")]
    NegativeNullSize,
    /// A `null-co` or `null-aio` node opened by a file name other than its own.
    #[error("The only allowed filename for this driver is '{0}'")]
    NullFilename(String),
    /// `null-co` with a negative latency.
    #[error("latency-ns is invalid")]
    InvalidLatency,
    /// A size option given a negative number (QEMU's `parse_option_size`).
    #[error("Value '{value}' is out of range for parameter '{name}'")]
    NegativeSizeOption {
        /// The number given.
        value: i64,
        /// The option.
        name: String,
    },
    /// A `raw` window starting past the end of its file.
    #[error("Offset ({offset}) cannot be greater than size of the containing file ({file_len})")]
    OffsetPastEnd {
        /// The window's offset.
        offset: u64,
        /// The file's size.
        file_len: u64,
    },
    /// A `raw` window reaching past the end of its file (QEMU's text, double space and all).
    #[error(
        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_len})"
    )]
    WindowPastEnd {
        /// The window's offset.
        offset: u64,
        /// The window's size.
        size: u64,
        /// The file's size.
        file_len: u64,
    },
    /// A `raw` window whose size is not whole sectors (the node's length would round up
    /// past it).
    #[error("Specified size is not multiple of 512")]
    UnalignedWindow,
    /// A node named by the filter's `bitmap` that does not exist.
    #[error("Node '{0}' not found")]
    BitmapNodeNotFound(String),
    /// A bitmap named by the filter's `bitmap` that does not exist.
    #[error("Dirty bitmap '{0}' not found")]
    BitmapNotFound(String),
    /// The filter's `bitmap` covers another size than its source.
    #[error(
        "Cannot create block-copy-state: Failed to merge bitmap '{name}' to internal copy-bitmap: Bitmaps are of different sizes (destination size is {len}, source size is {bitmap_len}) and can't be merged"
    )]
    BitmapSize {
        /// The bitmap's name.
        name: String,
        /// The source's size.
        len: u64,
        /// The bitmap's size.
        bitmap_len: u64,
    },
}

impl From<Error> for ferrite_block::Error {
    fn from(e: Error) -> Self {
        match &e {
            Error::Lock { path, .. } => {
                let hint = format!("Is another process using the image [{path}]?");
                ferrite_block::Error::driver_with_hint(e, hint)
            }
            _ => ferrite_block::Error::driver(e),
        }
    }
}
