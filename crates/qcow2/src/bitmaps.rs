//! Persistent dirty bitmaps in a qcow2 image (the bitmaps extension, docs/interop/qcow2.txt
//! "Bitmaps"): loaded at open, marked in use while the image is open read-write, stored
//! back and marked clean at close, in QEMU's order (new data, tables and directory first,
//! then the header switches to them, then the old clusters are freed).

use crate::format::bitmap_dir::{
    self, AUTO, BitmapError, Entry, IN_USE, TABLE_ALL_ONES, TABLE_OFFSET,
};
use crate::format::header::{EXT_BITMAPS, autoclear};
use crate::format::{get_be64, put_be64, read_at};
use crate::meta::overlap::Metadata;
use crate::meta::{FreeKind, Meta};
use ferrite_block::Child;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::driver::ReqFlags;
use std::io;
use std::rc::Rc;

/// The bitmaps stored in the image: those left in use by a writer that did not close them
/// come back inconsistent (empty, only removable), the others with their bits. An image
/// whose bitmaps break QEMU's rules is refused, as QEMU refuses it: loading a damaged bitmap
/// as clean would let an incremental backup miss data.
pub(crate) async fn load(file: &Child, m: &mut Meta) -> Result<Vec<Rc<DirtyBitmap>>, BitmapError> {
    // Bitmaps cover the node's length: whole sectors, as in QEMU.
    let size = m.h.size & !511;
    let cs = m.cs();
    let mut out = Vec::new();
    for e in bitmap_dir::read(file, &m.h).await? {
        let b = DirtyBitmap::new(&e.name, 1 << e.granularity_bits, size, e.flags & AUTO != 0);
        b.set_persistent(true);
        if e.flags & IN_USE != 0 {
            b.set_inconsistent(true);
        } else {
            let table = bitmap_dir::read_table(file, &e, cs).await?;
            let data_error = |error| BitmapError::ReadData {
                name: e.name.clone(),
                error,
            };
            let bytes_needed = size.div_ceil(b.granularity()).div_ceil(8);
            if u64::from(e.table_size) != bytes_needed.div_ceil(cs) {
                return Err(data_error(io::Error::from_raw_os_error(libc::EINVAL)));
            }
            let mut bytes = Vec::with_capacity((bytes_needed.div_ceil(cs) * cs) as usize);
            for t in table {
                let host = t & TABLE_OFFSET;
                if host == 0 {
                    let fill = if t & TABLE_ALL_ONES != 0 { 0xff } else { 0 };
                    bytes.resize(bytes.len() + cs as usize, fill);
                } else {
                    bytes.extend_from_slice(
                        &read_at(file, host, cs as usize).await.map_err(data_error)?,
                    );
                }
            }
            bytes.truncate(bytes_needed as usize);
            b.load_bytes(&bytes);
        }
        out.push(b);
    }
    // The node lists the newest first; the directory has the oldest first.
    out.reverse();
    Ok(out)
}

/// The clusters an entry's bitmap occupies (its table and data clusters).
async fn clusters_of(file: &Child, cs: u64, e: &Entry) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    if e.table_offset == 0 || e.table_size == 0 {
        return Ok(out);
    }
    let table = read_at(file, e.table_offset, e.table_size as usize * 8).await?;
    for k in 0..e.table_size as usize {
        let host = get_be64(&table, k) & TABLE_OFFSET;
        if host != 0 {
            out.push((host, 1));
        }
    }
    out.push((e.table_offset, (u64::from(e.table_size) * 8).div_ceil(cs)));
    Ok(out)
}

/// Writes one bitmap's data and table; returns its directory entry.
async fn store_one(file: &Child, m: &mut Meta, b: &DirtyBitmap) -> io::Result<Vec<u8>> {
    let cs = m.cs();
    let bytes = b.to_bytes();
    let clusters = (bytes.len() as u64).div_ceil(cs);
    let mut table = vec![0u8; (clusters * 8).div_ceil(cs).max(1) as usize * cs as usize];
    for k in 0..clusters as usize {
        let from = k * cs as usize;
        let mut chunk = bytes[from..bytes.len().min(from + cs as usize)].to_vec();
        if ferrite_block::io::is_zero(&chunk) {
            continue;
        }
        chunk.resize(cs as usize, 0);
        let host = m.alloc(file, 1).await?;
        m.check_data(file, host, cs).await?;
        file.write(host, chunk, ReqFlags::empty()).await?;
        put_be64(&mut table, k, host);
    }
    let table_clusters = (clusters * 8).div_ceil(cs).max(1);
    let table_offset = m.alloc(file, table_clusters).await?;
    // Only the entries are written, as QEMU writes them (the file ends where they do).
    table.truncate((clusters * 8).max(8) as usize);
    m.check_data(file, table_offset, table.len() as u64).await?;
    file.write(table_offset, table, ReqFlags::empty()).await?;
    let name = b.name().as_bytes();
    let mut e = vec![0u8; 24];
    e[0..8].copy_from_slice(&table_offset.to_be_bytes());
    e[8..12].copy_from_slice(&(clusters as u32).to_be_bytes());
    let flags = if b.is_enabled() { AUTO } else { 0 };
    e[12..16].copy_from_slice(&flags.to_be_bytes());
    e[16] = 1;
    e[17] = b.granularity().trailing_zeros() as u8;
    e[18..20].copy_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(name);
    e.resize(e.len().next_multiple_of(8), 0);
    Ok(e)
}

/// Takes bitmap `name` out of the image's directory and frees its clusters; the others stay
/// as they are on disk (flags included). A new directory is written before the header
/// points to it, as in [`store`].
pub(crate) async fn remove_entry(file: &Child, m: &mut Meta, name: &str) -> io::Result<()> {
    let entries = bitmap_dir::read(file, &m.h)
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let Some(victim) = entries.iter().find(|e| e.name == name) else {
        return Ok(());
    };
    let rest: Vec<&Entry> = entries.iter().filter(|e| e.name != name).collect();
    let dir: Vec<u8> = rest.iter().flat_map(|e| e.raw.iter().copied()).collect();
    replace_directory(file, m, dir, rest.len() as u32, &[victim]).await?;
    refresh_info(file, m).await;
    Ok(())
}

/// Reads the image's bitmap directory again for queries (`bitmaps` in the format-specific
/// information), after it was written.
pub(crate) async fn refresh_info(file: &Child, m: &mut Meta) {
    let entries = bitmap_dir::read(file, &m.h).await.unwrap_or_default();
    m.bitmap_info = entries
        .into_iter()
        .map(|e| (e.name, 1u64 << e.granularity_bits, e.flags))
        .collect();
}

/// Stores the node's persistent bitmaps and drops the ones it no longer has; the image's
/// bitmaps are then clean (not in use). Inconsistent and migrating bitmaps stay as they
/// were on disk.
pub(crate) async fn store(
    file: &Child,
    m: &mut Meta,
    bitmaps: &[Rc<DirtyBitmap>],
) -> io::Result<()> {
    let old = bitmap_dir::read(file, &m.h).await.unwrap_or_default();
    // QEMU's order: bitmaps the directory already has keep their place, new ones follow
    // newest first.
    let mut persistent: Vec<&Rc<DirtyBitmap>> = old
        .iter()
        .filter_map(|e| {
            bitmaps
                .iter()
                .find(|b| b.name() == e.name && b.is_persistent())
        })
        .collect();
    for b in bitmaps.iter().filter(|b| b.is_persistent()) {
        if !persistent.iter().any(|p| Rc::ptr_eq(p, b)) {
            persistent.push(b);
        }
    }
    if old.is_empty() && persistent.is_empty() {
        return Ok(());
    }
    let mut dir = Vec::new();
    let mut kept = Vec::new();
    for b in &persistent {
        // A migrating bitmap is stored by the destination: the image keeps its copy.
        if b.is_inconsistent() || !b.is_stored() {
            if let Some(e) = old.iter().find(|e| e.name == b.name()) {
                dir.extend_from_slice(&e.raw);
                kept.push(e.name.clone());
            }
            continue;
        }
        dir.extend(store_one(file, m, b).await?);
    }
    let count = persistent
        .iter()
        .filter(|b| (!b.is_inconsistent() && b.is_stored()) || kept.iter().any(|k| k == b.name()))
        .count() as u32;
    let freed: Vec<&Entry> = old.iter().filter(|e| !kept.contains(&e.name)).collect();
    replace_directory(file, m, dir, count, &freed).await
}

/// Makes `dir` (`count` entries) the image's bitmap directory: written to new clusters and
/// counted before the header points to it, then the old directory's clusters and those of
/// the `freed` bitmaps go. An empty directory removes the extension.
async fn replace_directory(
    file: &Child,
    m: &mut Meta,
    dir: Vec<u8>,
    count: u32,
    freed: &[&Entry],
) -> io::Result<()> {
    let cs = m.cs();
    let old_dir =
        m.h.extension(EXT_BITMAPS)
            .map(|x| (get_be64(x, 2), get_be64(x, 1)));
    if count == 0 {
        m.h.set_extension(EXT_BITMAPS, None);
        m.h.autoclear &= !autoclear::BITMAPS;
    } else {
        let dir_len = dir.len() as u64;
        let dir_offset = m.alloc(file, dir_len.div_ceil(cs)).await?;
        m.check_write(file, dir_offset, dir_len, Metadata::BITMAP_DIRECTORY)
            .await?;
        file.write(dir_offset, dir, ReqFlags::empty()).await?;
        let mut ext = vec![0u8; 24];
        ext[0..4].copy_from_slice(&count.to_be_bytes());
        put_be64(&mut ext, 1, dir_len);
        put_be64(&mut ext, 2, dir_offset);
        m.h.set_extension(EXT_BITMAPS, Some(ext));
        m.h.autoclear |= autoclear::BITMAPS;
    }
    m.write_back(file, true).await?;
    m.write_header(file).await?;
    file.flush().await?;
    for e in freed {
        for (host, n) in clusters_of(file, cs, e).await.unwrap_or_default() {
            m.free(host, n, FreeKind::Other);
        }
    }
    if let Some((off, len)) = old_dir
        && off != 0
        && len != 0
    {
        m.free(off, len.div_ceil(cs), FreeKind::Other);
    }
    m.write_back(file, true).await
}
