//! `copy-on-read`: a filter whose reads of data its child does not hold itself (but a
//! backing file above `bottom` does) also write that data into the child, so later reads
//! find it there (QEMU: block/copy-on-read.c with block/io.c's copy-on-read requests). The
//! stream job populates its image through one.

use crate::error::Error;
use ferrite_block::driver::{BoxFut, Driver, ReqFlags};
use ferrite_block::units::UnitLocks;
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx, Perm};
use ferrite_qobject::QDict;
use std::io;
use std::rc::Rc;

/// The `copy-on-read` driver's factory.
pub(crate) struct CorFactory;

impl DriverFactory for CorFactory {
    fn name(&self) -> &'static str {
        "copy-on-read"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let bottom = match ctx.opts().opt_str("bottom") {
                // QEMU names the node before opening it, so a filter naming itself as
                // its bottom finds a filter.
                Some(name) if name == ctx.node_name() => {
                    return Err(Error::BottomIsFilter(name.to_owned()).into());
                }
                Some(name) => {
                    let node = ctx
                        .graph()
                        .find(name)
                        .ok_or_else(|| Error::BottomNotFound(name.to_owned()))?;
                    if node.filtered().is_some() {
                        return Err(Error::BottomIsFilter(name.to_owned()).into());
                    }
                    Some(node)
                }
                None => None,
            };
            Ok(Box::new(CorDriver {
                file,
                bottom,
                copying: UnitLocks::default(),
            }) as Box<dyn Driver>)
        })
    }
}

/// The unit copies and writes serialise on when the child names none.
const DEFAULT_CLUSTER: u64 = 64 * 1024;

struct CorDriver {
    file: Rc<Child>,
    /// The last node whose data is copied up (none: the whole chain).
    bottom: Option<Rc<Node>>,
    /// Clusters a copy or a write is working on: a copy must not write back data that a
    /// write changed after the copy read it.
    copying: UnitLocks,
}

impl CorDriver {
    fn cluster(&self) -> u64 {
        self.file
            .node()
            .driver()
            .cluster_size()
            .unwrap_or(DEFAULT_CLUSTER)
    }

    /// The clusters `offset..offset + len` touches.
    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let c = self.cluster();
        (offset / c, (offset + len).div_ceil(c))
    }

    /// Whether the range (at most `len` at `offset`) must be copied up, and for how long
    /// that holds.
    async fn needs_copy(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        // Filters and raw nodes without a window map offsets unchanged: ask the node below
        // them what it holds itself.
        let top = cow_node(&self.file.node());
        let e = top.block_status(offset, len).await?;
        if e.allocated {
            return Ok((false, e.len));
        }
        let below = top.child("backing");
        match below {
            Some(b) if offset < b.len() => {
                let n = e.len.min(b.len() - offset);
                b.is_allocated_above(self.bottom.as_ref(), true, offset, n)
                    .await
            }
            _ => Ok((false, e.len)),
        }
    }

    /// Reads whole clusters around the range and writes them into the child unchanged;
    /// the range's bytes if `want` (a prefetch needs none and copies nothing more).
    async fn copy_up(&self, offset: u64, len: u64, want: bool) -> io::Result<Vec<u8>> {
        let c = self.cluster();
        let size = self.file.len();
        let from = offset / c * c;
        let to = (offset + len).next_multiple_of(c).min(size);
        let (first, end) = self.clusters(from, to - from);
        let _held = self.copying.claim(first, end).await;
        // Read after the claim: a write that finished first is what gets copied.
        let data = self.file.read(from, (to - from) as usize).await?;
        let part = if want {
            data[(offset - from) as usize..(offset - from + len) as usize].to_vec()
        } else {
            Vec::new()
        };
        if ferrite_block::io::is_zero(&data) {
            self.file
                .write_zeroes(from, to - from, ReqFlags::empty())
                .await?;
        } else {
            self.file.write(from, data, ReqFlags::empty()).await?;
        }
        Ok(part)
    }

    /// Reads the range, copying up what the child lacks; with `want` false (a prefetch)
    /// only the copying is done.
    async fn read_impl(&self, offset: u64, len: usize, want: bool) -> io::Result<Vec<u8>> {
        let end = offset + len as u64;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (copy, n) = self.needs_copy(pos, end - pos).await?;
            let n = n.clamp(1, end - pos);
            let piece = if copy {
                self.copy_up(pos, n, want).await?
            } else if want {
                self.file.read(pos, n as usize).await?
            } else {
                Vec::new()
            };
            if want && pos == offset && n == len as u64 {
                return Ok(piece);
            }
            out.extend(piece);
            pos += n;
        }
        Ok(out)
    }
}

/// The node below `node` whose backing chain the unallocated data comes from: through filters
/// and through raw nodes without a window, whose allocation is their file's (QEMU's generic
/// copy-on-read sees it through them).
fn cow_node(node: &Rc<Node>) -> Rc<Node> {
    let mut n = node.skip_filters();
    while n.child("backing").is_none()
        && n.driver().format_name() == "raw"
        && n.driver().is_passthrough()
    {
        match n.child("file") {
            Some(f) => n = f.skip_filters(),
            None => break,
        }
    }
    n
}

/// Copies what `node` (a `copy-on-read` node) lacks of `offset..offset + len` into its
/// child without returning the data: the stream job's prefetch (QEMU's
/// `BDRV_REQ_PREFETCH`).
///
/// # Errors
/// EINVAL for another kind of node; the reads and writes failing.
pub async fn populate(node: &Node, offset: u64, len: u64) -> io::Result<()> {
    let any: &dyn std::any::Any = node.driver();
    let cor = any
        .downcast_ref::<CorDriver>()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    if offset.checked_add(len).is_none_or(|end| end > node.len()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    cor.read_impl(offset, len as usize, false).await.map(drop)
}

impl CorDriver {
    /// A write (or zeroes, or discard) waits for copies of its clusters.
    async fn serialised<F: std::future::Future<Output = io::Result<()>>>(
        &self,
        offset: u64,
        len: u64,
        write: F,
    ) -> io::Result<()> {
        let (first, end) = self.clusters(offset, len);
        let _held = self.copying.claim(first, end).await;
        write.await
    }
}

impl Driver for CorDriver {
    ferrite_block::forward_to_child!(self.file; len, flush, block_status, truncate);

    fn format_name(&self) -> &'static str {
        "copy-on-read"
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.read_impl(offset, len, true))
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        let len = data.len() as u64;
        Box::pin(self.serialised(offset, len, self.file.write(offset, data, flags)))
    }

    fn write_compressed<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        let len = data.len() as u64;
        Box::pin(self.serialised(offset, len, self.file.write_compressed(offset, data)))
    }

    fn can_write_compressed(&self) -> bool {
        true
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.serialised(offset, len, self.file.write_zeroes(offset, len, flags)))
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(self.serialised(offset, len, self.file.discard(offset, len)))
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        // What passes through, and always the right to write back data unchanged.
        let through = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
        (
            (perm & through) | Perm::WRITE_UNCHANGED,
            (shared & through) | Perm::WRITE_UNCHANGED,
        )
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn strong_options(&self) -> QDict {
        let mut d = QDict::new();
        d.insert_opt("bottom", self.bottom.as_ref().map(|b| b.name()));
        d
    }
}
