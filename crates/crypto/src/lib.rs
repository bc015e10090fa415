//! Block encryption as QEMU does it (QEMU: `crypto/block-luks.c`, `crypto/afsplit.c`,
//! `crypto/cipher*.c`): LUKS1 volumes, whose header names the cipher, the hash and up to
//! eight key slots, each holding the master key split by the anti-forensic splitter and
//! encrypted with a key derived from a password by PBKDF2.
//!
//! Only well-kept cryptography crates do the work (RustCrypto's `aes`, `pbkdf2`, `hmac`,
//! `sha1`, `sha2`); this crate arranges them as LUKS does. The one mode written here is
//! XTS, so that AES sees a sector's blocks at once (`xts-mode` feeds it one at a time);
//! its tests hold it to `xts-mode`.
//!
//! - `luks.rs`: the header, unlocking a key slot, the master key check;
//! - `af.rs`: the anti-forensic merge;
//! - `amend.rs`: key slots added and erased (`x-blockdev-amend`);
//! - `cipher.rs`: the sector cipher (AES in XTS mode with `plain64` or `plain` IVs);
//! - `xts.rs`: XTS over whole sectors, their blocks pipelined through AES;
//! - `hash.rs`: the hash algorithms a header may name;
//! - `pkcs8.rs`: password-encrypted PKCS #8 private keys (PBES2), as TLS credentials keep them.

mod aes_cbc;
mod af;
mod amend;
mod cipher;
mod hash;
mod luks;
mod pkcs8;
mod xts;

pub use aes_cbc::{AES_BLOCK, aes_cbc_decrypt};
pub use amend::{Secret, SlotChange, Writes, amend_key_slots};
pub use cipher::{SECTOR, SectorCipher};
pub use hash::md5;
pub use luks::{
    CreateOptions, HEADER_LEN, Header, KeySlot, LuksVolume, NewVolume, random, random_uuid,
};
pub use pkcs8::{Pkcs8Error, decrypt_pkcs8};

/// Why a volume cannot be opened, in QEMU's words where it has them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No LUKS magic.
    #[error("Volume is not in LUKS format")]
    NotLuks,
    /// A LUKS version other than 1.
    #[error("Unsupported LUKS version {0}")]
    Version(u16),
    /// A cipher, mode or hash ferrite cannot use.
    #[error("{0}")]
    Unsupported(String),
    /// A header field out of range.
    #[error("LUKS header is damaged: {0}")]
    Damaged(String),
    /// A key slot change refused (`x-blockdev-amend`), in QEMU's words.
    #[error("{0}")]
    Refused(String),
    /// No key slot opens with the password.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
}
