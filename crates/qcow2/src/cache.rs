//! A write-back cache of metadata tables (L2 tables, refcount blocks), each one cluster,
//! kept as the bytes on disk and evicted least recently used first.

use std::collections::HashMap;

struct Slot {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Tables by host offset.
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    capacity: usize,
    clock: u64,
    /// The clock at the last [`TableCache::drop_unused`].
    clean_mark: u64,
}

impl TableCache {
    /// A cache of at most `capacity` tables (at least 2).
    pub(crate) fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
            clean_mark: 0,
        }
    }

    /// The table at `offset`, if cached; counts as a use.
    pub(crate) fn get(&mut self, offset: u64) -> Option<&[u8]> {
        self.clock += 1;
        let now = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.used = now;
            s.data.as_slice()
        })
    }

    /// The table at `offset` for changing it; marks it dirty.
    pub(crate) fn get_mut(&mut self, offset: u64) -> Option<&mut [u8]> {
        self.clock += 1;
        let now = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.used = now;
            s.dirty = true;
            s.data.as_mut_slice()
        })
    }

    /// Whether the cache is full, so that an insert must first evict
    /// ([`TableCache::victim`]).
    pub(crate) fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// The table to evict next: the least recently used clean one, else the least recently
    /// used dirty one (which the caller writes back first). Returns its offset and whether
    /// it is dirty.
    pub(crate) fn victim(&self) -> Option<(u64, bool)> {
        let clean = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used);
        if let Some((o, _)) = clean {
            return Some((*o, false));
        }
        self.slots
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(o, _)| (*o, true))
    }

    /// Adds a table (the caller made room).
    pub(crate) fn insert(&mut self, offset: u64, data: Vec<u8>, dirty: bool) {
        self.clock += 1;
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                used: self.clock,
            },
        );
    }

    /// Drops a table (evicted after write-back, or freed).
    pub(crate) fn remove(&mut self, offset: u64) -> Option<Vec<u8>> {
        self.slots.remove(&offset).map(|s| s.data)
    }

    /// Offsets of the dirty tables, in ascending order (so write-back is sequential).
    pub(crate) fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    /// A copy of a cached table's bytes (for writing it back).
    pub(crate) fn bytes(&self, offset: u64) -> Option<Vec<u8>> {
        self.slots.get(&offset).map(|s| s.data.clone())
    }

    /// Marks a table clean after its bytes reached the disk.
    pub(crate) fn mark_clean(&mut self, offset: u64) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }

    /// Drops the clean tables not used since the last call (`cache-clean-interval`).
    /// Forgets every table not waiting to be written.
    pub(crate) fn drop_clean(&mut self) {
        self.slots.retain(|_, s| s.dirty);
    }

    pub(crate) fn drop_unused(&mut self) {
        let mark = self.clean_mark;
        self.slots.retain(|_, s| s.dirty || s.used > mark);
        self.clean_mark = self.clock;
    }

    /// How many tables are cached.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::TableCache;

    #[test]
    fn cleaning_drops_clean_tables_left_unused_since_the_last_cleaning() {
        let mut c = TableCache::new(8);
        c.insert(0, vec![0; 8], false);
        c.insert(8, vec![0; 8], true);
        c.insert(16, vec![0; 8], false);
        c.drop_unused();
        // All were used since the start.
        assert_eq!(c.len(), 3);
        c.get(16);
        c.drop_unused();
        // 0 was idle and clean; 8 is dirty; 16 was used.
        assert_eq!(c.len(), 2);
        assert!(c.get(0).is_none());
        c.mark_clean(8);
        c.drop_unused();
        c.drop_unused();
        assert_eq!(c.len(), 0);
    }
}
