//! `blkdebug` (QEMU: block/blkdebug.c): a test filter over its `image` child that acts on the
//! debug events the format above raises (`read_aio`, `write_aio`, ...). Rules, from the
//! options or a `config` file, inject errors (armed by their event, then failing the next
//! matching requests, `once` or until the next event), move a state machine (`set-state`), and
//! breakpoints (`break`) hold a request at its event until it is resumed.

mod config;

use crate::error::generic;
use config::{Group, Groups, RuleOpts};
use ferrite_block::driver::{BoxFut, DebugOp, Driver, Extent, ReqFlags};
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use tokio::sync::Notify;

/// The kinds of request a rule may fail (QAPI `BlkdebugIOType`), as bits.
const IO_READ: u32 = 1;
const IO_WRITE: u32 = 2;
const IO_WRITE_ZEROES: u32 = 4;
const IO_DISCARD: u32 = 8;
const IO_FLUSH: u32 = 16;
const IO_BLOCK_STATUS: u32 = 32;

fn iotype_bit(name: &str) -> Option<u32> {
    Some(match name {
        "read" => IO_READ,
        "write" => IO_WRITE,
        "write-zeroes" => IO_WRITE_ZEROES,
        "discard" => IO_DISCARD,
        "flush" => IO_FLUSH,
        "block-status" => IO_BLOCK_STATUS,
        _ => return None,
    })
}

#[derive(Debug)]
enum Action {
    InjectError {
        errno: i32,
        /// The byte the rule hits (a request containing it fails), or any.
        offset: Option<u64>,
        once: bool,
        iotypes: u32,
    },
    SetState {
        new_state: i32,
    },
    Suspend {
        tag: String,
    },
}

#[derive(Debug)]
struct Rule {
    event: String,
    /// Only in this state (0: any).
    state: i32,
    action: Action,
}

/// A request held at a breakpoint.
struct Suspended {
    tag: String,
    resume: Rc<Notify>,
    resumed: Rc<Cell<bool>>,
}

/// Whether the program runs under the qtest accelerator, where blkdebug says nothing of the
/// requests it holds (QEMU checks `qtest_enabled()`).
static QTEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells blkdebug that the qtest accelerator runs (a system front end's `-accel qtest`).
pub fn set_qtest(enabled: bool) {
    QTEST.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

fn announce(text: std::fmt::Arguments<'_>) {
    if !QTEST.load(std::sync::atomic::Ordering::Relaxed) {
        println!("{text}");
    }
}

/// The `blkdebug` driver's factory.
pub(crate) struct BlkdebugFactory;

/// A rule from its group's entry, as QEMU's `add_rule` makes one: the event and I/O type
/// must be known.
fn rule_from(opts: &RuleOpts) -> Result<Rule, String> {
    let event = opts.get("event").ok_or("Missing event name for rule")?;
    if !ferrite_qapi::schema()
        .enum_values("BlkdebugEvent")
        .contains(&event)
    {
        return Err(format!("invalid parameter value: {event}"));
    }
    // QEMU's rules keep these as C `int`s.
    let state = opts.number("state").unwrap_or(0) as i32;
    let action = match opts.group {
        Group::InjectError => {
            let iotypes = match opts.get("iotype") {
                Some(t) => iotype_bit(t).ok_or_else(|| format!("invalid parameter value: {t}"))?,
                None => IO_READ | IO_WRITE | IO_WRITE_ZEROES | IO_DISCARD | IO_FLUSH,
            };
            let sector = opts.number("sector").map_or(-1, |n| n as i64);
            Action::InjectError {
                errno: opts.number("errno").map_or(libc::EIO, |n| n as i32),
                offset: u64::try_from(sector).ok().map(|s| s.saturating_mul(512)),
                once: opts.flag("once"),
                iotypes,
            }
        }
        Group::SetState => Action::SetState {
            new_state: opts.number("new_state").unwrap_or(0) as i32,
        },
    };
    Ok(Rule {
        event: event.to_owned(),
        state,
        action,
    })
}

/// The options that set a blkdebug node's limits (sizes to QEMU), and where its rules come
/// from.
const SETTINGS: [&str; 7] = [
    "config",
    "align",
    "max-transfer",
    "opt-write-zero",
    "max-write-zero",
    "opt-discard",
    "max-discard",
];
const SIZES: &[&str] = match SETTINGS.split_first() {
    Some((_config, sizes)) => sizes,
    None => &[],
};

/// QEMU's strong options of a blkdebug node, the rule lists flattened (`inject-error.0.event`).
fn strong_options(opts: &Args) -> ferrite_qobject::QDict {
    let mut d = ferrite_qobject::QDict::new();
    for key in SETTINGS {
        if let Some(v) = opts.get(key) {
            d.insert(key, v.clone());
        }
    }
    for list in ["inject-error", "set-state"] {
        let Some(QObject::List(items)) = opts.get(list) else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            for (k, v) in item.as_dict().into_iter().flat_map(|d| d.iter()) {
                d.insert(format!("{list}.{i}.{k}"), v.clone());
            }
        }
    }
    d
}

impl DriverFactory for BlkdebugFactory {
    fn name(&self) -> &'static str {
        "blkdebug"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn opens_as_protocol(&self) -> bool {
        // QEMU opens it with `bdrv_file_open`, as it does protocols.
        true
    }

    fn parse_filename(&self, name: &str) -> Option<ferrite_block::Result<ferrite_qobject::QDict>> {
        // Without the `blkdebug:` prefix (read as the prefix says) the name is the image's,
        // with no rules.
        let image = ferrite_block::filename::protocol_options(name);
        Some(Ok(ferrite_qobject::QDict::new().with("image", image)))
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            // A protocol driver in QEMU: the node is listed before the children it opens.
            ctx.take_position_now();
            let opts = ctx.opts().clone();
            // QEMU reads the sizes before anything else.
            crate::error::refuse_negative_sizes(&opts, SIZES)?;
            let mut groups = Groups::default();
            if let Some(path) = opts.opt_str("config") {
                groups.read_file(path).map_err(generic)?;
            }
            groups.add_lists(&opts).map_err(generic)?;
            let rules = Group::ALL
                .into_iter()
                .flat_map(|g| groups.of(g))
                .map(rule_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(generic)?;
            let strong = strong_options(&opts);
            // Permissions taken on or kept from others on the image beyond the usual (tests
            // of permission conflicts).
            let perms = |key: &str| {
                let mut p = Perm::empty();
                if let Some(QObject::List(list)) = opts.get(key) {
                    for name in list.iter().filter_map(QObject::as_str) {
                        if let Some((perm, _)) = Perm::NAMED.iter().find(|(_, n)| *n == name) {
                            p |= *perm;
                        }
                    }
                }
                p
            };
            let (take, unshare) = (perms("take-child-perms"), perms("unshare-child-perms"));
            let image = ctx.open_child("image").await?;
            // Checked once the image is open (a bad image is reported first), as QEMU does.
            let align = check_limits(&opts, image.node().request_alignment()).map_err(generic)?;
            let driver = BlkdebugDriver {
                image,
                rules: RefCell::new(rules.into_iter().map(Rc::new).collect()),
                active: RefCell::new(Vec::new()),
                state: Cell::new(1),
                suspended: RefCell::new(Vec::new()),
                align,
                strong,
                take,
                unshare,
            };
            // The rules of event `none` apply from the start (QEMU raises it at open).
            driver.event("none").await;
            Ok(Box::new(driver) as Box<dyn Driver>)
        })
    }
}

/// The request alignment the node imposes (`align`, 1 when unset), after QEMU's checks of
/// `align` and the transfer, write-zeroes and discard limits against it and the image's
/// own alignment. The limits are checked, not applied: ferrite's block layer has no
/// per-node transfer limits to set.
fn check_limits(opts: &Args, image_align: u64) -> Result<u64, String> {
    let set = |key: &str| opts.opt_u64(key).filter(|v| *v != 0);
    let refuse = |key: &str, v: u64| Err(format!("Cannot meet constraints with {key} {v}"));
    const LIMIT: u64 = i32::MAX as u64;
    let align = set("align");
    if let Some(a) = align.filter(|a| *a >= LIMIT || !a.is_power_of_two()) {
        return refuse("align", a);
    }
    let base = align.unwrap_or(0).max(image_align).max(1);
    // Each limit is a multiple of the alignment; a maximum also of its optimum.
    for (key, over) in [
        ("max-transfer", None),
        ("opt-write-zero", None),
        ("max-write-zero", Some("opt-write-zero")),
        ("opt-discard", None),
        ("max-discard", Some("opt-discard")),
    ] {
        let unit = over.and_then(set).unwrap_or(0).max(base);
        if let Some(v) = set(key).filter(|v| *v >= LIMIT || v % unit != 0) {
            return refuse(key, v);
        }
    }
    Ok(align.unwrap_or(1))
}

struct BlkdebugDriver {
    image: Rc<Child>,
    rules: RefCell<Vec<Rc<Rule>>>,
    /// Error rules armed by their event, newest first.
    active: RefCell<Vec<Rc<Rule>>>,
    state: Cell<i32>,
    suspended: RefCell<Vec<Suspended>>,
    align: u64,
    /// The options that make the node what it is (its `json:` file name shows them).
    strong: ferrite_qobject::QDict,
    /// `take-child-perms`: taken on the image whatever the users need.
    take: Perm,
    /// `unshare-child-perms`: never shared with the image's other users.
    unshare: Perm,
}

impl BlkdebugDriver {
    /// The error an armed rule injects into a request of `iotype` over `offset..+len`.
    fn check(&self, iotype: u32, offset: u64, len: u64) -> io::Result<()> {
        let hit = self.active.borrow().iter().find_map(|r| match &r.action {
            Action::InjectError {
                errno,
                offset: at,
                once,
                iotypes,
            } if iotypes & iotype != 0
                && at.is_none_or(|a| len > 0 && a >= offset && a < offset + len) =>
            {
                Some((r.clone(), *errno, *once))
            }
            _ => None,
        });
        // A rule with errno 0 matches, and lets the request through (it stays, even `once`).
        let Some((rule, errno, once)) = hit.filter(|(_, errno, _)| *errno != 0) else {
            return Ok(());
        };
        if once {
            self.active.borrow_mut().retain(|r| !Rc::ptr_eq(r, &rule));
            self.rules.borrow_mut().retain(|r| !Rc::ptr_eq(r, &rule));
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    fn breakpoint(&self, op: DebugOp<'_>) -> Result<bool, i32> {
        match op {
            DebugOp::Break(event, tag) => {
                self.rules.borrow_mut().push(Rc::new(Rule {
                    event: event.to_owned(),
                    state: 0,
                    action: Action::Suspend {
                        tag: tag.to_owned(),
                    },
                }));
                Ok(true)
            }
            DebugOp::Remove(tag) => {
                let before = self.rules.borrow().len();
                self.rules
                    .borrow_mut()
                    .retain(|r| !matches!(&r.action, Action::Suspend { tag: t } if t == tag));
                let removed = self.rules.borrow().len() < before;
                let resumed = self.resume(tag);
                if removed || resumed {
                    Ok(true)
                } else {
                    Err(libc::ENOENT)
                }
            }
            DebugOp::Resume(tag) => {
                if self.resume(tag) {
                    Ok(true)
                } else {
                    Err(libc::ENOENT)
                }
            }
            DebugOp::IsSuspended(tag) => Ok(self.suspended.borrow().iter().any(|s| s.tag == tag)),
        }
    }

    /// Lets the requests held under `tag` go; whether there were any.
    fn resume(&self, tag: &str) -> bool {
        let mut held = self.suspended.borrow_mut();
        let before = held.len();
        held.retain(|s| {
            if s.tag == tag {
                s.resumed.set(true);
                s.resume.notify_one();
                false
            } else {
                true
            }
        });
        held.len() < before
    }

    async fn event(&self, event: &str) {
        let mut new_state = self.state.get();
        let mut injected = false;
        let mut holds: Vec<String> = Vec::new();
        let matching: Vec<Rc<Rule>> = self
            .rules
            .borrow()
            .iter()
            .filter(|r| r.event == event && (r.state == 0 || r.state == self.state.get()))
            .cloned()
            .collect();
        for rule in matching {
            match &rule.action {
                Action::InjectError { .. } => {
                    if !injected {
                        self.active.borrow_mut().clear();
                        injected = true;
                    }
                    self.active.borrow_mut().insert(0, rule.clone());
                }
                Action::SetState { new_state: s } => new_state = *s,
                Action::Suspend { tag } => {
                    // A breakpoint holds one request, then is gone.
                    self.rules.borrow_mut().retain(|r| !Rc::ptr_eq(r, &rule));
                    holds.push(tag.clone());
                }
            }
        }
        self.state.set(new_state);
        for tag in holds {
            // QEMU's blkdebug says so on standard output; tests wait for these lines.
            announce(format_args!("blkdebug: Suspended request '{tag}'"));
            let resume = Rc::new(Notify::new());
            let resumed = Rc::new(Cell::new(false));
            self.suspended.borrow_mut().push(Suspended {
                tag: tag.clone(),
                resume: resume.clone(),
                resumed: resumed.clone(),
            });
            while !resumed.get() {
                resume.notified().await;
            }
            announce(format_args!("blkdebug: Resuming request '{tag}'"));
        }
    }
}

impl Driver for BlkdebugDriver {
    ferrite_block::forward_to_child!(self.image; len, truncate);

    fn format_name(&self) -> &'static str {
        "blkdebug"
    }

    /// A protocol driver in QEMU, which cannot say what it occupies: no `actual-size`.
    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn handles_debug_events(&self) -> bool {
        true
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        ((perm | self.take), shared & !self.unshare)
    }

    fn can_grow(&self) -> bool {
        // Writes past the end reach the image, which grows if it can (a format above
        // allocating clusters).
        self.image.node().driver().can_grow()
    }

    fn debug_event<'a>(&'a self, _node: &'a Node, event: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.event(event).await;
            Ok(())
        })
    }

    fn debug_breakpoint(&self, op: DebugOp<'_>) -> Option<Result<bool, i32>> {
        Some(self.breakpoint(op))
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.check(IO_READ, offset, len as u64)?;
            self.image.read(offset, len).await
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.check(IO_WRITE, offset, data.len() as u64)?;
            self.image.write(offset, data, flags).await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.check(IO_WRITE_ZEROES, offset, len)?;
            self.image.write_zeroes(offset, len, flags).await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.check(IO_DISCARD, offset, len)?;
            self.image.discard(offset, len).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            // Errors are injected into blkdebug's own disk flush, which QEMU skips when
            // nothing was written through the node since the last one.
            if node.written_since_flush() {
                self.check(IO_FLUSH, 0, 0)?;
            }
            self.image.flush().await
        })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            self.check(IO_BLOCK_STATUS, offset, len)?;
            self.image.block_status(offset, len).await
        })
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("image")
    }

    fn strong_options(&self) -> ferrite_qobject::QDict {
        self.strong.clone()
    }

    /// `blkdebug:CONFIG:IMAGE`, as QEMU names a blkdebug node whose image has a plain name
    /// and that has no options but its config file (the name opens the same node again);
    /// rules or limits given as options need a `json:` name.
    fn plain_filename(&self) -> Option<String> {
        if self.strong.iter().any(|(k, _)| k != "config") {
            return None;
        }
        // The image's own plain name (QEMU's `exact_filename`): none where it needs `json:`.
        let image = self.image.node().exact_filename()?;
        let config = self
            .strong
            .get("config")
            .and_then(QObject::as_str)
            .unwrap_or_default();
        Some(format!("blkdebug:{config}:{image}"))
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        self.align
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        // QEMU's blkdebug reopens with the options it has, changing none.
        let was = Args::new(node.options());
        ferrite_block::driver::check_unchanged(opts, &was, &SETTINGS)?;
        ferrite_block::driver::check_unchanged(
            opts,
            &was,
            &[
                "inject-error",
                "set-state",
                "take-child-perms",
                "unshare-child-perms",
            ],
        )
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        _opts: &Args,
        _read_only: bool,
    ) -> ferrite_block::Result<()> {
        Ok(())
    }
}
