//! libnfs's page cache and readahead, which QEMU turns on with `page-cache-size` and
//! `readahead-size`: pages of the file kept once read or written, for as long as the node is
//! open (QEMU gives them no expiry), and reads that find a sequential reader read on past
//! what it asked, by a window that doubles up to the readahead size.
//!
//! What the cache holds is never older than the node's own writes: a read's pages go in only
//! if no write started or ended while it was under way, and a write puts its data in only
//! if no other write started meanwhile (else it drops its pages). libnfs puts both in
//! unconditionally, so a read answered before an overlapping write can leave the old data
//! cached over the new.

/// libnfs's page size.
pub(crate) const PAGE: u64 = 4096;

/// The cache of one open file.
pub(crate) struct PageCache {
    /// Direct-mapped: a page goes to the slot its number hashes to, replacing what was
    /// there. A power of two long.
    slots: Vec<Option<Slot>>,
    /// The largest readahead window; 0 without readahead.
    readahead: u64,
    /// The current readahead window (libnfs's `cur_ra`).
    window: u64,
    /// Where the last read from the server (or the cache) ended.
    next: u64,
    /// Counts the changes to the file: a fetch whose epoch has passed fetched what may
    /// already be old.
    epoch: u64,
}

struct Slot {
    offset: u64,
    data: Box<[u8]>,
}

/// The next power of two of `n` (1 for 0), as libnfs rounds sizes.
fn power_of_two(n: u64) -> u64 {
    n.max(1).next_power_of_two()
}

impl PageCache {
    /// The cache for QEMU's `readahead-size` (bytes, capped by QEMU at 1 MiB) and
    /// `page-cache-size` (pages, capped at 2048), as libnfs sizes it: readahead rounded up
    /// to a power of two of at least a page, pages rounded up to a power of two (0 is 1)
    /// and at least twice the readahead; none without either (or with a readahead of 0
    /// alone). Negative sizes count as 0 (libnfs, handed them as unsigned, spins for ever
    /// rounding them up).
    pub(crate) fn new(readahead: Option<i64>, pages: Option<i64>) -> Option<PageCache> {
        let readahead = match readahead.map_or(0, |r| r.max(0) as u64) {
            0 => 0,
            r => power_of_two(r).max(PAGE),
        };
        let pages = pages
            .map_or(0, |p| power_of_two(p.max(0) as u64))
            .max(2 * readahead / PAGE);
        if pages == 0 {
            return None;
        }
        Some(PageCache {
            slots: (0..pages).map(|_| None).collect(),
            readahead,
            window: 0,
            next: 0,
            epoch: 0,
        })
    }

    /// libnfs's slot for the page at `offset`.
    fn slot(&self, offset: u64) -> usize {
        let page = u64::from(offset as u32 / PAGE as u32);
        ((2_654_435_761u64 * (1 + page)) & (self.slots.len() as u64 - 1)) as usize
    }

    fn get(&self, offset: u64) -> Option<&[u8]> {
        match &self.slots[self.slot(offset)] {
            Some(s) if s.offset == offset => Some(&s.data),
            _ => None,
        }
    }

    /// Copies the cached pages from `start` (page-aligned) into `out`, up to the first page
    /// not cached; how many bytes that was.
    pub(crate) fn copy_cached(&mut self, start: u64, out: &mut [u8]) -> usize {
        let mut done = 0;
        for chunk in out.chunks_mut(PAGE as usize) {
            let Some(page) = self.get(start + done as u64) else {
                break;
            };
            chunk.copy_from_slice(&page[..chunk.len()]);
            done += chunk.len();
        }
        if done == out.len() {
            self.next = start + done as u64;
        }
        done
    }

    /// What a read from the server starting at `from` should fetch beyond what was asked:
    /// the readahead window, grown while reads follow on from each other and dropped when
    /// one does not.
    pub(crate) fn readahead_for(&mut self, from: u64) -> u64 {
        if self.readahead == 0 {
            return 0;
        }
        self.window = self.window.max(PAGE);
        if from >= self.next && from <= self.next + self.window + PAGE {
            if self.readahead > self.window {
                self.window <<= 1;
            }
        } else {
            self.window = 0;
        }
        self.window
    }

    /// The current epoch: to be given back with what a fetch started now brought.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// What a read fetched from `from` (page-aligned): `data`, the bytes before the end of
    /// the file. Its whole pages are kept unless the file changed since `epoch`.
    pub(crate) fn fetched(&mut self, epoch: u64, from: u64, data: &[u8]) {
        self.next = from + data.len() as u64;
        if epoch != self.epoch {
            return;
        }
        for (i, page) in data.chunks_exact(PAGE as usize).enumerate() {
            self.put_page(from + i as u64 * PAGE, page);
        }
    }

    fn put_page(&mut self, offset: u64, page: &[u8]) {
        let slot = self.slot(offset);
        match &mut self.slots[slot] {
            Some(s) => {
                s.offset = offset;
                s.data.copy_from_slice(page);
            }
            empty => {
                *empty = Some(Slot {
                    offset,
                    data: page.into(),
                })
            }
        }
    }

    /// A write is sent: the epoch it has to find when it ends to put its data in.
    pub(crate) fn write_started(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    /// A write of `data` at `offset` ended, `ok` or not: its data goes in if no other
    /// write started since (whole pages, and parts of pages cached), else its pages go.
    pub(crate) fn write_ended(&mut self, started: u64, offset: u64, data: &[u8], ok: bool) {
        let alone = ok && started == self.epoch;
        self.epoch += 1;
        let end = offset + data.len() as u64;
        let mut at = offset;
        while at < end {
            let page = at - at % PAGE;
            let n = (page + PAGE).min(end) - at;
            let bytes = &data[(at - offset) as usize..(at - offset + n) as usize];
            let slot = self.slot(page);
            let cached = matches!(&self.slots[slot], Some(s) if s.offset == page);
            if alone && n == PAGE {
                self.put_page(page, bytes);
            } else if cached {
                if let (true, Some(s)) = (alone, &mut self.slots[slot]) {
                    let within = (at - page) as usize;
                    s.data[within..within + n as usize].copy_from_slice(bytes);
                } else {
                    self.slots[slot] = None;
                }
            }
            at += n;
        }
    }

    /// Drops every page (the file was truncated, or may have changed on the server).
    pub(crate) fn invalidate(&mut self) {
        self.epoch += 1;
        self.slots.iter_mut().for_each(|s| *s = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_libnfs_rounds_them() {
        let pages = |ra, pc| PageCache::new(ra, pc).map(|c| (c.readahead, c.slots.len()));
        assert_eq!(pages(None, None), None);
        assert_eq!(pages(Some(0), None), None);
        assert_eq!(pages(None, Some(0)), Some((0, 1)));
        assert_eq!(pages(None, Some(100)), Some((0, 128)));
        assert_eq!(pages(Some(100), None), Some((4096, 2)));
        assert_eq!(pages(Some(1 << 20), Some(16)), Some((1 << 20, 512)));
        assert_eq!(pages(Some(-1), Some(-5)), Some((0, 1)));
        assert_eq!(pages(Some(-1), None), None);
    }

    #[test]
    fn pages_read_are_kept_until_a_write_changes_them() {
        let mut c = PageCache::new(None, Some(64)).unwrap();
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i / PAGE) as u8 + 1).collect();
        let e = c.epoch();
        // The last page is short: the file ends inside it, so it is not kept.
        c.fetched(e, 0, &data[..2 * PAGE as usize + 10]);
        let mut out = vec![0; 3 * PAGE as usize];
        assert_eq!(c.copy_cached(0, &mut out), 2 * PAGE as usize);
        assert_eq!(out[..2 * PAGE as usize], data[..2 * PAGE as usize]);
        // A write alone updates a cached page in part.
        let w = c.write_started();
        c.write_ended(w, PAGE + 1, &[0xee; 2], true);
        c.copy_cached(PAGE, &mut out[..PAGE as usize]);
        assert_eq!(&out[..4], &[2, 0xee, 0xee, 2]);
        // A read that was under way while a write was is not kept.
        let e = c.epoch();
        let w = c.write_started();
        c.write_ended(w, 8 * PAGE, &[1; PAGE as usize], true);
        c.fetched(e, 16 * PAGE, &[7; PAGE as usize]);
        assert_eq!(c.copy_cached(16 * PAGE, &mut out[..PAGE as usize]), 0);
        assert_eq!(
            c.copy_cached(8 * PAGE, &mut out[..PAGE as usize]),
            PAGE as usize
        );
    }

    #[test]
    fn overlapping_writes_drop_their_pages() {
        let mut c = PageCache::new(None, Some(64)).unwrap();
        let e = c.epoch();
        c.fetched(e, 0, &[1; PAGE as usize]);
        let first = c.write_started();
        let second = c.write_started();
        c.write_ended(second, 0, &[3; PAGE as usize], true);
        c.write_ended(first, 0, &[2; PAGE as usize], true);
        let mut out = vec![0; PAGE as usize];
        assert_eq!(c.copy_cached(0, &mut out), 0);
        // A failed write drops what it covered too.
        c.fetched(c.epoch(), 0, &[1; PAGE as usize]);
        let w = c.write_started();
        c.write_ended(w, 10, &[9; 4], false);
        assert_eq!(c.copy_cached(0, &mut out), 0);
    }

    #[test]
    fn readahead_grows_while_reads_follow_on() {
        let mut c = PageCache::new(Some(64 << 10), None).unwrap();
        assert_eq!(c.readahead_for(0), 2 * PAGE);
        c.fetched(c.epoch(), 0, &vec![0; 3 * PAGE as usize]);
        assert_eq!(c.readahead_for(3 * PAGE), 4 * PAGE);
        c.next = 7 * PAGE;
        for _ in 0..6 {
            c.readahead_for(c.next);
        }
        assert_eq!(c.window, 64 << 10);
        assert_eq!(c.readahead_for(1 << 30), 0);
    }
}
