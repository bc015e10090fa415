//! Per-backend I/O accounting for `query-blockstats` (QEMU: `block/accounting.c`).

use ferrite_qobject::{QDict, QObject};
use std::time::{Duration, Instant};

/// `BlockDeviceStats` with nothing counted (what a node without a backend shows).
pub fn empty() -> QDict {
    Stats::default().to_qdict()
}

/// The kinds of request that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IoKind {
    /// Reads.
    Read,
    /// Writes, including write-zeroes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Unmap,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    bytes: u64,
    ops: u64,
    failed: u64,
    invalid: u64,
    total_time: Duration,
}

/// Counters for one backend.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    rd: Counter,
    wr: Counter,
    flush: Counter,
    unmap: Counter,
    last_io: Option<Instant>,
    /// Invalid requests count as I/O for the idle time (QEMU's `account_invalid`).
    account_invalid: bool,
    /// Failed requests count for the total time and the idle time (`account_failed`).
    account_failed: bool,
}

impl Stats {
    /// A backend's counters: invalid and failed requests accounted, as QEMU's
    /// `block_acct_init` sets it.
    pub(crate) fn for_backend() -> Stats {
        Stats {
            account_invalid: true,
            account_failed: true,
            ..Stats::default()
        }
    }

    /// Whether invalid and failed requests are accounted (`stats-account-invalid`,
    /// `stats-account-failed`).
    pub(crate) fn set_accounting(&mut self, invalid: bool, failed: bool) {
        self.account_invalid = invalid;
        self.account_failed = failed;
    }

    fn counter(&mut self, kind: IoKind) -> &mut Counter {
        match kind {
            IoKind::Read => &mut self.rd,
            IoKind::Write => &mut self.wr,
            IoKind::Flush => &mut self.flush,
            IoKind::Unmap => &mut self.unmap,
        }
    }

    /// Records a finished request.
    pub(crate) fn done(&mut self, kind: IoKind, bytes: u64, started: Instant, ok: bool) {
        let account_failed = self.account_failed;
        let c = self.counter(kind);
        if ok {
            c.ops += 1;
            c.bytes += bytes;
        } else {
            c.failed += 1;
        }
        if ok || account_failed {
            c.total_time += started.elapsed();
            self.last_io = Some(Instant::now());
        }
    }

    /// Records a request refused before it started (out of bounds, misaligned).
    pub(crate) fn invalid(&mut self, kind: IoKind) {
        self.counter(kind).invalid += 1;
        if self.account_invalid {
            self.last_io = Some(Instant::now());
        }
    }

    /// The `BlockDeviceStats` dict.
    pub(crate) fn to_qdict(&self) -> QDict {
        let ns = |d: Duration| QObject::from(d.as_nanos().min(u128::from(u64::MAX)) as u64);
        let mut d = QDict::new();
        for (name, c) in [("rd", &self.rd), ("wr", &self.wr), ("unmap", &self.unmap)] {
            d.insert(format!("{name}_bytes"), c.bytes);
            d.insert(format!("{name}_operations"), c.ops);
            d.insert(format!("{name}_merged"), 0i64);
            d.insert(format!("{name}_total_time_ns"), ns(c.total_time));
            d.insert(format!("failed_{name}_operations"), c.failed);
            d.insert(format!("invalid_{name}_operations"), c.invalid);
        }
        d.insert("flush_operations", self.flush.ops);
        d.insert("flush_total_time_ns", ns(self.flush.total_time));
        d.insert("failed_flush_operations", self.flush.failed);
        d.insert("invalid_flush_operations", self.flush.invalid);
        for k in [
            "zone_append_bytes",
            "zone_append_operations",
            "zone_append_merged",
            "zone_append_total_time_ns",
            "failed_zone_append_operations",
            "invalid_zone_append_operations",
        ] {
            d.insert(k, 0i64);
        }
        // The node's figure (QEMU keeps it in the node, not the backend); callers fill it.
        d.insert("wr_highest_offset", 0u64);
        if let Some(t) = self.last_io {
            d.insert("idle_time_ns", ns(t.elapsed()));
        }
        d.insert("account_invalid", self.account_invalid);
        d.insert("account_failed", self.account_failed);
        d.insert("timed_stats", QObject::List(Vec::new()));
        d
    }
}
