//! The consistency check of an image not closed cleanly (QEMU: block/qed-check.c, as
//! opening a writable image with `QED_F_NEED_CHECK` runs it): table entries that point
//! outside the file are cleared; clusters two entries claim are counted and left as they
//! are; leaks (clusters nothing claims) are counted. Only an I/O error fails it.

use super::table::{Tables, ZERO_CLUSTER};
use ferrite_block::Child;
use std::io;

/// What the check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Report {
    /// Entries cleared because they pointed outside the file.
    pub(super) fixed: u64,
    /// Clusters claimed twice (not fixed).
    pub(super) corruptions: u64,
    /// Clusters of the file nothing claims.
    pub(super) leaks: u64,
}

/// The clusters of the file and who claimed them.
struct Claims {
    used: Vec<u64>,
    cluster: u64,
}

impl Claims {
    /// Claims `n` clusters from `offset`; false if one was claimed before.
    fn claim(&mut self, offset: u64, n: u64, report: &mut Report) -> bool {
        let first = offset / self.cluster;
        let mut fresh = true;
        for c in first..first + n {
            let (word, bit) = ((c / 64) as usize, 1u64 << (c % 64));
            let Some(w) = self.used.get_mut(word) else {
                continue;
            };
            if *w & bit != 0 {
                report.corruptions += 1;
                fresh = false;
            }
            *w |= bit;
        }
        fresh
    }

    fn claimed(&self, c: u64) -> bool {
        self.used
            .get((c / 64) as usize)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }
}

/// Checks the tables of an image whose file holds `file_size` bytes of whole clusters,
/// clearing entries outside it.
///
/// # Errors
/// The last I/O error met (the rest of the tables are still checked).
pub(super) async fn check(
    tables: &Tables,
    file: &Child,
    l1_offset: u64,
    file_size: u64,
) -> io::Result<Report> {
    let g = tables.geometry;
    let nclusters = file_size / g.cluster;
    let mut claims = Claims {
        used: vec![0; nclusters.div_ceil(64) as usize],
        cluster: g.cluster,
    };
    let mut report = Report::default();
    let mut last_error = None;
    claims.claim(l1_offset, g.table_size, &mut report);
    let mut l1_fixed = false;
    for i in 0..g.entries {
        let l2_offset = tables.l1.borrow()[i];
        if l2_offset == 0 {
            continue;
        }
        if !g.table_valid(l2_offset, file_size) {
            tables.changing();
            tables.l1.borrow_mut()[i] = 0;
            report.fixed += 1;
            l1_fixed = true;
            continue;
        }
        if !claims.claim(l2_offset, g.table_size, &mut report) {
            continue;
        }
        let table = match tables.l2(file, l2_offset).await {
            Ok(t) => t,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        let mut l2_fixed = false;
        {
            let mut t = table.borrow_mut();
            for e in t.iter_mut() {
                if *e == 0 || *e == ZERO_CLUSTER {
                    continue;
                }
                if !g.cluster_valid(*e, file_size) {
                    tables.changing();
                    *e = 0;
                    report.fixed += 1;
                    l2_fixed = true;
                    continue;
                }
                claims.claim(*e, 1, &mut report);
            }
        }
        if l2_fixed {
            let t = table.borrow().clone();
            if let Err(e) = Tables::write(file, l2_offset, &t, 0, t.len()).await {
                last_error = Some(e);
            }
        }
    }
    if l1_fixed && let Err(e) = tables.write_l1(file, 0, g.entries).await {
        last_error = Some(e);
    }
    if let Some(e) = last_error {
        return Err(e);
    }
    report.leaks = (g.header_bytes / g.cluster..nclusters)
        .filter(|&c| !claims.claimed(c))
        .count() as u64;
    Ok(report)
}
