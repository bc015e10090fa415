//! `qcow2`: QEMU's copy-on-write image format (docs/interop/qcow2.txt), as a library of
//! on-disk structures and as a block driver registered with the core.
//!
//! The crate splits by concern:
//! - `format/`: the on-disk structures, each with one size-capped parser that opening,
//!   repair and the request paths all use (header and extensions, L1/L2 entries, the
//!   snapshot table, the bitmap directory);
//! - `meta/`: the metadata of an open image under one lock: L1/L2 tables, refcounts and
//!   allocation, write-back order, overlap checks; with `cache` (tables in memory) and
//!   `map` (guest offset to host offset);
//! - the request paths: `read`, `write` (and copy-on-write), `zero` (and discard),
//!   `compress` (codecs and compressed writes), `lifecycle` (resize, close), `data_file`
//!   (what changes when data clusters live in an external data file);
//! - `open` (options and loading), `factory` (the node's children, create, amend, probe),
//!   `driver` (the driver interface), `info` (what queries show);
//! - `snapshot` (internal snapshots), `bitmaps` (persistent bitmaps), `repair` (after an
//!   unclean shutdown with lazy refcounts), `create` and `new_image` (`blockdev-create`),
//!   `claims` (requests serialised per guest cluster);
//! - `qcow1`: the `qcow` driver, version 1 of the format, sharing the codecs.

mod amend;
mod bitmaps;
mod cache;
mod claims;
mod compress;
mod create;
mod data_file;
mod driver;
mod error;
mod factory;
mod format;
mod info;
mod lifecycle;
mod map;
mod meta;
mod new_image;
mod open;
mod qcow1;
mod read;
mod repair;
mod snapshot;
pub mod testing;
mod write;
mod zero;

use claims::Claims;
use compress::Codec;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::bitmap::DirtyBitmap;
use format::header::incompat;
use meta::{Corruption, Meta};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Registers the `qcow2` driver.
pub fn register(registry: &ferrite_block::Registry) {
    registry.register(Rc::new(factory::Qcow2Factory));
    registry.register(Rc::new(qcow1::QcowFactory));
}

/// Called when corruption is found: the node, what, and whether it is fatal (the image was
/// writable and is now marked corrupt).
pub(crate) type CorruptionHook = Rc<dyn Fn(&Node, &Corruption, bool)>;

/// Frees waiting for a write-back before one is forced.
const MAX_PENDING_FREES: usize = 4096;

fn enotsup() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTSUP)
}

/// An open qcow2 image.
///
/// # Invariants
/// - `meta` is the only way to the image's metadata; requests take its lock for their
///   metadata steps and never hold it across their data I/O.
/// - Once `dead` is set (corruption found while writable), every request fails.
pub(crate) struct Qcow2Driver {
    meta: tokio::sync::Mutex<Meta>,
    claims: Claims,
    size: Cell<u64>,
    cluster_bits: u32,
    extended: bool,
    version: u32,
    codec: Codec,
    read_only: Cell<bool>,
    /// Corruption was signalled; every request fails from now on when it was fatal.
    dead: Cell<bool>,
    /// Corruption was reported: later non-fatal findings are not (QEMU's
    /// `signaled_corruption`).
    signaled: Cell<bool>,
    lazy_refcounts: bool,
    discard_no_unref: bool,
    /// The dirty bit is set on disk (lazy refcounts after the first write).
    dirty_set: Cell<bool>,
    backing: RefCell<Option<(String, Option<String>)>>,
    on_corruption: CorruptionHook,
    /// The internal snapshots (for queries; the table on disk is the truth).
    snapshots: RefCell<Vec<crate::format::snapshot_table::Snapshot>>,
    /// Cached tables unused for this long are dropped (`cache-clean-interval`; zero: never).
    clean_interval: Duration,
    last_clean: Cell<Instant>,
    /// The image keeps its data in an external file (the `data-file` child).
    data_file: Option<DataFile>,
    /// Data-file clusters given back, waiting to be discarded there.
    data_discards: RefCell<Vec<u64>>,
    /// Persistent bitmaps read at open, for the node to take.
    loaded: RefCell<Vec<Rc<DirtyBitmap>>>,
    /// The LUKS volume of an encrypted image: data clusters hold each 512-byte sector
    /// encrypted with its sector number in the file (QEMU's physical offsets).
    crypto: Option<Rc<ferrite_crypto::LuksVolume>>,
    /// The `secret` the image was unlocked with (`encrypt.key-secret`).
    key_secret: Option<String>,
}

/// What the header says about an external data file.
#[derive(Clone)]
pub(crate) struct DataFile {
    /// The file name the header records, if any.
    pub(crate) name: Option<String>,
    /// The data file is also a valid raw image (`data-file-raw`).
    pub(crate) raw: bool,
}

impl Qcow2Driver {
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn file(node: &Node) -> io::Result<Rc<Child>> {
        node.edge("file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    /// Where the VM state area starts in the guest's address space: at the first L1 entry
    /// past the disk (QEMU's `qcow2_vm_state_offset`), so that it moves with no resize
    /// that keeps the L1 table's size.
    fn vm_state_offset(&self) -> u64 {
        let entry_bytes = if self.extended { 16 } else { 8 };
        let per_l1 = self.cs() * (self.cs() / entry_bytes);
        self.size.get().div_ceil(per_l1) * per_l1
    }

    /// The guest offset of `len` bytes at `pos` of the VM state area.
    fn vm_state_at(&self, pos: u64, len: usize) -> io::Result<u64> {
        self.vm_state_offset()
            .checked_add(pos)
            .filter(|at| {
                at.checked_add(len as u64)
                    .is_some_and(|end| end <= i64::MAX as u64)
            })
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }

    /// Internal snapshots keep the image's L1 tables, which do not reach an external data
    /// file: QEMU refuses them there.
    fn no_data_file(&self) -> io::Result<()> {
        if self.data_file.is_some() {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        Ok(())
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead.get() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEDIUM));
        }
        Ok(())
    }

    /// Reports corruption found during a request (once), and for a writable image marks
    /// it corrupt on disk and stops all further requests, as QEMU does.
    async fn signal_corruption(&self, node: &Node, file: &Child, meta: &mut Meta) {
        let Some(c) = meta.corrupt.clone() else {
            return;
        };
        if self.dead.get() || meta.h.incompatible & incompat::CORRUPT != 0 {
            return;
        }
        // An inactive image is as good as read-only: nothing is marked on it.
        let fatal = !self.read_only.get() && node.is_active();
        if self.signaled.get() && !fatal {
            meta.corrupt = None;
            return;
        }
        self.signaled.set(true);
        if fatal {
            meta.h.incompatible |= incompat::CORRUPT;
            let _ = meta.write_header(file).await;
            let _ = file.flush().await;
            self.dead.set(true);
        } else {
            // Read-only: the image stays usable, the next finding is looked at again.
            meta.corrupt = None;
        }
        (self.on_corruption)(node, &c, fatal);
    }

    async fn check<T>(&self, node: &Node, file: &Child, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            let mut m = self.meta.lock().await;
            if m.corrupt.is_some() {
                self.signal_corruption(node, file, &mut m).await;
            }
        }
        r
    }
}
