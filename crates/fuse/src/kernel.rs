//! The kernel's side: `fuser` calls these on its own thread for each FUSE request. Requests
//! about the file are handed to the main thread as [`Op`]s, which answer them through the
//! reply they carry; the rest are answered here.

use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, INodeNo, KernelConfig, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::time::SystemTime;
use tokio::sync::mpsc::UnboundedSender;

/// The largest read the kernel may ask for, and the `max_read` mount option (QEMU's bounce
/// buffer limit).
pub(crate) const MAX_READ: u32 = 64 << 20;

/// Attribute changes a client asked for (`setattr`).
#[derive(Debug, Default)]
pub(crate) struct AttrChange {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) size: Option<u64>,
    /// Times or flags, which the export does not keep.
    pub(crate) unsupported: bool,
}

/// A request for the main thread, with the reply that answers it.
pub(crate) enum Op {
    GetAttr(ReplyAttr),
    SetAttr(AttrChange, ReplyAttr),
    Read {
        offset: u64,
        size: u32,
        reply: ReplyData,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        reply: ReplyWrite,
    },
    Fallocate {
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    },
    Flush(ReplyEmpty),
    Lseek {
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    },
}

/// The file system `fuser` drives: one file, the mount point itself.
pub(crate) struct Forwarder {
    pub(crate) ops: UnboundedSender<Op>,
}

impl Forwarder {
    /// Hands `op` to the main thread. Once the export has ended, files still open on the
    /// detached mount get ENOTCONN, as QEMU's clients do when its closed session aborts
    /// the connection.
    fn forward(&self, op: Op) {
        const ENDED: Errno = Errno::ENOTCONN;
        if let Err(unsent) = self.ops.send(op) {
            match unsent.0 {
                Op::GetAttr(r) | Op::SetAttr(_, r) => r.error(ENDED),
                Op::Read { reply, .. } => reply.error(ENDED),
                Op::Write { reply, .. } => reply.error(ENDED),
                Op::Fallocate { reply, .. } | Op::Flush(reply) => reply.error(ENDED),
                Op::Lseek { reply, .. } => reply.error(ENDED),
            }
        }
    }
}

impl Filesystem for Forwarder {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // As large as the kernel allows: fewer, larger requests.
        let _ = config
            .set_max_readahead(MAX_READ)
            .or_else(|max| config.set_max_readahead(max));
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        // The mount point is a file: there is nothing to look up under it.
        reply.error(Errno::ENOENT);
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.forward(Op::GetAttr(reply));
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        crtime: Option<SystemTime>,
        chgtime: Option<SystemTime>,
        bkuptime: Option<SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let unsupported = atime.is_some()
            || mtime.is_some()
            || ctime.is_some()
            || crtime.is_some()
            || chgtime.is_some()
            || bkuptime.is_some()
            || flags.is_some();
        let change = AttrChange {
            mode,
            uid,
            gid,
            size,
            unsupported,
        };
        self.forward(Op::SetAttr(change, reply));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.forward(Op::Read {
            offset,
            size,
            reply,
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.forward(Op::Write {
            offset,
            data: ferrite_block::io::pool::copy_of(data),
            reply,
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.forward(Op::Flush(reply));
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.forward(Op::Flush(reply));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.forward(Op::Fallocate {
            offset,
            length,
            mode,
            reply,
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.forward(Op::Lseek {
            offset,
            whence,
            reply,
        });
    }
}
