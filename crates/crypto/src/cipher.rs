//! The sector cipher of a volume: AES (128 or 256) in XTS mode, each 512-byte sector's
//! tweak its number (`plain64`, or `plain`: the low 32 bits), or in CBC mode with each
//! sector's IV its number (`plain64`, `plain`) or that number encrypted with a hash of the
//! key (`essiv:sha256`), the modes LUKS1 volumes name.

use crate::Error;
use crate::xts::Xts as Xts128;
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockCipherEncrypt, BlockModeDecrypt, BlockModeEncrypt, KeyInit, KeyIvInit};
use aes::{Aes128, Aes256};
use sha2::Digest;

/// Sectors are 512 bytes (LUKS1).
pub const SECTOR: usize = 512;

enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// The key of a CBC volume (a new chain starts at every sector).
enum CbcKey {
    Aes128(Vec<u8>),
    Aes256(Vec<u8>),
}

/// How a sector's IV (or tweak) comes from its number.
enum IvGen {
    /// The low 32 bits.
    Plain,
    /// All 64.
    Plain64,
    /// The 64-bit number encrypted with SHA-256 of the key (ESSIV).
    Essiv(Box<Aes256>),
}

enum Mode {
    Xts(Xts),
    Cbc(CbcKey),
}

/// Encrypts and decrypts whole sectors.
pub struct SectorCipher {
    mode: Mode,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher")
    }
}

impl SectorCipher {
    /// The cipher a header names (`aes` in mode `xts-plain64`, `xts-plain`, `cbc-plain64`,
    /// `cbc-plain` or `cbc-essiv:sha256`) with `key` (XTS: 32 or 64 bytes, two AES keys;
    /// CBC: 16 or 32).
    ///
    /// # Errors
    /// What ferrite does not support, in words naming it.
    pub fn new(cipher: &str, mode: &str, key: &[u8]) -> Result<SectorCipher, Error> {
        if cipher != "aes" {
            return Err(Error::Unsupported(format!(
                "Cipher '{cipher}' is not supported by ferrite"
            )));
        }
        let unsupported =
            || Error::Unsupported(format!("Cipher mode '{mode}' is not supported by ferrite"));
        let (chaining, ivgen) = mode.split_once('-').ok_or_else(unsupported)?;
        let ivgen = match ivgen {
            "plain64" => IvGen::Plain64,
            "plain" => IvGen::Plain,
            "essiv:sha256" => {
                let digest = sha2::Sha256::digest(key);
                IvGen::Essiv(Box::new(
                    Aes256::new_from_slice(&digest).map_err(|_| unsupported())?,
                ))
            }
            _ => return Err(unsupported()),
        };
        let bad = |_| Error::Damaged(format!("key of {} bytes", key.len()));
        let mode = match (chaining, key.len()) {
            ("xts", 32 | 64) => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(if key.len() == 32 {
                    Xts::Aes128(Box::new(Xts128::new(
                        Aes128::new_from_slice(k1).map_err(bad)?,
                        Aes128::new_from_slice(k2).map_err(bad)?,
                    )))
                } else {
                    Xts::Aes256(Box::new(Xts128::new(
                        Aes256::new_from_slice(k1).map_err(bad)?,
                        Aes256::new_from_slice(k2).map_err(bad)?,
                    )))
                })
            }
            ("cbc", 16) => Mode::Cbc(CbcKey::Aes128(key.to_vec())),
            ("cbc", 32) => Mode::Cbc(CbcKey::Aes256(key.to_vec())),
            ("xts" | "cbc", n) => return Err(Error::Damaged(format!("key of {n} bytes"))),
            _ => return Err(unsupported()),
        };
        Ok(SectorCipher { mode, ivgen })
    }

    /// Sector `sector`'s IV (CBC) or tweak (XTS), as 16 little-endian bytes.
    fn iv(&self, sector: u64) -> [u8; 16] {
        let n = match self.ivgen {
            IvGen::Plain => u64::from(sector as u32),
            IvGen::Plain64 | IvGen::Essiv(_) => sector,
        };
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&n.to_le_bytes());
        if let IvGen::Essiv(c) = &self.ivgen {
            c.encrypt_block((&mut iv).into());
        }
        iv
    }

    /// Decrypts `data` (whole sectors; a partial sector at the end is left as it is)
    /// whose first sector is number `first`.
    pub fn decrypt(&self, data: &mut [u8], first: u64) {
        for (i, s) in data.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                Mode::Xts(Xts::Aes128(x)) => x.decrypt_sector(s, iv),
                Mode::Xts(Xts::Aes256(x)) => x.decrypt_sector(s, iv),
                // Whole blocks without padding cannot fail.
                Mode::Cbc(CbcKey::Aes128(k)) => {
                    if let Ok(d) = cbc::Decryptor::<Aes128>::new_from_slices(k, &iv) {
                        let _ = d.decrypt_padded::<NoPadding>(s);
                    }
                }
                Mode::Cbc(CbcKey::Aes256(k)) => {
                    if let Ok(d) = cbc::Decryptor::<Aes256>::new_from_slices(k, &iv) {
                        let _ = d.decrypt_padded::<NoPadding>(s);
                    }
                }
            }
        }
    }

    /// Encrypts `data` (whole sectors; a partial sector at the end is left as it is)
    /// whose first sector is number `first`.
    pub fn encrypt(&self, data: &mut [u8], first: u64) {
        for (i, s) in data.chunks_exact_mut(SECTOR).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                Mode::Xts(Xts::Aes128(x)) => x.encrypt_sector(s, iv),
                Mode::Xts(Xts::Aes256(x)) => x.encrypt_sector(s, iv),
                Mode::Cbc(CbcKey::Aes128(k)) => {
                    if let Ok(e) = cbc::Encryptor::<Aes128>::new_from_slices(k, &iv) {
                        let _ = e.encrypt_padded::<NoPadding>(s, SECTOR);
                    }
                }
                Mode::Cbc(CbcKey::Aes256(k)) => {
                    if let Ok(e) = cbc::Encryptor::<Aes256>::new_from_slices(k, &iv) {
                        let _ = e.encrypt_padded::<NoPadding>(s, SECTOR);
                    }
                }
            }
        }
    }
}
