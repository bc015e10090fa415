//! The sector cipher of a volume: AES (128 or 256) in XTS mode, each 512-byte sector's
//! tweak its number (`plain64`, or `plain`: the low 32 bits).

use crate::Error;
use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use xts_mode::Xts128;

/// Sectors are 512 bytes (LUKS1).
pub const SECTOR: usize = 512;

enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// Encrypts and decrypts whole sectors.
pub struct SectorCipher {
    xts: Xts,
    /// `plain`: the tweak is the sector number's low 32 bits.
    plain32: bool,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SectorCipher")
    }
}

impl SectorCipher {
    /// The cipher a header names (`aes` in mode `xts-plain64` or `xts-plain`) with `key`
    /// (32 or 64 bytes: two AES keys).
    ///
    /// # Errors
    /// What ferrite does not support, in words naming it.
    pub fn new(cipher: &str, mode: &str, key: &[u8]) -> Result<SectorCipher, Error> {
        let plain32 = match mode {
            "xts-plain64" => false,
            "xts-plain" => true,
            other => {
                return Err(Error::Unsupported(format!(
                    "Cipher mode '{other}' is not supported by ferrite"
                )));
            }
        };
        if cipher != "aes" {
            return Err(Error::Unsupported(format!(
                "Cipher '{cipher}' is not supported by ferrite"
            )));
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        let bad = |_| Error::Damaged(format!("key of {} bytes", key.len()));
        let xts = match key.len() {
            32 => Xts::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(k1).map_err(bad)?,
                Aes128::new_from_slice(k2).map_err(bad)?,
            ))),
            64 => Xts::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(k1).map_err(bad)?,
                Aes256::new_from_slice(k2).map_err(bad)?,
            ))),
            n => return Err(Error::Damaged(format!("key of {n} bytes"))),
        };
        Ok(SectorCipher { xts, plain32 })
    }

    fn tweak(&self, sector: u64) -> u128 {
        if self.plain32 {
            u128::from(sector as u32)
        } else {
            u128::from(sector)
        }
    }

    /// Decrypts `data` (whole sectors; a partial sector at the end is left as it is)
    /// whose first sector is number `first`.
    pub fn decrypt(&self, data: &mut [u8], first: u64) {
        for (i, s) in data.chunks_exact_mut(SECTOR).enumerate() {
            let tweak = xts_mode::get_tweak_default(self.tweak(first + i as u64));
            match &self.xts {
                Xts::Aes128(x) => x.decrypt_sector(s, tweak),
                Xts::Aes256(x) => x.decrypt_sector(s, tweak),
            }
        }
    }

    /// Encrypts `data` (whole sectors; a partial sector at the end is left as it is)
    /// whose first sector is number `first`.
    pub fn encrypt(&self, data: &mut [u8], first: u64) {
        for (i, s) in data.chunks_exact_mut(SECTOR).enumerate() {
            let tweak = xts_mode::get_tweak_default(self.tweak(first + i as u64));
            match &self.xts {
                Xts::Aes128(x) => x.encrypt_sector(s, tweak),
                Xts::Aes256(x) => x.encrypt_sector(s, tweak),
            }
        }
    }
}
