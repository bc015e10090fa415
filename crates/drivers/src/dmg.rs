//! `dmg`: Apple's disk images (UDIF), read-only as in QEMU (block/dmg.c). A 512-byte
//! trailer (`koly`) at the end names the data fork and either a property list (XML) or a
//! resource fork; both hold `mish` blocks (base64 in the XML), each a table of chunks: a run
//! of the disk's sectors stored raw, as zeroes, zlib- or bzip2-compressed.
//!
//! As under QEMU: its checks in its order and words (an image it cannot make sense of is
//! "Could not open 'FILE': Invalid argument"); a sector no chunk covers, or a chunk that
//! does not inflate to exactly its sectors, fails the read with EIO; chunk types it does not
//! know are left out with its warning, once per process. The image is probed by its name
//! (`.dmg`), as QEMU probes it. Beyond QEMU: bzip2 chunks are read (QEMU needs its
//! `dmg-bz2` module, which Debian does not ship; without it they read as EIO); requests
//! inflate their chunks side by side (QEMU serialises every request and keeps one chunk);
//! a raw chunk shorter than its sectors reads zeroes after its bytes (QEMU: whatever its
//! buffer held).

use crate::blockmap;
use crate::error::generic;
use ferrite_block::driver::Driver;
use ferrite_block::io::pool;
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};

const SECTOR: u64 = 512;
/// The largest chunk QEMU reads, compressed or not.
const LENGTHS_MAX: u64 = 64 << 20;
const SECTORCOUNTS_MAX: u64 = LENGTHS_MAX / SECTOR;
/// The largest property list QEMU reads.
const PLIST_MAX: u64 = 16 << 20;
/// Bytes of a `mish` block before its chunk table, and of a table entry.
const MISH_HEADER: usize = 204;
const CHUNK_ENTRY: usize = 40;

/// Chunk types (QEMU's names).
const UDZE: u32 = 0;
const UDRW: u32 = 1;
const UDIG: u32 = 2;
const UDZO: u32 = 0x8000_0005;
const UDBZ: u32 = 0x8000_0006;
const ULFO: u32 = 0x8000_0007;
const UDCM: u32 = 0x7fff_fffe;
const UDLE: u32 = 0xffff_ffff;

/// How a chunk's sectors are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    Zeroes,
    Raw,
    Zlib,
    Bzip2,
}

#[derive(Clone, Copy, Debug)]
struct Chunk {
    storage: Storage,
    /// First sector and sector count on the disk.
    sector: u64,
    count: u64,
    /// Where its bytes are in the file.
    offset: u64,
    length: u64,
}

/// The `dmg` driver's factory.
pub(crate) struct DmgFactory;

impl DriverFactory for DmgFactory {
    fn name(&self) -> &'static str {
        "dmg"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU recognises a dmg image by its name only.
    fn probe_name(&self, filename: &str) -> bool {
        filename.len() > 4 && filename.ends_with(".dmg")
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = blockmap::open_read_only_file(ctx).await?;
            let invalid = || {
                generic(format!(
                    "Could not open '{}': Invalid argument",
                    file.node().filename()
                ))
            };
            let (chunks, size) = match read_layout(&file).await? {
                Ok(layout) => layout,
                Err(Invalid) => return Err(invalid()),
            };
            Ok(Box::new(Dmg {
                file,
                chunks,
                size,
                last: RefCell::new(None),
                read_only: Cell::new(true),
            }) as Box<dyn Driver>)
        })
    }
}

/// An image QEMU's open fails with EINVAL (and no words of its own).
struct Invalid;

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]])
    })
}

/// Reads `len` bytes at `offset`, zeroes past the file's end (QEMU's reads of a file
/// node past its end).
async fn read_padded(file: &Child, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let end = file.len();
    let mut out = vec![0u8; len];
    if offset < end {
        let n = (end - offset).min(len as u64) as usize;
        let got = file.read(offset, n).await?;
        out[..n].copy_from_slice(&got[..n]);
    }
    Ok(out)
}

/// The chunks and the disk's size, as QEMU's `dmg_open` finds them.
async fn read_layout(file: &Child) -> ferrite_block::Result<Result<(Vec<Chunk>, u64), Invalid>> {
    let failed = |e: io::Error| generic(ferrite_qapi::os_msg(&e));
    let length = file.len();
    if length < 512 {
        return Err(generic("dmg file must be at least 512 bytes long"));
    }
    // The trailer may start anywhere in the last 515 bytes' first 512 (an image of an odd
    // size).
    let start = length.saturating_sub(511 + 512);
    let window = file
        .read(start, (length - start).min(515) as usize)
        .await
        .map_err(|e| {
            generic(format!(
                "Failed while reading UDIF trailer: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
    let Some(at) = window.windows(4).position(|w| w == b"koly") else {
        return Err(generic("Could not locate UDIF trailer in dmg file"));
    };
    let koly = start + at as u64;
    let trailer = read_padded(file, koly, 512).await.map_err(failed)?;
    let data_fork = be64(&trailer, 0x18);
    if data_fork > koly {
        return Ok(Err(Invalid));
    }
    let (rsrc_offset, rsrc_length) = (be64(&trailer, 0x28), be64(&trailer, 0x30));
    if rsrc_offset >= koly || rsrc_length > koly - rsrc_offset {
        return Ok(Err(Invalid));
    }
    let (xml_offset, xml_length) = (be64(&trailer, 0xd8), be64(&trailer, 0xe0));
    if xml_offset >= koly || xml_length > koly - xml_offset {
        return Ok(Err(Invalid));
    }
    let sectors = be64(&trailer, 0x1ec);
    if (sectors as i64) < 0 {
        return Ok(Err(Invalid));
    }
    let mut table = Table {
        data_fork,
        chunks: Vec::new(),
    };
    let blocks = if rsrc_length != 0 {
        resource_fork_blocks(file, rsrc_offset, rsrc_length)
            .await
            .map_err(failed)?
    } else if xml_length != 0 {
        if xml_length > PLIST_MAX {
            return Ok(Err(Invalid));
        }
        match file.read(xml_offset, xml_length as usize).await {
            Ok(xml) => Some(plist_blocks(&xml)),
            Err(_) => return Ok(Err(Invalid)),
        }
    } else {
        None
    };
    let Some(blocks) = blocks else {
        return Ok(Err(Invalid));
    };
    for block in blocks {
        if table.add_mish(&block).is_err() {
            return Ok(Err(Invalid));
        }
    }
    Ok(Ok((table.chunks, sectors.wrapping_mul(SECTOR))))
}

/// The `mish` blocks of a resource fork; `None` where its layout is wrong.
async fn resource_fork_blocks(
    file: &Child,
    begin: u64,
    length: u64,
) -> io::Result<Option<Vec<Vec<u8>>>> {
    let head = read_padded(file, begin, 12).await?;
    let data_offset = u64::from(be32(&head, 0));
    let count = u64::from(be32(&head, 8));
    if data_offset > length || count == 0 || data_offset + count > length {
        return Ok(None);
    }
    let mut at = begin + data_offset;
    let end = at + count;
    let mut blocks = Vec::new();
    while at < end {
        let size = u64::from(be32(&read_padded(file, at, 4).await?, 0));
        if size == 0 || size > end - at {
            return Ok(None);
        }
        at += 4;
        blocks.push(read_padded(file, at, size as usize).await?);
        at += size;
    }
    Ok(Some(blocks))
}

/// The `mish` blocks of a property list: the base64 between each `<data>` and the
/// `</data>` after it (QEMU's search, not an XML parser; a `<data>` left open makes the
/// image invalid, given as an empty last block that fails).
fn plist_blocks(xml: &[u8]) -> Vec<Vec<u8>> {
    // QEMU's search stops at a NUL, as C strings do.
    let end = xml.iter().position(|&b| b == 0).unwrap_or(xml.len());
    let xml = &xml[..end];
    let mut blocks = Vec::new();
    let mut rest = xml;
    while let Some(open) = find(rest, b"<data>") {
        let body = &rest[open + 6..];
        let Some(close) = find(body, b"</data>") else {
            blocks.push(MALFORMED.to_vec());
            break;
        };
        blocks.push(base64_lenient(&body[..close]));
        rest = &body[close + 7..];
    }
    blocks
}

/// Stands for a property list whose `<data>` never closes: a block [`Table::add_mish`]
/// refuses.
const MALFORMED: &[u8] = b"\0malformed";

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Base64 as GLib's `g_base64_decode` reads it: characters outside the alphabet skipped,
/// `=` ending the data.
fn base64_lenient(text: &[u8]) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in text {
        if c == b'=' {
            break;
        }
        let Some(v) = value(c) else { continue };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

struct Table {
    data_fork: u64,
    chunks: Vec<Chunk>,
}

/// QEMU's warnings for chunks it leaves out, each printed once per process.
static WARNED_LZFSE: AtomicBool = AtomicBool::new(false);
static WARNED_UNKNOWN: AtomicBool = AtomicBool::new(false);

fn warn_once(flag: &AtomicBool, text: &str) {
    if !flag.swap(true, Ordering::Relaxed) {
        ferrite_block::report::warn_report(text);
    }
}

impl Table {
    /// Adds the chunks of one `mish` block (QEMU's `dmg_read_mish_block`): anything else
    /// is skipped; a chunk over QEMU's limits is an error (reported as QEMU reports it).
    fn add_mish(&mut self, b: &[u8]) -> Result<(), Invalid> {
        if b == MALFORMED {
            return Err(Invalid);
        }
        if be32(b, 0) != 0x6d69_7368 || b.len() < 244 {
            return Ok(());
        }
        let out_offset = be64(b, 8);
        let in_offset = self.data_fork.wrapping_add(be64(b, 0x18));
        for e in b[MISH_HEADER..].chunks_exact(CHUNK_ENTRY) {
            let kind = be32(e, 0);
            let storage = match kind {
                UDZE | UDIG => Storage::Zeroes,
                UDRW => Storage::Raw,
                UDZO => Storage::Zlib,
                UDBZ => Storage::Bzip2,
                ULFO => {
                    warn_once(
                        &WARNED_LZFSE,
                        "dmg-lzfse module is missing, accessing lzfse compressed blocks will result in I/O errors",
                    );
                    continue;
                }
                UDCM | UDLE => continue,
                other => {
                    warn_once(
                        &WARNED_UNKNOWN,
                        &format!(
                            "Image contains chunks of unknown type {other:x}, accessing them will result in I/O errors"
                        ),
                    );
                    continue;
                }
            };
            let index = self.chunks.len();
            let count = be64(e, 0x10);
            if storage != Storage::Zeroes && count > SECTORCOUNTS_MAX {
                ferrite_block::report::error_report(&format!(
                    "sector count {count} for chunk {index} is larger than max ({SECTORCOUNTS_MAX})"
                ));
                return Err(Invalid);
            }
            let length = be64(e, 0x20);
            if length > LENGTHS_MAX {
                ferrite_block::report::error_report(&format!(
                    "length {length} for chunk {index} is larger than max ({LENGTHS_MAX})"
                ));
                return Err(Invalid);
            }
            self.chunks.push(Chunk {
                storage,
                sector: be64(e, 8).wrapping_add(out_offset),
                count,
                offset: be64(e, 0x18).wrapping_add(in_offset),
                length,
            });
        }
        Ok(())
    }
}

/// A node of the `dmg` driver.
struct Dmg {
    file: Rc<Child>,
    chunks: Vec<Chunk>,
    size: u64,
    /// The last chunk read: its index and bytes.
    last: RefCell<Option<(usize, Rc<Vec<u8>>)>>,
    read_only: Cell<bool>,
}

/// The chunk holding `sector`, found as QEMU's binary search finds it (the chunks are in
/// the order the image lists them, sorted in any image QEMU reads correctly).
fn search(chunks: &[Chunk], sector: u64) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, chunks.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        let c = &chunks[mid];
        if c.sector > sector {
            hi = mid;
        } else if c.sector.saturating_add(c.count) > sector {
            return Some(mid);
        } else {
            lo = mid + 1;
        }
    }
    None
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Dmg {
    /// Chunk `i`'s sectors (not for zero chunks).
    async fn chunk(&self, i: usize) -> io::Result<Rc<Vec<u8>>> {
        if let Some((n, bytes)) = &*self.last.borrow()
            && *n == i
        {
            return Ok(bytes.clone());
        }
        let c = self.chunks[i];
        let size = (c.count * SECTOR) as usize;
        // Past the file's end reads zeroes, as QEMU's file reads do.
        let packed = read_padded(&self.file, c.offset, c.length as usize)
            .await
            .map_err(|_| eio())?;
        let out = match c.storage {
            Storage::Raw => {
                let mut out = packed;
                out.resize(size.max(out.len()), 0);
                out
            }
            Storage::Zlib | Storage::Bzip2 => {
                let storage = c.storage;
                let out = tokio::task::spawn_blocking(move || inflate(storage, &packed, size))
                    .await
                    .map_err(io::Error::other)?;
                out.ok_or_else(eio)?
            }
            Storage::Zeroes => vec![0u8; size],
        };
        let out = Rc::new(out);
        *self.last.borrow_mut() = Some((i, out.clone()));
        Ok(out)
    }

    async fn read_impl(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = pool::take(len);
        let mut done = 0usize;
        while done < len {
            let sector = (offset + done as u64) / SECTOR;
            let i = search(&self.chunks, sector).ok_or_else(eio)?;
            let c = self.chunks[i];
            // The request's sectors in this chunk.
            let n = ((c.sector + c.count - sector) * SECTOR).min((len - done) as u64) as usize;
            let dest = &mut out[done..done + n];
            if c.storage == Storage::Zeroes {
                dest.fill(0);
            } else {
                let bytes = self.chunk(i).await?;
                let at = ((sector - c.sector) * SECTOR) as usize;
                dest.copy_from_slice(bytes.get(at..at + n).ok_or_else(eio)?);
            }
            done += n;
        }
        Ok(out)
    }
}

/// A compressed chunk inflated to exactly `size` bytes, or `None`.
fn inflate(storage: Storage, packed: &[u8], size: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(size);
    match storage {
        Storage::Zlib => {
            let mut z = flate2::Decompress::new(true);
            let status = z
                .decompress_vec(packed, &mut out, flate2::FlushDecompress::Finish)
                .ok()?;
            (status == flate2::Status::StreamEnd).then_some(())?;
        }
        Storage::Bzip2 => {
            use std::io::Read;
            // One byte more than fits shows a chunk inflating past its sectors.
            bzip2::read::BzDecoder::new(packed)
                .take(size as u64 + 1)
                .read_to_end(&mut out)
                .ok()?;
        }
        Storage::Raw | Storage::Zeroes => return None,
    }
    (out.len() == size).then_some(out)
}

impl Driver for Dmg {
    blockmap::read_only_format_answers!("dmg");

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_skips_what_glib_skips() {
        assert_eq!(base64_lenient(b"aGVs\n\tbG8="), b"hello");
        assert_eq!(base64_lenient(b"  aGVsbG8gd29ybGQ=\n"), b"hello world");
    }

    #[test]
    fn property_lists_give_their_data_blocks() {
        let xml = b"<plist><data>\n\tbWlzaA==\n</data><key>x</key><data>YQ==</data></plist>";
        assert_eq!(plist_blocks(xml), vec![b"mish".to_vec(), b"a".to_vec()]);
        assert_eq!(plist_blocks(b"<data>YQ=="), vec![MALFORMED.to_vec()]);
    }

    #[test]
    fn chunks_are_found_by_sector() {
        let c = |sector, count| Chunk {
            storage: Storage::Raw,
            sector,
            count,
            offset: 0,
            length: 0,
        };
        let chunks = [c(0, 4), c(4, 1), c(8, 8)];
        assert_eq!(search(&chunks, 0), Some(0));
        assert_eq!(search(&chunks, 4), Some(1));
        assert_eq!(search(&chunks, 5), None);
        assert_eq!(search(&chunks, 15), Some(2));
        assert_eq!(search(&chunks, 16), None);
    }
}
