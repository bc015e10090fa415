//! TLS 1.3 with an external pre-shared key (RFC 8446), both ends: what QEMU's
//! `tls-creds-psk` sessions negotiate through GnuTLS (psk_dhe_ke over X25519 or P-256, or
//! psk_ke; AES-128-GCM or ChaCha20-Poly1305 with SHA-256). rustls has no external PSKs,
//! so this handshake is ferrite's own; it is small because certificates play no part.
//!
//! - `schedule.rs`: the key schedule and record protection.
//!
//! The records of the established session are `record.rs`'s; the wire's pieces, `wire.rs`'s.

mod schedule;

pub(crate) use schedule::{Protection, Suite};

use crate::record::{Keys, OwnTlsStream};
use crate::wire::{
    EXT_KEY_SHARE, EXT_PRE_SHARED_KEY, EXT_PSK_MODES, EXT_SUPPORTED_GROUPS, EXT_SUPPORTED_VERSIONS,
    Failure, Fields, HS_CLIENT_HELLO, HS_FINISHED, HS_SERVER_HELLO, Result, Wire, extension,
    message, parse_client_hello, put_vec, random, same, u16s,
};
use schedule::{Early, Transcript, verify_data};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::SystemRandom;

const HS_ENCRYPTED_EXTENSIONS: u8 = 8;

const EXT_SIGNATURE_ALGORITHMS: u16 = 13;

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

/// The server's handshake: the client must offer TLS 1.3, one of `suites` (what the
/// session's priority allows) and a PSK identity `key_of` knows, with the binder its key
/// makes.
pub(crate) async fn accept<S>(
    mut io: S,
    key_of: impl Fn(&[u8]) -> Option<Vec<u8>>,
    suites: &[Suite],
) -> Result<OwnTlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rng = SystemRandom::new();
    let mut wire = Wire::new(&mut io, true);
    let ch = wire.expect(HS_CLIENT_HELLO, None).await?;
    let hello = parse_client_hello(&ch)?;
    // Only TLS 1.3 takes an external PSK here: a client without it has no suite to share.
    if !hello.versions.is_some_and(|v| u16s(v).any(|v| v == TLS13)) {
        return Err(Failure::NoCipherSuites.into());
    }
    let suite = u16s(hello.suites)
        .filter_map(Suite::from_code)
        .find(|s| suites.contains(s))
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
    let mut tx = Keys::Tls13(Protection::new(suite, hs.server));
    let mut rx = Keys::Tls13(Protection::new(suite, hs.client));
    let ee = message(HS_ENCRYPTED_EXTENSIONS, &[0, 0]);
    transcript.add(&ee);
    let fin = message(HS_FINISHED, &verify_data(&hs.server, &transcript.hash()));
    transcript.add(&fin);
    wire.send_protected(&mut tx, &[&ee, &fin]).await?;
    let (client_ap, server_ap) = hs.application(&transcript.hash());

    let expected = verify_data(&hs.client, &transcript.hash());
    wire.expect_finished(&mut rx, &expected).await?;
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(OwnTlsStream::new(
        io,
        Keys::Tls13(Protection::new(suite, client_ap)),
        Keys::Tls13(Protection::new(suite, server_ap)),
    ))
}

/// The client's handshake with `identity` and its `key`, offering `suites`.
pub(crate) async fn connect<S>(
    mut io: S,
    identity: &[u8],
    key: &[u8],
    suites: &[Suite],
) -> Result<OwnTlsStream<S>>
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
    let offered: Vec<u8> = suites.iter().flat_map(|s| s.code().to_be_bytes()).collect();
    put_vec(&mut body, 2, &offered);
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

    let mut wire = Wire::new(&mut io, true);
    let mut transcript = Transcript::new();
    transcript.add(&ch);
    wire.send_plain(0x0301, &ch).await?;
    wire.io.flush().await?;

    let sh = wire.expect(HS_SERVER_HELLO, None).await?;
    let mut f = Fields::new(&sh[4..]);
    f.u16()?;
    if f.bytes(32)? == RETRY_RANDOM {
        // A share in each group this side has was sent: nothing to retry with.
        return Err(Failure::UnexpectedHandshake.into());
    }
    if f.vec8()? != session_id {
        return Err(Failure::Illegal.into());
    }
    let suite = Suite::from_code(f.u16()?)
        .filter(|s| suites.contains(s))
        .ok_or(Failure::Illegal)?;
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
    let mut rx = Keys::Tls13(Protection::new(suite, hs.server));
    let mut tx = Keys::Tls13(Protection::new(suite, hs.client));
    let ee = wire.expect(HS_ENCRYPTED_EXTENSIONS, Some(&mut rx)).await?;
    transcript.add(&ee);
    let expected = verify_data(&hs.server, &transcript.hash());
    let fin = wire.expect_finished(&mut rx, &expected).await?;
    transcript.add(&fin);
    let (client_ap, server_ap) = hs.application(&transcript.hash());
    let ours = message(HS_FINISHED, &verify_data(&hs.client, &transcript.hash()));
    wire.send_ccs().await?;
    wire.send_protected(&mut tx, &[&ours]).await?;
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(OwnTlsStream::new(
        io,
        Keys::Tls13(Protection::new(suite, server_ap)),
        Keys::Tls13(Protection::new(suite, client_ap)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::rt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn both_ends_agree_and_carry_data_both_ways() {
        rt().block_on(crate::wire::echoes(
            |a| accept(a, |id| (id == b"alice").then(|| vec![9; 32]), &Suite::ALL),
            |b| connect(b, b"alice", &[9; 32], &Suite::ALL),
        ));
    }

    /// The first flight each end sends, from a real handshake: (ClientHello, the
    /// server's answer up to its Finished).
    fn flights() -> (Vec<u8>, Vec<u8>) {
        rt().block_on(async {
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let client = tokio::spawn(async move {
                let _ = connect(a, b"alice", &[9; 32], &Suite::ALL).await;
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
                let _ = accept(s, |_| Some(vec![9; 32]), &Suite::ALL).await;
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
        rt().block_on(crate::wire::damaged_flights_fail(
            &hello,
            &answer,
            1500,
            |s| async move { accept(s, |_| Some(vec![9; 32]), &Suite::ALL).await.is_err() },
            |c| async move { connect(c, b"alice", &[9; 32], &Suite::ALL).await.is_err() },
        ));
    }

    #[test]
    fn a_wrong_key_or_identity_is_refused() {
        for (id, key) in [(&b"alice"[..], [8u8; 32]), (&b"bob"[..], [9u8; 32])] {
            rt().block_on(async {
                let (a, b) = tokio::io::duplex(1 << 16);
                let server = tokio::spawn(async move {
                    accept(a, |id| (id == b"alice").then(|| vec![9; 32]), &Suite::ALL)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
                let client = connect(b, id, &key, &Suite::ALL).await.map(|_| ());
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
