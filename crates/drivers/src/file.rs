//! `file` (a regular file), `host_device` (a block or character device: a disk, an LVM
//! volume, a loop device) and `host_cdrom` (a device as a CD-ROM drive) through the I/O
//! backend. They differ where QEMU's do: the kind of file each accepts, that a device does
//! not grow, and what queries say of them.

use crate::error::Error;
use ferrite_block::Graph;
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::Perm;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags};
use ferrite_block::fdset;
use ferrite_block::io::{Fallocate, IoBackend, seek};
use ferrite_block::{DriverFactory, DriverKind, LocalFut, NameCreation};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::Arc;

/// Which of the three drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flavor {
    File,
    HostDevice,
    HostCdrom,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::File => "file",
            Flavor::HostDevice => "host_device",
            Flavor::HostCdrom => "host_cdrom",
        }
    }

    fn is_device(self) -> bool {
        self != Flavor::File
    }
}

/// An open file.
pub(crate) struct FileDriver {
    flavor: Flavor,
    /// A character device (`/dev/null`): it takes writes anywhere, as the kernel lets it;
    /// a block device ends where it ends (ENOSPC past it).
    char_device: bool,
    path: String,
    /// The open file; `blockdev-reopen` swaps it for one opened in the new mode.
    file: std::cell::RefCell<Arc<File>>,
    /// Where the file is a duplicate from a descriptor set (`/dev/fdset/N`), the set's record
    /// of it.
    fdset_dup: std::cell::RefCell<Option<fdset::Dup>>,
    /// O_DIRECT (`cache.direct`; a reopen may change it).
    direct: Cell<bool>,
    /// Request alignment for O_DIRECT (1 without it).
    align: Cell<u64>,
    /// Aligned ranges with a write in progress, in O_DIRECT mode: a read-modify-write must
    /// not interleave with another write of the same blocks.
    writing: std::cell::RefCell<Vec<(u64, u64)>>,
    write_done: tokio::sync::Notify,
    /// What the node's users hold, for locking a reopened file the same way.
    perms: Cell<(Perm, Perm)>,
    /// `auto-read-only` on a node that may write: the descriptor is opened for writing only
    /// while some parent takes a writing permission, and refusing that is the failure of the
    /// permission (QEMU's file-posix; the node itself never turns read-only).
    dynamic_ro: Cell<bool>,
    /// Whether the descriptor is open for writing.
    fd_writable: Cell<bool>,
    io: Rc<dyn IoBackend>,
    size: Cell<u64>,
    locking: bool,
    discard_ok: Cell<u64>,
    discard_bytes: Cell<u64>,
    discard_failed: Cell<u64>,
}

/// The factory of `file`, `host_device` or `host_cdrom`.
pub(crate) struct FileFactory {
    pub(crate) flavor: Flavor,
}

impl DriverFactory for FileFactory {
    fn name(&self) -> &'static str {
        self.flavor.name()
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn needs_filename(&self) -> bool {
        true
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            // QEMU looks the manager up before it opens the file. Only SCSI commands a
            // guest's passed-through disk sends go to it, and a storage daemon has no
            // guest: the node only names it.
            if let Some(id) = opts.opt_str("pr-manager") {
                match ctx.graph().object_type(id) {
                    None => return Err(Error::NoPrManager(id.to_owned()).into()),
                    Some("pr-manager-helper") => {}
                    Some(_) => return Err(Error::NotPrManager(id.to_owned()).into()),
                }
            }
            let aio = opts.opt_str("aio").unwrap_or("threads");
            let settings = *ctx.settings();
            let drv = FileDriver::open(FileOpen {
                flavor: self.flavor,
                args: opts,
                read_only: settings.read_only,
                auto_read_only: opts.bool_or("auto-read-only", false),
                direct: settings.cache_direct,
                native_aio: aio == "native",
                io: ctx.io_backend(aio),
            })?;
            Ok(Box::new(drv) as Box<dyn Driver>)
        })
    }

    fn can_create(&self) -> bool {
        !self.flavor.is_device()
    }

    fn name_creation(&self) -> NameCreation {
        if self.flavor.is_device() {
            NameCreation::ReuseExisting
        } else {
            NameCreation::Create
        }
    }

    fn create<'a>(&'a self, _graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create_file(opts))
    }
}

/// `blockdev-create` of a file: made (or cut to nothing), preallocated, sized.
///
/// # Errors
/// QEMU's texts for a bad size or preallocation mode and for the file system failing.
pub(crate) async fn create_file(opts: &Args) -> ferrite_block::Result<()> {
    // Judged before the file is made, as QEMU does. (The hint itself is only advice to the
    // file system, which ferrite does not give.)
    if opts
        .opt_u64("extent-size-hint")
        .is_some_and(|h| h > u64::from(u32::MAX))
    {
        return Err(Error::ExtentSizeHintTooLarge.into());
    }
    let path = opts.str("filename")?.to_owned();
    let size = opts.u64("size")?;
    let prealloc = opts.opt_str("preallocation").unwrap_or("off").to_owned();
    let nocow = opts.bool_or("nocow", false);
    let p = path.clone();
    let make = move || -> Result<(), Error> {
        let created = |error| Error::Create {
            path: p.clone(),
            error,
        };
        // Read too: a shared lock needs a descriptor open for reading.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&p)
            .map_err(created)?;
        // The file is about to be cut to nothing: not while another node or process uses
        // it. As QEMU, write and resize are taken and all but resize shared, and a conflict
        // ends the creation before anything is touched (the locks go with the descriptor).
        super::lock::apply(
            &f,
            &p,
            Perm::WRITE | Perm::RESIZE,
            Perm::all().difference(Perm::RESIZE),
        )?;
        if nocow {
            // Best effort, like QEMU: only btrfs knows the flag.
            let _ = f.metadata();
        }
        f.set_len(0).map_err(Error::ResizeFile)?;
        // A mode a file cannot have is found only now, the file emptied (as in QEMU).
        if !matches!(prealloc.as_str(), "off" | "falloc" | "full") {
            return Err(Error::UnsupportedPreallocation(prealloc));
        }
        let grown = grow_new_file(&f, size, &prealloc);
        if grown.is_err() {
            // QEMU leaves no half-allocated file behind: back to the length it had.
            f.set_len(0).map_err(Error::RestoreLength)?;
        }
        grown?;
        // Only a file that grows from nothing: an empty one stays empty.
        if prealloc != "full" && size > 0 {
            allocate_first_block(&f, size);
        }
        Ok(())
    };
    let r = ferrite_block::io::blocking(move || Ok(make()))
        .await
        .map_err(|error| Error::Create { path, error })?;
    Ok(r?)
}

/// An empty new file made `size` long, preallocated as asked, in QEMU's order: `falloc`
/// allocates the whole length at once; `full` sets the length first (so a length the file
/// system cannot hold fails before anything is written), then writes zeroes over it.
fn grow_new_file(f: &std::fs::File, size: u64, prealloc: &str) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let Ok(len) = i64::try_from(size) else {
        // A file's length is signed, as in QEMU, where this one is negative: shorter than
        // the empty file for a preallocation, and refused by the kernel otherwise.
        return Err(match prealloc {
            "off" => Error::ResizeFile(std::io::Error::from_raw_os_error(libc::EINVAL)),
            _ => Error::PreallocateShrinking,
        });
    };
    match prealloc {
        // Nothing to allocate in an empty file (fallocate refuses a length of 0).
        "falloc" if size > 0 => {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate on a file descriptor we own, with no pointers involved.
            let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) };
            if rc != 0 {
                return Err(Error::Preallocate(std::io::Error::last_os_error()));
            }
            f.set_len(size).map_err(Error::ResizeFile)
        }
        "full" => {
            f.set_len(size).map_err(Error::ResizeFile)?;
            let zeroes = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < size {
                let n = (size - off).min(zeroes.len() as u64) as usize;
                f.write_all_at(&zeroes[..n], off)
                    .map_err(Error::WriteZeros)?;
                off += n as u64;
            }
            f.sync_all().map_err(Error::FlushFile)
        }
        _ => f.set_len(size).map_err(Error::ResizeFile),
    }
}

/// Writes zeroes over the start of a file that has just grown from nothing, as QEMU does so
/// that the alignment probe of a later `O_DIRECT` open finds an allocated block (its reads
/// of a hole would succeed at any alignment): 512 bytes for an image under 4 KiB, else
/// 4 KiB. Only an optimisation, so a failure is ignored; but it is visible in the blocks
/// the file takes, which tools compare.
fn allocate_first_block(f: &std::fs::File, size: u64) {
    use std::os::unix::fs::FileExt;
    let len = if size < 4096 { 512 } else { 4096 };
    // Aligned, for a file open with O_DIRECT.
    let zeroes = ferrite_block::io::aligned::AlignedBuf::zeroed(len);
    let _ = f.write_all_at(zeroes.as_slice(), 0);
}

/// How the file is to be opened.
pub(crate) struct FileOpen<'a> {
    /// Which driver: a device for `host_device` and `host_cdrom`.
    pub(crate) flavor: Flavor,
    pub(crate) args: &'a Args,
    pub(crate) read_only: bool,
    pub(crate) auto_read_only: bool,
    pub(crate) direct: bool,
    /// `aio=native`, which needs `direct` (judged once the file is open, as in QEMU).
    pub(crate) native_aio: bool,
    pub(crate) io: Rc<dyn IoBackend>,
}

impl FileDriver {
    /// Opens the file (read-only as asked: `auto-read-only` decides only how its descriptor
    /// is opened, see `dynamic_ro`).
    pub(crate) fn open(o: FileOpen<'_>) -> ferrite_block::Result<FileDriver> {
        let path = o.args.str("filename")?.to_owned();
        let locking = !matches!(o.args.opt_str("locking"), Some("off"));
        // Nobody writes yet: with `auto-read-only`, the descriptor waits for a writer to
        // be opened for writing.
        let dynamic_ro = o.auto_read_only && !o.read_only;
        let write = !o.read_only && !dynamic_ro;
        let HostFile { file, fdset_dup } =
            HostFile::open(&path, write, o.direct).map_err(|e| e.into_error(&path))?;
        if o.native_aio && !o.direct {
            return Err(Error::NativeAioWithoutDirect.into());
        }
        let kind = file
            .metadata()
            .map_err(|e| ferrite_block::Error::from(open_error(&path, e)))?
            .file_type();
        use std::os::unix::fs::FileTypeExt;
        let driver = o.flavor.name();
        let device = o.flavor.is_device();
        if device && !(kind.is_block_device() || kind.is_char_device()) {
            return Err(Error::NotADevice { driver, path }.into());
        }
        if !device && !kind.is_file() {
            return Err(Error::NotARegularFile { driver, path }.into());
        }
        // Like QEMU, a node is a whole number of 512-byte sectors; the tail reads as zeroes.
        let size = file_size(&file)
            .map_err(|e| ferrite_block::Error::from(open_error(&path, e)))?
            .next_multiple_of(512);
        let align = if o.direct {
            probe_direct_alignment(&file)
        } else {
            1
        };
        Ok(FileDriver {
            flavor: o.flavor,
            char_device: kind.is_char_device(),
            path,
            file: std::cell::RefCell::new(Arc::new(file)),
            fdset_dup: std::cell::RefCell::new(fdset_dup),
            direct: Cell::new(o.direct),
            align: Cell::new(align),
            writing: std::cell::RefCell::new(Vec::new()),
            write_done: tokio::sync::Notify::new(),
            perms: Cell::new((Perm::empty(), Perm::all())),
            dynamic_ro: Cell::new(dynamic_ro),
            fd_writable: Cell::new(write),
            io: o.io,
            size: Cell::new(size),
            locking,
            discard_ok: Cell::new(0),
            discard_bytes: Cell::new(0),
            discard_failed: Cell::new(0),
        })
    }
}

/// Whether parents holding `perm` may change the file (QEMU's file-posix opens the file for
/// writing for them).
fn has_writers(perm: Perm) -> bool {
    perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE)
}

impl FileDriver {
    /// Opens the file again, for writing or not and with or without O_DIRECT, locked for
    /// `perm` and `shared`, in place of the current descriptor (which requests in flight
    /// keep until they end).
    ///
    /// # Errors
    /// The open failing ("Could not open 'PATH': Permission denied") or the locks; the
    /// current descriptor then stays, with its locks.
    fn replace_fd(
        &self,
        write: bool,
        direct: bool,
        perm: Perm,
        shared: Perm,
    ) -> ferrite_block::Result<()> {
        let HostFile { file, fdset_dup } =
            HostFile::open(&self.path, write, direct).map_err(|e| e.into_error(&self.path))?;
        let file = Arc::new(file);
        if self.locking {
            // The old descriptor lets go of its lock bytes first: OFD locks of two
            // descriptors of one process conflict like anyone's.
            let (held, held_shared) = self.perms.get();
            let old = self.fd();
            let _ = super::lock::apply(&old, &self.path, Perm::empty(), Perm::all());
            if let Err(e) = super::lock::apply(&file, &self.path, perm, shared) {
                let _ = super::lock::apply(&old, &self.path, held, held_shared);
                return Err(e.into());
            }
        }
        let align = if direct {
            probe_direct_alignment(&file)
        } else {
            1
        };
        *self.file.borrow_mut() = file;
        *self.fdset_dup.borrow_mut() = fdset_dup;
        self.direct.set(direct);
        self.align.set(align);
        self.fd_writable.set(write);
        Ok(())
    }

    /// Notes that a write reached `end` (a format growing its file).
    fn grew_to(&self, end: u64) {
        let end = end.next_multiple_of(512);
        if end > self.size.get() {
            self.size.set(end);
        }
    }
}

/// The extent at `offset` of a file: data, or a hole (which reads as zeroes). Every byte of a
/// file counts as allocated at this layer, as QEMU reports it for protocol nodes.
fn file_extent(file: &File, offset: u64, len: u64, size: u64) -> io::Result<Extent> {
    let end = (offset + len).min(size);
    let hole = |to: u64| Extent {
        len: to - offset,
        data: false,
        zero: true,
        allocated: true,
    };
    match seek(file, offset, true)? {
        Some(d) if d > offset => Ok(hole(d.min(end))),
        None => Ok(hole(end)),
        Some(_) => {
            let h = seek(file, offset, false)?.unwrap_or(end);
            Ok(Extent {
                len: h.clamp(offset + 1, end) - offset,
                data: true,
                zero: false,
                allocated: true,
            })
        }
    }
}

impl FileDriver {
    fn fd(&self) -> Arc<File> {
        self.file.borrow().clone()
    }

    /// The aligned range covering `[offset, offset + len)`.
    fn aligned(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align.get();
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    async fn read_direct(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (start, end) = self.aligned(offset, len as u64);
        if start == offset && end == offset + len as u64 {
            return self.io.pread_direct(&self.fd(), offset, len).await;
        }
        let block = self
            .io
            .pread_direct(&self.fd(), start, (end - start) as usize)
            .await?;
        let from = (offset - start) as usize;
        let mut out = ferrite_block::io::pool::take(len);
        out.copy_from_slice(&block[from..from + len]);
        ferrite_block::io::pool::give(block);
        Ok(out)
    }

    /// A write in either mode; with O_DIRECT, unaligned writes read, patch and write back the
    /// blocks they touch, one at a time per block range.
    async fn pwrite(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        if !self.direct.get() {
            return self.io.pwrite(&self.fd(), offset, data).await;
        }
        let (start, end) = self.aligned(offset, data.len() as u64);
        while self
            .writing
            .borrow()
            .iter()
            .any(|&(s, e)| s < end && start < e)
        {
            self.write_done.notified().await;
        }
        self.writing.borrow_mut().push((start, end));
        let r = async {
            if start == offset && end == offset + data.len() as u64 {
                return self.io.pwrite_direct(&self.fd(), offset, data).await;
            }
            let mut block = self
                .io
                .pread_direct(&self.fd(), start, (end - start) as usize)
                .await?;
            let from = (offset - start) as usize;
            block[from..from + data.len()].copy_from_slice(&data);
            ferrite_block::io::pool::give(data);
            self.io.pwrite_direct(&self.fd(), start, block).await
        }
        .await;
        self.writing.borrow_mut().retain(|&r| r != (start, end));
        self.write_done.notify_waiters();
        r
    }
}

/// The smallest O_DIRECT alignment the file accepts: 512 bytes where a 512-byte direct read
/// works, else 4 KiB (QEMU probes the same way).
fn probe_direct_alignment(file: &File) -> u64 {
    let mut buf = ferrite_block::io::aligned::AlignedBuf::zeroed(512);
    match file.read_at(buf.as_mut_slice(), 0) {
        Ok(_) => 512,
        Err(_) => ferrite_block::io::aligned::DIRECT_ALIGN as u64,
    }
}

/// A file opened by name, or taken from the descriptor set the name gives.
struct HostFile {
    file: File,
    fdset_dup: Option<fdset::Dup>,
}

/// Why a [`HostFile`] could not be had.
enum OpenFailure {
    Os(io::Error),
    Fdset(fdset::OpenError),
}

impl OpenFailure {
    fn into_error(self, path: &str) -> Error {
        match self {
            OpenFailure::Os(e) => open_error(path, e),
            OpenFailure::Fdset(e) => Error::Fdset(e.text),
        }
    }
}

impl HostFile {
    fn open(path: &str, write: bool, direct: bool) -> Result<HostFile, OpenFailure> {
        let direct_flag = if direct { libc::O_DIRECT } else { 0 };
        let access = if write { libc::O_RDWR } else { libc::O_RDONLY };
        if let Some(r) = fdset::open(path, access | direct_flag) {
            let (file, dup) = r.map_err(OpenFailure::Fdset)?;
            return Ok(HostFile {
                file,
                fdset_dup: Some(dup),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(direct_flag)
            .open(path)
            .map_err(OpenFailure::Os)?;
        Ok(HostFile {
            file,
            fdset_dup: None,
        })
    }
}

fn open_error(path: &str, error: io::Error) -> Error {
    Error::Open {
        path: path.to_owned(),
        error,
    }
}

/// The size of a regular file, or of a block device.
fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

impl Driver for FileDriver {
    fn answers_info(&self, _node: &Node) -> bool {
        self.flavor != Flavor::HostCdrom
    }

    fn format_name(&self) -> &'static str {
        self.flavor.name()
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size.get()
    }

    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        // Another process (a migration's source) may have grown the file meanwhile.
        Box::pin(async move {
            self.size.set(file_size(&self.fd())?.next_multiple_of(512));
            Ok(())
        })
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        if self.direct.get() {
            return Box::pin(self.read_direct(offset, len));
        }
        self.io.pread(&self.fd(), offset, len)
    }

    fn read_into<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        dest: &'a ferrite_block::io::ForeignBuf,
    ) -> BoxFut<'a, ()> {
        if self.direct.get() {
            // O_DIRECT needs aligned memory: through the bounce buffer, as reads are.
            let read = self.read(node, offset, dest.len());
            return Box::pin(ferrite_block::driver::read_through_buffer(read, dest));
        }
        self.io.pread_into(&self.fd(), offset, dest.clone())
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let end = offset + data.len() as u64;
            self.pwrite(offset, data).await?;
            self.grew_to(end);
            if flags.contains(ReqFlags::FUA) && !node.cache_mode().1 {
                self.io.fdatasync(&self.fd()).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let mut done = false;
            if flags.contains(ReqFlags::MAY_UNMAP) {
                done = self
                    .io
                    .fallocate(&self.fd(), Fallocate::PunchHole, offset, len)
                    .await
                    .is_ok();
            }
            if !done {
                match self
                    .io
                    .fallocate(&self.fd(), Fallocate::ZeroRange, offset, len)
                    .await
                {
                    Ok(()) => {
                        self.grew_to(offset + len);
                        done = true;
                    }
                    Err(e) if flags.contains(ReqFlags::NO_FALLBACK) => return Err(e),
                    Err(_) => {}
                }
            }
            if !done {
                // No fallocate support: write real zeroes, in bounded pieces.
                let mut off = offset;
                while off < offset + len {
                    let n = (offset + len - off).min(1 << 20);
                    self.pwrite(off, vec![0u8; n as usize]).await?;
                    off += n;
                    self.grew_to(off);
                }
            }
            if flags.contains(ReqFlags::FUA) && !node.cache_mode().1 {
                self.io.fdatasync(&self.fd()).await?;
            }
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let r = self
                .io
                .fallocate(&self.fd(), Fallocate::PunchHole, offset, len)
                .await;
            match &r {
                Ok(()) => {
                    self.discard_ok.set(self.discard_ok.get() + 1);
                    self.discard_bytes.set(self.discard_bytes.get() + len);
                }
                Err(_) => self.discard_failed.set(self.discard_failed.get() + 1),
            }
            // Discard is advisory: an unsupported punch is not an error for the caller.
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                other => other,
            }
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        self.io.fdatasync(&self.fd())
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        // SEEK_DATA/SEEK_HOLE only consult the file system's extent map, so they run inline
        // like QEMU's; a trip through the thread pool would cost more than the call.
        let ext = file_extent(&self.fd(), offset, len, self.size.get());
        Box::pin(async move {
            // A file system without SEEK_DATA: everything is data.
            Ok(ext.unwrap_or(Extent {
                len,
                data: true,
                zero: false,
                allocated: true,
            }))
        })
    }

    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        prealloc: Prealloc,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let old = self.size.get();
            self.truncate(node, size).await?;
            if prealloc == Prealloc::Falloc && size > old && !self.flavor.is_device() {
                let file = self.fd();
                ferrite_block::io::blocking(move || {
                    use std::os::fd::AsRawFd;
                    // SAFETY: fallocate on a descriptor this driver owns; no pointers.
                    let rc = unsafe {
                        libc::fallocate(file.as_raw_fd(), 0, old as i64, (size - old) as i64)
                    };
                    if rc < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                })
                .await?;
            }
            Ok(())
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        let file = self.fd();
        Box::pin(async move {
            // A device keeps its size: growing it is refused, anything else changes
            // nothing (QEMU's "Cannot grow device files").
            if self.flavor.is_device() {
                if size > self.size.get() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "Cannot grow device files",
                    ));
                }
                return Ok(());
            }
            ferrite_block::io::blocking(move || {
                let grows_from_nothing = file.metadata()?.len() == 0 && size > 0;
                file.set_len(size)?;
                if grows_from_nothing {
                    allocate_first_block(&file, size);
                }
                Ok(())
            })
            .await?;
            self.size.set(size.next_multiple_of(512));
            Ok(())
        })
    }

    fn set_perm(&self, perm: Perm, shared: Perm) -> ferrite_block::Result<()> {
        let write = if self.dynamic_ro.get() {
            has_writers(perm)
        } else {
            self.fd_writable.get()
        };
        if write != self.fd_writable.get() {
            self.replace_fd(write, self.direct.get(), perm, shared)?;
        } else if self.locking {
            super::lock::apply(&self.fd(), &self.path, perm, shared)?;
        }
        self.perms.set((perm, shared));
        Ok(())
    }

    fn mutable_options(&self) -> &'static [&'static str] {
        &["x-check-cache-dropped"]
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        ferrite_block::driver::check_unchanged(
            opts,
            &Args::new(node.options()),
            &["filename", "locking", "aio", "pr-manager"],
        )
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        opts: &Args,
        read_only: bool,
    ) -> ferrite_block::Result<()> {
        // `cache.direct` may change: the file is opened again with or without O_DIRECT.
        let direct = opts
            .dict("cache")
            .is_some_and(|c| c.bool_or("direct", false));
        let dynamic_ro = !read_only && opts.bool_or("auto-read-only", false);
        let (perm, shared) = self.perms.get();
        let write = !read_only && (!dynamic_ro || has_writers(perm));
        self.replace_fd(write, direct, perm, shared)?;
        self.dynamic_ro.set(dynamic_ro);
        Ok(())
    }

    fn plain_filename(&self) -> Option<String> {
        Some(self.path.clone())
    }

    fn actual_size(&self, _node: &Node) -> Option<u64> {
        self.fd().metadata().ok().map(|m| m.blocks() * 512)
    }

    fn format_specific(&self) -> Option<QDict> {
        // QEMU's CD-ROM driver has no image information of its own.
        (self.flavor != Flavor::HostCdrom)
            .then(|| QDict::new().with("type", "file").with("data", QDict::new()))
    }

    fn has_image_info(&self) -> bool {
        self.flavor != Flavor::HostCdrom
    }

    fn driver_stats(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("driver", "file")
                .with("discard-nb-ok", self.discard_ok.get())
                .with("discard-nb-failed", self.discard_failed.get())
                .with("discard-bytes-ok", self.discard_bytes.get()),
        )
    }

    fn can_grow(&self) -> bool {
        !self.flavor.is_device() || self.char_device
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.align.get()
    }
}
