//! `cloop`: compressed loop images (Knoppix's `create_compressed_fs`; QEMU:
//! block/cloop.c), read-only as in QEMU. A 128-byte shell script header, the block size
//! and block count (big-endian `u32`s), a table of `count + 1` big-endian `u64` offsets,
//! and the blocks, each compressed with zlib on its own: block `i` is the bytes between
//! offsets `i` and `i + 1`.
//!
//! As under QEMU: the header's limits in its words; a block that does not inflate to
//! exactly the block size fails the read with EIO; the disk's sector count is computed
//! in 32 bits (QEMU's `n_blocks * sectors_per_block`). Unlike QEMU, which keeps one
//! inflated block and takes a lock for every request, requests inflate what they need
//! side by side and the last block inflated is kept for the next.

use crate::blockmap;
use crate::error::generic;
use ferrite_block::driver::Driver;
use ferrite_block::io::pool;
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

const SECTOR: u64 = 512;
const MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
/// The largest block, inflated (QEMU's buffer limit), and twice that deflated.
const MAX_BLOCK_SIZE: u32 = 64 << 20;
/// The largest offset table QEMU reads.
const MAX_OFFSETS_SIZE: u32 = 512 << 20;

/// The `cloop` driver's factory.
pub(crate) struct CloopFactory;

impl DriverFactory for CloopFactory {
    fn name(&self) -> &'static str {
        "cloop"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU's test: the header's script, as far as the bytes go.
    fn probe(&self, head: &[u8]) -> bool {
        let n = MAGIC.len().min(head.len());
        head[..n] == MAGIC[..n]
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = blockmap::open_read_only_file(ctx).await?;
            Ok(Box::new(Cloop::open(file).await?) as Box<dyn Driver>)
        })
    }
}

/// A node of the `cloop` driver.
struct Cloop {
    file: Rc<Child>,
    block_size: u64,
    offsets: Vec<u64>,
    size: u64,
    /// The last block inflated: its number and bytes.
    last: RefCell<Option<(u64, Rc<Vec<u8>>)>>,
    read_only: Cell<bool>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Cloop {
    /// QEMU's `cloop_open`: its checks in its order and words.
    async fn open(file: Rc<Child>) -> ferrite_block::Result<Cloop> {
        let failed = |e: io::Error| generic(ferrite_qapi::os_msg(&e));
        let head = file.read(128, 8).await.map_err(failed)?;
        let block_size = be32(&head[..4]);
        if block_size % 512 != 0 {
            return Err(generic(format!(
                "block_size {block_size} must be a multiple of 512"
            )));
        }
        if block_size == 0 {
            return Err(generic("block_size cannot be zero"));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(generic(format!(
                "block_size {block_size} must be {} MB or less",
                MAX_BLOCK_SIZE >> 20
            )));
        }
        let n_blocks = be32(&head[4..]);
        let max_blocks = (u32::MAX - 1) / 8;
        if n_blocks > max_blocks {
            return Err(generic(format!(
                "n_blocks {n_blocks} must be {max_blocks} or less"
            )));
        }
        let offsets_size = (n_blocks + 1) * 8;
        if offsets_size > MAX_OFFSETS_SIZE {
            return Err(generic(
                "image requires too many offsets, try increasing block size",
            ));
        }
        let table = file
            .read(136, offsets_size as usize)
            .await
            .map_err(failed)?;
        let offsets: Vec<u64> = table
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        for (i, pair) in offsets.windows(2).enumerate() {
            let i = i + 1;
            if pair[1] < pair[0] {
                return Err(generic(format!(
                    "offsets not monotonically increasing at index {i}, image file is corrupt"
                )));
            }
            if pair[1] - pair[0] > 2 * u64::from(MAX_BLOCK_SIZE) {
                return Err(generic(format!(
                    "invalid compressed block size at index {i}, image file is corrupt"
                )));
            }
        }
        // QEMU multiplies in 32 bits.
        let sectors = n_blocks.wrapping_mul(block_size / 512);
        Ok(Cloop {
            file,
            block_size: u64::from(block_size),
            offsets,
            size: u64::from(sectors) * SECTOR,
            last: RefCell::new(None),
            read_only: Cell::new(true),
        })
    }

    /// Block `b` inflated (EIO if it does not inflate to exactly one block).
    async fn block(&self, b: u64) -> io::Result<Rc<Vec<u8>>> {
        if let Some((n, bytes)) = &*self.last.borrow()
            && *n == b
        {
            return Ok(bytes.clone());
        }
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let i = usize::try_from(b).map_err(|_| eio())?;
        let (start, end) = match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&s), Some(&e)) => (s, e),
            _ => return Err(eio()),
        };
        let packed = self.file.read(start, (end - start) as usize).await?;
        let mut out = Vec::with_capacity(self.block_size as usize);
        let mut z = flate2::Decompress::new(true);
        let status = z
            .decompress_vec(&packed, &mut out, flate2::FlushDecompress::Finish)
            .map_err(|_| eio())?;
        pool::give(packed);
        if status != flate2::Status::StreamEnd || out.len() as u64 != self.block_size {
            return Err(eio());
        }
        let out = Rc::new(out);
        *self.last.borrow_mut() = Some((b, out.clone()));
        Ok(out)
    }

    async fn read_impl(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = pool::take(len);
        let mut done = 0usize;
        for (b, inner, n) in blockmap::pieces(offset, len as u64, self.block_size) {
            let block = self.block(b).await?;
            out[done..done + n as usize]
                .copy_from_slice(&block[inner as usize..(inner + n) as usize]);
            done += n as usize;
        }
        Ok(out)
    }
}

impl Driver for Cloop {
    blockmap::read_only_format_answers!("cloop");

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn read<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: usize,
    ) -> ferrite_block::driver::BoxFut<'a, Vec<u8>> {
        Box::pin(self.read_impl(offset, len))
    }
}
