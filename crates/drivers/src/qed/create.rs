//! `blockdev-create` of a QED image (`BlockdevCreateOptionsQed`; QEMU:
//! `bdrv_qed_co_create`): the file emptied (a QED file's length says what is allocated),
//! the header with the backing file's name after it, and an empty L1 table in the
//! cluster after the header.

use super::header::{
    DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, F_BACKING_FILE, F_BACKING_FORMAT_NO_PROBE,
    HEADER_LEN, Header, MAX_CLUSTER_SIZE, MAX_TABLE_SIZE, MIN_CLUSTER_SIZE, MIN_TABLE_SIZE,
    cluster_size_valid, image_size_valid, max_image_size, table_size_valid,
};
use crate::blockmap;
use crate::error::generic;
use ferrite_block::{BlockBackend, Graph, ReqFlags};
use ferrite_qapi::Args;
use std::rc::Rc;

pub(super) async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    let cluster_size = opts
        .opt_u64("cluster-size")
        .unwrap_or(DEFAULT_CLUSTER_SIZE.into());
    let table_size = opts
        .opt_i64("table-size")
        .unwrap_or(DEFAULT_TABLE_SIZE.into());
    if !cluster_size_valid(cluster_size) {
        return Err(generic(format!(
            "QED cluster size must be within range [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}] \
             and power of 2"
        )));
    }
    if !u64::try_from(table_size).is_ok_and(table_size_valid) {
        return Err(generic(format!(
            "QED table size must be within range [{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}] \
             and power of 2"
        )));
    }
    let (cluster_size, table_size) = (cluster_size as u32, table_size as u32);
    if !image_size_valid(size, cluster_size, table_size) {
        return Err(generic(format!(
            "QED image size must be a non-zero multiple of cluster size and less than {} bytes",
            max_image_size(cluster_size, table_size)
        )));
    }
    let mut h = Header {
        cluster_size,
        table_size,
        header_size: 1,
        l1_table_offset: cluster_size.into(),
        image_size: size,
        ..Header::default()
    };
    let backing = opts.opt_str("backing-file").map(str::to_owned);
    if let Some(name) = &backing {
        h.features |= F_BACKING_FILE;
        h.backing_filename_offset = HEADER_LEN as u32;
        h.backing_filename_size = name.len() as u32;
        if opts.opt_str("backing-fmt") == Some("raw") {
            h.features |= F_BACKING_FORMAT_NO_PROBE;
        }
    }
    blockmap::create_on_file(graph, opts, async |blk| {
        write_new_image(&blk, &h, backing.as_deref()).await
    })
    .await
}

async fn write_new_image(
    blk: &BlockBackend,
    h: &Header,
    backing: Option<&str>,
) -> ferrite_block::Result<()> {
    let failed = |e: std::io::Error| generic(ferrite_qapi::os_msg(&e));
    blk.truncate(0).await.map_err(failed)?;
    let mut head = h.to_bytes().to_vec();
    head.extend_from_slice(backing.unwrap_or_default().as_bytes());
    blk.write(0, head, ReqFlags::empty())
        .await
        .map_err(failed)?;
    let l1_len = u64::from(h.cluster_size) * u64::from(h.table_size);
    blk.write(
        h.l1_table_offset,
        vec![0; l1_len as usize],
        ReqFlags::empty(),
    )
    .await
    .map_err(failed)
}
