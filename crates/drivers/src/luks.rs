//! `luks`: a LUKS1 volume as a node (QEMU: block/crypto.c over crypto/block-luks.c). The
//! header and key slots come first in the file, or in a `header` child of their own (a
//! detached header: the payload then starts at 0 of the file); the node's bytes are the
//! payload, each 512-byte sector encrypted with the master key (the first payload sector is
//! sector 0). The password is a `secret` object named by `key-secret`.

use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, Prealloc, ReqFlags};
use ferrite_block::region::RewriteError;
use ferrite_block::units::UnitLocks;
use ferrite_block::{
    BlockBackend, Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx, Perm,
};
use ferrite_crypto::{CreateOptions, HEADER_LEN, LuksVolume, SECTOR};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

/// The most header and key material ferrite reads to unlock a volume.
const MAX_HEADER_AREA: u64 = 64 << 20;

/// The `luks` driver's factory.
pub(crate) struct LuksFactory;

impl DriverFactory for LuksFactory {
    fn name(&self) -> &'static str {
        "luks"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    /// QEMU's test: the magic and version 1.
    fn probe(&self, head: &[u8]) -> bool {
        head.len() >= 8 && head.starts_with(b"LUKS\xba\xbe") && head[6..8] == [0, 1]
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(create(graph, opts))
    }

    fn can_amend(&self) -> bool {
        true
    }

    fn amend<'a>(
        &'a self,
        graph: &'a Graph,
        node: &'a Rc<Node>,
        opts: &'a Args,
        force: bool,
    ) -> LocalFut<'a, ()> {
        Box::pin(async move {
            let luks = node
                .driver_as::<Luks>()
                .ok_or(ferrite_block::Error::CannotAmend)?;
            let (header, area_len) = luks.header_area();
            amend_key_slots(
                graph,
                header,
                0,
                area_len as usize,
                &luks.volume,
                opts,
                &luks.key_secret,
                force,
            )
            .await
        })
    }

    fn amend_prepare(&self, graph: &Graph, node: &Rc<Node>) -> ferrite_block::Result<()> {
        let luks = node
            .driver_as::<Luks>()
            .ok_or(ferrite_block::Error::CannotAmend)?;
        luks.updating_keys.set(true);
        graph
            .refresh_perms(node)
            .inspect_err(|_| self.amend_cleanup(graph, node))
    }

    fn amend_cleanup(&self, graph: &Graph, node: &Rc<Node>) {
        if let Some(luks) = node.driver_as::<Luks>() {
            luks.updating_keys.set(false);
            // Giving permissions back cannot conflict.
            let _ = graph.refresh_perms(node);
        }
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let detached = match ctx.opts().get("header").cloned() {
                Some(h) => Some(ctx.open_child_ref("header", &h).await?),
                None => None,
            };
            let opts = ctx.opts();
            let Some(secret_id) = opts.opt_str("key-secret") else {
                return Err(generic("Parameter 'key-secret' is required for cipher"));
            };
            let password = ctx.graph().secrets().get(secret_id)?;
            let not_luks = || generic(ferrite_crypto::Error::NotLuks.to_string());
            let holder = detached.as_ref().unwrap_or(&file);
            if holder.len() < HEADER_LEN as u64 {
                return Err(not_luks());
            }
            let head = holder.read(0, HEADER_LEN).await.map_err(|_| not_luks())?;
            let header =
                ferrite_crypto::Header::parse(&head).map_err(|e| generic(e.to_string()))?;
            // A detached header's area is its whole file (its key material after it); an
            // attached one's ends where the payload starts.
            let area_len = match &detached {
                Some(h) => h.len().min(MAX_HEADER_AREA),
                None => {
                    let end = header.payload_offset;
                    if end < HEADER_LEN as u64 {
                        return Err(generic("LUKS payload is overlapping with the header"));
                    }
                    if end > MAX_HEADER_AREA.min(file.len()) {
                        return Err(generic(format!(
                            "LUKS payload offset {end} is beyond the volume"
                        )));
                    }
                    end
                }
            };
            let area = holder
                .read(0, area_len as usize)
                .await
                .map_err(|e| generic(format!("Could not read LUKS header: {e}")))?;
            // Deriving the keys takes as long as the volume says (seconds): off the main
            // thread.
            let volume = tokio::task::spawn_blocking(move || LuksVolume::unlock(&area, &password))
                .await
                .map_err(|_| generic("unlocking the LUKS volume failed"))?
                .map_err(|e| generic(e.to_string()))?;
            let payload = volume.header().payload_offset;
            Ok(Box::new(Luks {
                payload,
                volume,
                file,
                header: detached,
                key_secret: secret_id.to_owned(),
                sectors: UnitLocks::default(),
                updating_keys: Cell::new(false),
            }) as Box<dyn Driver>)
        })
    }
}

/// `blockdev-create` of a LUKS volume: the header and key slot 0 written at the start of
/// the file, which is then sized to hold `size` bytes of payload; or, with `header`, written
/// to that node alone, the file (if any) sized to `size` for the payload.
async fn create(graph: &Rc<Graph>, opts: &Args) -> ferrite_block::Result<()> {
    let inline = RefCell::new(Vec::new());
    let r = create_volume(graph, opts, &inline).await;
    // Nodes opened from inline options were the create's own: they go with it.
    for node in inline.into_inner() {
        graph.release_inline(&node);
    }
    r
}

async fn create_volume(
    graph: &Rc<Graph>,
    opts: &Args,
    inline: &RefCell<Vec<Rc<Node>>>,
) -> ferrite_block::Result<()> {
    // The size is the schema's `size` (unsigned); QEMU looks at the nodes first, then at
    // the key, and at the size only once it knows how big the header is.
    let size = opts.u64("size")?;
    let (has_file, has_header) = (opts.has("file"), opts.has("header"));
    if !has_file && !has_header {
        return Err(generic(
            "Either the parameter 'header' or 'file' must be specified",
        ));
    }
    let prealloc = match opts.opt_str("preallocation").unwrap_or("off") {
        "off" => None,
        "falloc" | "full" if !has_file => {
            return Err(generic(
                "Parameter 'preallocation' requires 'file' to be specified for formatting \
                 LUKS disk",
            ));
        }
        // The payload's blocks are allocated; what they hold is unwritten either way.
        "falloc" | "full" => Some(Prealloc::Falloc),
        other => {
            return Err(generic(format!("Unsupported preallocation mode: {other}")));
        }
    };
    let node_of = async |key: &str| -> ferrite_block::Result<Rc<Node>> {
        match opts.get(key) {
            Some(QObject::String(name)) => Ok(graph.lookup(name)?),
            Some(QObject::Dict(d)) => {
                let node = graph.open_inline(&Args::new(d.clone())).await?;
                inline.borrow_mut().push(node.clone());
                Ok(node)
            }
            _ => Err(generic(format!("Parameter '{key}' is missing"))),
        }
    };
    let header_node = if has_header {
        node_of("header").await?
    } else {
        node_of("file").await?
    };
    let Some(secret_id) = opts.opt_str("key-secret") else {
        return Err(generic("Parameter 'key-secret' is required for cipher"));
    };
    let password = graph.secrets().get(secret_id)?;
    let mut o = CreateOptions::from_options(
        |k| opts.opt_str(k).map(str::to_owned),
        opts.opt_u64("iter-time"),
    );
    o.detached = has_header;
    let too_large = || generic("The requested file size is too large");
    let hold = BlockBackend::new(graph, &header_node, Perm::WRITE | Perm::RESIZE, Perm::all())?;
    let written = async {
        // Calibrating and deriving keys take the iteration time: off the main thread.
        let volume = tokio::task::spawn_blocking(move || LuksVolume::create(&password, &o))
            .await
            .map_err(|_| generic("creating the LUKS volume failed"))?
            .map_err(|e| generic(e.to_string()))?;
        // An attached header's file holds the payload after it; a detached header's only the
        // header. Nothing is written when the volume could not be that big.
        let header_file_len = if has_header {
            volume.header_len
        } else {
            i64::try_from(size)
                .ok()
                .and_then(|s| s.checked_add(i64::try_from(volume.header_len).ok()?))
                .ok_or_else(too_large)? as u64
        };
        let io = |e: io::Error| generic(format!("Could not write LUKS header: {e}"));
        hold.truncate(0).await.map_err(io)?;
        let header_prealloc = if has_header { None } else { prealloc };
        match header_prealloc {
            Some(p) => hold.truncate_prealloc(header_file_len, p).await,
            None => hold.truncate(header_file_len).await,
        }
        .map_err(io)?;
        hold.write(0, volume.header, ReqFlags::empty())
            .await
            .map_err(io)?;
        let (at, material) = volume.material;
        hold.write(at, material, ReqFlags::empty())
            .await
            .map_err(io)?;
        hold.flush().await.map_err(io)?;
        Ok::<(), ferrite_block::Error>(())
    }
    .await;
    hold.remove();
    written?;
    if has_header && has_file {
        // The payload: as big as asked, from offset 0.
        if i64::try_from(size).is_err() {
            return Err(too_large());
        }
        let file = node_of("file").await?;
        let payload = BlockBackend::new(graph, &file, Perm::WRITE | Perm::RESIZE, Perm::all())?;
        let r = match prealloc {
            Some(p) => payload.truncate_prealloc(size, p).await,
            None => payload.truncate(size).await,
        };
        payload.remove();
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::EFBIG) => too_large(),
            _ => generic(format!("Could not resize the LUKS payload: {e}")),
        })?;
    }
    Ok(())
}

/// Changes the key slots of the volume whose header area is `len` bytes at `base` in `file`
/// (`x-blockdev-amend`; `opts`: `QCryptoBlockAmendOptionsLUKS`), keeping `volume`'s header
/// up to date. Encrypted qcow2 images (their area inside the image) use it too.
///
/// # Errors
/// QEMU's refusals; the file failing.
#[allow(clippy::too_many_arguments)]
pub async fn amend_key_slots(
    graph: &Graph,
    file: &Child,
    base: u64,
    len: usize,
    volume: &LuksVolume,
    opts: &Args,
    opened_with: &str,
    force: bool,
) -> ferrite_block::Result<()> {
    let change = ferrite_crypto::SlotChange::from_options(
        |k| opts.opt_str(k).map(str::to_owned),
        |k| opts.opt_i64(k),
        |id| {
            graph
                .secrets()
                .get(id)
                .map_err(|e| ferrite_qapi::Error::from(e).desc)
        },
        Some(opened_with),
    );
    let area = ferrite_block::region::rewrite_region(file, base, len, move |area| {
        ferrite_crypto::amend_key_slots(area, &change, force).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| match e {
        RewriteError::Io(e) => generic(format!(
            "Could not read encryption header: {}",
            ferrite_qapi::os_msg(&e)
        )),
        RewriteError::Refused(text) => generic(text),
    })?;
    volume
        .reread_header(&area)
        .map_err(|e| generic(e.to_string()))
}

struct Luks {
    file: Rc<Child>,
    /// A detached header's file.
    header: Option<Rc<Child>>,
    volume: LuksVolume,
    /// Where the payload starts in the file.
    payload: u64,
    key_secret: String,
    /// Sectors a write is changing: a partial-sector write reads, patches and rewrites its
    /// sectors, which no other write may change meanwhile.
    sectors: UnitLocks,
    /// An amendment is rewriting the key slots: the file is this node's alone meanwhile.
    updating_keys: Cell<bool>,
}

const S: u64 = SECTOR as u64;

impl Luks {
    /// Where the header and key material are, and how long that area is.
    fn header_area(&self) -> (&Child, u64) {
        match &self.header {
            Some(h) => (h, h.len().min(MAX_HEADER_AREA)),
            None => (&self.file, self.payload),
        }
    }
}

impl Luks {
    /// The whole sectors around `offset..offset + len`.
    fn around(offset: u64, len: u64) -> (u64, u64) {
        (offset / S * S, (offset + len).next_multiple_of(S))
    }

    /// Decrypted whole sectors `start..end` of the payload.
    async fn read_sectors(&self, start: u64, end: u64) -> io::Result<Vec<u8>> {
        let mut data = self
            .file
            .read(self.payload + start, (end - start) as usize)
            .await?;
        self.volume.cipher.decrypt(&mut data, start / S);
        Ok(data)
    }

    /// Writes `data` at `offset`: whole sectors are encrypted and written; a request that
    /// starts or ends inside a sector patches the decrypted sectors around it first.
    async fn write_encrypted(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> io::Result<()> {
        let len = data.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let (start, end) = Self::around(offset, len);
        let _held = self.sectors.claim(start / S, end / S).await;
        let mut whole = if start == offset && end == offset + len {
            data
        } else {
            let mut around = self.read_sectors(start, end).await?;
            let at = (offset - start) as usize;
            around[at..at + data.len()].copy_from_slice(&data);
            around
        };
        self.volume.cipher.encrypt(&mut whole, start / S);
        self.file.write(self.payload + start, whole, flags).await
    }
}

impl Driver for Luks {
    ferrite_block::forward_to_child!(self.file; flush);

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn answers_info(&self, node: &Node) -> bool {
        node.child("file").is_some_and(|f| f.answers_info())
    }

    fn format_name(&self) -> &'static str {
        "luks"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.file.len().saturating_sub(self.payload)
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        SECTOR as u64
    }

    /// As QEMU's crypto driver: the header must stay readable, so the file is always read
    /// consistently, and writes and resizes are asked for only as the node's users ask;
    /// while key slots are rewritten, nobody else may read or write the file (another
    /// process holding the image open makes the amendment fail, and the reverse).
    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        let perm = perm | Perm::CONSISTENT_READ;
        if self.updating_keys.get() {
            (
                perm | Perm::WRITE,
                shared - (Perm::CONSISTENT_READ | Perm::WRITE),
            )
        } else {
            (perm, shared)
        }
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let (start, end) = Self::around(offset, len as u64);
            let data = self.read_sectors(start, end).await?;
            if start == offset && data.len() == len {
                return Ok(data);
            }
            let at = (offset - start) as usize;
            Ok(data[at..at + len].to_vec())
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_encrypted(offset, data, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            // Encrypted zeroes are not zeroes on disk: they are written like data.
            let write_flags = flags - ReqFlags::MAY_UNMAP;
            ferrite_block::driver::write_zeroes_as_data(offset, len, flags, |at, zeroes| {
                self.write_encrypted(at, zeroes, write_flags)
            })
            .await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        // What a discarded sector would read as is not zeroes once decrypted: QEMU's crypto
        // driver does not pass discards on either.
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(self.file.truncate(self.payload + size))
    }

    fn is_encrypted(&self) -> bool {
        true
    }

    fn format_specific(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("type", "luks")
                .with("data", self.volume.header().info()),
        )
    }

    fn strong_options(&self) -> QDict {
        QDict::new().with("key-secret", self.key_secret.as_str())
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        ferrite_block::driver::check_unchanged(opts, &Args::new(node.options()), &["key-secret"])
    }
}
