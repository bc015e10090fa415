//! What TLS 1.2 and 1.3 handshakes share on the wire: records in and out, handshake
//! messages and their fields, the ClientHello's offers, and failures in GnuTLS's words
//! (QEMU prints them after "TLS handshake failed: ").

use crate::record::{Keys, MAX_PAYLOAD};
use ring::rand::{SecureRandom, SystemRandom};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub(crate) const CONTENT_CCS: u8 = 20;
pub(crate) const CONTENT_ALERT: u8 = 21;
pub(crate) const CONTENT_HANDSHAKE: u8 = 22;
pub(crate) const CONTENT_DATA: u8 = 23;

pub(crate) const HS_CLIENT_HELLO: u8 = 1;
pub(crate) const HS_SERVER_HELLO: u8 = 2;
pub(crate) const HS_FINISHED: u8 = 20;

pub(crate) const EXT_SUPPORTED_GROUPS: u16 = 10;
pub(crate) const EXT_EXTENDED_MASTER_SECRET: u16 = 23;
pub(crate) const EXT_PRE_SHARED_KEY: u16 = 41;
pub(crate) const EXT_SUPPORTED_VERSIONS: u16 = 43;
pub(crate) const EXT_PSK_MODES: u16 = 45;
pub(crate) const EXT_KEY_SHARE: u16 = 51;
pub(crate) const EXT_RENEGOTIATION_INFO: u16 = 0xff01;

/// Why a session failed, as GnuTLS words it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The peer went away without close_notify.
    Premature,
    /// A value the peer sent is wrong (an unknown identity, a binder that does not match).
    Illegal,
    UnexpectedPacket,
    UnexpectedHandshake,
    Length,
    Decryption,
    FatalAlert,
    NoCipherSuites,
    UnsupportedVersion,
    InsufficientCredentials,
    /// The system's random numbers failed.
    Random,
}

impl Failure {
    /// GnuTLS's text.
    pub(crate) fn text(self) -> &'static str {
        match self {
            Failure::Premature => "The TLS connection was non-properly terminated.",
            Failure::Illegal => "An illegal parameter has been received.",
            Failure::UnexpectedPacket => "An unexpected TLS packet was received.",
            Failure::UnexpectedHandshake => "An unexpected TLS handshake packet was received.",
            Failure::Length => "A TLS packet with unexpected length was received.",
            Failure::Decryption => "Decryption has failed.",
            Failure::FatalAlert => "A TLS fatal alert has been received.",
            Failure::NoCipherSuites => "No supported cipher suites have been found.",
            Failure::UnsupportedVersion => {
                "A packet with illegal or unsupported version was received."
            }
            Failure::InsufficientCredentials => "Insufficient credentials for that request.",
            Failure::Random => "Failed to acquire random data.",
        }
    }

    /// As an I/O error of the session.
    pub(crate) fn to_io(self) -> io::Error {
        let kind = match self {
            Failure::Premature => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self.text())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.text())
    }
}

/// A handshake's failure: the protocol's, or the connection's.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Tls(Failure),
    Io(io::Error),
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeError::Tls(t) => t.fmt(f),
            // GnuTLS words a connection that ends mid-handshake as an improper end.
            HandshakeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Failure::Premature.fmt(f)
            }
            HandshakeError::Io(_) => f.write_str("Error in the pull function."),
        }
    }
}

impl From<Failure> for HandshakeError {
    fn from(f: Failure) -> Self {
        HandshakeError::Tls(f)
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

pub(crate) type Result<T> = std::result::Result<T, HandshakeError>;

pub(crate) fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N]> {
    let mut b = [0; N];
    rng.fill(&mut b).map_err(|_| Failure::Random)?;
    Ok(b)
}

/// Reads a message's fields; running short is a malformed message.
pub(crate) struct Fields<'a> {
    b: &'a [u8],
    pub(crate) at: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(b: &'a [u8]) -> Fields<'a> {
        Fields { b, at: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], Failure> {
        let s = self.b.get(self.at..self.at + n).ok_or(Failure::Length)?;
        self.at += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> std::result::Result<u8, Failure> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> std::result::Result<u16, Failure> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn vec8(&mut self) -> std::result::Result<&'a [u8], Failure> {
        let n = usize::from(self.u8()?);
        self.bytes(n)
    }

    pub(crate) fn vec16(&mut self) -> std::result::Result<&'a [u8], Failure> {
        let n = usize::from(self.u16()?);
        self.bytes(n)
    }

    pub(crate) fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// `u16` values of a list.
pub(crate) fn u16s(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Appends `body` with a length prefix of `width` bytes.
pub(crate) fn put_vec(out: &mut Vec<u8>, width: usize, body: &[u8]) {
    let len = body.len().to_be_bytes();
    out.extend_from_slice(&len[len.len() - width..]);
    out.extend_from_slice(body);
}

pub(crate) fn extension(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    put_vec(out, 2, body);
}

/// A handshake message with its header.
pub(crate) fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    put_vec(&mut m, 3, body);
    m
}

/// Compares secrets in constant time.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The handshake's records on the connection.
pub(crate) struct Wire<'a, S> {
    pub(crate) io: &'a mut S,
    /// Handshake bytes received and not yet a whole message.
    pub(crate) pending: Vec<u8>,
    /// TLS 1.3: change-cipher-spec records are only for middleboxes and passed over. In
    /// TLS 1.2 one switches keys and is asked for ([`Wire::expect_ccs`]).
    pub(crate) skip_ccs: bool,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Wire<'a, S> {
    pub(crate) fn new(io: &'a mut S, skip_ccs: bool) -> Wire<'a, S> {
        Wire {
            io,
            pending: Vec::new(),
            skip_ccs,
        }
    }

    /// The peer's Finished, protected by `rx`, which must carry `verify_data`.
    pub(crate) async fn expect_finished(
        &mut self,
        rx: &mut Keys,
        verify_data: &[u8],
    ) -> Result<Vec<u8>> {
        let m = self.expect(HS_FINISHED, Some(rx)).await?;
        if !same(&m[4..], verify_data) {
            return Err(Failure::Decryption.into());
        }
        Ok(m)
    }

    /// The next handshake message, which must be of type `ty`.
    pub(crate) async fn expect(&mut self, ty: u8, rx: Option<&mut Keys>) -> Result<Vec<u8>> {
        let m = self.next(rx).await?;
        if m[0] != ty {
            return Err(Failure::UnexpectedHandshake.into());
        }
        Ok(m)
    }

    /// The next handshake message, protected by `rx` once keys are set: its bytes with their
    /// header.
    pub(crate) async fn next(&mut self, mut rx: Option<&mut Keys>) -> Result<Vec<u8>> {
        loop {
            if self.pending.len() >= 4 {
                let len = usize::from(self.pending[1]) << 16
                    | usize::from(self.pending[2]) << 8
                    | usize::from(self.pending[3]);
                if len > 1 << 16 {
                    return Err(Failure::Length.into());
                }
                if self.pending.len() >= 4 + len {
                    return Ok(self.pending.drain(..4 + len).collect());
                }
            }
            let (header, mut payload) = self.record().await?;
            match (header[0], rx.as_deref_mut()) {
                (CONTENT_CCS, _) if self.skip_ccs && payload == [1] => {}
                (CONTENT_ALERT, None) => return Err(Failure::FatalAlert.into()),
                (CONTENT_HANDSHAKE, None) => self.pending.extend_from_slice(&payload),
                (_, Some(rx)) if header[0] != CONTENT_CCS => {
                    let (content, range) = rx.open(header, &mut payload)?;
                    match content {
                        CONTENT_HANDSHAKE => self.pending.extend_from_slice(&payload[range]),
                        CONTENT_ALERT => return Err(Failure::FatalAlert.into()),
                        _ => return Err(Failure::UnexpectedPacket.into()),
                    }
                }
                _ => return Err(Failure::UnexpectedPacket.into()),
            }
        }
    }

    /// One record: its header and payload.
    async fn record(&mut self) -> Result<([u8; 5], Vec<u8>)> {
        let mut header = [0; 5];
        self.io.read_exact(&mut header).await?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_PAYLOAD || len == 0 {
            return Err(Failure::Length.into());
        }
        let mut payload = vec![0; len];
        self.io.read_exact(&mut payload).await?;
        Ok((header, payload))
    }

    /// TLS 1.2: the peer's change-cipher-spec, after which its records are protected.
    pub(crate) async fn expect_ccs(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            return Err(Failure::UnexpectedPacket.into());
        }
        match self.record().await? {
            (h, p) if h[0] == CONTENT_CCS && p == [1] => Ok(()),
            (h, _) if h[0] == CONTENT_ALERT => Err(Failure::FatalAlert.into()),
            _ => Err(Failure::UnexpectedPacket.into()),
        }
    }

    /// Sends handshake messages in the clear (`legacy`: the record version).
    pub(crate) async fn send_plain(&mut self, legacy: u16, messages: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(messages.len() + 5);
        for chunk in messages.chunks(crate::record::MAX_PLAINTEXT) {
            out.push(CONTENT_HANDSHAKE);
            out.extend_from_slice(&legacy.to_be_bytes());
            put_vec(&mut out, 2, chunk);
        }
        self.io.write_all(&out).await?;
        Ok(())
    }

    /// Sends a change-cipher-spec record (middlebox compatibility).
    pub(crate) async fn send_ccs(&mut self) -> Result<()> {
        self.io.write_all(&[CONTENT_CCS, 3, 3, 0, 1, 1]).await?;
        Ok(())
    }

    /// Sends handshake messages protected by `tx`.
    pub(crate) async fn send_protected(&mut self, tx: &mut Keys, messages: &[&[u8]]) -> Result<()> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        for m in messages {
            tx.seal(CONTENT_HANDSHAKE, m, &mut scratch, &mut out);
        }
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        Ok(())
    }
}

/// What a ClientHello offers.
pub(crate) struct Hello<'a> {
    pub(crate) session_id: &'a [u8],
    pub(crate) suites: &'a [u8],
    pub(crate) versions: Option<&'a [u8]>,
    pub(crate) modes: &'a [u8],
    pub(crate) shares: Vec<(u16, &'a [u8])>,
    pub(crate) identities: Vec<&'a [u8]>,
    pub(crate) binders: Vec<&'a [u8]>,
    /// Where the binders begin: the part of the message before them is what they sign.
    pub(crate) binders_at: usize,
    /// TLS 1.2: the groups named (`supported_groups`), and whether the extended master
    /// secret and secure renegotiation are offered.
    pub(crate) groups: Vec<u16>,
    pub(crate) extended_master_secret: bool,
    pub(crate) renegotiation_info: bool,
}

pub(crate) fn parse_client_hello(raw: &[u8]) -> std::result::Result<Hello<'_>, Failure> {
    let mut f = Fields::new(raw.get(4..).ok_or(Failure::Length)?);
    f.u16()?; // legacy_version
    f.bytes(32)?;
    let session_id = f.vec8()?;
    let suites = f.vec16()?;
    f.vec8()?; // compression methods
    let mut hello = Hello {
        session_id,
        suites,
        versions: None,
        modes: &[],
        shares: Vec::new(),
        identities: Vec::new(),
        binders: Vec::new(),
        binders_at: 0,
        groups: Vec::new(),
        extended_master_secret: false,
        renegotiation_info: false,
    };
    if f.done() {
        return Ok(hello);
    }
    let exts_start = 4 + f.at + 2;
    let mut exts = Fields::new(f.vec16()?);
    while !exts.done() {
        let ty = exts.u16()?;
        let body_at = exts_start + exts.at + 2;
        let body = exts.vec16()?;
        let mut e = Fields::new(body);
        match ty {
            EXT_SUPPORTED_VERSIONS => hello.versions = Some(e.vec8()?),
            EXT_PSK_MODES => hello.modes = e.vec8()?,
            EXT_SUPPORTED_GROUPS => hello.groups = u16s(e.vec16()?).collect(),
            EXT_EXTENDED_MASTER_SECRET => hello.extended_master_secret = true,
            EXT_RENEGOTIATION_INFO => hello.renegotiation_info = true,
            EXT_KEY_SHARE => {
                let mut shares = Fields::new(e.vec16()?);
                while !shares.done() {
                    let group = shares.u16()?;
                    hello.shares.push((group, shares.vec16()?));
                }
            }
            EXT_PRE_SHARED_KEY => {
                // The last extension (RFC 8446 4.2.11).
                if !exts.done() {
                    return Err(Failure::Illegal);
                }
                let mut ids = Fields::new(e.vec16()?);
                while !ids.done() {
                    hello.identities.push(ids.vec16()?);
                    ids.bytes(4)?; // obfuscated_ticket_age
                }
                hello.binders_at = body_at + e.at;
                let mut binders = Fields::new(e.vec16()?);
                while !binders.done() {
                    hello.binders.push(binders.vec8()?);
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// A small deterministic generator for damaged inputs.
#[cfg(test)]
pub(crate) struct Noise(pub(crate) u64);

#[cfg(test)]
impl Noise {
    pub(crate) fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }

    /// `good` with a few bytes changed, and sometimes cut short.
    pub(crate) fn damage(&mut self, good: &[u8]) -> Vec<u8> {
        let mut v = good.to_vec();
        for _ in 0..1 + self.next() % 4 {
            let at = self.next() % v.len();
            v[at] ^= 1 << (self.next() % 8);
        }
        if self.next() % 3 == 0 {
            v.truncate(self.next() % v.len());
        }
        v
    }
}

/// Feeds each end damaged copies of a real first flight from the other (`hello` to the
/// server, `answer` to the client): every handshake must fail, none may panic.
#[cfg(test)]
pub(crate) async fn damaged_flights_fail<A, AF, C, CF>(
    hello: &[u8],
    answer: &[u8],
    rounds: usize,
    accept: A,
    connect: C,
) where
    A: Fn(tokio::io::DuplexStream) -> AF,
    AF: std::future::Future<Output = bool>,
    C: Fn(tokio::io::DuplexStream) -> CF,
    CF: std::future::Future<Output = bool>,
{
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ hello.len() as u64);
    for _ in 0..rounds {
        let (mut c, s) = tokio::io::duplex(1 << 16);
        c.write_all(&noise.damage(hello)).await.unwrap();
        drop(c);
        assert!(accept(s).await, "a damaged ClientHello was taken");

        let (mut s, c) = tokio::io::duplex(1 << 16);
        let damaged = noise.damage(answer);
        let server = async move {
            let mut discard = vec![0; 4096];
            let _ = s.read(&mut discard).await;
            s.write_all(&damaged).await.unwrap();
        };
        let (failed, ()) = tokio::join!(connect(c), server);
        assert!(failed, "a damaged answer was taken");
    }
}

/// A runtime for a test's handshakes.
#[cfg(test)]
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a handshake between `server` and `client` and sends 100,000 bytes through the
/// session and back.
#[cfg(test)]
pub(crate) async fn echoes<SF, CF>(
    server: impl FnOnce(tokio::io::DuplexStream) -> SF,
    client: impl FnOnce(tokio::io::DuplexStream) -> CF,
) where
    SF: std::future::Future<Output = Result<crate::record::OwnTlsStream<tokio::io::DuplexStream>>>,
    CF: std::future::Future<Output = Result<crate::record::OwnTlsStream<tokio::io::DuplexStream>>>,
{
    let (a, b) = tokio::io::duplex(1 << 16);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    let echo = async {
        let mut s = server(a).await.unwrap();
        let mut got = vec![0; data.len()];
        s.read_exact(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
    };
    let send = async {
        let mut c = client(b).await.unwrap();
        c.write_all(&data).await.unwrap();
        c.flush().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
    };
    tokio::join!(echo, send);
}
