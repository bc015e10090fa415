//! Messages for the person running the program, on its standard error, as QEMU's
//! `error_report` and `warn_report` print them. Where they come from decides how they
//! start: from the main loop (a job's completion step), with the program's name; from a
//! command-line option being processed, with the program's name and the option; from a
//! monitor command, with nothing (QEMU leaves out its location while a monitor is
//! current).

use std::future::Future;

tokio::task_local! {
    /// The command-line option being processed (`--blockdev driver=...`).
    static OPTION: String;
    /// Whether a monitor's command runs (QEMU's `monitor_cur()`).
    static MONITOR_COMMAND: bool;
}

/// Runs `fut` as a monitor's command: what it reports names no program (QEMU leaves its
/// location out while a monitor is current).
pub async fn in_monitor_command<F: Future>(fut: F) -> F::Output {
    MONITOR_COMMAND.scope(true, fut).await
}

/// Runs `fut` as the main loop's work though a command started it (what `quit` closes,
/// which QEMU closes once its main loop has ended): what it reports names the program.
pub async fn in_main_loop<F: Future>(fut: F) -> F::Output {
    MONITOR_COMMAND.scope(false, fut).await
}

/// Runs `fut` as the processing of the command-line option written `describe`: what it
/// reports names the program and the option first. Within another option's processing
/// (a front end's option handed to the daemon's), the outer one is named.
pub async fn at_option<F: Future>(describe: String, fut: F) -> F::Output {
    if OPTION.try_with(|_| ()).is_ok() {
        return fut.await;
    }
    OPTION.scope(describe, fut).await
}

/// The program's name as its messages start with it: its file name as it was run.
pub fn program() -> String {
    std::env::args()
        .next()
        .as_deref()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("ferrite")
        .to_owned()
}

/// `prog: option: ` while an option is processed, else nothing.
fn option_prefix() -> String {
    OPTION
        .try_with(|o| format!("{}: {o}: ", program()))
        .unwrap_or_default()
}

/// Prints `msg` as the program's error message: from the main loop (or an option) with
/// the program's name, from a monitor's command without.
pub fn error_report(msg: &str) {
    match OPTION.try_with(String::clone) {
        Ok(o) => eprintln!("{}: {o}: {msg}", program()),
        Err(_) if MONITOR_COMMAND.try_with(|m| *m).unwrap_or(false) => eprintln!("{msg}"),
        Err(_) => eprintln!("{}: {msg}", program()),
    }
}

/// Prints `msg` as an error found while a request runs: a monitor command's (no prefix)
/// or a command-line option's.
pub fn command_error_report(msg: &str) {
    eprintln!("{}{msg}", option_prefix());
}

/// Prints `msg` as a warning raised while a request runs (see [`command_error_report`]).
pub fn warn_report(msg: &str) {
    eprintln!("{}warning: {msg}", option_prefix());
}
