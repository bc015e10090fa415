//! The `nfs` node (QEMU's `block/nfs.c`): a file on an NFSv3 export, its size from the
//! server, reads and writes in the server's transfer sizes, flushes as COMMIT; and
//! `blockdev-create` of one.
//!
//! QEMU hands each request to libnfs under one lock and services its socket from the
//! event loop; here every piece of every request is on the connection at once. Writes
//! with FUA go as FILE_SYNC writes (QEMU writes, then commits the whole file).

use crate::cache::{PAGE, PageCache};
use crate::client::{Client, Failed};
use crate::nfs3::{self, Fh};
use crate::options::Options;
use bytes::Bytes;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::report::error_report;
use ferrite_block::{DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

/// The mode of a file `blockdev-create` makes (QEMU's).
const CREATE_MODE: u32 = 0o600;

pub(crate) struct NfsFactory;

/// The export mounted and the file opened (or made).
async fn connect(opts: &Options, writable: bool, create: bool) -> Result<(Client, Fh), Error> {
    let (export, file) = opts.split();
    let client = Client::mount(&opts.host, export, opts.caller())
        .await
        .map_err(|e| Error::generic(format!("Failed to mount nfs share: {e}")))?;
    let opened = if create {
        client
            .create(file, CREATE_MODE)
            .await
            .map_err(|e| format!("Failed to create file: creat call failed with \"{e}\""))
    } else {
        client
            .open(file, writable)
            .await
            .map_err(|e| format!("Failed to open file : open call failed with \"{e}\""))
    };
    match opened {
        Ok(fh) => Ok((client, fh)),
        Err(e) => {
            client.close().await;
            Err(Error::generic(e))
        }
    }
}

/// The words of a failed call after "... call failed with".
fn described(f: Failed) -> String {
    match f {
        Failed::Status(s) => format!("NFS: GETATTR failed with {s}"),
        Failed::Rpc(s) => s,
        Failed::Lost => "nfs_service failed".to_owned(),
    }
}

impl DriverFactory for NfsFactory {
    fn name(&self) -> &'static str {
        "nfs"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let settings = *ctx.settings();
            let opts = ctx.opts();
            let options = Options::parse(opts, settings.cache_direct)?;
            let (client, fh) = connect(&options, !settings.read_only, false).await?;
            let attr = match client.getattr(&fh).await {
                Ok(a) => a,
                Err(f) => {
                    client.close().await;
                    return Err(Error::generic(format!(
                        "Failed to fstat file: stat call failed with \"{}\"",
                        described(f)
                    ))
                    .into());
                }
            };
            client.opened();
            let mut strong = opts
                .dict("server")
                .map(|s| ferrite_block::filename::flat_server(s.as_dict()))
                .unwrap_or_default();
            for key in ["path", "user", "group"] {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            Ok(Box::new(Nfs {
                client,
                fh,
                sectors: Cell::new(attr.size.div_ceil(512)),
                used_at_open: Cell::new(attr.used),
                read_only: Cell::new(settings.read_only),
                cache_direct: Cell::new(settings.cache_direct),
                cache: PageCache::new(options.readahead, options.cache_pages).map(RefCell::new),
                options,
                strong,
            }) as Box<dyn Driver>)
        })
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, _graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(async move {
            let location = opts
                .dict("location")
                .ok_or_else(|| Error::generic("Parameter 'location' is missing"))?;
            let options = Options::parse(&location, false)?;
            let size = opts.u64("size")?;
            let (client, fh) = connect(&options, true, true).await?;
            // QEMU's result of the truncation is the job's, without words.
            let sized = client.set_size(&fh, size).await;
            client.close().await;
            sized.map_err(|f| {
                Error::generic(io::Error::from_raw_os_error(f.errno()).to_string()).into()
            })
        })
    }
}

/// An open node.
struct Nfs {
    client: Client,
    fh: Fh,
    /// The node's length in 512-byte sectors (QEMU's, fixed at open and by truncation).
    sectors: Cell<u64>,
    /// What the file took on the server at open (or a read-only reopen): a read-only
    /// node with a cache reports that, as QEMU does.
    used_at_open: Cell<u64>,
    read_only: Cell<bool>,
    cache_direct: Cell<bool>,
    /// libnfs's page cache and readahead, when the options ask for them.
    cache: Option<RefCell<PageCache>>,
    options: Options,
    strong: QDict,
}

impl Nfs {
    fn fail(text: &str, errno: i32) -> io::Error {
        error_report(&format!("NFS Error: {text}"));
        io::Error::from_raw_os_error(errno)
    }

    /// Drops the cached pages.
    fn invalidate_pages(&self) {
        if let Some(cache) = &self.cache {
            cache.borrow_mut().invalidate();
        }
    }

    /// Reads `len` bytes at `offset` into `out` (as long), past the end of the file as
    /// zeroes.
    async fn read_uncached(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let got = self
            .client
            .read(&self.fh, offset, out)
            .await
            .map_err(|e| Self::fail(&e, libc::EIO))?;
        out[got..].fill(0);
        Ok(())
    }

    /// A read through the page cache, as libnfs makes it: the whole pages around the
    /// request, those cached first taken from the cache, the rest (and the readahead
    /// window) from the server and kept.
    async fn read_cached(
        &self,
        cache: &RefCell<PageCache>,
        offset: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let start = offset - offset % PAGE;
        let span = ((offset + len as u64).next_multiple_of(PAGE) - start) as usize;
        let mut buf = pool::take(span);
        let (hit, fetch) = {
            let mut c = cache.borrow_mut();
            let hit = c.copy_cached(start, &mut buf);
            let from = start + hit as u64;
            (
                hit,
                (hit < span).then(|| (c.readahead_for(from), c.epoch())),
            )
        };
        if let Some((readahead, epoch)) = fetch {
            let from = start + hit as u64;
            // Its own pooled buffer: a readahead window of fresh memory each time costs
            // more in page faults than the copy of the part asked for.
            let mut fetched = pool::take(span - hit + readahead as usize);
            let got = match self.client.read(&self.fh, from, &mut fetched).await {
                Ok(got) => got,
                Err(e) => {
                    pool::give(buf);
                    pool::give(fetched);
                    return Err(Self::fail(&e, libc::EIO));
                }
            };
            cache.borrow_mut().fetched(epoch, from, &fetched[..got]);
            let asked = got.min(span - hit);
            buf[hit..hit + asked].copy_from_slice(&fetched[..asked]);
            buf[hit + asked..].fill(0);
            pool::give(fetched);
        }
        let skip = (offset - start) as usize;
        if skip == 0 {
            buf.truncate(len);
            return Ok(buf);
        }
        let out = pool::copy_of(&buf[skip..skip + len]);
        pool::give(buf);
        Ok(out)
    }
}

impl Driver for Nfs {
    fn format_name(&self) -> &'static str {
        "nfs"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.sectors.get().saturating_mul(512)
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn actual_size(&self, _node: &Node) -> Option<u64> {
        if self.read_only.get() && !self.cache_direct.get() {
            return Some(self.used_at_open.get());
        }
        Some(
            self.client
                .last_attr()
                .map_or(self.used_at_open.get(), |a| a.used),
        )
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            if let Some(cache) = &self.cache {
                return self.read_cached(cache, offset, len).await;
            }
            let mut out = pool::take(len);
            match self.read_uncached(offset, &mut out).await {
                Ok(()) => Ok(out),
                Err(e) => {
                    pool::give(out);
                    Err(e)
                }
            }
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let stable = if flags.contains(ReqFlags::FUA) {
                nfs3::FILE_SYNC
            } else {
                nfs3::UNSTABLE
            };
            let data = Bytes::from_owner(pool::Pooled(data));
            let started = self.cache.as_ref().map(|c| c.borrow_mut().write_started());
            let written = self
                .client
                .write(&self.fh, offset, data.clone(), stable)
                .await;
            if let (Some(cache), Some(started)) = (&self.cache, started) {
                cache
                    .borrow_mut()
                    .write_ended(started, offset, &data, written.is_ok());
            }
            written.map_err(|(errno, text)| Self::fail(&text, errno))
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
            move |at, zeroes| self.write(node, at, zeroes, flags - ReqFlags::MAY_UNMAP),
        ))
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.client.commit(&self.fh).await.map_err(|f| {
                let errno = f.errno();
                let text = match f {
                    Failed::Status(s) => format!("NFS: Commit failed with {s}"),
                    other => described(other),
                };
                Self::fail(&text, errno)
            })
        })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.invalidate_pages();
            self.client.set_size(&self.fh, size).await.map_err(|f| {
                let e = io::Error::from_raw_os_error(f.errno());
                io::Error::new(e.kind(), format!("Failed to truncate file: {e}"))
            })?;
            // The node's length is the size in whole sectors, rounded down (QEMU's hint after
            // a truncation; at open it rounds up).
            self.sectors.set(size / 512);
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

    fn reopen_check(&self, _node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        if !opts.bool_or("read-only", false) && self.read_only.get() {
            return Err(Error::generic("Cannot open a read-only mount as read-write").into());
        }
        let direct = opts
            .dict("cache")
            .is_some_and(|c| c.bool_or("direct", false));
        if direct && self.options.cache_used {
            return Err(Error::generic(
                "Cannot disable cache if libnfs readahead or pagecache is enabled",
            )
            .into());
        }
        Ok(())
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        opts: &Args,
        read_only: bool,
    ) -> ferrite_block::Result<()> {
        self.read_only.set(read_only);
        self.cache_direct.set(
            opts.dict("cache")
                .is_some_and(|c| c.bool_or("direct", false)),
        );
        if read_only && let Some(a) = self.client.last_attr() {
            // QEMU asks the server again here; the last answer about the file is as new.
            self.used_at_open.set(a.used);
        }
        Ok(())
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn plain_filename(&self) -> Option<String> {
        Some(self.options.file_name())
    }

    fn base_directory_refused(&self) -> Option<String> {
        self.options.base_directory_refused()
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        self.invalidate_pages();
        Box::pin(async { Ok(()) })
    }

    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.client.close().await;
            Ok(())
        })
    }
}
