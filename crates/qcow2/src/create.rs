//! Making and mending images: formatting a new image (blockdev-create), rebuilding the
//! refcounts of an image left dirty (lazy refcounts), and marking persistent bitmaps in use.

use super::entry::{self, Cluster, OFFSET_MASK};
use super::header::{
    self, EXT_BACKING_FORMAT, EXT_BITMAPS, EXT_DATA_FILE, EXT_FEATURE_TABLE, Header,
};
use super::meta::{Meta, get_be64, put_be64, read_at, set_refcount};
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use ferrite_qapi::{Error, os_msg};
use std::collections::HashMap;
use std::io;

/// What a new image looks like (`BlockdevCreateOptionsQcow2`, checked).
#[derive(Debug, Clone)]
pub(crate) struct CreateOpts {
    pub(crate) size: u64,
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) refcount_order: u32,
    pub(crate) lazy_refcounts: bool,
    pub(crate) extended_l2: bool,
    pub(crate) zstd: bool,
    pub(crate) backing_file: Option<String>,
    pub(crate) backing_fmt: Option<String>,
    /// What to allocate up front.
    pub(crate) prealloc: Prealloc,
    /// The external data file's name, recorded in the header.
    pub(crate) data_file: Option<String>,
    /// The external data file is also a valid raw image (`data-file-raw`).
    pub(crate) data_file_raw: bool,
}

/// `preallocation` of a new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prealloc {
    Off,
    /// L2 tables and data cluster mappings; the file stays sparse.
    Metadata,
    /// As metadata, and the storage under the data is allocated.
    Falloc,
    /// As metadata, and the data is written (as zeroes).
    Full,
}

fn io_err(e: &io::Error) -> Error {
    Error::generic(format!("Could not write qcow2 header: {}", os_msg(e)))
}

/// Writes a new, empty image of `o.size` bytes onto `file` (which it overwrites).
pub(crate) async fn format(file: &Child, o: &CreateOpts) -> Result<(), Error> {
    let cs = 1u64 << o.cluster_bits;
    let mut incompatible = 0;
    if o.extended_l2 {
        incompatible |= header::incompat::EXTENDED_L2;
    }
    if o.zstd {
        incompatible |= header::incompat::COMPRESSION;
    }
    if o.data_file.is_some() {
        incompatible |= header::incompat::DATA_FILE;
    }
    let mut h = Header {
        version: o.version,
        cluster_bits: o.cluster_bits,
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible,
        compatible: if o.lazy_refcounts {
            header::compat::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: if o.data_file_raw {
            header::autoclear::DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: o.refcount_order,
        header_length: if o.version >= 3 {
            header::V3_HEADER_LEN_CURRENT
        } else {
            72
        },
        compression_type: u8::from(o.zstd),
        unknown_tail: Vec::new(),
        extensions: Vec::new(),
        backing_file: o.backing_file.clone(),
    };
    if o.version >= 3 {
        h.set_extension(EXT_FEATURE_TABLE, Some(Header::feature_table()));
    }
    if let Some(fmt) = &o.backing_fmt {
        h.set_extension(EXT_BACKING_FORMAT, Some(fmt.as_bytes().to_vec()));
    }
    if let Some(name) = &o.data_file {
        h.set_extension(EXT_DATA_FILE, Some(name.as_bytes().to_vec()));
    }
    let mut cluster0 = h.serialize()?;
    cluster0.resize(cs as usize, 0);
    let mut reftable = vec![0u8; cs as usize];
    put_be64(&mut reftable, 0, 2 * cs);
    let mut refblock = vec![0u8; cs as usize];
    for i in 0..3 {
        set_refcount(&mut refblock, i, o.refcount_order, 1);
    }
    let mut first = cluster0;
    first.extend_from_slice(&reftable);
    first.extend_from_slice(&refblock);
    file.truncate(0).await.map_err(|e| io_err(&e))?;
    file.write(0, first, ReqFlags::empty())
        .await
        .map_err(|e| io_err(&e))?;
    // Size the image through the metadata code, as an open image grows.
    let mut m = Meta::load(file, h, 16, 4).await.map_err(|e| io_err(&e))?;
    let needed = m.h.l1_needed(o.size).max(1);
    let grow = async {
        m.grow_l1(file, needed).await?;
        m.h.size = o.size;
        if o.prealloc != Prealloc::Off {
            preallocate(file, &mut m, o).await?;
        }
        m.write_back(file, false).await?;
        m.write_header(file).await?;
        file.flush().await
    };
    grow.await
        .map_err(|e| Error::generic(format!("Could not resize image: {}", os_msg(&e))))
}

/// Allocates every L2 table and data cluster, each L2 table followed by the data clusters
/// it maps; with an external data file, each cluster maps to its own offset there.
async fn preallocate(file: &Child, m: &mut Meta, o: &CreateOpts) -> io::Result<()> {
    let cs = m.cs();
    let per = m.l2_entries();
    let clusters = o.size.div_ceil(cs);
    if o.data_file.is_none() && matches!(o.prealloc, Prealloc::Falloc | Prealloc::Full) {
        return preallocate_data(file, m, o).await;
    }
    let mut gc = 0;
    while gc < clusters {
        let n = (per - gc % per).min(clusters - gc);
        let (table, first) = m.l2_for_write(file, gc).await?;
        let host = if o.data_file.is_some() {
            gc * cs
        } else {
            let host = m.alloc(file, n).await?;
            fill(file, host, n * cs, o.prealloc).await?;
            host
        };
        for k in 0..n {
            let bitmap = if m.h.extended_l2() {
                entry::SUB_ALL_ALLOC
            } else {
                0
            };
            m.set_l2(
                table,
                first + k as usize,
                (host + k * cs) | entry::COPIED,
                bitmap,
            );
        }
        gc += n;
    }
    if o.data_file.is_some() {
        return Ok(());
    }
    // The file covers the data, like QEMU's metadata preallocation.
    let end = m.alloc(file, 1).await?;
    m.free(end, 1, super::meta::FreeKind::Other);
    if file.len() < end {
        file.truncate(end).await?;
    }
    Ok(())
}

/// Preallocation with storage (falloc, full), laid out as QEMU does: the refcount table
/// moves past the initial metadata with room for everything to come, the data follows in
/// one run, and the L2 tables take the first free clusters (the old table's place first).
async fn preallocate_data(file: &Child, m: &mut Meta, o: &CreateOpts) -> io::Result<()> {
    let cs = m.cs();
    let per = m.l2_entries();
    let clusters = o.size.div_ceil(cs);
    let l2_tables = clusters.div_ceil(per) + 1;
    let in_use = file.len().div_ceil(cs);
    let per_block = cs * 8 / (1u64 << m.h.refcount_order);
    let reftable_entries = (in_use + clusters + l2_tables + 1).div_ceil(per_block);
    m.relocate_reftable(file, reftable_entries).await?;
    let host = m.alloc(file, clusters).await?;
    fill(file, host, clusters * cs, o.prealloc).await?;
    let mut gc = 0;
    while gc < clusters {
        let n = (per - gc % per).min(clusters - gc);
        let (table, first) = m.l2_for_write(file, gc).await?;
        for k in 0..n {
            let e = (host + (gc + k) * cs) | entry::COPIED;
            let bitmap = if m.h.extended_l2() {
                entry::SUB_ALL_ALLOC
            } else {
                0
            };
            m.set_l2(table, first + k as usize, e, bitmap);
        }
        gc += n;
    }
    Ok(())
}

/// Gives `len` bytes at `offset` of `node` storage as the preallocation mode asks.
pub(crate) async fn fill(node: &Child, offset: u64, len: u64, mode: Prealloc) -> io::Result<()> {
    match mode {
        Prealloc::Off | Prealloc::Metadata => Ok(()),
        Prealloc::Falloc => node.write_zeroes(offset, len, ReqFlags::empty()).await,
        Prealloc::Full => {
            const CHUNK: u64 = 1 << 20;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(CHUNK);
                node.write(offset + at, vec![0u8; n as usize], ReqFlags::empty())
                    .await?;
                at += n;
            }
            Ok(())
        }
    }
}

/// Clusters an image refers to, with the number of references each should have.
async fn references(file: &Child, m: &mut Meta) -> io::Result<HashMap<u64, u64>> {
    let cs = m.cs();
    let mut refs: HashMap<u64, u64> = HashMap::new();
    let add = |refs: &mut HashMap<u64, u64>, off: u64, len: u64| {
        if len == 0 {
            return;
        }
        for c in off / cs..=(off + len - 1) / cs {
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
        let mut at = m.h.snapshots_offset;
        let start = at;
        for _ in 0..m.h.nb_snapshots {
            let fixed = read_at(file, at, 40).await?;
            let l1_off = get_be64(&fixed, 0);
            let l1_size = u32::from_be_bytes(fixed[8..12].try_into().unwrap_or([0; 4]));
            let id_len = u16::from_be_bytes([fixed[12], fixed[13]]);
            let name_len = u16::from_be_bytes([fixed[14], fixed[15]]);
            let extra = u32::from_be_bytes(fixed[36..40].try_into().unwrap_or([0; 4]));
            at += (40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len))
                .next_multiple_of(8);
            add(&mut refs, l1_off, u64::from(l1_size) * 8);
            let raw = read_at(file, l1_off, l1_size as usize * 8).await?;
            l1s.push((0..l1_size as usize).map(|i| get_be64(&raw, i)).collect());
        }
        add(&mut refs, start, at - start);
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
        && m.h.autoclear & header::autoclear::BITMAPS != 0
    {
        let dir_size = get_be64(&ext, 1);
        let dir_off = get_be64(&ext, 2);
        add(&mut refs, dir_off, dir_size);
        let dir = read_at(file, dir_off, dir_size as usize).await?;
        let mut at = 0usize;
        while at + 24 <= dir.len() {
            let table_off = get_be64(&dir[at..], 0);
            let table_size = u32::from_be_bytes(dir[at + 8..at + 12].try_into().unwrap_or([0; 4]));
            let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
            let extra =
                u32::from_be_bytes(dir[at + 20..at + 24].try_into().unwrap_or([0; 4])) as usize;
            add(&mut refs, table_off, u64::from(table_size) * 8);
            let t = read_at(file, table_off, table_size as usize * 8).await?;
            for i in 0..table_size as usize {
                let d = get_be64(&t, i) & OFFSET_MASK;
                if d != 0 {
                    add(&mut refs, d, cs);
                }
            }
            at += (24 + extra + name_size).next_multiple_of(8);
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
    let Some(ext) = m.h.extension(EXT_BITMAPS).map(<[u8]>::to_vec) else {
        return Ok(());
    };
    if ext.len() < 24 {
        return Ok(());
    }
    let dir_size = get_be64(&ext, 1);
    let dir_off = get_be64(&ext, 2);
    if dir_size > 64 << 20 {
        return Ok(());
    }
    let mut dir = read_at(file, dir_off, dir_size as usize).await?;
    let mut at = 0usize;
    let mut changed = false;
    while at + 24 <= dir.len() {
        let flags = u32::from_be_bytes(dir[at + 12..at + 16].try_into().unwrap_or([0; 4]));
        if flags & 1 == 0 {
            dir[at + 12..at + 16].copy_from_slice(&(flags | 1).to_be_bytes());
            changed = true;
        }
        let name_size = u16::from_be_bytes([dir[at + 18], dir[at + 19]]) as usize;
        let extra = u32::from_be_bytes(dir[at + 20..at + 24].try_into().unwrap_or([0; 4])) as usize;
        at += (24 + extra + name_size).next_multiple_of(8);
    }
    if !changed {
        return Ok(());
    }
    m.h.autoclear &= !header::autoclear::BITMAPS;
    m.write_header(file).await?;
    file.flush().await?;
    file.write(dir_off, dir, ReqFlags::empty()).await?;
    file.flush().await?;
    m.h.autoclear |= header::autoclear::BITMAPS;
    m.write_header(file).await?;
    file.flush().await
}
