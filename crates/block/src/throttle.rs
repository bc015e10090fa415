//! I/O throttling (QEMU: `util/throttle.c`, `block/throttle-groups.c`): QEMU's leaky buckets
//! with bursts, and throttle groups whose members (throttle filter nodes) share one set of
//! buckets, served round-robin so that no member starves another.
//!
//! A request asks its group for leave to run ([`GroupMember::intercept`]): it runs at once
//! when the buckets have room and nothing of its direction is queued in its member, and
//! otherwise waits in its member's queue until the group's timer finds room again. The
//! limits come from the group object (`throttle-group`) each time they are needed, so that
//! a live change (`qom-set`) takes effect at the next request.

use crate::clock;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::time::Duration;
use tokio::sync::oneshot;

/// One leaky bucket's limits: average rate, burst rate and how long a burst may last.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BucketLimits {
    /// Units per second (0: unlimited).
    pub avg: f64,
    /// Burst units per second (0: no bursts beyond the default tenth of a second).
    pub max: f64,
    /// Seconds a burst may last.
    pub burst_length: f64,
}

/// Which bucket: bytes or operations, in total or for one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// `bps-total`.
    BpsTotal,
    /// `bps-read`.
    BpsRead,
    /// `bps-write`.
    BpsWrite,
    /// `iops-total`.
    OpsTotal,
    /// `iops-read`.
    OpsRead,
    /// `iops-write`.
    OpsWrite,
}

const BUCKETS: usize = 6;

/// A throttle group's limits (QEMU's `ThrottleConfig` without the levels).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ThrottleLimits {
    /// Indexed by [`BucketKind`].
    pub buckets: [BucketLimits; BUCKETS],
    /// Bytes one operation stands for in the iops buckets (0: every request is one).
    pub op_size: u64,
}

/// The direction of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Reads.
    Read,
    /// Writes, zeroing and discards.
    Write,
}

impl Direction {
    fn index(self) -> usize {
        self as usize
    }

    /// The buckets a request of this direction fills and waits for.
    fn buckets(self) -> [(BucketKind, bool); 4] {
        let (bps, ops) = match self {
            Direction::Read => (BucketKind::BpsRead, BucketKind::OpsRead),
            Direction::Write => (BucketKind::BpsWrite, BucketKind::OpsWrite),
        };
        // (bucket, counts bytes)
        [
            (BucketKind::BpsTotal, true),
            (BucketKind::OpsTotal, false),
            (bps, true),
            (ops, false),
        ]
    }
}

/// Where a group's limits come from (the `throttle-group` object).
pub trait LimitsSource {
    /// The limits now.
    fn limits(&self) -> ThrottleLimits;

    /// Sets new limits (a drive's `block_set_io_throttle`).
    fn set_limits(&self, limits: ThrottleLimits);

    /// The clock the group's buckets leak on: this thread's, unless the source was made
    /// before the virtual clock was (QEMU picks a group's clock as it creates the group).
    fn clock(&self) -> clock::Clock {
        clock::Clock::current()
    }
}

/// The limits of a group no object describes: a drive's own (`-drive throttling.*`,
/// `block_set_io_throttle`), which QEMU keeps in an internal group named after the drive,
/// and the clock it was made with.
struct OwnLimits {
    limits: Cell<ThrottleLimits>,
    clock: clock::Clock,
}

impl LimitsSource for OwnLimits {
    fn limits(&self) -> ThrottleLimits {
        self.limits.get()
    }

    fn set_limits(&self, limits: ThrottleLimits) {
        self.limits.set(limits);
    }

    fn clock(&self) -> clock::Clock {
        self.clock
    }
}

/// A bucket's levels.
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

impl Level {
    fn leak(&mut self, b: &BucketLimits, seconds: f64) {
        self.level = (self.level - b.avg * seconds).max(0.0);
        if b.burst_length > 1.0 {
            self.burst_level = (self.burst_level - b.max * seconds).max(0.0);
        }
    }

    /// How long a request must wait for this bucket (QEMU's `throttle_compute_wait`).
    fn wait(&self, b: &BucketLimits) -> f64 {
        if b.avg == 0.0 {
            return 0.0;
        }
        // Without a burst rate, a tenth of a second of I/O may still go at once, so that
        // not every other request waits.
        let (bucket, burst_bucket) = if b.max == 0.0 {
            (b.avg / 10.0, 0.0)
        } else {
            (b.max * b.burst_length, b.max / 10.0)
        };
        let extra = self.level - bucket;
        if extra > 0.0 {
            return extra / b.avg;
        }
        if b.burst_length > 1.0 {
            let extra = self.burst_level - burst_bucket;
            if extra > 0.0 {
                return extra / b.max;
            }
        }
        0.0
    }
}

/// What the members of one group share.
struct GroupState {
    source: Rc<dyn LimitsSource>,
    limits: ThrottleLimits,
    levels: [Level; BUCKETS],
    /// The clock the buckets leak on.
    clock: clock::Clock,
    /// When the buckets last leaked, on `clock`'s scale.
    previous_leak: Duration,
    members: Vec<Weak<MemberQueues>>,
    /// Per direction: the member served last (round-robin).
    token: [usize; 2],
    /// Per direction: whether the timer that serves queued requests is armed.
    timer: [bool; 2],
}

impl GroupState {
    /// Leaks every bucket for the time since the last leak; new limits (a live change)
    /// start from empty buckets, as QEMU's `throttle_config` does.
    fn leak(&mut self, now: Duration) {
        let limits = self.source.limits();
        if limits != self.limits {
            self.limits = limits;
            self.levels = [Level::default(); BUCKETS];
            self.previous_leak = now;
            return;
        }
        let seconds = now.saturating_sub(self.previous_leak).as_secs_f64();
        self.previous_leak = now;
        for (level, b) in self.levels.iter_mut().zip(&self.limits.buckets) {
            level.leak(b, seconds);
        }
    }

    /// Seconds a request of `dir` must wait now.
    /// How long a request of `dir` must wait now, in whole nanoseconds as QEMU's timers
    /// count (less than one is no wait: a clock that does not move by itself would wait
    /// for ever on it).
    fn wait(&mut self, dir: Direction, now: Duration) -> Duration {
        self.leak(now);
        let seconds = dir
            .buckets()
            .iter()
            .map(|(k, _)| self.levels[*k as usize].wait(&self.limits.buckets[*k as usize]))
            .fold(0.0, f64::max);
        Duration::from_nanos((seconds * 1e9) as u64)
    }

    /// Counts a request of `bytes` (QEMU's `throttle_account`).
    fn account(&mut self, dir: Direction, bytes: u64) {
        let op_size = self.limits.op_size;
        let units = if op_size > 0 && bytes > op_size {
            bytes as f64 / op_size as f64
        } else {
            1.0
        };
        for (k, counts_bytes) in dir.buckets() {
            let amount = if counts_bytes { bytes as f64 } else { units };
            let level = &mut self.levels[k as usize];
            level.level += amount;
            if self.limits.buckets[k as usize].burst_length > 1.0 {
                level.burst_level += amount;
            }
        }
    }
}

/// A member's queued requests, per direction.
#[derive(Default)]
struct MemberQueues {
    waiting: [RefCell<VecDeque<oneshot::Sender<()>>>; 2],
    /// Set while the member's node is drained: its requests pass without limits, so that
    /// the drain does not wait for the throttle (QEMU's `io_limits_disabled`).
    disabled: Cell<u32>,
}

/// A throttle group shared by its members.
pub struct ThrottleGroup {
    name: String,
    state: RefCell<GroupState>,
}

/// One member of a group (a throttle filter node).
pub struct GroupMember {
    group: Rc<ThrottleGroup>,
    queues: Rc<MemberQueues>,
}

impl ThrottleGroup {
    /// The group's name (the `throttle-group` object's id).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's limits now.
    pub fn limits(&self) -> ThrottleLimits {
        let source = self.state.borrow().source.clone();
        source.limits()
    }

    /// Gives the group new limits; they apply from the next request.
    pub fn set_limits(&self, limits: ThrottleLimits) {
        let source = self.state.borrow().source.clone();
        source.set_limits(limits);
    }

    /// Serves the next queued request of `dir`, round-robin over the members from the one
    /// after the last served, or arms the timer when the buckets are still full.
    fn schedule_next(self: &Rc<Self>, dir: Direction) {
        let d = dir.index();
        let mut st = self.state.borrow_mut();
        st.members.retain(|m| m.strong_count() > 0);
        let members: Vec<Rc<MemberQueues>> = st.members.iter().filter_map(Weak::upgrade).collect();
        let n = members.len();
        if n == 0 {
            return;
        }
        let start = st.token[d] % n;
        let Some(next) = (1..=n)
            .map(|i| (start + i) % n)
            .find(|&i| !members[i].waiting[d].borrow().is_empty())
        else {
            return;
        };
        let now = st.clock.now();
        let wait = st.wait(dir, now);
        if !wait.is_zero() {
            if !st.timer[d] {
                st.timer[d] = true;
                let me = self.clone();
                let clock = st.clock;
                tokio::task::spawn_local(async move {
                    clock.sleep(wait).await;
                    me.state.borrow_mut().timer[d] = false;
                    me.schedule_next(dir);
                });
            }
            return;
        }
        st.token[d] = next;
        let waiter = members[next].waiting[d].borrow_mut().pop_front();
        drop(st);
        if let Some(tx) = waiter {
            if tx.send(()).is_err() {
                // The request was given up: serve the next.
                self.schedule_next(dir);
            }
        }
    }
}

impl GroupMember {
    /// Waits until a request of `bytes` in `dir` may run, and counts it.
    pub async fn intercept(&self, dir: Direction, bytes: u64) {
        let d = dir.index();
        if self.queues.disabled.get() == 0 {
            let must_wait = {
                let mut st = self.group.state.borrow_mut();
                let now = st.clock.now();
                !st.wait(dir, now).is_zero() || !self.queues.waiting[d].borrow().is_empty()
            };
            if must_wait {
                let (tx, rx) = oneshot::channel();
                self.queues.waiting[d].borrow_mut().push_back(tx);
                self.group.schedule_next(dir);
                // A member leaving (its node closing) drops the queue: go on then.
                let _ = rx.await;
            }
        }
        self.group.state.borrow_mut().account(dir, bytes);
        self.group.schedule_next(dir);
    }

    /// The member's node is drained: queued requests go now, new ones pass unthrottled.
    pub fn drained_begin(&self) {
        self.queues.disabled.set(self.queues.disabled.get() + 1);
        for q in &self.queues.waiting {
            for tx in q.borrow_mut().drain(..) {
                let _ = tx.send(());
            }
        }
    }

    /// The drained section ended.
    pub fn drained_end(&self) {
        self.queues
            .disabled
            .set(self.queues.disabled.get().saturating_sub(1));
    }

    /// The group.
    pub fn group(&self) -> &Rc<ThrottleGroup> {
        &self.group
    }
}

/// Finds a group's source of limits by the group's name.
pub type GroupLookup = Rc<dyn Fn(&str) -> Option<Rc<dyn LimitsSource>>>;

/// Every throttle group in use, by name (groups live while they have members).
#[derive(Default)]
pub struct ThrottleGroups {
    groups: RefCell<HashMap<String, Weak<ThrottleGroup>>>,
    lookup: RefCell<Option<GroupLookup>>,
}

impl ThrottleGroups {
    /// How group names are found: the program's objects (`throttle-group`).
    pub fn set_lookup(&self, f: GroupLookup) {
        *self.lookup.borrow_mut() = Some(f);
    }

    /// Joins group `name`; `None` when there is no such group.
    pub fn join(&self, name: &str) -> Option<GroupMember> {
        let group = match self.existing(name) {
            Some(g) => g,
            None => {
                let lookup = self.lookup.borrow().clone()?;
                self.create(name, lookup(name)?)
            }
        };
        Some(Self::member(group))
    }

    /// Joins group `name`, which is made with limits of its own, leaking on `clock`, when
    /// neither a group in use nor an object has that name (QEMU's groups of drives).
    pub fn join_or_create(&self, name: &str, clock: clock::Clock) -> GroupMember {
        let group = self.existing(name).unwrap_or_else(|| {
            let lookup = self.lookup.borrow().clone();
            let source = lookup.and_then(|l| l(name)).unwrap_or_else(|| {
                Rc::new(OwnLimits {
                    limits: Cell::new(ThrottleLimits::default()),
                    clock,
                })
            });
            self.create(name, source)
        });
        Self::member(group)
    }

    fn existing(&self, name: &str) -> Option<Rc<ThrottleGroup>> {
        self.groups.borrow().get(name).and_then(Weak::upgrade)
    }

    fn create(&self, name: &str, source: Rc<dyn LimitsSource>) -> Rc<ThrottleGroup> {
        let limits = source.limits();
        let clock = source.clock();
        let g = Rc::new(ThrottleGroup {
            name: name.to_owned(),
            state: RefCell::new(GroupState {
                source,
                limits,
                levels: [Level::default(); BUCKETS],
                clock,
                previous_leak: clock.now(),
                members: Vec::new(),
                token: [0; 2],
                timer: [false; 2],
            }),
        });
        self.groups
            .borrow_mut()
            .insert(name.to_owned(), Rc::downgrade(&g));
        g
    }

    fn member(group: Rc<ThrottleGroup>) -> GroupMember {
        let queues = Rc::new(MemberQueues::default());
        group
            .state
            .borrow_mut()
            .members
            .push(Rc::downgrade(&queues));
        GroupMember { group, queues }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    struct Fixed(ThrottleLimits);

    impl LimitsSource for Fixed {
        fn limits(&self) -> ThrottleLimits {
            self.0
        }

        fn set_limits(&self, _limits: ThrottleLimits) {}
    }

    fn groups(limits: ThrottleLimits) -> ThrottleGroups {
        let g = ThrottleGroups::default();
        g.set_lookup(Rc::new(move |name: &str| {
            (name == "tg").then(|| Rc::new(Fixed(limits)) as Rc<dyn LimitsSource>)
        }));
        g
    }

    fn bps(avg: f64, max: f64, burst_length: f64) -> ThrottleLimits {
        let mut l = ThrottleLimits::default();
        l.buckets[BucketKind::BpsTotal as usize] = BucketLimits {
            avg,
            max,
            burst_length,
        };
        l
    }

    #[test]
    fn a_bucket_without_bursts_lets_a_tenth_of_a_second_through() {
        let b = BucketLimits {
            avg: 1000.0,
            max: 0.0,
            burst_length: 1.0,
        };
        let mut l = Level {
            level: 100.0,
            ..Level::default()
        };
        assert_eq!(l.wait(&b), 0.0);
        l.level = 150.0;
        assert!((l.wait(&b) - 0.05).abs() < 1e-9);
        l.leak(&b, 0.05);
        assert_eq!(l.wait(&b), 0.0);
    }

    #[test]
    fn bursts_go_at_the_burst_rate_for_their_length() {
        let b = BucketLimits {
            avg: 100.0,
            max: 1000.0,
            burst_length: 2.0,
        };
        // 2 s of bursts fit in the main bucket, but the burst bucket holds a tenth of a
        // second of the burst rate.
        let mut l = Level {
            level: 150.0,
            burst_level: 150.0,
        };
        assert!((l.wait(&b) - 0.05).abs() < 1e-9);
        l.level = 2100.0;
        assert!((l.wait(&b) - 1.0).abs() < 1e-9);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn requests_over_the_rate_wait_and_members_share_the_group() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let g = groups(bps(1000.0, 0.0, 1.0));
                assert!(g.join("nope").is_none());
                let a = Rc::new(g.join("tg").expect("group"));
                let b = Rc::new(g.join("tg").expect("group"));
                let start = Instant::now();
                let done = Rc::new(RefCell::new(Vec::new()));
                let mut tasks = Vec::new();
                for (who, m) in [("a", a.clone()), ("b", b.clone())] {
                    let done = done.clone();
                    tasks.push(tokio::task::spawn_local(async move {
                        for _ in 0..10 {
                            m.intercept(Direction::Read, 100).await;
                            done.borrow_mut().push(who);
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("task");
                }
                // 2000 bytes at 1000/s, the first tenth of a second free.
                let took = start.elapsed().as_secs_f64();
                assert!((1.7..=2.0).contains(&took), "{took}");
                // Round-robin: neither member ran far ahead of the other.
                let order = done.borrow();
                let first_half_a = order[..10].iter().filter(|w| **w == "a").count();
                assert!((3..=7).contains(&first_half_a), "{order:?}");
            })
            .await;
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_drained_member_lets_its_queued_requests_go() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let g = groups(bps(100.0, 0.0, 1.0));
                let m = Rc::new(g.join("tg").expect("group"));
                // The first request fills the bucket; the next would wait about ten seconds.
                m.intercept(Direction::Write, 1000).await;
                let waiting = {
                    let m = m.clone();
                    tokio::task::spawn_local(async move { m.intercept(Direction::Write, 10).await })
                };
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished());
                let start = Instant::now();
                m.drained_begin();
                waiting.await.expect("task");
                // Requests during the drain pass at once too.
                m.intercept(Direction::Write, 1000).await;
                assert!(start.elapsed() < Duration::from_millis(1));
                m.drained_end();
            })
            .await;
    }
}
