//! `vmdk`: VMware disk images (QEMU: block/vmdk.c). A disk is a row of extents, each a
//! stretch of sectors in a file of its own ([`extent`]): flat, or sparse (grains placed by
//! a grain directory and grain tables, compressed in stream-optimized images). A monolithic
//! sparse or stream-optimized image is one sparse file whose header is followed by the
//! descriptor text; the other types (`monolithicFlat`, `twoGbMaxExtentSparse`/`Flat`,
//! `vmfs`, `vmfsSparse`) are a descriptor file naming the extent files
//! ([`descriptor`]), opened as children `extents.0`, `extents.1`...
//!
//! As under QEMU: a grain is placed at the end of its file when first written, whole (the
//! rest from the backing file, or zeroes), then its entry is set in both grain tables and
//! made durable; the descriptor gets a new content id on the first write after opening;
//! the parent (`parentFileNameHint`) is a VMDK backing file whose content id must match;
//! compressed grains are written once, whole; no discard, no resize; migration blocked.
//! Unlike QEMU, reads go on while a write places a grain.

mod create;
mod descriptor;
mod extent;
mod header;

use crate::blockmap::{self, blocker};
use crate::error::generic;
use descriptor::{ExtentLine, c_text};
use extent::{Extent, GTE_ZEROED, Grain, Layout, SeSparse, Sparse, SparseGeometry};
use ferrite_block::driver::{BoxFut, Driver, Extent as Status, ReqFlags};
use ferrite_block::io::pool;
use ferrite_block::{Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use header::{
    DESC_SECTORS, FOOTER_LEN, GD_AT_END, SECTOR, SeSparseHeader, VMDK3_HEADER_LEN, VMDK3_MAGIC,
    VMDK4_HEADER_LEN, VMDK4_MAGIC, Vmdk3Header, Vmdk4Header,
};
use std::cell::Cell;
use std::io;
use std::rc::Rc;

/// Bytes of a monolithic sparse image's descriptor that are read and rewritten.
const DESC_SIZE: usize = (DESC_SECTORS * SECTOR) as usize;
/// Where a monolithic sparse image's descriptor is, whatever its header says (QEMU's).
const EMBEDDED_DESC: u64 = 0x200;

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// The `vmdk` driver's factory.
pub(crate) struct VmdkFactory;

impl DriverFactory for VmdkFactory {
    fn name(&self) -> &'static str {
        "vmdk"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn probe(&self, head: &[u8]) -> bool {
        match head.get(..4) {
            Some(m) => {
                let magic = u32::from_be_bytes([m[0], m[1], m[2], m[3]]);
                magic == VMDK3_MAGIC
                    || magic == VMDK4_MAGIC
                    || descriptor::looks_like_descriptor(head)
            }
            None => false,
        }
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create::create(graph, opts))
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// By name, QEMU rounds the size up to a sector and takes only a VMDK backing file.
    fn by_name_create_options(&self, mut opts: QDict) -> ferrite_block::Result<QDict> {
        if let Some(format) = opts.remove("backing-fmt")
            && format.as_str() != Some("vmdk")
        {
            return Err(generic("backing_file must be a vmdk image"));
        }
        let size = opts.get("size").and_then(QObject::as_u64).unwrap_or(0);
        opts.insert("size", size.next_multiple_of(SECTOR));
        Ok(opts)
    }

    fn formatting_options(&self, size: u64, backing: Option<(&str, &str)>) -> String {
        format!(
            "size={size}{} compat6=off hwversion=undefined",
            ferrite_block::backing_options(backing)
        )
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move { Ok(Box::new(open(ctx).await?) as Box<dyn Driver>) })
    }
}

/// The first bytes of `file` from `at`: at most a megabyte, at least 4 bytes in the file
/// (QEMU's `vmdk_read_desc`).
async fn read_head(file: &Child, at: u64) -> ferrite_block::Result<Vec<u8>> {
    let size = file.len();
    if size < 4 {
        return Err(generic("File is too small, not a valid image"));
    }
    let n = size.min(descriptor::MAX_DESCRIPTOR_FILE as u64) as usize;
    file.read(at, n).await.map_err(|e| {
        generic(format!(
            "Could not read from file: {}",
            ferrite_qapi::os_msg(&e)
        ))
    })
}

/// What opening found so far.
struct Opening {
    extents: Vec<Extent>,
    create_type: String,
    read_only: bool,
}

impl Opening {
    fn next_start(&self) -> u64 {
        self.extents.last().map_or(0, Extent::end)
    }

    /// Adds the next extent, of `sectors` sectors. The disk's bytes must be counted in
    /// an `i64`, as QEMU counts them.
    fn push(
        &mut self,
        file: &Rc<Child>,
        sectors: u64,
        layout: Layout,
    ) -> ferrite_block::Result<()> {
        let start = self.next_start();
        sectors
            .checked_mul(SECTOR)
            .and_then(|n| n.checked_add(start))
            .filter(|&end| end <= i64::MAX as u64)
            .ok_or_else(|| generic("Invalid extent size, image may be corrupt"))?;
        self.extents.push(Extent {
            file: file.clone(),
            kind: None,
            sectors,
            start,
            layout,
        });
        Ok(())
    }
}

async fn open(ctx: &mut OpenCtx<'_>) -> ferrite_block::Result<Vmdk> {
    let (file, read_only) = blockmap::open_file(ctx).await?;
    // Listed once its file is open, before its extents and backing file (QEMU's order).
    ctx.take_position_now();
    let head = read_head(&file, 0).await?;
    let mut o = Opening {
        extents: Vec::new(),
        create_type: String::new(),
        read_only,
    };
    let desc_offset = match magic(&head) {
        VMDK3_MAGIC | VMDK4_MAGIC => {
            if let Some(desc) = open_sparse(&mut o, &file, &head, true).await? {
                open_descriptor(ctx, &mut o, &file, &desc).await?;
            }
            EMBEDDED_DESC
        }
        _ => {
            open_descriptor(ctx, &mut o, &file, &head).await?;
            0
        }
    };
    let desc = file
        .read(desc_offset, DESC_SIZE)
        .await
        .map_err(|e| generic(ferrite_qapi::os_msg(&e)))?;
    let desc = c_text(&desc);
    let invalid = || {
        generic(format!(
            "Could not open '{}': Invalid argument",
            file.node().filename()
        ))
    };
    let parent_hint = descriptor::parent_hint(desc).map_err(|()| invalid())?;
    let cid = descriptor::cid(desc, "CID").ok_or_else(invalid)?;
    let parent_cid = descriptor::cid(desc, "parentCID").ok_or_else(invalid)?;
    open_backing(ctx, &file, parent_hint.as_deref()).await?;
    let size = o.next_start();
    Ok(Vmdk {
        file,
        extents: o.extents,
        size,
        create_type: o.create_type,
        desc_offset,
        cid,
        parent_cid,
        parent_hint,
        cid_updated: Cell::new(false),
        cid_checked: Cell::new(false),
        lock: tokio::sync::Mutex::new(()),
        read_only: Cell::new(read_only),
        blocker: blocker("vmdk", ctx.node_name()),
    })
}

fn magic(head: &[u8]) -> u32 {
    u32::from_be_bytes([head[0], head[1], head[2], head[3]])
}

/// The backing file: as the options say (a node, inline options, or `null` for none), or
/// the parent the descriptor names, a VMDK image beside this one.
async fn open_backing(
    ctx: &mut OpenCtx<'_>,
    file: &Child,
    hint: Option<&str>,
) -> ferrite_block::Result<()> {
    match ctx.opts().get("backing").cloned() {
        Some(QObject::Null) => Ok(()),
        Some(v) => ctx.open_child_ref("backing", &v).await.map(drop),
        None => {
            let Some(hint) = hint else {
                return Ok(());
            };
            let path = if hint.starts_with('/') {
                hint.to_owned()
            } else {
                ferrite_block::filename::base_directory(&file.node())? + hint
            };
            ctx.open_image("backing", &path, "vmdk", true)
                .await
                .map(drop)
                .map_err(|e| generic(format!("Could not open backing file: {e}")))
        }
    }
}

/// Opens the sparse extent in `file` whose first bytes are `head` and adds it; or, for a
/// top-level header that only points to a descriptor (capacity 0), returns that
/// descriptor's text.
async fn open_sparse(
    o: &mut Opening,
    file: &Rc<Child>,
    head: &[u8],
    top: bool,
) -> ferrite_block::Result<Option<Vec<u8>>> {
    let header_error = |e: io::Error| {
        generic(format!(
            "Could not read header from file '{}': {}",
            file.node().filename(),
            ferrite_qapi::os_msg(&e)
        ))
    };
    let geometry = match magic(head) {
        VMDK3_MAGIC => {
            let b = file.read(4, VMDK3_HEADER_LEN).await.map_err(header_error)?;
            let h = Vmdk3Header::parse(&b);
            let l2_size = 4096;
            SparseGeometry {
                capacity: u64::from(h.disk_sectors),
                l1_offset: u64::from(h.l1dir_offset) * SECTOR,
                l1_backup_offset: None,
                l1_size: u64::from(h.l1dir_size),
                l2_size,
                grain_sectors: u64::from(h.granularity),
                compressed: false,
                has_marker: false,
                has_zero_grain: false,
                se: None,
            }
        }
        VMDK4_MAGIC => {
            let b = file.read(4, VMDK4_HEADER_LEN).await.map_err(header_error)?;
            let mut h = Vmdk4Header::parse(&b);
            if h.capacity == 0 && h.desc_offset != 0 && top {
                let at = h
                    .desc_offset
                    .checked_mul(SECTOR)
                    .ok_or_else(|| generic("Could not read from file: Invalid argument"))?;
                return Ok(Some(read_head(file, at).await?));
            }
            if top {
                o.create_type = "monolithicSparse".into();
            }
            if h.gd_offset == GD_AT_END {
                let at = file.len().checked_sub(FOOTER_LEN as u64);
                let footer = match at {
                    Some(at) => file.read(at, FOOTER_LEN).await.map_err(|e| {
                        generic(format!(
                            "Failed to read footer: {}",
                            ferrite_qapi::os_msg(&e)
                        ))
                    })?,
                    None => vec![0; FOOTER_LEN],
                };
                h = header::footer_header(&footer).ok_or_else(|| generic("Invalid footer"))?;
            }
            check_vmdk4(&h, o.read_only, file)?;
            let l1_entry_sectors = u64::from(h.gtes_per_gt).wrapping_mul(h.granularity) as u32;
            let l1_size = h.capacity.div_ceil(u64::from(l1_entry_sectors)) as u32;
            if h.compressed() && top {
                o.create_type = "streamOptimized".into();
            }
            SparseGeometry {
                capacity: h.capacity,
                l1_offset: h.gd_offset.wrapping_mul(SECTOR),
                l1_backup_offset: h.has_rgd().then(|| h.rgd_offset.wrapping_mul(SECTOR)),
                l1_size: u64::from(l1_size),
                l2_size: u64::from(h.gtes_per_gt),
                grain_sectors: h.granularity,
                compressed: h.compressed(),
                has_marker: h.has_marker(),
                has_zero_grain: h.has_zero_grain(),
                se: None,
            }
        }
        _ => return Err(generic("Image not in VMDK format")),
    };
    let sparse = Sparse::open(file, &geometry).await.map_err(generic)?;
    o.push(file, geometry.capacity, Layout::Sparse(sparse))?;
    Ok(None)
}

/// QEMU's checks of a `KDMV` header, in its order and words.
fn check_vmdk4(h: &Vmdk4Header, read_only: bool, file: &Child) -> ferrite_block::Result<()> {
    if h.version > 3 {
        return Err(generic(format!("Unsupported VMDK version {}", h.version)));
    }
    if h.version == 3 && !read_only && !h.compressed() {
        return Err(generic("VMDK version 3 must be read only"));
    }
    if h.gtes_per_gt > 512 {
        return Err(generic("L2 table size too big"));
    }
    if u64::from(h.gtes_per_gt).wrapping_mul(h.granularity) as u32 == 0 {
        return Err(generic("L1 entry size is invalid"));
    }
    if file.len().div_ceil(SECTOR) < h.grain_offset {
        return Err(generic(format!(
            "File truncated, expecting at least {} bytes",
            h.grain_offset.wrapping_mul(SECTOR) as i64
        )));
    }
    Ok(())
}

/// The image types a descriptor file may be.
const DESCRIPTOR_TYPES: [&str; 6] = [
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

/// Opens the extents a descriptor file names (QEMU's `vmdk_open_desc_file`).
async fn open_descriptor(
    ctx: &mut OpenCtx<'_>,
    o: &mut Opening,
    file: &Rc<Child>,
    desc: &[u8],
) -> ferrite_block::Result<()> {
    let desc = c_text(desc);
    let create_type = descriptor::quoted(desc, "createType", 128)
        .ok_or_else(|| generic("invalid VMDK image descriptor"))?;
    if !DESCRIPTOR_TYPES.contains(&create_type.as_str()) {
        return Err(generic(format!("Unsupported image type '{create_type}'")));
    }
    o.create_type = create_type;
    let lines = descriptor::extent_lines(desc)
        .map_err(|line| generic(format!("Invalid extent line: {line}")))?;
    for line in lines {
        open_extent(ctx, o, file, line).await?;
    }
    Ok(())
}

/// Opens the file of one extent line as the next `extents.N` child and adds its extent.
async fn open_extent(
    ctx: &mut OpenCtx<'_>,
    o: &mut Opening,
    desc_file: &Child,
    line: ExtentLine,
) -> ferrite_block::Result<()> {
    let path = if line.file.starts_with('/') {
        line.file.clone()
    } else {
        let dir = ferrite_block::filename::base_directory(&desc_file.node()).map_err(|e| {
            generic(format!(
                "Cannot use relative paths with VMDK descriptor file '{}': {e}",
                desc_file.node().filename()
            ))
        })?;
        format!("{dir}{}", line.file)
    };
    let key = format!("extents.{}", o.extents.len());
    let opts = ctx.image_file_opts(&path, o.read_only);
    let file = ctx.open_child_opts(&key, opts).await?;
    match line.kind.as_str() {
        "FLAT" | "VMFS" => {
            let start = line.flat_offset.saturating_mul(SECTOR);
            o.push(&file, line.sectors, Layout::Flat { start })?;
        }
        "SPARSE" | "VMFSSPARSE" => {
            let head = read_head(&file, 0).await?;
            open_sparse(o, &file, &head, false).await?;
        }
        "SESPARSE" => open_se_sparse(ctx, o, &file).await?,
        other => {
            return Err(generic(format!("Unsupported extent type '{other}'")));
        }
    }
    if let Some(e) = o.extents.last_mut() {
        e.kind = Some(line.kind);
    }
    Ok(())
}

/// Opens an ESXi seSparse extent, read-only as under QEMU (`auto-read-only` makes the
/// node so).
async fn open_se_sparse(
    ctx: &mut OpenCtx<'_>,
    o: &mut Opening,
    file: &Rc<Child>,
) -> ferrite_block::Result<()> {
    if !o.read_only {
        if !ctx.opts().opt_bool("auto-read-only").unwrap_or(false) {
            return Err(generic("No write support for seSparse images available"));
        }
        ctx.settings().read_only = true;
        o.read_only = true;
    }
    let read = async |at: u64, what: &str| {
        file.read(at, SECTOR as usize).await.map_err(|e| {
            generic(format!(
                "Could not read {what} header from file '{}': {}",
                file.node().filename(),
                ferrite_qapi::os_msg(&e)
            ))
        })
    };
    let h = SeSparseHeader::parse(&read(0, "const").await?).map_err(generic)?;
    let at = h.volatile_header_offset.saturating_mul(SECTOR);
    SeSparseHeader::check_volatile(&read(at, "volatile").await?).map_err(generic)?;
    let geometry = SparseGeometry {
        capacity: h.capacity,
        l1_offset: h.grain_dir_offset.saturating_mul(SECTOR),
        l1_backup_offset: None,
        l1_size: h.grain_dir_sectors.saturating_mul(SECTOR) / 8,
        l2_size: h.grain_table_sectors * SECTOR / 8,
        grain_sectors: h.grain_sectors,
        compressed: false,
        has_marker: false,
        has_zero_grain: false,
        se: Some(SeSparse {
            tables: h.grain_tables_offset,
            grains: h.grains_offset,
        }),
    };
    let sparse = Sparse::open(file, &geometry).await.map_err(generic)?;
    o.push(file, geometry.capacity, Layout::Sparse(sparse))?;
    Ok(())
}

struct Vmdk {
    /// The image file: the monolithic image, or the descriptor file.
    file: Rc<Child>,
    extents: Vec<Extent>,
    size: u64,
    create_type: String,
    /// Where the descriptor is in `file`.
    desc_offset: u64,
    /// The content ids as the image opened.
    cid: u32,
    parent_cid: u32,
    parent_hint: Option<String>,
    /// A new content id was written since the image opened.
    cid_updated: Cell<bool>,
    /// The backing file's content id was found to match.
    cid_checked: Cell<bool>,
    /// Writes, one at a time (QEMU's lock).
    lock: tokio::sync::Mutex<()>,
    read_only: Cell<bool>,
    blocker: String,
}

impl Vmdk {
    fn extent_at(&self, offset: u64) -> io::Result<&Extent> {
        let sector_start = offset / SECTOR * SECTOR;
        self.extents
            .iter()
            .find(|e| sector_start < e.end())
            .ok_or_else(|| errno(libc::EIO))
    }

    /// The content id the descriptor holds now.
    async fn current_cid(&self) -> Option<u32> {
        let desc = self.file.read(self.desc_offset, DESC_SIZE).await.ok()?;
        descriptor::cid(c_text(&desc), "CID")
    }

    /// Whether the backing file is the parent the image was made on (QEMU's
    /// `vmdk_is_cid_valid`): a VMDK image whose content id is the parent id; once found,
    /// not asked again.
    async fn backing_matches(&self, node: &Node) -> bool {
        if self.cid_checked.get() {
            return true;
        }
        if let Some(b) = node.child("backing") {
            let Some(parent) = b.driver_as::<Vmdk>() else {
                return false;
            };
            if parent.current_cid().await != Some(self.parent_cid) {
                return false;
            }
        }
        self.cid_checked.set(true);
        true
    }

    /// Bytes the backing file holds at `offset` (its edge reads zeroes past its end).
    async fn read_backing(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if !self.backing_matches(node).await {
            return Err(errno(libc::EINVAL));
        }
        match node.edge("backing") {
            Some(b) => b.read(offset, len).await,
            None => Ok(vec![0; len]),
        }
    }

    async fn read_impl(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = pool::take(len);
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let e = self.extent_at(at)?;
            let rel = at - e.start;
            let inner = rel % e.cluster_bytes();
            let n = (e.cluster_bytes() - inner).min((len - done) as u64) as usize;
            let data = match &e.layout {
                Layout::Flat { start } => Some(e.file.read(start.saturating_add(rel), n).await?),
                Layout::Sparse(s) => match s.lookup(&e.file, rel).await.0 {
                    Grain::At(pos) if s.compressed => {
                        Some(s.read_compressed(&e.file, pos, inner, n).await?)
                    }
                    Grain::At(pos) => Some(e.file.read(pos + inner, n).await?),
                    Grain::Zeroed => None,
                    Grain::Unallocated | Grain::Unknown if node.child("backing").is_some() => {
                        Some(self.read_backing(node, at, n).await?)
                    }
                    Grain::Unallocated | Grain::Unknown => None,
                },
            };
            let dest = &mut out[done..done + n];
            match data {
                Some(d) => {
                    dest.copy_from_slice(&d);
                    pool::give(d);
                }
                None => dest.fill(0),
            }
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset` (or, with `data` `None`, zeroes by the zeroed-grain
    /// entry, `dry_run` only checking that every grain can take one): QEMU's
    /// `vmdk_pwritev`. ENOTSUP where zeroes cannot be written so.
    async fn write_locked(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        dry_run: bool,
    ) -> io::Result<()> {
        if offset.div_ceil(SECTOR) > self.size / SECTOR {
            return Err(errno(libc::EIO));
        }
        let mut done = 0u64;
        while done < len {
            let at = offset + done;
            let e = self.extent_at(at)?;
            let rel = at - e.start;
            let cluster = e.cluster_bytes();
            let inner = rel % cluster;
            let mut n = (cluster - inner).min(len - done);
            if e.sparse().is_some_and(Sparse::is_se_sparse) {
                return Err(errno(libc::ENOTSUP));
            }
            match (&e.layout, data) {
                (Layout::Flat { .. }, None) => return Err(errno(libc::ENOTSUP)),
                (Layout::Flat { start }, Some(d)) => {
                    let piece = pool::copy_of(&d[done as usize..(done + n) as usize]);
                    e.file
                        .write(start.saturating_add(rel), piece, ReqFlags::empty())
                        .await?;
                }
                (Layout::Sparse(s), None) => {
                    let (grain, slot) = s.lookup(&e.file, rel).await;
                    if s.compressed && matches!(grain, Grain::At(_)) {
                        return Err(allocated_compressed());
                    }
                    if grain == Grain::Unknown {
                        return Err(errno(libc::EINVAL));
                    }
                    if !(s.has_zero_grain && inner == 0 && n >= cluster) {
                        return Err(errno(libc::ENOTSUP));
                    }
                    n = cluster;
                    if !dry_run && grain != Grain::Zeroed {
                        let slot = slot.ok_or_else(|| errno(libc::EINVAL))?;
                        s.set_entry(&e.file, slot, GTE_ZEROED).await?;
                    }
                }
                (Layout::Sparse(s), Some(d)) => {
                    let piece = &d[done as usize..(done + n) as usize];
                    self.write_grain(node, e, s, at, piece).await?;
                }
            }
            done += n;
            if !self.cid_updated.get() {
                self.write_cid(rand_u32()?).await?;
                self.cid_updated.set(true);
            }
        }
        Ok(())
    }

    /// Writes `piece` (within one grain) at disk byte `at` of sparse extent `e`, placing
    /// the grain first if it has no place.
    async fn write_grain(
        &self,
        node: &Node,
        e: &Extent,
        s: &Sparse,
        at: u64,
        piece: &[u8],
    ) -> io::Result<()> {
        let rel = at - e.start;
        let cluster = e.cluster_bytes();
        let inner = rel % cluster;
        let (grain, slot) = s.lookup(&e.file, rel).await;
        let zeroed = match grain {
            Grain::At(_) if s.compressed => return Err(allocated_compressed()),
            Grain::At(pos) => {
                return e
                    .file
                    .write(pos + inner, pool::copy_of(piece), ReqFlags::empty())
                    .await;
            }
            Grain::Unknown => return Err(errno(libc::EINVAL)),
            Grain::Zeroed => true,
            Grain::Unallocated => false,
        };
        // A grain whose table does not exist cannot be placed (QEMU writes tables only
        // when it makes an image).
        let slot = slot.ok_or_else(|| errno(libc::EINVAL))?;
        let pos = s.take_grain()?;
        // The grain whole: the backing file's bytes around the new ones, or zeroes.
        let base = at - at % cluster;
        let from_backing = node.child("backing").is_some() && !zeroed;
        if node.child("backing").is_some() && !self.backing_matches(node).await {
            return Err(errno(libc::EINVAL));
        }
        let mut whole = if from_backing {
            self.read_backing(node, base, cluster as usize).await?
        } else {
            let mut z = pool::take(cluster as usize);
            z.fill(0);
            z
        };
        if s.compressed {
            let end = (at + piece.len() as u64) == e.end();
            if inner != 0 || (piece.len() as u64) < cluster && !end {
                return Err(errno(libc::EINVAL));
            }
            if !s.has_marker {
                return Err(errno(libc::EINVAL));
            }
            // As QEMU: the grain is first written whole, then the compressed grain over
            // its start; the next grain goes right after that.
            e.file.write(pos, whole, ReqFlags::empty()).await?;
            let compressed = s.compress(at / SECTOR, piece)?;
            let end = (pos + compressed.len() as u64).div_ceil(SECTOR);
            let r = e.file.write(pos, compressed, ReqFlags::empty()).await;
            s.next_cluster_sector.set(end);
            r?;
        } else {
            whole[inner as usize..inner as usize + piece.len()].copy_from_slice(piece);
            e.file.write(pos, whole, ReqFlags::empty()).await?;
        }
        s.set_entry(&e.file, slot, (pos / SECTOR) as u32).await
    }

    /// Writes content id `cid` into the descriptor, durably (QEMU's `vmdk_write_cid`).
    async fn write_cid(&self, cid: u32) -> io::Result<()> {
        let len = if self.desc_offset == 0 {
            let n = self.file.len();
            if n > descriptor::MAX_REWRITTEN {
                tracing::error!("VMDK description file too big");
                return Err(errno(libc::EFBIG));
            }
            n as usize
        } else {
            DESC_SIZE
        };
        let desc = self.file.read(self.desc_offset, len).await?;
        let desc = descriptor::with_cid(desc, cid).ok_or_else(|| errno(libc::EINVAL))?;
        self.file
            .write(self.desc_offset, desc, ReqFlags::empty())
            .await?;
        self.file.flush().await
    }

    async fn write_impl(&self, node: &Node, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(places) = self.placed(offset, data.len()).await {
            // Unlike QEMU, a write whose grains all have their place does not wait for
            // writes that are placing others: a placed grain does not move.
            let mut done = 0;
            for (file, at, n) in places {
                let piece = pool::copy_of(&data[done..done + n]);
                file.write(at, piece, ReqFlags::empty()).await?;
                done += n;
            }
            return Ok(());
        }
        let _one_at_a_time = self.lock.lock().await;
        self.write_locked(node, offset, data.len() as u64, Some(data), false)
            .await
    }

    /// Where each piece of a `len`-byte write at `offset` goes, if every piece goes to a
    /// place it already has (flat extents, placed uncompressed grains) and the content id
    /// was already renewed: (file, byte in it, length).
    async fn placed(&self, offset: u64, len: usize) -> Option<Vec<(&Rc<Child>, u64, usize)>> {
        if !self.cid_updated.get() || offset.div_ceil(SECTOR) > self.size / SECTOR {
            return None;
        }
        let mut places = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = offset + done as u64;
            let e = self.extent_at(at).ok()?;
            let rel = at - e.start;
            let inner = rel % e.cluster_bytes();
            let n = (e.cluster_bytes() - inner).min((len - done) as u64) as usize;
            let place = match &e.layout {
                Layout::Flat { start } => start.checked_add(rel)?,
                Layout::Sparse(s) if s.compressed || s.is_se_sparse() => return None,
                Layout::Sparse(s) => match s.lookup(&e.file, rel).await.0 {
                    Grain::At(pos) => pos + inner,
                    _ => return None,
                },
            };
            places.push((&e.file, place, n));
            done += n;
        }
        Some(places)
    }

    /// Zeroes as QEMU's block layer asks them of the driver: pieces cut at the zeroing
    /// alignment (the largest grain), each by zeroed-grain entries where every grain
    /// takes one, else written as data.
    async fn zero_impl(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let align = self
            .extents
            .iter()
            .filter_map(|e| e.sparse().map(|_| e.cluster_bytes()))
            .max()
            .unwrap_or(1);
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let head = at % align;
            let n = if head != 0 {
                (align - head).min(end - at)
            } else if end - at > align {
                end - at - end % align
            } else {
                end - at
            };
            let whole = {
                let _one_at_a_time = self.lock.lock().await;
                match self.write_locked(node, at, n, None, true).await {
                    Ok(()) => self.write_locked(node, at, n, None, false).await,
                    Err(e) => Err(e),
                }
            };
            match whole {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    ferrite_block::driver::write_zeroes_as_data(
                        at,
                        n,
                        flags,
                        async |p, zeroes: Vec<u8>| self.write_impl(node, p, &zeroes).await,
                    )
                    .await?
                }
                r => r?,
            }
            at += n;
        }
        Ok(())
    }

    fn extent_info(e: &Extent) -> QDict {
        let mut d = QDict::new()
            .with("filename", e.file.node().filename())
            .with("format", e.kind.clone().unwrap_or_default())
            .with("virtual-size", e.sectors * SECTOR);
        if let Some(s) = e.sparse() {
            d.insert("cluster-size", s.grain_sectors * SECTOR);
            if s.compressed {
                d.insert("compressed", true);
            }
        }
        d
    }
}

fn allocated_compressed() -> io::Error {
    tracing::error!("Could not write to allocated cluster for streamOptimized");
    errno(libc::EIO)
}

fn rand_u32() -> io::Result<u32> {
    let b = ferrite_crypto::random(4).map_err(|_| errno(libc::EIO))?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Whether two extents are placed alike (QEMU's `vmdk_extents_type_eq`).
fn same_layout(a: &Extent, b: &Extent) -> bool {
    match (a.sparse(), b.sparse()) {
        (None, None) => true,
        (Some(x), Some(y)) => x.compressed == y.compressed && x.grain_sectors == y.grain_sectors,
        _ => false,
    }
}

impl Driver for Vmdk {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    fn gathered_child_options(&self, node: &Node, backing_overridden: bool) -> Option<QDict> {
        // The extents follow from the descriptor: only the file and a backing file the user
        // chose say anything.
        let mut d = QDict::new();
        if let Some(file) = node.child("file") {
            d.insert("file", file.full_options());
        }
        if backing_overridden {
            let backing = node.child("backing");
            d.insert(
                "backing",
                backing.map_or(QObject::Null, |b| b.full_options().into()),
            );
        }
        Some(d)
    }

    crate::simple_format_answers!();
    fn format_name(&self) -> &'static str {
        "vmdk"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(self.read_impl(node, offset, len))
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let r = self.write_impl(node, offset, &data).await;
            pool::give(data);
            r?;
            // No FUA of its own: durable by a flush, as QEMU's block layer makes it.
            if flags.contains(ReqFlags::FUA) {
                self.flush(node).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.zero_impl(node, offset, len, flags))
    }

    /// The image file and every extent file.
    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.file.flush().await?;
            for e in &self.extents {
                if !Rc::ptr_eq(&e.file, &self.file) {
                    e.file.flush().await?;
                }
            }
            Ok(())
        })
    }

    fn write_compressed<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        self.write(node, offset, data, ReqFlags::empty())
    }

    fn can_write_compressed(&self) -> bool {
        true
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Status> {
        Box::pin(async move {
            let e = self.extent_at(offset)?;
            let rel = offset - e.start;
            let inner = rel % e.cluster_bytes();
            let n = (e.cluster_bytes() - inner).min(len);
            match &e.layout {
                Layout::Flat { start } => {
                    Status::placed(&e.file, start.saturating_add(rel), n).await
                }
                Layout::Sparse(s) => Ok(match s.lookup(&e.file, rel).await.0 {
                    Grain::Unknown => return Err(errno(libc::EIO)),
                    Grain::Unallocated => return Status::below(node, offset, n).await,
                    Grain::Zeroed => Status {
                        len: n,
                        data: false,
                        zero: true,
                        allocated: true,
                    },
                    Grain::At(_) => Status::data(n),
                }),
            }
        })
    }

    fn cluster_size(&self) -> Option<u64> {
        let first = self.extents.first()?;
        if !self.extents.iter().all(|e| same_layout(first, e)) {
            return None;
        }
        first.sparse().map(|_| first.cluster_bytes())
    }

    fn format_specific(&self) -> Option<QDict> {
        let extents: Vec<QObject> = self
            .extents
            .iter()
            .map(|e| QObject::Dict(Self::extent_info(e)))
            .collect();
        Some(
            QDict::new().with("type", "vmdk").with(
                "data",
                QDict::new()
                    .with("create-type", self.create_type.as_str())
                    .with("cid", u64::from(self.cid))
                    .with("parent-cid", u64::from(self.parent_cid))
                    .with("extents", QObject::List(extents)),
            ),
        )
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        self.parent_hint
            .clone()
            .map(|h| (h, Some("vmdk".to_owned())))
    }
}
