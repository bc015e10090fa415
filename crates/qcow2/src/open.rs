//! Opening an image (QEMU: `qcow2_do_open`): the header parsed, the options checked in
//! QEMU's order (lazy refcounts, cache sizes, cache cleaning, discard passing), the
//! metadata loaded, the snapshot table and persistent bitmaps read, and an image opened
//! read-write made ready for writing (a dirty one repaired first).

use crate::claims::Claims;
use crate::compress::Codec;
use crate::error::Error;
use crate::format::header::{Header, autoclear, compat, incompat};
use crate::meta::overlap::Metadata;
use crate::meta::{Meta, read_at};
use crate::{CorruptionHook, DataFile, Qcow2Driver, bitmaps, repair};
use ferrite_block::Child;
use ferrite_crypto::LuksVolume;
use ferrite_qapi::Args;
use std::cell::{Cell, RefCell};
use std::io;
use std::time::{Duration, Instant};

/// Default L2 cache limit (QEMU: `DEFAULT_L2_CACHE_MAX_SIZE`).
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Seconds between cache cleanings unless `cache-clean-interval` says otherwise.
const DEFAULT_CACHE_CLEAN_INTERVAL: u64 = 600;

fn open_err(e: io::Error) -> Error {
    Error::ReadHeader(e)
}

/// An image part-way open: its header and options checked. QEMU opens the external data
/// file at this point, before the encryption, the backing file name, the snapshot table and
/// the bitmaps are looked at, so the factory does that between [`Qcow2Driver::begin_open`]
/// and [`Opening::finish`].
pub(crate) struct Opening {
    h: Header,
    cluster_bits: u32,
    read_only: bool,
    lazy: bool,
    l2_tables: usize,
    rb_tables: usize,
    clean_interval: Duration,
    key_secret: bool,
    crypto_header: bool,
    data_file: Option<DataFile>,
    password: Option<Vec<u8>>,
}

impl Opening {
    /// Whether the image uses the legacy AES-CBC encryption (`crypt_method` 1).
    pub(crate) fn aes_encrypted(&self) -> bool {
        self.h.crypt_method == 1
    }

    /// The external data file the image needs, if any.
    pub(crate) fn data_file(&self) -> Option<DataFile> {
        self.data_file.clone()
    }

    /// The password of an encrypted image (`encrypt.key-secret`'s secret).
    pub(crate) fn set_password(&mut self, password: Vec<u8>) {
        self.password = Some(password);
    }
}

/// Unlocks the LUKS volume whose header and key material the crypto header extension
/// points at (QEMU: `qcow2_crypto_hdr_read_func`), off the main thread.
async fn unlock(file: &Child, h: &Header, password: Vec<u8>) -> ferrite_block::Result<LuksVolume> {
    let generic = |t: String| -> ferrite_block::Error { ferrite_qapi::Error::generic(t).into() };
    let (offset, length) = crypto_area(h)?;
    if length < ferrite_crypto::HEADER_LEN as u64 || length > 64 << 20 || offset > file.len() {
        return Err(generic(format!(
            "Invalid crypto header offset {offset} or length {length}"
        )));
    }
    let area = read_at(file, offset, length as usize)
        .await
        .map_err(|e| generic(format!("Could not read encryption header: {e}")))?;
    tokio::task::spawn_blocking(move || LuksVolume::unlock(&area, &password))
        .await
        .map_err(|_| generic("unlocking the encryption failed".into()))?
        .map_err(|e| generic(e.to_string()))
}

/// Where the LUKS header area is in the file, as the crypto header extension says
/// (offset, length).
pub(crate) fn crypto_area(h: &Header) -> Result<(u64, u64), Error> {
    let ext = h
        .extension(crate::format::header::EXT_CRYPTO)
        .filter(|e| e.len() >= 16)
        .ok_or(Error::MissingCryptoHeader(2))?;
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    Ok((be64(&ext[0..8]), be64(&ext[8..16])))
}

impl Qcow2Driver {
    /// Opens the image on `file` whose data file (if it has one) is already open: both
    /// halves at once.
    pub(crate) async fn open(
        args: &Args,
        file: &Child,
        read_only: bool,
        on_corruption: CorruptionHook,
    ) -> ferrite_block::Result<Qcow2Driver> {
        Self::begin_open(args, file, read_only)
            .await?
            .finish(args, file, on_corruption)
            .await
    }

    /// Starts opening the image on `file`: header, options and extensions.
    pub(crate) async fn begin_open(
        args: &Args,
        file: &Child,
        read_only: bool,
    ) -> ferrite_block::Result<Opening> {
        let probe = read_at(file, 0, Header::PROBE_LEN)
            .await
            .map_err(open_err)?;
        let bits = Header::probe_cluster_bits(&probe)?;
        let cs = 1u64 << bits;
        // Cluster 0 whole (zeroes past the end of the file): header, extensions, backing
        // file name. Checked in QEMU's order: the fixed fields, the options, then the rest.
        let first = read_at(file, 0, cs as usize).await.map_err(open_err)?;
        let mut h = Header::parse_fixed(&first, !read_only)?;
        let key_secret = args
            .dict("encrypt")
            .is_some_and(|e| e.get("key-secret").is_some());
        if h.crypt_method > 2 {
            return Err(Error::EncryptionMethod(h.crypt_method as i32).into());
        }
        let lazy_opt = args.opt_bool("lazy-refcounts");
        if lazy_opt == Some(true) && h.version < 3 {
            return Err(Error::LazyRefcountsV2.into());
        }
        let lazy = lazy_opt.unwrap_or(h.compatible & compat::LAZY_REFCOUNTS != 0);
        let (l2_tables, rb_tables) =
            cache_sizes(args, h.cluster_size(), h.l2_entry_size(), h.size)?;
        let clean_interval = clean_interval(args)?;
        check_encryption_format(args, h.crypt_method)?;
        h.parse_tail(&first)?;
        let crypto_header = h.extension(crate::format::header::EXT_CRYPTO).is_some();
        let data_file = if h.incompatible & incompat::DATA_FILE != 0 {
            Some(DataFile {
                name: h.data_file_name(),
                raw: h.autoclear & autoclear::DATA_FILE_RAW != 0,
            })
        } else if h.autoclear & autoclear::DATA_FILE_RAW != 0 {
            return Err(Error::DataFileRawWithout.into());
        } else {
            None
        };
        Ok(Opening {
            h,
            cluster_bits: bits,
            read_only,
            lazy,
            l2_tables,
            rb_tables,
            clean_interval,
            key_secret,
            crypto_header,
            data_file,
            password: None,
        })
    }
}

/// The encryption format the options name, against the one the header has (QEMU checks
/// it last among the options).
fn check_encryption_format(args: &Args, crypt_method: u32) -> Result<(), Error> {
    let Some(given) = args
        .dict("encrypt")
        .and_then(|e| e.opt_str("format").map(str::to_owned))
    else {
        return Ok(());
    };
    let header = match crypt_method {
        0 => return Err(Error::EncryptionNotInHeader(given)),
        1 => "aes",
        _ => "luks",
    };
    if given != header {
        return Err(Error::EncryptionFormatMismatch { header, given });
    }
    Ok(())
}

impl Opening {
    /// Finishes opening, after the data file: encryption, the rest of the metadata, the
    /// snapshot table and bitmaps, and the preparation for writing.
    pub(crate) async fn finish(
        self,
        args: &Args,
        file: &Child,
        on_corruption: CorruptionHook,
    ) -> ferrite_block::Result<Qcow2Driver> {
        let h = self.h;
        let crypto = match h.crypt_method {
            1 if !self.key_secret => return Err(Error::KeySecretRequired.into()),
            2 if !self.crypto_header => return Err(Error::MissingCryptoHeader(2).into()),
            2 if !self.key_secret => return Err(Error::KeySecretRequired.into()),
            0 => None,
            2 if !h.extended_l2() && self.data_file.is_none() => {
                let password = self.password.clone().unwrap_or_default();
                Some(std::rc::Rc::new(unlock(file, &h, password).await?))
            }
            _ => return Err(Error::EncryptedLayout.into()),
        };
        let codec = if h.compression_type == 1 {
            Codec::Zstd
        } else {
            Codec::Deflate
        };
        let backing = h.backing_file.clone().map(|f| (f, h.backing_format()));
        let version = h.version;
        let extended = h.extended_l2();
        // The block layer counts whole sectors: a size that is not a multiple of 512 is cut
        // down (QEMU's `total_sectors`).
        let size = h.size & !511;
        let was_dirty = h.incompatible & incompat::DIRTY != 0;
        let mut meta = Meta::load(file, h, self.l2_tables, self.rb_tables)
            .await
            .map_err(open_err)?;
        let discard_unmap = args.opt_str("discard") == Some("unmap");
        meta.pass_discard_request = args
            .opt_bool("pass-discard-request")
            .unwrap_or(discard_unmap);
        meta.pass_discard_other = args.opt_bool("pass-discard-other").unwrap_or(false);
        meta.overlap_check = overlap_check(args);
        let (snapshots, table_len) = crate::format::snapshot_table::read_checked(file, &meta.h)
            .await
            .map_err(Error::Snapshots)?;
        meta.snapshot_l1s = snapshots.iter().map(|s| (s.l1_offset, s.l1_size)).collect();
        meta.snapshots_size = table_len;
        let loaded = bitmaps::load(file, &mut meta)
            .await
            .map_err(Error::LoadBitmaps)?;
        // An image opened inactive (`active=off`) belongs to someone else for now: nothing
        // is written to it until it is activated (which opens it again).
        let writable = !self.read_only && args.opt_bool("active") != Some(false);
        if writable {
            prepare_for_writing(file, &mut meta, was_dirty).await?;
        } else {
            // What cannot be written back cannot change, and is not lost at close either
            // (QEMU's read-only bitmaps).
            for b in &loaded {
                b.set_read_only(true);
            }
        }
        bitmaps::refresh_info(file, &mut meta).await;
        // Still set when the image was opened without repairing it (read-only or inactive):
        // QEMU then shows the image as dirty.
        let dirty_on_disk = meta.h.incompatible & incompat::DIRTY != 0;
        Ok(Qcow2Driver {
            meta: tokio::sync::Mutex::new(meta),
            claims: Claims::default(),
            size: Cell::new(size),
            cluster_bits: self.cluster_bits,
            extended,
            version,
            codec,
            read_only: Cell::new(self.read_only),
            dead: Cell::new(false),
            signaled: Cell::new(false),
            lazy_refcounts: self.lazy,
            discard_no_unref: args.opt_bool("discard-no-unref").unwrap_or(false),
            dirty_set: Cell::new(dirty_on_disk),
            backing: RefCell::new(backing),
            on_corruption,
            snapshots: RefCell::new(snapshots),
            clean_interval: self.clean_interval,
            last_clean: Cell::new(Instant::now()),
            data_file: self.data_file,
            data_discards: RefCell::default(),
            loaded: RefCell::new(loaded),
            key_secret: crypto.as_ref().and_then(|_| {
                args.dict("encrypt")
                    .and_then(|e| e.opt_str("key-secret").map(str::to_owned))
            }),
            crypto,
        })
    }
}

/// Before the first write, in QEMU's order: drop autoclear bits we do not know, mark
/// persistent bitmaps that writes would change as in use (QEMU then sees them as
/// inconsistent, not stale), and repair a dirty image.
pub(crate) async fn prepare_for_writing(
    file: &Child,
    m: &mut Meta,
    was_dirty: bool,
) -> Result<(), Error> {
    let mut header_changed = false;
    if m.h.autoclear & !autoclear::KNOWN != 0 {
        m.h.autoclear &= autoclear::KNOWN;
        header_changed = true;
    }
    if m.h.autoclear & autoclear::BITMAPS != 0 {
        repair::mark_bitmaps_in_use(file, m)
            .await
            .map_err(Error::UpdateBitmapDirectory)?;
    }
    if header_changed {
        m.write_header(file).await.map_err(Error::UpdateHeader)?;
        file.flush().await.map_err(Error::UpdateHeader)?;
    }
    if was_dirty {
        repair::rebuild_refcounts(file, m)
            .await
            .map_err(Error::RepairDirty)?;
        m.h.incompatible &= !incompat::DIRTY;
        m.write_header(file).await.map_err(Error::RepairDirty)?;
        file.flush().await.map_err(Error::RepairDirty)?;
    }
    Ok(())
}

/// `cache-clean-interval` in seconds; QEMU's default is ten minutes.
pub(crate) fn clean_interval(args: &Args) -> ferrite_block::Result<Duration> {
    match args.opt_i64("cache-clean-interval") {
        None => Ok(Duration::from_secs(DEFAULT_CACHE_CLEAN_INTERVAL)),
        Some(v) if v < 0 || v > i64::from(u32::MAX) => Err(Error::CleanInterval.into()),
        Some(v) => Ok(Duration::from_secs(v as u64)),
    }
}

/// Tables the L2 and refcount caches hold, from the options and the image (QEMU's rules).
/// The `overlap-check` option: a template name, or a template (default `cached`) with kinds
/// turned on or off one by one. (The schema has checked the names.)
pub(crate) fn overlap_check(args: &Args) -> Metadata {
    match args.get("overlap-check") {
        Some(v) => match (v.as_str(), args.dict("overlap-check")) {
            (Some(name), _) => Metadata::template(name).unwrap_or(Metadata::CACHED),
            (None, Some(d)) => {
                let base = d
                    .opt_str("template")
                    .and_then(Metadata::template)
                    .unwrap_or(Metadata::CACHED);
                Metadata::MEMBERS
                    .iter()
                    .fold(base, |acc, &(name, kind)| match d.opt_bool(name) {
                        Some(on) => acc.with(kind, on),
                        None => acc,
                    })
            }
            (None, None) => Metadata::CACHED,
        },
        None => Metadata::CACHED,
    }
}

/// The L2 and refcount block caches' sizes in tables, from the cache options (QEMU's
/// `read_cache_sizes` and its checks), for an image of `size` bytes in clusters of `cs`
/// with L2 entries of `l2_entry_size` bytes.
pub(crate) fn cache_sizes(
    args: &Args,
    cs: u64,
    l2_entry_size: u64,
    size: u64,
) -> ferrite_block::Result<(usize, usize)> {
    let get = |k: &str| -> ferrite_block::Result<Option<u64>> {
        match args.opt_i64(k) {
            None => Ok(None),
            Some(v) if v < 0 => Err(Error::OutOfRange {
                value: v,
                name: k.to_owned(),
            }
            .into()),
            Some(v) => Ok(Some(v as u64)),
        }
    };
    let total = get("cache-size")?;
    let l2 = get("l2-cache-size")?;
    let rc = get("refcount-cache-size")?;
    let per_l2 = cs / l2_entry_size;
    let max_l2 = size.div_ceil(cs).div_ceil(per_l2) * cs;
    let (l2, rc) = match (total, l2, rc) {
        (Some(_), Some(_), Some(_)) => {
            return Err(Error::CacheSizes.into());
        }
        (Some(t), Some(l), None) => {
            if l > t {
                return Err(Error::L2CacheTooBig.into());
            }
            (l, t - l)
        }
        (Some(t), None, Some(r)) => {
            if r > t {
                return Err(Error::RefcountCacheTooBig.into());
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
    // Tables are cached whole here; the entry size is checked as QEMU checks it.
    let entry = get("l2-cache-entry-size")?.unwrap_or(cs);
    if !(512..=cs).contains(&entry) || !entry.is_power_of_two() {
        return Err(Error::L2CacheEntrySize(cs).into());
    }
    Ok((((l2 / cs) as usize).max(2), ((rc / cs) as usize).max(4)))
}
