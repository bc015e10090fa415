//! An SFTP (version 3) client over one SSH channel, with any number of requests under way:
//! each request carries an id and its reply is matched to it when it comes, so a read of a
//! megabyte is many reads sent at once (libssh, under QEMU, has one at a time).
//!
//! The server handles a channel's requests in the order they were sent (OpenSSH's
//! `sftp-server` does), so a write sent after another lands after it and `fsync` covers
//! every write sent before it.

use bytes::{Bytes, BytesMut};
use russh::ChannelMsg;
use russh::client::Msg;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;
use tokio::sync::{mpsc, oneshot};

const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const READ: u8 = 5;
const WRITE: u8 = 6;
const FSTAT: u8 = 8;
const FSETSTAT: u8 = 10;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const DATA: u8 = 103;
const ATTRS: u8 = 105;
const EXTENDED: u8 = 200;
const EXTENDED_REPLY: u8 = 201;

/// `SSH_FX_*` status codes the client looks at.
pub(crate) const FX_EOF: u32 = 1;
pub(crate) const FX_OP_UNSUPPORTED: u32 = 8;

/// `SSH_FXF_*` open flags.
pub(crate) const FXF_READ: u32 = 0x01;
pub(crate) const FXF_WRITE: u32 = 0x02;
pub(crate) const FXF_CREAT: u32 = 0x08;
pub(crate) const FXF_TRUNC: u32 = 0x10;

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// The largest reply the client takes (OpenSSH's own limit on any SFTP packet).
const MAX_PACKET: usize = 256 * 1024;
/// What every server must accept in one read or write (the SFTP draft's floor), used when
/// the server does not say its limits.
const SAFE_IO: usize = 32 * 1024;

/// Why a request failed: the server's status, or the channel gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SftpError {
    Status { code: u32, message: String },
    Lost,
}

impl fmt::Display for SftpError {
    /// libssh's words, as QEMU's messages quote them: the server's message after "SFTP
    /// server: ", with libssh's error code (SSH_REQUEST_DENIED, or SSH_FATAL for a lost
    /// connection) and the SFTP status.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SftpError::Status { code, message } => write!(
                f,
                "SFTP server: {message} (libssh error code: 1, sftp error code: {code})"
            ),
            SftpError::Lost => write!(
                f,
                "Socket error: disconnected (libssh error code: 2, sftp error code: 7)"
            ),
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, SftpError>;

/// A file's attributes, as far as the driver needs them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Attrs {
    pub(crate) size: Option<u64>,
}

/// A reply's body after its type and id.
enum Reply {
    Status(SftpError, u32),
    Handle(Vec<u8>),
    Data(Bytes),
    Attrs(Attrs),
    Extended(Vec<u8>),
}

type Waiters = RefCell<HashMap<u32, oneshot::Sender<(u8, Bytes)>>>;

/// A request sent, its reply to come.
struct Pending(oneshot::Receiver<(u8, Bytes)>);

impl Reply {
    /// The failure a reply of the wrong kind stands for: the server's status, or a
    /// message the client cannot read.
    fn into_error(self) -> SftpError {
        match self {
            Reply::Status(e, _) => e,
            _ => bad_message(),
        }
    }
}

impl Pending {
    async fn reply(self) -> Result<Reply> {
        let (kind, body) = self.0.await.map_err(|_| SftpError::Lost)?;
        parse_reply(kind, &body)
    }

    /// The reply to a request answered by a status alone: `Ok` for `SSH_FX_OK`.
    async fn status(self) -> Result<()> {
        match self.reply().await? {
            Reply::Status(_, 0) => Ok(()),
            other => Err(other.into_error()),
        }
    }
}

/// What the client and its reader task share.
struct Shared {
    waiters: Waiters,
    lost: Cell<bool>,
}

/// An SFTP session.
pub(crate) struct Sftp {
    out: mpsc::UnboundedSender<Bytes>,
    shared: Rc<Shared>,
    next_id: Cell<u32>,
    extensions: Vec<(String, String)>,
    /// The most one read request asks for.
    max_read: usize,
    /// The most one write request carries.
    max_write: usize,
    tasks: [tokio::task::AbortHandle; 2],
}

impl Drop for Sftp {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Builds a packet: its length, type and body.
fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + body.len());
    p.extend_from_slice(&(body.len() as u32 + 1).to_be_bytes());
    p.push(kind);
    p.extend_from_slice(body);
    p
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A cursor over a reply's body that fails on a short packet instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(bad_message());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    fn string(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    fn text(&mut self) -> Result<String> {
        Ok(String::from_utf8_lossy(self.string()?).into_owned())
    }

    fn attrs(&mut self) -> Result<Attrs> {
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            self.take(8)?;
        }
        if flags & ATTR_PERMISSIONS != 0 {
            self.take(4)?;
        }
        if flags & ATTR_ACMODTIME != 0 {
            self.take(8)?;
        }
        if flags & ATTR_EXTENDED != 0 {
            for _ in 0..self.u32()? {
                self.string()?;
                self.string()?;
            }
        }
        Ok(a)
    }
}

/// A reply the client cannot read (`SSH_FX_BAD_MESSAGE`).
fn bad_message() -> SftpError {
    SftpError::Status {
        code: 5,
        message: "Bad message".into(),
    }
}

impl Sftp {
    /// Starts the `sftp` subsystem on `channel` and says hello (version 3); asks the server
    /// its limits where it says it can tell them.
    pub(crate) async fn start(channel: russh::Channel<Msg>) -> std::result::Result<Sftp, String> {
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| e.to_string())?;
        let (mut rx, tx) = channel.split();
        tx.data_bytes(packet(INIT, &3u32.to_be_bytes()))
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = BytesMut::new();
        let (kind, body) = next_packet(&mut rx, &mut buf)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("The sftp server closed the channel")?;
        if kind != VERSION {
            return Err(format!("Received message {kind} when expecting version"));
        }
        let mut r = Reader(&body[..]);
        r.u32().map_err(|e| e.to_string())?;
        let mut extensions = Vec::new();
        while !r.0.is_empty() {
            let (Ok(name), Ok(data)) = (r.text(), r.text()) else {
                break;
            };
            extensions.push((name, data));
        }
        let shared = Rc::new(Shared {
            waiters: RefCell::new(HashMap::new()),
            lost: Cell::new(false),
        });
        let (out, mut queue) = mpsc::unbounded_channel::<Bytes>();
        // One writer, so packets go out whole and in the order they were made.
        let writer = tokio::task::spawn_local(async move {
            while let Some(p) = queue.recv().await {
                if tx.data_bytes(p).await.is_err() {
                    break;
                }
            }
        });
        let replies = shared.clone();
        let reader = tokio::task::spawn_local(async move {
            while let Ok(Some((kind, body))) = next_packet(&mut rx, &mut buf).await {
                let id = Reader(&body[..]).u32().unwrap_or(u32::MAX);
                if let Some(w) = replies.waiters.borrow_mut().remove(&id) {
                    let _ = w.send((kind, body));
                }
            }
            replies.lost.set(true);
            // Every request under way fails: its reply will not come.
            replies.waiters.borrow_mut().clear();
        });
        let mut sftp = Sftp {
            out,
            shared,
            next_id: Cell::new(0),
            extensions,
            max_read: SAFE_IO,
            max_write: SAFE_IO,
            tasks: [writer.abort_handle(), reader.abort_handle()],
        };
        if sftp.has_extension("limits@openssh.com", "1") {
            if let Ok(body) = sftp.extended("limits@openssh.com", &[]).await {
                let mut r = Reader(&body[..]);
                if let (Ok(_packet), Ok(read), Ok(write)) = (r.u64(), r.u64(), r.u64()) {
                    let fit = |n: u64| n.clamp(SAFE_IO as u64, (MAX_PACKET - 1024) as u64);
                    sftp.max_read = fit(read) as usize;
                    sftp.max_write = fit(write) as usize;
                }
            }
        }
        Ok(sftp)
    }

    /// Whether the server offers extension `name` at `version`.
    pub(crate) fn has_extension(&self, name: &str, version: &str) -> bool {
        self.extensions
            .iter()
            .any(|(n, v)| n == name && v == version)
    }

    /// Sends request `kind` with `body` after its id; its reply is awaited with
    /// [`Pending::reply`], so several can be under way.
    fn send(&self, kind: u8, body: &[u8]) -> Result<Pending> {
        self.send_with(kind, body, Bytes::new())
    }

    /// [`Sftp::send`] of a request whose body ends with `tail`, which goes out as it is
    /// (a write's data is not copied into the packet).
    fn send_with(&self, kind: u8, body: &[u8], tail: Bytes) -> Result<Pending> {
        if self.shared.lost.get() {
            return Err(SftpError::Lost);
        }
        let id = self.next_id.get();
        self.next_id.set(id.wrapping_add(1));
        let mut p = Vec::with_capacity(9 + body.len());
        p.extend_from_slice(&((body.len() + tail.len()) as u32 + 5).to_be_bytes());
        p.push(kind);
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(body);
        let (tx, rx) = oneshot::channel();
        self.shared.waiters.borrow_mut().insert(id, tx);
        let sent = self.out.send(Bytes::from(p)).is_ok()
            && (tail.is_empty() || self.out.send(tail).is_ok());
        if !sent {
            self.shared.waiters.borrow_mut().remove(&id);
            return Err(SftpError::Lost);
        }
        Ok(Pending(rx))
    }

    /// Sends a request and waits for its reply.
    async fn request(&self, kind: u8, body: &[u8]) -> Result<Reply> {
        self.send(kind, body)?.reply().await
    }

    /// A request answered by a status: `Ok` for `SSH_FX_OK`.
    async fn status(&self, kind: u8, body: &[u8]) -> Result<()> {
        self.send(kind, body)?.status().await
    }

    /// Opens `path` with `SSH_FXF_*` flags, creating it with `mode` if asked; its handle.
    pub(crate) async fn open(&self, path: &str, flags: u32, mode: Option<u32>) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        put_str(&mut body, path.as_bytes());
        body.extend_from_slice(&flags.to_be_bytes());
        match mode {
            Some(m) => {
                body.extend_from_slice(&ATTR_PERMISSIONS.to_be_bytes());
                body.extend_from_slice(&m.to_be_bytes());
            }
            None => body.extend_from_slice(&0u32.to_be_bytes()),
        }
        match self.request(OPEN, &body).await? {
            Reply::Handle(h) => Ok(h),
            other => Err(other.into_error()),
        }
    }

    /// Closes a handle.
    pub(crate) async fn close(&self, handle: &[u8]) -> Result<()> {
        let mut body = Vec::new();
        put_str(&mut body, handle);
        self.status(CLOSE, &body).await
    }

    /// The file's attributes.
    pub(crate) async fn fstat(&self, handle: &[u8]) -> Result<Attrs> {
        let mut body = Vec::new();
        put_str(&mut body, handle);
        match self.request(FSTAT, &body).await? {
            Reply::Attrs(a) => Ok(a),
            other => Err(other.into_error()),
        }
    }

    /// Sets the file's size.
    pub(crate) async fn set_size(&self, handle: &[u8], size: u64) -> Result<()> {
        let mut body = Vec::new();
        put_str(&mut body, handle);
        body.extend_from_slice(&ATTR_SIZE.to_be_bytes());
        body.extend_from_slice(&size.to_be_bytes());
        self.status(FSETSTAT, &body).await
    }

    /// Sends a read of up to `len` bytes (at most `max_read`) at `offset`.
    fn send_read(&self, handle: &[u8], offset: u64, len: usize) -> Result<Pending> {
        let mut body = Vec::with_capacity(handle.len() + 16);
        put_str(&mut body, handle);
        body.extend_from_slice(&offset.to_be_bytes());
        body.extend_from_slice(&(len as u32).to_be_bytes());
        self.send(READ, &body)
    }

    /// Reads `out.len()` bytes at `offset`, in as many requests as it takes, all sent at
    /// once. What lies past the end of the file reads as zeroes (QEMU's rule); a short
    /// answer before the end is asked again for the rest.
    pub(crate) async fn read(&self, handle: &[u8], offset: u64, out: &mut [u8]) -> Result<()> {
        let step = self.max_read;
        let mut sent = Vec::new();
        for (i, chunk) in out.chunks(step).enumerate() {
            let at = (i * step) as u64;
            sent.push((
                at,
                chunk.len(),
                self.send_read(handle, offset + at, chunk.len())?,
            ));
        }
        let mut eof = false;
        for (at, len, pending) in sent {
            let mut done = 0;
            let mut reply = Some(pending);
            while done < len && !eof {
                let p = match reply.take() {
                    Some(p) => p,
                    None => self.send_read(handle, offset + at + done as u64, len - done)?,
                };
                match p.reply().await? {
                    Reply::Data(d) if !d.is_empty() && d.len() <= len - done => {
                        let start = at as usize + done;
                        out[start..start + d.len()].copy_from_slice(&d);
                        done += d.len();
                    }
                    Reply::Status(_, FX_EOF) => eof = true,
                    other => return Err(other.into_error()),
                }
            }
            if done < len {
                out[at as usize + done..at as usize + len].fill(0);
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`, in as many requests as it takes, all sent at once; the
    /// data goes out without being copied.
    pub(crate) async fn write(&self, handle: &[u8], offset: u64, data: Bytes) -> Result<()> {
        let step = self.max_write;
        let mut sent = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = step.min(data.len() - at);
            let mut head = Vec::with_capacity(handle.len() + 16);
            put_str(&mut head, handle);
            head.extend_from_slice(&(offset + at as u64).to_be_bytes());
            head.extend_from_slice(&(n as u32).to_be_bytes());
            sent.push(self.send_with(WRITE, &head, data.slice(at..at + n))?);
            at += n;
        }
        let mut first_error = None;
        for p in sent {
            if let Err(e) = p.status().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// OpenSSH's `fsync@openssh.com`: the file's data on the server's disk.
    pub(crate) async fn fsync(&self, handle: &[u8]) -> Result<()> {
        let mut body = Vec::new();
        put_str(&mut body, b"fsync@openssh.com");
        put_str(&mut body, handle);
        self.status(EXTENDED, &body).await
    }

    /// An extended request answered by an extended reply.
    async fn extended(&self, name: &str, args: &[u8]) -> Result<Vec<u8>> {
        let mut body = Vec::new();
        put_str(&mut body, name.as_bytes());
        body.extend_from_slice(args);
        match self.request(EXTENDED, &body).await? {
            Reply::Extended(d) => Ok(d),
            other => Err(other.into_error()),
        }
    }
}

/// A reply's body, after its type: its id, then what its type carries.
fn parse_reply(kind: u8, body: &Bytes) -> Result<Reply> {
    let mut r = Reader(&body[..]);
    r.u32()?;
    Ok(match kind {
        STATUS => {
            let code = r.u32()?;
            let message = r.text().unwrap_or_default();
            Reply::Status(SftpError::Status { code, message }, code)
        }
        HANDLE => Reply::Handle(r.string()?.to_vec()),
        DATA => {
            let n = r.u32()? as usize;
            let at = body.len() - r.0.len();
            if n > r.0.len() {
                return Err(bad_message());
            }
            // The data stays where it arrived; the caller copies it out once.
            Reply::Data(body.slice(at..at + n))
        }
        ATTRS => Reply::Attrs(r.attrs()?),
        EXTENDED_REPLY => Reply::Extended(r.0.to_vec()),
        _ => return Err(bad_message()),
    })
}

/// The next packet from the channel (its type and body), `buf` holding what came after it;
/// `None` once the channel is closed.
async fn next_packet(
    rx: &mut russh::ChannelReadHalf,
    buf: &mut BytesMut,
) -> Result<Option<(u8, Bytes)>> {
    loop {
        if let Some(p) = take_packet(buf)? {
            return Ok(Some(p));
        }
        match rx.wait().await {
            Some(ChannelMsg::Data { data }) => buf.extend_from_slice(&data),
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return Ok(None),
            Some(_) => {}
        }
    }
}

/// The first whole packet in `buf` (its type and body), taken out; `None` until one has
/// arrived.
fn take_packet(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_PACKET + 1024 {
        return Err(bad_message());
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let kind = buf[4];
    let mut packet = buf.split_to(4 + len).freeze();
    Ok(Some((kind, packet.split_off(5))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_are_taken_whole_and_in_order() {
        let mut buf = BytesMut::from(&packet(STATUS, &[0, 0, 0, 7, 0, 0, 0, 0])[..]);
        buf.extend_from_slice(&packet(DATA, &[0, 0, 0, 8])[..6]);
        let (kind, body) = take_packet(&mut buf).unwrap().unwrap();
        assert_eq!((kind, body.len()), (STATUS, 8));
        assert_eq!(take_packet(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 6);
    }

    #[test]
    fn short_or_huge_packets_are_refused_without_panicking() {
        let mut huge = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff, 1][..]);
        assert!(take_packet(&mut huge).is_err());
        let mut r = Reader(&[0, 0, 0, 9, 1]);
        assert!(r.string().is_err());
        let mut attrs = Reader(&[0, 0, 0, 1, 0, 0]);
        assert!(attrs.attrs().is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_from_a_server_are_refused_or_read_without_panicking(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            kinds in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..8),
        ) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some((kind, body))) = take_packet(&mut buf) {
                let _ = parse_reply(kind, &body);
                for k in &kinds {
                    let _ = parse_reply(*k, &body);
                }
            }
        }
    }

    #[test]
    fn attributes_give_the_size() {
        let mut body = (ATTR_SIZE | ATTR_PERMISSIONS).to_be_bytes().to_vec();
        body.extend_from_slice(&4096u64.to_be_bytes());
        body.extend_from_slice(&0o100644u32.to_be_bytes());
        let a = Reader(&body).attrs().unwrap();
        assert_eq!(a.size, Some(4096));
    }
}
