//! `preallocate`: a filter that, when a write reaches past the end of its file, makes the
//! file longer ahead of it by `prealloc-size` (aligned to `prealloc-align`) with a fast
//! zeroing, so that a growing image does not extend its file write by write; the node's
//! size is where the data ends, and the file is cut back to it when the node closes or its
//! users stop writing (QEMU: block/preallocate.c).

use ferrite_block::driver::{BoxFut, Driver, ReqFlags};
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::Cell;
use std::io;
use std::rc::Rc;

const SECTOR: u64 = 512;

/// The `preallocate` driver's factory.
pub(crate) struct PreallocateFactory;

/// `prealloc-align` and `prealloc-size`, checked as QEMU checks them.
fn options(opts: &Args, child: &Child) -> ferrite_block::Result<(u64, u64)> {
    crate::error::refuse_negative_sizes(opts, &["prealloc-align", "prealloc-size"])?;
    let align = opts.opt_u64("prealloc-align").unwrap_or(1 << 20);
    let size = opts.opt_u64("prealloc-size").unwrap_or(128 << 20);
    let fail = |t: String| Err(crate::error::generic(t));
    if align % SECTOR != 0 {
        return fail(format!(
            "prealloc-align parameter of preallocate filter is not aligned to {SECTOR}"
        ));
    }
    let child_align = child.node().request_alignment();
    if align % child_align != 0 {
        return fail(format!(
            "prealloc-align parameter of preallocate filter is not aligned to underlying node \
             request alignment ({child_align})"
        ));
    }
    Ok((align, size))
}

impl DriverFactory for PreallocateFactory {
    fn name(&self) -> &'static str {
        "preallocate"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let (align, size) = options(ctx.opts(), &file)?;
            Ok(Box::new(Preallocate(Rc::new(State {
                file,
                align: Cell::new(align),
                size: Cell::new(size),
                data_end: Cell::new(None),
                zero_start: Cell::new(None),
                file_end: Cell::new(None),
                writing: Cell::new(false),
            }))) as Box<dyn Driver>)
        })
    }
}

/// What the filter knows while its users may write and resize: where their data ends,
/// where the zeroes it wrote ahead start, and where the file ends.
struct State {
    file: Rc<Child>,
    align: Cell<u64>,
    size: Cell<u64>,
    data_end: Cell<Option<u64>>,
    zero_start: Cell<Option<u64>>,
    file_end: Cell<Option<u64>>,
    /// The node's users hold `write` and `resize` (only then does it preallocate).
    writing: Cell<bool>,
}

struct Preallocate(Rc<State>);

impl State {
    fn forget(&self) {
        self.data_end.set(None);
        self.zero_start.set(None);
        self.file_end.set(None);
    }

    /// Before a write of `offset..offset + len`: moves the end of data, and makes the file
    /// longer ahead of it when the write passes the file's end. True when a zeroing write
    /// (`merge_zero`) needs doing no more: it lands in zeroes written ahead.
    async fn handle_write(&self, offset: u64, len: u64, merge_zero: bool) -> bool {
        if !self.writing.get() {
            return false;
        }
        let end = offset + len;
        let data_end = self.data_end.get().unwrap_or_else(|| self.file.len());
        self.data_end.set(Some(data_end));
        if self.file_end.get().is_none() {
            self.file_end.set(Some(data_end));
        }
        if end <= data_end {
            return false;
        }
        self.data_end.set(Some(end));
        if self.zero_start.get().is_none() || !merge_zero {
            self.zero_start.set(Some(end));
        }
        let file_end = self.file_end.get().unwrap_or(data_end);
        if end <= file_end {
            return merge_zero && self.zero_start.get().is_some_and(|z| offset >= z);
        }
        let file_align = self.file.node().request_alignment().max(1);
        let align = self.align.get().max(file_align);
        let start = if merge_zero {
            offset.min(file_end)
        } else {
            file_end
        }
        .next_multiple_of(file_align);
        let prealloc_end = (start.max(end) + self.size.get()).next_multiple_of(align);
        let merge_zero = merge_zero && start <= offset;
        let zeroed = self
            .file
            .write_zeroes(start, prealloc_end - start, ReqFlags::NO_FALLBACK)
            .await;
        match zeroed {
            Ok(()) => {
                self.file_end.set(Some(prealloc_end));
                merge_zero
            }
            Err(_) => {
                self.file_end.set(None);
                false
            }
        }
    }

    /// Cuts the file back to where the data ends.
    async fn truncate_to_data(&self) -> io::Result<()> {
        let file_end = self.file_end.get().unwrap_or_else(|| self.file.len());
        if let Some(data_end) = self.data_end.get().filter(|&d| d < file_end) {
            self.file.truncate(data_end).await?;
            self.file_end.set(Some(data_end));
        }
        Ok(())
    }
}

impl Driver for Preallocate {
    ferrite_block::forward_to_child!(self.0.file; discard, flush, block_status);

    fn format_name(&self) -> &'static str {
        "preallocate"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.0.data_end.get().unwrap_or_else(|| self.0.file.len())
    }

    fn can_grow(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.0.file.read(offset, len))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.0.handle_write(offset, data.len() as u64, false).await;
            self.0.file.write(offset, data, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let merge = (flags - ReqFlags::NO_FALLBACK).is_empty();
            if self.0.handle_write(offset, len, merge).await {
                return Ok(());
            }
            self.0.file.write_zeroes(offset, len, flags).await
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let s = &self.0;
            if s.data_end.get().is_some_and(|d| size > d) {
                // Growing: the zeroes written ahead are dropped first.
                s.truncate_to_data().await?;
                s.data_end.set(Some(size));
            }
            match s.file.truncate(size).await {
                Ok(()) => {
                    if s.writing.get() {
                        s.data_end.set(Some(size));
                        s.zero_start.set(Some(size));
                        s.file_end.set(Some(size));
                    }
                    Ok(())
                }
                Err(e) => {
                    s.forget();
                    Err(e)
                }
            }
        })
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        // While preallocating, the filter resizes its file and no one else may write or
        // resize it.
        if perm.contains(Perm::WRITE | Perm::RESIZE) || self.0.data_end.get().is_some() {
            (perm | Perm::RESIZE, shared - (Perm::WRITE | Perm::RESIZE))
        } else {
            (perm, shared)
        }
    }

    fn set_perm(&self, perm: Perm, _shared: Perm) -> ferrite_block::Result<()> {
        let writing = perm.contains(Perm::WRITE | Perm::RESIZE);
        let was = self.0.writing.replace(writing);
        if writing && self.0.data_end.get().is_none() {
            let len = self.0.file.len();
            self.0.data_end.set(Some(len));
            self.0.zero_start.set(Some(len));
            self.0.file_end.set(Some(len));
        } else if was && !writing && self.0.data_end.get().is_some() {
            // The users stopped writing: cut the file back (QEMU does it in a bottom half).
            let s = self.0.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = s.truncate_to_data().await {
                    tracing::warn!(error = %e, "preallocate: cannot drop the preallocation");
                }
                if !s.writing.get() {
                    s.forget();
                }
            });
        }
        Ok(())
    }

    fn close<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.0.data_end.get().is_some() {
                let _ = self.0.truncate_to_data().await;
            }
            Ok(())
        })
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn strong_options(&self) -> QDict {
        QDict::new()
    }

    fn reopen_check(&self, _node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        options(opts, &self.0.file).map(drop)
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        opts: &Args,
        _read_only: bool,
    ) -> ferrite_block::Result<()> {
        let (align, size) = options(opts, &self.0.file)?;
        self.0.align.set(align);
        self.0.size.set(size);
        Ok(())
    }
}
