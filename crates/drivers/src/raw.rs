//! `raw`: the bytes of its `file` child, optionally a window of them (`offset`, `size`).

use crate::error::Error;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::Perm;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::Cell;
use std::io;
use std::rc::Rc;

pub(crate) struct RawDriver {
    offset: Cell<u64>,
    /// A fixed size (`size=`), or `None` to follow the child.
    size: Cell<Option<u64>>,
    /// The formats: a probed image's first sector must not come to look like one of them.
    formats: Rc<ferrite_block::Registry>,
}

/// The `raw` driver's factory.
pub(crate) struct RawFactory;

impl DriverFactory for RawFactory {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            // QEMU reads the options, then attaches the file (a window of it is data no
            // one else may resize), then judges the window against it.
            crate::error::refuse_negative_sizes(ctx.opts(), &WINDOW)?;
            let file = ctx.open_child("file").await?;
            if ctx.opts().opt_u64("offset").unwrap_or(0) != 0 || ctx.opts().has("size") {
                ctx.claim_for_data(&file)?;
            }
            let formats = ctx.graph().registry().clone();
            Ok(Box::new(RawDriver::open(ctx.opts(), &file, formats)?) as Box<dyn Driver>)
        })
    }
}

/// The options that make a window of the file.
const WINDOW: [&str; 2] = ["offset", "size"];

/// The window `args` give (offset and size, if any) into a file of `file_len` bytes,
/// checked as QEMU checks it at open and reopen.
fn window(args: &Args, file_len: u64) -> ferrite_block::Result<(u64, Option<u64>)> {
    crate::error::refuse_negative_sizes(args, &WINDOW)?;
    let offset = args.opt_u64("offset").unwrap_or(0);
    let size = args.opt_u64("size");
    if offset > file_len {
        return Err(Error::OffsetPastEnd { offset, file_len }.into());
    }
    let window = size.unwrap_or(0);
    if offset.saturating_add(window) > file_len {
        return Err(Error::WindowPastEnd {
            offset,
            size: window,
            file_len,
        }
        .into());
    }
    if size.is_some_and(|s| s % 512 != 0) {
        return Err(Error::UnalignedWindow.into());
    }
    Ok((offset, size))
}

impl RawDriver {
    pub(crate) fn open(
        args: &Args,
        file: &Child,
        formats: Rc<ferrite_block::Registry>,
    ) -> ferrite_block::Result<Self> {
        let (offset, size) = window(args, file.len())?;
        Ok(RawDriver {
            offset: Cell::new(offset),
            size: Cell::new(size),
            formats,
        })
    }

    /// A write of `data` at `offset` to a probed image: refused (EPERM) when it would make
    /// the first sector probe as another format, as QEMU's raw driver guards it.
    async fn check_probed_write(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        const SECTOR: u64 = 512;
        if !node.probed() || offset >= SECTOR || data.is_empty() {
            return Ok(());
        }
        let start = self.offset.get();
        let mut sector = if offset == 0 && data.len() as u64 >= SECTOR {
            Vec::new()
        } else {
            let len = SECTOR.min(file.len().saturating_sub(start)) as usize;
            file.read(start, len).await?
        };
        let at = offset as usize;
        let end = (at + data.len()).min(SECTOR as usize);
        if sector.len() < end {
            sector.resize(end, 0);
        }
        sector[at..end].copy_from_slice(&data[..end - at]);
        // By contents only, as QEMU guards sector 0.
        if self.formats.probe(&sector, None) != "raw" {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn file(&self, node: &Node) -> io::Result<Rc<Child>> {
        node.edge("file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }
}

impl Driver for RawDriver {
    fn image_info_from_file(&self) -> bool {
        true
    }

    fn answers_info(&self, node: &Node) -> bool {
        node.child("file").is_some_and(|f| f.answers_info())
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn cancel_in_flight(&self, node: &Node) {
        if let Some(f) = node.child("file") {
            f.cancel_in_flight();
        }
    }

    fn len(&self, node: &Node) -> u64 {
        match self.size.get() {
            Some(s) => s,
            None => node
                .child("file")
                .map_or(0, |f| f.len().saturating_sub(self.offset.get())),
        }
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let file = self.file(node)?;
            file.debug_event("read_aio").await;
            file.read(self.offset.get() + offset, len).await
        })
    }

    fn read_into<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        dest: &'a ferrite_block::io::ForeignBuf,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = self.file(node)?;
            file.debug_event("read_aio").await;
            file.read_into(self.offset.get() + offset, dest).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = self.file(node)?;
            self.check_probed_write(node, &file, offset, &data).await?;
            file.debug_event("write_aio").await;
            file.write(self.offset.get() + offset, data, flags).await
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
            self.file(node)?
                .write_zeroes(self.offset.get() + offset, len, flags)
                .await
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.file(node)?
                .discard(self.offset.get() + offset, len)
                .await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move { self.file(node)?.flush().await })
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let mut e = self
                .file(node)?
                .block_status(self.offset.get() + offset, len)
                .await?;
            // A raw node maps every byte to its file: all of it is "allocated" here.
            e.allocated = true;
            Ok(e)
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        self.truncate_prealloc(node, size, Prealloc::Off)
    }

    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        prealloc: Prealloc,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.size.get().is_some() || self.offset.get() != 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            self.file(node)?.truncate_prealloc(size, prealloc).await
        })
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        // A window into the file cannot follow a resize of the file.
        if self.offset.get() != 0 || self.size.get().is_some() {
            (perm, shared - Perm::RESIZE)
        } else {
            (perm, shared)
        }
    }

    fn mutable_options(&self) -> &'static [&'static str] {
        &["offset", "size"]
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        // The child stays the same node; a different one is not supported yet.
        let same_child = match (opts.get("file"), node.child("file")) {
            (Some(ferrite_qobject::QObject::String(name)), Some(c)) => c.name() == name,
            _ => false,
        };
        if !same_child {
            return Err(ferrite_block::Error::CannotChange("file".into()));
        }
        window(opts, node.child("file").map_or(0, |f| f.len())).map(drop)
    }

    fn reopen_apply(
        &self,
        node: &Node,
        opts: &Args,
        _read_only: bool,
    ) -> ferrite_block::Result<()> {
        let (offset, size) = window(opts, node.child("file").map_or(0, |f| f.len()))?;
        self.offset.set(offset);
        self.size.set(size);
        Ok(())
    }

    fn is_passthrough(&self) -> bool {
        self.offset.get() == 0 && self.size.get().is_none()
    }

    fn can_grow(&self) -> bool {
        // Without a window, a write past the end goes to the file, which decides.
        self.is_passthrough()
    }

    fn strong_options(&self) -> QDict {
        let mut d = QDict::new();
        if self.offset.get() != 0 {
            d.insert("offset", self.offset.get());
        }
        d.insert_opt("size", self.size.get());
        d
    }

    fn can_fast_zero(&self) -> bool {
        true
    }
}
