//! AES in CBC mode over one whole message, the way password-encrypted PKCS #8 keys and
//! QEMU's encrypted `secret` objects are encrypted (the padding is each caller's own).

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockCipherDecrypt, BlockModeDecrypt, KeyIvInit};
use aes::{Aes128, Aes192, Aes256};

/// The cipher's block size, and the length of its IV.
pub const AES_BLOCK: usize = 16;

/// Decrypts `data` in place with AES-128, -192 or -256 (by the key's length) in CBC mode,
/// leaving any padding in place. False, with `data` untouched, for a key of another
/// length, an IV of another length than [`AES_BLOCK`], or data that is not whole blocks.
pub fn aes_cbc_decrypt(key: &[u8], iv: &[u8], data: &mut [u8]) -> bool {
    fn run<C>(key: &[u8], iv: &[u8], data: &mut [u8]) -> bool
    where
        cbc::Decryptor<C>: KeyIvInit + BlockModeDecrypt,
        C: BlockCipherDecrypt,
    {
        cbc::Decryptor::<C>::new_from_slices(key, iv)
            .is_ok_and(|d| d.decrypt_padded::<NoPadding>(data).is_ok())
    }
    if iv.len() != AES_BLOCK || data.len() % AES_BLOCK != 0 {
        return false;
    }
    match key.len() {
        16 => run::<Aes128>(key, iv, data),
        24 => run::<Aes192>(key, iv, data),
        32 => run::<Aes256>(key, iv, data),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decrypts_the_nist_cbc_aes256_vector() {
        // NIST SP 800-38A, F.2.6 (CBC-AES256.Decrypt), first block.
        let key = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
        let iv = hex("000102030405060708090a0b0c0d0e0f");
        let mut data = hex("f58c4c04d6e5f1ba779eabfb5f7bfbd6");
        assert!(aes_cbc_decrypt(&key, &iv, &mut data));
        assert_eq!(data, hex("6bc1bee22e409f96e93d7e117393172a"));
    }

    #[test]
    fn refuses_partial_blocks_and_odd_keys() {
        let mut data = vec![1u8; 15];
        assert!(!aes_cbc_decrypt(&[0; 32], &[0; 16], &mut data));
        assert_eq!(data, vec![1u8; 15]);
        assert!(!aes_cbc_decrypt(&[0; 31], &[0; 16], &mut [0; 16]));
        assert!(!aes_cbc_decrypt(&[0; 32], &[0; 15], &mut [0; 16]));
        assert!(aes_cbc_decrypt(&[0; 32], &[0; 16], &mut []));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
