//! Dirty bitmaps that go with the machine (QEMU: `migration/block-dirty-bitmap.c`, the
//! `dirty-bitmaps` capability), in QEMU's `dirty-bitmap` section: each bitmap announced
//! (granularity, enabled, persistent) when the migration starts, its bits and its end when
//! the machine has stopped. A bitmap of a named drive goes by the drive's name, any other
//! by its node's name; the destination finds its node by the same name and makes the
//! bitmap there. A migrating bitmap is not stored in its image by the source: the
//! destination stores it.
//!
//! The `block-bitmap-mapping` parameter replaces those names: a source sends only the
//! nodes and bitmaps it maps, under their aliases; a destination finds them by alias.
//!
//! Not done: postcopy.

use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{Graph, Node};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// A bitmap's alias in `block-bitmap-mapping`.
#[derive(Clone)]
pub(crate) struct BitmapAlias {
    name: String,
    alias: String,
    /// `transform.persistent`: the persistence the bitmap takes on the destination.
    persistent: Option<bool>,
}

/// A node's alias in `block-bitmap-mapping`, with its bitmaps'.
#[derive(Clone)]
pub(crate) struct NodeAlias {
    node: String,
    alias: String,
    bitmaps: Vec<BitmapAlias>,
}

/// The `block-bitmap-mapping` migration parameter.
#[derive(Clone, Default)]
pub(crate) struct Mapping(Vec<NodeAlias>);

/// QEMU's `id_wellformed`: a letter, then letters, digits, '-', '.' and '_'.
fn well_formed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// QEMU's refusal of a `what` longer than `max` bytes.
fn at_most(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("The {what} '{value}' is longer than {max} bytes"));
    }
    Ok(())
}

/// The longest node name QEMU keeps, and bitmap name it takes.
const MAX_NODE_NAME: usize = 31;
const MAX_BITMAP_NAME: usize = 1023;

impl Mapping {
    /// Reads the parameter's value (the schema checked its shape) and checks it both ways,
    /// as QEMU does: each name and alias used once, aliases short and well-formed.
    ///
    /// # Errors
    /// QEMU's "Invalid mapping given for block-bitmap-mapping: ...".
    pub(crate) fn parse(v: &QObject) -> Result<Mapping, String> {
        let str_of = |d: &QDict, k: &str| {
            d.get(k)
                .and_then(QObject::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let mut nodes = Vec::new();
        for n in v.as_list().unwrap_or_default() {
            let Some(n) = n.as_dict() else { continue };
            let bitmaps = n
                .get("bitmaps")
                .and_then(QObject::as_list)
                .unwrap_or_default()
                .iter()
                .filter_map(QObject::as_dict)
                .map(|b| BitmapAlias {
                    name: str_of(b, "name"),
                    alias: str_of(b, "alias"),
                    persistent: b
                        .get("transform")
                        .and_then(QObject::as_dict)
                        .and_then(|t| t.get("persistent"))
                        .and_then(QObject::as_bool),
                })
                .collect();
            nodes.push(NodeAlias {
                node: str_of(n, "node-name"),
                alias: str_of(n, "alias"),
                bitmaps,
            });
        }
        let m = Mapping(nodes);
        m.check(true)
            .and_then(|()| m.check(false))
            .map_err(|e| format!("Invalid mapping given for block-bitmap-mapping: {e}"))?;
        Ok(m)
    }

    /// QEMU's `construct_alias_map` checks, from names to aliases (`out`) or back.
    fn check(&self, out: bool) -> Result<(), String> {
        let mut seen_nodes: Vec<&str> = Vec::new();
        for n in &self.0 {
            if !well_formed(&n.alias) {
                return Err(format!("The node alias '{}' is not well-formed", n.alias));
            }
            at_most("node alias", &n.alias, 255)?;
            at_most("node name", &n.node, MAX_NODE_NAME)?;
            let key = if out { &n.node } else { &n.alias };
            if seen_nodes.contains(&key.as_str()) {
                return Err(if out {
                    format!("The node name '{}' is mapped twice", n.node)
                } else {
                    format!("The node alias '{}' is used twice", n.alias)
                });
            }
            seen_nodes.push(key);
            let mut seen: Vec<&str> = Vec::new();
            for b in &n.bitmaps {
                at_most("bitmap alias", &b.alias, 255)?;
                at_most("bitmap name", &b.name, MAX_BITMAP_NAME)?;
                let key = if out { &b.name } else { &b.alias };
                if seen.contains(&key.as_str()) {
                    return Err(if out {
                        format!("The bitmap '{}'/'{}' is mapped twice", n.node, b.name)
                    } else {
                        format!("The bitmap alias '{}'/'{}' is used twice", n.alias, b.alias)
                    });
                }
                seen.push(key);
            }
        }
        Ok(())
    }

    /// The parameter as `query-migrate-parameters` shows it.
    pub(crate) fn to_qobject(&self) -> QObject {
        QObject::List(
            self.0
                .iter()
                .map(|n| {
                    let bitmaps = n
                        .bitmaps
                        .iter()
                        .map(|b| {
                            let mut d = QDict::new()
                                .with("name", b.name.as_str())
                                .with("alias", b.alias.as_str());
                            if let Some(p) = b.persistent {
                                d.insert("transform", QDict::new().with("persistent", p));
                            }
                            d.into()
                        })
                        .collect();
                    QDict::new()
                        .with("node-name", n.node.as_str())
                        .with("alias", n.alias.as_str())
                        .with("bitmaps", QObject::List(bitmaps))
                        .into()
                })
                .collect(),
        )
    }

    /// The parameter as HMP's `info migrate_parameters` prints it.
    pub(crate) fn hmp(&self) -> String {
        let mut s = "block-bitmap-mapping:\r\n".to_owned();
        for n in &self.0 {
            s += &format!("  '{}' -> '{}'\r\n", n.node, n.alias);
            for b in &n.bitmaps {
                s += &format!("    '{}' -> '{}'\r\n", b.name, b.alias);
            }
        }
        s
    }

    /// The alias node `name` goes by, if mapped.
    fn node_alias(&self, name: &str) -> Option<&NodeAlias> {
        self.0.iter().find(|n| n.node == name)
    }

    /// The node that goes by `alias`, if mapped.
    fn node_named(&self, alias: &str) -> Option<&NodeAlias> {
        self.0.iter().find(|n| n.alias == alias)
    }
}

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
    bitmap_alias: String,
    persistent: bool,
    bitmap: Rc<DirtyBitmap>,
}

/// The bitmaps that migrate, marked not to be stored here, in QEMU's order: those of
/// named drives first, then every other node's.
///
/// # Errors
/// QEMU's texts for a bitmap on a node without a name, or with a generated one, or one
/// whose name is too long; a bitmap in use or inconsistent.
pub(crate) fn select(graph: &Graph, mapping: Option<&Mapping>) -> Result<Vec<Outgoing>, String> {
    let out = match mapping {
        // Only what is mapped goes, under its alias.
        Some(map) => {
            let mut out = Vec::new();
            for node in graph.nodes() {
                if let Some(n) = map.node_alias(node.name()) {
                    add(&mut out, &node, &n.alias, Some(&n.bitmaps))?;
                }
            }
            out
        }
        None => by_name(graph)?,
    };
    for o in &out {
        o.bitmap.set_skip_store(true);
    }
    Ok(out)
}

/// Without a mapping: named drives' bitmaps under the drive's name, then every other
/// node's under the node's.
fn by_name(graph: &Graph) -> Result<Vec<Outgoing>, String> {
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
            add(&mut out, &node, &name, None)?;
            done.push(node);
        }
    }
    for node in graph.nodes() {
        if !done.iter().any(|d| Rc::ptr_eq(d, &node)) {
            add(&mut out, &node, node.name(), None)?;
        }
    }
    Ok(out)
}

/// A migration that did not go through: its bitmaps are this process's to store again.
pub(crate) fn stay(bitmaps: &[Outgoing]) {
    for o in bitmaps {
        o.bitmap.set_skip_store(false);
    }
}

/// Marks the migrating bitmaps in use (nobody may change or remove them while they go), or
/// lets them be again.
pub(crate) fn set_migrating(bitmaps: &[Outgoing], on: bool) {
    for o in bitmaps {
        o.bitmap.set_in_use(on);
    }
}

/// What is left to send of the bitmaps, in bytes of bits (QEMU's `dirty_bitmap_state_pending`:
/// what could go after the destination runs).
pub(crate) fn pending_bytes(bitmaps: &[Outgoing]) -> u64 {
    bitmaps
        .iter()
        .map(|o| (o.node.len() / SECTOR * SECTOR).div_ceil(o.bitmap.granularity()))
        .sum::<u64>()
        .div_ceil(8)
}

fn add(
    out: &mut Vec<Outgoing>,
    node: &Rc<Node>,
    alias: &str,
    aliases: Option<&[BitmapAlias]>,
) -> Result<(), String> {
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
        let (bitmap_alias, persistent) = match aliases {
            // Unmapped bitmaps stay.
            Some(list) => match list.iter().find(|a| a.name == b.name()) {
                Some(a) => (a.alias.clone(), a.persistent.unwrap_or(b.is_persistent())),
                None => continue,
            },
            None => {
                if b.name().len() > 255 {
                    return Err(format!(
                        "Cannot migrate bitmap '{}' on node '{alias}': Name is longer than \
                         255 bytes",
                        b.name()
                    ));
                }
                (b.name().to_owned(), b.is_persistent())
            }
        };
        out.push(Outgoing {
            node: node.clone(),
            alias: alias.to_owned(),
            bitmap_alias,
            persistent,
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
        let new_bitmap = new_node || last_bitmap.as_deref() != Some(o.bitmap_alias.as_str());
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
            counted(&mut self.out, &o.bitmap_alias);
        }
        self.last = Some((o.alias.clone(), o.bitmap_alias.clone()));
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
        if o.persistent {
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
    /// Its end came (all its bits are in).
    complete: bool,
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
                    alias: node.clone(),
                    name: name.clone(),
                    granularity,
                    enabled: start_flags & START_ENABLED != 0,
                    persistent: start_flags & START_PERSISTENT != 0,
                    words: Vec::new(),
                    complete: false,
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
            if flags & COMPLETE != 0
                && let Some(this) = self
                    .bitmaps
                    .iter_mut()
                    .find(|b| b.alias == node && b.name == name)
            {
                this.complete = true;
            }
            if flags & EOS != 0 {
                return Ok(());
            }
        }
    }
}

/// Makes the bitmaps that came in on the nodes going by their names (or aliases), with
/// their bits. A name that leads nowhere is reported and no bitmap is made, as QEMU cancels
/// its bitmap migration (dropping those it made); the machine's migration goes on.
///
/// # Errors
/// QEMU's reports for a bitmap already there or a bad granularity: the migration fails.
pub(crate) fn apply(
    graph: &Graph,
    bitmaps: Vec<Incoming>,
    mapping: Option<&Mapping>,
) -> Result<(), String> {
    let placed = place(graph, &bitmaps, mapping)?;
    for (p, b) in placed.iter().zip(&bitmaps) {
        p.take_bits(b);
    }
    Ok(())
}

/// A bitmap made here for one that is coming in.
pub(crate) struct Placed {
    node: Rc<Node>,
    bitmap: Rc<DirtyBitmap>,
}

/// Makes the bitmaps announced so far, empty, on their nodes (each recording writes if the
/// source's did); see [`apply`]. A postcopy migration's come before their bits.
///
/// # Errors
/// As [`apply`].
pub(crate) fn place(
    graph: &Graph,
    bitmaps: &[Incoming],
    mapping: Option<&Mapping>,
) -> Result<Vec<Placed>, String> {
    let mut found = Vec::new();
    for b in bitmaps {
        match resolve(graph, b, mapping) {
            Ok(f) => found.push(f),
            Err(why) => {
                ferrite_block::report::error_report(&why);
                return Ok(Vec::new());
            }
        }
    }
    let mut placed = Vec::new();
    for (b, (node, name, persistent)) in bitmaps.iter().zip(found) {
        if node.bitmap(&name).is_some() {
            return Err(format!(
                "Bitmap with the same name ('{name}') already exists on destination"
            ));
        }
        if !b.granularity.is_power_of_two() || !(512..=1 << 31).contains(&b.granularity) {
            return Err(format!(
                "Granularity must be power of 2 between 512 and 2147483648 (bitmap '{name}')"
            ));
        }
        let bitmap = DirtyBitmap::new(&name, b.granularity, node.len(), b.enabled);
        bitmap.set_persistent(persistent);
        node.add_bitmap(bitmap.clone());
        placed.push(Placed { node, bitmap });
    }
    Ok(placed)
}

impl Placed {
    /// Sets the bits that came in for it.
    fn take_bits(&self, b: &Incoming) {
        for (from, words) in &b.words {
            self.bitmap.or_words(*from, words);
        }
    }
}

/// A postcopy migration's bitmaps are in use, and not stored, until their bits are in.
pub(crate) fn set_arriving(placed: &[Placed], on: bool) {
    for p in placed {
        p.bitmap.set_in_use(on);
        p.bitmap.set_skip_store(on);
    }
}

/// The end of a postcopy migration's stream: complete bitmaps take their bits and are free;
/// the others (the source went away first) are dropped, as QEMU cancels them.
pub(crate) fn finish(placed: &[Placed], bitmaps: &[Incoming]) {
    set_arriving(placed, false);
    for (p, b) in placed.iter().zip(bitmaps) {
        if b.complete {
            p.take_bits(b);
        } else {
            p.node.remove_bitmap(&p.bitmap);
        }
    }
}

/// The node, name and persistence an incoming bitmap takes here.
fn resolve(
    graph: &Graph,
    b: &Incoming,
    mapping: Option<&Mapping>,
) -> Result<(Rc<Node>, String, bool), String> {
    let Some(map) = mapping else {
        let node = graph.lookup(&b.alias).map_err(|e| e.to_string())?;
        return Ok((node, b.name.clone(), b.persistent));
    };
    let n = map
        .node_named(&b.alias)
        .ok_or_else(|| format!("Error: Unknown node alias '{}'", b.alias))?;
    let node = graph.lookup_node(&n.node).map_err(|e| e.to_string())?;
    let a = n
        .bitmaps
        .iter()
        .find(|a| a.alias == b.name)
        .ok_or_else(|| {
            format!(
                "Error: Unknown bitmap alias '{}' on node '{}' (alias '{}')",
                b.name, n.node, b.alias
            )
        })?;
    Ok((node, a.name.clone(), a.persistent.unwrap_or(b.persistent)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes<'a>(&'a [u8]);

    impl Source for Bytes<'_> {
        fn take(&mut self, n: usize) -> Option<&[u8]> {
            if n > self.0.len() {
                return None;
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Some(a)
        }
    }

    /// A START chunk for `node`/`name` at 64 KiB granularity, enabled and persistent,
    /// then one BITS chunk with granules 0 and 65 set, a ZEROES chunk and the end.
    fn stream() -> Vec<u8> {
        let mut s = vec![START | DEVICE_NAME | BITMAP_NAME, 4];
        s.extend_from_slice(b"node");
        s.push(2);
        s.extend_from_slice(b"b0");
        s.extend_from_slice(&65536u32.to_be_bytes());
        s.push(START_ENABLED | START_PERSISTENT);
        s.push(BITS);
        s.extend_from_slice(&0u64.to_be_bytes());
        s.extend_from_slice(&1024u32.to_be_bytes());
        s.extend_from_slice(&32u64.to_be_bytes());
        s.extend_from_slice(&1u64.to_le_bytes());
        s.extend_from_slice(&2u64.to_le_bytes());
        s.extend_from_slice(&[0; 16]);
        s.push(BITS | ZEROES);
        s.extend_from_slice(&1024u64.to_be_bytes());
        s.extend_from_slice(&1024u32.to_be_bytes());
        s.push(COMPLETE | EOS);
        s
    }

    #[test]
    fn reads_qemu_chunks() {
        let mut l = Loader::default();
        l.read(&mut Bytes(&stream())).unwrap();
        let [b] = &l.bitmaps[..] else {
            panic!("one bitmap")
        };
        assert_eq!((b.alias.as_str(), b.name.as_str()), ("node", "b0"));
        assert!(b.enabled && b.persistent && b.granularity == 65536);
        assert_eq!(b.words, vec![(0, vec![1, 2, 0, 0])]);
    }

    #[test]
    fn cut_or_damaged_streams_are_errors_not_panics() {
        let s = stream();
        for n in 0..s.len() {
            assert!(
                Loader::default().read(&mut Bytes(&s[..n])).is_err(),
                "cut at {n}"
            );
        }
        for i in 0..s.len() {
            for v in [0x00, 0x7f, 0x80, 0xff] {
                let mut d = s.clone();
                d[i] = v;
                let _ = Loader::default().read(&mut Bytes(&d));
            }
        }
        let mut twice = stream();
        twice.pop();
        twice.push(COMPLETE);
        twice.push(START | BITMAP_NAME);
        twice.extend_from_slice(&[2, b'b', b'0', 0, 1, 0, 0, 0, EOS]);
        assert_eq!(
            Loader::default().read(&mut Bytes(&twice)),
            Err("Bitmap with the same name ('b0') already exists on destination".into())
        );
    }
}
