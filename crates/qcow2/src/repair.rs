//! Repair after an unclean shutdown with lazy refcounts (QEMU: `qcow2_check_refcounts`
//! with fixing): every refcount set to what the metadata refers to, through the same
//! parsers opening uses; and persistent bitmaps marked in use before an image is written.

use crate::format::bitmap_dir;
use crate::format::entry::{self, Cluster, OFFSET_MASK};
use crate::format::header::{EXT_BITMAPS, autoclear, incompat};
use crate::format::snapshot_table;
use crate::format::{get_be64, put_be64, read_at};
use crate::meta::Meta;
use crate::meta::overlap::Metadata;
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::collections::HashMap;
use std::io;

/// The clusters an image refers to, with how many references each should have.
struct References {
    cs: u64,
    file_len: u64,
    count: HashMap<u64, u64>,
}

impl References {
    fn add(&mut self, off: u64, len: u64) {
        // Offsets and lengths come from the image: an empty or wrapping range refers to
        // nothing, and neither does one reaching a cluster or more past the end of the file
        // (QEMU's check counts that as corruption and skips it; only the last cluster may
        // be partly there). So the work is bounded by the file's size.
        let Some(end) = off.checked_add(len).filter(|_| len > 0) else {
            return;
        };
        if end.saturating_sub(self.file_len) >= self.cs {
            return;
        }
        for c in off / self.cs..=(end - 1) / self.cs {
            *self.count.entry(c).or_default() += 1;
        }
    }
}

/// The references of an image; `structure`: whether to count the refcount table and blocks
/// too.
async fn references(file: &Child, m: &mut Meta, structure: bool) -> io::Result<HashMap<u64, u64>> {
    let cs = m.cs();
    let mut refs = References {
        cs,
        file_len: file.len(),
        count: HashMap::new(),
    };
    refs.add(0, cs);
    refs.add(m.h.l1_table_offset, u64::from(m.h.l1_size) * 8);
    if structure {
        refs.add(
            m.h.refcount_table_offset,
            u64::from(m.h.refcount_table_clusters) * cs,
        );
        for &e in m.reftable.iter() {
            let off = e & !0x1ff;
            if off != 0 {
                refs.add(off, cs);
            }
        }
    }
    let mut l1s = vec![m.l1.to_vec()];
    // Snapshots: their table and L1 tables.
    if m.h.nb_snapshots > 0 {
        let (snapshots, table_len) = snapshot_table::read(file, &m.h).await?;
        refs.add(m.h.snapshots_offset, table_len);
        for s in &snapshots {
            refs.add(s.l1_offset, u64::from(s.l1_size) * 8);
            l1s.push(snapshot_table::read_l1(file, s).await?);
        }
    }
    let ext = m.h.extended_l2();
    for l1 in l1s {
        for e in l1 {
            // Only an all-zero entry is unallocated here: QEMU's check follows an entry of
            // reserved bits alone to a table at offset 0.
            if e == 0 {
                continue;
            }
            let l2 = e & OFFSET_MASK;
            refs.add(l2, cs);
            let t = read_at(file, l2, cs as usize).await?;
            let step = if ext { 2 } else { 1 };
            for i in (0..(cs / 8) as usize).step_by(step) {
                match entry::decode(get_be64(&t, i), m.h.cluster_bits, ext) {
                    // An unaligned preallocation is dropped by the repair (QEMU's too).
                    Cluster::Zero { host: Some(host) } if host % cs != 0 => {}
                    Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                        refs.add(host, cs)
                    }
                    Cluster::Compressed { offset, len } => refs.add(offset, len),
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
        refs.add(get_be64(&ext, 2), get_be64(&ext, 1));
        for e in bitmap_dir::read(file, &m.h).await? {
            refs.add(e.table_offset, u64::from(e.table_size) * 8);
            for t in bitmap_dir::read_table(file, &e, cs).await? {
                let d = t & OFFSET_MASK;
                if d != 0 {
                    refs.add(d, cs);
                }
            }
        }
    }
    Ok(refs.count)
}

/// Sets every refcount to what the metadata says (QEMU's repair of an image left dirty by
/// lazy refcounts): missing references added, leaks dropped.
pub(crate) async fn rebuild_refcounts(file: &Child, m: &mut Meta) -> io::Result<()> {
    let all = references(file, m, true).await?;
    let refs = if structure_sound(m, &all, file.len()) {
        mend_in_place(file, m, &all).await?;
        all
    } else {
        let data = references(file, m, false).await?;
        m.rebuild_refcount_structure(file, &data).await?;
        data
    };
    fix_copied_flags(file, m, &refs).await
}

/// Every refcount set to what `refs` says, through the blocks the table has.
async fn mend_in_place(file: &Child, m: &mut Meta, refs: &HashMap<u64, u64>) -> io::Result<()> {
    let cs = m.cs();
    let last = refs
        .keys()
        .copied()
        .max()
        .unwrap_or(0)
        .max(file.len().div_ceil(cs));
    for c in 0..=last {
        // A block the mending itself placed (for a range whose block was missing) counts.
        let want = refs
            .get(&c)
            .copied()
            .unwrap_or(0)
            .max(u64::from(m.is_refblock(c * cs)));
        let have = m.refcount(file, c).await?;
        if have != want {
            m.set_refcount_value(file, c, want, refs).await?;
        }
    }
    m.write_back(file, true).await
}

/// QEMU's repair of L1 and L2 entries: `OFLAG_COPIED` ("written in place") set exactly when
/// the cluster is referenced once, and unaligned preallocated zero clusters made plain. A fix that would land on other metadata fails the
/// repair through the overlap check, as QEMU's does; then the image stays closed to writes.
/// (Clusters of an external data file are not counted here; their entries are left alone.)
async fn fix_copied_flags(file: &Child, m: &mut Meta, refs: &HashMap<u64, u64>) -> io::Result<()> {
    if m.h.incompatible & incompat::DATA_FILE != 0 {
        return Ok(());
    }
    // Snapshots whose L1 tables cannot be where the table says: QEMU's check deletes them,
    // ferrite does not guess; the repair fails and the image stays closed to writes.
    if m.h.nb_snapshots > 0 {
        let (snapshots, _) = snapshot_table::read(file, &m.h).await?;
        let cs = m.cs();
        if snapshots.iter().any(|s| {
            s.l1_offset % cs != 0 || u64::from(s.l1_size) * 8 > crate::format::header::MAX_L1_BYTES
        }) {
            return Err(crate::meta::eio());
        }
    }
    let cs = m.cs();
    let ext = m.h.extended_l2();
    let once = |off: u64| refs.get(&(off / cs)) == Some(&1);
    let with_copied = |e: u64, host: u64| {
        if once(host) {
            e | entry::COPIED
        } else {
            e & !entry::COPIED
        }
    };
    for i in 0..m.l1.len() {
        let e = m.l1[i];
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if with_copied(e, l2) != e {
            m.set_l1(file, i, with_copied(e, l2)).await?;
        }
        if l2 % cs != 0 || l2 >= file.len() {
            continue;
        }
        let mut table = read_at(file, l2, cs as usize).await?;
        let mut changed = false;
        let step = if ext { 2 } else { 1 };
        for k in (0..(cs / 8) as usize).step_by(step) {
            let e = get_be64(&table, k);
            let fixed = match entry::decode(e, m.h.cluster_bits, ext) {
                // QEMU turns an unaligned preallocated zero cluster into a plain one.
                Cluster::Zero { host: Some(host) } if host % cs != 0 => entry::ZERO,
                Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                    with_copied(e, host)
                }
                _ => e,
            };
            if fixed != e {
                put_be64(&mut table, k, fixed);
                changed = true;
            }
        }
        if changed {
            m.check_write(file, l2, cs, Metadata::ACTIVE_L2).await?;
            m.l2.remove(l2);
            file.write(l2, table, ReqFlags::empty()).await?;
        }
    }
    Ok(())
}

/// Whether the refcount table and blocks can be mended in place, as QEMU's check decides:
/// the table inside the file, and every block entry without reserved bits, aligned, inside
/// the file and referenced once (by the table). Otherwise the structure is rebuilt.
fn structure_sound(m: &Meta, refs: &HashMap<u64, u64>, file_len: u64) -> bool {
    let cs = m.cs();
    let end = file_len.next_multiple_of(cs);
    let table = m.h.refcount_table_offset;
    let table_end = table + u64::from(m.h.refcount_table_clusters) * cs;
    let once = |off: u64| refs.get(&(off / cs)) == Some(&1);
    table_end <= end
        && m.reftable.iter().all(|&e| {
            let off = e & !0x1ff;
            e == 0 || (e & 0x1ff == 0 && off % cs == 0 && off < end && once(off))
        })
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
