//! Making and mending images: formatting a new image (blockdev-create), rebuilding the
//! refcounts of an image left dirty (lazy refcounts), and marking persistent bitmaps in use.

use crate::error::Error;
use crate::format::entry::{self};
use crate::format::header::{self, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_TABLE, Header};
use crate::meta::{Meta, put_be64, set_refcount};
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use ferrite_qapi::os_msg;
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
    /// Encryption with LUKS: the password and how the volume is made.
    pub(crate) encrypt: Option<(Vec<u8>, ferrite_crypto::CreateOptions)>,
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

fn io_err(e: io::Error) -> Error {
    Error::WriteHeader(e)
}

/// Writes a new, empty image of `o.size` bytes onto `file` (which it overwrites).
pub(crate) async fn format(file: &Child, o: &CreateOpts) -> ferrite_block::Result<()> {
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
    // Not where clusters are 4 KiB or less: the table would leave a backing file name of
    // a 512-byte header little room (QEMU leaves it out there too).
    if o.version >= 3 && cs > 4096 {
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
    // Written over what the file holds, which keeps its size (QEMU does not cut it first,
    // so a file that cannot change size, a device or a fixed FUSE export, takes an image).
    file.write(0, first, ReqFlags::empty())
        .await
        .map_err(io_err)?;
    // QEMU opens the image it just wrote: storage that keeps nothing (`/dev/null`) holds
    // no image.
    let head = file.read(0, 512).await.map_err(io_err)?;
    header::Header::probe_cluster_bits(&head)?;
    // Size the image through the metadata code, as an open image grows, with QEMU's
    // checks of a new length.
    if o.size > i64::MAX as u64 {
        return Err(Error::ResizeRefused("Image size cannot be negative".into()).into());
    }
    if o.size > ferrite_block::MAX_LENGTH {
        return Err(Error::ResizeRefused(format!(
            "offset({}) exceeds maximum({})",
            o.size,
            ferrite_block::MAX_LENGTH
        ))
        .into());
    }
    let mut m = Meta::load(file, h, 16, 4).await.map_err(io_err)?;
    let needed = m.h.l1_needed(o.size).max(1);
    m.grow_l1(file, needed).await.map_err(|e| {
        Error::ResizeRefused(format!("Failed to grow the L1 table: {}", os_msg(&e)))
    })?;
    let grow = async {
        m.h.size = o.size;
        if o.prealloc != Prealloc::Off {
            preallocate(file, &mut m, o).await?;
        }
        m.write_back(file, false).await?;
        m.write_header(file).await?;
        file.flush().await
    };
    grow.await.map_err(Error::ResizeImage)?;
    if let Some((password, luks)) = &o.encrypt {
        set_up_encryption(file, &mut m, password.clone(), luks.clone())
            .await
            .map_err(Error::ResizeImage)?;
    }
    Ok(())
}

/// Puts a new LUKS volume's header and key material in clusters of their own and records
/// them in the crypto header extension (QEMU: `qcow2_set_up_encryption`, after the image
/// got its size).
async fn set_up_encryption(
    file: &Child,
    m: &mut Meta,
    password: Vec<u8>,
    luks: ferrite_crypto::CreateOptions,
) -> io::Result<()> {
    // Calibrating and deriving keys take the iteration time: off the main thread.
    let volume =
        tokio::task::spawn_blocking(move || ferrite_crypto::LuksVolume::create(&password, &luks))
            .await
            .map_err(|_| io::Error::other("creating the LUKS volume failed"))?
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let cs = m.cs();
    let len = volume.payload_offset;
    let clusters = len.div_ceil(cs);
    let host = m.alloc(file, clusters).await?;
    file.write_zeroes(host, clusters * cs, ReqFlags::empty())
        .await?;
    file.write(host, volume.header, ReqFlags::empty()).await?;
    let (at, material) = volume.material;
    file.write(host + at, material, ReqFlags::empty()).await?;
    let mut ext = host.to_be_bytes().to_vec();
    ext.extend_from_slice(&len.to_be_bytes());
    m.h.set_extension(header::EXT_CRYPTO, Some(ext));
    m.h.crypt_method = 2;
    m.write_back(file, false).await?;
    m.write_header(file).await?;
    file.flush().await
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
    m.free(end, 1, crate::meta::FreeKind::Other);
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
    let host = m.alloc_run(file, clusters).await?;
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
