//! Descriptors a peer passes with SCM_RIGHTS over a unix socket connection, kept for the
//! frontend (a monitor's `getfd` and `add-fd`) the way QEMU keeps them: the descriptors of
//! the last message that carried any, until a command takes one.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;

/// The most descriptors one message may bring (QEMU's limit); more are closed by the kernel.
const MAX_FDS: usize = 16;

/// The descriptors that arrived on a connection and wait for a command.
#[derive(Default)]
pub struct PassedFds {
    fds: RefCell<Vec<OwnedFd>>,
}

impl PassedFds {
    /// The first descriptor of the last message that carried any; the others of that
    /// message are closed, as QEMU does.
    pub fn take(&self) -> Option<OwnedFd> {
        let mut fds = std::mem::take(&mut *self.fds.borrow_mut());
        (!fds.is_empty()).then(|| fds.swap_remove(0))
    }

    fn replace(&self, fds: Vec<OwnedFd>) {
        // The ones not taken from an earlier message are closed when dropped here.
        *self.fds.borrow_mut() = fds;
    }
}

/// The read half of a unix socket connection that also receives descriptors.
pub(crate) struct ScmReader {
    half: OwnedReadHalf,
    fds: Rc<PassedFds>,
}

impl ScmReader {
    pub(crate) fn new(half: OwnedReadHalf, fds: Rc<PassedFds>) -> Self {
        ScmReader { half, fds }
    }
}

/// One `recvmsg`: the bytes read and the descriptors that came with them.
fn receive(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        stream,
        &mut [io::IoSliceMut::new(buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = m {
            fds.extend(passed);
        }
    }
    Ok((msg.bytes, fds))
}

impl AsyncRead for ScmReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let stream: &UnixStream = this.half.as_ref();
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match stream.try_io(Interest::READABLE, || receive(stream, unfilled)) {
                Ok((n, fds)) => {
                    if !fds.is_empty() {
                        this.fds.replace(fds);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn descriptors_arrive_with_their_bytes_and_the_last_message_wins() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let (r, _w) = UnixStream::from_std(ours).unwrap().into_split();
        let fds = Rc::new(PassedFds::default());
        let mut reader = ScmReader::new(r, fds.clone());
        let send = |byte: &[u8], files: &[&std::fs::File]| {
            use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
            use std::os::fd::AsFd;
            let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
            sendmsg(
                &theirs,
                &[io::IoSlice::new(byte)],
                &mut control,
                SendFlags::empty(),
            )
            .unwrap();
        };
        let a = tempfile::tempfile().unwrap();
        let b = tempfile::tempfile().unwrap();
        send(b" ", &[&a, &b]);
        let mut buf = [0u8; 8];
        assert_eq!(reader.read(&mut buf).await.unwrap(), 1);
        send(b"x", &[&b]);
        assert_eq!(reader.read(&mut buf).await.unwrap(), 1);
        let got = fds.take().expect("a descriptor");
        let same = |f: &std::fs::File, g: &OwnedFd| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::File::from(g.try_clone().unwrap())
                .metadata()
                .unwrap();
            m.ino() == f.metadata().unwrap().ino()
        };
        assert!(same(&b, &got), "the last message's descriptor");
        assert!(fds.take().is_none(), "taken once");
    }
}
