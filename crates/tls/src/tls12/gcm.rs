//! TLS 1.2's PRF (RFC 5246 section 5), the key block, and AES-GCM records (RFC 5288) for
//! the two anonymous suites GnuTLS offers with AES-GCM.

use ring::{aead, digest, hmac};
use std::ops::Range;

/// The cipher suites this side takes, in its order of preference (GnuTLS's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    /// TLS_DH_anon_WITH_AES_256_GCM_SHA384.
    Aes256GcmSha384,
    /// TLS_DH_anon_WITH_AES_128_GCM_SHA256.
    Aes128GcmSha256,
}

impl Suite {
    pub(crate) const ALL: [Suite; 2] = [Suite::Aes256GcmSha384, Suite::Aes128GcmSha256];

    pub(crate) fn code(self) -> u16 {
        match self {
            Suite::Aes256GcmSha384 => 0x00a7,
            Suite::Aes128GcmSha256 => 0x00a6,
        }
    }

    /// Its cipher, as GnuTLS's priority strings name it.
    pub(crate) fn cipher(self) -> &'static str {
        match self {
            Suite::Aes256GcmSha384 => "AES-256-GCM",
            Suite::Aes128GcmSha256 => "AES-128-GCM",
        }
    }

    pub(crate) fn from_code(code: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.code() == code)
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Suite::Aes256GcmSha384 => hmac::HMAC_SHA384,
            Suite::Aes128GcmSha256 => hmac::HMAC_SHA256,
        }
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Suite::Aes256GcmSha384 => &digest::SHA384,
            Suite::Aes128GcmSha256 => &digest::SHA256,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes256GcmSha384 => &aead::AES_256_GCM,
            Suite::Aes128GcmSha256 => &aead::AES_128_GCM,
        }
    }

    /// PRF(secret, label, seed) with the suite's hash, `len` bytes.
    pub(crate) fn prf(self, secret: &[u8], label: &str, seed: &[&[u8]], len: usize) -> Vec<u8> {
        let key = hmac::Key::new(self.hmac(), secret);
        let mut full_seed = label.as_bytes().to_vec();
        for s in seed {
            full_seed.extend_from_slice(s);
        }
        let mut a = hmac::sign(&key, &full_seed);
        let mut out = Vec::with_capacity(len + 48);
        while out.len() < len {
            let mut ctx = hmac::Context::with_key(&key);
            ctx.update(a.as_ref());
            ctx.update(&full_seed);
            out.extend_from_slice(ctx.sign().as_ref());
            a = hmac::sign(&key, a.as_ref());
        }
        out.truncate(len);
        out
    }

    /// Each side's record protection from the master secret: (client's, server's).
    pub(crate) fn key_block(
        self,
        master: &[u8],
        client_random: &[u8],
        server_random: &[u8],
    ) -> (Gcm12, Gcm12) {
        let key_len = self.aead().key_len();
        let block = self.prf(
            master,
            "key expansion",
            &[server_random, client_random],
            2 * key_len + 8,
        );
        let (client_key, rest) = block.split_at(key_len);
        let (server_key, rest) = rest.split_at(key_len);
        let (client_salt, server_salt) = rest.split_at(4);
        (
            Gcm12::new(self, client_key, client_salt),
            Gcm12::new(self, server_key, server_salt),
        )
    }
}

/// The hash of the handshake so far, with the suite's hash.
pub(crate) struct Transcript(digest::Context);

impl Transcript {
    pub(crate) fn new(suite: Suite) -> Transcript {
        Transcript(digest::Context::new(suite.digest()))
    }

    pub(crate) fn add(&mut self, message: &[u8]) {
        self.0.update(message);
    }

    pub(crate) fn hash(&self) -> Vec<u8> {
        self.0.clone().finish().as_ref().to_vec()
    }
}

/// One direction's AES-GCM record protection: the nonce is the key block's salt and an
/// explicit part sent with each record (the sequence number, as GnuTLS sends it).
pub(crate) struct Gcm12 {
    key: aead::LessSafeKey,
    salt: [u8; 4],
    seq: u64,
}

const EXPLICIT: usize = 8;

impl Gcm12 {
    fn new(suite: Suite, key: &[u8], salt: &[u8]) -> Gcm12 {
        // The lengths are the suite's own: the key cannot be refused.
        let key = aead::UnboundKey::new(suite.aead(), key).unwrap_or_else(|_| unreachable!());
        let mut s = [0; 4];
        s.copy_from_slice(salt);
        Gcm12 {
            key: aead::LessSafeKey::new(key),
            salt: s,
            seq: 0,
        }
    }

    fn nonce(&self, explicit: &[u8]) -> aead::Nonce {
        let mut n = [0; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(explicit);
        aead::Nonce::assume_unique_for_key(n)
    }

    fn aad(&self, content: u8, len: usize) -> [u8; 13] {
        let mut a = [0; 13];
        a[..8].copy_from_slice(&self.seq.to_be_bytes());
        a[8] = content;
        a[9] = 3;
        a[10] = 3;
        a[11..].copy_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
        a
    }

    /// Seals `data` (one record's worth) as a record of type `content` appended to `out`.
    pub(crate) fn seal(&mut self, content: u8, data: &[u8], out: &mut Vec<u8>) {
        let explicit = self.seq.to_be_bytes();
        let aad = self.aad(content, data.len());
        let len = EXPLICIT + data.len() + self.key.algorithm().tag_len();
        out.extend_from_slice(&[content, 3, 3, (len >> 8) as u8, len as u8]);
        out.extend_from_slice(&explicit);
        let start = out.len();
        out.extend_from_slice(data);
        let nonce = self.nonce(&explicit);
        // Sealing fails only for data longer than the algorithm's limit, far above a record.
        if let Ok(tag) =
            self.key
                .seal_in_place_separate_tag(nonce, aead::Aad::from(aad), &mut out[start..])
        {
            out.extend_from_slice(tag.as_ref());
        }
        self.seq += 1;
    }

    /// Opens a record's payload in place: where its plaintext is, or `None` when it does not
    /// authenticate.
    pub(crate) fn open(&mut self, header: [u8; 5], payload: &mut [u8]) -> Option<Range<usize>> {
        let tag = self.key.algorithm().tag_len();
        let plain_len = payload.len().checked_sub(EXPLICIT + tag)?;
        let nonce = self.nonce(&payload[..EXPLICIT]);
        let aad = self.aad(header[0], plain_len);
        self.seq += 1;
        self.key
            .open_in_place(nonce, aead::Aad::from(aad), &mut payload[EXPLICIT..])
            .ok()?;
        Some(EXPLICIT..EXPLICIT + plain_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_once() {
        for suite in Suite::ALL {
            let (mut tx, _) = suite.key_block(&[1; 48], &[2; 32], &[3; 32]);
            let (mut rx, _) = suite.key_block(&[1; 48], &[2; 32], &[3; 32]);
            let mut out = Vec::new();
            tx.seal(23, b"hello", &mut out);
            let header: [u8; 5] = out[..5].try_into().unwrap();
            let mut payload = out[5..].to_vec();
            let r = rx.open(header, &mut payload).unwrap();
            assert_eq!(&payload[r], b"hello");
            let mut again = out[5..].to_vec();
            assert_eq!(rx.open(header, &mut again), None);
        }
    }

    /// The TLS 1.2 PRF with SHA-256 against a known vector (the one GnuTLS and others test
    /// with, from the IETF TLS list).
    #[test]
    fn the_prf_gives_the_known_vector() {
        let secret = hex("9bbe436ba940f017b17652849a71db35");
        let seed = hex("a0ba9f936cda311827a6f796ffd5198c");
        let out = Suite::Aes128GcmSha256.prf(&secret, "test label", &[&seed], 100);
        assert_eq!(out[..16].to_vec(), hex("e3f229ba727be17b8d122620557cd453"));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
