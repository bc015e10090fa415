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

/// The slots of an 8-slot GLib hash table (the size it starts at and keeps below eight
/// entries) the keys take, inserted in turn: `hash * 11 % 7`, then quadratic probing.
fn small_ghash_slots<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<usize> {
    const SIZE: usize = 8;
    let mut used = [false; SIZE];
    keys.map(|k| {
        let mut slot = (g_str_hash(k).wrapping_mul(11) % 7) as usize;
        let mut step = 0;
        while used[slot] {
            step += 1;
            slot = (slot + step) & (SIZE - 1);
        }
        used[slot] = true;
        slot
    })
    .collect()
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
    /// into a GLib hash table and walks its slots. Exact below eight members (the table
    /// never grows); larger dictionaries fall back to [`QDict::iter_qemu_order`].
    pub fn iter_visitor_order(&self) -> Vec<(&str, &QObject)> {
        let inserted: Vec<(&str, &QObject)> = self.iter_qemu_order().collect();
        if inserted.len() >= 8 {
            return inserted;
        }
        let slots = small_ghash_slots(inserted.iter().map(|(k, _)| *k));
        let mut by_slot: Vec<(usize, (&str, &QObject))> = slots.into_iter().zip(inserted).collect();
        by_slot.sort_unstable_by_key(|(slot, _)| *slot);
        by_slot.into_iter().map(|(_, kv)| kv).collect()
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
