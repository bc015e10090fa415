//! `serial` and `parallel`: host devices, one connection for life.
//!
//! A serial device is set up as QEMU sets it (raw, 8 data bits, 115200 baud); a file
//! that is no terminal is used as it is, as QEMU uses it. A parallel port is claimed
//! (`PPCLAIM`) so that a device that is none is refused with QEMU's text; as in QEMU, what a
//! frontend writes to it is dropped and it gives no input, since only an emulated parallel
//! port drives it, through its own requests.

use super::fd_stream::FdStream;
use super::log::LogFile;
use super::{Connection, NoInput, Reader, Writer};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use rustix::termios::{ControlModes, InputModes, LocalModes, OptionalActions};
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Linux's `PPCLAIM` and `PPRELEASE` (`_IO('p', 0x8b)`, `_IO('p', 0x8c)`).
const PPCLAIM: libc::c_ulong = 0x708b;
const PPRELEASE: libc::c_ulong = 0x708c;

fn open(path: &str, flags: i32) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| Error::Open {
            path: path.to_owned(),
            error: e,
        })
}

/// Sets a terminal up as QEMU's serial chardev does; a file that is no terminal is left as
/// it is.
fn serial_line(fd: &File) {
    let Ok(mut t) = rustix::termios::tcgetattr(fd) else {
        return;
    };
    t.input_modes &= !(InputModes::IGNBRK
        | InputModes::BRKINT
        | InputModes::PARMRK
        | InputModes::ISTRIP
        | InputModes::INLCR
        | InputModes::IGNCR
        | InputModes::ICRNL
        | InputModes::IXON);
    t.output_modes &= !rustix::termios::OutputModes::OPOST;
    t.local_modes &= !(LocalModes::ECHO
        | LocalModes::ECHONL
        | LocalModes::ICANON
        | LocalModes::IEXTEN
        | LocalModes::ISIG);
    t.control_modes &= !(ControlModes::CSIZE
        | ControlModes::PARENB
        | ControlModes::PARODD
        | ControlModes::CRTSCTS
        | ControlModes::CSTOPB);
    t.control_modes |= ControlModes::CS8;
    let _ = t.set_speed(115_200);
    let _ = rustix::termios::tcsetattr(fd, OptionalActions::Now, &t);
}

/// A serial or parallel host device.
pub(crate) struct HostDev {
    parallel: bool,
    /// The device until the frontend takes it (parallel ports keep it, to release it).
    device: Cell<Option<File>>,
    log: Option<LogFile>,
}

impl HostDev {
    pub(crate) fn serial(data: &Args, log: Option<LogFile>) -> Result<HostDev> {
        let file = open(data.str("device")?, libc::O_NONBLOCK | libc::O_NOCTTY)?;
        serial_line(&file);
        Ok(HostDev {
            parallel: false,
            device: Cell::new(Some(file)),
            log,
        })
    }

    pub(crate) fn parallel(data: &Args, log: Option<LogFile>) -> Result<HostDev> {
        let file = open(data.str("device")?, 0)?;
        // SAFETY: PPCLAIM takes no argument and only acts on the descriptor, which `file`
        // owns for the whole call.
        if unsafe { libc::ioctl(file.as_raw_fd(), PPCLAIM) } < 0 {
            return Err(Error::NotParallel(std::io::Error::last_os_error()));
        }
        Ok(HostDev {
            parallel: true,
            device: Cell::new(Some(file)),
            log,
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        if self.parallel { "parallel" } else { "serial" }
    }

    pub(crate) fn accept(&self) -> Option<Connection> {
        let (reader, writer): (Reader, Writer) = if self.parallel {
            (Box::pin(NoInput), Box::pin(tokio::io::sink()))
        } else {
            let file = self.device.take()?;
            match FdStream::new(OwnedFd::from(file)) {
                Ok(stream) => stream.halves(),
                // Not something the reactor watches (a regular file): through the blocking
                // pool, as the file backend reads.
                Err(fd) => {
                    let file = File::from(fd);
                    let out = file.try_clone().ok()?;
                    (
                        Box::pin(tokio::fs::File::from_std(file)),
                        Box::pin(tokio::fs::File::from_std(out)),
                    )
                }
            }
        };
        Some(Connection {
            reader,
            writer: LogFile::tee(self.log.clone(), writer),
            fds: None,
            opened: true,
            output_outlives_input: false,
        })
    }

    /// Releases a parallel port.
    pub(crate) fn close(&self) {
        if self.parallel {
            if let Some(file) = self.device.take() {
                // SAFETY: as for PPCLAIM.
                unsafe { libc::ioctl(file.as_raw_fd(), PPRELEASE) };
            }
        }
    }
}
