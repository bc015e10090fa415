//! `ferrite-storage-daemon`: a drop-in replacement for `qemu-storage-daemon` 10.0.
//!
//! The program parses the command line (`cli`), forks if asked (`process`), then runs one
//! single-threaded tokio runtime (QEMU's main loop) that owns all state (`daemon`), applies
//! the options in order (`wiring`) and serves until `quit` or a signal. `fuzzing` holds the
//! entry points of the coverage-guided fuzz targets in `fuzz/`.

pub(crate) mod cli;
mod daemon;
pub mod fuzzing;
mod latch;
mod logging;
mod object_links;
mod process;
mod signals;
mod wiring;

use cli::parse::{CliOption, parse_args};

/// What a second front end (`ferrite-system-x86_64`) builds on: the daemon's state and
/// command table, its options and their processing in order, and its main loop.
pub mod front_end {
    pub use crate::cli::help::{QEMU_VERSION, package};
    pub use crate::cli::keyval;
    pub use crate::cli::parse::CliOption;
    pub use crate::daemon::{Daemon, DaemonCommands};
    pub use crate::object_links::{throttle_config, throttle_limits};
    pub use crate::process::{DaemonizeHandle, PidFile};
    pub use crate::signals::Termination;
    pub use crate::wiring::{OnTermination, OptionError, Startup, object_options, run, start};
    pub use crate::{main_loop, tune_allocator};
}
use std::process::ExitCode;

/// Large request buffers (NBD reads and writes of up to 32 MiB) are served by mmap and given
/// back to the system when freed. Without a fixed threshold glibc raises it after the first
/// frees and keeps such buffers on the heap, which then stays resident.
pub fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; it is called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// The program: parses `std::env::args`, runs the daemon, and says how it ended.
pub fn main() -> ExitCode {
    tune_allocator();
    let argv: Vec<String> = std::env::args().collect();
    let prog = argv
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or("ferrite-storage-daemon")
        .to_owned();
    let options = match parse_args(argv.get(1..).unwrap_or(&[])) {
        Ok(o) => o,
        Err(e) => {
            // getopt names the program as it was invoked.
            let invoked = argv.first().map_or(prog.as_str(), String::as_str);
            eprintln!("{invoked}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // -h, -V and -T help act when reached, before anything else runs.
    for opt in &options {
        match opt {
            CliOption::Help => {
                print!("{}", cli::help::help_text(&prog));
                return ExitCode::SUCCESS;
            }
            CliOption::Version => {
                print!("{}", cli::help::version_text(&prog));
                return ExitCode::SUCCESS;
            }
            CliOption::Trace(t) if t == "help" => {
                logging::print_targets();
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
    }
    let traces: Vec<String> = options
        .iter()
        .filter_map(|o| match o {
            CliOption::Trace(t) => Some(t.clone()),
            _ => None,
        })
        .collect();
    if let Err(e) = logging::init(&traces) {
        eprintln!("{prog}: {e}");
        return ExitCode::FAILURE;
    }
    let handle = if options.contains(&CliOption::Daemonize) {
        process::daemonize()
    } else {
        process::DaemonizeHandle::none()
    };
    main_loop(&prog.clone(), async move {
        let daemon = daemon::Daemon::new();
        match wiring::start(&daemon, &options, &prog).await {
            Ok(wiring::Startup::Exit) => ExitCode::SUCCESS,
            Ok(wiring::Startup::ExitFailure) => ExitCode::FAILURE,
            Ok(wiring::Startup::Running(pidfile)) => {
                wiring::run(daemon, pidfile, handle, None).await;
                ExitCode::SUCCESS
            }
            Err(wiring::OptionError(msg)) => {
                eprintln!("{prog}: {msg}");
                // Exports made by earlier options end (a FUSE mount must not outlive us).
                daemon.shut_down().await;
                daemon.chardevs.close_all();
                ExitCode::FAILURE
            }
        }
    })
}

/// Runs `body` on QEMU's main loop (a single-threaded runtime with the I/O thread pool) and
/// says how the program ended.
pub fn main_loop(prog: &str, body: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The I/O thread pool: QEMU's aio=threads pool also stops at 64 workers.
        .max_blocking_threads(64)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{prog}: cannot start the main loop: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, body);
    // A stdio monitor leaves a blocking read of stdin in flight; do not wait for it.
    drop(local);
    runtime.shutdown_background();
    code
}
