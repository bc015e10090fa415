//! The driver interface: what a node's driver does for reads, writes and the rest.

use crate::child::Child;
use crate::node::Node;
use crate::perm::Perm;
use ferrite_qobject::QDict;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;

/// A boxed future borrowing the driver and its node.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

/// Checks that each named option given in `opts` is one the node was opened with (`was`),
/// with the same value: as QEMU compares the options a driver does not handle on reopen, an
/// option given now that was not given then has changed, even to its default (one left
/// out now is the reset check's business, before this).
///
/// # Errors
/// "Cannot change the option 'x'" for the first that changed.
pub fn check_unchanged(
    opts: &ferrite_qapi::Args,
    was: &ferrite_qapi::Args,
    names: &[&str],
) -> crate::Result<()> {
    for name in names {
        if let Some(now) = opts.get(name)
            && was.get(name) != Some(now)
        {
            return Err(crate::Error::CannotChange((*name).to_owned()));
        }
    }
    Ok(())
}

/// How a resize fills the part it adds (QEMU's `PreallocMode`, as far as resizes here
/// take one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing allocated: the new part is a hole.
    Off,
    /// The new part allocated in the file system (`fallocate`).
    Falloc,
}

/// What a new internal snapshot records of the moment it is taken (QEMU's
/// `QEMUSnapshotInfo` as `savevm` and `blockdev-snapshot-internal-sync` fill it); a VM
/// snapshot gives every image the same.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    /// Its name (the tag).
    pub name: String,
    /// When it was taken: seconds since the epoch...
    pub date_sec: u32,
    /// ...and the nanoseconds (QEMU stamps whole microseconds).
    pub date_nsec: u32,
    /// The machine's virtual clock then.
    pub vm_clock_nsec: u64,
    /// How much VM state the image's VM state area holds for it (0: a disk-only snapshot).
    pub vm_state_size: u64,
}

impl NewSnapshot {
    /// A snapshot called `name` taken now, at `vm_clock_nsec` on the machine's clock,
    /// without VM state.
    pub fn now(name: &str, vm_clock_nsec: u64) -> NewSnapshot {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        NewSnapshot {
            name: name.to_owned(),
            date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec,
            vm_state_size: 0,
        }
    }
}

/// The answer of a driver that cannot do what is asked (ENOTSUP).
pub fn unsupported<'a, T: 'a>() -> BoxFut<'a, T> {
    Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
}

bitflags::bitflags! {
    /// Flags on a request (QEMU: `BdrvRequestFlags`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct ReqFlags: u32 {
        /// Force unit access: the data is durable when the request completes.
        const FUA = 0x1;
        /// A write-zeroes request may deallocate the range.
        const MAY_UNMAP = 0x2;
        /// A write-zeroes request must fail rather than be slow (NBD's FAST_ZERO).
        const NO_FALLBACK = 0x4;
    }
}

/// What is at an offset: the status of the extent starting there, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the extent, at least 1 and at most what was asked.
    pub len: u64,
    /// The extent holds data (it is not a hole).
    pub data: bool,
    /// The extent reads as zeroes.
    pub zero: bool,
    /// Allocated in this node's own layer (vs. left to a backing file below).
    pub allocated: bool,
}

/// Zeroes written as data, a megabyte at a time, for drivers with no zeroing of their own
/// (QEMU's fallback in `bdrv_co_do_pwrite_zeroes`): `write(at, zeroes)` writes each piece.
/// A request that must not fall back (`NO_FALLBACK`) is refused with ENOTSUP.
///
/// # Errors
/// ENOTSUP for `NO_FALLBACK`; the first write that fails.
pub async fn write_zeroes_as_data<F, Fut>(
    offset: u64,
    len: u64,
    flags: ReqFlags,
    mut write: F,
) -> io::Result<()>
where
    F: FnMut(u64, Vec<u8>) -> Fut,
    Fut: Future<Output = io::Result<()>>,
{
    if flags.contains(ReqFlags::NO_FALLBACK) {
        return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
    }
    const PIECE: u64 = 1 << 20;
    let mut at = offset;
    while at < offset + len {
        let n = PIECE.min(offset + len - at);
        write(at, vec![0u8; n as usize]).await?;
        at += n;
    }
    Ok(())
}

/// `truncate_prealloc` of a driver that cannot preallocate: `truncate` for `off`, QEMU's
/// refusal of any other mode.
pub fn truncate_unallocated(prealloc: Prealloc, truncate: BoxFut<'_, ()>) -> BoxFut<'_, ()> {
    match prealloc {
        Prealloc::Off => truncate,
        Prealloc::Falloc => Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Unsupported preallocation mode 'falloc'",
            ))
        }),
    }
}

/// A write of a driver with no FUA of its own, made durable as QEMU's block layer makes
/// it: `write`, then (when `flags` ask for FUA) a flush of `file`.
///
/// # Errors
/// The write's or the flush's.
pub async fn flush_for_fua(
    file: &crate::Child,
    flags: ReqFlags,
    write: impl Future<Output = io::Result<()>>,
) -> io::Result<()> {
    write.await?;
    if flags.contains(ReqFlags::FUA) {
        file.flush().await?;
    }
    Ok(())
}

impl Extent {
    /// `len` bytes of data, allocated here: what a driver that cannot tell holes says.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            data: true,
            zero: false,
            allocated: true,
        }
    }

    /// Data a format placed at `at` in `file` for `len` bytes of its disk, where the file
    /// says which part reads as zeroes (QEMU's `BDRV_BLOCK_OFFSET_VALID` with the file
    /// asked, as for images allocated in full).
    ///
    /// # Errors
    /// The file's block status.
    pub async fn placed(file: &crate::Child, at: u64, len: u64) -> io::Result<Extent> {
        let f = file.block_status(at, len).await?;
        Ok(Extent {
            len: f.len.min(len),
            data: true,
            zero: f.zero,
            allocated: true,
        })
    }

    /// Up to `len` bytes at `offset` that a format leaves to the layer below: as its
    /// backing file has them, zeroes past that file's end or without one.
    ///
    /// # Errors
    /// The backing file's block status.
    pub async fn below(node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        match node.child("backing") {
            Some(b) if offset < b.len() => {
                let e = b.block_status(offset, len.min(b.len() - offset)).await?;
                Ok(Extent {
                    allocated: false,
                    ..e
                })
            }
            _ => Ok(Extent {
                len,
                data: false,
                zero: true,
                allocated: false,
            }),
        }
    }
}

/// Awaits `read` and copies its bytes into `dest`: [`Driver::read_into`] for a driver that
/// cannot read into caller memory directly.
///
/// # Errors
/// The read's.
pub async fn read_through_buffer(
    read: BoxFut<'_, Vec<u8>>,
    dest: &crate::io::ForeignBuf,
) -> io::Result<()> {
    let data = read.await?;
    dest.write_at(0, &data);
    crate::io::pool::give(data);
    Ok(())
}

/// A breakpoint operation (see [`Driver::debug_breakpoint`]).
#[derive(Debug, Clone, Copy)]
pub enum DebugOp<'a> {
    /// Suspend requests that raise the event (first) under the tag (second).
    Break(&'a str, &'a str),
    /// Remove the breakpoint with this tag (and let its suspended requests go).
    Remove(&'a str),
    /// Let the requests suspended under this tag go.
    Resume(&'a str),
    /// Whether a request is suspended under this tag.
    IsSuspended(&'a str),
}

/// A driver instance (the state of one open node).
pub trait Driver: std::any::Any {
    /// The driver name (`file`, `raw`, `null-co`).
    fn format_name(&self) -> &'static str;

    /// The node's size in bytes.
    fn len(&self, node: &Node) -> u64;

    /// Whether the driver acts on debug events (blkdebug); others are never told of them.
    fn handles_debug_events(&self) -> bool {
        false
    }

    /// A debug event the node above raised on this node (QEMU's `BLKDBG_EVENT`): blkdebug
    /// changes state, arms injected errors, or holds the request at a breakpoint.
    fn debug_event<'a>(&'a self, _node: &'a Node, _event: &'a str) -> BoxFut<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Breakpoints (qemu-io's `break`, `remove_break`, `resume`, `wait_break`): `None` when
    /// the driver has none, so the request goes on to the node's primary child.
    fn debug_breakpoint(&self, _op: DebugOp<'_>) -> Option<Result<bool, i32>> {
        None
    }

    /// Reads `len` bytes at `offset` (within bounds).
    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>>;

    /// Reads `dest.len()` bytes at `offset` (within bounds) into memory the caller owns.
    /// The default reads into a buffer and copies it over; drivers that can put the data
    /// there directly (a file, raw over it) do.
    fn read_into<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        dest: &'a crate::io::ForeignBuf,
    ) -> BoxFut<'a, ()> {
        Box::pin(read_through_buffer(
            self.read(node, offset, dest.len()),
            dest,
        ))
    }

    /// Writes `data` at `offset` (within bounds).
    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()>;

    /// Makes `len` bytes at `offset` read as zeroes.
    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()>;

    /// Deallocates a range if the driver can (contents become unspecified).
    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()>;

    /// Makes completed writes durable.
    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()>;

    /// The driver as its own type, for its factory's operations on an open node
    /// (`x-blockdev-amend`); `None` where the factory needs no such access.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Whether every flush reaches the driver, even with nothing written since the last
    /// one: its flush hands the data on to another party (QEMU's `flush_to_os`, an NBD
    /// server's), which may hold writes of others.
    fn flushes_every_time(&self) -> bool {
        false
    }

    /// The extent at `offset`, at most `len` long.
    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent>;

    /// Changes the size.
    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFut<'a, ()>;

    /// Changes the size with the added part allocated as `prealloc` says (QEMU's
    /// truncate with a `PreallocMode`); drivers that cannot preallocate refuse ENOTSUP.
    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        prealloc: Prealloc,
    ) -> BoxFut<'a, ()> {
        match prealloc {
            Prealloc::Off => self.truncate(node, size),
            Prealloc::Falloc => {
                Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
            }
        }
    }

    /// Drops everything the image holds, so that it reads as its backing file (QEMU:
    /// `bdrv_make_empty`, after a commit into the backing file). ENOTSUP where the format
    /// cannot.
    fn make_empty<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// What to ask of child `name` given what this node's users take and share, and whether
    /// it has users at all (QEMU's `bdrv_child_perm`). The default passes everything
    /// through, as filters and raw do.
    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        (perm, shared)
    }

    /// What this node still asks of child `name` while it is inactive, beyond reading. Most
    /// drivers ask nothing more (their image is given up); a backup filter keeps writing
    /// its target, so an inactivation that would reach that target fails, as in QEMU.
    fn child_perm_inactive(&self, _name: &str) -> Perm {
        Perm::empty()
    }

    /// Called after the permissions this node's users hold changed (file locking).
    ///
    /// # Errors
    /// The text of the conflict, if the new permissions cannot be had.
    fn set_perm(&self, _perm: Perm, _shared: Perm) -> crate::Result<()> {
        Ok(())
    }

    /// The node's own file name, if it has one (a protocol node's path). Other nodes show
    /// their child's when they pass it through unchanged, or a `json:` description.
    fn plain_filename(&self) -> Option<String> {
        None
    }

    /// Why relative names cannot be taken from the directory of the node's file name,
    /// when they cannot (an NFS node whose name carries its uid: the directory alone would
    /// lose it).
    fn base_directory_refused(&self) -> Option<String> {
        None
    }

    /// Whether the node's data is encrypted (queries say `encrypted`).
    fn is_encrypted(&self) -> bool {
        false
    }

    /// Whether the plain file name is one of the node's options, so that `json:` names
    /// carry it (a file's path; not `null-co://` or an NBD URI, which only describe).
    fn filename_is_option(&self) -> bool {
        true
    }

    /// For a filter (a node that shows its child's data unchanged, doing something on the
    /// way), the edge of the child it filters: `file` for most, `backing` for a mirror's
    /// `mirror_top`. Other nodes have none.
    fn filtered_child(&self) -> Option<&'static str> {
        None
    }

    /// Whether the node is named after its `file` child: it presents the child's bytes
    /// unchanged (raw without a window) or is a format whose options add nothing (qcow2
    /// without encryption), unless its backing child was chosen by the user.
    fn is_passthrough(&self) -> bool {
        false
    }

    /// For a passthrough node that is not a format: it shows its file's name, `json:` or
    /// not (QEMU's filters that refresh their name from their file's).
    fn shows_file_name(&self) -> bool {
        false
    }

    /// The options that make this node what it is, for `json:` file names (QEMU's "strong
    /// options"): the driver's own, not the common ones.
    fn strong_options(&self) -> QDict {
        QDict::new()
    }

    /// How the node's children show in its `json:` options where the driver does not show
    /// each under its own name, its backing child only when overridden (QEMU's
    /// `bdrv_gather_child_options`); `None` for that default.
    fn gathered_child_options(&self, _node: &Node, _backing_overridden: bool) -> Option<QDict> {
        None
    }

    /// Bytes the node occupies on its storage, if known.
    fn actual_size(&self, _node: &Node) -> Option<u64> {
        None
    }

    /// Whether the storage can say how much it occupies at all (QEMU answers ENOTSUP for
    /// protocols without the figure, and queries leave `actual-size` out).
    fn knows_allocated_size(&self) -> bool {
        true
    }

    /// `format-specific` in `ImageInfo`, if any.
    fn format_specific(&self) -> Option<QDict> {
        None
    }

    /// Driver-specific statistics for `query-blockstats`.
    fn driver_stats(&self) -> Option<QDict> {
        None
    }

    /// `blockdev-reopen`: checks the driver's options in `opts` against the open node (QEMU's
    /// "Cannot change the option 'x'" for what cannot change), without changing anything.
    /// A driver that does not say how it reopens cannot (QEMU's drivers without
    /// `bdrv_reopen_prepare`).
    ///
    /// # Errors
    /// The first option that cannot change; QEMU's refusal for a driver that cannot reopen.
    fn reopen_check(&self, node: &Node, _opts: &ferrite_qapi::Args) -> crate::Result<()> {
        let device = node.device_name();
        Err(crate::Error::ReopenUnsupported {
            format: node.driver_name().to_owned(),
            node: if device.is_empty() {
                node.name().to_owned()
            } else {
                device
            },
        })
    }

    /// The options a `blockdev-reopen` may leave out to reset them to their defaults
    /// (QEMU's `mutable_opts`, flat names: `overlap-check.template`); any other option the
    /// node was opened with must be given again.
    fn mutable_options(&self) -> &'static [&'static str] {
        &[]
    }

    /// `blockdev-reopen`: applies options already checked, and the new read-only state.
    ///
    /// # Errors
    /// The storage refusing the new mode (a read-only file opened for writing).
    fn reopen_apply(
        &self,
        _node: &Node,
        _opts: &ferrite_qapi::Args,
        _read_only: bool,
    ) -> crate::Result<()> {
        Ok(())
    }

    /// After a reopen from read-only to read-write: what must happen on disk before the
    /// first change (qcow2: repair, autoclear bits, bitmaps marked in use).
    fn prepare_writable<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Writes whole clusters compressed: formats that store compressed clusters, and the
    /// filters that pass such writes on (see [`Driver::can_write_compressed`]); ENOTSUP
    /// from the others, as in QEMU.
    fn write_compressed<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async { Err(std::io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    /// Whether the driver takes compressed writes (QEMU's `block_driver_can_compress`): a
    /// format that stores compressed clusters, or a filter that passes them on to its child
    /// (which must take them too: [`Node::supports_compressed_writes`]).
    fn can_write_compressed(&self) -> bool {
        self.compressed_cluster_size().is_some()
    }

    /// The node is activated again after another process may have changed its image:
    /// drop and re-read what is cached (QEMU's `bdrv_co_invalidate_cache`).
    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// A job that stops by force gives up on what it waits for here: requests waiting to be
    /// sent again (an NBD client reconnecting) fail at once instead (QEMU's
    /// `bdrv_cancel_in_flight`).
    fn cancel_in_flight(&self, _node: &Node) {}

    /// Writes cached state back: before the node goes away (QEMU's `bdrv_close`), becomes
    /// read-only or inactive. The node may serve on after.
    fn close<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// The node goes for good, after `close`: connections to its server end.
    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the driver gave the node up (QEMU's `bs->drv == NULL`): a fatally corrupt
    /// image, or one that could not be read again on activation. Every request fails with
    /// ENOMEDIUM, and QEMU's commands say the node is ejected or has no medium.
    fn is_ejected(&self) -> bool {
        false
    }

    /// The format's cluster size, if it has one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Whether the driver answers QEMU's `bdrv_get_info` (image formats and host files do,
    /// with a cluster size or without); a filter answers as the node it filters. A block
    /// copy warns when its target does not.
    fn answers_info(&self, node: &Node) -> bool {
        node.filtered().is_some_and(|f| f.answers_info())
    }

    /// The unit of a compressed write, for a format that stores compressed clusters (QEMU's
    /// `block_driver_can_compress`); `None` for the others.
    fn compressed_cluster_size(&self) -> Option<u64> {
        None
    }

    /// The backing file name and format the image names (formats with backing files).
    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        None
    }

    /// Housekeeping tick: drops cached metadata left unused for the node's
    /// `cache-clean-interval`.
    fn clean_caches(&self, _now: std::time::Instant) {}

    /// Records a new backing file name and format in the image (`change-backing-file`, an
    /// external snapshot's overlay).
    fn change_backing_file<'a>(
        &'a self,
        _node: &'a Node,
        _name: Option<String>,
        _format: Option<String>,
    ) -> BoxFut<'a, ()> {
        unsupported()
    }

    /// The image's internal snapshots (`SnapshotInfo`), for `ImageInfo`.
    fn snapshots_info(&self) -> Vec<QDict> {
        Vec::new()
    }

    /// Takes internal snapshot `snap` of the image as it is now (with the VM state saved
    /// before it, if `snap.vm_state_size` says so); returns its `SnapshotInfo`.
    fn snapshot_create<'a>(&'a self, _node: &'a Node, _snap: &'a NewSnapshot) -> BoxFut<'a, QDict> {
        unsupported()
    }

    /// Makes the image what it was when internal snapshot `id_or_name` (an ID first, then
    /// a name) was taken; `Ok(false)` if there is no such snapshot.
    fn snapshot_goto<'a>(&'a self, _node: &'a Node, _id_or_name: &'a str) -> BoxFut<'a, bool> {
        unsupported()
    }

    /// Writes `data` at `pos` of the image's VM state area: where `savevm` puts the
    /// machine's state before the snapshot that keeps it is taken.
    fn save_vmstate<'a>(&'a self, _node: &'a Node, _pos: u64, _data: Vec<u8>) -> BoxFut<'a, ()> {
        unsupported()
    }

    /// Reads `len` bytes at `pos` of the VM state area (after `snapshot_goto`, the state
    /// the snapshot kept).
    fn load_vmstate<'a>(&'a self, _node: &'a Node, _pos: u64, _len: usize) -> BoxFut<'a, Vec<u8>> {
        unsupported()
    }

    /// Deletes the internal snapshot with `id` and/or `name`; its `SnapshotInfo`, or `None`
    /// if there is no such snapshot.
    fn snapshot_delete<'a>(
        &'a self,
        _node: &'a Node,
        _id: Option<&'a str>,
        _name: Option<&'a str>,
    ) -> BoxFut<'a, Option<QDict>> {
        unsupported()
    }

    /// The bitmaps the node starts with, newest first (taken once by the node): the
    /// persistent ones an image holds, or a filter's internal (anonymous) ones.
    fn take_initial_bitmaps(&self) -> Vec<std::rc::Rc<crate::bitmap::DirtyBitmap>> {
        Vec::new()
    }

    /// Whether a writable node takes write access to its `file` whoever uses it (a format
    /// that updates its metadata), not only for its users' writes.
    fn writes_file_when_writable(&self) -> bool {
        false
    }

    /// Whether the node may have a backing file (a `backing` child).
    fn supports_backing(&self) -> bool {
        false
    }

    /// Whether the format stores persistent bitmaps at all.
    fn supports_persistent_bitmaps(&self) -> bool {
        false
    }

    /// Takes persistent bitmap `name` out of the image now (`block-dirty-bitmap-remove`),
    /// so that it does not come back after a crash. Nothing for a format without them.
    fn remove_stored_bitmap<'a>(&'a self, _node: &'a Node, _name: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the format keeps internal snapshots.
    fn supports_internal_snapshots(&self) -> bool {
        false
    }

    /// Whether the image can store a new persistent bitmap `name` of `granularity`; why
    /// not otherwise.
    ///
    /// # Errors
    /// The reason, for "Can't make bitmap 'x' persistent in 'y': ...".
    fn can_store_bitmap(&self, _name: &str, _granularity: u64) -> Result<(), String> {
        Err("Operation not supported".into())
    }

    /// Whether replacing `to_replace` by a node showing this node's data (a mirror's target
    /// at completion) leaves what this node shows unchanged, for a driver that knows its
    /// children's roles (QEMU: `bdrv_recurse_can_replace`; the caller looks through
    /// filters).
    fn can_replace_child(&self, _node: &Node, _to_replace: &Rc<Node>) -> bool {
        false
    }

    /// Why a machine using this node cannot migrate, if it cannot (QEMU's migration
    /// blocker, added when a driver such as `vdi` opens): `migrate` and `snapshot-save`
    /// refuse with it, `query-migrate` lists it.
    fn migration_blocker(&self) -> Option<&str> {
        None
    }

    /// Whether the driver can grow when a parent holding RESIZE writes past its end.
    fn can_grow(&self) -> bool {
        false
    }

    /// Whether the driver can make zeroes fast (for NBD_CMD_WRITE_ZEROES with FAST_ZERO).
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// The image's dirty flag as queries show it (qed's need-check flag).
    fn dirty_flag(&self) -> bool {
        false
    }

    /// Whether queries show the image's cluster size and dirty flag (QEMU's `bdrv_get_info`
    /// answers for it).
    fn has_image_info(&self) -> bool {
        true
    }

    /// Whether the driver answers [`Driver::has_image_info`]'s question with its `file`
    /// child's answer (QEMU's raw format passes `bdrv_get_info` down).
    fn image_info_from_file(&self) -> bool {
        false
    }

    /// `x-blockdev-change` adding a child: the new edge's name, or why not (QEMU's texts);
    /// `None` when the driver takes no children that way.
    fn new_child_name(&self) -> Option<Result<String, String>> {
        None
    }

    /// The edge `x-blockdev-change` attached under the name [`Driver::new_child_name`] gave.
    fn child_added(&self, _edge: Rc<Child>) {}

    /// `x-blockdev-change` removing child edge `name`: whether it may go (QEMU's texts);
    /// `None` when the driver lets no child go that way.
    fn check_remove_child(&self, _name: &str) -> Option<Result<(), String>> {
        None
    }

    /// Child edge `name` is about to be detached: forget it.
    fn child_removed(&self, _name: &str) {}

    /// The node is drained (the first drained section began): requests the driver holds
    /// back itself must go now (QEMU's `bdrv_drain_begin`: the throttle filter).
    fn drained_begin(&self) {}

    /// The last drained section of the node ended.
    fn drained_end(&self) {}

    /// Whether work the driver began on its own (no request's: qed's header update when
    /// its timer fires) is still going; a drain waits for it, and the driver calls
    /// `notify_progress` when it ends (QEMU counts such work as in flight).
    fn busy(&self) -> bool {
        false
    }

    /// Alignment every request must respect, in bytes.
    fn request_alignment(&self, _node: &Node) -> u64 {
        1
    }
}

/// Writes a filter driver's `Driver` methods that hand the request unchanged to one child:
/// `forward_to_child!(self.file; len, read, write, flush)` inside an `impl Driver`. The
/// methods a filter changes it writes itself; the rest come from here, so a filter reads as
/// what it does differently. Names: `len`, `read`, `write`, `write_zeroes`, `discard`,
/// `flush`, `block_status`, `truncate`.
#[macro_export]
macro_rules! forward_to_child {
    ($this:ident . $($field:tt).+ ; $method:ident $(, $rest:ident)* $(,)?) => {
        $crate::forward_to_child!(@one $method, $this, $($field).+);
        $crate::forward_to_child!($this . $($field).+ ; $($rest),*);
    };
    ($this:ident . $($field:tt).+ ; ) => {};
    (@one len, $this:ident, $($field:tt).+) => {
        fn len(&$this, _node: &$crate::Node) -> u64 {
            $this.$($field).+.len()
        }
    };
    (@one read, $this:ident, $($field:tt).+) => {
        fn read<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            offset: u64,
            len: usize,
        ) -> $crate::driver::BoxFut<'a, Vec<u8>> {
            Box::pin($this.$($field).+.read(offset, len))
        }
    };
    (@one write, $this:ident, $($field:tt).+) => {
        fn write<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            offset: u64,
            data: Vec<u8>,
            flags: $crate::driver::ReqFlags,
        ) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.write(offset, data, flags))
        }
    };
    (@one write_zeroes, $this:ident, $($field:tt).+) => {
        fn write_zeroes<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            offset: u64,
            len: u64,
            flags: $crate::driver::ReqFlags,
        ) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.write_zeroes(offset, len, flags))
        }
    };
    (@one discard, $this:ident, $($field:tt).+) => {
        fn discard<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            offset: u64,
            len: u64,
        ) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.discard(offset, len))
        }
    };
    (@one flush, $this:ident, $($field:tt).+) => {
        fn flush<'a>(&'a $this, _node: &'a $crate::Node) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.flush())
        }
    };
    (@one block_status, $this:ident, $($field:tt).+) => {
        fn block_status<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            offset: u64,
            len: u64,
        ) -> $crate::driver::BoxFut<'a, $crate::driver::Extent> {
            Box::pin($this.$($field).+.block_status(offset, len))
        }
    };
    (@one truncate, $this:ident, $($field:tt).+) => {
        fn truncate<'a>(&'a $this, _node: &'a $crate::Node, size: u64) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.truncate(size))
        }
        fn truncate_prealloc<'a>(
            &'a $this,
            _node: &'a $crate::Node,
            size: u64,
            prealloc: $crate::driver::Prealloc,
        ) -> $crate::driver::BoxFut<'a, ()> {
            Box::pin($this.$($field).+.truncate_prealloc(size, prealloc))
        }
    };
}
