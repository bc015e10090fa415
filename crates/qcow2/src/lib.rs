//! `qcow2`: QEMU's copy-on-write image format (docs/interop/qcow2.txt).
//!
//! The module splits by concept: `header` (cluster 0), `entry` (L1/L2 entry bits), `cache`
//! (metadata tables in memory), `meta` (refcounts, allocation, write-back order), `map`
//! (guest-to-host mapping), `compress`, `claims` (request serialisation per guest
//! cluster), `create` (formatting a new image). This file is the driver: the request paths.

mod bitmaps;
mod cache;
mod claims;
mod compress;
pub(crate) mod create;
mod entry;
pub(crate) mod header;
mod map;
mod meta;
mod new_image;
mod snapshot;

/// Registers the `qcow2` driver.
pub fn register(registry: &ferrite_block::Registry) {
    registry.register(Rc::new(Qcow2Factory));
}

use claims::Claims;
use compress::Codec;
use entry::{COPIED, Cluster, SUB_ALL_ALLOC, SUB_ALL_ZERO, ZERO};
use ferrite_block::Child;
use ferrite_block::Graph;
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::Perm;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};
use header::{Header, autoclear, compat, incompat};
use map::Source;
pub(crate) use meta::Corruption;
use meta::{FreeKind, Meta, read_at};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Called when corruption is found: the node, what, and whether it is fatal (the image was
/// writable and is now marked corrupt).
pub(crate) type CorruptionHook = Rc<dyn Fn(&Node, &Corruption, bool)>;

/// `BLOCK_IMAGE_CORRUPTED` through `events`.
fn corruption_event(events: Rc<dyn ferrite_block::EventSink>) -> CorruptionHook {
    Rc::new(move |node: &Node, c: &Corruption, fatal: bool| {
        let mut d = QDict::new()
            .with("device", "")
            .with("node-name", node.name())
            .with("msg", c.msg.as_str());
        d.insert_opt("offset", c.offset);
        d.insert_opt("size", c.size);
        d.insert("fatal", fatal);
        events.emit("BLOCK_IMAGE_CORRUPTED", d);
    })
}

/// The `qcow2` driver's factory.
pub(crate) struct Qcow2Factory;

impl DriverFactory for Qcow2Factory {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let read_only = ctx.settings().read_only;
            let file = ctx.open_child("file").await?;
            let drv =
                Qcow2Driver::open(opts, &file, read_only, corruption_event(ctx.events())).await?;
            open_data_file(ctx, &drv, read_only).await?;
            ctx.take_position_now();
            match opts.get("backing") {
                Some(QObject::Null) => {}
                Some(v) => {
                    let v = v.clone();
                    ctx.open_child_ref("backing", &v).await?;
                }
                None => {
                    if let Some(spec) = drv.backing_spec() {
                        open_backing(ctx, &file, spec).await?;
                    }
                }
            }
            Ok(Box::new(drv) as Box<dyn Driver>)
        })
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(new_image::create(graph, opts))
    }

    fn can_amend(&self) -> bool {
        true
    }

    fn amend<'a>(&'a self, _node: &'a Rc<Node>, opts: &'a Args) -> LocalFut<'a, ()> {
        // QEMU amends only encryption, and ferrite opens no encrypted image.
        Box::pin(async move {
            if opts.get("encrypt").is_some() {
                return Err(Error::generic("image is not encrypted, can't amend"));
            }
            Ok(())
        })
    }

    fn probe(&self, head: &[u8]) -> bool {
        head.starts_with(b"QFI\xfb")
    }

    fn supports_backing(&self) -> bool {
        true
    }
}

/// The external data file of an image: the `data-file` option, or the file the header
/// names (relative to the working directory, as QEMU takes it).
async fn open_data_file(
    ctx: &mut OpenCtx<'_>,
    drv: &Qcow2Driver,
    read_only: bool,
) -> Result<(), Error> {
    let opts = ctx.opts();
    let Some(spec) = drv.data_file() else {
        if opts.get("data-file").is_some() {
            return Err(Error::generic(
                "'data-file' can only be set for images with an external data file",
            ));
        }
        return Ok(());
    };
    if let Some(v) = opts.get("data-file") {
        let v = v.clone();
        return ctx.open_child_ref("data-file", &v).await.map(drop);
    }
    let name = spec
        .name
        .ok_or_else(|| Error::generic("'data-file' is required for this image"))?;
    let file_opts = QDict::new()
        .with("driver", "file")
        .with("filename", name.as_str())
        .with("read-only", read_only);
    ctx.open_child_opts("data-file", file_opts).await.map(drop)
}

/// Opens the backing file the header names: its path relative to the image's, its format
/// from the header or probed, read-only.
async fn open_backing(ctx: &mut OpenCtx<'_>, file: &Child, spec: BackingSpec) -> Result<(), Error> {
    let path = ferrite_block::filename::backing_path(&file.node().filename(), &spec.filename)?;
    let failed = |e: Error| {
        Error::generic(format!(
            "Could not open backing file: Could not open '{path}': {}",
            e.desc
        ))
    };
    let format = match spec.format {
        Some(f) => f,
        None => ctx.probe(&path).await.map_err(failed)?.to_owned(),
    };
    if ctx.graph().registry().get(&format).is_none() {
        return Err(Error::generic(format!(
            "Could not open backing file: Unknown driver '{format}'"
        )));
    }
    ctx.open_image("backing", &path, &format, true)
        .await
        .map(drop)
        .map_err(failed)
}

/// Default L2 cache limit (QEMU: `DEFAULT_L2_CACHE_MAX_SIZE`).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Seconds between cache cleanings unless `cache-clean-interval` says otherwise.
const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;
/// Frees waiting for a write-back before one is forced.
const MAX_PENDING_FREES: usize = 4096;

fn enotsup() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOTSUP)
}

/// An open qcow2 image.
pub(crate) struct Qcow2Driver {
    meta: tokio::sync::Mutex<Meta>,
    claims: Claims,
    size: Cell<u64>,
    cluster_bits: u32,
    extended: bool,
    version: u32,
    codec: Codec,
    read_only: Cell<bool>,
    /// Corruption was signalled; every request fails from now on when it was fatal.
    dead: Cell<bool>,

    lazy_refcounts: bool,
    discard_no_unref: bool,
    /// The dirty bit is set on disk (lazy refcounts after the first write).
    dirty_set: Cell<bool>,
    backing: RefCell<Option<(String, Option<String>)>>,
    on_corruption: CorruptionHook,
    /// The internal snapshots (for queries; the table on disk is the truth).
    snapshots: RefCell<Vec<snapshot::Snapshot>>,
    /// Cached tables unused for this long are dropped (`cache-clean-interval`; zero: never).
    clean_interval: Duration,
    last_clean: Cell<Instant>,
    /// The image keeps its data in an external file (the `data-file` child).
    data_file: Option<DataFile>,
    /// Persistent bitmaps read at open, for the node to take.
    loaded: RefCell<Vec<Rc<DirtyBitmap>>>,
}

/// What the header says about an external data file.
#[derive(Clone)]
pub(crate) struct DataFile {
    /// The file name the header records, if any.
    pub(crate) name: Option<String>,
    /// The data file is also a valid raw image (`data-file-raw`).
    pub(crate) raw: bool,
}

/// What the graph needs to know to finish opening: the backing file the header names.
pub(crate) struct BackingSpec {
    pub(crate) filename: String,
    pub(crate) format: Option<String>,
}

fn open_err(e: &io::Error) -> Error {
    Error::generic(format!(
        "Could not read qcow2 header: {}",
        ferrite_qapi::os_msg(e)
    ))
}

impl Qcow2Driver {
    /// Opens the image on `file`.
    pub(crate) async fn open(
        args: &Args,
        file: &Child,
        read_only: bool,
        on_corruption: CorruptionHook,
    ) -> Result<Qcow2Driver, Error> {
        let probe = read_at(file, 0, Header::PROBE_LEN)
            .await
            .map_err(|e| open_err(&e))?;
        let bits = Header::probe_cluster_bits(&probe)?;
        let cs = 1u64 << bits;
        let first = read_at(file, 0, cs.min(file.len().max(512)) as usize)
            .await
            .map_err(|e| open_err(&e))?;
        let h = Header::parse(&first, file.len())?;
        if h.crypt_method != 0 {
            return Err(Error::generic(
                "Encrypted qcow2 images are not supported by ferrite",
            ));
        }
        let data_file = if h.incompatible & incompat::DATA_FILE != 0 {
            if !read_only {
                return Err(Error::generic(
                    "ferrite opens qcow2 images with an external data file read-only only (for now); set 'read-only': true",
                ));
            }
            Some(DataFile {
                name: h.data_file_name(),
                raw: h.autoclear & autoclear::DATA_FILE_RAW != 0,
            })
        } else {
            None
        };
        if h.incompatible & incompat::CORRUPT != 0 && !read_only {
            return Err(Error::generic(
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let lazy_opt = args.opt_bool("lazy-refcounts");
        if lazy_opt == Some(true) && h.version < 3 {
            return Err(Error::generic(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
            ));
        }
        let lazy = lazy_opt.unwrap_or(h.compatible & compat::LAZY_REFCOUNTS != 0);
        let (l2_tables, rb_tables) = cache_sizes(args, &h)?;
        let clean_interval = clean_interval(args)?;
        let codec = if h.compression_type == 1 {
            Codec::Zstd
        } else {
            Codec::Deflate
        };
        let backing = h.backing_file.clone().map(|f| (f, h.backing_format()));
        let version = h.version;
        let extended = h.extended_l2();
        let size = h.size;
        let was_dirty = h.incompatible & incompat::DIRTY != 0;
        let mut meta = Meta::load(file, h, l2_tables, rb_tables)
            .await
            .map_err(|e| open_err(&e))?;
        let discard_unmap = args.opt_str("discard") == Some("unmap");
        meta.pass_discard_request = args
            .opt_bool("pass-discard-request")
            .unwrap_or(discard_unmap);
        meta.pass_discard_other = args.opt_bool("pass-discard-other").unwrap_or(false);
        let snapshots = snapshot::list(file, &meta)
            .await
            .map(|(l, _)| l)
            .unwrap_or_default();
        let loaded = bitmaps::load(file, &mut meta).await.map_err(|e| {
            Error::generic(format!(
                "Could not load the bitmaps of the image: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
        if !read_only {
            prepare_for_writing(file, &mut meta, was_dirty)
                .await
                .map_err(|e| open_err(&e))?;
        }
        Ok(Qcow2Driver {
            meta: tokio::sync::Mutex::new(meta),
            claims: Claims::default(),
            size: Cell::new(size),
            cluster_bits: bits,
            extended,
            version,
            codec,
            read_only: Cell::new(read_only),
            dead: Cell::new(false),
            lazy_refcounts: lazy,
            discard_no_unref: args.opt_bool("discard-no-unref").unwrap_or(false),
            dirty_set: Cell::new(false),
            backing: RefCell::new(backing),
            on_corruption,
            snapshots: RefCell::new(snapshots),
            clean_interval,
            last_clean: Cell::new(Instant::now()),
            data_file,
            loaded: RefCell::new(loaded),
        })
    }

    /// The backing file named in the header, for the graph to open when the options do
    /// not say otherwise.
    pub(crate) fn backing_spec(&self) -> Option<BackingSpec> {
        self.backing.borrow().as_ref().map(|(f, fmt)| BackingSpec {
            filename: f.clone(),
            format: fmt.clone(),
        })
    }

    /// The external data file, if the image has one.
    pub(crate) fn data_file(&self) -> Option<DataFile> {
        self.data_file.clone()
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn file(node: &Node) -> io::Result<Rc<Child>> {
        node.edge("file")
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEDIUM))
    }

    fn alive(&self) -> io::Result<()> {
        if self.dead.get() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEDIUM));
        }
        Ok(())
    }

    /// Reports corruption found during a request (once), and for a writable image marks
    /// it corrupt on disk and stops all further requests, as QEMU does.
    async fn signal_corruption(&self, node: &Node, file: &Child, meta: &mut Meta) {
        let Some(c) = meta.corrupt.clone() else {
            return;
        };
        if self.dead.get() || meta.h.incompatible & incompat::CORRUPT != 0 {
            return;
        }
        let fatal = !self.read_only.get();
        if fatal {
            meta.h.incompatible |= incompat::CORRUPT;
            let _ = meta.write_header(file).await;
            let _ = file.flush().await;
            self.dead.set(true);
        } else {
            // Report each read-only finding once; the next one may be different.
            meta.corrupt = None;
        }
        (self.on_corruption)(node, &c, fatal);
    }

    async fn check<T>(&self, node: &Node, file: &Child, r: io::Result<T>) -> io::Result<T> {
        if r.is_err() {
            let mut m = self.meta.lock().await;
            if m.corrupt.is_some() {
                self.signal_corruption(node, file, &mut m).await;
            }
        }
        r
    }

    // ----- reads -----

    /// Reads guest bytes through the current mapping (the request path, and the source of
    /// copy-on-write data).
    async fn read_guest(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: usize,
    ) -> io::Result<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut pos = 0usize;
        while pos < len {
            let (src, run) = {
                let mut m = self.meta.lock().await;
                m.map(file, offset + pos as u64, (len - pos) as u64).await?
            };
            let run = run as usize;
            let piece = match src {
                Source::Zero => None,
                Source::Backing => self.read_backing(node, offset + pos as u64, run).await?,
                Source::Data(host) => {
                    // Data clusters live in the external data file when there is one.
                    let data = node.edge("data-file");
                    Some(read_at(data.as_deref().unwrap_or(file), host, run).await?)
                }
                Source::Compressed {
                    offset: co,
                    len: cl,
                    skip,
                } => {
                    let cluster = self.read_compressed(file, co, cl).await?;
                    Some(cluster[skip as usize..skip as usize + run].to_vec())
                }
            };
            if pos == 0 && run == len {
                return Ok(piece.unwrap_or_else(|| vec![0u8; len]));
            }
            let buf = out.get_or_insert_with(|| vec![0u8; len]);
            if let Some(p) = piece {
                buf[pos..pos + run].copy_from_slice(&p);
            }
            pos += run;
        }
        Ok(out.unwrap_or_default())
    }

    /// Bytes of the backing file (zeroes past its end or without one); `None` for zeroes.
    async fn read_backing(
        &self,
        node: &Node,
        offset: u64,
        len: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some(b) = node.edge("backing") else {
            return Ok(None);
        };
        let blen = b.len();
        if offset >= blen {
            return Ok(None);
        }
        if offset + len as u64 <= blen {
            return Ok(Some(b.read(offset, len).await?));
        }
        let mut v = vec![0u8; len];
        let got = b.read(offset, (blen - offset) as usize).await?;
        v[..got.len()].copy_from_slice(&got);
        Ok(Some(v))
    }

    async fn read_compressed(&self, file: &Child, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let raw = read_at(file, offset, len as usize).await?;
        compress::decompress(self.codec, &raw, self.cs() as usize)
    }

    /// Whether a guest range is known to read as zeroes without reading it: one mapping
    /// covers it, and that is a zero cluster or nothing over no backing data.
    async fn known_zero(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<bool> {
        let (src, run) = {
            let mut m = self.meta.lock().await;
            m.map(file, offset, len).await?
        };
        Ok(run == len
            && match src {
                Source::Zero => true,
                Source::Backing => node.child("backing").is_none_or(|b| offset >= b.len()),
                _ => false,
            })
    }

    // ----- writes -----

    async fn write_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cs = self.cs();
        let len = data.len() as u64;
        let _claim = self
            .claims
            .claim(offset / cs, (offset + len - 1) / cs)
            .await;
        let mut pos = 0u64;
        while pos < len {
            let off = offset + pos;
            let gc = off / cs;
            let in_off = off % cs;
            let (e, bm) = {
                let mut m = self.meta.lock().await;
                m.l2_entry(file, gc).await?
            };
            let kind = entry::decode(e, self.cluster_bits, self.extended);
            let n = (cs - in_off).min(len - pos);
            match kind {
                Cluster::Normal { host, copied: true } => {
                    if self.extended {
                        self.write_subclusters(
                            node,
                            file,
                            gc,
                            host,
                            bm,
                            in_off,
                            &data[pos as usize..(pos + n) as usize],
                        )
                        .await?;
                        pos += n;
                        continue;
                    }
                    // In place; extend over following clusters mapped contiguously.
                    let mut run = n;
                    loop {
                        if pos + run >= len {
                            break;
                        }
                        let (e2, _) = {
                            let mut m = self.meta.lock().await;
                            m.l2_entry(file, gc + run.div_ceil(cs)).await?
                        };
                        match entry::decode(e2, self.cluster_bits, false) {
                            Cluster::Normal {
                                host: h2,
                                copied: true,
                            } if h2 == host + (in_off + run) => {}
                            _ => break,
                        }
                        run += cs.min(len - pos - run);
                    }
                    {
                        let mut m = self.meta.lock().await;
                        m.check_data_cluster(file, gc, host)?;
                        m.check_overlap(host + in_off, run)?;
                    }
                    file.write(
                        host + in_off,
                        data[pos as usize..(pos + run) as usize].to_vec(),
                        ReqFlags::empty(),
                    )
                    .await?;
                    pos += run;
                }
                _ => {
                    // Allocate: this cluster and following ones that also need it.
                    let mut clusters = 1u64;
                    if !self.extended {
                        while pos + (cs - in_off) + (clusters - 1) * cs < len {
                            let (e2, _) = {
                                let mut m = self.meta.lock().await;
                                m.l2_entry(file, gc + clusters).await?
                            };
                            if matches!(
                                entry::decode(e2, self.cluster_bits, false),
                                Cluster::Normal { copied: true, .. }
                            ) {
                                break;
                            }
                            clusters += 1;
                            if clusters * cs >= 32 << 20 {
                                break;
                            }
                        }
                    }
                    let end = (gc + clusters) * cs;
                    let n = end.min(offset + len) - off;
                    self.write_allocating(
                        node,
                        file,
                        gc,
                        clusters,
                        in_off,
                        &data[pos as usize..(pos + n) as usize],
                    )
                    .await?;
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `in_off` of guest cluster `gc` and on into `clusters` clusters that
    /// all get new host clusters, filling what the data does not cover from the old content.
    async fn write_allocating(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        clusters: u64,
        in_off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.mark_dirty_once(file).await?;
        let cs = self.cs();
        let start = gc * cs;
        let total = clusters * cs;
        let data_end = in_off + data.len() as u64;
        // A pooled buffer: every byte is written below.
        let mut buf = ferrite_block::io::pool::take(total as usize);
        // Head and tail from the old content (backing file, compressed data, shared cluster).
        for (from, to) in [(0, in_off), (data_end, total)] {
            if from >= to {
                continue;
            }
            let part = &mut buf[from as usize..to as usize];
            if self.known_zero(node, file, start + from, to - from).await? {
                part.fill(0);
                continue;
            }
            let old = self
                .read_guest(node, file, start + from, (to - from) as usize)
                .await?;
            part.copy_from_slice(&old);
        }
        buf[in_off as usize..data_end as usize].copy_from_slice(data);
        let host = {
            let mut m = self.meta.lock().await;
            m.alloc(file, clusters).await?
        };
        file.write(host, buf, ReqFlags::empty()).await?;
        let mut m = self.meta.lock().await;
        for k in 0..clusters {
            let (table, idx) = m.l2_for_write(file, gc + k).await?;
            let (old, _) = m.l2_entry(file, gc + k).await?;
            let bitmap = if self.extended { SUB_ALL_ALLOC } else { 0 };
            m.set_l2(table, idx, (host + k * cs) | COPIED, bitmap);
            self.release_old(&mut m, old, FreeKind::Other);
        }
        self.maybe_write_back(file, &mut m).await
    }

    /// Drops this layer's reference to what an L2 entry pointed to.
    fn release_old(&self, m: &mut Meta, old: u64, kind: FreeKind) {
        let cs = self.cs();
        match entry::decode(old, self.cluster_bits, self.extended) {
            Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                m.free(host, 1, kind);
            }
            Cluster::Compressed { offset, len } => {
                let (first, n) = entry::compressed_clusters(offset, len, cs);
                m.free(first, n, kind);
            }
            _ => {}
        }
    }

    async fn maybe_write_back(&self, file: &Child, m: &mut Meta) -> io::Result<()> {
        if m.frees_pending() >= MAX_PENDING_FREES {
            m.write_back(file, false).await?;
        }
        Ok(())
    }

    /// Extended L2: writes into an allocated cluster whose touched subclusters may not all
    /// be allocated yet; partial subclusters are completed from the old content.
    #[allow(clippy::too_many_arguments)]
    async fn write_subclusters(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        host: u64,
        bm: u64,
        in_off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cs = self.cs();
        let scs = cs / 32;
        let end = in_off + data.len() as u64;
        let first = (in_off / scs) as u32;
        let last = (end.div_ceil(scs)) as u32;
        let all_data = (first..last).all(|i| entry::sub_state(bm, i) == entry::Sub::Data);
        {
            let mut m = self.meta.lock().await;
            m.check_data_cluster(file, gc, host)?;
            m.check_overlap(host + in_off, data.len() as u64)?;
        }
        if all_data {
            return file
                .write(host + in_off, data.to_vec(), ReqFlags::empty())
                .await;
        }
        let from = u64::from(first) * scs;
        let to = u64::from(last) * scs;
        let mut buf = vec![0u8; (to - from) as usize];
        let start = gc * cs;
        if from < in_off {
            let old = self
                .read_guest(node, file, start + from, (in_off - from) as usize)
                .await?;
            buf[..old.len()].copy_from_slice(&old);
        }
        if end < to {
            let old = self
                .read_guest(node, file, start + end, (to - end) as usize)
                .await?;
            let at = (end - from) as usize;
            buf[at..].copy_from_slice(&old);
        }
        buf[(in_off - from) as usize..(end - from) as usize].copy_from_slice(data);
        file.write(host + from, buf, ReqFlags::empty()).await?;
        let mut m = self.meta.lock().await;
        let (table, idx) = m.l2_for_write(file, gc).await?;
        let (e, bm) = m.l2_entry(file, gc).await?;
        m.set_l2(
            table,
            idx,
            e,
            entry::sub_set(bm, first, last, entry::Sub::Data),
        );
        Ok(())
    }

    /// With lazy refcounts, the dirty bit goes on disk before the first data cluster is
    /// allocated (where QEMU defers refcount updates).
    async fn mark_dirty_once(&self, file: &Child) -> io::Result<()> {
        if !self.lazy_refcounts || self.dirty_set.get() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        if m.h.incompatible & incompat::DIRTY == 0 {
            m.h.incompatible |= incompat::DIRTY;
            m.write_header(file).await?;
            file.flush().await?;
        }
        self.dirty_set.set(true);
        Ok(())
    }

    // ----- zeroes and discard -----

    async fn zero_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let cs = self.cs();
        let zero_clusters = self.version >= 3 || self.extended;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let c_end = ((gc + 1) * cs).min(end);
            let whole = pos % cs == 0 && (c_end % cs == 0 || c_end == self.size.get());
            if whole && zero_clusters {
                // Every whole cluster from here at once.
                let mut last = gc;
                while (last + 2) * cs <= end {
                    last += 1;
                }
                if c_end == self.size.get() && c_end % cs != 0 {
                    last = gc;
                }
                self.zero_clusters(file, gc, last, flags).await?;
                pos = ((last + 1) * cs).min(end);
                continue;
            }
            // A partial cluster: nothing to do if it already reads as zeroes.
            if self.known_zero(node, file, pos, c_end - pos).await? {
                pos = c_end;
                continue;
            }
            if flags.contains(ReqFlags::NO_FALLBACK) {
                return Err(enotsup());
            }
            self.write_impl(node, file, pos, &vec![0u8; (c_end - pos) as usize])
                .await?;
            pos = c_end;
        }
        Ok(())
    }

    async fn zero_clusters(
        &self,
        file: &Child,
        first: u64,
        last: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let _claim = self.claims.claim(first, last).await;
        let unmap = flags.contains(ReqFlags::MAY_UNMAP) && !self.discard_no_unref;
        let mut m = self.meta.lock().await;
        for gc in first..=last {
            let (old, _) = m.l2_entry(file, gc).await?;
            let kind = entry::decode(old, self.cluster_bits, self.extended);
            let keep = match kind {
                Cluster::Normal { host, copied: true } if !unmap => Some(host),
                Cluster::Zero { host: Some(host) } if !unmap => Some(host),
                _ => None,
            };
            let (e, bm) = match (self.extended, keep) {
                (true, Some(h)) => (h | COPIED, SUB_ALL_ZERO),
                (true, None) => (0, SUB_ALL_ZERO),
                (false, Some(h)) => (h | COPIED | ZERO, 0),
                (false, None) => (ZERO, 0),
            };
            if e == old && (!self.extended || bm == m.l2_entry(file, gc).await?.1) {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, bm);
            if keep.is_none() {
                self.release_old(&mut m, old, FreeKind::Request);
            }
        }
        self.maybe_write_back(file, &mut m).await
    }

    async fn discard_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let cs = self.cs();
        // Only whole clusters (and the partial last one of the image) are discarded.
        let first = offset.div_ceil(cs);
        let end = offset + len;
        let last_excl = if end == self.size.get() {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last_excl {
            return Ok(());
        }
        let has_backing = node.child("backing").is_some();
        if has_backing && self.version < 3 {
            // v2 has no zero clusters: discarding would expose the backing file's data,
            // so QEMU leaves such clusters alone.
            return Ok(());
        }
        let _claim = self.claims.claim(first, last_excl - 1).await;
        let mut m = self.meta.lock().await;
        for gc in first..last_excl {
            let (old, obm) = m.l2_entry(file, gc).await?;
            let kind = entry::decode(old, self.cluster_bits, self.extended);
            let allocated = !matches!(kind, Cluster::Unallocated | Cluster::Zero { host: None })
                || (self.extended && obm != 0);
            if self.discard_no_unref
                && let Cluster::Normal { host, copied: true } | Cluster::Zero { host: Some(host) } =
                    kind
            {
                let (table, idx) = m.l2_for_write(file, gc).await?;
                if self.extended {
                    m.set_l2(table, idx, host | COPIED, SUB_ALL_ZERO);
                } else if self.version >= 3 {
                    m.set_l2(table, idx, host | COPIED | ZERO, 0);
                }
                continue;
            }
            let (e, bm) = if has_backing || allocated {
                if self.extended {
                    (0, SUB_ALL_ZERO)
                } else if self.version >= 3 {
                    (ZERO, 0)
                } else {
                    (0, 0)
                }
            } else {
                (0, 0)
            };
            if e == old && bm == obm {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, bm);
            self.release_old(&mut m, old, FreeKind::Request);
        }
        self.maybe_write_back(file, &mut m).await
    }

    // ----- compressed writes -----

    /// Writes whole clusters compressed (QEMU's `write -c`, backup `compress`): each
    /// cluster that compresses well goes into a byte range shared with its neighbours.
    pub(crate) async fn write_compressed_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cs = self.cs();
        if offset % cs != 0
            || (data.len() as u64 % cs != 0 && offset + data.len() as u64 != self.size.get())
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        for (k, chunk) in data.chunks(cs as usize).enumerate() {
            let gc = offset / cs + k as u64;
            let mut full = chunk.to_vec();
            full.resize(cs as usize, 0);
            let Some(c) = compress::compress(self.codec, &full) else {
                self.write_impl(node, file, gc * cs, chunk).await?;
                continue;
            };
            let _claim = self.claims.claim(gc, gc).await;
            let clusters = (c.len() as u64).div_ceil(cs);
            let host = {
                let mut m = self.meta.lock().await;
                m.alloc(file, clusters).await?
            };
            let clen = c.len() as u64;
            file.write(host, c, ReqFlags::empty()).await?;
            let mut m = self.meta.lock().await;
            let (table, idx) = m.l2_for_write(file, gc).await?;
            let (old, _) = m.l2_entry(file, gc).await?;
            m.set_l2(
                table,
                idx,
                entry::compressed_entry(host, clen, self.cluster_bits),
                0,
            );
            self.release_old(&mut m, old, FreeKind::Other);
        }
        Ok(())
    }

    // ----- size -----

    async fn truncate_impl(&self, node: &Node, file: &Child, size: u64) -> io::Result<()> {
        let old = self.size.get();
        if size % 512 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if size < old {
            if !self.snapshots.borrow().is_empty() {
                return Err(enotsup());
            }
            // Drop everything past the new end.
            let cs = self.cs();
            let from = size.div_ceil(cs) * cs;
            if size % cs != 0 {
                let tail = (size.div_ceil(cs) * cs).min(old) - size;
                self.zero_impl(node, file, size, tail, ReqFlags::empty())
                    .await?;
            }
            if from < old {
                let _claim = self.claims.claim(from / cs, old.div_ceil(cs) - 1).await;
                let mut m = self.meta.lock().await;
                for gc in from / cs..old.div_ceil(cs) {
                    let (e, bm) = m.l2_entry(file, gc).await?;
                    if e == 0 && bm == 0 {
                        continue;
                    }
                    let (table, idx) = m.l2_for_write(file, gc).await?;
                    m.set_l2(table, idx, 0, 0);
                    self.release_old(&mut m, e, FreeKind::Other);
                }
            }
        }
        let mut m = self.meta.lock().await;
        let needed = m.h.l1_needed(size);
        if needed > u64::from(m.h.l1_size) {
            m.grow_l1(file, needed).await?;
        }
        m.h.size = size;
        m.write_back(file, true).await?;
        m.write_header(file).await?;
        file.flush().await?;
        drop(m);
        self.size.set(size);
        // The new area reads as zeroes even where a longer backing file has data.
        if let Some(b) = node.child("backing")
            && size > old
            && b.len() > old
        {
            let end = size.min(b.len());
            self.zero_impl(node, file, old, end - old, ReqFlags::empty())
                .await?;
        }
        Ok(())
    }

    /// Writes everything back, stores the persistent bitmaps and marks the image clean.
    async fn close_impl(&self, node: &Node, file: &Child) -> io::Result<()> {
        if self.read_only.get() || self.dead.get() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        m.write_back(file, true).await?;
        let node_bitmaps = node.bitmaps();
        bitmaps::store(file, &mut m, &node_bitmaps).await?;
        if m.h.incompatible & incompat::DIRTY != 0 {
            m.h.incompatible &= !incompat::DIRTY;
            m.write_header(file).await?;
            file.flush().await?;
        }
        self.dirty_set.set(false);
        Ok(())
    }
}

/// `SnapshotInfo` of an internal snapshot.
fn snapshot_info(s: &snapshot::Snapshot) -> QDict {
    QDict::new()
        .with("id", s.id.as_str())
        .with("name", s.name.as_str())
        .with("vm-state-size", s.vm_state_size)
        .with("date-sec", u64::from(s.date_sec))
        .with("date-nsec", u64::from(s.date_nsec))
        .with("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000)
        .with("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000)
}

/// Before the first write: repair a dirty image, drop autoclear bits we do not know, and
/// mark persistent bitmaps that writes would change as in use (QEMU then sees them as
/// inconsistent, not stale).
async fn prepare_for_writing(file: &Child, m: &mut Meta, was_dirty: bool) -> io::Result<()> {
    let mut header_changed = false;
    if was_dirty {
        create::rebuild_refcounts(file, m).await?;
        m.h.incompatible &= !incompat::DIRTY;
        header_changed = true;
    }
    if m.h.autoclear & !autoclear::KNOWN != 0 {
        m.h.autoclear &= autoclear::KNOWN;
        header_changed = true;
    }
    if m.h.autoclear & autoclear::BITMAPS != 0 {
        create::mark_bitmaps_in_use(file, m).await?;
    }
    if header_changed {
        m.write_header(file).await?;
        file.flush().await?;
    }
    Ok(())
}

/// `cache-clean-interval` in seconds; QEMU's default is ten minutes.
fn clean_interval(args: &Args) -> Result<Duration, Error> {
    match args.opt_i64("cache-clean-interval") {
        None => Ok(Duration::from_secs(DEFAULT_CACHE_CLEAN_INTERVAL)),
        Some(v) if v < 0 || v > i64::from(u32::MAX) => {
            Err(Error::generic("Cache clean interval too big"))
        }
        Some(v) => Ok(Duration::from_secs(v as u64)),
    }
}

/// Tables the L2 and refcount caches hold, from the options and the image (QEMU's rules).
fn cache_sizes(args: &Args, h: &Header) -> Result<(usize, usize), Error> {
    let cs = h.cluster_size();
    let get = |k: &str| -> Result<Option<u64>, Error> {
        match args.opt_i64(k) {
            None => Ok(None),
            Some(v) if v < 0 => Err(Error::generic(format!(
                "Value '{v}' is out of range for parameter '{k}'"
            ))),
            Some(v) => Ok(Some(v as u64)),
        }
    };
    let total = get("cache-size")?;
    let l2 = get("l2-cache-size")?;
    let rc = get("refcount-cache-size")?;
    let per_l2 = cs / h.l2_entry_size();
    let max_l2 = h.size.div_ceil(cs).div_ceil(per_l2) * cs;
    let (l2, rc) = match (total, l2, rc) {
        (Some(_), Some(_), Some(_)) => {
            return Err(Error::generic(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
            ));
        }
        (Some(t), Some(l), None) => {
            if l > t {
                return Err(Error::generic("l2-cache-size may not exceed cache-size"));
            }
            (l, t - l)
        }
        (Some(t), None, Some(r)) => {
            if r > t {
                return Err(Error::generic(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            (t - r, r)
        }
        (Some(t), None, None) => {
            let l = t
                .min(max_l2)
                .min(t.saturating_sub(4 * cs))
                .max(t / 2)
                .min(t);
            (l, t - l)
        }
        (None, l, r) => (
            l.unwrap_or(max_l2.min(DEFAULT_L2_CACHE_MAX)),
            r.unwrap_or(4 * cs),
        ),
    };
    Ok((((l2 / cs) as usize).max(2), ((rc / cs) as usize).max(4)))
}

impl Driver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size.get()
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.read_guest(node, &file, offset, len).await;
            self.check(node, &file, r).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.write_impl(node, &file, offset, &data).await;
            ferrite_block::io::pool::give(data);
            let r = self.check(node, &file, r).await;
            if r.is_ok() && flags.contains(ReqFlags::FUA) {
                return self.flush(node).await;
            }
            r
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.zero_impl(node, &file, offset, len, flags).await;
            let r = self.check(node, &file, r).await;
            if r.is_ok() && flags.contains(ReqFlags::FUA) {
                return self.flush(node).await;
            }
            r
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.discard_impl(node, &file, offset, len).await;
            self.check(node, &file, r).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            if self.read_only.get() {
                return Ok(());
            }
            let mut m = self.meta.lock().await;
            m.write_back(&file, true).await
        })
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = {
                let mut m = self.meta.lock().await;
                m.map(&file, offset, len).await
            };
            let (src, run) = self.check(node, &file, r).await?;
            Ok(match src {
                Source::Data(_) | Source::Compressed { .. } => Extent {
                    len: run,
                    data: true,
                    zero: false,
                    allocated: true,
                },
                Source::Zero => Extent {
                    len: run,
                    data: false,
                    zero: true,
                    allocated: true,
                },
                Source::Backing => match node.child("backing") {
                    Some(b) if offset < b.len() => {
                        let run = run.min(b.len() - offset);
                        let e = b.block_status(offset, run).await?;
                        Extent {
                            allocated: false,
                            ..e
                        }
                    }
                    _ => Extent {
                        len: run,
                        data: false,
                        zero: true,
                        allocated: false,
                    },
                },
            })
        })
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.truncate_impl(node, &file, size).await;
            self.check(node, &file, r).await
        })
    }

    fn prepare_writable<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let was_dirty = m.h.incompatible & incompat::DIRTY != 0;
            prepare_for_writing(&file, &mut m, was_dirty).await
        })
    }

    fn close<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = Self::file(node)?;
            self.close_impl(node, &file).await
        })
    }

    fn child_perm(&self, name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        if name == "backing" {
            let shared = if shared.contains(Perm::WRITE) {
                Perm::WRITE | Perm::RESIZE
            } else {
                Perm::empty()
            } | Perm::CONSISTENT_READ
                | Perm::WRITE_UNCHANGED;
            return (perm & Perm::CONSISTENT_READ, shared);
        }
        let mut p = perm | Perm::CONSISTENT_READ;
        if !self.read_only.get() {
            p |= Perm::WRITE | Perm::RESIZE;
        }
        (p, shared - (Perm::WRITE | Perm::RESIZE))
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> Result<(), Error> {
        let same = |key: &str| match (opts.get(key), node.child(key)) {
            (Some(QObject::String(name)), Some(c)) => c.name() == name,
            (None, _) => key != "file",
            (Some(QObject::Null), None) => true,
            _ => false,
        };
        if !same("file") {
            return Err(Error::generic("Cannot change the option 'file'"));
        }
        if opts.get("backing").is_some() && !same("backing") {
            return Err(Error::generic(
                "Changing the backing file of a qcow2 node is not supported by ferrite yet",
            ));
        }
        Ok(())
    }

    fn reopen_apply(&self, _node: &Node, _opts: &Args, read_only: bool) -> Result<(), Error> {
        self.read_only.set(read_only);
        Ok(())
    }

    fn format_specific(&self) -> Option<QDict> {
        let m = self.meta.try_lock().ok()?;
        let h = &m.h;
        let mut d = QDict::new();
        if h.version >= 3 {
            d.insert("compat", "1.1");
            d.insert(
                "compression-type",
                if h.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                },
            );
            d.insert("lazy-refcounts", h.compatible & compat::LAZY_REFCOUNTS != 0);
            d.insert("refcount-bits", 1u64 << h.refcount_order);
            if let Some(df) = &self.data_file {
                if let Some(name) = &df.name {
                    d.insert("data-file", name.as_str());
                }
                d.insert("data-file-raw", df.raw);
            }
            d.insert("corrupt", h.incompatible & incompat::CORRUPT != 0);
            d.insert("extended-l2", h.extended_l2());
        } else {
            d.insert("compat", "0.10");
            d.insert("compression-type", "zlib");
            d.insert("refcount-bits", 16u64);
        }
        Some(QDict::new().with("type", "qcow2").with("data", d))
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }

    fn snapshots_info(&self) -> Vec<QDict> {
        self.snapshots.borrow().iter().map(snapshot_info).collect()
    }

    fn snapshot_create<'a>(&'a self, node: &'a Node, name: &'a str) -> BoxFut<'a, QDict> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let r = snapshot::create(&file, &mut m, name).await;
            drop(m);
            let s = self.check(node, &file, r).await?;
            self.snapshots.borrow_mut().push(s.clone());
            Ok(snapshot_info(&s))
        })
    }

    fn snapshot_delete<'a>(
        &'a self,
        node: &'a Node,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> BoxFut<'a, Option<QDict>> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let r = snapshot::delete(&file, &mut m, id, name).await;
            drop(m);
            let gone = self.check(node, &file, r).await?;
            if let Some(s) = &gone {
                self.snapshots.borrow_mut().retain(|x| x.id != s.id);
            }
            Ok(gone.as_ref().map(snapshot_info))
        })
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        std::mem::take(&mut *self.loaded.borrow_mut())
    }

    fn can_store_bitmaps(&self) -> Result<(), String> {
        if self.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        Ok(())
    }

    fn is_passthrough(&self) -> bool {
        true
    }

    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        self.backing.borrow().clone()
    }

    fn change_backing_file<'a>(
        &'a self,
        node: &'a Node,
        name: Option<String>,
        format: Option<String>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            m.h.backing_file = name.clone();
            m.h.set_extension(
                header::EXT_BACKING_FORMAT,
                format
                    .clone()
                    .filter(|_| name.is_some())
                    .map(String::into_bytes),
            );
            m.write_header(&file).await?;
            file.flush().await?;
            *self.backing.borrow_mut() = name.map(|n| (n, format));
            Ok(())
        })
    }

    fn write_compressed<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.write_compressed_impl(node, &file, offset, &data).await;
            self.check(node, &file, r).await
        })
    }

    fn clean_caches(&self, now: Instant) {
        let interval = self.clean_interval;
        if interval.is_zero() || now.duration_since(self.last_clean.get()) < interval {
            return;
        }
        // Busy metadata is in use anyway; try again at the next tick.
        if let Ok(mut m) = self.meta.try_lock() {
            m.drop_unused_tables();
            self.last_clean.set(now);
        }
    }
}
