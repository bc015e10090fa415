//! A table of cluster pointers held in memory (the active L1 table, the refcount table) with
//! the set of clusters it points to, so that the overlap check asks "does this write touch a
//! cluster the table points to?" in logarithmic time instead of scanning every entry on
//! every write (the refcount table of a fresh image alone has thousands of empty entries).

use crate::format::entry::OFFSET_MASK;
use std::collections::BTreeMap;
use std::ops::Deref;

/// Entries in image order; reads go through `Deref`, changes through [`PointerTable::set`]
/// and [`PointerTable::replace`], which keep the set of targets in step.
#[derive(Debug, Default)]
pub(crate) struct PointerTable {
    entries: Vec<u64>,
    /// Host offsets the entries point to (flags masked off), with how many entries point
    /// there: a damaged image may point two entries at one cluster.
    targets: BTreeMap<u64, u32>,
}

impl PointerTable {
    pub(crate) fn new(entries: Vec<u64>) -> PointerTable {
        let mut t = PointerTable {
            entries: Vec::new(),
            targets: BTreeMap::new(),
        };
        t.replace(entries);
        t
    }

    /// Sets entry `i` (which must exist).
    pub(crate) fn set(&mut self, i: usize, v: u64) {
        let old = std::mem::replace(&mut self.entries[i], v);
        self.forget(old);
        self.remember(v);
    }

    /// Replaces every entry; returns the old ones.
    pub(crate) fn replace(&mut self, entries: Vec<u64>) -> Vec<u64> {
        self.targets.clear();
        for &e in &entries {
            self.remember(e);
        }
        std::mem::replace(&mut self.entries, entries)
    }

    /// Whether a cluster of `cs` bytes that some entry points to overlaps `start..end`.
    pub(crate) fn points_into(&self, start: u64, end: u64, cs: u64) -> bool {
        // A target `t` overlaps when `t < end` and `t + cs > start`.
        let from = (start + 1).saturating_sub(cs);
        self.targets.range(from..end).next().is_some()
    }

    fn remember(&mut self, e: u64) {
        let at = e & OFFSET_MASK;
        if at != 0 {
            *self.targets.entry(at).or_insert(0) += 1;
        }
    }

    fn forget(&mut self, e: u64) {
        let at = e & OFFSET_MASK;
        if let Some(n) = self.targets.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.targets.remove(&at);
            }
        }
    }
}

impl Deref for PointerTable {
    type Target = [u64];

    fn deref(&self) -> &[u64] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 0x10000;

    #[test]
    fn points_into_matches_a_scan_of_the_entries() {
        let mut t = PointerTable::new(vec![0, 3 * CS, 0, (7 * CS) | (1 << 63), 3 * CS]);
        t.set(1, 9 * CS);
        t.set(2, 0);
        let scan = |t: &PointerTable, s: u64, e: u64| {
            t.iter().any(|&x| {
                let at = x & OFFSET_MASK;
                at != 0 && s < at + CS && at < e
            })
        };
        for s in (0..12 * CS).step_by(0x4000) {
            for len in [1, 0x200, CS, 3 * CS] {
                assert_eq!(
                    t.points_into(s, s + len, CS),
                    scan(&t, s, s + len),
                    "{s:#x}+{len:#x}"
                );
            }
        }
        // 3 * CS is still named by entry 4 after entry 1 moved away.
        assert!(t.points_into(3 * CS, 3 * CS + 1, CS));
        t.set(4, 0);
        assert!(!t.points_into(3 * CS, 4 * CS, CS));
        assert_eq!(
            t.replace(vec![CS]),
            vec![0, 9 * CS, 0, (7 * CS) | (1 << 63), 0]
        );
        assert!(t.points_into(0, CS + 1, CS));
        assert!(!t.points_into(2 * CS, 9 * CS + 1, CS));
    }
}
