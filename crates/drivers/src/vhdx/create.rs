//! `blockdev-create` of a VHDX image (`BlockdevCreateOptionsVhdx`; QEMU: `vhdx_co_create`):
//! the identifier, two headers, the region tables, the BAT and the metadata, laid out as
//! QEMU lays them out (log at 1 MiB, BAT after it, metadata after that, the data area
//! 5 MiB further).

use super::format::{
    self, HEADER_CHECKED, HEADER_LEN, HEADER_OFFSETS, Header, KIB, Layout, MIB, MetaEntry,
    REGION_TABLE_OFFSETS, Region, SECTOR, state,
};
use crate::blockmap;
use crate::error::generic;
use ferrite_block::{BlockBackend, Graph, ReqFlags};
use ferrite_qapi::Args;
use std::rc::Rc;

/// The options, checked as QEMU checks them.
struct Options {
    size: u64,
    log_size: u32,
    block_size: u64,
    fixed: bool,
    zero_blocks: bool,
}

fn options(opts: &Args) -> ferrite_block::Result<Options> {
    let size = opts.u64("size")?;
    if size > format::MAX_IMAGE_SIZE {
        return Err(generic("Image size too large; max of 64TB"));
    }
    let log_size = opts.opt_u64("log-size").unwrap_or(MIB);
    let Ok(log_size) = u32::try_from(log_size) else {
        return Err(generic("Log size must be smaller than 4 GB"));
    };
    if u64::from(log_size) < MIB || u64::from(log_size) % MIB != 0 {
        return Err(generic("Log size must be a multiple of 1 MB"));
    }
    let zero_blocks = opts.opt_bool("block-state-zero").unwrap_or(true);
    let fixed = opts.opt_str("subformat") == Some("fixed");
    let block_size = opts
        .opt_u64("block-size")
        .unwrap_or(if size > 32 * 1024 * 1024 * MIB {
            64 * MIB
        } else if size > 100 * 1024 * MIB {
            32 * MIB
        } else if size > 1024 * MIB {
            16 * MIB
        } else {
            8 * MIB
        });
    if block_size < MIB || block_size % MIB != 0 {
        return Err(generic("Block size must be a multiple of 1 MB"));
    }
    if !block_size.is_power_of_two() {
        return Err(generic("Block size must be a power of two"));
    }
    if block_size > format::BLOCK_SIZE_MAX {
        return Err(generic(format!(
            "Block size must not exceed {}",
            format::BLOCK_SIZE_MAX
        )));
    }
    Ok(Options {
        size,
        log_size,
        block_size,
        fixed,
        zero_blocks,
    })
}

pub(super) async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let o = options(opts)?;
    blockmap::create_on_file(graph, opts, async |blk| write_new_image(&blk, &o).await).await
}

/// The creator field: which program made the image (diagnostic only), as QEMU's.
const CREATOR: &str = "QEMU v10.0.2";

async fn write_new_image(blk: &BlockBackend, o: &Options) -> ferrite_block::Result<()> {
    let failed = |what: &str| {
        let what = what.to_owned();
        move |e: std::io::Error| generic(format!("{what}: {}", ferrite_qapi::os_msg(&e)))
    };
    blk.write(0, format::SIGNATURE.to_vec(), ReqFlags::empty())
        .await
        .map_err(failed("Failed to write file signature"))?;
    let creator: Vec<u8> = CREATOR.encode_utf16().flat_map(u16::to_le_bytes).collect();
    blk.write(8, creator, ReqFlags::empty())
        .await
        .map_err(failed("Failed to write creator field"))?;
    write_headers(blk, o)
        .await
        .map_err(failed("Failed to write image headers"))?;

    let layout = Layout::new(o.size, o.block_size);
    let bat = Region {
        guid: format::BAT_GUID,
        offset: (MIB + u64::from(o.log_size)).next_multiple_of(MIB),
        length: (u64::from(layout.entries) * 8).next_multiple_of(MIB) as u32,
        flags: 0,
    };
    let meta = Region {
        guid: format::METADATA_GUID,
        offset: (bat.offset + u64::from(bat.length)).next_multiple_of(MIB),
        length: MIB as u32,
        flags: 0,
    };
    write_bat(blk, o, &layout, &bat).await?;
    let table = format::region_table(&[bat, meta]);
    blk.write(REGION_TABLE_OFFSETS[0], table.clone(), ReqFlags::empty())
        .await
        .map_err(failed("Failed to write first region table"))?;
    blk.write(REGION_TABLE_OFFSETS[1], table, ReqFlags::empty())
        .await
        .map_err(failed("Failed to write second region table"))?;
    write_metadata(blk, o, meta.offset)
        .await
        .map_err(failed("Failed to initialize metadata"))
}

/// Both headers: a random sequence number in the first, the next in the second.
async fn write_headers(blk: &BlockBackend, o: &Options) -> std::io::Result<()> {
    let rand = ferrite_crypto::random(4).map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut h = Header::new(u64::from(format::le32(&rand, 0)), o.log_size);
    h.file_write_guid = super::random_guid()?;
    h.data_write_guid = super::random_guid()?;
    for at in HEADER_OFFSETS {
        let mut block = vec![0u8; HEADER_CHECKED];
        h.store(&mut block);
        block.truncate(HEADER_LEN);
        blk.write(at, block, ReqFlags::empty()).await?;
        blk.flush().await?;
        h.sequence += 1;
    }
    Ok(())
}

/// The file grown to the data area (and a fixed image's data), and the BAT written
/// unless it is all zeroes on a file that reads as zeroes.
async fn write_bat(
    blk: &BlockBackend,
    o: &Options,
    layout: &Layout,
    bat: &Region,
) -> ferrite_block::Result<()> {
    let data_start = bat.offset + u64::from(bat.length) + 5 * MIB;
    let end = if o.fixed {
        data_start + o.size
    } else {
        data_start
    };
    blk.truncate(end)
        .await
        .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
    if !o.fixed && !o.zero_blocks {
        return Ok(());
    }
    let s = match (o.fixed, o.zero_blocks) {
        (_, true) => state::ZERO,
        (true, false) => state::FULLY_PRESENT,
        (false, false) => state::NOT_PRESENT,
    };
    let mut table = vec![0u8; bat.length as usize];
    let sectors = o.size / SECTOR;
    let per_block = o.block_size / SECTOR;
    let mut sector = 0;
    while sector < sectors {
        let i = layout.entry_of(sector / per_block) as usize;
        let entry = if s == state::FULLY_PRESENT {
            (data_start + sector * SECTOR).next_multiple_of(MIB) | s
        } else {
            s
        };
        if let Some(slot) = table.get_mut(i * 8..i * 8 + 8) {
            slot.copy_from_slice(&entry.to_le_bytes());
        }
        sector += per_block;
    }
    blk.write(bat.offset, table, ReqFlags::empty())
        .await
        .map_err(|e| {
            generic(format!(
                "Failed to write the BAT: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })
}

/// The metadata table and its five items (block size and type, disk size, a random
/// page 83 id, 512-byte sectors).
async fn write_metadata(blk: &BlockBackend, o: &Options, at: u64) -> std::io::Result<()> {
    let virtual_disk = format::META_IS_REQUIRED | format::META_IS_VIRTUAL_DISK;
    let items: [(format::Guid, u32, u32); 5] = [
        (format::FILE_PARAMETERS_GUID, 8, format::META_IS_REQUIRED),
        (format::VIRTUAL_SIZE_GUID, 8, virtual_disk),
        (format::PAGE83_GUID, 16, virtual_disk),
        (format::LOGICAL_SECTOR_GUID, 4, virtual_disk),
        (format::PHYSICAL_SECTOR_GUID, 4, virtual_disk),
    ];
    let mut offset = 64 * KIB as u32;
    let entries: Vec<MetaEntry> = items
        .iter()
        .map(|&(guid, length, flags)| {
            let e = MetaEntry {
                guid,
                offset,
                length,
                flags,
            };
            offset += length;
            e
        })
        .collect();
    let mut values = Vec::with_capacity(40);
    values.extend_from_slice(&(o.block_size as u32).to_le_bytes());
    let bits = if o.fixed {
        format::LEAVE_BLOCKS_ALLOCATED
    } else {
        0
    };
    values.extend_from_slice(&bits.to_le_bytes());
    values.extend_from_slice(&o.size.to_le_bytes());
    values.extend_from_slice(&super::random_guid()?);
    values.extend_from_slice(&512u32.to_le_bytes());
    values.extend_from_slice(&512u32.to_le_bytes());
    blk.write(at, format::metadata_table(&entries), ReqFlags::empty())
        .await?;
    blk.write(at + 64 * KIB, values, ReqFlags::empty()).await
}
