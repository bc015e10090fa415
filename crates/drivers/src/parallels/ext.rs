//! The format extension of a Parallels image (QEMU: block/parallels-ext.c), read when the
//! image is opened read-only: one cluster the header points to, checksummed (MD5), holding
//! features; the one QEMU knows is a dirty bitmap, whose bits live in clusters its L1
//! table names (0: all clear, 1: all set). Each becomes a read-only bitmap of the node,
//! named by its UUID. QEMU's texts for what it refuses.
//!
//! Beyond QEMU: a granularity that is not a power of two of at least a sector is refused
//! (QEMU aborts on an assertion), and features are never read past the cluster's end
//! (QEMU's count of what is left forgets the features it passed).

use super::{Geometry, SECTOR};
use crate::error::generic;
use ferrite_block::Child;
use ferrite_block::bitmap::DirtyBitmap;
use std::rc::Rc;

const MAGIC: u64 = 0xab23_4cef_23dc_ea87;
const END_OF_FEATURES: u64 = 0;
const DIRTY_BITMAP: u64 = 0x2038_5fae_252c_b34a;
/// The extension's header: magic and checksum.
const EXT_HEADER: usize = 24;
/// A feature's header: magic, flags, data size, padding.
const FEATURE_HEADER: usize = 24;
/// A bitmap feature's fields before its L1 table.
const BITMAP_HEADER: usize = 32;
/// Beyond QEMU (which would try to allocate it): the most bitmap bytes read, enough for a
/// 1 TiB disk at 512-byte granularity, 128 TiB at 64 KiB.
const MAX_BITMAP_BYTES: u64 = 256 << 20;

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

/// The bitmaps of the extension at byte `at` of `file`.
///
/// # Errors
/// QEMU's texts for a damaged or unknown extension.
pub(super) async fn read_bitmaps(
    file: &Child,
    at: u64,
    g: Geometry,
) -> ferrite_block::Result<Vec<Rc<DirtyBitmap>>> {
    let cluster = file.read(at, g.cluster as usize).await.map_err(|e| {
        generic(format!(
            "Failed to read Format Extension cluster: {}",
            ferrite_qapi::os_msg(&e)
        ))
    })?;
    let magic = le64(&cluster, 0);
    if magic != MAGIC {
        return Err(generic(format!(
            "Wrong parallels Format Extension magic: {magic:#x}, expected: {MAGIC:#x}"
        )));
    }
    if ferrite_crypto::md5(&cluster[EXT_HEADER..]) != cluster[8..EXT_HEADER] {
        return Err(generic(
            "Wrong checksum in Format Extension header. Format extension is corrupted.",
        ));
    }
    let mut bitmaps = Vec::new();
    let mut pos = EXT_HEADER;
    loop {
        let remaining = cluster.len() - pos;
        if remaining < FEATURE_HEADER {
            return Err(generic(format!(
                "Can not read feature header, as remaining bytes ({remaining}) in Format \
                 Extension is less than Feature header size ({FEATURE_HEADER})"
            )));
        }
        let (magic, flags) = (le64(&cluster, pos), le64(&cluster, pos + 8));
        let size = le32(&cluster, pos + 16) as usize;
        pos += FEATURE_HEADER;
        if flags != 0 {
            return Err(generic("Flags for extension feature are unsupported"));
        }
        if size > cluster.len() - pos {
            return Err(generic(
                "Feature data_size exceedes Format Extension cluster",
            ));
        }
        match magic {
            END_OF_FEATURES => return Ok(bitmaps),
            DIRTY_BITMAP => {
                let b = read_bitmap(file, &cluster[pos..pos + size], g).await?;
                if bitmaps
                    .iter()
                    .any(|o: &Rc<DirtyBitmap>| o.name() == b.name())
                {
                    return Err(generic(format!("Bitmap already exists: {}", b.name())));
                }
                bitmaps.push(b);
            }
            other => return Err(generic(format!("Unknown feature: {other:#x}"))),
        }
        pos = (pos + size).next_multiple_of(8).min(cluster.len());
    }
}

/// One dirty bitmap feature (QEMU's `parallels_load_bitmap`).
async fn read_bitmap(
    file: &Child,
    data: &[u8],
    g: Geometry,
) -> ferrite_block::Result<Rc<DirtyBitmap>> {
    if data.len() < BITMAP_HEADER {
        return Err(generic(format!(
            "Too small Bitmap Feature area in Parallels Format Extension: {} bytes, \
             expected at least {BITMAP_HEADER} bytes",
            data.len()
        )));
    }
    let sectors = le64(data, 0);
    let granularity = u64::from(le32(data, 24)) * SECTOR;
    let l1_size = le32(data, 28) as usize;
    let disk_sectors = g.size / SECTOR;
    if sectors != disk_sectors {
        return Err(generic(format!(
            "Bitmap size (in sectors) {sectors} differs from disk size in sectors \
             {disk_sectors}"
        )));
    }
    if l1_size * 8 > data.len() - BITMAP_HEADER {
        return Err(generic(
            "Bitmaps feature corrupted: l1 table exceeds extension data_size",
        ));
    }
    if !granularity.is_power_of_two() {
        return Err(generic(format!(
            "Bitmap granularity {granularity} is not a power of 2 of at least 512 bytes"
        )));
    }
    let name = uuid_text(&data[8..24]);
    let bitmap = DirtyBitmap::new(&name, granularity, g.size, true);
    // The bitmap's bytes are whole 64-bit words, as QEMU serializes them.
    let bytes = g.size.div_ceil(granularity * 64) * 8;
    let expected = bytes.div_ceil(g.cluster);
    if l1_size as u64 != expected {
        return Err(generic(format!(
            "Bitmap table size {l1_size} does not correspond to bitmap size and cluster \
             size. Expected {expected}"
        )));
    }
    if bytes > MAX_BITMAP_BYTES {
        return Err(generic(format!(
            "Bitmap of {bytes} bytes is too large (at most {MAX_BITMAP_BYTES})"
        )));
    }
    let mut stored = vec![0u8; bytes as usize];
    for i in 0..l1_size {
        let entry = le64(data, BITMAP_HEADER + 8 * i);
        let from = i * g.cluster as usize;
        let to = (from + g.cluster as usize).min(stored.len());
        match entry {
            0 => {}
            1 => stored[from..to].fill(0xff),
            sector => {
                let at = sector.saturating_mul(SECTOR);
                let part = file.read(at, g.cluster as usize).await.map_err(|e| {
                    generic(format!(
                        "Failed to read bitmap data cluster: {}",
                        ferrite_qapi::os_msg(&e)
                    ))
                })?;
                stored[from..to].copy_from_slice(&part[..to - from]);
            }
        }
    }
    bitmap.load_bytes(&stored);
    bitmap.set_read_only(true);
    Ok(bitmap)
}

/// A UUID as QEMU prints it: its 16 bytes in order, in hex, grouped 4-2-2-2-6.
fn uuid_text(b: &[u8]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::uuid_text;

    #[test]
    fn uuids_print_as_qemu_prints_them() {
        let b: Vec<u8> = (0u8..16).collect();
        assert_eq!(uuid_text(&b), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
