//! The anti-forensic splitter's merge (LUKS1; QEMU: `crypto/afsplit.c`): a key slot holds
//! `stripes` blocks; all but the last are folded together through a hash diffusion, and the
//! last, XORed with the fold, is the key.

use crate::hash::Hash;

/// Spreads every bit of `block` over all of it: each digest-sized piece is replaced by the
/// hash of its index (big-endian) and itself; a short last piece by a prefix of one.
fn diffuse(hash: Hash, block: &mut [u8]) {
    let n = hash.len();
    for (i, piece) in block.chunks_mut(n).enumerate() {
        let d = hash.digest(&[&(i as u32).to_be_bytes(), piece]);
        let len = piece.len();
        piece.copy_from_slice(&d[..len]);
    }
}

/// The key of `len` bytes that `stripes` blocks of split material hold.
pub(crate) fn merge(hash: Hash, material: &[u8], len: usize, stripes: usize) -> Vec<u8> {
    let mut fold = vec![0u8; len];
    for s in material.chunks(len).take(stripes.saturating_sub(1)) {
        for (f, b) in fold.iter_mut().zip(s) {
            *f ^= b;
        }
        diffuse(hash, &mut fold);
    }
    let last = &material[len * (stripes - 1)..len * stripes];
    fold.iter().zip(last).map(|(f, l)| f ^ l).collect()
}

/// The split material of `key` over `stripes` blocks, with `random` for all but the last
/// (the inverse of [`merge`]).
pub(crate) fn split(hash: Hash, key: &[u8], stripes: usize, random: &[u8]) -> Vec<u8> {
    let len = key.len();
    let mut out = random[..len * (stripes - 1)].to_vec();
    let mut fold = vec![0u8; len];
    for s in out.chunks(len) {
        for (f, b) in fold.iter_mut().zip(s) {
            *f ^= b;
        }
        diffuse(hash, &mut fold);
    }
    out.extend(fold.iter().zip(key).map(|(f, k)| f ^ k));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_undoes_split() {
        let key: Vec<u8> = (0..64).collect();
        let random: Vec<u8> = (0..64 * 9).map(|i| (i * 7 % 251) as u8).collect();
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha512] {
            let material = split(hash, &key, 10, &random);
            assert_eq!(merge(hash, &material, 64, 10), key);
        }
    }
}
