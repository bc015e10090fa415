//! A session of ferrite's own TLS (1.3 with a pre-shared key, 1.2 anonymous) once its
//! handshake is done: application data in protected records, the peer's post-handshake
//! messages taken in stride (1.3: KeyUpdate, NewSessionTicket; 1.2: a HelloRequest is
//! passed over, renegotiation refused), close_notify as the end of the stream.

use crate::tls12::Gcm12;
use crate::tls13::Protection;
use crate::wire::{CONTENT_ALERT, CONTENT_DATA, CONTENT_HANDSHAKE, Failure};
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest plaintext a record carries.
pub(crate) const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest protected payload (plaintext, type, padding and tag; RFC 8446 5.2).
pub(crate) const MAX_PAYLOAD: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;

const HS_HELLO_REQUEST: u8 = 0;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

/// One direction's record protection.
pub(crate) enum Keys {
    /// TLS 1.3: the content type inside, every record `application_data` outside.
    Tls13(Protection),
    /// TLS 1.2 with AES-GCM.
    Tls12(Gcm12),
}

impl Keys {
    /// Seals `data` of type `content` into records appended to `out`.
    pub(crate) fn seal(
        &mut self,
        content: u8,
        data: &[u8],
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) {
        for chunk in data.chunks(MAX_PLAINTEXT) {
            match self {
                Keys::Tls13(p) => {
                    scratch.clear();
                    scratch.extend_from_slice(chunk);
                    scratch.push(content);
                    p.seal(scratch, out);
                }
                Keys::Tls12(g) => g.seal(content, chunk, out),
            }
        }
    }

    /// Opens a record's payload in place: its content type and where its plaintext is.
    pub(crate) fn open(
        &mut self,
        header: [u8; HEADER],
        payload: &mut [u8],
    ) -> Result<(u8, Range<usize>), Failure> {
        match self {
            Keys::Tls13(p) => {
                if header[0] != CONTENT_DATA {
                    return Err(Failure::UnexpectedPacket);
                }
                let n = p.open(header, payload).ok_or(Failure::Decryption)?;
                // The content type is the last byte that is not padding.
                let at = payload[..n]
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or(Failure::UnexpectedPacket)?;
                Ok((payload[at], 0..at))
            }
            Keys::Tls12(g) => {
                let range = g.open(header, payload).ok_or(Failure::Decryption)?;
                Ok((header[0], range))
            }
        }
    }
}

/// How many records one write seals at most: large writes go out in few system calls.
const RECORDS_PER_WRITE: usize = 4;

/// An established session on `S`.
pub struct OwnTlsStream<S> {
    io: S,
    rx: Keys,
    tx: Keys,
    /// Bytes read from the peer: `inbuf[start..end]` is not yet a whole record.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Application data opened and not yet read: `plain[pos..]`.
    plain: Vec<u8>,
    pos: usize,
    /// A post-handshake message arriving in pieces.
    handshake: Vec<u8>,
    /// The peer sent close_notify.
    ended: bool,
    /// A failure that ended reading; every later read gets it again.
    failed: Option<Failure>,
    /// Records sealed and not yet written: `outbuf[out_pos..]`.
    outbuf: Vec<u8>,
    out_pos: usize,
    /// The peer asked for a KeyUpdate in return.
    owe_key_update: bool,
    /// This side sent close_notify.
    closed: bool,
    scratch: Vec<u8>,
}

impl<S> OwnTlsStream<S> {
    pub(crate) fn new(io: S, rx: Keys, tx: Keys) -> OwnTlsStream<S> {
        OwnTlsStream {
            io,
            rx,
            tx,
            inbuf: vec![0; 2 * (HEADER + MAX_PAYLOAD)].into_boxed_slice(),
            start: 0,
            end: 0,
            plain: Vec::new(),
            pos: 0,
            handshake: Vec::new(),
            ended: false,
            failed: None,
            outbuf: Vec::new(),
            out_pos: 0,
            owe_key_update: false,
            closed: false,
            scratch: Vec::new(),
        }
    }

    /// The stream under the session.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// A whole record from `inbuf`, if there is one: (header, payload range).
    fn take_record(&mut self) -> Result<Option<([u8; HEADER], usize, usize)>, Failure> {
        let have = self.end - self.start;
        if have < HEADER {
            return Ok(None);
        }
        let mut header = [0; HEADER];
        header.copy_from_slice(&self.inbuf[self.start..self.start + HEADER]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_PAYLOAD {
            return Err(Failure::Length);
        }
        if have < HEADER + len {
            return Ok(None);
        }
        let payload = self.start + HEADER;
        self.start = payload + len;
        Ok(Some((header, payload, payload + len)))
    }

    /// Opens one record and acts on what it carries.
    fn process(&mut self, header: [u8; HEADER], from: usize, to: usize) -> Result<(), Failure> {
        // Opened where it was read: the record is consumed (`start` is past it already).
        let record = &mut self.inbuf[from..to];
        let (content, range) = self.rx.open(header, record)?;
        let body = &record[range];
        match content {
            CONTENT_DATA => {
                if self.pos == self.plain.len() {
                    self.plain.clear();
                    self.pos = 0;
                }
                self.plain.extend_from_slice(body);
            }
            CONTENT_ALERT => {
                if body == [1, 0] || body == [2, 0] {
                    self.ended = true;
                } else if body.first() != Some(&1) {
                    return Err(Failure::FatalAlert);
                }
            }
            CONTENT_HANDSHAKE => {
                self.handshake.extend_from_slice(body);
                self.post_handshake()?;
            }
            _ => return Err(Failure::UnexpectedPacket),
        }
        Ok(())
    }

    /// Handles the whole post-handshake messages received.
    fn post_handshake(&mut self) -> Result<(), Failure> {
        while self.handshake.len() >= 4 {
            let len = usize::from(self.handshake[1]) << 16
                | usize::from(self.handshake[2]) << 8
                | usize::from(self.handshake[3]);
            if self.handshake.len() < 4 + len {
                break;
            }
            let message: Vec<u8> = self.handshake.drain(..4 + len).collect();
            match (&self.rx, message[0]) {
                (Keys::Tls13(_), HS_NEW_SESSION_TICKET) | (Keys::Tls12(_), HS_HELLO_REQUEST) => {}
                (Keys::Tls13(p), HS_KEY_UPDATE) if len == 1 && message[4] <= 1 => {
                    self.rx = Keys::Tls13(p.updated());
                    if message[4] == 1 {
                        self.owe_key_update = true;
                    }
                }
                _ => return Err(Failure::UnexpectedHandshake),
            }
        }
        Ok(())
    }

    /// Seals `data` of type `content` into records.
    fn seal(&mut self, content: u8, data: &[u8]) {
        self.tx
            .seal(content, data, &mut self.scratch, &mut self.outbuf);
    }
}

impl<S: AsyncWrite + Unpin> OwnTlsStream<S> {
    /// Writes the sealed records out.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outbuf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outbuf[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outbuf.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// The KeyUpdate the peer asked for, sealed with the keys it replaces.
    fn answer_key_update(&mut self) {
        if self.owe_key_update {
            self.owe_key_update = false;
            self.seal(CONTENT_HANDSHAKE, &[HS_KEY_UPDATE, 0, 0, 1, 0]);
            if let Keys::Tls13(p) = &self.tx {
                self.tx = Keys::Tls13(p.updated());
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for OwnTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.pos);
                buf.put_slice(&this.plain[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.ended {
                return Poll::Ready(Ok(()));
            }
            if let Some(f) = &this.failed {
                return Poll::Ready(Err(f.to_io()));
            }
            match this.take_record() {
                Ok(Some((header, from, to))) => {
                    if let Err(f) = this.process(header, from, to) {
                        this.failed = Some(f);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(f) => {
                    this.failed = Some(f);
                    continue;
                }
            }
            // Room for the rest of the record: what is left moves to the front.
            if this.start > 0 {
                this.inbuf.copy_within(this.start..this.end, 0);
                this.end -= this.start;
                this.start = 0;
            }
            let mut rb = ReadBuf::new(&mut this.inbuf[this.end..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                this.failed = Some(Failure::Premature);
                continue;
            }
            this.end += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OwnTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        this.answer_key_update();
        let n = data.len().min(RECORDS_PER_WRITE * MAX_PLAINTEXT);
        this.seal(CONTENT_DATA, &data[..n]);
        // The data is taken: what cannot be written now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.answer_key_update();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.closed {
            this.closed = true;
            this.seal(CONTENT_ALERT, &[1, 0]);
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
