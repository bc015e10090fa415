//! Dirty bitmaps that go with the machine (QEMU: `migration/block-dirty-bitmap.c`, the
//! `dirty-bitmaps` capability), in QEMU's `dirty-bitmap` section: each bitmap announced
//! (granularity, enabled, persistent) when the migration starts, its bits and its end when
//! the machine has stopped. A bitmap of a named drive goes by the drive's name, any other
//! by its node's name; the destination finds its node by the same name and makes the
//! bitmap there. A migrating bitmap is not stored in its image by the source: the
//! destination stores it.
//!
//! Not done: `block-bitmap-mapping` (aliases), postcopy.

use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{Graph, Node};
use std::rc::Rc;

/// The section's name in the stream.
pub(crate) const SECTION: &str = "dirty-bitmap";

/// Chunk header flags.
const EOS: u8 = 0x01;
const ZEROES: u8 = 0x02;
const BITMAP_NAME: u8 = 0x04;
const DEVICE_NAME: u8 = 0x08;
const START: u8 = 0x10;
const COMPLETE: u8 = 0x20;
const BITS: u8 = 0x40;
/// Flags longer than one byte (QEMU never sends them).
const EXTRA_FLAGS: u8 = 0x80;

/// A START chunk's bitmap flags.
const START_ENABLED: u8 = 0x01;
const START_PERSISTENT: u8 = 0x02;
const START_RESERVED: u8 = 0xf8;

/// 64-granule words per BITS chunk (QEMU's chunks hold 1 KiB of bits).
const CHUNK_WORDS: u64 = 128;
const SECTOR: u64 = 512;

/// A bitmap going out, under the name its node goes by.
pub(crate) struct Outgoing {
    node: Rc<Node>,
    alias: String,
    bitmap: Rc<DirtyBitmap>,
}

/// The bitmaps that migrate, marked not to be stored here, in QEMU's order: those of
/// named drives first, then every other node's.
///
/// # Errors
/// QEMU's texts for a bitmap on a node without a name, or with a generated one, or one
/// whose name is too long; a bitmap in use or inconsistent.
pub(crate) fn select(graph: &Graph) -> Result<Vec<Outgoing>, String> {
    let mut out = Vec::new();
    let mut done: Vec<Rc<Node>> = Vec::new();
    for blk in graph.backends() {
        let name = blk.name();
        let Some(mut node) = blk.node() else { continue };
        if name.is_empty() {
            continue;
        }
        // Filters without bitmaps are looked through.
        while node.bitmaps().iter().all(|b| b.name().is_empty())
            && let Some(below) = node.filtered()
        {
            node = below;
        }
        if node.filtered().is_none() {
            add(&mut out, &node, &name)?;
            done.push(node);
        }
    }
    for node in graph.nodes() {
        if !done.iter().any(|d| Rc::ptr_eq(d, &node)) {
            add(&mut out, &node, node.name())?;
        }
    }
    for o in &out {
        o.bitmap.set_skip_store(true);
    }
    Ok(out)
}

/// A migration that did not go through: its bitmaps are this process's to store again.
pub(crate) fn stay(bitmaps: &[Outgoing]) {
    for o in bitmaps {
        o.bitmap.set_skip_store(false);
    }
}

fn add(out: &mut Vec<Outgoing>, node: &Rc<Node>, alias: &str) -> Result<(), String> {
    let named: Vec<_> = node
        .bitmaps()
        .into_iter()
        .filter(|b| !b.name().is_empty())
        .collect();
    let Some(first) = named.first() else {
        return Ok(());
    };
    if alias.is_empty() {
        return Err(format!(
            "Bitmap '{}' in unnamed node can't be migrated",
            first.name()
        ));
    }
    if alias.starts_with('#') {
        return Err(format!(
            "Bitmap '{}' in a node with auto-generated name '{alias}' can't be migrated",
            first.name()
        ));
    }
    for b in named {
        if b.is_busy() {
            return Err(format!(
                "Bitmap '{}' is currently in use by another operation and cannot be used",
                b.name()
            ));
        }
        if b.is_inconsistent() {
            return Err(format!(
                "Bitmap '{}' is inconsistent and cannot be used",
                b.name()
            ));
        }
        if b.name().len() > 255 {
            return Err(format!(
                "Cannot migrate bitmap '{}' on node '{alias}': Name is longer than 255 bytes",
                b.name()
            ));
        }
        out.push(Outgoing {
            node: node.clone(),
            alias: alias.to_owned(),
            bitmap: b,
        });
    }
    Ok(())
}

/// Writes chunk headers, naming the node and the bitmap where they changed.
#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    last: Option<(String, String)>,
}

impl Writer {
    fn header(&mut self, o: &Outgoing, flags: u8) {
        let (last_node, last_bitmap) = self.last.take().unzip();
        let mut flags = flags;
        let new_node = last_node.as_deref() != Some(o.alias.as_str());
        let new_bitmap = new_node || last_bitmap.as_deref() != Some(o.bitmap.name());
        if new_node {
            flags |= DEVICE_NAME;
        }
        if new_bitmap {
            flags |= BITMAP_NAME;
        }
        self.out.push(flags);
        if new_node {
            counted(&mut self.out, &o.alias);
        }
        if new_bitmap {
            counted(&mut self.out, o.bitmap.name());
        }
        self.last = Some((o.alias.clone(), o.bitmap.name().to_owned()));
    }
}

fn counted(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// The body of the section that starts the migration: each bitmap announced.
pub(crate) fn start_body(bitmaps: &[Outgoing]) -> Vec<u8> {
    let mut w = Writer::default();
    for o in bitmaps {
        w.header(o, START);
        w.out
            .extend_from_slice(&(o.bitmap.granularity() as u32).to_be_bytes());
        let mut flags = 0;
        if o.bitmap.is_enabled() {
            flags |= START_ENABLED;
        }
        if o.bitmap.is_persistent() {
            flags |= START_PERSISTENT;
        }
        w.out.push(flags);
    }
    w.out.push(EOS);
    w.out
}

/// The body of the section that ends it: each bitmap's bits, then its end.
pub(crate) fn end_body(bitmaps: &[Outgoing]) -> Vec<u8> {
    let mut w = Writer::default();
    for o in bitmaps {
        let gran = o.bitmap.granularity();
        let total_sectors = o.node.len() / SECTOR;
        let sectors_per_chunk = CHUNK_WORDS * 64 * (gran / SECTOR).max(1);
        let mut sector = 0;
        while sector < total_sectors {
            let n = (total_sectors - sector).min(sectors_per_chunk);
            let first_granule = sector * SECTOR / gran;
            let granules = ((sector + n) * SECTOR).div_ceil(gran) - first_granule;
            let words = o.bitmap.words(
                (first_granule / 64) as usize,
                granules.div_ceil(64) as usize,
            );
            let zero = words.iter().all(|w| *w == 0);
            w.header(o, if zero { BITS | ZEROES } else { BITS });
            w.out.extend_from_slice(&sector.to_be_bytes());
            w.out.extend_from_slice(&(n as u32).to_be_bytes());
            if !zero {
                // QEMU pads the buffer to 32 bytes.
                let size = (words.len() * 8).next_multiple_of(32);
                w.out.extend_from_slice(&(size as u64).to_be_bytes());
                let start = w.out.len();
                for word in &words {
                    w.out.extend_from_slice(&word.to_le_bytes());
                }
                w.out.resize(start + size, 0);
            }
            sector += n;
        }
        w.header(o, COMPLETE);
    }
    w.out.push(EOS);
    w.out
}

/// A bitmap coming in.
pub(crate) struct Incoming {
    alias: String,
    name: String,
    granularity: u64,
    enabled: bool,
    persistent: bool,
    /// Granule words set, by word index.
    words: Vec<(usize, Vec<u64>)>,
}

/// Reads the bitmaps' chunks up to the end of a section's body.
#[derive(Default)]
pub(crate) struct Loader {
    pub(crate) bitmaps: Vec<Incoming>,
    node: Option<String>,
    bitmap: Option<String>,
}

/// A cursor over a section's body; `None` when it runs short.
pub(crate) trait Source {
    fn take(&mut self, n: usize) -> Option<&[u8]>;
}

fn u8_of(r: &mut dyn Source) -> Option<u8> {
    r.take(1).map(|b| b[0])
}

fn be32(r: &mut dyn Source) -> Option<u32> {
    r.take(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be64(r: &mut dyn Source) -> Option<u64> {
    let b = r.take(8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

fn counted_in(r: &mut dyn Source) -> Option<String> {
    let n = usize::from(u8_of(r)?);
    Some(String::from_utf8_lossy(r.take(n)?).into_owned())
}

impl Loader {
    /// Reads chunks up to one that ends the section's part (EOS).
    ///
    /// # Errors
    /// QEMU's reports for a chunk it cannot take.
    pub(crate) fn read(&mut self, r: &mut dyn Source) -> Result<(), String> {
        let short = || "Unable to read the dirty bitmap stream".to_owned();
        loop {
            let flags = u8_of(r).ok_or_else(short)?;
            if flags & EXTRA_FLAGS != 0 {
                return Err(format!(
                    "Unknown flags in the dirty bitmap stream: {flags:#x}"
                ));
            }
            if flags & DEVICE_NAME != 0 {
                self.node = Some(counted_in(r).ok_or("Unable to read node alias string")?);
            }
            if flags & BITMAP_NAME != 0 {
                self.bitmap = Some(counted_in(r).ok_or("Unable to read bitmap alias string")?);
            }
            let nothing = flags & !EOS == 0;
            let (node, name) = match (&self.node, &self.bitmap) {
                (Some(n), Some(b)) => (n.clone(), b.clone()),
                _ if nothing => return Ok(()),
                _ => return Err("Error: block device name is not set".into()),
            };
            if flags & START != 0 {
                let granularity = u64::from(be32(r).ok_or_else(short)?);
                let start_flags = u8_of(r).ok_or_else(short)?;
                if start_flags & START_RESERVED != 0 {
                    return Err(format!(
                        "Unknown flags in migrated dirty bitmap header: {start_flags:x}"
                    ));
                }
                if self
                    .bitmaps
                    .iter()
                    .any(|b| b.alias == node && b.name == name)
                {
                    return Err(format!(
                        "Bitmap with the same name ('{name}') already exists on destination"
                    ));
                }
                self.bitmaps.push(Incoming {
                    alias: node,
                    name,
                    granularity,
                    enabled: start_flags & START_ENABLED != 0,
                    persistent: start_flags & START_PERSISTENT != 0,
                    words: Vec::new(),
                });
            } else if flags & BITS != 0 {
                let sector = be64(r).ok_or_else(short)?;
                let _sectors = be32(r).ok_or_else(short)?;
                let this = self
                    .bitmaps
                    .iter_mut()
                    .find(|b| b.alias == node && b.name == name)
                    .ok_or_else(|| {
                        format!("Error: unknown dirty bitmap '{name}' for block device '{node}'")
                    })?;
                if flags & ZEROES == 0 {
                    let size = be64(r).ok_or_else(short)?;
                    // QEMU's own bound: a chunk is 1 KiB, a little more is let through.
                    if size > 10 * 1024 {
                        return Err("Bitmap migration stream buffer allocation request is \
                                    too large"
                            .into());
                    }
                    let bytes = r.take(size as usize).ok_or("Failed to read bitmap bits")?;
                    let words = bytes
                        .chunks_exact(8)
                        .map(|c| {
                            let mut a = [0u8; 8];
                            a.copy_from_slice(c);
                            u64::from_le_bytes(a)
                        })
                        .collect();
                    let first_granule = sector.saturating_mul(SECTOR) / this.granularity.max(1);
                    this.words.push(((first_granule / 64) as usize, words));
                }
            }
            // COMPLETE needs nothing more: the bitmap is made once the stream is read.
            if flags & EOS != 0 {
                return Ok(());
            }
        }
    }
}

/// Makes the bitmaps that came in on the nodes going by their names.
///
/// # Errors
/// QEMU's reports for a name no node goes by, a bitmap already there, a bad granularity.
pub(crate) fn apply(graph: &Graph, bitmaps: Vec<Incoming>) -> Result<(), String> {
    for b in bitmaps {
        let node = graph.lookup(&b.alias).map_err(|e| e.to_string())?;
        if node.bitmap(&b.name).is_some() {
            return Err(format!(
                "Bitmap with the same name ('{}') already exists on destination",
                b.name
            ));
        }
        if !b.granularity.is_power_of_two() || !(512..=1 << 31).contains(&b.granularity) {
            return Err(format!(
                "Granularity must be power of 2 between 512 and 2147483648 (bitmap '{}')",
                b.name
            ));
        }
        let bitmap = DirtyBitmap::new(&b.name, b.granularity, node.len(), b.enabled);
        bitmap.set_persistent(b.persistent);
        for (from, words) in &b.words {
            bitmap.or_words(*from, words);
        }
        node.add_bitmap(bitmap);
    }
    Ok(())
}
