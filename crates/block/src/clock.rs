//! The clock timed block-layer work runs on (throttling): the host's monotonic clock, or,
//! under a front end driven by qtest (`-accel qtest`), a virtual clock that moves only when
//! the test says so (`clock_step`), as QEMU's `QEMU_CLOCK_VIRTUAL` does there. Timers of the
//! virtual clock fire in deadline order as it passes them.
//!
//! The virtual clock belongs to the thread that installs it ([`use_virtual`]); other threads
//! keep the host's.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A clock that moves only when told to, with the timers waiting on it.
#[derive(Default)]
pub struct VirtualClock {
    now: Cell<u64>,
    /// Deadline (ns) and whom to wake, unordered.
    timers: RefCell<Vec<(u64, oneshot::Sender<()>)>>,
}

impl VirtualClock {
    /// Its time in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.now.get()
    }

    /// The earliest deadline of a timer still waiting.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut timers = self.timers.borrow_mut();
        timers.retain(|(_, tx)| !tx.is_closed());
        timers.iter().map(|(d, _)| *d).min()
    }

    /// Moves the clock to `target` (never back), stopping at each timer's deadline on the
    /// way to fire it and let what it woke run, so that timers armed meanwhile fire in
    /// order too (QEMU's `qtest_clock_warp`).
    pub async fn advance_to(&self, target: u64) {
        // A timer re-armed for the moment it fired in would keep the clock here for ever;
        // after this many rounds the clock moves on regardless.
        let mut rounds = 0u32;
        while let Some(deadline) = self.next_deadline().filter(|d| *d <= target) {
            rounds += 1;
            if rounds > 1_000_000 {
                break;
            }
            self.now.set(self.now.get().max(deadline));
            let now = self.now.get();
            let due: Vec<_> = {
                let mut timers = self.timers.borrow_mut();
                let (due, rest) = std::mem::take(&mut *timers)
                    .into_iter()
                    .partition(|(d, _)| *d <= now);
                *timers = rest;
                due
            };
            for (_, tx) in due {
                let _ = tx.send(());
            }
            // What the timers woke runs before the clock moves on: requests complete and
            // arm their next timers.
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
        }
        self.now.set(self.now.get().max(target));
    }

    fn timer(&self, after: Duration) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let ns = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
        self.timers
            .borrow_mut()
            .push((self.now.get().saturating_add(ns), tx));
        rx
    }
}

thread_local! {
    static VIRTUAL: RefCell<Option<Rc<VirtualClock>>> = const { RefCell::new(None) };
}

/// Makes `clock` this thread's clock for timed block-layer work.
pub fn use_virtual(clock: Rc<VirtualClock>) {
    VIRTUAL.with(|v| *v.borrow_mut() = Some(clock));
}

fn virtual_clock() -> Option<Rc<VirtualClock>> {
    VIRTUAL.with(|v| v.borrow().clone())
}

/// Which clock timed work waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// The host's monotonic clock.
    Host,
    /// This thread's virtual clock, where one is installed (else the host's).
    Test,
}

impl Clock {
    /// This thread's clock now: the virtual one under qtest.
    pub fn current() -> Clock {
        if virtual_clock().is_some() {
            Clock::Test
        } else {
            Clock::Host
        }
    }

    fn virtual_clock(self) -> Option<Rc<VirtualClock>> {
        match self {
            Clock::Host => None,
            Clock::Test => virtual_clock(),
        }
    }

    /// The time now, from a fixed start.
    pub fn now(self) -> Duration {
        match self.virtual_clock() {
            Some(c) => Duration::from_nanos(c.now_ns()),
            None => {
                static START: OnceLock<Instant> = OnceLock::new();
                START.get_or_init(Instant::now).elapsed()
            }
        }
    }

    /// Waits `d` on this clock.
    pub async fn sleep(self, d: Duration) {
        match self.virtual_clock() {
            Some(c) => {
                let rx = c.timer(d);
                // A clock that goes away takes its timers with it: nothing waits forever
                // then.
                let _ = rx.await;
            }
            None => tokio::time::sleep(d).await,
        }
    }
}

/// The time now on this thread's clock, from a fixed start.
pub fn now() -> Duration {
    Clock::current().now()
}

/// Waits `d` on this thread's clock.
pub async fn sleep(d: Duration) {
    Clock::current().sleep(d).await;
}

/// The machine's virtual clock as a snapshot records it (QEMU's `QEMU_CLOCK_VIRTUAL`): this
/// thread's virtual clock under qtest; elsewhere, with no guest CPU to count it, the host's
/// real time since the epoch in whole microseconds, which is what qemu-storage-daemon
/// records.
pub fn vm_clock_ns() -> u64 {
    match virtual_clock() {
        Some(c) => c.now_ns(),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| {
                u64::try_from(d.as_micros() * 1000).unwrap_or(u64::MAX)
            }),
    }
}

/// `secs` since the epoch as local calendar time (`localtime_r`), for the dates images
/// and snapshots record.
pub fn local_tm(secs: i64) -> libc::tm {
    let t: libc::time_t = secs;
    // SAFETY: `tm` is plain data that localtime_r fills (or leaves zeroed on failure).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant.
    unsafe { libc::localtime_r(&t, &mut tm) };
    tm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn virtual_timers_fire_in_order_as_the_clock_passes_them() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let clock = Rc::new(VirtualClock::default());
                use_virtual(clock.clone());
                let fired = Rc::new(RefCell::new(Vec::new()));
                for ms in [30u64, 10, 20] {
                    let fired = fired.clone();
                    tokio::task::spawn_local(async move {
                        sleep(Duration::from_millis(ms)).await;
                        fired.borrow_mut().push((ms, now()));
                        // Re-armed from the callback: fires within the same step.
                        if ms == 10 {
                            sleep(Duration::from_millis(5)).await;
                            fired.borrow_mut().push((15, now()));
                        }
                    });
                }
                tokio::task::yield_now().await;
                assert_eq!(clock.next_deadline(), Some(10_000_000));
                clock.advance_to(25_000_000).await;
                let got: Vec<u64> = fired.borrow().iter().map(|(ms, _)| *ms).collect();
                assert_eq!(got, vec![10, 15, 20]);
                assert_eq!(fired.borrow()[1].1, Duration::from_millis(15));
                assert_eq!(now(), Duration::from_millis(25));
                clock.advance_to(100_000_000).await;
                assert_eq!(fired.borrow().len(), 4);
            })
            .await;
    }
}
