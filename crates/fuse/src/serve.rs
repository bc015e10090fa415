//! The main thread's side: each request of the kernel answered from the export's
//! `BlockBackend`, as QEMU's FUSE export answers it (short reads and writes at the end of
//! the file, growing when growable, `fallocate` modes, `SEEK_DATA`/`SEEK_HOLE` from block
//! status, and the file's mode and owner kept by the export).

use crate::kernel::{AttrChange, MAX_READ, Op};
use ferrite_block::driver::Prealloc;
use ferrite_block::{BlockBackend, ReqFlags};
use ferrite_export::InFlight;
use fuser::{Errno, FileAttr, FileType, INodeNo};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The largest single zeroing request (QEMU's `BDRV_REQUEST_MAX_BYTES`).
const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

/// How long the kernel may keep the file's attributes.
const ATTR_TTL: Duration = Duration::from_secs(1);

/// What `stat` says of the file beyond its size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// One FUSE export's state on the main thread.
pub(crate) struct FileState {
    pub(crate) blk: Rc<BlockBackend>,
    pub(crate) writable: bool,
    pub(crate) growable: bool,
    /// Whether `allow_other` was a mount option: only then may the owner change.
    pub(crate) allow_other: Cell<bool>,
    pub(crate) owner: RefCell<Owner>,
    in_flight: Rc<InFlight>,
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl FileState {
    pub(crate) fn new(blk: Rc<BlockBackend>, writable: bool, growable: bool) -> FileState {
        let mut mode = libc::S_IFREG | libc::S_IRUSR;
        if writable {
            mode |= libc::S_IWUSR;
        }
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        FileState {
            blk,
            writable,
            growable,
            allow_other: Cell::new(false),
            owner: RefCell::new(Owner { mode, uid, gid }),
            in_flight: Rc::default(),
        }
    }

    /// Answers requests until the kernel's side hangs up or the export ends.
    pub(crate) async fn serve(self: Rc<Self>, mut ops: tokio::sync::mpsc::UnboundedReceiver<Op>) {
        while let Some(op) = ops.recv().await {
            let counted = self.in_flight.begin();
            let me = self.clone();
            tokio::task::spawn_local(async move {
                me.answer(op).await;
                drop(counted);
            });
        }
    }

    /// Waits until no request is being answered.
    pub(crate) async fn quiesce(&self) {
        self.in_flight.wait_idle().await;
    }

    async fn answer(&self, op: Op) {
        match op {
            Op::GetAttr(reply) => match self.attr() {
                Ok(a) => reply.attr(&ATTR_TTL, &a),
                Err(e) => reply.error(errno(&e)),
            },
            Op::SetAttr(change, reply) => match self.set_attr(change).await {
                Ok(()) => match self.attr() {
                    Ok(a) => reply.attr(&ATTR_TTL, &a),
                    Err(e) => reply.error(errno(&e)),
                },
                Err(e) => reply.error(e),
            },
            Op::Read {
                offset,
                size,
                reply,
            } => match self.read(offset, size).await {
                Ok(data) => {
                    reply.data(&data);
                    ferrite_block::io::pool::give(data);
                }
                Err(e) => reply.error(e),
            },
            Op::Write {
                offset,
                data,
                reply,
            } => match self.write(offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            },
            Op::Fallocate {
                offset,
                length,
                mode,
                reply,
            } => match self.fallocate(offset, length, mode).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Op::Flush(reply) => match self.blk.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            Op::Lseek {
                offset,
                whence,
                reply,
            } => match self.seek(offset, whence).await {
                Ok(at) => reply.offset(at),
                Err(e) => reply.error(e),
            },
        }
    }

    fn len(&self) -> io::Result<u64> {
        match self.blk.node() {
            Some(n) => Ok(n.len()),
            None => Err(io::Error::from_raw_os_error(libc::ENOMEDIUM)),
        }
    }

    fn attr(&self) -> io::Result<FileAttr> {
        let node = self
            .blk
            .node()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))?;
        let len = node.len();
        let allocated = match node.allocated_file_size() {
            None | Some(0) => len,
            Some(n) => n,
        };
        let owner = *self.owner.borrow();
        // Whole seconds, as QEMU's export reports them: the kernel drops its cache of the
        // file whenever the modification time changes, which at nanoseconds is at every
        // `getattr` (each write then also emptied the page cache behind it).
        let now = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            );
        Ok(FileAttr {
            ino: INodeNo(1),
            size: len,
            blocks: allocated.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::RegularFile,
            perm: (owner.mode & 0o7777) as u16,
            nlink: 1,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize: u32::try_from(node.request_alignment()).unwrap_or(512),
            flags: 0,
        })
    }

    /// Resizes the node; growing reads as zeroes.
    async fn truncate(&self, size: u64) -> Result<(), Errno> {
        self.blk.truncate(size).await.map_err(|e| errno(&e))
    }

    /// Only the size, the mode and (with `allow_other`) the owner may change, and only as
    /// far as it grants access that really exists.
    async fn set_attr(&self, c: AttrChange) -> Result<(), Errno> {
        if c.unsupported || (!self.allow_other.get() && (c.uid.is_some() || c.gid.is_some())) {
            return Err(Errno::from_i32(libc::ENOTSUP));
        }
        if let Some(mode) = c.mode {
            if !self.allow_other.get() && mode & (libc::S_IRWXG | libc::S_IRWXO) != 0 {
                return Err(Errno::EPERM);
            }
            if !self.writable && mode & (libc::S_IWUSR | libc::S_IWGRP | libc::S_IWOTH) != 0 {
                return Err(Errno::from_i32(libc::EROFS));
            }
        }
        if let Some(size) = c.size {
            if !self.writable {
                return Err(Errno::EACCES);
            }
            self.truncate(size).await?;
        }
        let mut owner = self.owner.borrow_mut();
        if let Some(mode) = c.mode {
            owner.mode = (mode & 0o7777) | libc::S_IFREG;
        }
        if let Some(uid) = c.uid {
            owner.uid = uid;
        }
        if let Some(gid) = c.gid {
            owner.gid = gid;
        }
        Ok(())
    }

    /// Reads, short at the end of the file.
    async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if size > MAX_READ {
            return Err(Errno::EINVAL);
        }
        let len = self.len().map_err(|e| errno(&e))?;
        let size = u64::from(size).min(len.saturating_sub(offset));
        if size == 0 {
            return Ok(Vec::new());
        }
        self.blk
            .read(offset, size as usize)
            .await
            .map_err(|e| errno(&e))
    }

    /// Writes, short at the end of the file unless the export grows.
    async fn write(&self, offset: u64, mut data: Vec<u8>) -> Result<u32, Errno> {
        if !self.writable {
            return Err(Errno::EACCES);
        }
        let len = self.len().map_err(|e| errno(&e))?;
        let end = offset.saturating_add(data.len() as u64);
        if end > len {
            if self.growable {
                self.truncate(end).await?;
            } else if offset > len {
                return Err(Errno::EIO);
            } else {
                data.truncate((len - offset) as usize);
            }
        }
        let n = data.len() as u32;
        if n > 0 {
            self.blk
                .write(offset, data, ReqFlags::empty())
                .await
                .map_err(|e| errno(&e))?;
        }
        Ok(n)
    }

    /// Zeroes `length` bytes at `offset` in requests the block layer takes.
    async fn zero(&self, mut offset: u64, mut length: u64, flags: ReqFlags) -> io::Result<()> {
        while length > 0 {
            let n = length.min(MAX_REQUEST);
            self.blk.write_zeroes(offset, n, flags).await?;
            offset += n;
            length -= n;
        }
        Ok(())
    }

    /// `fallocate`: allocation at the end of the file (a resize), punching holes, zeroing
    /// ranges.
    async fn fallocate(&self, offset: u64, mut length: u64, mode: i32) -> Result<(), Errno> {
        if !self.writable {
            return Err(Errno::EACCES);
        }
        let len = self.len().map_err(|e| errno(&e))?;
        if mode & FALLOC_FL_KEEP_SIZE != 0 {
            length = length.min(len.saturating_sub(offset));
        }
        let end = offset.saturating_add(length);
        if mode == 0 {
            // Allocation is only possible past the end, by growing the node with the new
            // part allocated (QEMU's export: a gap before it is grown without).
            if offset < len {
                return Err(Errno::from_i32(libc::EOPNOTSUPP));
            }
            if offset > len {
                self.truncate(offset).await?;
            }
            return match self.blk.truncate_prealloc(end, Prealloc::Falloc).await {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    Err(Errno::from_i32(libc::EOPNOTSUPP))
                }
                r => r.map_err(|e| errno(&e)),
            };
        }
        let r = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
            if mode & FALLOC_FL_KEEP_SIZE == 0 {
                return Err(Errno::EINVAL);
            }
            match self
                .zero(offset, length, ReqFlags::MAY_UNMAP | ReqFlags::NO_FALLBACK)
                .await
            {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
                }
                r => r,
            }
        } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
            if mode & FALLOC_FL_KEEP_SIZE == 0 && end > len {
                self.truncate(end).await?;
            }
            self.zero(offset, length, ReqFlags::empty()).await
        } else {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        };
        r.map_err(|e| errno(&e))
    }

    /// `SEEK_DATA` and `SEEK_HOLE` from the node's block status (the end of the file is a
    /// hole).
    async fn seek(&self, offset: i64, whence: i32) -> Result<i64, Errno> {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return Err(Errno::EINVAL);
        }
        let Ok(mut at) = u64::try_from(offset) else {
            return Err(Errno::ENXIO);
        };
        let len = self.len().map_err(|e| errno(&e))?;
        loop {
            if at >= len {
                return if at > len || whence == libc::SEEK_DATA {
                    Err(Errno::ENXIO)
                } else {
                    Ok(at as i64)
                };
            }
            let e = self
                .blk
                .block_status(at, len - at)
                .await
                .map_err(|e| errno(&e))?;
            if e.data == (whence == libc::SEEK_DATA) {
                return Ok(at as i64);
            }
            if e.len == 0 {
                return Err(Errno::ENXIO);
            }
            at += e.len;
        }
    }
}
