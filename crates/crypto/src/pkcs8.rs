//! Password-encrypted PKCS #8 private keys (RFC 5958 `EncryptedPrivateKeyInfo`) under PBES2
//! (RFC 8018): PBKDF2 with HMAC-SHA-1, -256 or -512, then AES-128, -192 or -256 in CBC mode.
//! That is what `certtool --to-p8 --password` and `openssl pkcs8 -topk8` write, and what
//! QEMU's `tls-creds-x509` reads with `passwordid`.
//!
//! The DER is read here rather than through a PKCS #8 crate because GnuTLS writes the PRF's
//! algorithm identifier without the NULL parameters, which the RustCrypto `pkcs5` crate
//! refuses; both forms are valid DER for this structure.

use crate::hash::Hash;

/// Why a key could not be decrypted.
#[derive(Debug, PartialEq, Eq)]
pub enum Pkcs8Error {
    /// Not an `EncryptedPrivateKeyInfo` (bad DER, or a structure out of place).
    Malformed,
    /// Encrypted with a scheme this module does not know (its dotted OID).
    Unsupported(String),
    /// Wrong password (the padding or the decrypted structure does not check out).
    WrongPassword,
}

const SEQUENCE: u8 = 0x30;
const OCTET_STRING: u8 = 0x04;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;

const PBES2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0d];
const PBKDF2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0c];
const HMAC_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x07];
const HMAC_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x09];
const HMAC_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x0b];
const AES_CBC_PREFIX: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01];

/// A cursor over DER elements.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element's tag and contents.
    fn next(&mut self) -> Result<(u8, &'a [u8]), Pkcs8Error> {
        let (&tag, rest) = self.0.split_first().ok_or(Pkcs8Error::Malformed)?;
        let (&first, rest) = rest.split_first().ok_or(Pkcs8Error::Malformed)?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return Err(Pkcs8Error::Malformed);
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(Pkcs8Error::Malformed);
        }
        let (body, rest) = rest.split_at(len);
        self.0 = rest;
        Ok((tag, body))
    }

    /// The next element's contents, which must carry `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], Pkcs8Error> {
        match self.next()? {
            (t, body) if t == tag => Ok(body),
            _ => Err(Pkcs8Error::Malformed),
        }
    }

    /// The next element if it carries `tag`.
    fn optional(&mut self, tag: u8) -> Result<Option<&'a [u8]>, Pkcs8Error> {
        if self.0.first() == Some(&tag) {
            self.expect(tag).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A non-negative INTEGER that fits in a `u32`.
    fn small_uint(&mut self) -> Result<u32, Pkcs8Error> {
        let body = self.expect(INTEGER)?;
        let digits = match body {
            [0, rest @ ..] => rest,
            [b, ..] if b & 0x80 != 0 => return Err(Pkcs8Error::Malformed),
            _ => body,
        };
        if body.is_empty() || digits.len() > 4 {
            return Err(Pkcs8Error::Malformed);
        }
        Ok(digits
            .iter()
            .fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
    }
}

/// An OID's dotted form, for errors.
fn dotted(oid: &[u8]) -> String {
    let mut parts = Vec::new();
    let mut value = 0u64;
    for (i, &b) in oid.iter().enumerate() {
        value = (value << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (value / 40).min(2);
                parts.push(first.to_string());
                parts.push((value - first * 40).to_string());
            } else {
                parts.push(value.to_string());
            }
            value = 0;
        } else if i + 1 == oid.len() {
            return "?".into();
        }
    }
    parts.join(".")
}

/// The AES key length of a CBC algorithm identifier's OID.
fn aes_cbc_key_len(oid: &[u8]) -> Option<usize> {
    match oid.strip_prefix(AES_CBC_PREFIX)? {
        [0x02] => Some(16),
        [0x16] => Some(24),
        [0x2a] => Some(32),
        _ => None,
    }
}

/// Decrypts `data` with AES-CBC and strips the PKCS #7 padding.
fn decrypt_padded(key: &[u8], iv: &[u8], mut data: Vec<u8>) -> Result<Vec<u8>, Pkcs8Error> {
    if data.is_empty() || !crate::aes_cbc::aes_cbc_decrypt(key, iv, &mut data) {
        return Err(Pkcs8Error::Malformed);
    }
    let pad = usize::from(*data.last().unwrap_or(&0));
    let body_len = data
        .len()
        .checked_sub(pad)
        .ok_or(Pkcs8Error::WrongPassword)?;
    if pad == 0 || pad > 16 || data[body_len..].iter().any(|&b| usize::from(b) != pad) {
        return Err(Pkcs8Error::WrongPassword);
    }
    data.truncate(body_len);
    Ok(data)
}

/// The DER `PrivateKeyInfo` inside an `EncryptedPrivateKeyInfo` (DER), decrypted with
/// `password`.
///
/// # Errors
/// [`Pkcs8Error`]: malformed input, a scheme other than PBES2/PBKDF2/AES-CBC, or a wrong
/// password.
pub fn decrypt_pkcs8(der: &[u8], password: &[u8]) -> Result<Vec<u8>, Pkcs8Error> {
    let mut info = Der(Der(der).expect(SEQUENCE)?);
    let mut algorithm = Der(info.expect(SEQUENCE)?);
    let encrypted = info.expect(OCTET_STRING)?;
    let scheme = algorithm.expect(OID)?;
    if scheme != PBES2 {
        return Err(Pkcs8Error::Unsupported(dotted(scheme)));
    }
    let mut params = Der(algorithm.expect(SEQUENCE)?);
    let mut kdf = Der(params.expect(SEQUENCE)?);
    let mut cipher = Der(params.expect(SEQUENCE)?);

    let kdf_oid = kdf.expect(OID)?;
    if kdf_oid != PBKDF2 {
        return Err(Pkcs8Error::Unsupported(dotted(kdf_oid)));
    }
    let mut pbkdf2 = Der(kdf.expect(SEQUENCE)?);
    let salt = pbkdf2.expect(OCTET_STRING)?;
    let rounds = pbkdf2.small_uint()?;
    let key_len = if pbkdf2.0.first() == Some(&INTEGER) {
        Some(pbkdf2.small_uint()?)
    } else {
        None
    };
    let hash = match pbkdf2.optional(SEQUENCE)? {
        None => Hash::Sha1,
        Some(prf) => match Der(prf).expect(OID)? {
            HMAC_SHA1 => Hash::Sha1,
            HMAC_SHA256 => Hash::Sha256,
            HMAC_SHA512 => Hash::Sha512,
            other => return Err(Pkcs8Error::Unsupported(dotted(other))),
        },
    };

    let cipher_oid = cipher.expect(OID)?;
    let aes_len =
        aes_cbc_key_len(cipher_oid).ok_or_else(|| Pkcs8Error::Unsupported(dotted(cipher_oid)))?;
    let iv = cipher.expect(OCTET_STRING)?;
    if iv.len() != 16 || rounds == 0 || key_len.is_some_and(|n| n as usize != aes_len) {
        return Err(Pkcs8Error::Malformed);
    }

    let mut key = vec![0u8; aes_len];
    hash.pbkdf2(password, salt, rounds, &mut key);
    let plain = decrypt_padded(&key, iv, encrypted.to_vec())?;
    // A wrong password passes the padding check one time in about 256: the result is then
    // no DER sequence filling the whole buffer.
    let mut whole = Der(&plain);
    match whole.next() {
        Ok((SEQUENCE, _)) if whole.0.is_empty() => Ok(plain),
        _ => Err(Pkcs8Error::WrongPassword),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::Aes256;
    use aes::cipher::block_padding::NoPadding;
    use aes::cipher::{BlockModeEncrypt, KeyIvInit};

    /// An `EncryptedPrivateKeyInfo` of `plain` as GnuTLS writes one (PRF without NULL).
    fn encrypt(plain: &[u8], password: &[u8], hash: Hash, prf: &[u8]) -> Vec<u8> {
        fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            if body.len() < 0x80 {
                v.push(body.len() as u8);
            } else {
                v.extend([0x82, (body.len() >> 8) as u8, body.len() as u8]);
            }
            v.extend_from_slice(body);
            v
        }
        let salt = [7u8; 15];
        let iv = [9u8; 16];
        let mut key = [0u8; 32];
        hash.pbkdf2(password, &salt, 1000, &mut key);
        let pad = 16 - plain.len() % 16;
        let mut data = plain.to_vec();
        data.extend(std::iter::repeat_n(pad as u8, pad));
        let n = data.len();
        cbc::Encryptor::<Aes256>::new_from_slices(&key, &iv)
            .unwrap()
            .encrypt_padded::<NoPadding>(&mut data, n)
            .unwrap();
        let pbkdf2 = [
            tlv(OCTET_STRING, &salt),
            tlv(INTEGER, &[0x03, 0xe8]),
            tlv(SEQUENCE, &tlv(OID, prf)),
        ]
        .concat();
        let kdf = tlv(
            SEQUENCE,
            &[tlv(OID, PBKDF2), tlv(SEQUENCE, &pbkdf2)].concat(),
        );
        let aes = [AES_CBC_PREFIX, &[0x2a]].concat();
        let cipher = tlv(SEQUENCE, &[tlv(OID, &aes), tlv(OCTET_STRING, &iv)].concat());
        let alg = tlv(
            SEQUENCE,
            &[tlv(OID, PBES2), tlv(SEQUENCE, &[kdf, cipher].concat())].concat(),
        );
        tlv(SEQUENCE, &[alg, tlv(OCTET_STRING, &data)].concat())
    }

    #[test]
    fn decrypts_with_the_right_password_only() {
        let plain = [&[SEQUENCE, 40][..], &[1u8; 40]].concat();
        let der = encrypt(&plain, b"pw", Hash::Sha256, HMAC_SHA256);
        assert_eq!(decrypt_pkcs8(&der, b"pw"), Ok(plain.clone()));
        assert_eq!(decrypt_pkcs8(&der, b"nope"), Err(Pkcs8Error::WrongPassword));
        let sha512 = encrypt(&plain, b"pw", Hash::Sha512, HMAC_SHA512);
        assert_eq!(decrypt_pkcs8(&sha512, b"pw"), Ok(plain));
    }

    #[test]
    fn truncated_or_foreign_input_is_an_error_not_a_panic() {
        let plain = [&[SEQUENCE, 20][..], &[1u8; 20]].concat();
        let der = encrypt(&plain, b"pw", Hash::Sha1, HMAC_SHA1);
        for n in 0..der.len() {
            assert!(decrypt_pkcs8(&der[..n], b"pw").is_err());
        }
        let mut md5 = der.clone();
        let at = md5
            .windows(HMAC_SHA1.len())
            .position(|w| w == HMAC_SHA1)
            .unwrap();
        md5[at + HMAC_SHA1.len() - 1] = 0x05;
        assert_eq!(
            decrypt_pkcs8(&md5, b"pw"),
            Err(Pkcs8Error::Unsupported("1.2.840.113549.2.5".into()))
        );
    }
}
