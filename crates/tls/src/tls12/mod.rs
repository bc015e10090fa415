//! TLS 1.2 with anonymous Diffie-Hellman, both ends: what QEMU's `tls-creds-anon` sessions
//! negotiate through GnuTLS (its priority `NORMAL:+ANON-DH`; TLS 1.3 has no anonymous
//! key exchange). Keys are agreed in a finite field (RFC 7919's ffdhe2048, or a server's
//! `dh-params.pem`), records are sealed with AES-GCM (RFC 5288), with the extended master
//! secret (RFC 7627) when the client offers it, as GnuTLS's do. Nothing is authenticated:
//! the session is private from eavesdroppers only, as QEMU documents.
//!
//! - `gcm.rs`: the PRF, the key block and record protection.

mod gcm;

pub(crate) use gcm::{Gcm12, Suite};

use crate::record::{Keys, OwnTlsStream};
use crate::wire::{
    EXT_EXTENDED_MASTER_SECRET, EXT_RENEGOTIATION_INFO, EXT_SUPPORTED_GROUPS, Failure, Fields,
    HS_CLIENT_HELLO, HS_FINISHED, HS_SERVER_HELLO, Result, Wire, extension, message,
    parse_client_hello, put_vec, random, u16s,
};
use gcm::Transcript;
use num_bigint::BigUint;
use ring::rand::SystemRandom;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const HS_SERVER_KEY_EXCHANGE: u8 = 12;
const HS_SERVER_HELLO_DONE: u8 = 14;
const HS_CLIENT_KEY_EXCHANGE: u8 = 16;

/// The renegotiation-info signalling cipher suite value (RFC 5746).
const SCSV_RENEGOTIATION: u16 = 0x00ff;
/// RFC 7919's named group for ffdhe2048, as `supported_groups` names it.
const GROUP_FFDHE2048: u16 = 0x0100;

/// RFC 7919's ffdhe2048 prime; its generator is 2.
const FFDHE2048: &str = "\
    ffffffffffffffffadf85458a2bb4a9aafdc5620273d3cf1d8b9c583ce2d3695a9e13641146433fbcc939dce\
    249b3ef97d2fe363630c75d8f681b202aec4617ad3df1ed5d5fd65612433f51f5f066ed0856365553ded1af3\
    b557135e7f57c935984f0c70e0e68b77e2a689daf3efe8721df158a136ade73530acca4f483a797abc0ab182\
    b324fb61d108a94bb2c8e3fbb96adab760d7f4681d4f42a3de394df4ae56ede76372bb190b07a7c8ee0a6d70\
    9e02fce1cdf7e2ecc03404cd28342f619172fe9ce98583ff8e4f1232eef28183c3fe3b1b4c6fad733bb5fcbc\
    2ec22005c58ef1837d1683b2c6f34a26c1b2effa886b423861285c97ffffffffffffffff";

/// A finite-field group: its prime and generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DhGroup {
    p: BigUint,
    g: BigUint,
}

impl DhGroup {
    /// RFC 7919's ffdhe2048.
    pub(crate) fn ffdhe2048() -> DhGroup {
        DhGroup {
            // A constant that parses.
            p: BigUint::parse_bytes(FFDHE2048.as_bytes(), 16).unwrap_or_default(),
            g: BigUint::from(2u8),
        }
    }

    /// A group from its prime and generator (big-endian); `None` for one too small or
    /// degenerate to agree keys in.
    pub(crate) fn new(p: &[u8], g: &[u8]) -> Option<DhGroup> {
        let p = BigUint::from_bytes_be(p);
        let g = BigUint::from_bytes_be(g);
        (p.bits() >= 512 && g > BigUint::from(1u8) && g < p).then_some(DhGroup { p, g })
    }

    /// A private exponent and the public value it gives.
    fn key_pair(&self, rng: &SystemRandom) -> Result<(BigUint, BigUint)> {
        // 256 random bits: RFC 7919 asks at least twice the group's security strength.
        let x = BigUint::from_bytes_be(&random::<32>(rng)?) | BigUint::from(1u8) << 255u32;
        let y = self.g.modpow(&x, &self.p);
        Ok((x, y))
    }

    /// The shared secret (leading zeros stripped, RFC 5246 8.1.2), after checking the
    /// peer's public value is in range.
    fn agree(&self, x: &BigUint, peer: &[u8]) -> Result<Vec<u8>> {
        let y = BigUint::from_bytes_be(peer);
        let one = BigUint::from(1u8);
        if y <= one || y >= &self.p - &one {
            return Err(Failure::Illegal.into());
        }
        Ok(y.modpow(x, &self.p).to_bytes_be())
    }

    fn len(&self) -> usize {
        self.p.bits().div_ceil(8) as usize
    }
}

/// `n` as a big-endian number `len` bytes long.
fn padded(n: &BigUint, len: usize) -> Vec<u8> {
    let b = n.to_bytes_be();
    let mut v = vec![0; len.saturating_sub(b.len())];
    v.extend_from_slice(&b);
    v
}

/// The master secret: extended (RFC 7627, from the hash of the handshake through the
/// ClientKeyExchange) or classic (from the randoms).
fn master_secret(
    suite: Suite,
    pre_master: &[u8],
    ems: bool,
    transcript: &Transcript,
    client_random: &[u8],
    server_random: &[u8],
) -> Vec<u8> {
    if ems {
        suite.prf(
            pre_master,
            "extended master secret",
            &[&transcript.hash()],
            48,
        )
    } else {
        suite.prf(
            pre_master,
            "master secret",
            &[client_random, server_random],
            48,
        )
    }
}

/// A Finished message from `label` ("client finished", "server finished").
fn finished(suite: Suite, master: &[u8], label: &str, transcript: &Transcript) -> Vec<u8> {
    message(
        HS_FINISHED,
        &suite.prf(master, label, &[&transcript.hash()], 12),
    )
}

/// The server's handshake, with one of `suites` (what the session's priority allows).
pub(crate) async fn accept<S>(
    mut io: S,
    group: &DhGroup,
    suites: &[Suite],
) -> Result<OwnTlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rng = SystemRandom::new();
    let mut wire = Wire::new(&mut io, false);
    let ch = wire.expect(HS_CLIENT_HELLO, None).await?;
    let hello = parse_client_hello(&ch)?;
    if u16::from_be_bytes([ch[4], ch[5]]) < 0x0303 {
        return Err(Failure::UnsupportedVersion.into());
    }
    // A client without anonymous suites wants credentials this server does not have.
    let suite = u16s(hello.suites)
        .filter_map(Suite::from_code)
        .find(|s| suites.contains(s))
        .ok_or(Failure::InsufficientCredentials)?;
    let client_random = ch[6..38].to_vec();
    let secure_renegotiation =
        hello.renegotiation_info || u16s(hello.suites).any(|s| s == SCSV_RENEGOTIATION);
    let mut transcript = Transcript::new(suite);
    transcript.add(&ch);

    let server_random = random::<32>(&rng)?;
    let mut body = vec![3, 3];
    body.extend_from_slice(&server_random);
    put_vec(&mut body, 1, &[]);
    body.extend_from_slice(&suite.code().to_be_bytes());
    body.push(0);
    let mut exts = Vec::new();
    if hello.extended_master_secret {
        extension(&mut exts, EXT_EXTENDED_MASTER_SECRET, &[]);
    }
    if secure_renegotiation {
        extension(&mut exts, EXT_RENEGOTIATION_INFO, &[0]);
    }
    if !exts.is_empty() {
        put_vec(&mut body, 2, &exts);
    }
    let sh = message(HS_SERVER_HELLO, &body);
    // A client that names RFC 7919's groups gets ffdhe2048, as GnuTLS picks it.
    let ffdhe = DhGroup::ffdhe2048();
    let group = if hello.groups.contains(&GROUP_FFDHE2048) {
        &ffdhe
    } else {
        group
    };
    let (x, y) = group.key_pair(&rng)?;
    let mut ske = Vec::new();
    put_vec(&mut ske, 2, &group.p.to_bytes_be());
    put_vec(&mut ske, 2, &group.g.to_bytes_be());
    put_vec(&mut ske, 2, &padded(&y, group.len()));
    let ske = message(HS_SERVER_KEY_EXCHANGE, &ske);
    let done = message(HS_SERVER_HELLO_DONE, &[]);
    let mut flight = sh;
    flight.extend_from_slice(&ske);
    flight.extend_from_slice(&done);
    transcript.add(&flight);
    wire.send_plain(0x0303, &flight).await?;
    wire.io.flush().await?;

    let cke = wire.expect(HS_CLIENT_KEY_EXCHANGE, None).await?;
    let yc = Fields::new(&cke[4..]).vec16()?;
    let pre_master = group.agree(&x, yc)?;
    transcript.add(&cke);
    let master = master_secret(
        suite,
        &pre_master,
        hello.extended_master_secret,
        &transcript,
        &client_random,
        &server_random,
    );
    let (client_keys, server_keys) = suite.key_block(&master, &client_random, &server_random);
    let mut rx = Keys::Tls12(client_keys);
    let mut tx = Keys::Tls12(server_keys);

    let expected = finished(suite, &master, "client finished", &transcript);
    wire.expect_ccs().await?;
    let theirs = wire.expect_finished(&mut rx, &expected[4..]).await?;
    transcript.add(&theirs);
    let ours = finished(suite, &master, "server finished", &transcript);
    wire.send_ccs().await?;
    wire.send_protected(&mut tx, &[&ours]).await?;
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(OwnTlsStream::new(io, rx, tx))
}

/// The client's handshake, offering `suites`.
pub(crate) async fn connect<S>(mut io: S, suites: &[Suite]) -> Result<OwnTlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rng = SystemRandom::new();
    let client_random = random::<32>(&rng)?;
    let mut body = vec![3, 3];
    body.extend_from_slice(&client_random);
    put_vec(&mut body, 1, &[]);
    let mut offered: Vec<u8> = suites.iter().flat_map(|s| s.code().to_be_bytes()).collect();
    offered.extend_from_slice(&SCSV_RENEGOTIATION.to_be_bytes());
    put_vec(&mut body, 2, &offered);
    body.extend_from_slice(&[1, 0]);
    let mut exts = Vec::new();
    let mut groups = Vec::new();
    put_vec(&mut groups, 2, &GROUP_FFDHE2048.to_be_bytes());
    extension(&mut exts, EXT_SUPPORTED_GROUPS, &groups);
    extension(&mut exts, EXT_EXTENDED_MASTER_SECRET, &[]);
    put_vec(&mut body, 2, &exts);
    let ch = message(HS_CLIENT_HELLO, &body);

    let mut wire = Wire::new(&mut io, false);
    wire.send_plain(0x0301, &ch).await?;
    wire.io.flush().await?;

    let sh = wire.expect(HS_SERVER_HELLO, None).await?;
    let mut f = Fields::new(&sh[4..]);
    if f.u16()? != 0x0303 {
        return Err(Failure::UnsupportedVersion.into());
    }
    let server_random = f.bytes(32)?.to_vec();
    f.vec8()?;
    let suite = Suite::from_code(f.u16()?)
        .filter(|s| suites.contains(s))
        .ok_or(Failure::Illegal)?;
    if f.u8()? != 0 {
        return Err(Failure::Illegal.into());
    }
    let mut ems = false;
    if !f.done() {
        let mut exts = Fields::new(f.vec16()?);
        while !exts.done() {
            let ty = exts.u16()?;
            exts.vec16()?;
            ems |= ty == EXT_EXTENDED_MASTER_SECRET;
        }
    }
    let mut transcript = Transcript::new(suite);
    transcript.add(&ch);
    transcript.add(&sh);

    let ske = wire.expect(HS_SERVER_KEY_EXCHANGE, None).await?;
    let mut f = Fields::new(&ske[4..]);
    let (p, g, ys) = (f.vec16()?, f.vec16()?, f.vec16()?);
    let group = DhGroup::new(p, g).ok_or(Failure::Illegal)?;
    transcript.add(&ske);
    let done = wire.expect(HS_SERVER_HELLO_DONE, None).await?;
    transcript.add(&done);

    let (x, yc) = group.key_pair(&rng)?;
    let pre_master = group.agree(&x, ys)?;
    let mut cke = Vec::new();
    put_vec(&mut cke, 2, &yc.to_bytes_be());
    let cke = message(HS_CLIENT_KEY_EXCHANGE, &cke);
    transcript.add(&cke);
    let master = master_secret(
        suite,
        &pre_master,
        ems,
        &transcript,
        &client_random,
        &server_random,
    );
    let (client_keys, server_keys) = suite.key_block(&master, &client_random, &server_random);
    let mut tx = Keys::Tls12(client_keys);
    let mut rx = Keys::Tls12(server_keys);
    let ours = finished(suite, &master, "client finished", &transcript);
    transcript.add(&ours);
    wire.send_plain(0x0303, &cke).await?;
    wire.send_ccs().await?;
    wire.send_protected(&mut tx, &[&ours]).await?;

    let expected = finished(suite, &master, "server finished", &transcript);
    wire.expect_ccs().await?;
    wire.expect_finished(&mut rx, &expected[4..]).await?;
    if !wire.pending.is_empty() {
        return Err(Failure::UnexpectedHandshake.into());
    }
    Ok(OwnTlsStream::new(io, rx, tx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::rt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn both_ends_agree_and_carry_data_both_ways() {
        let group = DhGroup::ffdhe2048();
        rt().block_on(crate::wire::echoes(
            |a| accept(a, &group, &Suite::ALL),
            |c| connect(c, &Suite::ALL),
        ));
    }

    #[test]
    fn damaged_handshakes_fail_without_a_panic() {
        let (hello, answer) = rt().block_on(async {
            // A real first flight from each end.
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let client = tokio::spawn(async move { connect(a, &Suite::ALL).await.map(|_| ()) });
            let mut hello = vec![0; 4096];
            let n = b.read(&mut hello).await.unwrap();
            hello.truncate(n);
            let (mut c, s) = tokio::io::duplex(1 << 16);
            let server = tokio::spawn(async move {
                accept(s, &DhGroup::ffdhe2048(), &Suite::ALL)
                    .await
                    .map(|_| ())
            });
            c.write_all(&hello).await.unwrap();
            let mut answer = vec![0; 4096];
            let mut got = 0;
            // ServerHello, ServerKeyExchange (a 2048-bit group) and ServerHelloDone.
            while !answer[..got].ends_with(&[HS_SERVER_HELLO_DONE, 0, 0, 0]) {
                got += c.read(&mut answer[got..]).await.unwrap();
            }
            answer.truncate(got);
            drop((b, c));
            assert!(client.await.unwrap().is_err());
            assert!(server.await.unwrap().is_err());
            (hello, answer)
        });
        rt().block_on(crate::wire::damaged_flights_fail(
            &hello,
            &answer,
            300,
            |s| async move { accept(s, &DhGroup::ffdhe2048(), &Suite::ALL).await.is_err() },
            |c| async move { connect(c, &Suite::ALL).await.is_err() },
        ));
    }

    #[test]
    fn the_group_is_rfc_7919s() {
        let g = DhGroup::ffdhe2048();
        assert_eq!(g.p.bits(), 2048);
        assert_eq!(g.len(), 256);
        assert_eq!(&g.p.to_bytes_be()[..8], &[0xff; 8]);
        assert!(DhGroup::new(&[0xff; 8], &[2]).is_none());
    }
}
