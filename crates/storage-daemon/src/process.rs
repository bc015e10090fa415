//! Process-level duties: the pid file and `--daemonize`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A written, locked pid file; removed when dropped.
pub struct PidFile {
    path: PathBuf,
    _file: File,
}

impl PidFile {
    /// Creates (or takes over) `path`, locks it and writes our pid. The lock keeps a second
    /// daemon from using the same file while this one runs.
    pub(crate) fn write(path: &Path) -> Result<PidFile, String> {
        let err = |what: &str, e: std::io::Error| {
            format!("{what} pid file: {}", ferrite_qapi::os_msg(&e))
        };
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    format!(
                        "Could not create '{}': {}",
                        path.display(),
                        ferrite_qapi::os_msg(&e)
                    )
                })?;
            // SAFETY: lockf only operates on the open descriptor `file` owns.
            if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } != 0 {
                return Err(err("Cannot lock", std::io::Error::last_os_error()));
            }
            // The file may have been unlinked by its previous owner between our open and the
            // lock; if so, try again with a fresh one.
            let same = match (file.metadata(), std::fs::metadata(path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            file.set_len(0).map_err(|e| err("Failed to truncate", e))?;
            writeln!(file, "{}", std::process::id())
                .map_err(|_| "Failed to write pid file".to_owned())?;
            return Ok(PidFile {
                path: path.to_owned(),
                _file: file,
            });
        }
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The child's end of the start-up status pipe.
pub struct DaemonizeHandle {
    status: Option<File>,
}

/// Forks. The parent waits for the child to report start-up and exits with its status; the
/// child returns a handle to report through. Must run before any other thread exists.
pub(crate) fn daemonize() -> DaemonizeHandle {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        eprintln!(
            "failed to create a pipe: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: called from main before the runtime or any other thread exists, so the child
    // is a complete copy of a single-threaded process.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("failed to fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            DaemonizeHandle {
                status: Some(File::from(write_end)),
            }
        }
        _ => {
            drop(write_end);
            let mut status = [1u8];
            let mut r = File::from(read_end);
            let code = match r.read(&mut status) {
                Ok(1) => i32::from(status[0]),
                _ => 1,
            };
            std::process::exit(code);
        }
    }
}

impl DaemonizeHandle {
    /// A handle for a process that did not daemonize.
    pub fn none() -> Self {
        DaemonizeHandle { status: None }
    }

    /// Start-up succeeded: detach from the terminal and let the parent exit 0.
    pub(crate) fn startup_done(&mut self) {
        let Some(mut status) = self.status.take() else {
            return;
        };
        let _ = std::env::set_current_dir("/");
        if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
            for fd in 0..=2 {
                // SAFETY: both descriptors are open; dup2 replaces the standard streams with
                // /dev/null, which the Rust standard library tolerates.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let _ = status.write_all(&[0]);
    }
}
