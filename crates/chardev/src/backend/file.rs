//! `file`, `pipe` and `stdio`: backends over file descriptors, with one connection for life.

use super::log::LogFile;
use super::{Connection, NoInput, Reader, Writer};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::path::Path;

#[derive(Clone, Copy)]
enum Kind {
    File,
    Pipe,
    Stdio,
}

/// An fd-based backend. Its files are opened when it is created, so errors surface in
/// `chardev-add`; the connection is handed out once.
pub(crate) struct FileBackend {
    kind: Kind,
    /// Input and output, until the frontend takes them.
    io: RefCell<Option<(Option<File>, Option<File>)>>,
    log: Option<LogFile>,
}

fn open_err(path: &str, e: &std::io::Error) -> Error {
    Error::Open {
        path: path.to_owned(),
        error: std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl FileBackend {
    pub(crate) fn file(data: &Args, log: Option<LogFile>) -> Result<Self> {
        let out_path = data.str("out")?;
        let append = data.bool_or("append", false);
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(out_path)
            .map_err(|e| open_err(out_path, &e))?;
        let input = match data.opt_str("in") {
            Some(p) => Some(File::open(p).map_err(|e| open_err(p, &e))?),
            None => None,
        };
        Ok(FileBackend {
            kind: Kind::File,
            io: RefCell::new(Some((input, Some(out)))),
            log,
        })
    }

    /// `device.in` and `device.out` when both exist, else `device` for both directions.
    pub(crate) fn pipe(data: &Args, log: Option<LogFile>) -> Result<Self> {
        let device = data.str("device")?;
        let (in_path, out_path) = (format!("{device}.in"), format!("{device}.out"));
        let (input, out) = if Path::new(&in_path).exists() && Path::new(&out_path).exists() {
            let input = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&in_path)
                .map_err(|e| open_err(&in_path, &e))?;
            let out = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&out_path)
                .map_err(|e| open_err(&out_path, &e))?;
            (input, out)
        } else {
            let both = OpenOptions::new()
                .read(true)
                .write(true)
                .open(device)
                .map_err(|e| open_err(device, &e))?;
            let dup = both.try_clone().map_err(|e| open_err(device, &e))?;
            (both, dup)
        };
        Ok(FileBackend {
            kind: Kind::Pipe,
            io: RefCell::new(Some((Some(input), Some(out)))),
            log,
        })
    }

    pub(crate) fn stdio(log: Option<LogFile>) -> Self {
        FileBackend {
            kind: Kind::Stdio,
            io: RefCell::new(Some((None, None))),
            log,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self.kind {
            Kind::File => "file",
            Kind::Pipe => "pipe",
            Kind::Stdio => "stdio",
        }
    }

    pub(crate) fn accept(&self) -> Option<Connection> {
        let (input, out) = self.io.borrow_mut().take()?;
        let (reader, writer): (Reader, Writer) = match self.kind {
            Kind::Stdio => (Box::pin(tokio::io::stdin()), Box::pin(tokio::io::stdout())),
            Kind::File | Kind::Pipe => (
                match input {
                    Some(f) => Box::pin(tokio::fs::File::from_std(f)),
                    None => Box::pin(NoInput),
                },
                match out {
                    Some(f) => Box::pin(tokio::fs::File::from_std(f)),
                    None => Box::pin(tokio::io::sink()),
                },
            ),
        };
        Some(Connection {
            reader,
            writer: LogFile::tee(self.log.clone(), writer),
            fds: None,
            opened: true,
            output_outlives_input: true,
        })
    }
}
