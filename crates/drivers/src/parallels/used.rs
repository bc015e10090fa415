//! Which clusters of a Parallels image's data area a BAT entry claims (QEMU's
//! `used_bmap`): cluster `i` of the data area starts `i` clusters after its start. New
//! clusters go into the first free one, or past the last when none is free.

use std::io;

/// A set of clusters of the data area, `len` of them.
#[derive(Debug, Default, Clone)]
pub(super) struct Used {
    words: Vec<u64>,
    len: u64,
}

impl Used {
    pub(super) fn new(len: u64) -> Used {
        Used {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub(super) fn len(&self) -> u64 {
        self.len
    }

    fn test(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// The first cluster nothing claims, or `len` when all are claimed.
    pub(super) fn first_free(&self) -> u64 {
        for (w, &word) in self.words.iter().enumerate() {
            if word != u64::MAX {
                let i = w as u64 * 64 + u64::from((!word).trailing_zeros());
                return i.min(self.len);
            }
        }
        self.len
    }

    /// The first claimed cluster from `from` on, or `len`.
    pub(super) fn next_claimed(&self, from: u64) -> u64 {
        (from..self.len).find(|&i| self.test(i)).unwrap_or(self.len)
    }

    /// Claims `n` clusters from `first` (QEMU's `mark_used`): E2BIG past the end (or
    /// before the start: `first` is `None`), EBUSY if one is claimed already (then
    /// nothing changes).
    pub(super) fn claim(&mut self, first: Option<u64>, n: u64) -> io::Result<()> {
        let Some(first) = first.filter(|&f| f.checked_add(n).is_some_and(|e| e <= self.len)) else {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        };
        if (first..first + n).any(|i| self.test(i)) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        for i in first..first + n {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
        Ok(())
    }

    /// Lets cluster `i` go, if it is in the set.
    pub(super) fn free(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// `more` free clusters added at the end.
    pub(super) fn grow(&mut self, more: u64) {
        self.len += more;
        self.words.resize(self.len.div_ceil(64) as usize, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_find_the_free_clusters() {
        let mut u = Used::new(130);
        assert_eq!(u.first_free(), 0);
        u.claim(Some(0), 64).unwrap();
        u.claim(Some(66), 2).unwrap();
        assert_eq!(u.first_free(), 64);
        assert_eq!(u.next_claimed(64), 66);
        assert_eq!(
            u.claim(Some(65), 2).unwrap_err().raw_os_error(),
            Some(libc::EBUSY)
        );
        assert_eq!(
            u.claim(Some(129), 2).unwrap_err().raw_os_error(),
            Some(libc::E2BIG)
        );
        assert_eq!(
            u.claim(None, 1).unwrap_err().raw_os_error(),
            Some(libc::E2BIG)
        );
        u.free(0);
        u.free(500);
        assert_eq!(u.first_free(), 0);
        let mut full = Used::new(3);
        full.claim(Some(0), 3).unwrap();
        assert_eq!(full.first_free(), 3);
        full.grow(2);
        assert_eq!((full.first_free(), full.next_claimed(3)), (3, 5));
    }
}
