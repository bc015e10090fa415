//! `blockdev-create` for qcow2 (QEMU: `qcow2_co_create_opts`): the options checked in
//! QEMU's order, the file (and data file) opened or looked up and held, the image formatted.

use crate::create::{CreateOpts, Prealloc, fill, format};
use crate::error::{CreateError, Error};
use ferrite_block::BlockBackend;
use ferrite_block::Graph;
use ferrite_block::Node;
use ferrite_block::Perm;
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::rc::Rc;

/// `encrypt` of a new image: LUKS with the password of its `key-secret`.
fn encryption(
    graph: &Graph,
    e: &ferrite_qobject::QDict,
) -> ferrite_block::Result<(Vec<u8>, ferrite_crypto::CreateOptions)> {
    let e = Args::new(e.clone());
    if e.opt_str("format") != Some("luks") {
        return Err(CreateError::Encrypted.into());
    }
    let Some(id) = e.opt_str("key-secret") else {
        return Err(Error::KeySecretRequired.into());
    };
    let password = graph.secrets().get(id)?;
    Ok((
        password,
        ferrite_crypto::CreateOptions::from_options(
            |k| e.opt_str(k).map(str::to_owned),
            e.opt_u64("iter-time"),
        ),
    ))
}

/// Checks `BlockdevCreateOptionsQcow2` the way QEMU does, in its order.
fn qcow2_options(graph: &Graph, opts: &Args) -> ferrite_block::Result<CreateOpts> {
    let size = opts.u64("size")?;
    if size % 512 != 0 {
        return Err(CreateError::Size.into());
    }
    let version = match opts.opt_str("version") {
        Some("v2") => 2,
        _ => 3,
    };
    let cluster_size = opts.opt_u64("cluster-size").unwrap_or(65536);
    let extended_l2 = opts.bool_or("extended-l2", false);
    if !(512..=2 << 20).contains(&cluster_size) || cluster_size.count_ones() != 1 {
        return Err(CreateError::ClusterSize.into());
    }
    if extended_l2 {
        if version < 3 {
            return Err(CreateError::ExtendedL2V2.into());
        }
        if cluster_size < 16384 {
            return Err(CreateError::ExtendedL2ClusterSize.into());
        }
    }
    let lazy = opts.bool_or("lazy-refcounts", false);
    if lazy && version < 3 {
        return Err(CreateError::V3Only("Lazy refcounts").into());
    }
    let refcount_bits = opts.opt_i64("refcount-bits").unwrap_or(16);
    if !(1..=64).contains(&refcount_bits) || refcount_bits.count_ones() != 1 {
        return Err(CreateError::RefcountWidth.into());
    }
    if version < 3 && refcount_bits != 16 {
        return Err(CreateError::RefcountWidthV2.into());
    }
    let backing_file = opts.opt_str("backing-file").map(str::to_owned);
    let backing_fmt = opts.opt_str("backing-fmt").map(str::to_owned);
    if backing_fmt.is_some() && backing_file.is_none() {
        return Err(CreateError::BackingFormatWithoutFile.into());
    }
    let prealloc = opts.opt_str("preallocation").unwrap_or("off").to_owned();
    if backing_file.is_some() && prealloc != "off" && !extended_l2 {
        return Err(CreateError::BackingAndPreallocation.into());
    }
    let zstd = opts.opt_str("compression-type") == Some("zstd");
    if zstd && version < 3 {
        return Err(CreateError::CompressionV2.into());
    }
    let encrypt = match opts.get("encrypt") {
        Some(QObject::Dict(e)) => Some(encryption(graph, e)?),
        _ => None,
    };
    let data_file_raw = opts.bool_or("data-file-raw", false);
    match opts.get("data-file") {
        None if data_file_raw => return Err(CreateError::DataFileRawWithoutFile.into()),
        Some(_) if version < 3 => {
            return Err(CreateError::DataFileV2.into());
        }
        _ => {}
    }
    let prealloc = match prealloc.as_str() {
        "off" if data_file_raw => Prealloc::Metadata,
        "off" => Prealloc::Off,
        "metadata" => Prealloc::Metadata,
        "falloc" => Prealloc::Falloc,
        _ => Prealloc::Full,
    };
    Ok(CreateOpts {
        size,
        version,
        cluster_bits: cluster_size.trailing_zeros(),
        refcount_order: refcount_bits.trailing_zeros(),
        lazy_refcounts: lazy,
        extended_l2,
        zstd,
        backing_file,
        backing_fmt,
        prealloc,
        data_file: None,
        data_file_raw,
        encrypt,
    })
}

/// A node a create option names: an existing one, or one opened from inline options.
async fn named_node(graph: &Graph, value: &QObject) -> ferrite_block::Result<(Rc<Node>, bool)> {
    match value {
        QObject::String(name) => Ok((graph.lookup(name)?, false)),
        QObject::Dict(d) => Ok((graph.open_inline(&Args::new(d.clone())).await?, true)),
        _ => Err(CreateError::NodeReference.into()),
    }
}

/// `blockdev-create` of a qcow2 image.
///
/// # Errors
/// QEMU's texts for bad options, unknown nodes, permission conflicts, the storage failing.
pub(crate) async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let mut o = qcow2_options(graph, opts)?;
    let Some(file_ref) = opts.get("file") else {
        return Err(ferrite_block::Error::MissingChild("file".into()));
    };
    let mut nodes = vec![named_node(graph, file_ref).await?];
    if let Some(data_ref) = opts.get("data-file") {
        match named_node(graph, data_ref).await {
            Ok(n) => nodes.push(n),
            Err(e) => {
                release(graph, &nodes);
                return Err(e);
            }
        }
    }
    let mut holds = Vec::new();
    for (node, _) in &nodes {
        match BlockBackend::new(graph, node, Perm::WRITE | Perm::RESIZE, Perm::all()) {
            Ok(h) => holds.push(h),
            Err(e) => {
                drop(holds);
                release(graph, &nodes);
                return Err(e);
            }
        }
    }
    let edge = |i: usize| holds.get(i).and_then(|h| h.root());
    let Some(file) = edge(0) else {
        return Err(ferrite_block::Error::MissingChild("file".into()));
    };
    let data = edge(1);
    o.data_file = data.as_ref().map(|d| d.node().filename());
    let r = async {
        format(&file, &o).await?;
        if let Some(data) = &data {
            // The data file holds the guest's bytes at their own offsets.
            let io = Error::ResizeImage;
            data.truncate(o.size).await.map_err(io)?;
            fill(data, 0, o.size, o.prealloc).await.map_err(io)?;
            data.flush().await.map_err(io)?;
        }
        Ok(file.flush().await.map_err(Error::Flush)?)
    }
    .await;
    drop(holds);
    release(graph, &nodes);
    r
}

/// Deletes the nodes a create opened inline.
fn release(graph: &Graph, nodes: &[(Rc<Node>, bool)]) {
    for (n, inline) in nodes {
        if *inline {
            graph.release_inline(n);
        }
    }
}
