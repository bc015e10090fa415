//! Dirty bitmaps: which granules of a node were written since the bitmap was created or
//! cleared. One bit per granule in little-endian 64-bit words, the layout QEMU hashes for
//! `x-debug-block-dirty-bitmap-sha256` and stores in qcow2 images.

use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// A named dirty bitmap of a node.
pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    len: Cell<u64>,
    words: RefCell<Vec<u64>>,
    count: Cell<u64>,
    /// Recording guest writes (`recording` in queries; disabled bitmaps do not).
    enabled: Cell<bool>,
    persistent: Cell<bool>,
    /// Loaded from an image that keeps it read-only (QEMU's `readonly`): it cannot be
    /// changed.
    read_only: Cell<bool>,
    /// Migrating to another process, which stores it instead: the image keeps what it
    /// had (QEMU's `skip_store`, until the node is activated again).
    skip_store: Cell<bool>,
    /// Stored in use and never cleanly closed: the contents cannot be trusted.
    inconsistent: Cell<bool>,
    /// While a job uses the bitmap, new writes go here instead (QEMU's successor).
    successor: RefCell<Option<Rc<DirtyBitmap>>>,
    /// Other users that need it unchanged (NBD exports).
    users: Cell<u32>,
    /// When it was made, among all bitmaps (QEMU lists a node's bitmaps newest first); a
    /// bitmap that becomes its successor takes the successor's.
    born: Cell<u64>,
}

/// The next bitmap's `born`.
static BORN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl DirtyBitmap {
    /// An empty bitmap over `len` bytes.
    pub fn new(name: &str, granularity: u64, len: u64, enabled: bool) -> Rc<DirtyBitmap> {
        Rc::new(DirtyBitmap {
            name: name.to_owned(),
            granularity,
            len: Cell::new(len),
            // Allocated at the first dirty granule: a clean bitmap of a large disk costs
            // nothing (a migrating one is made before its bits come).
            words: RefCell::new(Vec::new()),
            count: Cell::new(0),
            enabled: Cell::new(enabled),
            persistent: Cell::new(false),
            read_only: Cell::new(false),
            skip_store: Cell::new(false),
            inconsistent: Cell::new(false),
            successor: RefCell::new(None),
            users: Cell::new(0),
            born: Cell::new(BORN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        })
    }

    /// The bitmap's name (unique on its node).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes one bit stands for (a power of two).
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Bytes the bitmap covers.
    pub fn len(&self) -> u64 {
        self.len.get()
    }

    /// Whether no granule is dirty.
    pub fn is_empty(&self) -> bool {
        self.count.get() == 0
    }

    fn granules(&self) -> u64 {
        self.len.get().div_ceil(self.granularity)
    }

    /// Dirty bytes (whole granules, as QEMU counts them).
    pub fn count(&self) -> u64 {
        self.count.get() * self.granularity
    }

    /// Whether writes mark the bitmap dirty.
    pub fn is_enabled(&self) -> bool {
        self.enabled.get()
    }

    /// Starts or stops recording writes.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.set(on);
    }

    /// Whether the bitmap cannot be changed (loaded read-only from its image).
    pub fn is_read_only(&self) -> bool {
        self.read_only.get()
    }

    /// Marks the bitmap as one that cannot be changed.
    pub fn set_read_only(&self, on: bool) {
        self.read_only.set(on);
    }

    /// Whether the image stores the bitmap when the node closes.
    pub fn is_persistent(&self) -> bool {
        self.persistent.get()
    }

    /// Makes the bitmap persistent or not.
    pub fn set_persistent(&self, on: bool) {
        self.persistent.set(on);
    }

    /// Whether the image is to store the bitmap now: persistent, and not migrating.
    pub fn is_stored(&self) -> bool {
        self.persistent.get() && !self.skip_store.get()
    }

    /// Keeps the bitmap from being stored (it is migrating), or lets it be again.
    pub fn set_skip_store(&self, on: bool) {
        self.skip_store.set(on);
    }

    /// The words (64 granules each, bit 0 first) from word `from`, at most `n` of them: the
    /// layout of QEMU's bitmap serialization.
    pub fn words(&self, from: usize, n: usize) -> Vec<u64> {
        let w = self.words.borrow();
        let total = self.word_count();
        let from = from.min(total);
        let end = (from + n).min(total);
        if w.is_empty() {
            return vec![0; end - from];
        }
        w[from..end].to_vec()
    }

    /// Words the bitmap has (64 granules each).
    fn word_count(&self) -> usize {
        self.granules().div_ceil(64) as usize
    }

    /// The words, allocated (all clean) if they were not yet.
    fn words_mut(&self) -> std::cell::RefMut<'_, Vec<u64>> {
        let mut w = self.words.borrow_mut();
        if w.is_empty() {
            w.resize(self.word_count(), 0);
        }
        w
    }

    /// Sets the granules that `words` (from word `from`) has set.
    pub fn or_words(&self, from: usize, words: &[u64]) {
        for (i, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let b = u64::from(bits.trailing_zeros());
                let word = (from as u64).saturating_add(i as u64);
                // Past the end (a damaged stream) is ignored, as set_granule does.
                self.set_granule(word.saturating_mul(64).saturating_add(b), true);
                bits &= bits - 1;
            }
        }
    }

    /// Whether the stored copy was left in use (a crash): its content cannot be trusted.
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent.get()
    }

    /// Marks the bitmap inconsistent or clears the mark. An inconsistent bitmap stops
    /// recording (QEMU disables it: recording into stale bits would look trustworthy).
    pub fn set_inconsistent(&self, on: bool) {
        self.inconsistent.set(on);
        if on {
            self.enabled.set(false);
        }
    }

    /// A job or an export uses the bitmap.
    pub fn is_busy(&self) -> bool {
        self.successor.borrow().is_some() || self.users.get() > 0
    }

    /// An export starts (`true`) or stops using the bitmap.
    pub fn set_in_use(&self, on: bool) {
        let n = self.users.get();
        self.users.set(if on { n + 1 } else { n.saturating_sub(1) });
    }

    /// Whether the granule at byte `offset` is dirty, and for how many bytes (at most
    /// `max`) that stays so.
    pub fn extent(&self, offset: u64, max: u64) -> (u64, bool) {
        let g = offset / self.granularity;
        let dirty = self.get(g);
        let end = (offset + max).min(self.len());
        let mut next = (g + 1) * self.granularity;
        while next < end && self.get(next / self.granularity) == dirty {
            next += self.granularity;
        }
        (next.min(end) - offset, dirty)
    }

    /// Whether writes are recorded for it now: by itself, or while a job uses it by its
    /// successor, which records when the bitmap did (QEMU's `recording`).
    pub fn is_recording(&self) -> bool {
        match self.successor.borrow().as_ref() {
            Some(s) => s.enabled.get(),
            None => self.enabled.get(),
        }
    }

    /// The bitmap that records writes while a job uses this one (QEMU lists it as an
    /// anonymous bitmap of the node).
    pub fn successor(&self) -> Option<Rc<DirtyBitmap>> {
        self.successor.borrow().clone()
    }

    /// Whether it was made after `other`.
    pub fn is_newer_than(&self, other: &DirtyBitmap) -> bool {
        self.born.get() > other.born.get()
    }

    fn set_bit(&self, words: &mut [u64], g: u64, on: bool) {
        let Some(w) = words.get_mut((g / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (g % 64);
        if (*w & bit != 0) != on {
            *w ^= bit;
            let c = self.count.get();
            self.count.set(if on { c + 1 } else { c - 1 });
        }
    }

    /// Marks (`on`) or clears granule `g`.
    pub fn set_granule(&self, g: u64, on: bool) {
        if !on && self.count.get() == 0 {
            return;
        }
        let mut w = self.words_mut();
        self.set_bit(&mut w, g, on);
    }

    /// Marks every granule.
    pub fn fill(&self) {
        let granules = self.granules();
        let mut w = self.words_mut();
        w.fill(!0);
        if granules % 64 != 0
            && let Some(last) = w.last_mut()
        {
            *last = (1u64 << (granules % 64)) - 1;
        }
        self.count.set(granules);
    }

    /// The first dirty granule at or after granule `from`.
    pub fn next_dirty_granule(&self, from: u64) -> Option<u64> {
        let words = self.words.borrow();
        let granules = self.granules();
        let mut g = from;
        while g < granules {
            let w = words.get((g / 64) as usize).copied().unwrap_or(0) >> (g % 64);
            if w == 0 {
                g = (g / 64 + 1) * 64;
                continue;
            }
            return Some(g + u64::from(w.trailing_zeros())).filter(|&g| g < granules);
        }
        None
    }

    /// Whether granule `g` is dirty.
    pub fn get(&self, g: u64) -> bool {
        self.words
            .borrow()
            .get((g / 64) as usize)
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// Marks every granule `offset..offset + len` touches.
    pub fn set_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.len.get() {
            return;
        }
        let end = (offset + len).min(self.len.get());
        let mut w = self.words_mut();
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            self.set_bit(&mut w, g, true);
        }
    }

    /// Clears every granule `offset..offset + len` touches.
    pub fn reset_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.len.get() {
            return;
        }
        if self.count.get() == 0 {
            return;
        }
        let end = (offset + len).min(self.len.get());
        let mut w = self.words.borrow_mut();
        for g in offset / self.granularity..end.div_ceil(self.granularity) {
            self.set_bit(&mut w, g, false);
        }
    }

    /// Follows its node to a new length: new granules start clean, those past a shrunken
    /// end are dropped (QEMU's `bdrv_dirty_bitmap_truncate`); a job's successor too.
    pub fn truncate(&self, len: u64) {
        let granules = len.div_ceil(self.granularity);
        if !self.words.borrow().is_empty() {
            let mut w = self.words.borrow_mut();
            w.resize(granules.div_ceil(64) as usize, 0);
            if granules % 64 != 0
                && let Some(last) = w.last_mut()
            {
                *last &= (1u64 << (granules % 64)) - 1;
            }
            self.count
                .set(w.iter().map(|x| u64::from(x.count_ones())).sum());
        }
        self.len.set(len);
        if let Some(s) = self.successor.borrow().as_ref() {
            s.truncate(len);
        }
    }

    /// Clears everything.
    pub fn clear(&self) {
        self.words.borrow_mut().fill(0);
        self.count.set(0);
    }

    /// A guest write reached `offset..offset + len`: recorded here, or in the successor
    /// while a job uses the bitmap.
    pub fn note_write(&self, offset: u64, len: u64) {
        if let Some(s) = self.successor.borrow().as_ref() {
            if s.enabled.get() {
                s.set_range(offset, len);
            }
        } else if self.enabled.get() {
            self.set_range(offset, len);
        }
    }

    /// Adds every dirty granule of `other` (any granularity, same length).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if std::ptr::eq(self, other) {
            return;
        }
        for g in 0..other.granules() {
            if other.get(g) {
                let off = g * other.granularity;
                self.set_range(off, other.granularity.min(other.len() - off));
            }
        }
    }

    /// The next dirty byte range at or after byte `from`: (start, length), whole granules.
    pub fn next_dirty(&self, from: u64) -> Option<(u64, u64)> {
        let granules = self.granules();
        let start = self.next_dirty_granule(from / self.granularity)?;
        let mut g = start;
        while g < granules && self.get(g) {
            g += 1;
        }
        let off = start * self.granularity;
        Some((off, (g * self.granularity).min(self.len()) - off))
    }

    /// SHA-256 of the words, as QEMU's debug command computes it.
    pub fn sha256(&self) -> String {
        let mut h = Sha256::new();
        let words = self.words.borrow();
        if words.is_empty() {
            let zeros = [0u8; 4096];
            let mut left = self.word_count() * 8;
            while left > 0 {
                let n = left.min(zeros.len());
                h.update(&zeros[..n]);
                left -= n;
            }
        }
        for w in words.iter() {
            h.update(w.to_le_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The bitmap's bytes (bit `i` is bit `i % 8` of byte `i / 8`), for storing.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = self.granules().div_ceil(8) as usize;
        let words = self.words.borrow();
        if words.is_empty() {
            return vec![0; len];
        }
        let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(len);
        out
    }

    /// Loads stored bytes (as [`DirtyBitmap::to_bytes`] writes them), a word at a time.
    pub fn load_bytes(&self, bytes: &[u8]) {
        self.clear();
        let granules = self.granules();
        if bytes.iter().all(|b| *b == 0) {
            return;
        }
        let mut w = self.words_mut();
        let mut count = 0u64;
        for (i, (word, chunk)) in w.iter_mut().zip(bytes.chunks(8)).enumerate() {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(le);
            // Bits past the last granule are not the bitmap's.
            let first = i as u64 * 64;
            if granules < first + 64 {
                v &= (1u64 << (granules - first)) - 1;
            }
            *word = v;
            count += u64::from(v.count_ones());
        }
        self.count.set(count);
    }

    /// Starts a job's use: new writes go to a fresh successor from now on (none, for a
    /// disabled bitmap: its successor is disabled too).
    pub fn freeze(&self) {
        let s = DirtyBitmap::new("", self.granularity, self.len(), self.enabled.get());
        *self.successor.borrow_mut() = Some(s);
    }

    /// Ends a job's use. `replace`: the bitmap becomes its successor (only the writes made
    /// during the job); otherwise the successor's writes are added to it.
    pub fn thaw(&self, replace: bool) {
        let Some(s) = self.successor.borrow_mut().take() else {
            return;
        };
        if replace {
            self.clear();
            self.born.set(s.born.get());
        }
        self.merge_from(&s);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn truncation_keeps_what_remains_and_grows_clean() {
        let b = DirtyBitmap::new("b", 512, 100 * 512, true);
        b.set_range(0, 100 * 512);
        b.truncate(70 * 512 + 100);
        // `count` is in bytes: whole granules.
        assert_eq!((b.count(), b.len()), (71 * 512, 70 * 512 + 100));
        b.truncate(200 * 512);
        assert_eq!(b.count(), 71 * 512);
        assert_eq!(b.next_dirty_granule(71), None);
        b.set_range(199 * 512, 512);
        assert_eq!(b.count(), 72 * 512);
    }

    use super::DirtyBitmap;

    #[test]
    fn ranges_count_whole_granules() {
        let b = DirtyBitmap::new("b", 65536, 4 << 20, true);
        b.set_range(100, 1);
        b.set_range(65535, 2);
        assert_eq!(b.count(), 2 * 65536);
        assert_eq!(b.next_dirty(0), Some((0, 2 * 65536)));
        b.reset_range(0, 1);
        assert_eq!(b.next_dirty(0), Some((65536, 65536)));
        assert_eq!(b.next_dirty(2 * 65536), None);
    }

    #[test]
    fn hash_is_qemus_for_an_empty_bitmap() {
        // QEMU 10.0.2: an empty 4 MiB bitmap at 64 KiB (one word of zeroes).
        let b = DirtyBitmap::new("b", 65536, 4 << 20, true);
        assert_eq!(
            b.sha256(),
            "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"
        );
    }

    #[test]
    fn a_frozen_bitmap_sends_writes_to_its_successor() {
        let b = DirtyBitmap::new("b", 512, 1 << 20, true);
        b.set_range(0, 512);
        b.freeze();
        // Still recording, through the successor (QEMU's `recording: true`).
        assert!(b.is_busy() && b.is_recording());
        b.note_write(4096, 512);
        assert!(!b.get(8));
        b.thaw(false);
        assert!(b.get(0) && b.get(8));
        b.freeze();
        b.note_write(8192, 1);
        b.thaw(true);
        assert!(!b.get(0) && !b.get(8) && b.get(16));
        // A disabled bitmap's successor records nothing either.
        b.set_enabled(false);
        b.freeze();
        assert!(!b.is_recording());
        b.note_write(0, 512);
        b.thaw(false);
        assert!(!b.get(0));
    }

    #[test]
    fn bytes_round_trip() {
        let b = DirtyBitmap::new("b", 512, 100 * 512, true);
        b.set_range(0, 512);
        b.set_range(99 * 512, 512);
        let c = DirtyBitmap::new("c", 512, 100 * 512, true);
        c.load_bytes(&b.to_bytes());
        assert_eq!(c.sha256(), b.sha256());
        assert_eq!(c.count(), 2 * 512);
    }

    #[test]
    fn loaded_bytes_past_the_last_granule_are_ignored() {
        // 100 granules: the second word holds 36 of them, the rest of its bits are not.
        let b = DirtyBitmap::new("b", 512, 100 * 512, true);
        b.load_bytes(&[0xff; 16]);
        assert_eq!(b.count(), 100 * 512);
        assert!(b.get(99));
        assert_eq!(b.to_bytes().len(), 13);
        assert_eq!(b.to_bytes()[12], 0x0f);
    }
}
