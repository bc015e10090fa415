//! The qtest protocol (`-qtest chardev:ID`): a line-based channel a test uses beside QMP to
//! drive the machine's clock. There is no guest memory or I/O space to reach, so only the
//! clock commands act; the others answer FAIL as QEMU does for what it does not know.

use ferrite_chardev::Chardev;
use std::cell::Cell;
use std::rc::Rc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The virtual clock (nanoseconds) `clock_step` and `clock_set` move.
#[derive(Default)]
pub(crate) struct VirtualClock {
    now: Cell<i64>,
}

impl VirtualClock {
    /// The clock's time.
    pub(crate) fn now(&self) -> i64 {
        self.now.get()
    }
}

/// The answer to one command line.
fn answer(clock: &VirtualClock, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["clock_step"] => format!("OK {}", clock.now()),
        ["clock_step", ns] => match ns.parse::<i64>() {
            Ok(n) if n >= 0 => {
                clock.now.set(clock.now().saturating_add(n));
                format!("OK {}", clock.now())
            }
            _ => "FAIL invalid clock_step argument".into(),
        },
        ["clock_set", ns] => match ns.parse::<i64>() {
            Ok(n) => {
                if n > clock.now() {
                    clock.now.set(n);
                }
                format!("OK {}", clock.now())
            }
            _ => "FAIL invalid clock_set argument".into(),
        },
        ["endianness"] => "OK little".into(),
        [] => "FAIL empty command".into(),
        [cmd, ..] => format!("FAIL Unknown command '{cmd}'"),
    }
}

/// Serves the protocol on `dev`'s connections until the program ends.
pub(crate) fn serve(dev: Rc<Chardev>, clock: Rc<VirtualClock>) {
    tokio::task::spawn_local(async move {
        while let Some(conn) = dev.accept().await {
            let mut lines = BufReader::new(conn.reader).lines();
            let mut writer = conn.writer;
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = answer(&clock, &line) + "\n";
                if writer.write_all(reply.as_bytes()).await.is_err() {
                    break;
                }
                let _ = writer.flush().await;
            }
            dev.disconnected();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{VirtualClock, answer};

    #[test]
    fn the_clock_moves_forward_only() {
        let c = VirtualClock::default();
        assert_eq!(answer(&c, "clock_step 100"), "OK 100");
        assert_eq!(answer(&c, "clock_set 50"), "OK 100");
        assert_eq!(answer(&c, "clock_set 1000"), "OK 1000");
        assert_eq!(answer(&c, "clock_step"), "OK 1000");
        assert_eq!(answer(&c, "outb 0x10 1"), "FAIL Unknown command 'outb'");
    }
}
