//! The qtest protocol (`-qtest chardev:ID`): a line-based channel a test uses beside QMP to
//! drive the machine's clock (the block layer's virtual clock: throttled requests wait on
//! it). There is no guest memory or I/O space to reach, so only the clock commands act; the
//! others answer FAIL as QEMU does for what it does not know.

use ferrite_block::clock::VirtualClock;
use ferrite_chardev::Frontend;
use std::rc::Rc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The answer to one command line, in QEMU's words.
async fn answer(clock: &VirtualClock, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        // Without an amount: to the next timer, if one waits.
        ["clock_step"] => match clock.next_deadline() {
            Some(deadline) => step(clock, deadline).await,
            None => "FAIL cannot advance clock to the next deadline because there is no \
                     pending deadline"
                .into(),
        },
        ["clock_step", ns] => match ns.parse::<u64>() {
            Ok(n) => step(clock, clock.now_ns().saturating_add(n)).await,
            _ => "FAIL invalid clock_step argument".into(),
        },
        // QEMU says FAIL when the clock is past the time already (it stays where it is).
        ["clock_set", ns] => match ns.parse::<i64>() {
            Ok(n) => {
                let target = u64::try_from(n).unwrap_or(0);
                clock.advance_to(target).await;
                let now = clock.now_ns();
                format!("{} {now}", if now == target { "OK" } else { "FAIL" })
            }
            _ => "FAIL invalid clock_set argument".into(),
        },
        ["endianness"] => "OK little".into(),
        [] => "FAIL empty command".into(),
        [cmd, ..] => format!("FAIL Unknown command '{cmd}'"),
    }
}

/// `clock_step` to `target`: QEMU's answer when the clock did not move.
async fn step(clock: &VirtualClock, target: u64) -> String {
    let before = clock.now_ns();
    clock.advance_to(target).await;
    match clock.now_ns() {
        now if now > before => format!("OK {now}"),
        _ => "FAIL could not advance time".into(),
    }
}

/// QEMU's qtest log (`-qtest-log`, standard error by default): the channel opening and
/// closing, each command received and each answer, timed from the server's start.
pub(crate) struct QtestLog {
    out: Option<std::cell::RefCell<Box<dyn std::io::Write>>>,
    start: std::time::SystemTime,
    /// A test is connected: its channel closes (and says so) at the latest at exit.
    opened: std::cell::Cell<bool>,
}

impl QtestLog {
    /// The log `-qtest-log` names (`none` for none), standard error without it.
    pub(crate) fn open(target: Option<&str>) -> std::io::Result<QtestLog> {
        let out: Option<Box<dyn std::io::Write>> = match target {
            None => Some(Box::new(std::io::stderr())),
            Some("none") => None,
            Some(path) => Some(Box::new(std::fs::File::create(path)?)),
        };
        Ok(QtestLog {
            out: out.map(std::cell::RefCell::new),
            start: std::time::SystemTime::now(),
            opened: std::cell::Cell::new(false),
        })
    }

    fn opened(&self) {
        self.opened.set(true);
        self.line(format_args!("[I {}] OPENED", self.time(false)));
    }

    /// The channel closed (the test went, or the program ends).
    pub(crate) fn closed(&self) {
        if self.opened.replace(false) {
            self.line(format_args!("[I +{}] CLOSED", self.time(true)));
        }
    }

    fn line(&self, text: std::fmt::Arguments<'_>) {
        if let Some(out) = &self.out {
            let mut out = out.borrow_mut();
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
        }
    }

    /// `sec.usec`, since the start (`relative`) or of the start itself.
    fn time(&self, relative: bool) -> String {
        let d = if relative {
            self.start.elapsed().unwrap_or_default()
        } else {
            self.start
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
        };
        format!("{}.{:06}", d.as_secs(), d.subsec_micros())
    }
}

/// Serves the protocol on `dev`'s connections until the program ends.
pub(crate) fn serve(dev: Frontend, clock: Rc<VirtualClock>, log: Rc<QtestLog>) {
    tokio::task::spawn_local(async move {
        while let Some(conn) = dev.accept().await {
            log.opened();
            let mut lines = BufReader::new(conn.reader).lines();
            let mut writer = conn.writer;
            while let Ok(Some(line)) = lines.next_line().await {
                log.line(format_args!("[R +{}] {line}", log.time(true)));
                let reply = answer(&clock, &line).await;
                log.line(format_args!("[S +{}] {reply}", log.time(true)));
                if writer
                    .write_all(format!("{reply}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
                let _ = writer.flush().await;
            }
            log.closed();
            dev.disconnected();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::answer;
    use ferrite_block::clock::VirtualClock;

    #[tokio::test(flavor = "current_thread")]
    async fn the_clock_moves_forward_only() {
        let c = VirtualClock::default();
        // qemu-system-x86_64 10.0.2 under qtest answers these so.
        assert_eq!(answer(&c, "clock_step 100").await, "OK 100");
        assert_eq!(answer(&c, "clock_set 50").await, "FAIL 100");
        assert_eq!(answer(&c, "clock_set 1000").await, "OK 1000");
        assert_eq!(
            answer(&c, "clock_step 0").await,
            "FAIL could not advance time"
        );
        assert_eq!(
            answer(&c, "clock_step").await,
            "FAIL cannot advance clock to the next deadline because there is no pending \
             deadline"
        );
        assert_eq!(
            answer(&c, "clock_step -1").await,
            "FAIL invalid clock_step argument"
        );
        assert_eq!(
            answer(&c, "outb 0x10 1").await,
            "FAIL Unknown command 'outb'"
        );
    }
}
