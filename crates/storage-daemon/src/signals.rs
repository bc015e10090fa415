//! The signals that end the program (SIGINT, SIGTERM, SIGHUP, as QEMU's `termsig_handler`
//! takes them) and who sent them: qemu-system reports the sender when it terminates.

use std::sync::atomic::{AtomicI32, Ordering};
use tokio::signal::unix::{SignalKind, signal};

/// A terminating signal that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Termination {
    /// The signal's number.
    pub signal: i32,
    /// The process that sent it, when another process did (not a terminal's ^C).
    pub sender: Option<i32>,
}

impl Termination {
    /// qemu-system's line for it (without the program's name): the signal, and the sender
    /// with the first word of its command line.
    pub fn report(&self) -> String {
        match self.sender {
            None => format!("terminating on signal {}", self.signal),
            Some(pid) => {
                let name = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .ok()
                    .and_then(|c| {
                        let first = c.split(|b| *b == 0).next()?;
                        Some(String::from_utf8_lossy(first).into_owned())
                    })
                    .unwrap_or_else(|| "<unknown process>".to_owned());
                format!(
                    "terminating on signal {} from pid {pid} ({name})",
                    self.signal
                )
            }
        }
    }
}

/// The sender of the last terminating signal (0: none known).
static LAST_SENDER: AtomicI32 = AtomicI32::new(0);

/// Keeps the sender of a terminating signal (run in the signal handler).
fn note_sender(info: &libc::siginfo_t) {
    // SAFETY: si_pid is read from the siginfo of a SIGINT, SIGTERM or SIGHUP, whose union
    // member is the sender's (filled by kill(2) and friends, 0 for a signal a terminal
    // raises).
    let pid = unsafe { info.si_pid() };
    LAST_SENDER.store(pid, Ordering::Relaxed);
}

/// Waits for a terminating signal; never returns if they cannot be caught.
pub(crate) async fn wait_for_termination() -> Termination {
    const SIGNALS: [(libc::c_int, SignalKind); 3] = [
        (libc::SIGINT, SignalKind::interrupt()),
        (libc::SIGTERM, SignalKind::terminate()),
        (libc::SIGHUP, SignalKind::hangup()),
    ];
    for (number, _) in SIGNALS {
        // SAFETY: the action (`note_sender`) only reads the siginfo it is given and stores
        // into an atomic, both async-signal-safe; it is registered before tokio's own action
        // for the same signal, so the sender is stored before the signal's stream wakes.
        let _ = unsafe { signal_hook_registry::register_sigaction(number, note_sender) };
    }
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SIGNALS[0].1),
        signal(SIGNALS[1].1),
        signal(SIGNALS[2].1),
    ) else {
        return std::future::pending().await;
    };
    let signal = tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
        _ = hup.recv() => libc::SIGHUP,
    };
    let sender = LAST_SENDER.load(Ordering::Relaxed);
    Termination {
        signal,
        sender: (sender > 0).then_some(sender),
    }
}
