//! Messages for the person running the program, on its standard error, as QEMU's
//! `error_report` prints them: the program's name, then the message. For what fails
//! where no command is there to return an error (a job's completion step).

/// Prints `msg` as the program's error message.
pub fn error_report(msg: &str) {
    eprintln!("{}: {msg}", program());
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

/// Prints `msg` as an error reported while a monitor command runs (QEMU's `error_report`
/// with a monitor current, which leaves out the program's name).
pub fn command_error_report(msg: &str) {
    eprintln!("{msg}");
}

/// Prints `msg` as a warning raised by a monitor command (QEMU's `warn_report` while a
/// monitor is current, which leaves out the program's name).
pub fn warn_report(msg: &str) {
    eprintln!("warning: {msg}");
}
