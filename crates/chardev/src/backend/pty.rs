//! `pty`: a pseudo-terminal whose other side (`/dev/pts/N`, optionally reached through a
//! symbolic link at `path`) a user opens with a terminal program.
//!
//! As in QEMU, the chardev is open only while something holds the other side: a frontend's
//! connection starts when it is opened and ends when it is closed, and the next opening
//! starts a new one. QEMU looks once a second; ferrite also watches the device with inotify,
//! so a monitor greets as soon as the terminal opens (the once-a-second look stays, for an
//! opening inotify does not see).

use super::fd_stream::FdStream;
use super::log::LogFile;
use super::{Connection, Writer};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use rustix::event::{PollFd, PollFlags};
use rustix::fs::inotify;
use rustix::pty::OpenptFlags;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::unix::AsyncFd;

/// How often the other side is looked for when no inotify event says it was opened (QEMU's
/// interval).
const LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// A pseudo-terminal chardev.
pub(crate) struct Pty {
    master: OwnedFd,
    /// The other side's device.
    name: String,
    /// The symbolic link this chardev made, removed when it closes.
    link: Option<PathBuf>,
    /// Openings of the other side (inotify), when the device can be watched.
    openings: Option<AsyncFd<OwnedFd>>,
    log: Option<LogFile>,
}

fn pty_err(e: rustix::io::Errno) -> Error {
    Error::Pty(e.into())
}

/// A new pseudo-terminal in raw mode: its master side (non-blocking) and the other side's
/// device name.
fn open_raw() -> Result<(OwnedFd, String)> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).map_err(pty_err)?;
    rustix::pty::grantpt(&master).map_err(pty_err)?;
    rustix::pty::unlockpt(&master).map_err(pty_err)?;
    let name = rustix::pty::ptsname(&master, Vec::new()).map_err(pty_err)?;
    let name = name.to_string_lossy().into_owned();
    // Raw mode is a property of the terminal, set once through the other side, which is
    // closed again so that the first user's opening is what connects.
    let slave = rustix::fs::open(
        name.as_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(pty_err)?;
    let mut t = rustix::termios::tcgetattr(&slave).map_err(pty_err)?;
    t.make_raw();
    rustix::termios::tcsetattr(&slave, rustix::termios::OptionalActions::Now, &t)
        .map_err(pty_err)?;
    drop(slave);
    rustix::io::ioctl_fionbio(&master, true).map_err(pty_err)?;
    Ok((master, name))
}

/// An inotify descriptor that becomes readable when `device` is opened.
fn watch_openings(device: &str) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)?;
    inotify::add_watch(&fd, device, inotify::WatchFlags::OPEN)?;
    // SAFETY: the AsyncFd owns the descriptor, which stays open and names the same inotify
    // instance until the AsyncFd is dropped.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

impl Pty {
    /// Makes the pseudo-terminal. `announce` prints where it is, as QEMU does for one made
    /// on the command line (on standard output, unless a chardev uses it).
    pub(crate) fn open(
        data: &Args,
        label: &str,
        announce: bool,
        log: Option<LogFile>,
    ) -> Result<Pty> {
        let (master, name) = open_raw()?;
        if announce {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "char device redirected to {name} (label {label})");
            let _ = out.flush();
        }
        let link = match data.opt_str("path") {
            Some(path) => {
                std::os::unix::fs::symlink(&name, path).map_err(Error::PtySymlink)?;
                Some(PathBuf::from(path))
            }
            None => None,
        };
        Ok(Pty {
            master,
            openings: watch_openings(&name).ok(),
            name,
            link,
            log,
        })
    }

    pub(crate) fn filename(&self) -> String {
        format!("pty:{}", self.name)
    }

    /// The other side's device, which `chardev-add` returns.
    pub(crate) fn device(&self) -> &str {
        &self.name
    }

    /// Whether the other side is open: the master hangs up while nothing holds it.
    fn peer_present(&self) -> bool {
        let mut fds = [PollFd::new(&self.master, PollFlags::OUT)];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(_) => !fds[0].revents().contains(PollFlags::HUP),
            Err(_) => false,
        }
    }

    /// Waits for an inotify event or the next look, whichever comes first.
    async fn opened_or_tick(&self) {
        let Some(openings) = &self.openings else {
            tokio::time::sleep(LOOK_INTERVAL).await;
            return;
        };
        tokio::select! {
            ready = openings.readable() => {
                if let Ok(mut guard) = ready {
                    // Drain the events: only that there were some matters.
                    let mut buf = [0u8; 1024];
                    while rustix::io::read(openings.get_ref(), &mut buf).is_ok() {}
                    guard.clear_ready();
                }
            }
            _ = tokio::time::sleep(LOOK_INTERVAL) => {}
        }
    }

    /// Waits until the other side is opened, then serves it until it is closed.
    pub(crate) async fn accept(&self) -> Option<Connection> {
        while !self.peer_present() {
            self.opened_or_tick().await;
        }
        let fd = self.master.as_fd().try_clone_to_owned().ok()?;
        let (reader, writer) = FdStream::new(fd).ok()?.halves();
        let writer: Writer = LogFile::tee(self.log.clone(), writer);
        Some(Connection {
            reader,
            writer,
            fds: None,
            opened: true,
            output_outlives_input: false,
        })
    }

    /// Removes the symbolic link.
    pub(crate) fn close(&self) {
        if let Some(link) = &self.link {
            let _ = std::fs::remove_file(link);
        }
    }
}
