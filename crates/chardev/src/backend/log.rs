//! `logfile`/`logappend`: a copy of everything the frontend writes.

use crate::error::{Error, Result};
use ferrite_qapi::Args;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// An open log file. Writes are small and to a local file, as QEMU's are.
#[derive(Clone)]
pub(crate) struct LogFile(Rc<File>);

impl LogFile {
    pub(crate) fn open(data: &Args) -> Result<Option<LogFile>> {
        let Some(path) = data.opt_str("logfile") else {
            return Ok(None);
        };
        let append = data.bool_or("logappend", false);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| Error::Open {
                path: path.to_owned(),
                error: e,
            })?;
        Ok(Some(LogFile(Rc::new(file))))
    }

    /// Wraps `inner` so that what it accepts is also logged.
    pub(crate) fn tee(log: Option<LogFile>, inner: super::Writer) -> super::Writer {
        match log {
            None => inner,
            Some(log) => Box::pin(Tee { inner, log }),
        }
    }
}

struct Tee {
    inner: super::Writer,
    log: LogFile,
}

impl AsyncWrite for Tee {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = self.inner.as_mut().poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            // A failing log must not break the monitor; QEMU ignores log errors too.
            let _ = (&*self.log.0).write_all(&buf[..n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}
