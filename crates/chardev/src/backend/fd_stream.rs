//! A non-blocking terminal descriptor (a pseudo-terminal's master side, a serial device) as a
//! connection's two halves.

use super::{Reader, Writer};
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One registered descriptor, read and written through clones.
#[derive(Clone)]
pub(crate) struct FdStream(Rc<AsyncFd<OwnedFd>>);

impl FdStream {
    /// Registers `fd`, which must be non-blocking.
    ///
    /// # Errors
    /// The descriptor back, where the reactor cannot watch it (a regular file).
    pub(crate) fn new(fd: OwnedFd) -> Result<FdStream, OwnedFd> {
        // SAFETY: the AsyncFd owns the descriptor, which stays open and names the same file
        // until the AsyncFd is dropped.
        match unsafe { AsyncFd::register(fd) } {
            Ok(a) => Ok(FdStream(Rc::new(a))),
            Err(e) => Err(e.into_parts().0),
        }
    }

    /// The reading and the writing half.
    pub(crate) fn halves(self) -> (Reader, Writer) {
        (Box::pin(self.clone()), Box::pin(self))
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| rustix::io::read(fd.get_ref(), &mut *unfilled).map_err(Into::into))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A pseudo-terminal whose other side closed: the end of this connection.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(Into::into)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
