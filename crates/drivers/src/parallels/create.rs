//! `blockdev-create` of a Parallels image (`BlockdevCreateOptionsParallels`; QEMU:
//! `parallels_co_create`): a header of the new format and an empty BAT, zeroes up to the
//! data area, which starts at a cluster boundary.

use super::header::{
    DEFAULT_CLUSTER_SIZE, HEADS, Header, MAGIC_EXT, SECTOR, SECTORS_PER_CYLINDER, VERSION,
    bat_entry_at,
};
use crate::blockmap;
use crate::error::generic;
use ferrite_block::{BlockBackend, Graph, ReqFlags};
use ferrite_qapi::Args;
use std::rc::Rc;

/// The most clusters a BAT can count.
const MAX_CLUSTERS: u64 = 1 << 32;

pub(super) async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    let cluster = opts.opt_u64("cluster-size").unwrap_or(DEFAULT_CLUSTER_SIZE);
    if cluster >= i64::MAX as u64 / MAX_CLUSTERS {
        return Err(generic("Cluster size is too large"));
    }
    // A cluster size of 0 lands here too, as in QEMU (whose division would fail next).
    if size >= MAX_CLUSTERS * cluster {
        return Err(generic("Image size is too large for this cluster size"));
    }
    if size % SECTOR != 0 {
        return Err(generic("Image size must be a multiple of 512 bytes"));
    }
    if cluster % SECTOR != 0 {
        return Err(generic("Cluster size must be a multiple of 512 bytes"));
    }
    let entries = size.div_ceil(cluster) as u32;
    let bat_sectors = bat_entry_at(entries).div_ceil(cluster) * cluster / SECTOR;
    let h = Header {
        magic: *MAGIC_EXT,
        version: VERSION,
        heads: HEADS,
        cylinders: (size / SECTOR / u64::from(HEADS) / SECTORS_PER_CYLINDER) as u32,
        tracks: (cluster / SECTOR) as u32,
        bat_entries: entries,
        nb_sectors: size.div_ceil(SECTOR),
        data_off: bat_sectors as u32,
        ..Header::default()
    };
    blockmap::create_on_file(graph, opts, async |blk| {
        write_new_image(&blk, &h, bat_sectors).await
    })
    .await
}

async fn write_new_image(
    blk: &BlockBackend,
    h: &Header,
    bat_sectors: u64,
) -> ferrite_block::Result<()> {
    let failed = |e: std::io::Error| {
        generic(format!(
            "Failed to create Parallels image: {}",
            ferrite_qapi::os_msg(&e)
        ))
    };
    let mut first = vec![0u8; SECTOR as usize];
    first[..h.to_bytes().len()].copy_from_slice(&h.to_bytes());
    blk.write(0, first, ReqFlags::empty())
        .await
        .map_err(failed)?;
    if bat_sectors > 1 {
        blk.write_zeroes(SECTOR, (bat_sectors - 1) * SECTOR, ReqFlags::empty())
            .await
            .map_err(failed)?;
    }
    Ok(())
}
