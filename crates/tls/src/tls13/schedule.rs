//! TLS 1.3's key schedule for an external pre-shared key (RFC 8446 section 7), with
//! SHA-256: the two cipher suites a GnuTLS peer with a PSK of its default hash can take.

use ring::{aead, digest, hmac};

/// SHA-256's output length, the length of every secret here.
pub(crate) const HASH_LEN: usize = 32;

pub(crate) type Secret = [u8; HASH_LEN];

/// The cipher suites this side takes, in its order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Suite {
    Aes128GcmSha256,
    Chacha20Poly1305Sha256,
}

impl Suite {
    pub(crate) const ALL: [Suite; 2] = [Suite::Aes128GcmSha256, Suite::Chacha20Poly1305Sha256];

    pub(crate) fn code(self) -> u16 {
        match self {
            Suite::Aes128GcmSha256 => 0x1301,
            Suite::Chacha20Poly1305Sha256 => 0x1303,
        }
    }

    /// Its cipher, as GnuTLS's priority strings name it.
    pub(crate) fn cipher(self) -> &'static str {
        match self {
            Suite::Aes128GcmSha256 => "AES-128-GCM",
            Suite::Chacha20Poly1305Sha256 => "CHACHA20-POLY1305",
        }
    }

    pub(crate) fn from_code(code: u16) -> Option<Suite> {
        Suite::ALL.into_iter().find(|s| s.code() == code)
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128GcmSha256 => &aead::AES_128_GCM,
            Suite::Chacha20Poly1305Sha256 => &aead::CHACHA20_POLY1305,
        }
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> Secret {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

/// HKDF-Extract.
pub(crate) fn extract(salt: &[u8], ikm: &[u8]) -> Secret {
    hmac(salt, &[ikm])
}

/// HKDF-Expand-Label.
pub(crate) fn expand_label(secret: &[u8], label: &str, context: &[u8], len: usize) -> Vec<u8> {
    let mut info = Vec::with_capacity(10 + label.len() + context.len());
    info.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    info.push(u8::try_from(6 + label.len()).unwrap_or(u8::MAX));
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label.as_bytes());
    info.push(u8::try_from(context.len()).unwrap_or(u8::MAX));
    info.extend_from_slice(context);
    let mut out = Vec::with_capacity(len + HASH_LEN);
    let mut block: Vec<u8> = Vec::new();
    let mut counter = 1u8;
    while out.len() < len {
        block = hmac(secret, &[&block, &info, &[counter]]).to_vec();
        out.extend_from_slice(&block);
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    out
}

/// Derive-Secret, from the hash of the messages.
pub(crate) fn derive(secret: &[u8], label: &str, hash: &[u8]) -> Secret {
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(&expand_label(secret, label, hash, HASH_LEN));
    out
}

/// The hash of the handshake so far.
#[derive(Clone)]
pub(crate) struct Transcript(digest::Context);

impl Transcript {
    pub(crate) fn new() -> Transcript {
        Transcript(digest::Context::new(&digest::SHA256))
    }

    pub(crate) fn add(&mut self, message: &[u8]) {
        self.0.update(message);
    }

    pub(crate) fn hash(&self) -> Secret {
        let mut out = [0; HASH_LEN];
        out.copy_from_slice(self.0.clone().finish().as_ref());
        out
    }
}

/// The hash of nothing.
fn empty_hash() -> Secret {
    Transcript::new().hash()
}

/// A Finished message's verify data (also a PSK binder's value).
pub(crate) fn verify_data(base_key: &[u8], hash: &[u8]) -> Secret {
    let finished_key = expand_label(base_key, "finished", &[], HASH_LEN);
    hmac(&finished_key, &[hash])
}

/// The secrets before the key exchange: the PSK's.
pub(crate) struct Early(Secret);

impl Early {
    pub(crate) fn new(psk: &[u8]) -> Early {
        Early(extract(&[0; HASH_LEN], psk))
    }

    /// The binder of a ClientHello whose part before the binders hashes to `hash`.
    pub(crate) fn binder(&self, hash: &[u8]) -> Secret {
        let binder_key = derive(&self.0, "ext binder", &empty_hash());
        verify_data(&binder_key, hash)
    }

    /// The handshake secrets, from the key exchange's shared secret (none for `psk_ke`) and
    /// the hash through ServerHello.
    pub(crate) fn handshake(&self, shared: Option<&[u8]>, hash: &[u8]) -> Handshake {
        let salt = derive(&self.0, "derived", &empty_hash());
        let secret = extract(&salt, shared.unwrap_or(&[0; HASH_LEN]));
        Handshake {
            client: derive(&secret, "c hs traffic", hash),
            server: derive(&secret, "s hs traffic", hash),
            secret,
        }
    }
}

/// The handshake's traffic secrets.
pub(crate) struct Handshake {
    secret: Secret,
    pub(crate) client: Secret,
    pub(crate) server: Secret,
}

impl Handshake {
    /// The application traffic secrets, from the hash through the server's Finished:
    /// (client, server).
    pub(crate) fn application(&self, hash: &[u8]) -> (Secret, Secret) {
        let salt = derive(&self.secret, "derived", &empty_hash());
        let master = extract(&salt, &[0; HASH_LEN]);
        (
            derive(&master, "c ap traffic", hash),
            derive(&master, "s ap traffic", hash),
        )
    }
}

/// One direction's record protection.
pub(crate) struct Protection {
    suite: Suite,
    secret: Secret,
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Protection {
    pub(crate) fn new(suite: Suite, secret: Secret) -> Protection {
        let alg = suite.aead();
        let key_bytes = expand_label(&secret, "key", &[], alg.key_len());
        let mut iv = [0; 12];
        iv.copy_from_slice(&expand_label(&secret, "iv", &[], 12));
        // The length is the algorithm's own: the key cannot be refused.
        let key = aead::UnboundKey::new(alg, &key_bytes).unwrap_or_else(|_| unreachable!());
        Protection {
            suite,
            secret,
            key: aead::LessSafeKey::new(key),
            iv,
            seq: 0,
        }
    }

    /// The next generation of keys (KeyUpdate).
    pub(crate) fn updated(&self) -> Protection {
        let next = derive_len(&self.secret, "traffic upd");
        Protection::new(self.suite, next)
    }

    fn nonce(&mut self) -> aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(n)
    }

    /// Seals `inner` (content and its type) into `out` as one record.
    pub(crate) fn seal(&mut self, inner: &mut Vec<u8>, out: &mut Vec<u8>) {
        let len = inner.len() + self.key.algorithm().tag_len();
        let header = [23, 3, 3, (len >> 8) as u8, len as u8];
        let nonce = self.nonce();
        // Sealing fails only for data longer than the algorithm's limit, far above a record.
        let _ = self
            .key
            .seal_in_place_append_tag(nonce, aead::Aad::from(header), inner);
        out.extend_from_slice(&header);
        out.extend_from_slice(inner);
    }

    /// Opens a record's payload in place; the inner plaintext's length, or `None` when it
    /// does not authenticate.
    pub(crate) fn open(&mut self, header: [u8; 5], payload: &mut [u8]) -> Option<usize> {
        let nonce = self.nonce();
        self.key
            .open_in_place(nonce, aead::Aad::from(header), payload)
            .ok()
            .map(|p| p.len())
    }
}

fn derive_len(secret: &[u8], label: &str) -> Secret {
    let mut out = [0; HASH_LEN];
    out.copy_from_slice(&expand_label(secret, label, &[], HASH_LEN));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8448 section 3 (a simple 1-RTT handshake): the handshake secrets from the
    /// shared secret and the hash through ServerHello.
    #[test]
    fn the_schedule_gives_rfc_8448s_secrets() {
        let shared = unhex(
            "8b d4 05 4f b5 5b 9d 63 fd fb ac f9 f0 4b 9f 0d
             35 e6 d6 3f 53 75 63 ef d4 62 72 90 0f 89 49 2d",
        );
        // No PSK: the early secret is HKDF-Extract(0, 0).
        let early = Early::new(&[0; HASH_LEN]);
        let hash = unhex(
            "86 0c 06 ed c0 78 58 ee 8e 78 f0 e7 42 8c 58 ed
             d6 b4 3f 2c a3 e6 e9 5f 02 ed 06 3c f0 e1 ca d8",
        );
        let hs = early.handshake(Some(&shared), &hash);
        assert_eq!(
            hs.client.to_vec(),
            unhex(
                "b3 ed db 12 6e 06 7f 35 a7 80 b3 ab f4 5e 2d 8f
                 3b 1a 95 07 38 f5 2e 96 00 74 6a 0e 27 a5 5a 21"
            )
        );
        assert_eq!(
            hs.server.to_vec(),
            unhex(
                "b6 7b 7d 69 0c c1 6c 4e 75 e5 42 13 cb 2d 37 b4
                 e9 c9 12 bc de d9 10 5d 42 be fd 59 d3 91 ad 38"
            )
        );
        let p = Protection::new(Suite::Aes128GcmSha256, hs.server);
        assert_eq!(
            expand_label(&p.secret, "key", &[], 16),
            unhex("3f ce 51 60 09 c2 17 27 d0 f2 e4 e8 6e e4 03 bc")
        );
        assert_eq!(p.iv.to_vec(), unhex("5d 31 3e b2 67 12 76 ee 13 00 0b 30"));
    }

    #[test]
    fn a_sealed_record_opens_once() {
        let secret = [7; HASH_LEN];
        for suite in Suite::ALL {
            let mut tx = Protection::new(suite, secret);
            let mut rx = Protection::new(suite, secret);
            let mut out = Vec::new();
            tx.seal(&mut b"hello\x17".to_vec(), &mut out);
            let header: [u8; 5] = out[..5].try_into().unwrap();
            let mut payload = out[5..].to_vec();
            let n = rx.open(header, &mut payload).unwrap();
            assert_eq!(&payload[..n], b"hello\x17");
            // The same record again is out of sequence.
            let mut again = out[5..].to_vec();
            assert_eq!(rx.open(header, &mut again), None);
        }
    }
}
