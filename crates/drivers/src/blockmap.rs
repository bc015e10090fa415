//! What the simple block-mapped formats (`vdi`, `vpc`) share: the disk cut into blocks of
//! one size, each placed somewhere in the file or nowhere (reading as zeroes); reads
//! gathered block by block; the `Driver` methods such formats answer alike (QEMU's drivers
//! for them have no discard, no zeroing, no resize, no options of their own, and block
//! migration); and `blockdev-create`'s opening of the file.

use crate::error::generic;
use ferrite_block::driver::Extent;
use ferrite_block::{BlockBackend, Child, Graph, Node, OpenCtx, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::io;
use std::rc::Rc;

/// The pieces of `offset..offset + len` within one block of `block` bytes each: (block,
/// offset in it, length).
pub(crate) fn pieces(offset: u64, len: u64, block: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        (at < end).then(|| {
            let (index, inner) = (at / block, at % block);
            let n = (block - inner).min(end - at);
            at += n;
            (index, inner, n)
        })
    })
}

/// Reads `len` bytes at `offset` of a disk of `block`-byte blocks from `file`: `place`
/// says where a block's data starts in the file, or that it has no place (zeroes).
pub(crate) async fn read(
    file: &Child,
    offset: u64,
    len: usize,
    block: u64,
    place: impl Fn(u64) -> Option<u64>,
) -> io::Result<Vec<u8>> {
    let mut out = ferrite_block::io::pool::take(len);
    let mut done = 0usize;
    for (index, inner, n) in pieces(offset, len as u64, block) {
        let dest = &mut out[done..done + n as usize];
        match place(index) {
            Some(at) => {
                let data = file.read(at + inner, n as usize).await?;
                dest.copy_from_slice(&data);
                ferrite_block::io::pool::give(data);
            }
            None => dest.fill(0),
        }
        done += n as usize;
    }
    Ok(out)
}

/// Reads `len` bytes at `offset` piece by piece: `piece(at, max)` answers how many bytes
/// from `at` (at most `max`) it covers and their bytes, or `None` for zeroes. A request one
/// piece answers whole gets that piece's buffer, copied nowhere.
///
/// # Errors
/// The first piece's error.
pub(crate) async fn gather<F, Fut>(offset: u64, len: usize, mut piece: F) -> io::Result<Vec<u8>>
where
    F: FnMut(u64, usize) -> Fut,
    Fut: Future<Output = io::Result<(usize, Option<Vec<u8>>)>>,
{
    let mut out: Option<Vec<u8>> = None;
    let mut done = 0usize;
    while done < len {
        let (n, bytes) = piece(offset + done as u64, len - done).await?;
        if n == len
            && let Some(p) = bytes
        {
            return Ok(p);
        }
        let dest = out.get_or_insert_with(|| ferrite_block::io::pool::take(len));
        match bytes {
            Some(p) => {
                dest[done..done + n].copy_from_slice(&p[..n]);
                ferrite_block::io::pool::give(p);
            }
            None => dest[done..done + n].fill(0),
        }
        done += n;
    }
    Ok(out.unwrap_or_default())
}

/// Opens the format's `file` child and claims it for metadata ([`OpenCtx::claim_for_metadata`]):
/// (the child, whether the node is read-only).
///
/// # Errors
/// The child's, or a permission conflict.
pub(crate) async fn open_file(ctx: &mut OpenCtx<'_>) -> ferrite_block::Result<(Rc<Child>, bool)> {
    let read_only = ctx.settings().read_only;
    let file = ctx.open_child("file").await?;
    ctx.claim_for_metadata(&file)?;
    Ok((file, read_only))
}

/// Opens the `file` child of a format QEMU only reads (`bochs`, `cloop`): a writable node
/// is made read-only if `auto-read-only` allows it, else refused (QEMU's
/// `bdrv_apply_auto_read_only`).
///
/// # Errors
/// "Image is read-only", or the child's error.
pub(crate) async fn open_read_only_file(ctx: &mut OpenCtx<'_>) -> ferrite_block::Result<Rc<Child>> {
    ctx.apply_auto_read_only(|| ferrite_block::Error::ImageReadOnly)?;
    Ok(open_file(ctx).await?.0)
}

/// `len` bytes with no place in the file: zeroes (QEMU counts them as allocated, the
/// format having said what they read as).
pub(crate) fn unplaced(len: u64) -> Extent {
    Extent {
        len,
        data: false,
        zero: true,
        allocated: true,
    }
}

/// QEMU's migration blocker text for a format that cannot migrate.
pub(crate) fn blocker(format: &str, node: &str) -> String {
    format!("The {format} format used by node '{node}' does not support live migration")
}

/// `blockdev-create`'s `file` (a node name or inline options) opened for writing and
/// resizing, handed to `write`, and let go whatever `write` returns.
///
/// # Errors
/// No such node, or `write`'s error.
pub async fn create_on_file<F>(
    graph: &Rc<Graph>,
    opts: &Args,
    write: impl FnOnce(Rc<BlockBackend>) -> F,
) -> ferrite_block::Result<()>
where
    F: Future<Output = ferrite_block::Result<()>>,
{
    let target = CreateTarget::open(graph, opts.get("file"), Perm::WRITE | Perm::RESIZE)
        .await?
        .ok_or_else(|| generic("Parameter 'file' is missing"))?;
    let r = write(target.blk.clone()).await;
    target.release(graph);
    r
}

/// A node `blockdev-create` writes an image to, through a backend of its own.
pub(crate) struct CreateTarget {
    pub(crate) blk: Rc<BlockBackend>,
    node: Rc<Node>,
    /// Opened from inline options for the create alone.
    inline: bool,
}

impl CreateTarget {
    /// A `BlockdevRef` of the create's options (a node name or inline options) opened
    /// with `perm`, sharing all; `None` for something else.
    ///
    /// # Errors
    /// No such node, the inline node failing to open, or a permission conflict.
    pub(crate) async fn open(
        graph: &Rc<Graph>,
        value: Option<&QObject>,
        perm: Perm,
    ) -> ferrite_block::Result<Option<CreateTarget>> {
        let (node, inline) = match value {
            Some(QObject::String(name)) => (graph.lookup(name)?, false),
            Some(QObject::Dict(d)) => (graph.open_inline(&Args::new(d.clone())).await?, true),
            _ => return Ok(None),
        };
        match BlockBackend::new(graph, &node, perm, Perm::all()) {
            Ok(blk) => Ok(Some(CreateTarget { blk, node, inline })),
            Err(e) => {
                if inline {
                    graph.release_inline(&node);
                }
                Err(e)
            }
        }
    }

    /// Lets the node go: the backend, and the node itself if the create opened it.
    pub(crate) fn release(self, graph: &Graph) {
        self.blk.remove();
        if self.inline {
            graph.release_inline(&self.node);
        }
    }
}

/// The `Driver` methods a block-mapped format answers as QEMU's `vdi` and `vpc` do (those
/// of [`simple_format_answers`], and writes). The driver type has `read_only: Cell<bool>`,
/// `blocker: String` and
/// `async fn write_impl(&self, offset: u64, data: &[u8], flags: ReqFlags) -> io::Result<()>`.
macro_rules! block_mapped_driver {
    ($format:literal) => {
        fn format_name(&self) -> &'static str {
            $format
        }

        fn write<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            offset: u64,
            data: Vec<u8>,
            flags: ferrite_block::ReqFlags,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            Box::pin(async move {
                let r = self.write_impl(offset, &data, flags).await;
                ferrite_block::io::pool::give(data);
                r
            })
        }

        /// No zeroing of its own (as QEMU's): the zeroes are written, placing blocks.
        fn write_zeroes<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            offset: u64,
            len: u64,
            flags: ferrite_block::ReqFlags,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            let write_flags =
                flags - ferrite_block::ReqFlags::MAY_UNMAP - ferrite_block::ReqFlags::NO_FALLBACK;
            Box::pin(ferrite_block::driver::write_zeroes_as_data(
                offset,
                len,
                flags,
                move |at, zeroes| async move { self.write_impl(at, &zeroes, write_flags).await },
            ))
        }

        $crate::simple_format_answers!();
    };
}
pub(crate) use block_mapped_driver;

/// The `Driver` methods of a format QEMU only reads (`bochs`, `cloop`): no writes of any
/// kind, nothing to flush, no resize, no block status of its own (all data), 512-byte
/// requests, no `bdrv_get_info`. The driver type has `read_only: Cell<bool>`.
macro_rules! read_only_format_answers {
    ($format:literal) => {
        $crate::format_child_answers!();

        fn format_name(&self) -> &'static str {
            $format
        }

        fn write<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _offset: u64,
            _data: Vec<u8>,
            _flags: ferrite_block::ReqFlags,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            ferrite_block::driver::unsupported()
        }

        fn write_zeroes<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _offset: u64,
            _len: u64,
            _flags: ferrite_block::ReqFlags,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            ferrite_block::driver::unsupported()
        }

        fn discard<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _offset: u64,
            _len: u64,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            ferrite_block::driver::unsupported()
        }

        fn flush<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            Box::pin(async { Ok(()) })
        }

        /// QEMU's driver answers no block status: all of it is data.
        fn block_status<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _offset: u64,
            len: u64,
        ) -> ferrite_block::driver::BoxFut<'a, ferrite_block::driver::Extent> {
            Box::pin(async move { Ok(ferrite_block::driver::Extent::data(len)) })
        }

        fn truncate<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _size: u64,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            ferrite_block::driver::unsupported()
        }

        fn request_alignment(&self, _node: &ferrite_block::Node) -> u64 {
            512
        }

        /// QEMU's driver answers no `bdrv_get_info`: no cluster size.
        fn has_image_info(&self) -> bool {
            false
        }
    };
}
pub(crate) use read_only_format_answers;

/// The `Driver` methods QEMU's simple formats (`vdi`, `vpc`, `vmdk`) answer alike: those of
/// [`format_child_answers!`](crate::format_child_answers), no discard (a no-op), no resize, migration blocked. The driver
/// type has `read_only: Cell<bool>` and `blocker: String`.
#[macro_export]
macro_rules! simple_format_answers {
    () => {
        /// QEMU's driver has no discard: the request succeeds and nothing changes.
        fn discard<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _offset: u64,
            _len: u64,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            Box::pin(async { Ok(()) })
        }

        fn truncate<'a>(
            &'a self,
            _node: &'a ferrite_block::Node,
            _size: u64,
        ) -> ferrite_block::driver::BoxFut<'a, ()> {
            ferrite_block::driver::unsupported()
        }

        fn migration_blocker(&self) -> Option<&str> {
            Some(&self.blocker)
        }

        $crate::format_child_answers!();
    };
}

/// The `Driver` methods an image format with no options of its own answers as QEMU's
/// `bdrv_default_perms` and reopen stubs do (`vdi`, `vpc`, `vmdk`, `qed`): named after its
/// file, its file read consistently and written and grown by this node alone while it
/// may write, a backing file only read. The driver type has `read_only: Cell<bool>`.
#[macro_export]
macro_rules! format_child_answers {
    () => {
        /// No options of its own: the node is named after its file.
        fn is_passthrough(&self) -> bool {
            true
        }

        fn child_perm(
            &self,
            name: &str,
            perm: ferrite_block::Perm,
            shared: ferrite_block::Perm,
            _used: bool,
        ) -> (ferrite_block::Perm, ferrite_block::Perm) {
            if name == "backing" {
                return ferrite_block::Perm::for_backing(perm, shared);
            }
            let own = ferrite_block::Perm::WRITE | ferrite_block::Perm::RESIZE;
            let perm = perm | ferrite_block::Perm::CONSISTENT_READ;
            let perm = if self.read_only.get() {
                perm
            } else {
                perm | own
            };
            (perm, shared - own)
        }

        /// No options of its own to change; the graph moves the `file` edge itself.
        fn reopen_check(
            &self,
            _node: &ferrite_block::Node,
            _opts: &ferrite_qapi::Args,
        ) -> ferrite_block::Result<()> {
            Ok(())
        }

        fn reopen_apply(
            &self,
            _node: &ferrite_block::Node,
            _opts: &ferrite_qapi::Args,
            read_only: bool,
        ) -> ferrite_block::Result<()> {
            self.read_only.set(read_only);
            Ok(())
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_block_boundaries() {
        const B: u64 = 1 << 20;
        let p: Vec<_> = pieces(B - 10, B + 20, B).collect();
        assert_eq!(p, vec![(0, B - 10, 10), (1, 0, B), (2, 0, 10)]);
        assert_eq!(pieces(5, 0, B).count(), 0);
    }
}
