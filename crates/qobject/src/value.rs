//! The value type: QEMU's QObject family (QNull, QBool, QNum, QString, QList, QDict).

use indexmap::IndexMap;

/// A JSON value as QEMU holds it. Integers that fit `i64` are [`QObject::Int`], larger
/// non-negative ones [`QObject::UInt`], anything else (fractions, exponents, overflow)
/// [`QObject::Double`]; the distinction is visible to argument checking.
#[derive(Debug, Clone, PartialEq)]
pub enum QObject {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An integer in `i64` range.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// A number with a fraction or exponent, or an integer beyond `u64`.
    Double(f64),
    /// A string (any Unicode text, NUL included).
    String(String),
    /// An array.
    List(Vec<QObject>),
    /// An object.
    Dict(QDict),
}

/// The JSON type of a value, in the words QEMU's errors use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    /// null
    Null,
    /// boolean
    Bool,
    /// number (int, uint or double)
    Number,
    /// string
    String,
    /// array
    List,
    /// object
    Dict,
}

impl QObject {
    /// The JSON type of this value.
    pub fn qtype(&self) -> QType {
        match self {
            QObject::Null => QType::Null,
            QObject::Bool(_) => QType::Bool,
            QObject::Int(_) | QObject::UInt(_) | QObject::Double(_) => QType::Number,
            QObject::String(_) => QType::String,
            QObject::List(_) => QType::List,
            QObject::Dict(_) => QType::Dict,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            QObject::String(s) => Some(s),
            _ => None,
        }
    }

    /// The dict, if this is one.
    pub fn as_dict(&self) -> Option<&QDict> {
        match self {
            QObject::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The list, if this is one.
    pub fn as_list(&self) -> Option<&[QObject]> {
        match self {
            QObject::List(l) => Some(l),
            _ => None,
        }
    }

    /// The boolean, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            QObject::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as `i64` if it is an integer that fits (QEMU's `qnum_get_try_int`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            QObject::Int(i) => Some(i),
            QObject::UInt(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }

    /// The value as `u64` if it is a non-negative integer (QEMU's `qnum_get_try_uint`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            QObject::Int(i) => u64::try_from(i).ok(),
            QObject::UInt(u) => Some(u),
            _ => None,
        }
    }

    /// The value as `f64` for any number (QEMU's `qnum_get_double`).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            QObject::Int(i) => Some(i as f64),
            QObject::UInt(u) => Some(u as f64),
            QObject::Double(d) => Some(d),
            _ => None,
        }
    }
}

impl From<&str> for QObject {
    fn from(s: &str) -> Self {
        QObject::String(s.to_owned())
    }
}
impl From<String> for QObject {
    fn from(s: String) -> Self {
        QObject::String(s)
    }
}
impl From<bool> for QObject {
    fn from(b: bool) -> Self {
        QObject::Bool(b)
    }
}
impl From<i64> for QObject {
    fn from(i: i64) -> Self {
        QObject::Int(i)
    }
}
impl From<u64> for QObject {
    fn from(u: u64) -> Self {
        match i64::try_from(u) {
            Ok(i) => QObject::Int(i),
            Err(_) => QObject::UInt(u),
        }
    }
}
impl From<f64> for QObject {
    fn from(f: f64) -> Self {
        QObject::Double(f)
    }
}
impl From<QDict> for QObject {
    fn from(d: QDict) -> Self {
        QObject::Dict(d)
    }
}
impl From<Vec<QObject>> for QObject {
    fn from(l: Vec<QObject>) -> Self {
        QObject::List(l)
    }
}

/// A JSON object. Members keep their insertion order for the program; [`QDict::iter_qemu_order`]
/// gives the order in which QEMU's hash table would list them, which is the order QEMU writes
/// them in and checks QMP request members in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: IndexMap<String, QObject>,
}

/// Buckets in QEMU's QDict hash table.
const QDICT_BUCKETS: u32 = 512;

/// QEMU's QDict bucket for a key: the TDB string hash, modulo the table size.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// GLib's `g_str_hash` (djb2 over the bytes as signed chars), with GLib's reserved
/// values 0 (unused) and 1 (tombstone) moved to 2.
fn g_str_hash(key: &str) -> u32 {
    let h = key.bytes().fold(5381u32, |h, b| {
        h.wrapping_mul(33).wrapping_add(i32::from(b as i8) as u32)
    });
    h.max(2)
}

/// A GLib `GHashTable` of string keys, as GLib 2.74 (QEMU 10.0's) lays it out: open
/// addressing over `1 << shift` slots, a key's first slot `hash * 11 % prime`, quadratic
/// probing, tombstones for removed keys, and the in-place rehash that grows it when it
/// fills and shrinks it when it empties. Only the layout is kept: where each key sits.
struct GHashLayout<'a> {
    shift: u32,
    /// 0: never used; 1: a tombstone; else the key's hash.
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    nnodes: usize,
    noccupied: usize,
}

const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;
/// GLib's smallest table: 8 slots.
const MIN_SHIFT: u32 = 3;
/// GLib's `prime_mod`: the prime below each power of two that spreads the first slots.
const PRIME_MOD: [u32; 32] = [
    1,
    2,
    3,
    7,
    13,
    31,
    61,
    127,
    251,
    509,
    1021,
    2039,
    4093,
    8191,
    16381,
    32749,
    65521,
    131_071,
    262_139,
    524_287,
    1_048_573,
    2_097_143,
    4_194_301,
    8_388_593,
    16_777_213,
    33_554_393,
    67_108_859,
    134_217_689,
    268_435_399,
    536_870_909,
    1_073_741_789,
    2_147_483_647,
];

impl<'a> GHashLayout<'a> {
    fn new() -> Self {
        GHashLayout {
            shift: MIN_SHIFT,
            hashes: vec![UNUSED; 1 << MIN_SHIFT],
            keys: vec![None; 1 << MIN_SHIFT],
            nnodes: 0,
            noccupied: 0,
        }
    }

    fn mask(&self) -> usize {
        (1 << self.shift) - 1
    }

    fn first_slot(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % PRIME_MOD[self.shift as usize]) as usize
    }

    /// The slot holding `key`, or where it would go (the first tombstone on its path).
    fn lookup(&self, key: &str, hash: u32) -> usize {
        let mut at = self.first_slot(hash);
        let mut tombstone = None;
        let mut step = 0;
        while self.hashes[at] != UNUSED {
            if self.hashes[at] == hash && self.keys[at] == Some(key) {
                return at;
            }
            if self.hashes[at] == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(at);
            }
            step += 1;
            at = (at + step) & self.mask();
        }
        tombstone.unwrap_or(at)
    }

    fn insert(&mut self, key: &'a str) {
        let hash = g_str_hash(key);
        let at = self.lookup(key, hash);
        let old = self.hashes[at];
        if old >= 2 {
            return;
        }
        self.hashes[at] = hash;
        self.keys[at] = Some(key);
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    fn remove(&mut self, key: &str) {
        let at = self.lookup(key, g_str_hash(key));
        if self.hashes[at] < 2 {
            return;
        }
        self.hashes[at] = TOMBSTONE;
        self.keys[at] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.hashes.len();
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    /// GLib's `g_hash_table_resize` and `resize_map`: every key moves to its slot in the
    /// new size, in place, evicting the one there to be moved in turn.
    fn resize(&mut self) {
        let old_size = self.hashes.len();
        // `nnodes * 1.333` as GLib computes it, in a C int.
        let wanted = (self.nnodes as f64 * 1.333) as usize;
        let closest = usize::BITS - wanted.leading_zeros();
        self.shift = closest.max(MIN_SHIFT);
        let size = 1usize << self.shift;
        if size > old_size {
            self.hashes.resize(size, UNUSED);
            self.keys.resize(size, None);
        }
        let mut moved = vec![false; size.max(old_size)];
        for i in 0..old_size {
            let mut hash = self.hashes[i];
            if hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if moved[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut at = self.first_slot(hash);
                let mut step = 0;
                while moved[at] {
                    step += 1;
                    at = (at + step) & self.mask();
                }
                moved[at] = true;
                let replaced = std::mem::replace(&mut self.hashes[at], hash);
                let evicted = std::mem::replace(&mut self.keys[at], key);
                if replaced < 2 {
                    break;
                }
                hash = replaced;
                key = evicted;
            }
        }
        self.hashes.truncate(size);
        self.keys.truncate(size);
        self.noccupied = self.nnodes;
    }

    /// The keys in slot order, as `g_hash_table_iter_next` walks them.
    fn keys(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.keys.iter().flatten().copied()
    }
}

impl QDict {
    /// An empty dict.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`; a key already present keeps its position.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<QObject>) {
        self.entries.insert(key.into(), value.into());
    }

    /// Builder form of [`QDict::insert`].
    pub fn with(mut self, key: impl Into<String>, value: impl Into<QObject>) -> Self {
        self.insert(key, value);
        self
    }

    /// Sets `key` only when `value` is present.
    pub fn insert_opt<V: Into<QObject>>(&mut self, key: &str, value: Option<V>) {
        if let Some(v) = value {
            self.insert(key, v);
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&QObject> {
        self.entries.get(key)
    }

    /// The value of `key`, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut QObject> {
        self.entries.get_mut(key)
    }

    /// Whether `key` is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<QObject> {
        self.entries.shift_remove(key)
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Members in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &QObject)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Keys in insertion order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Members in the order QEMU's QAPI visitor finds those it did not visit
    /// (`qobject_input_check_struct`): it puts the keys, in [`QDict::iter_qemu_order`],
    /// into a GLib hash table and walks its slots.
    pub fn iter_visitor_order(&self) -> Vec<(&str, &QObject)> {
        self.visitor_leftovers(std::iter::empty())
    }

    /// The members QEMU's visitor is left with once it has taken `consumed` (the members
    /// it knows, in the order it visits them), in the order it finds them: its hash table
    /// shrinks as it empties, so which were taken, and when, moves the rest.
    pub fn visitor_leftovers<'k>(
        &self,
        consumed: impl Iterator<Item = &'k str>,
    ) -> Vec<(&str, &QObject)> {
        let mut table = GHashLayout::new();
        for (k, _) in self.iter_qemu_order() {
            table.insert(k);
        }
        for k in consumed {
            table.remove(k);
        }
        table
            .keys()
            .filter_map(|k| self.entries.get_key_value(k))
            .map(|(k, v)| (k.as_str(), v))
            .collect()
    }

    /// Members in QEMU's order: by hash bucket, newest first within a bucket.
    pub fn iter_qemu_order(&self) -> impl Iterator<Item = (&str, &QObject)> {
        let mut order: Vec<(u32, usize)> = self
            .entries
            .keys()
            .enumerate()
            .map(|(i, k)| (qdict_bucket(k), i))
            .collect();
        order.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        order
            .into_iter()
            .filter_map(move |(_, i)| self.entries.get_index(i).map(|(k, v)| (k.as_str(), v)))
    }
}

impl FromIterator<(String, QObject)> for QDict {
    fn from_iter<I: IntoIterator<Item = (String, QObject)>>(iter: I) -> Self {
        QDict {
            entries: iter.into_iter().collect(),
        }
    }
}

impl IntoIterator for QDict {
    type Item = (String, QObject);
    type IntoIter = indexmap::map::IntoIter<String, QObject>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visitor_order_matches_qsds_first_unexpected_member() {
        // qemu-storage-daemon 10.0.2 names the first of these that its visitor's GLib
        // hash table holds: `size` of a raw image's creation options, `y` and `b` of
        // arguments a command takes none of.
        fn keys(d: &QDict) -> std::vec::IntoIter<String> {
            let v: Vec<String> = d
                .iter_visitor_order()
                .iter()
                .map(|(k, _)| (*k).to_owned())
                .collect();
            v.into_iter()
        }
        let raw = QDict::new()
            .with("driver", "raw")
            .with("location", QDict::new())
            .with("size", 4096i64);
        assert_eq!(keys(&raw).find(|k| k != "driver").as_deref(), Some("size"));
        let xyz = QDict::new()
            .with("x", 1i64)
            .with("y", 2i64)
            .with("zz", 3i64);
        assert_eq!(keys(&xyz).next().as_deref(), Some("y"));
        let abcd = QDict::new()
            .with("a", 1i64)
            .with("b", 2i64)
            .with("cc", 3i64)
            .with("ddd", 4i64);
        assert_eq!(keys(&abcd).next().as_deref(), Some("b"));
    }

    #[test]
    fn visitor_order_past_eight_members_matches_qsd() {
        // qemu-storage-daemon 10.0.2's first unexpected member of `query-version` given
        // these keys: its table grew at the eighth (and the sixteenth).
        let first = |keys: &[String]| {
            let d: QDict = keys
                .iter()
                .map(|k| (k.clone(), QObject::from(1i64)))
                .collect();
            d.iter_visitor_order().first().map(|(k, _)| (*k).to_owned())
        };
        let letters: Vec<String> = "abcdefgh".chars().map(String::from).collect();
        assert_eq!(first(&letters).as_deref(), Some("b"));
        let k = |n: usize| (0..n).map(|i| format!("k{i}")).collect::<Vec<_>>();
        assert_eq!(first(&k(12)).as_deref(), Some("k10"));
        assert_eq!(first(&k(20)).as_deref(), Some("k7"));
        // And once the visitor took what it knows, the table shrinks: `raw`'s options with
        // two it does not know.
        let raw = QDict::new()
            .with("driver", "raw")
            .with("node-name", "")
            .with("cache", QDict::new())
            .with("active", true)
            .with("auto-read-only", true)
            .with("file", "")
            .with("key-secret", "size")
            .with("header", QDict::new());
        let taken = [
            "driver",
            "node-name",
            "cache",
            "active",
            "auto-read-only",
            "file",
        ];
        let left = raw.visitor_leftovers(taken.into_iter());
        assert_eq!(left.first().map(|(k, _)| *k), Some("key-secret"));
    }

    #[test]
    fn qemu_order_matches_qsd_replies() {
        // Orders seen on qemu-storage-daemon 10.0.2.
        let v = QDict::new()
            .with("major", 10i64)
            .with("minor", 0i64)
            .with("micro", 2i64);
        let keys: Vec<_> = v.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(keys, ["micro", "minor", "major"]);
        let r = QDict::new().with("return", QDict::new()).with("id", 1i64);
        let keys: Vec<_> = r.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(keys, ["return", "id"]);
        let e = QDict::new().with("error", QDict::new()).with("id", 1i64);
        let keys: Vec<_> = e.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(keys, ["id", "error"]);
        let e = QDict::new().with("class", "x").with("desc", "y");
        let keys: Vec<_> = e.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(keys, ["class", "desc"]);
        // A `json:` name of qsd's: two keys of one bucket, the later first.
        let n = QDict::new()
            .with("driver", "nbd")
            .with("server.host", "h")
            .with("server.port", "1");
        let keys: Vec<_> = n.iter_qemu_order().map(|(k, _)| k).collect();
        assert_eq!(keys, ["server.port", "server.host", "driver"]);
    }
}
