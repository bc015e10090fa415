//! XTS (IEEE 1619) over whole sectors of whole 16-byte blocks, which is all LUKS1 asks
//! (512-byte sectors: no ciphertext stealing). The `xts-mode` crate runs AES one block at a
//! time, so each block waits for the one before it to leave the AES unit; here the tweaks of
//! a sector are worked out first and its 32 blocks go to AES together, which the `aes`
//! crate pipelines (AES-NI, VAES): several times the throughput on the same key schedule.
//! Tests hold it to `xts-mode` on random keys, tweaks and data.

use aes::Block;
use aes::cipher::array::Array;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, BlockSizeUser, consts::U16};

/// The two keys of an XTS volume: one for the data, one that turns each sector's IV into
/// its first tweak.
pub(crate) struct Xts<C> {
    data: C,
    tweak: C,
}

/// Blocks in a LUKS1 sector.
const BLOCKS: usize = crate::SECTOR / 16;

impl<C> Xts<C>
where
    C: BlockCipherEncrypt + BlockCipherDecrypt + BlockSizeUser<BlockSize = U16>,
{
    pub(crate) fn new(data: C, tweak: C) -> Xts<C> {
        Xts { data, tweak }
    }

    /// Encrypts one sector (`SECTOR` bytes) whose IV is `iv`.
    pub(crate) fn encrypt_sector(&self, sector: &mut [u8], iv: [u8; 16]) {
        self.sector(sector, iv, |blocks| self.data.encrypt_blocks(blocks));
    }

    /// Decrypts one sector (`SECTOR` bytes) whose IV is `iv`.
    pub(crate) fn decrypt_sector(&self, sector: &mut [u8], iv: [u8; 16]) {
        self.sector(sector, iv, |blocks| self.data.decrypt_blocks(blocks));
    }

    /// Each block `P` becomes `cipher(P ^ T) ^ T`, `T` its tweak: the first the encrypted
    /// IV, each next the one before times x in GF(2^128).
    fn sector(&self, sector: &mut [u8], iv: [u8; 16], cipher: impl FnOnce(&mut [Block])) {
        let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(sector);
        debug_assert!(rest.is_empty() && blocks.len() == BLOCKS);
        let mut t = Block::from(iv);
        self.tweak.encrypt_block(&mut t);
        let mut t = u128::from_le_bytes(t.into());
        let mut tweaks = [0u128; BLOCKS];
        for (b, tw) in blocks.iter_mut().zip(tweaks.iter_mut()) {
            *tw = t;
            xor(b, t);
            t = (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 };
        }
        cipher(blocks);
        for (b, &tw) in blocks.iter_mut().zip(tweaks.iter()) {
            xor(b, tw);
        }
    }
}

fn xor(b: &mut Block, t: u128) {
    let v = u128::from_le_bytes((*b).into()) ^ t;
    *b = Block::from(v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::KeyInit;
    use aes::{Aes128, Aes256};

    /// A small deterministic generator (xorshift), enough for test inputs.
    fn bytes(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                *seed as u8
            })
            .collect()
    }

    fn same_as_xts_mode<C>(key_len: usize)
    where
        C: BlockCipherEncrypt
            + BlockCipherDecrypt
            + BlockSizeUser<BlockSize = U16>
            + KeyInit
            + Clone,
    {
        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ key_len as u64;
        for _ in 0..64 {
            let key = bytes(&mut seed, 2 * key_len);
            let (k1, k2) = key.split_at(key_len);
            let c1 = C::new_from_slice(k1).unwrap();
            let c2 = C::new_from_slice(k2).unwrap();
            let ours = Xts::new(c1.clone(), c2.clone());
            let theirs = xts_mode::Xts128::new(c1, c2);
            let iv: [u8; 16] = bytes(&mut seed, 16).try_into().unwrap();
            let plain = bytes(&mut seed, crate::SECTOR);
            let (mut a, mut b) = (plain.clone(), plain.clone());
            ours.encrypt_sector(&mut a, iv);
            theirs.encrypt_sector(&mut b, iv.into());
            assert_eq!(a, b);
            ours.decrypt_sector(&mut a, iv);
            assert_eq!(a, plain);
        }
    }

    #[test]
    fn aes128_matches_xts_mode() {
        same_as_xts_mode::<Aes128>(16);
    }

    #[test]
    fn aes256_matches_xts_mode() {
        same_as_xts_mode::<Aes256>(32);
    }
}
