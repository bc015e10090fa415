//! `blockdev-create` of a VMDK image (`BlockdevCreateOptionsVmdk`), as QEMU makes one: the
//! `file` holds the whole image (monolithic sparse, stream-optimized) or the descriptor,
//! the `extents` the other files, 2 GiB each for the split types.

use super::descriptor::NewDescriptor;
use super::header::{SECTOR, Vmdk4Header};
use super::{Vmdk, rand_u32};
use crate::blockmap::CreateTarget;
use crate::error::generic;
use ferrite_block::{BlockBackend, Graph, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// The extent size of the split types.
const SPLIT_SIZE: u64 = 0x8000_0000;

/// How the image is laid out (`BlockdevVmdkSubformat`).
struct Subformat<'a> {
    name: &'a str,
    flat: bool,
    split: bool,
    compress: bool,
}

impl Subformat<'_> {
    fn of(name: &str) -> Subformat<'_> {
        Subformat {
            name,
            flat: matches!(name, "monolithicFlat" | "twoGbMaxExtentFlat"),
            split: matches!(name, "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat"),
            compress: name == "streamOptimized",
        }
    }

    /// The whole image is in `file`, descriptor and data.
    fn monolithic(&self) -> bool {
        !self.flat && !self.split
    }
}

pub(super) async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let size = opts.u64("size")?;
    if size % SECTOR != 0 {
        return Err(generic("Image size must be a multiple of 512 bytes"));
    }
    let sub = Subformat::of(opts.opt_str("subformat").unwrap_or("monolithicSparse"));
    let adapter = opts.opt_str("adapter-type").unwrap_or("ide");
    let backing = opts.opt_str("backing-file");
    let zeroed_grain = opts.opt_bool("zeroed-grain").unwrap_or(false);
    if sub.flat && backing.is_some() {
        return Err(generic("Flat image can't have backing file"));
    }
    if sub.flat && zeroed_grain {
        return Err(generic("Flat image can't enable zeroed grain"));
    }
    let mut opened = Vec::new();
    let r = write_image(
        graph,
        opts,
        size,
        &sub,
        adapter,
        backing,
        zeroed_grain,
        &mut opened,
    )
    .await;
    for target in opened {
        target.release(graph);
    }
    r
}

/// The files opened for writing, each let go by the caller.
type Opened = Vec<CreateTarget>;

#[allow(clippy::too_many_arguments)]
async fn write_image(
    graph: &Rc<Graph>,
    opts: &Args,
    size: u64,
    sub: &Subformat<'_>,
    adapter: &str,
    backing: Option<&str>,
    zeroed_grain: bool,
    opened: &mut Opened,
) -> ferrite_block::Result<()> {
    let extent_size = if sub.split { SPLIT_SIZE } else { size };
    let mut created = if sub.monolithic() { extent_size } else { 0 };
    let file = open(graph, opts.get("file"), opened)
        .await?
        .ok_or_else(|| generic("Parameter 'file' is missing"))?;
    init_extent(&file, created, sub, zeroed_grain).await?;
    let mut extent_lines = String::new();
    let line = |sectors: u64, blk: &BlockBackend| {
        let name = blk.node().map(|n| n.filename()).unwrap_or_default();
        let base = name.rsplit('/').next().unwrap_or_default().to_owned();
        if sub.flat {
            format!("RW {sectors} FLAT \"{base}\" 0\n")
        } else {
            format!("RW {sectors} SPARSE \"{base}\"\n")
        }
    };
    if sub.monolithic() {
        extent_lines.push_str(&line(created.div_ceil(SECTOR), &file));
    }
    let (parent_cid, parent_line) = match backing {
        Some(b) => (
            parent_cid(graph, &file, b).await?,
            format!("parentFileNameHint=\"{b}\""),
        ),
        None => (0xffff_ffff, String::new()),
    };
    let extents = match opts.get("extents") {
        Some(QObject::List(l)) => l.clone(),
        _ => Vec::new(),
    };
    let mut index = 1;
    while created < size {
        let n = (size - created).min(extent_size);
        let missing = || generic(format!("Extent [{}] not specified", index - 1));
        let blk = open(graph, extents.get(index - 1), opened)
            .await?
            .ok_or_else(missing)?;
        init_extent(&blk, n, sub, zeroed_grain).await?;
        extent_lines.push_str(&line(n.div_ceil(SECTOR), &blk));
        created += n;
        index += 1;
    }
    // An extent more that can be opened is refused (one that cannot goes unremarked).
    if let Some(extra) = extents.get(index - 1)
        && open(graph, Some(extra), opened)
            .await
            .ok()
            .flatten()
            .is_some()
    {
        return Err(generic("List of extents contains unused extents"));
    }
    let heads = if adapter == "ide" { 16 } else { 255 };
    let desc = NewDescriptor {
        cid: rand_u32().map_err(|e| generic(e.to_string()))?,
        parent_cid,
        create_type: sub.name,
        parent_line,
        extents: extent_lines,
        hw_version: opts.opt_str("hwversion").unwrap_or("4"),
        cylinders: size / (63 * u64::from(heads) * SECTOR),
        heads,
        adapter,
        tools_version: opts.opt_str("toolsversion").unwrap_or("2147483647"),
    }
    .render();
    let desc_offset = if sub.monolithic() { 0x200 } else { 0 };
    let len = desc.len() as u64;
    file.write(desc_offset, desc.into_bytes(), ReqFlags::empty())
        .await
        .map_err(|e| {
            generic(format!(
                "Could not write description: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
    if desc_offset == 0 {
        truncate(&file, len).await?;
    }
    Ok(())
}

async fn open(
    graph: &Rc<Graph>,
    value: Option<&QObject>,
    opened: &mut Opened,
) -> ferrite_block::Result<Option<Rc<BlockBackend>>> {
    let perm = Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE;
    let Some(target) = CreateTarget::open(graph, value, perm).await? else {
        return Ok(None);
    };
    let blk = target.blk.clone();
    opened.push(target);
    Ok(Some(blk))
}

async fn truncate(blk: &BlockBackend, len: u64) -> ferrite_block::Result<()> {
    blk.truncate(len)
        .await
        .map_err(|e| generic(ferrite_qapi::os_msg(&e)))
}

/// An extent file as it starts: `size` bytes of a flat extent, or an empty sparse one
/// (QEMU's `vmdk_init_extent`).
async fn init_extent(
    blk: &BlockBackend,
    size: u64,
    sub: &Subformat<'_>,
    zeroed_grain: bool,
) -> ferrite_block::Result<()> {
    if sub.flat {
        return truncate(blk, size).await;
    }
    // A grain directory of more than 32M tables (an extent over 1 PiB) is one no program
    // opens ("L1 size too big"); QEMU's create runs out of memory making it.
    const MAX_SPARSE: u64 = (32 << 20) * 512 * 128 * SECTOR;
    if size > MAX_SPARSE {
        return Err(generic(format!(
            "A sparse VMDK extent holds at most {MAX_SPARSE} bytes"
        )));
    }
    let new = Vmdk4Header::new_sparse(size / SECTOR, sub.compress, zeroed_grain);
    let failed = |what: &str, e: std::io::Error| {
        generic(format!(
            "failed to write VMDK {what}: {}",
            ferrite_qapi::os_msg(&e)
        ))
    };
    blk.write(0, new.header, ReqFlags::empty())
        .await
        .map_err(|e| failed("header", e))?;
    truncate(blk, new.file_len).await?;
    blk.write(new.rgd.0, new.rgd.1, ReqFlags::empty())
        .await
        .map_err(|e| failed("grain directory", e))?;
    blk.write(new.gd.0, new.gd.1, ReqFlags::empty())
        .await
        .map_err(|e| failed("backup grain directory", e))
}

/// The content id of the parent `name` (relative to the image): it must be a VMDK image.
async fn parent_cid(
    graph: &Rc<Graph>,
    image: &BlockBackend,
    name: &str,
) -> ferrite_block::Result<u32> {
    let image_name = image.node().map(|n| n.filename()).unwrap_or_default();
    let path = ferrite_block::filename::backing_path(&image_name, name)?;
    let extra = QDict::new()
        .with("read-only", true)
        .with("backing", QObject::Null);
    let parent = graph.open_image(&path, None, extra).await?;
    let cid = match parent.driver_as::<Vmdk>() {
        Some(v) => v
            .current_cid()
            .await
            .ok_or_else(|| generic("Failed to read parent CID")),
        None => Err(generic(format!(
            "Invalid backing file format: {}. Must be vmdk",
            parent.driver_name()
        ))),
    };
    graph.release_inline(&parent);
    cid
}
