//! TLS 1.3 with an external pre-shared key (RFC 8446), both ends: what QEMU's
//! `tls-creds-psk` sessions negotiate through GnuTLS (psk_dhe_ke over X25519 or P-256, or
//! psk_ke; AES-128-GCM or ChaCha20-Poly1305 with SHA-256). rustls has no external PSKs,
//! so this handshake is ferrite's own; it is small because certificates play no part.
//!
//! - `schedule.rs`: the key schedule and record protection;
//! - `stream.rs`: the established session as an async stream.
//!
//! Failures carry GnuTLS's words, which QEMU prints after "TLS handshake failed: ".

mod schedule;
mod stream;

pub use stream::PskStream;

use schedule::{Early, Protection, Suite, Transcript, verify_data};
use std::io;
use stream::MAX_PAYLOAD;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::{SecureRandom, SystemRandom};

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

type Result<T> = std::result::Result<T, HandshakeError>;

const CONTENT_CCS: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_DATA: u8 = 23;

const HS_CLIENT_HELLO: u8 = 1;
const HS_SERVER_HELLO: u8 = 2;
const HS_ENCRYPTED_EXTENSIONS: u8 = 8;
const HS_FINISHED: u8 = 20;

const EXT_SUPPORTED_GROUPS: u16 = 10;
const EXT_SIGNATURE_ALGORITHMS: u16 = 13;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const EXT_PSK_MODES: u16 = 45;
const EXT_KEY_SHARE: u16 = 51;

const TLS13: u16 = 0x0304;
const MODE_PSK_KE: u8 = 0;
const MODE_PSK_DHE_KE: u8 = 1;

/// ServerHello's random when it is a HelloRetryRequest.
const RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// The groups this side agrees keys in, in its order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    X25519,
    P256,
}

impl Group {
    const ALL: [Group; 2] = [Group::X25519, Group::P256];

    fn code(self) -> u16 {
        match self {
            Group::X25519 => 0x001d,
            Group::P256 => 0x0017,
        }
    }

    fn alg(self) -> &'static agreement::Algorithm {
        match self {
            Group::X25519 => &agreement::X25519,
            Group::P256 => &agreement::ECDH_P256,
        }
    }

    fn from_code(code: u16) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.code() == code)
    }
}

/// An ephemeral key: the private half and the public value sent.
struct KeyPair {
    group: Group,
    private: EphemeralPrivateKey,
    public: Vec<u8>,
}

impl KeyPair {
    fn generate(group: Group, rng: &SystemRandom) -> Result<KeyPair> {
        let private =
            EphemeralPrivateKey::generate(group.alg(), rng).map_err(|_| Failure::Random)?;
        let public = private
            .compute_public_key()
            .map_err(|_| Failure::Random)?
            .as_ref()
            .to_vec();
        Ok(KeyPair {
            group,
            private,
            public,
        })
    }

    /// The shared secret with the peer's public value.
    fn agree(self, peer: &[u8]) -> Result<Vec<u8>> {
        agreement::agree_ephemeral(
            self.private,
            &UnparsedPublicKey::new(self.group.alg(), peer),
            |s| s.to_vec(),
        )
        .map_err(|_| Failure::Illegal.into())
    }
}

fn random<const N: usize>(rng: &SystemRandom) -> Result<[u8; N]> {
    let mut b = [0; N];
    rng.fill(&mut b).map_err(|_| Failure::Random)?;
    Ok(b)
}

/// Reads a message's fields; running short is a malformed message.
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn new(b: &'a [u8]) -> Fields<'a> {
        Fields { b, at: 0 }
    }

    fn bytes(&mut self, n: usize) -> std::result::Result<&'a [u8], Failure> {
        let s = self.b.get(self.at..self.at + n).ok_or(Failure::Length)?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, Failure> {
        Ok(self.bytes(1)?[0])
    }

    fn u16(&mut self) -> std::result::Result<u16, Failure> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> std::result::Result<&'a [u8], Failure> {
        let n = usize::from(self.u8()?);
        self.bytes(n)
    }

    fn vec16(&mut self) -> std::result::Result<&'a [u8], Failure> {
        let n = usize::from(self.u16()?);
        self.bytes(n)
    }

    fn done(&self) -> bool {
        self.at == self.b.len()
    }
}

/// `u16` values of a list.
fn u16s(b: &[u8]) -> impl Iterator<Item = u16> + '_ {
    b.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]))
}

/// Appends `body` with a length prefix of `width` bytes.
fn put_vec(out: &mut Vec<u8>, width: usize, body: &[u8]) {
    let len = body.len().to_be_bytes();
    out.extend_from_slice(&len[len.len() - width..]);
    out.extend_from_slice(body);
}

fn extension(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    put_vec(out, 2, body);
}

/// A handshake message with its header.
fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    put_vec(&mut m, 3, body);
    m
}

/// Compares secrets in constant time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The handshake's records on the connection.
struct Wire<'a, S> {
    io: &'a mut S,
    /// Handshake bytes received and not yet a whole message.
    pending: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<'_, S> {
    /// The next handshake message, protected by `rx` once keys are set: its bytes with their
    /// header. Change-cipher-spec records (middlebox compatibility) are passed over.
    async fn next(&mut self, mut rx: Option<&mut Protection>) -> Result<Vec<u8>> {
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
            let mut header = [0; 5];
            self.io.read_exact(&mut header).await?;
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if len > MAX_PAYLOAD || len == 0 {
                return Err(Failure::Length.into());
            }
            let mut payload = vec![0; len];
            self.io.read_exact(&mut payload).await?;
            match (header[0], rx.as_deref_mut()) {
                (CONTENT_CCS, _) if payload == [1] => {}
                (CONTENT_ALERT, None) => return Err(Failure::FatalAlert.into()),
                (CONTENT_HANDSHAKE, None) => self.pending.extend_from_slice(&payload),
                (CONTENT_DATA, Some(rx)) => {
                    let n = rx.open(header, &mut payload).ok_or(Failure::Decryption)?;
                    let at = payload[..n]
                        .iter()
                        .rposition(|&b| b != 0)
                        .ok_or(Failure::UnexpectedPacket)?;
                    match payload[at] {
                        CONTENT_HANDSHAKE => self.pending.extend_from_slice(&payload[..at]),
                        CONTENT_ALERT => return Err(Failure::FatalAlert.into()),
                        _ => return Err(Failure::UnexpectedPacket.into()),
                    }
                }
                _ => return Err(Failure::UnexpectedPacket.into()),
            }
        }
    }

    /// Sends handshake messages in the clear (`legacy`: the record version).
    async fn send_plain(&mut self, legacy: u16, messages: &[u8]) -> Result<()> {
        let mut out = Vec::with_capacity(messages.len() + 5);
        for chunk in messages.chunks(stream::MAX_PLAINTEXT) {
            out.push(CONTENT_HANDSHAKE);
            out.extend_from_slice(&legacy.to_be_bytes());
            put_vec(&mut out, 2, chunk);
        }
        self.io.write_all(&out).await?;
        Ok(())
    }

    /// Sends a change-cipher-spec record (middlebox compatibility).
    async fn send_ccs(&mut self) -> Result<()> {
        self.io.write_all(&[CONTENT_CCS, 3, 3, 0, 1, 1]).await?;
        Ok(())
    }

    /// Sends handshake messages protected by `tx`.
    async fn send_protected(&mut self, tx: &mut Protection, messages: &[&[u8]]) -> Result<()> {
        let mut out = Vec::new();
        for m in messages {
            let mut inner = m.to_vec();
            inner.push(CONTENT_HANDSHAKE);
            tx.seal(&mut inner, &mut out);
        }
        self.io.write_all(&out).await?;
        self.io.flush().await?;
        Ok(())
    }
}

/// What a ClientHello offers.
struct Hello<'a> {
    session_id: &'a [u8],
    suites: &'a [u8],
    versions: Option<&'a [u8]>,
    modes: &'a [u8],
    shares: Vec<(u16, &'a [u8])>,
    identities: Vec<&'a [u8]>,
    binders: Vec<&'a [u8]>,
    /// Where the binders begin: the part of the message before them is what they sign.
    binders_at: usize,
}

fn parse_client_hello(raw: &[u8]) -> std::result::Result<Hello<'_>, Failure> {
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

/// The server's handshake: the client must offer TLS 1.3 and a PSK identity `key_of`
/// knows, with the binder its key makes.
pub(crate) async fn accept<S>(
    mut io: S,
    key_of: impl Fn(&[u8]) -> Option<Vec<u8>>,
) -> Result<PskStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rng = SystemRandom::new();
    let mut wire = Wire {
        io: &mut io,
        pending: Vec::new(),
    };
    let ch = wire.next(None).await?;
    if ch[0] != HS_CLIENT_HELLO {
        return Err(Failure::UnexpectedHandshake.into());
    }
    let hello = parse_client_hello(&ch)?;
    if !hello.versions.is_some_and(|v| u16s(v).any(|v| v == TLS13)) {
        return Err(Failure::UnsupportedVersion.into());
    }
    let suite = u16s(hello.suites)
        .find_map(Suite::from_code)
        .ok_or(Failure::NoCipherSuites)?;
    if hello.identities.is_empty() {
        return Err(Failure::InsufficientCredentials.into());
    }
    let (index, key) = hello
        .identities
        .iter()
        .enumerate()
        .find_map(|(i, id)| key_of(id).map(|k| (i, k)))
        .ok_or(Failure::Illegal)?;
    let early = Early::new(&key);
    let mut truncated = Transcript::new();
    truncated.add(&ch[..hello.binders_at]);
    let binder = hello.binders.get(index).ok_or(Failure::Illegal)?;
    if !same(binder, &early.binder(&truncated.hash())) {
        return Err(Failure::Illegal.into());
    }
    // Keys agreed when the client allows it and sent a share in a group this side has.
    let share = if hello.modes.contains(&MODE_PSK_DHE_KE) {
        hello
            .shares
            .iter()
            .find_map(|&(g, pk)| Group::from_code(g).map(|g| (g, pk)))
    } else {
        None
    };
    if share.is_none() && !hello.modes.contains(&MODE_PSK_KE) {
        return Err(Failure::Illegal.into());
    }
    let (shared, own_share) = match share {
        Some((group, peer)) => {
            let pair = KeyPair::generate(group, &rng)?;
            let public = pair.public.clone();
            (Some(pair.agree(peer)?), Some((group, public)))
        }
        None => (None, None),
    };

    let mut transcript = Transcript::new();
    transcript.add(&ch);
    let mut body = vec![3, 3];
    body.extend_from_slice(&random::<32>(&rng)?);
    put_vec(&mut body, 1, hello.session_id);
    body.extend_from_slice(&suite.code().to_be_bytes());
    body.push(0);
    let mut exts = Vec::new();
    extension(&mut exts, EXT_SUPPORTED_VERSIONS, &TLS13.to_be_bytes());
    if let Some((group, public)) = &own_share {
        let mut ks = group.code().to_be_bytes().to_vec();
        put_vec(&mut ks, 2, public);
        extension(&mut exts, EXT_KEY_SHARE, &ks);
    }
    extension(
        &mut exts,
        EXT_PRE_SHARED_KEY,
        &u16::try_from(index).unwrap_or(0).to_be_bytes(),
    );
    put_vec(&mut body, 2, &exts);
    let sh = message(HS_SERVER_HELLO, &body);
    transcript.add(&sh);
    wire.send_plain(0x0303, &sh).await?;
    if !hello.session_id.is_empty() {
        wire.send_ccs().await?;
    }

    let hs = early.handshake(shared.as_deref(), &transcript.hash());
    let mut tx = Protection::new(suite, hs.server);
    let mut rx = Protection::new(suite, hs.client);
    let ee = message(HS_ENCRYPTED_EXTENSIONS, &[0, 0]);
    transcript.add(&ee);
    let fin = message(HS_FINISHED, &verify_data(&hs.server, &transcript.hash()));
    transcript.add(&fin);
    wire.send_protected(&mut tx, &[&ee, &fin]).await?;
    let (client_ap, server_ap) = hs.application(&transcript.hash());

    let expected = verify_data(&hs.client, &transcript.hash());
    let theirs = wire.next(Some(&mut rx)).await?;
    if theirs[0] != HS_FINISHED {
        return Err(Failure::UnexpectedHandshake.into());
    }
    if !same(&theirs[4..], &expected) {
        return Err(Failure::Decryption.into());
    }
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(PskStream::new(
        io,
        Protection::new(suite, client_ap),
        Protection::new(suite, server_ap),
    ))
}

/// The client's handshake with `identity` and its `key`.
pub(crate) async fn connect<S>(mut io: S, identity: &[u8], key: &[u8]) -> Result<PskStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rng = SystemRandom::new();
    let pairs = Group::ALL
        .into_iter()
        .map(|g| KeyPair::generate(g, &rng))
        .collect::<Result<Vec<_>>>()?;
    let session_id = random::<32>(&rng)?;

    let mut body = vec![3, 3];
    body.extend_from_slice(&random::<32>(&rng)?);
    put_vec(&mut body, 1, &session_id);
    let suites: Vec<u8> = Suite::ALL
        .iter()
        .flat_map(|s| s.code().to_be_bytes())
        .collect();
    put_vec(&mut body, 2, &suites);
    body.extend_from_slice(&[1, 0]);
    let mut exts = Vec::new();
    extension(&mut exts, EXT_SUPPORTED_VERSIONS, &[2, 3, 4]);
    let groups: Vec<u8> = Group::ALL
        .iter()
        .flat_map(|g| g.code().to_be_bytes())
        .collect();
    let mut list = Vec::new();
    put_vec(&mut list, 2, &groups);
    extension(&mut exts, EXT_SUPPORTED_GROUPS, &list);
    // Not used with a PSK, but servers expect it.
    extension(
        &mut exts,
        EXT_SIGNATURE_ALGORITHMS,
        &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    let mut shares = Vec::new();
    for p in &pairs {
        shares.extend_from_slice(&p.group.code().to_be_bytes());
        put_vec(&mut shares, 2, &p.public);
    }
    let mut list = Vec::new();
    put_vec(&mut list, 2, &shares);
    extension(&mut exts, EXT_KEY_SHARE, &list);
    extension(&mut exts, EXT_PSK_MODES, &[1, MODE_PSK_DHE_KE]);
    let mut ids = Vec::new();
    put_vec(&mut ids, 2, identity);
    ids.extend_from_slice(&[0; 4]);
    let mut psk = Vec::new();
    put_vec(&mut psk, 2, &ids);
    // The binder list: one binder, filled in below.
    psk.extend_from_slice(&[0, 33, 32]);
    psk.extend_from_slice(&[0; 32]);
    extension(&mut exts, EXT_PRE_SHARED_KEY, &psk);
    put_vec(&mut body, 2, &exts);
    let mut ch = message(HS_CLIENT_HELLO, &body);
    let early = Early::new(key);
    let binders_at = ch.len() - 35;
    let mut truncated = Transcript::new();
    truncated.add(&ch[..binders_at]);
    let binder = early.binder(&truncated.hash());
    ch[binders_at + 3..].copy_from_slice(&binder);

    let mut wire = Wire {
        io: &mut io,
        pending: Vec::new(),
    };
    let mut transcript = Transcript::new();
    transcript.add(&ch);
    wire.send_plain(0x0301, &ch).await?;
    wire.io.flush().await?;

    let sh = wire.next(None).await?;
    if sh[0] != HS_SERVER_HELLO {
        return Err(Failure::UnexpectedHandshake.into());
    }
    let mut f = Fields::new(&sh[4..]);
    f.u16()?;
    if f.bytes(32)? == RETRY_RANDOM {
        // A share in each group this side has was sent: nothing to retry with.
        return Err(Failure::UnexpectedHandshake.into());
    }
    if f.vec8()? != session_id {
        return Err(Failure::Illegal.into());
    }
    let suite = Suite::from_code(f.u16()?).ok_or(Failure::Illegal)?;
    f.u8()?;
    let mut exts = Fields::new(f.vec16()?);
    let (mut version, mut selected, mut peer_share) = (None, None, None);
    while !exts.done() {
        let ty = exts.u16()?;
        let mut e = Fields::new(exts.vec16()?);
        match ty {
            EXT_SUPPORTED_VERSIONS => version = Some(e.u16()?),
            EXT_PRE_SHARED_KEY => selected = Some(e.u16()?),
            EXT_KEY_SHARE => {
                let group = e.u16()?;
                peer_share = Some((group, e.vec16()?));
            }
            _ => {}
        }
    }
    if version != Some(TLS13) {
        return Err(Failure::UnsupportedVersion.into());
    }
    match selected {
        Some(0) => {}
        Some(_) => return Err(Failure::Illegal.into()),
        None => return Err(Failure::InsufficientCredentials.into()),
    }
    let (group, peer) = peer_share.ok_or(Failure::Illegal)?;
    let pair = pairs
        .into_iter()
        .find(|p| p.group.code() == group)
        .ok_or(Failure::Illegal)?;
    let shared = pair.agree(peer)?;
    transcript.add(&sh);

    let hs = early.handshake(Some(&shared), &transcript.hash());
    let mut rx = Protection::new(suite, hs.server);
    let mut tx = Protection::new(suite, hs.client);
    let ee = wire.next(Some(&mut rx)).await?;
    if ee[0] != HS_ENCRYPTED_EXTENSIONS {
        return Err(Failure::UnexpectedHandshake.into());
    }
    transcript.add(&ee);
    let expected = verify_data(&hs.server, &transcript.hash());
    let fin = wire.next(Some(&mut rx)).await?;
    if fin[0] != HS_FINISHED {
        return Err(Failure::UnexpectedHandshake.into());
    }
    if !same(&fin[4..], &expected) {
        return Err(Failure::Decryption.into());
    }
    transcript.add(&fin);
    let (client_ap, server_ap) = hs.application(&transcript.hash());
    let ours = message(HS_FINISHED, &verify_data(&hs.client, &transcript.hash()));
    wire.send_ccs().await?;
    wire.send_protected(&mut tx, &[&ours]).await?;
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(PskStream::new(
        io,
        Protection::new(suite, server_ap),
        Protection::new(suite, client_ap),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn both_ends_agree_and_carry_data_both_ways() {
        rt().block_on(async {
            let (a, b) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let mut s = accept(a, |id| (id == b"alice").then(|| vec![9; 32]))
                    .await
                    .unwrap();
                let mut got = vec![0; 100_000];
                s.read_exact(&mut got).await.unwrap();
                s.write_all(&got).await.unwrap();
                s.shutdown().await.unwrap();
            });
            let mut c = connect(b, b"alice", &[9; 32]).await.unwrap();
            let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            c.write_all(&data).await.unwrap();
            c.flush().await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, data);
            server.await.unwrap();
        });
    }

    /// A small deterministic generator for damaged inputs.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 as usize
        }

        /// `good` with a few bytes changed, and sometimes cut short.
        fn damage(&mut self, good: &[u8]) -> Vec<u8> {
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

    /// The first flight each end sends, from a real handshake: (ClientHello, the
    /// server's answer up to its Finished).
    fn flights() -> (Vec<u8>, Vec<u8>) {
        rt().block_on(async {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let client = tokio::spawn(async move {
                let _ = connect(a, b"alice", &[9; 32]).await;
            });
            let mut hello = vec![0; 5];
            b.read_exact(&mut hello).await.unwrap();
            let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
            hello.resize(5 + len, 0);
            b.read_exact(&mut hello[5..]).await.unwrap();
            drop(b);
            client.await.unwrap();
            let (mut c, s) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                let _ = accept(s, |_| Some(vec![9; 32])).await;
            });
            c.write_all(&hello).await.unwrap();
            // ServerHello, change-cipher-spec, then the protected flight: whatever comes
            // before the server waits for the client's Finished.
            let mut answer = Vec::new();
            let mut buf = vec![0; 4096];
            while let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_millis(200), c.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(answer.len() > 100, "{answer:?}");
            drop(c);
            server.await.unwrap();
            (hello, answer)
        })
    }

    #[test]
    fn damaged_handshakes_fail_without_a_panic() {
        let (hello, answer) = flights();
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        rt().block_on(async {
            for _ in 0..1500 {
                let (mut c, s) = tokio::io::duplex(1 << 16);
                c.write_all(&noise.damage(&hello)).await.unwrap();
                drop(c);
                assert!(accept(s, |_| Some(vec![9; 32])).await.is_err());

                let (mut s, c) = tokio::io::duplex(1 << 16);
                let client =
                    tokio::spawn(async move { connect(c, b"alice", &[9; 32]).await.map(|_| ()) });
                let mut discard = vec![0; 4096];
                let _ = s.read(&mut discard).await;
                s.write_all(&noise.damage(&answer)).await.unwrap();
                drop(s);
                assert!(client.await.unwrap().is_err());
            }
        });
    }

    #[test]
    fn a_wrong_key_or_identity_is_refused() {
        for (id, key) in [(&b"alice"[..], [8u8; 32]), (&b"bob"[..], [9u8; 32])] {
            rt().block_on(async {
                let (a, b) = tokio::io::duplex(1 << 16);
                let server = tokio::spawn(async move {
                    accept(a, |id| (id == b"alice").then(|| vec![9; 32]))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                let client = connect(b, id, &key).await.map(|_| ());
                assert_eq!(
                    server.await.unwrap().unwrap_err(),
                    "An illegal parameter has been received."
                );
                assert_eq!(
                    client.unwrap_err().to_string(),
                    "The TLS connection was non-properly terminated."
                );
            });
        }
    }
}
