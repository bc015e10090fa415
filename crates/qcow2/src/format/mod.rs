//! The on-disk structures of qcow2 (docs/interop/qcow2.txt), each with one parser that
//! refuses what exceeds QEMU's limits: the header and its extensions, L1/L2 entries, the
//! snapshot table, the bitmap directory. Opening, the request paths and repair all read
//! them through these, so a size field from a damaged image sizes no buffer unchecked.

pub(crate) mod bitmap_dir;
pub(crate) mod entry;
pub(crate) mod header;
pub(crate) mod snapshot_table;

use ferrite_block::Child;
use std::io;

/// Reads `len` bytes at `offset` of `file`, past its end as zeroes (as every child read
/// does: [`Child::read`]).
pub(crate) async fn read_at(file: &Child, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    file.read(offset, len).await
}

/// Big-endian 64-bit word `i` of `b`.
pub(crate) fn get_be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
}

/// Sets big-endian 64-bit word `i` of `b`.
pub(crate) fn put_be64(b: &mut [u8], i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}
