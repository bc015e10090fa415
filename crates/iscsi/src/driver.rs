//! The `iscsi` node (QEMU's `block/iscsi.c`): a disk or CD-ROM logical unit, its size and
//! limits from the target's answers, reads and writes in its blocks (smaller pieces read,
//! changed and written back), flushes, UNMAP and WRITE SAME, block status from GET LBA
//! STATUS, and QEMU's map of which clusters a thin-provisioned unit has allocated.
//!
//! QEMU runs one command at a time per lock hand-off through libiscsi; here every request
//! is a tagged command on the connection at once, and a broken connection is logged into
//! again with the commands under way sent anew.

use crate::login::{self, Target};
use crate::scsi::{self, Capacity, Sense};
use crate::session::{Dir, Reply, Session};
use bytes::Bytes;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::report::{error_report, warn_report};
use ferrite_block::{DriverFactory, DriverKind, LocalFut, NameCreation, Node, OpenCtx};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Duration;

/// The options that say which unit the node is (QEMU's strong runtime options).
const STRONG: [&str; 9] = [
    "transport",
    "portal",
    "target",
    "user",
    "password",
    "password-secret",
    "lun",
    "initiator-name",
    "header-digest",
];

/// How often a command is tried again, and the mean waits before a busy target is asked
/// again, in milliseconds (QEMU's `iscsi_retry_times`).
const RETRY_MS: [u64; 7] = [8, 32, 128, 512, 2048, 8192, 32768];

/// Reads of at least this many bytes look at the block status first when QEMU's map does
/// not know the clusters (QEMU's `ISCSI_CHECKALLOC_THRES`, 64 sectors).
const CHECKALLOC: u64 = 64 * 512;

pub(crate) struct IscsiFactory;

/// A failed command: the errno and libiscsi's words for what the target said.
struct Failed {
    errno: i32,
    text: String,
    status: u8,
    sense: Sense,
}

impl Failed {
    /// A command that got no answer: EIO.
    fn lost(text: String) -> Failed {
        Failed {
            errno: libc::EIO,
            text,
            status: 0,
            sense: Sense::default(),
        }
    }

    fn io(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// The connection to the unit, logged into again when it breaks.
struct Conn {
    session: RefCell<Rc<Session>>,
    relogin: tokio::sync::Mutex<()>,
    target: Target,
    lun: u64,
    /// The `timeout` option: a command not answered by then counts as timed out.
    timeout: Option<Duration>,
    closed: Cell<bool>,
    /// Whether the node finished opening (connections lost before fail the open).
    opened: Cell<bool>,
}

impl Conn {
    /// Logs in again unless someone already replaced `failed`; tries each second until
    /// the target answers (libiscsi's reconnect), the node closing ends it.
    async fn relogin(&self, failed: &Rc<Session>) -> io::Result<()> {
        let _one = self.relogin.lock().await;
        if !Rc::ptr_eq(&self.session.borrow(), failed) {
            return Ok(());
        }
        failed.kill();
        loop {
            if self.closed.get() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            match login::login(&self.target).await {
                Ok(l) => {
                    self.session.replace(Session::start(l));
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, "iSCSI login again failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// libiscsi's full connect ends with TEST UNIT READY, asked again while the unit
    /// reports attention conditions (a new session's reset); its failure is the connect's.
    async fn ready(&self) -> Result<(), Error> {
        let failed =
            |text: &str| Error::generic(format!("iSCSI: Failed to connect to LUN : {text}"));
        for _ in 0..RETRY_MS.len() {
            let session = self.session.borrow().clone();
            let cdb = scsi::test_unit_ready();
            let sent = session.command(self.lun, &cdb, Dir::None);
            let r = match self.timeout {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .unwrap_or_else(|_| Err(io::Error::other("timed out"))),
                None => sent.await,
            }
            .map_err(|e| failed(&format!("iscsi_service failed with : {e}")))?;
            let sense = Sense::parse(&r.sense);
            match r.status {
                scsi::GOOD => return Ok(()),
                scsi::CHECK_CONDITION if sense.key == scsi::UNIT_ATTENTION => {}
                scsi::CHECK_CONDITION => return Err(failed(&sense.describe())),
                s => {
                    return Err(failed(&format!(
                        "SCSI command failed with status {}",
                        status_name(s)
                    )));
                }
            }
        }
        Err(failed("unit attention did not clear"))
    }

    /// Runs one command to its answer as QEMU's driver does: a busy target and a unit
    /// attention are asked again (QEMU's retry counts and waits, its messages), a broken
    /// or timed-out connection is logged into again and the command sent anew.
    async fn run(&self, cdb: &[u8], dir: impl Fn() -> Dir) -> Result<Reply, Failed> {
        let mut retries = 0usize;
        let mut drops = 0usize;
        loop {
            let session = self.session.borrow().clone();
            let sent = session.command(self.lun, cdb, dir());
            let answer = match self.timeout {
                Some(t) => tokio::time::timeout(t, sent).await.ok(),
                None => Some(sent.await),
            };
            let reply = match answer {
                Some(Ok(r)) => r,
                Some(Err(e)) => {
                    // While the node opens, a broken connection fails the open; after,
                    // the command goes again once logged in, unless the connection
                    // keeps breaking under it.
                    drops += 1;
                    if !self.opened.get() || drops > RETRY_MS.len() {
                        return Err(Failed::lost(format!("iscsi_service failed with : {e}")));
                    }
                    self.relogin(&session)
                        .await
                        .map_err(|_| Failed::lost("(null)".into()))?;
                    continue;
                }
                None => {
                    // libiscsi's commands while QEMU opens the node fail when they time
                    // out; later ones QEMU tries again.
                    if !self.opened.get() {
                        return Err(Failed::lost("iscsi_service failed with : timed out".into()));
                    }
                    retries += 1;
                    if retries > RETRY_MS.len() {
                        return Err(Failed::lost("(null)".into()));
                    }
                    error_report(&format!(
                        "iSCSI Busy/TaskSetFull/TimeOut (retry #{retries} in 2000 ms): iscsi task timed out"
                    ));
                    self.relogin(&session)
                        .await
                        .map_err(|_| Failed::lost("(null)".into()))?;
                    continue;
                }
            };
            if reply.status == scsi::GOOD {
                return Ok(reply);
            }
            let sense = Sense::parse(&reply.sense);
            let retry = retries < RETRY_MS.len();
            retries += 1;
            match reply.status {
                scsi::BUSY | scsi::TASK_SET_FULL if retry => {
                    let wait = exp_random(RETRY_MS[retries - 1]);
                    error_report(&format!(
                        "iSCSI Busy/TaskSetFull/TimeOut (retry #{retries} in {wait} ms): SCSI command failed with status {}",
                        status_name(reply.status)
                    ));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                scsi::CHECK_CONDITION if retry && sense.errno() == libc::EAGAIN => {
                    error_report(&format!("iSCSI CheckCondition: {}", sense.describe()));
                }
                scsi::CHECK_CONDITION if retry => {
                    return Err(Failed {
                        errno: sense.errno(),
                        text: sense.describe(),
                        status: reply.status,
                        sense,
                    });
                }
                status => {
                    return Err(Failed {
                        errno: libc::EIO,
                        text: if retry {
                            format!("SCSI command failed with status {}", status_name(status))
                        } else {
                            "(null)".into()
                        },
                        status,
                        sense,
                    });
                }
            }
        }
    }
}

fn status_name(status: u8) -> &'static str {
    match status {
        scsi::BUSY => "BUSY",
        scsi::TASK_SET_FULL => "TASK_SET_FULL",
        0x18 => "RESERVATION_CONFLICT",
        _ => "UNKNOWN",
    }
}

/// A wait drawn from an exponential distribution of the given mean (QEMU's).
fn exp_random(mean: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(mean);
    let u = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    (-(mean as f64) * u.max(1e-9).ln()) as u64
}

/// QEMU's map of which clusters are allocated, and which of those facts it may trust
/// (none with `cache.direct`): reads of clusters known unallocated on a unit that reads
/// them as zeroes need not go to the target.
struct AllocMap {
    cluster: u64,
    allocated: Bits,
    valid: Option<Bits>,
}

/// A plain bit set.
struct Bits(Vec<u64>);

impl Bits {
    /// `n` bits, none set; `None` when memory for them cannot be had.
    fn new(n: u64) -> Option<Bits> {
        let words = usize::try_from(n.div_ceil(64)).ok()?;
        let mut v = Vec::new();
        v.try_reserve_exact(words).ok()?;
        v.resize(words, 0);
        Some(Bits(v))
    }

    fn set(&mut self, range: std::ops::Range<u64>, on: bool) {
        for i in range {
            let (w, b) = ((i / 64) as usize, i % 64);
            if let Some(word) = self.0.get_mut(w) {
                if on {
                    *word |= 1 << b;
                } else {
                    *word &= !(1 << b);
                }
            }
        }
    }

    fn any(&self, range: std::ops::Range<u64>) -> bool {
        range.into_iter().any(|i| {
            self.0
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }

    fn all(&self, range: std::ops::Range<u64>) -> bool {
        range.into_iter().all(|i| {
            self.0
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        })
    }
}

impl AllocMap {
    /// The map of a unit of `size` bytes; `None` when memory for it cannot be had (the
    /// node then always asks the unit, as QEMU's does without its map).
    fn new(cluster: u64, size: u64, direct: bool) -> Option<AllocMap> {
        let n = size.div_ceil(cluster);
        Some(AllocMap {
            cluster,
            allocated: Bits::new(n)?,
            valid: if direct { None } else { Some(Bits::new(n)?) },
        })
    }

    /// QEMU's `iscsi_allocmap_update`: allocation marks every cluster touched, the rest
    /// only clusters wholly inside.
    fn update(&mut self, offset: u64, len: u64, allocated: bool, valid: bool) {
        let c = self.cluster;
        let touched = offset / c..(offset + len).div_ceil(c);
        let inside = offset.div_ceil(c)..(offset + len) / c;
        if allocated {
            self.allocated.set(touched.clone(), true);
        } else if inside.start < inside.end {
            self.allocated.set(inside.clone(), false);
        }
        if let Some(v) = &mut self.valid {
            if valid {
                if inside.start < inside.end {
                    v.set(inside, true);
                }
            } else {
                v.set(touched, false);
            }
        }
    }

    fn clusters(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.cluster..(offset + len).div_ceil(self.cluster)
    }

    fn is_allocated(&self, offset: u64, len: u64) -> bool {
        self.allocated.any(self.clusters(offset, len))
    }

    fn is_valid(&self, offset: u64, len: u64) -> bool {
        self.valid
            .as_ref()
            .is_some_and(|v| v.all(self.clusters(offset, len)))
    }
}

/// What the node knows of its unit.
struct Iscsi {
    conn: Conn,
    device_type: u8,
    block_size: u64,
    capacity: Cell<Capacity>,
    lbp: scsi::Provisioning,
    limits: scsi::BlockLimits,
    dpofua: bool,
    write_protected: bool,
    has_write_same: Cell<bool>,
    /// The target's cluster size as QEMU guesses it (its optimal unmap granularity), if
    /// reasonable.
    cluster_size: Option<u64>,
    allocmap: RefCell<Option<AllocMap>>,
    /// Writes of whole blocks share it; a write of part of a block (read, changed,
    /// written back) holds it alone.
    rmw: tokio::sync::RwLock<()>,
    strong: QDict,
}

/// The `timeout` and `lun` options as numbers (a name's options carry them as text).
fn number(opts: &Args, key: &str) -> Option<i64> {
    match opts.get(key)? {
        // QEMU's option parser takes C's spellings (`0x10`).
        QObject::String(s) => {
            let (negative, magnitude) = ferrite_qapi::visit::parse_c_integer(s)?;
            let n = i64::try_from(magnitude).ok()?;
            Some(if negative { -n } else { n })
        }
        v => v.as_i64(),
    }
}

/// QEMU's default initiator name: its own prefix, and in a system emulator the machine's
/// UUID or name after a colon.
fn default_initiator() -> String {
    const PREFIX: &str = "iqn.2008-11.org.linux-kvm";
    match ferrite_block::emulator::machine_label() {
        Some(label) => format!("{PREFIX}:{label}"),
        None => PREFIX.to_owned(),
    }
}

impl DriverFactory for IscsiFactory {
    fn name(&self) -> &'static str {
        "iscsi"
    }

    fn name_creation(&self) -> NameCreation {
        NameCreation::ReuseExisting
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            if !opts.has("transport")
                && let Some(name) = opts.opt_str("filename")
            {
                return Err(Error::generic(format!("Failed to parse URL : {name}")).into());
            }
            let (Some(transport), Some(portal), Some(target)) = (
                opts.opt_str("transport"),
                opts.opt_str("portal"),
                opts.opt_str("target"),
            ) else {
                return Err(
                    Error::generic("Need all of transport, portal and target options").into(),
                );
            };
            let iser = match transport {
                "tcp" => false,
                "iser" => true,
                other => {
                    return Err(Error::generic(format!("Unknown transport: {other}")).into());
                }
            };
            // libiscsi makes no context for an empty initiator name.
            if opts.opt_str("initiator-name") == Some("") {
                return Err(Error::generic("iSCSI: Failed to create iSCSI context.").into());
            }
            let chap = chap(ctx, opts)?;
            let digest = match opts.opt_str("header-digest") {
                None | Some("none-crc32c") => "None,CRC32C",
                Some("crc32c") => "CRC32C",
                Some("none") => "None",
                Some("crc32c-none") => "CRC32C,None",
                Some(other) => {
                    return Err(
                        Error::generic(format!("Invalid header-digest setting : {other}")).into(),
                    );
                }
            };
            let lun = number(opts, "lun").unwrap_or(0).max(0) as u64;
            let timeout = number(opts, "timeout")
                .filter(|t| *t > 0)
                .map(|t| Duration::from_secs(t as u64));
            let target = Target {
                portal: portal.to_owned(),
                name: target.to_owned(),
                initiator: opts
                    .opt_str("initiator-name")
                    .map_or_else(default_initiator, str::to_owned),
                chap,
                digest,
            };
            let connect_failed =
                |e: String| Error::generic(format!("iSCSI: Failed to connect to LUN : {e}"));
            if iser {
                // ferrite has no RDMA: libiscsi on a host without it resolves the portal,
                // then fails so.
                login::resolve(&target.portal)
                    .await
                    .map_err(connect_failed)?;
                return Err(connect_failed(
                    "Failed to start full connect Couldn't connect transport: Failed creating \
                     Event Channel\n"
                        .into(),
                )
                .into());
            }
            let logged_in = match timeout {
                Some(t) => tokio::time::timeout(t, login::login(&target))
                    .await
                    .unwrap_or_else(|_| Err("iscsi_service failed with : timed out".into())),
                None => login::login(&target).await,
            }
            .map_err(connect_failed)?;
            let conn = Conn {
                session: RefCell::new(Session::start(logged_in)),
                relogin: tokio::sync::Mutex::new(()),
                target,
                lun,
                timeout,
                closed: Cell::new(false),
                opened: Cell::new(false),
            };
            let opened = probe(&conn, ctx).await;
            let unit = match opened {
                Ok(u) => u,
                Err(e) => {
                    let session = conn.session.borrow().clone();
                    session.logout().await;
                    return Err(e);
                }
            };
            conn.opened.set(true);
            let mut strong = QDict::new();
            for key in STRONG {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            let direct = ctx.settings().cache_direct;
            let size = unit.capacity.num_blocks * u64::from(unit.capacity.block_size);
            let cluster_size = unit
                .limits
                .opt_unmap_gran
                .checked_mul(unit.capacity.block_size)
                .map(u64::from)
                .filter(|c| (4096..=16 << 20).contains(c));
            let allocmap = cluster_size
                .filter(|_| unit.capacity.lbprz)
                .and_then(|c| AllocMap::new(c, size, direct));
            Ok(Box::new(Iscsi {
                conn,
                device_type: unit.device_type,
                block_size: u64::from(unit.capacity.block_size).max(512),
                capacity: Cell::new(unit.capacity),
                lbp: unit.lbp,
                limits: unit.limits,
                dpofua: unit.dpofua,
                write_protected: unit.write_protected,
                has_write_same: Cell::new(true),
                cluster_size,
                allocmap: RefCell::new(allocmap),
                rmw: tokio::sync::RwLock::new(()),
                strong,
            }) as Box<dyn Driver>)
        })
    }
}

/// CHAP's user and secret from the options (QEMU's `apply_chap`).
fn chap(ctx: &OpenCtx<'_>, opts: &Args) -> Result<Option<(String, String)>, ferrite_block::Error> {
    let Some(user) = opts.opt_str("user") else {
        return Ok(None);
    };
    let secret_id = opts.opt_str("password-secret");
    let password = opts.opt_str("password");
    let secret = match (secret_id, password) {
        (Some(_), Some(_)) => {
            return Err(Error::generic(
                "'password' and 'password-secret' properties are mutually exclusive",
            )
            .into());
        }
        (Some(id), None) => {
            let bytes = ctx.graph().secrets().get(id)?;
            String::from_utf8(bytes)
                .map_err(|_| Error::generic(format!("Data from secret {id} is not valid UTF-8")))?
        }
        (None, Some(p)) => {
            warn_report(
                "iSCSI block driver 'password' option is deprecated, use 'password-secret' instead",
            );
            p.to_owned()
        }
        (None, None) => {
            return Err(Error::generic("CHAP username specified but no password was given").into());
        }
    };
    Ok(Some((user.to_owned(), secret)))
}

/// What the open learns of the unit.
struct Unit {
    device_type: u8,
    capacity: Capacity,
    lbp: scsi::Provisioning,
    limits: scsi::BlockLimits,
    dpofua: bool,
    write_protected: bool,
}

/// An inquiry, asked again with room for all when the answer is longer (QEMU's
/// `iscsi_do_inquiry`).
async fn inquiry(conn: &Conn, evpd: bool, page: u8) -> Result<Vec<u8>, Error> {
    let failed = |f: Failed| Error::generic(format!("iSCSI: Inquiry command failed : {}", f.text));
    let ask = |n: u16| async move {
        conn.run(&scsi::inquiry(evpd, page, n), || Dir::In(usize::from(n)))
            .await
    };
    let mut r = ask(64).await.map_err(failed)?;
    let full = if evpd {
        usize::from(u16::from_be_bytes([
            r.data.get(2).copied().unwrap_or(0),
            r.data.get(3).copied().unwrap_or(0),
        ])) + 4
    } else {
        usize::from(r.data.get(4).copied().unwrap_or(0)) + 5
    };
    if full > r.received.min(64) {
        r = ask(u16::try_from(full).unwrap_or(u16::MAX))
            .await
            .map_err(failed)?;
    }
    let mut data = r.data;
    data.truncate(r.received);
    Ok(data)
}

/// Asks the unit what it is, as QEMU's open does: the standard inquiry, mode parameters
/// (write protection, FUA), capacity, and the block limits and provisioning pages.
async fn probe(conn: &Conn, ctx: &mut OpenCtx<'_>) -> ferrite_block::Result<Unit> {
    conn.ready().await?;
    let standard = inquiry(conn, false, 0).await?;
    let device_type = scsi::device_type(&standard).unwrap_or(0x1f);
    let (write_protected, dpofua) = match conn.run(&scsi::mode_sense6(), || Dir::In(255)).await {
        Ok(r) => scsi::mode_flags(&r.data[..r.received]).unwrap_or_else(|| {
            error_report("iSCSI: Failed to unmarshall MODE_SENSE(6) data: ");
            (false, false)
        }),
        Err(_) => {
            error_report("iSCSI: Failed MODE_SENSE(6), LUN assumed writable");
            (false, false)
        }
    };
    if device_type == scsi::TYPE_DISK && write_protected {
        ctx.apply_auto_read_only(|| Error::generic("LUN is write protected").into())?;
    }
    let capacity = read_capacity(conn, device_type).await?;
    let pages = inquiry(conn, true, scsi::VPD_SUPPORTED).await?;
    let pages = scsi::supported_pages(&pages);
    let mut lbp = scsi::Provisioning::default();
    let mut limits = scsi::BlockLimits::default();
    for page in pages {
        match page {
            scsi::VPD_PROVISIONING => {
                lbp = scsi::provisioning(&inquiry(conn, true, page).await?);
            }
            scsi::VPD_BLOCK_LIMITS => {
                limits = scsi::block_limits(&inquiry(conn, true, page).await?);
            }
            _ => {}
        }
    }
    Ok(Unit {
        device_type,
        capacity,
        lbp,
        limits,
        dpofua,
        write_protected,
    })
}

/// The unit's capacity (QEMU's `iscsi_readcapacity_sync`): READ CAPACITY(16) for a disk,
/// (10) when that fails and for a CD-ROM, nothing for other devices.
async fn read_capacity(conn: &Conn, device_type: u8) -> Result<Capacity, Error> {
    let failed = || Error::generic("iSCSI: failed to send readcapacity10/16 command");
    let cap = match device_type {
        scsi::TYPE_DISK | scsi::TYPE_ROM => {
            let sixteen = if device_type == scsi::TYPE_DISK {
                conn.run(&scsi::read_capacity16(), || Dir::In(32))
                    .await
                    .ok()
            } else {
                None
            };
            match sixteen {
                Some(r) => scsi::capacity16(&r.data[..r.received]).ok_or_else(|| {
                    Error::generic("iSCSI: Failed to unmarshall readcapacity16 data.")
                })?,
                None => {
                    let r = conn
                        .run(&scsi::read_capacity10(), || Dir::In(8))
                        .await
                        .map_err(|_| failed())?;
                    scsi::capacity10(&r.data[..r.received]).ok_or_else(|| {
                        Error::generic("iSCSI: Failed to unmarshall readcapacity10 data.")
                    })?
                }
            }
        }
        _ => return Ok(Capacity::default()),
    };
    // QEMU takes any multiple of 512; past 1 MiB no unit is real, and each request would
    // need a buffer of it.
    if cap.block_size == 0 || cap.block_size % 512 != 0 || cap.block_size > 1 << 20 {
        return Err(Error::generic(format!(
            "iSCSI: the target returned an invalid block size of {}.",
            cap.block_size as i32
        )));
    }
    // QEMU takes any count; a size past what a node can have would overflow its sums.
    if cap
        .num_blocks
        .checked_mul(u64::from(cap.block_size))
        .is_none_or(|size| size > i64::MAX as u64)
    {
        return Err(Error::generic(format!(
            "iSCSI: the target returned an invalid capacity of {} blocks.",
            cap.num_blocks
        )));
    }
    Ok(cap)
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl Iscsi {
    /// Forgets what the map knew (the unit changed under it, or its size did); `direct`
    /// says whether `cache.direct` now holds (unchanged when `None`).
    fn reset_allocmap(&self, direct: Option<bool>) {
        let mut map = self.allocmap.borrow_mut();
        if let Some(m) = map.as_ref() {
            let direct = direct.unwrap_or(m.valid.is_none());
            *map = AllocMap::new(m.cluster, self.size(), direct);
        }
    }

    fn size(&self) -> u64 {
        let c = self.capacity.get();
        c.num_blocks.saturating_mul(u64::from(c.block_size))
    }

    fn use_16(&self) -> bool {
        self.capacity.get().use_16
    }

    /// Blocks one READ or WRITE may carry (QEMU's `max_transfer`).
    fn max_xfer_blocks(&self) -> u64 {
        let cdb_max: u64 = if self.use_16() { 0xffff_ffff } else { 0xffff };
        match self.limits.max_xfer_len {
            0 => cdb_max,
            n => cdb_max.min(u64::from(n)),
        }
        // A request is at most 1 GiB here whatever the unit allows.
        .min((1 << 30) / self.block_size)
        .max(1)
    }

    fn allocmap(&self, f: impl FnOnce(&mut AllocMap)) {
        if let Some(m) = self.allocmap.borrow_mut().as_mut() {
            f(m);
        }
    }

    /// Whether the unit's map says `offset..+len` reads as zeroes without asking.
    fn known_unallocated(&self, offset: u64, len: u64) -> bool {
        self.allocmap
            .borrow()
            .as_ref()
            .is_some_and(|m| m.is_valid(offset, len) && !m.is_allocated(offset, len))
    }

    /// Whether QEMU would look at the block status before a read of this size.
    fn worth_checking(&self, offset: u64, len: u64) -> bool {
        len >= CHECKALLOC
            && self
                .allocmap
                .borrow()
                .as_ref()
                .is_some_and(|m| !m.is_valid(offset, len) && !m.is_allocated(offset, len))
    }

    /// Reads whole blocks.
    async fn read_blocks(&self, node: &Node, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let max = self.max_xfer_blocks() * self.block_size;
        if len <= max {
            return self.read_piece(node, offset, len).await;
        }
        let mut out = Vec::with_capacity(len as usize);
        let mut at = offset;
        while at < offset + len {
            let n = max.min(offset + len - at);
            let piece = self.read_piece(node, at, n).await?;
            out.extend_from_slice(&piece);
            ferrite_block::io::pool::give(piece);
            at += n;
        }
        Ok(out)
    }

    /// Reads one command's worth of whole blocks (QEMU's `iscsi_co_readv`).
    async fn read_piece(&self, node: &Node, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if self.known_unallocated(offset, len) {
            return Ok(vec![0; len as usize]);
        }
        if self.worth_checking(offset, len) {
            let c = self.cluster_size.unwrap_or(self.block_size);
            let head = offset % c;
            let e = self
                .status(node, offset - head, self.size() - (offset - head))
                .await?;
            if e.zero && e.len >= len + head {
                return Ok(vec![0; len as usize]);
            }
        }
        let lba = offset / self.block_size;
        let blocks = (len / self.block_size) as u32;
        let cdb = scsi::rw(false, self.use_16(), lba, blocks, false);
        match self.conn.run(&cdb, || Dir::In(len as usize)).await {
            Ok(r) => Ok(r.data),
            Err(f) => {
                error_report(&format!("iSCSI READ10/16 failed at lba {lba}: {}", f.text));
                Err(f.io())
            }
        }
    }

    /// Writes whole blocks (QEMU's `iscsi_co_writev`), with FUA when the unit takes it.
    async fn write_blocks(&self, offset: u64, data: Bytes, flags: ReqFlags) -> io::Result<()> {
        let max = (self.max_xfer_blocks() * self.block_size) as usize;
        let fua = flags.contains(ReqFlags::FUA);
        let mut at = 0usize;
        while at < data.len() {
            let n = max.min(data.len() - at);
            let piece = data.slice(at..at + n);
            let off = offset + at as u64;
            let lba = off / self.block_size;
            let blocks = (n as u64 / self.block_size) as u32;
            let cdb = scsi::rw(true, self.use_16(), lba, blocks, fua && self.dpofua);
            if let Err(f) = self.conn.run(&cdb, || Dir::Out(piece.clone())).await {
                self.allocmap(|m| m.update(off, n as u64, false, false));
                error_report(&format!("iSCSI WRITE10/16 failed at lba {lba}: {}", f.text));
                return Err(f.io());
            }
            self.allocmap(|m| m.update(off, n as u64, true, true));
            at += n;
        }
        if fua && !self.dpofua {
            // The block layer's FUA for a unit without it: a flush after the write.
            self.sync_cache().await?;
        }
        Ok(())
    }

    /// The blocks around `offset..+len`.
    fn around(&self, offset: u64, len: u64) -> (u64, u64) {
        let b = self.block_size;
        (offset / b * b, (offset + len).div_ceil(b) * b)
    }

    async fn sync_cache(&self) -> io::Result<()> {
        self.conn
            .run(&scsi::synchronize_cache10(), || Dir::None)
            .await
            .map(|_| ())
            .map_err(|f| {
                error_report(&format!("iSCSI SYNCHRONIZECACHE10 failed: {}", f.text));
                f.io()
            })
    }

    /// Writes `data` at any offset: whole blocks straight, parts of blocks read, changed and
    /// written back alone.
    async fn write_any(
        &self,
        node: &Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let len = data.len() as u64;
        let (start, end) = self.around(offset, len);
        if start == offset && end == offset + len {
            let _shared = self.rmw.read().await;
            return self.write_blocks(offset, Bytes::from(data), flags).await;
        }
        let _alone = self.rmw.write().await;
        let mut whole = self.read_blocks(node, start, end - start).await?;
        let at = (offset - start) as usize;
        whole[at..at + data.len()].copy_from_slice(&data);
        self.write_blocks(start, Bytes::from(whole), flags).await
    }

    /// WRITE SAME of zeroes over whole blocks (QEMU's `iscsi_co_pwrite_zeroes`); ENOTSUP
    /// when the unit cannot.
    async fn write_same(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let b = self.block_size;
        let mut sixteen = self.use_16();
        let mut unmap = unmap;
        if unmap {
            if !sixteen && !self.lbp.lbpws10 {
                sixteen = true;
            }
            if sixteen && !self.lbp.lbpws {
                unmap = false;
                sixteen = self.use_16();
            }
        }
        if !unmap && !self.has_write_same.get() {
            return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
        }
        let cdb_max: u64 = if sixteen { u64::from(u32::MAX) } else { 0xffff };
        let ws_max = match self.limits.max_ws_len {
            0 => self.max_xfer_blocks(),
            n => n.min(self.max_xfer_blocks()),
        };
        let max = cdb_max.min(ws_max).max(1);
        let zero = Bytes::from(vec![0u8; b as usize]);
        let mut lba = offset / b;
        let end = (offset + len) / b;
        while lba < end {
            let n = max.min(end - lba);
            let cdb = scsi::write_same(sixteen, lba, n as u32, unmap);
            match self.conn.run(&cdb, || Dir::Out(zero.clone())).await {
                Ok(_) => {}
                Err(f)
                    if f.status == scsi::CHECK_CONDITION
                        && f.sense.key == scsi::ILLEGAL_REQUEST
                        && matches!((f.sense.asc, f.sense.ascq), (0x20, 0) | (0x24, 0)) =>
                {
                    self.has_write_same.set(false);
                    return Err(io::Error::from_raw_os_error(libc::ENOTSUP));
                }
                Err(f) => {
                    self.allocmap(|m| m.update(lba * b, n * b, false, false));
                    error_report(&format!(
                        "iSCSI WRITESAME10/16 failed at lba {lba}: {}",
                        f.text
                    ));
                    return Err(f.io());
                }
            }
            self.allocmap(|m| m.update(lba * b, n * b, !unmap, !unmap));
            lba += n;
        }
        Ok(())
    }

    /// Block status from GET LBA STATUS (QEMU's `iscsi_co_block_status`): all data when the
    /// unit has no thin provisioning or cannot say.
    async fn status(&self, _node: &Node, offset: u64, len: u64) -> io::Result<Extent> {
        let cap = self.capacity.get();
        if !cap.lbpme {
            return Ok(Extent::data(len));
        }
        let b = self.block_size;
        let lba = offset / b;
        let r = match self
            .conn
            .run(&scsi::get_lba_status(lba), || Dir::In(24))
            .await
        {
            Ok(r) => r,
            Err(f) => {
                error_report(&format!(
                    "iSCSI GET_LBA_STATUS failed at lba {lba}: {}",
                    f.text
                ));
                return Ok(Extent::data(len));
            }
        };
        let Some((first, blocks, unallocated)) = scsi::lba_status(&r.data[..r.received]) else {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        };
        if first != lba || blocks == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let end = lba
            .saturating_add(u64::from(blocks))
            .saturating_mul(b)
            .min(self.size());
        let n = end.saturating_sub(offset).min(len).max(1);
        let zero = unallocated && cap.lbprz;
        self.allocmap(|m| m.update(offset, n, !zero, true));
        Ok(Extent {
            len: n,
            data: !unallocated,
            zero,
            allocated: true,
        })
    }
}

impl Driver for Iscsi {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    fn format_name(&self) -> &'static str {
        "iscsi"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size()
    }

    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.block_size
    }

    fn cluster_size(&self) -> Option<u64> {
        self.cluster_size
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            if self.device_type != scsi::TYPE_DISK && self.device_type != scsi::TYPE_ROM {
                return Err(einval());
            }
            let (start, end) = self.around(offset, len as u64);
            // A read waits for a write of part of a block under way (QEMU's serialising
            // requests): it sees the write it was sent after.
            let _shared = self.rmw.read().await;
            let data = self.read_blocks(node, start, end - start).await?;
            if start == offset && data.len() == len {
                return Ok(data);
            }
            let at = (offset - start) as usize;
            let out = data[at..at + len].to_vec();
            ferrite_block::io::pool::give(data);
            Ok(out)
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_any(node, offset, data, flags))
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let b = self.block_size;
            let (head_end, tail_start) = (offset.next_multiple_of(b), (offset + len) / b * b);
            let cap = self.capacity.get();
            let unmap = flags.contains(ReqFlags::MAY_UNMAP) && cap.lbprz && self.lbp.lbpws;
            let as_data = |at: u64, n: u64| {
                ferrite_block::driver::write_zeroes_as_data(at, n, flags, move |at, zeroes| {
                    self.write_any(node, at, zeroes, flags - ReqFlags::MAY_UNMAP)
                })
            };
            if head_end >= tail_start {
                return as_data(offset, len).await;
            }
            if head_end > offset {
                as_data(offset, head_end - offset).await?;
            }
            let same = {
                let _shared = self.rmw.read().await;
                self.write_same(head_end, tail_start - head_end, unmap)
                    .await
            };
            match same {
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                    as_data(head_end, tail_start - head_end).await?;
                }
                other => other?,
            }
            if offset + len > tail_start {
                as_data(tail_start, offset + len - tail_start).await?;
            }
            if flags.contains(ReqFlags::FUA) {
                self.sync_cache().await?;
            }
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if !self.lbp.lbpu {
                return Ok(());
            }
            let b = self.block_size;
            let (first, end) = (offset.div_ceil(b), (offset + len) / b);
            let max = match self.limits.max_unmap {
                0 => u64::from(u32::MAX),
                n => u64::from(n),
            };
            let mut lba = first;
            while lba < end {
                let n = max.min(end - lba);
                let (cdb, list) = scsi::unmap(lba, n as u32);
                let list = Bytes::from(list);
                let r = self.conn.run(&cdb, || Dir::Out(list.clone())).await;
                self.allocmap(|m| m.update(lba * b, n * b, false, false));
                match r {
                    // A target unhappy with the range's alignment: silently nothing, as
                    // in QEMU.
                    Err(f) if f.status == scsi::CHECK_CONDITION => {}
                    Err(f) => {
                        error_report(&format!("iSCSI UNMAP failed at lba {lba}: {}", f.text));
                        return Err(f.io());
                    }
                    Ok(_) => {}
                }
                lba += n;
            }
            Ok(())
        })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(self.sync_cache())
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(self.status(node, offset, len))
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.device_type != scsi::TYPE_DISK {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Cannot resize non-disk iSCSI devices",
                ));
            }
            let cap = read_capacity(&self.conn, self.device_type)
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.capacity.set(cap);
            if size > self.size() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "Cannot grow iSCSI devices",
                ));
            }
            self.reset_allocmap(None);
            Ok(())
        })
    }

    fn invalidate_cache<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.reset_allocmap(None);
            Ok(())
        })
    }

    fn reopen_check(&self, _node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        if !opts.bool_or("read-only", false) && self.write_protected {
            return Err(Error::generic("Cannot open a write protected LUN as read-write").into());
        }
        Ok(())
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        opts: &Args,
        _read_only: bool,
    ) -> ferrite_block::Result<()> {
        // `cache.direct` may have changed, and with it what the map may trust.
        if self.allocmap.borrow().is_some() {
            let direct = opts
                .dict("cache")
                .is_some_and(|c| c.bool_or("direct", false));
            self.reset_allocmap(Some(direct));
        }
        Ok(())
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.conn.closed.set(true);
            let session = self.conn.session.borrow().clone();
            session.logout().await;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allocation_map_marks_as_qemu_does() {
        let mut m = AllocMap::new(4096, 64 << 10, false).unwrap();
        // A write marks every cluster it touches allocated, but trusts only whole ones.
        m.update(1000, 8192, true, true);
        assert!(m.is_allocated(0, 1));
        assert!(m.is_allocated(8192, 1));
        assert!(m.is_valid(4096, 4096));
        assert!(!m.is_valid(0, 4096));
        // Unallocated: only whole clusters change.
        m.update(4096, 4096, false, true);
        assert!(!m.is_allocated(4096, 4096));
        assert!(m.is_valid(4096, 4096));
        // Invalid: every cluster touched forgets.
        m.update(4097, 1, false, false);
        assert!(!m.is_valid(4096, 4096));
        let direct = AllocMap::new(4096, 64 << 10, true).unwrap();
        assert!(!direct.is_valid(0, 4096));
    }

    #[test]
    fn waits_average_their_mean() {
        let n = 2000;
        let sum: u64 = (0..n).map(|_| exp_random(100)).sum();
        let mean = sum / n;
        assert!((50..200).contains(&mean), "{mean}");
    }
}
