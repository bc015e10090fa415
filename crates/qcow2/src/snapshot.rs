//! Internal snapshots (docs/interop/qcow2.txt "Snapshots"): the snapshot table, and taking
//! and deleting a snapshot of the active L1 table. A snapshot shares every cluster with the
//! image: taking one adds a reference to each L2 table and data cluster and clears COPIED;
//! deleting one drops them and sets COPIED again where a cluster is the image's alone.
//! Refcounts always reach the disk before the snapshot table that needs them, and the table
//! stops naming a snapshot before its references go, so a crash leaks at worst.

use crate::format::entry::{self, COPIED, Cluster, OFFSET_MASK};
use crate::format::snapshot_table::{self, Snapshot, serialize};
use crate::format::{get_be64, read_at};
use crate::meta::overlap::Metadata;
use crate::meta::{FreeKind, Meta};
use ferrite_block::Child;
use ferrite_block::driver::{NewSnapshot, ReqFlags};
use std::io;

/// Adds `delta` to the refcount of every L2 table and data cluster `l1` reaches, noting in
/// `done` each cluster changed (so that a failure part way can be undone).
async fn add_references(
    file: &Child,
    m: &mut Meta,
    l1: &[u64],
    delta: i64,
    done: &mut Vec<u64>,
) -> io::Result<()> {
    let cs = m.cs();
    let ext = m.h.extended_l2();
    for (at, &e) in l1.iter().enumerate() {
        let l2 = m.checked_l2_offset(e, at)?;
        if l2 == 0 {
            continue;
        }
        // A reference past the end of the file is damage: counting it would grow the
        // refcount structures out to it.
        m.check_in_file(file, l2, "L2 table")?;
        let table = read_table(file, m, l2).await?;
        let step = if ext { 2 } else { 1 };
        for (index, i) in (0..(cs / 8) as usize).step_by(step).enumerate() {
            match entry::decode(get_be64(&table, i), m.h.cluster_bits, ext) {
                Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                    m.check_cluster_aligned(host, l2, index as u64)?;
                    m.check_in_file(file, host, "Data cluster")?;
                    m.update_refcount(file, host / cs, delta).await?;
                    done.push(host / cs);
                }
                Cluster::Compressed { offset, len } => {
                    let (first, n) = entry::compressed_clusters(offset, len, cs);
                    m.check_in_file(file, first + (n.max(1) - 1) * cs, "Compressed cluster")?;
                    for c in 0..n {
                        m.update_refcount(file, first / cs + c, delta).await?;
                        done.push(first / cs + c);
                    }
                }
                _ => {}
            }
        }
        m.update_refcount(file, l2 / cs, delta).await?;
        done.push(l2 / cs);
    }
    Ok(())
}

/// Takes back the references `add_references` added before it failed.
async fn undo_references(file: &Child, m: &mut Meta, done: &[u64], delta: i64) {
    for &c in done.iter().rev() {
        let _ = m.update_refcount(file, c, -delta).await;
    }
}

/// An L2 table's bytes, from the cache when it is there (it may be newer than the disk).
async fn read_table(file: &Child, m: &mut Meta, off: u64) -> io::Result<Vec<u8>> {
    match m.l2.bytes(off) {
        Some(b) => Ok(b),
        None => read_at(file, off, m.cs() as usize).await,
    }
}

/// Sets COPIED on the active L1 and L2 entries exactly where the cluster has one reference.
async fn recompute_copied(file: &Child, m: &mut Meta) -> io::Result<()> {
    let cs = m.cs();
    let ext = m.h.extended_l2();
    let per = m.l2_entries();
    for i in 0..m.l1.len() {
        let l2 = m.l1[i] & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let own = m.refcount(file, l2 / cs).await? == 1;
        let want = if own { l2 | COPIED } else { l2 };
        if m.l1[i] != want {
            m.set_l1(file, i, want).await?;
        }
        if !own {
            continue;
        }
        let (table, _) = m.l2_for_write(file, i as u64 * per).await?;
        let bytes = read_table(file, m, table).await?;
        let step = if ext { 2 } else { 1 };
        for (idx, word) in (0..(cs / 8) as usize).step_by(step).enumerate() {
            let e = get_be64(&bytes, word);
            let host = match entry::decode(e, m.h.cluster_bits, ext) {
                Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => host,
                _ => continue,
            };
            let single = m.refcount(file, host / cs).await? == 1;
            let new = if single { e | COPIED } else { e & !COPIED };
            if new != e {
                let bm = if ext { get_be64(&bytes, word + 1) } else { 0 };
                m.set_l2(table, idx, new, bm);
            }
        }
    }
    Ok(())
}

/// Writes `list` as the new snapshot table and points the header to it; the old table's
/// clusters go afterwards.
async fn replace_table(
    file: &Child,
    m: &mut Meta,
    list: &[Snapshot],
    old_len: u64,
) -> io::Result<()> {
    let cs = m.cs();
    let old_off = m.h.snapshots_offset;
    let bytes = serialize(list);
    let new_off = if bytes.is_empty() {
        0
    } else {
        let n = (bytes.len() as u64).div_ceil(cs);
        let off = m.alloc(file, n).await?;
        let mut b = bytes;
        b.resize((n * cs) as usize, 0);
        m.check_write(file, off, b.len() as u64, Metadata::SNAPSHOT_TABLE)
            .await?;
        file.write(off, b, ReqFlags::empty()).await?;
        off
    };
    let table_len = serialize(list).len() as u64;
    m.write_back(file, true).await?;
    m.h.nb_snapshots = list.len() as u32;
    m.h.snapshots_offset = new_off;
    m.snapshots_size = table_len;
    m.snapshot_l1s = list.iter().map(|s| (s.l1_offset, s.l1_size)).collect();
    m.write_header(file).await?;
    file.flush().await?;
    if old_off != 0 && old_len != 0 {
        m.free(old_off, old_len.div_ceil(cs), FreeKind::Other);
    }
    m.write_back(file, true).await
}

/// Takes snapshot `name` of the image as it is now. A failure part way (a refcount that
/// would overflow, an allocation or a write failing) undoes what was done, so the image is
/// left as it was, with a leak at worst (as QEMU leaves it).
pub(crate) async fn create(file: &Child, m: &mut Meta, new: &NewSnapshot) -> io::Result<Snapshot> {
    m.write_back(file, true).await?;
    let (list, old_len) = snapshot_table::read(file, &m.h).await?;
    let before = m.h.nb_snapshots;
    let l1 = m.l1.to_vec();
    let mut added = Vec::new();
    let mut l1_copy = None;
    let r = match add_references(file, m, &l1, 1, &mut added).await {
        Ok(()) => share_and_record(file, m, new, list, old_len, &mut l1_copy).await,
        Err(e) => Err(e),
    };
    // The table names the new snapshot once the header counts it: from then on it stands.
    if r.is_err() && m.h.nb_snapshots == before {
        undo_references(file, m, &added, 1).await;
        if let Some((off, n)) = l1_copy {
            m.free(off, n, FreeKind::Other);
        }
        let _ = recompute_copied(file, m).await;
        let _ = m.write_back(file, true).await;
    }
    r
}

/// The rest of [`create`] once the references are taken: the active entries lose COPIED,
/// the snapshot gets its copy of the L1 table (noted in `l1_copy`), and the table names it.
async fn share_and_record(
    file: &Child,
    m: &mut Meta,
    new: &NewSnapshot,
    mut list: Vec<Snapshot>,
    old_len: u64,
    l1_copy: &mut Option<(u64, u64)>,
) -> io::Result<Snapshot> {
    let cs = m.cs();
    // Every active entry is shared now.
    let per = m.l2_entries();
    let ext = m.h.extended_l2();
    for i in 0..m.l1.len() {
        let l2 = m.l1[i] & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        let bytes = read_table(file, m, l2).await?;
        if m.l2.bytes(l2).is_none() {
            // Bring it into the cache to change it there.
            let _ = m.l2_entry(file, i as u64 * per).await?;
        }
        let step = if ext { 2 } else { 1 };
        for (idx, word) in (0..(cs / 8) as usize).step_by(step).enumerate() {
            let e = get_be64(&bytes, word);
            if e & COPIED != 0 {
                let bm = if ext { get_be64(&bytes, word + 1) } else { 0 };
                m.set_l2(l2, idx, e & !COPIED, bm);
            }
        }
        m.set_l1(file, i, l2).await?;
    }
    // The snapshot's own copy of the L1 table.
    let l1_bytes: Vec<u8> = m.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    let l1_clusters = (l1_bytes.len() as u64).div_ceil(cs).max(1);
    let l1_offset = m.alloc(file, l1_clusters).await?;
    *l1_copy = Some((l1_offset, l1_clusters));
    let mut padded = l1_bytes;
    padded.resize((l1_clusters * cs) as usize, 0);
    m.check_write(file, l1_offset, padded.len() as u64, Metadata::INACTIVE_L1)
        .await?;
    file.write(l1_offset, padded, ReqFlags::empty()).await?;
    let id = list
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let mut extra = Vec::with_capacity(24);
    extra.extend_from_slice(&new.vm_state_size.to_be_bytes());
    extra.extend_from_slice(&m.h.size.to_be_bytes());
    extra.extend_from_slice(&u64::MAX.to_be_bytes());
    let snap = Snapshot {
        l1_offset,
        l1_size: m.l1.len() as u32,
        id: id.to_string(),
        name: new.name.clone(),
        date_sec: new.date_sec,
        date_nsec: new.date_nsec,
        vm_clock_nsec: new.vm_clock_nsec,
        vm_state_size: new.vm_state_size,
        extra,
    };
    list.push(snap.clone());
    replace_table(file, m, &list, old_len).await?;
    Ok(snap)
}

/// Deletes the snapshot with `id` and/or `name`; `None` if there is none.
pub(crate) async fn delete(
    file: &Child,
    m: &mut Meta,
    id: Option<&str>,
    name: Option<&str>,
) -> io::Result<Option<Snapshot>> {
    let cs = m.cs();
    m.write_back(file, true).await?;
    let (mut list, old_len) = snapshot_table::read(file, &m.h).await?;
    let Some(pos) = list
        .iter()
        .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
    else {
        return Ok(None);
    };
    let snap = list.remove(pos);
    // The table stops naming it first; then its references go.
    replace_table(file, m, &list, old_len).await?;
    let raw = read_at(file, snap.l1_offset, snap.l1_size as usize * 8).await?;
    let l1: Vec<u64> = (0..snap.l1_size as usize)
        .map(|i| get_be64(&raw, i))
        .collect();
    // Past the table's change a failure here only leaks: nothing to undo.
    add_references(file, m, &l1, -1, &mut Vec::new()).await?;
    let l1_clusters = (u64::from(snap.l1_size) * 8).div_ceil(cs).max(1);
    m.free(snap.l1_offset, l1_clusters, FreeKind::Other);
    m.write_back(file, true).await?;
    recompute_copied(file, m).await?;
    m.write_back(file, true).await?;
    Ok(Some(snap))
}

/// Makes the active image what snapshot `id_or_name` (an ID first, then a name) holds, as
/// QEMU's `qcow2_snapshot_goto` does: the snapshot's clusters gain a reference before the
/// active L1 table is overwritten with its copy, and the old active clusters lose theirs
/// after. `None` if there is no such snapshot. The caller resizes the image first where the
/// snapshot's disk size differs ([`Snapshot::disk_size`]).
pub(crate) async fn goto(
    file: &Child,
    m: &mut Meta,
    id_or_name: &str,
) -> io::Result<Option<Snapshot>> {
    let cs = m.cs();
    m.write_back(file, true).await?;
    let (list, _) = snapshot_table::read(file, &m.h).await?;
    let Some(snap) = list
        .iter()
        .find(|s| s.id == id_or_name)
        .or_else(|| list.iter().find(|s| s.name == id_or_name))
        .cloned()
    else {
        return Ok(None);
    };
    if snap.l1_offset % cs != 0 || snap.l1_offset == 0 {
        return Err(snapshot_table::invalid());
    }
    let mut l1 = snapshot_table::read_l1(file, &snap).await?;
    if l1.len() > m.l1.len() {
        m.grow_l1(file, l1.len() as u64).await?;
    }
    l1.resize(m.l1.len(), 0);
    let mut added = Vec::new();
    if let Err(e) = add_references(file, m, &l1, 1, &mut added).await {
        undo_references(file, m, &added, 1).await;
        return Err(e);
    }
    let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    let at = m.h.l1_table_offset;
    // The new references reach the disk before the table that needs them.
    m.write_back(file, true).await?;
    m.check_write(file, at, bytes.len() as u64, Metadata::ACTIVE_L1)
        .await?;
    file.write(at, bytes, ReqFlags::empty()).await?;
    file.flush().await?;
    // The disk names the snapshot's tables now: the old ones lose the active reference.
    let old = m.l1.replace(l1);
    add_references(file, m, &old, -1, &mut Vec::new()).await?;
    m.write_back(file, true).await?;
    // Tables freed above may come back as anything: no cached copy may answer for them.
    m.drop_clean_tables();
    recompute_copied(file, m).await?;
    m.write_back(file, true).await?;
    Ok(Some(snap))
}
