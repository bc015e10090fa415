//! Per-backend I/O accounting for `query-blockstats` (QEMU: `block/accounting.c`), on the
//! block layer's clock: under qtest the virtual one, where every request is taken to last
//! 1 ms so that tests can expect exact figures (as QEMU does there).

use crate::clock::Clock;
use ferrite_qobject::{QDict, QObject};

/// `BlockDeviceStats` with nothing counted (what a node without a backend shows).
pub fn empty() -> QDict {
    Stats::default().to_qdict()
}

/// The kinds of request that are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes, including write-zeroes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Unmap,
}

const KINDS: usize = 4;

impl IoKind {
    fn index(self) -> usize {
        self as usize
    }
}

/// The latency every request is given under qtest.
const QTEST_LATENCY_NS: u64 = 1_000_000;

/// The block layer's clock now, in nanoseconds (when a request starts).
pub(crate) fn now_ns() -> u64 {
    u64::try_from(crate::clock::now().as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default, Clone, Copy)]
struct Counter {
    bytes: u64,
    ops: u64,
    failed: u64,
    invalid: u64,
    total_time_ns: u64,
}

/// One of the two windows of a [`TimedAverage`].
#[derive(Debug, Clone, Copy)]
struct Window {
    min: u64,
    max: u64,
    sum: u64,
    count: u64,
    /// When it starts over (ns).
    expires: u64,
}

impl Window {
    fn new(expires: u64) -> Window {
        Window {
            min: u64::MAX,
            max: 0,
            sum: 0,
            count: 0,
            expires,
        }
    }
}

/// Minimum, maximum and average of the values of about the last `interval` (QEMU's
/// `TimedAverage`): two windows half a period apart take every value, each starts over
/// when its period ends, and the figures come from the older one, so they always cover
/// between half a period and a whole one. The period is 4/3 of the interval asked for,
/// which puts the covered time between 2/3 and 4/3 of it.
#[derive(Debug, Clone)]
struct TimedAverage {
    period: u64,
    windows: [Window; 2],
}

impl TimedAverage {
    fn new(interval_ns: u64, now: u64) -> TimedAverage {
        let period = (interval_ns.saturating_mul(4) / 3).max(1);
        TimedAverage {
            period,
            windows: [
                Window::new(now.saturating_add(period / 2)),
                Window::new(now.saturating_add(period)),
            ],
        }
    }

    /// Starts over the windows whose period ended; returns the older one.
    fn current(&mut self, now: u64) -> &mut Window {
        let period = self.period;
        for w in &mut self.windows {
            if w.expires <= now {
                // The next end on the window's own beat.
                let into = (now - w.expires) % period;
                *w = Window::new(now + (period - into));
            }
        }
        let older = usize::from(self.windows[0].expires >= self.windows[1].expires);
        &mut self.windows[older]
    }

    fn account(&mut self, value: u64, now: u64) {
        self.current(now);
        for w in &mut self.windows {
            w.sum = w.sum.saturating_add(value);
            w.count += 1;
            w.min = w.min.min(value);
            w.max = w.max.max(value);
        }
    }

    /// Minimum, maximum, average, and the sum over the time the older window has run.
    fn figures(&mut self, now: u64) -> (u64, u64, u64, f64) {
        let period = self.period;
        let w = *self.current(now);
        let elapsed = period - (w.expires - now);
        let min = if w.min == u64::MAX { 0 } else { w.min };
        let avg = w.sum.checked_div(w.count).unwrap_or(0);
        // QEMU divides by the elapsed time as it is, which is never 0 there either: the
        // older window has always run for half a period.
        let depth = w.sum as f64 / elapsed.max(1) as f64;
        (min, w.max, avg, depth)
    }
}

/// The figures over one interval of `stats-intervals`.
#[derive(Debug, Clone)]
struct TimedStats {
    /// Seconds.
    interval_length: u32,
    latency: [TimedAverage; KINDS],
}

/// Counters for one backend.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    counters: [Counter; KINDS],
    /// When the last accounted request ended (ns; 0: none yet, as QEMU tells).
    last_access_ns: u64,
    /// Invalid requests count as I/O for the idle time (QEMU's `account_invalid`).
    account_invalid: bool,
    /// Failed requests count for the total time and the idle time (`account_failed`).
    account_failed: bool,
    intervals: Vec<TimedStats>,
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

    /// Adds an interval (seconds, not 0) to report figures over (`stats-intervals`).
    pub(crate) fn add_interval(&mut self, seconds: u32) {
        let now = now_ns();
        let ns = u64::from(seconds) * 1_000_000_000;
        self.intervals.push(TimedStats {
            interval_length: seconds,
            latency: std::array::from_fn(|_| TimedAverage::new(ns, now)),
        });
    }

    /// Records a finished request that started at `started` ([`now_ns`]).
    pub(crate) fn done(&mut self, kind: IoKind, bytes: u64, started: u64, ok: bool) {
        let now = now_ns();
        let latency = if Clock::current() == Clock::Test {
            QTEST_LATENCY_NS
        } else {
            now.saturating_sub(started)
        };
        let c = &mut self.counters[kind.index()];
        if ok {
            c.ops += 1;
            c.bytes += bytes;
        } else {
            c.failed += 1;
        }
        if ok || self.account_failed {
            c.total_time_ns = c.total_time_ns.saturating_add(latency);
            self.last_access_ns = now;
            for t in &mut self.intervals {
                t.latency[kind.index()].account(latency, now);
            }
        }
    }

    /// Records a request refused before it started (out of bounds, misaligned).
    pub(crate) fn invalid(&mut self, kind: IoKind) {
        self.counters[kind.index()].invalid += 1;
        if self.account_invalid {
            self.last_access_ns = now_ns();
        }
    }

    /// The `BlockDeviceStats` dict.
    pub(crate) fn to_qdict(&self) -> QDict {
        let now = now_ns();
        let c = |k: IoKind| self.counters[k.index()];
        let mut d = QDict::new();
        for (name, k) in [
            ("rd", IoKind::Read),
            ("wr", IoKind::Write),
            ("unmap", IoKind::Unmap),
        ] {
            let c = c(k);
            d.insert(format!("{name}_bytes"), c.bytes);
            d.insert(format!("{name}_operations"), c.ops);
            d.insert(format!("{name}_merged"), 0i64);
            d.insert(format!("{name}_total_time_ns"), c.total_time_ns);
            d.insert(format!("failed_{name}_operations"), c.failed);
            d.insert(format!("invalid_{name}_operations"), c.invalid);
        }
        let flush = c(IoKind::Flush);
        d.insert("flush_operations", flush.ops);
        d.insert("flush_total_time_ns", flush.total_time_ns);
        d.insert("failed_flush_operations", flush.failed);
        d.insert("invalid_flush_operations", flush.invalid);
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
        if self.last_access_ns > 0 {
            d.insert("idle_time_ns", now.saturating_sub(self.last_access_ns));
        }
        d.insert("account_invalid", self.account_invalid);
        d.insert("account_failed", self.account_failed);
        let timed = self
            .intervals
            .iter()
            .map(|t| QObject::Dict(timed_qdict(t, now)));
        d.insert("timed_stats", QObject::List(timed.collect()));
        d
    }
}

/// One `BlockDeviceTimedStats`.
fn timed_qdict(t: &TimedStats, now: u64) -> QDict {
    let mut d = QDict::new();
    d.insert("interval_length", u64::from(t.interval_length));
    for (name, k) in [
        ("rd", IoKind::Read),
        ("wr", IoKind::Write),
        ("flush", IoKind::Flush),
    ] {
        // The figures start over windows that ended: on a copy, as reading them changes
        // nothing QEMU would show differently.
        let (min, max, avg, depth) = t.latency[k.index()].clone().figures(now);
        d.insert(format!("min_{name}_latency_ns"), min);
        d.insert(format!("max_{name}_latency_ns"), max);
        d.insert(format!("avg_{name}_latency_ns"), avg);
        if k != IoKind::Flush {
            d.insert(format!("avg_{name}_queue_depth"), depth);
        }
    }
    for k in [
        "min_zone_append_latency_ns",
        "max_zone_append_latency_ns",
        "avg_zone_append_latency_ns",
    ] {
        d.insert(k, 0u64);
    }
    d.insert("avg_zone_append_queue_depth", 0.0f64);
    d
}

#[cfg(test)]
mod tests {
    use super::TimedAverage;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_timed_average_covers_between_half_and_a_whole_period() {
        // 3 s asked: a 4 s period, windows ending at 2 s and 4 s.
        let mut t = TimedAverage::new(3 * S, 0);
        t.account(10, S / 2);
        t.account(30, S);
        // The older window counts as begun a period before it ends: 3 s ago.
        assert_eq!(t.figures(S), (10, 30, 20, 40.0 / (3 * S) as f64));
        // At 2 s the first window starts over; the second, older now, still has both.
        t.account(50, 2 * S);
        assert_eq!(t.figures(2 * S).2, 30);
        // At 4 s the second starts over: the first has only the last value.
        assert_eq!(t.figures(4 * S), (50, 50, 50, 50.0 / (2 * S) as f64));
        // Long idle: both empty.
        assert_eq!(t.figures(40 * S), (0, 0, 0, 0.0));
    }
}
