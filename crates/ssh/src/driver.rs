//! The `ssh` driver: a node over a remote file, and `blockdev-create` of one.
//!
//! QEMU's driver sends one request at a time (16 KiB reads, 128 KiB writes, each waiting
//! for its answer, all under one lock); here every request of a read or write goes out at
//! once, in the sizes the server says it takes, and requests of different callers are
//! under way together.

use crate::options::Location;
use crate::session::{self, Remote};
use crate::sftp::{FX_OP_UNSUPPORTED, FXF_CREAT, FXF_READ, FXF_TRUNC, FXF_WRITE, SftpError};
use bytes::Bytes;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::QDict;
use std::cell::Cell;
use std::io;
use std::rc::Rc;

/// The mode a created file gets (QEMU's).
const CREATE_MODE: u32 = 0o644;

pub(crate) struct SshFactory;

impl DriverFactory for SshFactory {
    fn name(&self) -> &'static str {
        "ssh"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn parse_filename(&self, name: &str) -> Option<ferrite_block::Result<QDict>> {
        Some(options_of_name(name).map_err(Into::into))
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            // A name no URL parse made options of (else it is refused as unknown below).
            if let Some(name) = opts.opt_str("filename") {
                options_of_name(name)?;
            }
            ferrite_block::check_visited_whole(opts)?;
            let loc = Location::parse(opts)?;
            let flags = if ctx.settings().read_only {
                FXF_READ
            } else {
                FXF_READ | FXF_WRITE
            };
            let remote = session::open(&loc, flags, None)
                .await
                .map_err(Error::generic)?;
            let mut strong = opts
                .dict("server")
                .map(|s| ferrite_block::filename::flat_server(s.as_dict()))
                .unwrap_or_default();
            for key in ["path", "user"] {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            Ok(Box::new(Ssh {
                size: Cell::new(remote.size),
                file_name: loc.file_name(&remote.user),
                host: loc.host,
                remote,
                warned_flush: Cell::new(false),
                strong,
            }) as Box<dyn Driver>)
        })
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, _graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(async move {
            // Created by file name: the name is the location.
            let location = match opts.opt_str("filename") {
                // A name GLib's parser does not read fails QEMU's creation without a
                // reason of its own: the errno of it is all that is said.
                Some(name) => match ferrite_block::filename::ssh_url(name) {
                    Ok(Some(mut location)) => {
                        location.remove("driver");
                        Args::new(location)
                    }
                    Ok(None) => {
                        return Err(
                            Error::generic("Could not create image: Invalid argument").into()
                        );
                    }
                    Err(why) => return Err(Error::generic(why).into()),
                },
                None => opts
                    .dict("location")
                    .ok_or_else(|| Error::generic("Parameter 'location' is missing"))?,
            };
            let loc = Location::parse(&location)?;
            let size = opts.u64("size")?;
            let remote = session::open(
                &loc,
                FXF_READ | FXF_WRITE | FXF_CREAT | FXF_TRUNC,
                Some(CREATE_MODE),
            )
            .await
            .map_err(Error::generic)?;
            let grown = if size > 0 {
                grow(&remote, size).await
            } else {
                Ok(())
            };
            remote.close().await;
            grown.map_err(|e| Error::generic(e).into())
        })
    }
}

/// The options of a node given by name: QEMU's reason where the name is no ssh URL (its
/// scheme, host or path), or, for a name GLib's parser does not read at all, the server
/// QEMU then misses.
fn options_of_name(name: &str) -> Result<QDict, Error> {
    match ferrite_block::filename::ssh_url(name) {
        Ok(Some(options)) => Ok(options),
        Ok(None) => Err(Error::generic("Parameter 'server' is missing")),
        Err(why) => Err(Error::generic(why)),
    }
}

/// Makes the file `size` bytes long: by setting its size, or (a server that cannot) by
/// writing its last byte, as QEMU does. The failure in QEMU's words.
async fn grow(remote: &Remote, size: u64) -> Result<(), String> {
    let grown = match remote.sftp.set_size(&remote.handle, size).await {
        Err(SftpError::Status {
            code: FX_OP_UNSUPPORTED,
            ..
        }) => {
            let zero = Bytes::from_static(&[0]);
            remote.sftp.write(&remote.handle, size - 1, zero).await
        }
        other => other,
    };
    grown.map_err(|e| format!("Failed to grow file: {e}"))
}

/// An open node.
struct Ssh {
    remote: Remote,
    /// The file's size as last known: from the open, the writes past the end, and the
    /// server again when the node is made active.
    size: Cell<u64>,
    host: String,
    file_name: Option<String>,
    /// Whether the node warned that the server cannot `fsync`.
    warned_flush: Cell<bool>,
    strong: QDict,
}

/// A failed request as the block layer sees it (QEMU's drivers answer EIO).
fn eio(e: SftpError) -> io::Error {
    tracing::debug!(error = %e, "sftp request failed");
    io::Error::from_raw_os_error(libc::EIO)
}

impl Ssh {
    fn grew_to(&self, end: u64) {
        if end > self.size.get() {
            self.size.set(end);
        }
    }
}

impl Driver for Ssh {
    fn format_name(&self) -> &'static str {
        "ssh"
    }

    fn len(&self, _node: &Node) -> u64 {
        // A node is a whole number of 512-byte sectors, as in QEMU.
        self.size.get().next_multiple_of(512)
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let mut out = ferrite_block::io::pool::take(len);
            match self
                .remote
                .sftp
                .read(&self.remote.handle, offset, &mut out)
                .await
            {
                Ok(()) => Ok(out),
                Err(e) => {
                    ferrite_block::io::pool::give(out);
                    Err(eio(e))
                }
            }
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let end = offset + data.len() as u64;
            self.remote
                .sftp
                .write(
                    &self.remote.handle,
                    offset,
                    Bytes::from_owner(ferrite_block::io::pool::Pooled(data)),
                )
                .await
                .map_err(eio)?;
            self.grew_to(end);
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
        Box::pin(ferrite_block::driver::write_zeroes_as_data(
            offset,
            len,
            flags,
            move |at, zeroes| self.write(node, at, zeroes, ReqFlags::empty()),
        ))
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if !self.remote.sftp.has_extension("fsync@openssh.com", "1") {
                if !self.warned_flush.replace(true) {
                    ferrite_block::report::warn_report(&format!(
                        "ssh server {} does not support fsync",
                        self.host
                    ));
                    ferrite_block::report::error_report(
                        "to support fsync, you need OpenSSH >= 6.3",
                    );
                }
                return Ok(());
            }
            self.remote
                .sftp
                .fsync(&self.remote.handle)
                .await
                .map_err(eio)
        })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let now = self.size.get();
            if size < now {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "ssh driver does not support shrinking files",
                ));
            }
            if size > now {
                grow(&self.remote, size).await.map_err(io::Error::other)?;
                self.size.set(size);
            }
            Ok(())
        })
    }

    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        prealloc: Prealloc,
    ) -> BoxFut<'a, ()> {
        ferrite_block::driver::truncate_unallocated(prealloc, self.truncate(node, size))
    }

    fn can_grow(&self) -> bool {
        true
    }

    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        // Another process (a migration's source) may have grown the file meanwhile.
        Box::pin(async move {
            let attrs = self
                .remote
                .sftp
                .fstat(&self.remote.handle)
                .await
                .map_err(eio)?;
            if let Some(size) = attrs.size {
                self.size.set(size);
            }
            Ok(())
        })
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn plain_filename(&self) -> Option<String> {
        self.file_name.clone()
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.remote.close().await;
            Ok(())
        })
    }
}
