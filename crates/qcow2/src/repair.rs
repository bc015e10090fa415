//! Repair after an unclean shutdown with lazy refcounts (QEMU: `qcow2_check_refcounts`
//! with fixing): every refcount set to what the metadata refers to, through the same
//! parsers opening uses; and persistent bitmaps marked in use before an image is written.

use crate::format::bitmap_dir;
use crate::format::entry::{self, Cluster, OFFSET_MASK};
use crate::format::header::{EXT_BITMAPS, autoclear};
use crate::format::snapshot_table;
use crate::format::{get_be64, read_at};
use crate::meta::Meta;
use crate::meta::overlap::Metadata;
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::collections::HashMap;
use std::io;

/// Clusters an image refers to, with the number of references each should have.
async fn references(file: &Child, m: &mut Meta) -> io::Result<HashMap<u64, u64>> {
    let cs = m.cs();
    let file_len = file.len();
    let mut refs: HashMap<u64, u64> = HashMap::new();
    let add = |refs: &mut HashMap<u64, u64>, off: u64, len: u64| {
        // Offsets and lengths come from the image: an empty or wrapping range refers to
        // nothing, and neither does one reaching a cluster or more past the end of the file
        // (QEMU's check counts that as corruption and skips it; only the last cluster may
        // be partly there). So the work is bounded by the file's size.
        let Some(end) = off.checked_add(len).filter(|_| len > 0) else {
            return;
        };
        if end.saturating_sub(file_len) >= cs {
            return;
        }
        let last = end - 1;
        for c in off / cs..=last / cs {
            *refs.entry(c).or_default() += 1;
        }
    };
    add(&mut refs, 0, cs);
    add(&mut refs, m.h.l1_table_offset, u64::from(m.h.l1_size) * 8);
    add(
        &mut refs,
        m.h.refcount_table_offset,
        u64::from(m.h.refcount_table_clusters) * cs,
    );
    for e in m.reftable.clone() {
        let off = e & !0x1ff;
        if off != 0 {
            add(&mut refs, off, cs);
        }
    }
    let mut l1s = vec![m.l1.clone()];
    // Snapshots: their table and L1 tables.
    if m.h.nb_snapshots > 0 {
        let (snapshots, table_len) = snapshot_table::read(file, &m.h).await?;
        add(&mut refs, m.h.snapshots_offset, table_len);
        for s in &snapshots {
            add(&mut refs, s.l1_offset, u64::from(s.l1_size) * 8);
            l1s.push(snapshot_table::read_l1(file, s).await?);
        }
    }
    let ext = m.h.extended_l2();
    for l1 in l1s {
        for e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            add(&mut refs, l2, cs);
            let t = read_at(file, l2, cs as usize).await?;
            let step = if ext { 2 } else { 1 };
            for i in (0..(cs / 8) as usize).step_by(step) {
                match entry::decode(get_be64(&t, i), m.h.cluster_bits, ext) {
                    Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                        add(&mut refs, host, cs)
                    }
                    Cluster::Compressed { offset, len } => add(&mut refs, offset, len),
                    _ => {}
                }
            }
        }
    }
    // Bitmaps: directory, tables, data.
    if let Some(ext) = m.h.extension(EXT_BITMAPS).map(<[u8]>::to_vec)
        && ext.len() >= 24
        && m.h.autoclear & autoclear::BITMAPS != 0
    {
        add(&mut refs, get_be64(&ext, 2), get_be64(&ext, 1));
        for e in bitmap_dir::read(file, &m.h).await? {
            add(&mut refs, e.table_offset, u64::from(e.table_size) * 8);
            for t in bitmap_dir::read_table(file, &e, cs).await? {
                let d = t & OFFSET_MASK;
                if d != 0 {
                    add(&mut refs, d, cs);
                }
            }
        }
    }
    Ok(refs)
}

/// Sets every refcount to what the metadata says (QEMU's repair of an image left dirty by
/// lazy refcounts): missing references added, leaks dropped.
pub(crate) async fn rebuild_refcounts(file: &Child, m: &mut Meta) -> io::Result<()> {
    let refs = references(file, m).await?;
    let cs = m.cs();
    let last = refs
        .keys()
        .copied()
        .max()
        .unwrap_or(0)
        .max(file.len().div_ceil(cs));
    for c in 0..=last {
        if m.is_refblock(c * cs) {
            continue;
        }
        let want = refs.get(&c).copied().unwrap_or(0);
        let have = m.refcount(file, c).await?;
        if have != want {
            m.set_refcount_value(file, c, want, &refs).await?;
        }
    }
    m.write_back(file, true).await
}

/// Sets the `in_use` flag of every enabled persistent bitmap, in place, the way QEMU does
/// when it opens an image read-write: autoclear bit off, directory, autoclear bit on.
pub(crate) async fn mark_bitmaps_in_use(file: &Child, m: &mut Meta) -> io::Result<()> {
    let Some((dir_off, dir_size)) =
        m.h.extension(EXT_BITMAPS)
            .map(|x| (get_be64(x, 2), get_be64(x, 1)))
    else {
        return Ok(());
    };
    let entries = bitmap_dir::read(file, &m.h).await?;
    if entries.iter().all(|e| e.flags & bitmap_dir::IN_USE != 0) {
        return Ok(());
    }
    let mut dir = Vec::with_capacity(dir_size as usize);
    for e in &entries {
        let mut raw = e.raw.clone();
        raw[12..16].copy_from_slice(&(e.flags | bitmap_dir::IN_USE).to_be_bytes());
        dir.extend_from_slice(&raw);
    }
    m.h.autoclear &= !autoclear::BITMAPS;
    m.write_header(file).await?;
    file.flush().await?;
    m.check_write(file, dir_off, dir.len() as u64, Metadata::BITMAP_DIRECTORY)
        .await?;
    file.write(dir_off, dir, ReqFlags::empty()).await?;
    file.flush().await?;
    m.h.autoclear |= autoclear::BITMAPS;
    m.write_header(file).await?;
    file.flush().await
}
