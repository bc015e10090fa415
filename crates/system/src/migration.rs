//! Migration of the machine to another process (QEMU: `migration/`): `migrate` stops the
//! machine, sends its state (`vmstate`, QEMU's stream layout) down a channel, gives its
//! images up (inactive) and ends in `postmigrate`; `-incoming URI` or `migrate-incoming`
//! receives a state, takes the images over (active) and runs the machine if it was to
//! start. The capabilities are kept, `events` makes each status change a `MIGRATION`
//! event, `query-migrate` says where it stands.
//!
//! ferrite's machine has no RAM: the state goes in one piece, with nothing to iterate over.
//! Channels: `exec:CMD`, `unix:PATH`, `tcp:HOST:PORT`, `file:PATH`.

use crate::System;
use crate::machine::RunState;
use ferrite_qapi::{Args, Error};
use ferrite_qmp::Event;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// QAPI `MigrationCapability`, in its order.
const CAPABILITIES: &[&str] = &[
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
];

/// Where the machine's migration stands.
#[derive(Default)]
pub(crate) struct MigrationState {
    caps: RefCell<Vec<&'static str>>,
    /// QAPI `MigrationStatus` of the migration out (empty: none)...
    status: Cell<&'static str>,
    /// ...and of the one coming in.
    incoming_status: Cell<&'static str>,
    error: RefCell<Option<String>>,
    started: Cell<Option<Instant>>,
    total_ms: Cell<Option<u64>>,
    /// Wakes a migration out waiting in `pre-switchover` (migrate-continue) or cancelled.
    go_on: tokio::sync::Notify,
    /// An incoming migration failed: the process ends, and with a failure.
    pub(crate) exit_failure: Cell<bool>,
    /// `migrate-set-parameters`' values.
    pub(crate) params: RefCell<crate::migration_parameters::Parameters>,
    /// `migrate-start-postcopy` was given for the migration out under way.
    postcopy: Cell<bool>,
}

impl MigrationState {
    fn has(&self, cap: &str) -> bool {
        self.caps.borrow().contains(&cap)
    }

    /// What query-migrate reports: the migration out, else the one in (QEMU's).
    fn status(&self) -> &'static str {
        match (self.status.get(), self.incoming_status.get()) {
            ("", "") => "none",
            ("", s) | (s, _) => s,
        }
    }

    /// Bytes per second a migration out may send (`max-bandwidth`; 0 is no limit).
    fn bandwidth(&self) -> u64 {
        match self.params.borrow().uint("max-bandwidth") {
            0 => u64::MAX,
            bw => bw,
        }
    }

    /// The `block-bitmap-mapping` parameter.
    fn mapping(&self) -> Option<crate::bitmap_migration::Mapping> {
        self.params.borrow().mapping().cloned()
    }

    /// Whether a migration out is under way.
    fn in_progress(&self) -> bool {
        matches!(
            self.status.get(),
            "setup"
                | "active"
                | "pre-switchover"
                | "device"
                | "cancelling"
                | "postcopy-active"
                | "postcopy-paused"
        )
    }
}

/// A migration channel, as the URI names it.
enum Channel {
    Exec(String),
    Unix(String),
    Tcp(String),
    File(String),
}

fn channel(uri: Option<&str>) -> Result<Channel, Error> {
    // ferrite takes the channel as a URI only (QEMU also as `channels`).
    let Some(uri) = uri else {
        return Err(Error::generic("need either 'uri' or 'channels' argument"));
    };
    Ok(match uri.split_once(':') {
        Some(("exec", rest)) => Channel::Exec(rest.to_owned()),
        Some(("unix", rest)) => Channel::Unix(rest.to_owned()),
        Some(("tcp", rest)) => Channel::Tcp(rest.to_owned()),
        Some(("file", rest)) => Channel::File(rest.split(',').next().unwrap_or("").to_owned()),
        _ => {
            return Err(Error::generic(format!("unknown migration protocol: {uri}")));
        }
    })
}

fn shell(cmd: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true);
    c
}

/// Where a migration out writes: a stream, and the command behind it (`exec:`), which
/// is waited for once the stream is closed.
struct Connected {
    w: std::pin::Pin<Box<dyn tokio::io::AsyncWrite>>,
    child: Option<tokio::process::Child>,
}

/// A channel opened when the migration starts (QEMU creates the file and runs the command
/// before `migrate` returns), or a socket to connect once it has returned.
enum Sink {
    Open(Connected),
    Unix(String),
    Tcp(String),
}

/// Opens what must be opened before `migrate` returns.
///
/// # Errors
/// QEMU's text for a file that cannot be created, or a command that cannot run.
fn open_sink(ch: Channel) -> Result<Sink, String> {
    Ok(match ch {
        Channel::Exec(cmd) => {
            let mut child = shell(&cmd)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("Could not run '{cmd}': {}", ferrite_qapi::os_msg(&e)))?;
            let stdin = child.stdin.take().ok_or("the command has no input")?;
            Sink::Open(Connected {
                w: Box::pin(stdin),
                child: Some(child),
            })
        }
        Channel::Unix(path) => Sink::Unix(path),
        Channel::Tcp(addr) => Sink::Tcp(addr),
        Channel::File(path) => {
            let f = std::fs::File::create(&path)
                .map_err(|e| format!("Could not create '{path}': {}", ferrite_qapi::os_msg(&e)))?;
            Sink::Open(Connected {
                w: Box::pin(tokio::fs::File::from_std(f)),
                child: None,
            })
        }
    })
}

impl Sink {
    /// Connects the sockets (QEMU does so once `migrate` has returned).
    async fn connect(self) -> Result<Connected, String> {
        let refused = |to: &str, e: io::Error| {
            format!("Failed to connect to '{to}': {}", ferrite_qapi::os_msg(&e))
        };
        let w: std::pin::Pin<Box<dyn tokio::io::AsyncWrite>> = match self {
            Sink::Open(c) => return Ok(c),
            Sink::Unix(path) => Box::pin(
                tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|e| refused(&path, e))?,
            ),
            Sink::Tcp(addr) => Box::pin(
                tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| refused(&addr, e))?,
            ),
        };
        Ok(Connected { w, child: None })
    }
}

impl Connected {
    /// Sends `bytes` at no more than `rate` bytes per second: QEMU's limiter lets a tenth of
    /// a second's worth through at a time.
    async fn write(&mut self, bytes: &[u8], rate: u64) -> io::Result<()> {
        let slice = usize::try_from((rate / 10).max(1)).unwrap_or(usize::MAX);
        let mut chunks = bytes.chunks(slice).peekable();
        while let Some(chunk) = chunks.next() {
            self.w.write_all(chunk).await?;
            if chunks.peek().is_some() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        self.w.flush().await
    }

    /// Closes the channel (and waits for an `exec:` command to end).
    async fn close(mut self) -> io::Result<()> {
        // Flushes a file, ends a socket; closing the pipe ends a command's input.
        self.w.shutdown().await?;
        drop(self.w);
        if let Some(mut child) = self.child {
            child.wait().await?;
        }
        Ok(())
    }
}

/// Where an incoming state comes from, ready to be read (a listener already bound, so
/// that the source may connect as soon as the command returns).
enum Source {
    Exec(String),
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
    File(String),
}

fn listen(ch: Channel) -> io::Result<Source> {
    Ok(match ch {
        Channel::Exec(cmd) => Source::Exec(cmd),
        Channel::Unix(path) => {
            // A socket left at the path goes first, as QEMU does.
            ferrite_socket::unix::remove_stale(&path)?;
            Source::Unix(tokio::net::UnixListener::bind(path)?)
        }
        Channel::Tcp(addr) => {
            let addr: std::net::SocketAddr = addr
                .parse()
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Source::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        Channel::File(path) => Source::File(path),
    })
}

/// An incoming state being read: the channel, and for `exec:` the command behind it.
struct Input {
    r: std::pin::Pin<Box<dyn tokio::io::AsyncRead>>,
    child: Option<tokio::process::Child>,
    exec: bool,
}

impl Input {
    /// Opens the channel the state comes over (a connection accepted, a command started).
    async fn open(src: Source) -> io::Result<Input> {
        Ok(match src {
            Source::Exec(cmd) => {
                let mut child = shell(&cmd).stdout(std::process::Stdio::piped()).spawn()?;
                let out = child
                    .stdout
                    .take()
                    .ok_or_else(|| io::Error::other("no output"))?;
                Input {
                    r: Box::pin(out),
                    child: Some(child),
                    exec: true,
                }
            }
            Source::Unix(l) => Input {
                r: Box::pin(l.accept().await?.0),
                child: None,
                exec: false,
            },
            Source::Tcp(l) => Input {
                r: Box::pin(l.accept().await?.0),
                child: None,
                exec: false,
            },
            Source::File(path) => Input {
                r: Box::pin(tokio::fs::File::open(path).await?),
                child: None,
                exec: false,
            },
        })
    }

    /// Appends what comes next to `buf`: how much (0 at the end of the stream).
    async fn more(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let at = buf.len();
        buf.resize(at + (256 << 10), 0);
        let n = self.r.read(&mut buf[at..]).await;
        buf.truncate(at + *n.as_ref().unwrap_or(&0));
        let n = n?;
        // QEMU waits for the command's output to become readable, and a command that ends
        // without writing anything never makes it so: the migration stays in `setup`
        // (iotest 060 starts a machine with `exec:cat /dev/null`).
        if n == 0 && at == 0 && self.exec {
            std::future::pending::<()>().await;
        }
        Ok(n)
    }

    /// Reads the rest of the stream into `buf`, and waits for the command to end.
    async fn finish(mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let r = self.r.read_to_end(buf).await;
        drop(self.r);
        if let Some(mut child) = self.child.take() {
            child.wait().await?;
        }
        r.map(|_| ())
    }
}

fn set_status(sys: &System, status: &'static str) {
    sys.migration.status.set(status);
    announce(sys, status);
}

fn set_incoming_status(sys: &System, status: &'static str) {
    sys.migration.incoming_status.set(status);
    announce(sys, status);
}

/// A `MIGRATION` event, where the `events` capability asks for them.
fn announce(sys: &System, status: &'static str) {
    let m = &sys.migration;
    if m.has("events") {
        sys.daemon.events.emit(Event {
            name: "MIGRATION",
            data: Some(QDict::new().with("status", status)),
        });
    }
}

fn failed(sys: &System, why: String, incoming: bool) {
    *sys.migration.error.borrow_mut() = Some(why);
    if incoming {
        set_incoming_status(sys, "failed");
    } else {
        set_status(sys, "failed");
    }
}

/// `migrate-set-capabilities`.
///
/// # Errors
/// A migration in progress.
pub(crate) fn set_capabilities(sys: &System, args: &Args) -> Result<(), Error> {
    let m = &sys.migration;
    if m.in_progress() {
        return Err(Error::generic("There's a migration process in progress"));
    }
    let Some(QObject::List(list)) = args.get("capabilities") else {
        return Ok(());
    };
    let mut caps = m.caps.borrow().clone();
    for c in list {
        let Some(d) = c.as_dict() else { continue };
        let name = d.get("capability").and_then(QObject::as_str).unwrap_or("");
        let Some(&cap) = CAPABILITIES.iter().find(|n| **n == name) else {
            continue;
        };
        let on = d.get("state").and_then(QObject::as_bool).unwrap_or(false);
        caps.retain(|c| *c != cap);
        if on {
            caps.push(cap);
        }
    }
    check_capabilities(sys, &caps)?;
    *m.caps.borrow_mut() = caps;
    Ok(())
}

/// Capabilities a background snapshot cannot run with, in QEMU's order of asking.
const NOT_WITH_BACKGROUND_SNAPSHOT: &[&str] = &[
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
];

/// QEMU's `migrate_caps_check`: whether the capabilities `new` may all be on together, in
/// the order QEMU asks. ferrite's machine has no RAM to track, so the host questions
/// (userfaultfd for postcopy, write tracking for a background snapshot) pass, as they do
/// for QEMU on this kind of host; there are no compression or TLS parameters.
fn check_capabilities(sys: &System, new: &[&str]) -> Result<(), Error> {
    let on = |c: &str| new.contains(&c);
    let refuse = |why: &str| Err(Error::generic(why));
    if on("zero-blocks") {
        ferrite_block::report::warn_report("zero-blocks capability is deprecated");
    }
    if on("postcopy-ram") {
        if on("x-ignore-shared") {
            return refuse("Postcopy is not compatible with ignore-shared");
        }
        if on("multifd") {
            return refuse("Postcopy is not yet compatible with multifd");
        }
    }
    if on("background-snapshot")
        && let Some(other) = NOT_WITH_BACKGROUND_SNAPSHOT.iter().find(|c| on(c))
    {
        return refuse(&format!(
            "Background-snapshot is not compatible with {other}"
        ));
    }
    if on("zero-copy-send") && (!on("multifd") || on("xbzrle")) {
        return refuse("Zero copy only available for non-compressed non-TLS multifd migration");
    }
    let incoming_started = !sys.migration.incoming_status.get().is_empty();
    if on("postcopy-preempt") {
        if !on("postcopy-ram") {
            return refuse("Postcopy preempt requires postcopy-ram");
        }
        if incoming_started {
            return refuse("Postcopy preempt must be set before incoming starts");
        }
    }
    if on("multifd") && incoming_started {
        return refuse("Multifd must be set before incoming starts");
    }
    if on("switchover-ack") && !on("return-path") {
        return refuse("Capability 'switchover-ack' requires capability 'return-path'");
    }
    if on("dirty-limit") {
        if on("auto-converge") {
            return refuse(
                "dirty-limit conflicts with auto-converge either of then available currently",
            );
        }
        // No accelerator of ferrite's has KVM's dirty ring.
        return refuse("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set");
    }
    if on("multifd") && on("xbzrle") {
        return refuse("Multifd is not compatible with xbzrle");
    }
    if on("mapped-ram") {
        if on("xbzrle") {
            return refuse("Mapped-ram migration is incompatible with xbzrle");
        }
        if on("postcopy-ram") {
            return refuse("Mapped-ram migration is incompatible with postcopy");
        }
    }
    Ok(())
}

/// `migrate-set-parameters`.
///
/// # Errors
/// QEMU's text for the first value it refuses (then nothing changes).
pub(crate) fn set_parameters(sys: &System, args: &Args) -> Result<(), Error> {
    let m = &sys.migration;
    m.params
        .borrow_mut()
        .set(args.as_dict(), |cap| m.has(cap))
        .map_err(Error::generic)
}

/// `query-migrate-parameters`.
pub(crate) fn query_parameters(sys: &System) -> QObject {
    sys.migration.params.borrow().query()
}

/// HMP `info migrate_parameters`.
pub(crate) fn info_parameters(sys: &System) -> String {
    sys.migration.params.borrow().info()
}

/// `query-migrate-capabilities`.
pub(crate) fn query_capabilities(sys: &System) -> QObject {
    QObject::List(
        CAPABILITIES
            .iter()
            .map(|c| {
                QDict::new()
                    .with("capability", *c)
                    .with("state", sys.migration.has(c))
                    .into()
            })
            .collect(),
    )
}

/// Why the machine cannot migrate (the nodes' migration blockers), oldest first.
pub(crate) fn blockers(sys: &System) -> Vec<String> {
    sys.daemon
        .graph
        .nodes()
        .iter()
        .filter_map(|n| n.driver().migration_blocker().map(str::to_owned))
        .collect()
}

/// QEMU's refusal of `migrate` and `snapshot-save` while something blocks migration: the
/// newest blocker.
///
/// # Errors
/// That blocker's text.
pub(crate) fn check_not_blocked(sys: &System) -> Result<(), Error> {
    match blockers(sys).pop() {
        Some(why) => Err(Error::generic(why)),
        None => Ok(()),
    }
}

/// `query-migrate`.
pub(crate) fn query(sys: &System) -> QObject {
    let m = &sys.migration;
    let mut d = QDict::new();
    let blocked = blockers(sys);
    if !blocked.is_empty() {
        d.insert(
            "blocked-reasons",
            QObject::List(blocked.into_iter().map(QObject::from).collect()),
        );
    }
    if m.status() == "none" {
        return d.into();
    }
    d.insert("status", m.status());
    // QEMU times a migration out while it runs and once it completed, not one that failed,
    // was cancelled or has yet to start; nor one coming in.
    let timed = matches!(
        m.status.get(),
        "active" | "cancelling" | "pre-switchover" | "device" | "completed"
    );
    if timed {
        if let Some(ms) = m.total_ms.get() {
            d.insert("total-time", ms);
        } else if let Some(t) = m.started.get() {
            d.insert("total-time", t.elapsed().as_millis() as u64);
        }
    }
    if let Some(e) = m.error.borrow().as_ref() {
        d.insert("error-desc", e.as_str());
    }
    d.into()
}

/// `migrate`: the machine's state goes to `uri` once the command has returned.
///
/// # Errors
/// A migration in progress, a machine waiting for one, an unknown channel.
pub(crate) fn migrate(sys: &Rc<System>, args: &Args) -> Result<(), Error> {
    let m = &sys.migration;
    // QEMU reads the channel before it looks at the machine.
    let ch = channel(args.opt_str("uri"))?;
    if args.opt_bool("resume") == Some(true) && m.status.get() != "postcopy-paused" {
        return Err(Error::generic(
            "Cannot resume if there is no paused migration",
        ));
    }
    if m.in_progress() {
        return Err(Error::generic("There's a migration process in progress"));
    }
    if sys.machine.status() == RunState::InMigrate {
        return Err(Error::generic("Guest is waiting for an incoming migration"));
    }
    // Its images belong to the destination now.
    if sys.machine.status() == RunState::PostMigrate {
        return Err(Error::generic(
            "Can't migrate the vm that was paused due to previous migration",
        ));
    }
    check_not_blocked(sys)?;
    *m.error.borrow_mut() = None;
    m.total_ms.set(None);
    m.started.set(Some(Instant::now()));
    m.postcopy.set(false);
    set_status(sys, "setup");
    let sink = match open_sink(ch) {
        Ok(sink) => sink,
        Err(why) => {
            failed(sys, why.clone(), false);
            return Err(Error::generic(why));
        }
    };
    let sys = sys.clone();
    tokio::task::spawn_local(async move {
        if let Err(why) = run_outgoing(&sys, sink).await {
            ferrite_block::report::error_report(&why);
            failed(&sys, why, false);
        }
        let m = &sys.migration;
        m.total_ms
            .set(m.started.get().map(|t| t.elapsed().as_millis() as u64));
    });
    Ok(())
}

/// How a migration out ended, short of completing.
enum Abort {
    /// `migrate_cancel`.
    Cancelled,
    /// An error, with the text query-migrate reports.
    Failed(String),
    /// An error once the destination runs (postcopy): the machine and its images are
    /// the destination's now; the source waits, stopped (QEMU's `postcopy-paused`).
    Paused(String),
}

fn cancelled(sys: &System) -> bool {
    sys.migration.status.get() == "cancelling"
}

/// Waits for `fut`, or for the migration to be cancelled first.
async fn unless_cancelled<T>(sys: &System, fut: impl Future<Output = T>) -> Result<T, Abort> {
    let m = &sys.migration;
    tokio::pin!(fut);
    loop {
        if cancelled(sys) {
            return Err(Abort::Cancelled);
        }
        let woken = m.go_on.notified();
        tokio::select! {
            v = &mut fut => return if cancelled(sys) { Err(Abort::Cancelled) } else { Ok(v) },
            () = woken => {}
        }
    }
}

async fn run_outgoing(sys: &Rc<System>, sink: Sink) -> Result<(), String> {
    tokio::task::yield_now().await;
    let ch = match unless_cancelled(sys, sink.connect()).await {
        Ok(ch) => ch?,
        Err(_) => {
            set_status(sys, "cancelled");
            return Ok(());
        }
    };
    set_status(sys, "active");
    // The bitmaps that go with the machine are chosen before it stops, and nobody may
    // change them while they go.
    let bitmaps = if sys.migration.has("dirty-bitmaps") {
        let mapping = sys.migration.mapping();
        crate::bitmap_migration::select(&sys.daemon.graph, mapping.as_ref())?
    } else {
        Vec::new()
    };
    crate::bitmap_migration::set_migrating(&bitmaps, true);
    let graph = &sys.daemon.graph;
    // QEMU's convergence: what is left must go within the downtime limit, else the
    // migration goes on until it may switch to postcopy (the bitmaps can go after the
    // destination runs).
    let m = &sys.migration;
    // What may be left to send once the machine stops: what goes within `downtime-limit`
    // at the allowed bandwidth.
    let downtime_ms = m.params.borrow().uint("downtime-limit");
    let threshold = m.bandwidth().saturating_mul(downtime_ms) / 1000;
    let postcopy = crate::bitmap_migration::pending_bytes(&bitmaps) > threshold;
    let waited = if postcopy {
        unless_cancelled(sys, async {
            while !m.postcopy.get() {
                m.go_on.notified().await;
            }
        })
        .await
    } else {
        Ok(())
    };
    // The run state to go back to: the one the switch-over stopped (a migration cancelled
    // before it leaves the machine as it is).
    let mut was = None;
    let outcome = match waited {
        Ok(()) => {
            let before = sys.machine.stop_for(RunState::FinishMigrate);
            was = Some(before);
            // Before any pause for migrate-continue: meanwhile the images' owners may
            // give them up (an NBD server's node going inactive refuses flushes).
            sys.settle_images().await;
            switch_over(sys, ch, before, &bitmaps, postcopy).await
        }
        Err(e) => Err(e),
    };
    let was = was.unwrap_or_else(|| sys.machine.status());
    crate::bitmap_migration::set_migrating(&bitmaps, false);
    if matches!(outcome, Err(Abort::Failed(_) | Abort::Cancelled)) {
        crate::bitmap_migration::stay(&bitmaps);
    }
    match outcome {
        Ok(()) => {
            sys.machine.resume(RunState::PostMigrate);
            set_status(sys, "completed");
            Ok(())
        }
        // QEMU: the images come back and the machine runs again as it did, announced
        // after the failure, before the cancellation ends.
        Err(Abort::Failed(why)) => {
            let _ = graph.activate_all().await;
            failed(sys, why, false);
            sys.machine.resume(was);
            Ok(())
        }
        Err(Abort::Paused(why)) => {
            ferrite_block::report::error_report(&why);
            *sys.migration.error.borrow_mut() = Some(why);
            set_status(sys, "postcopy-paused");
            Ok(())
        }
        Err(Abort::Cancelled) => {
            let _ = graph.activate_all().await;
            sys.machine.resume(was);
            // What QEMU reports once the channel it was writing is shut.
            *sys.migration.error.borrow_mut() = Some("Channel error: Input/output error".into());
            set_status(sys, "cancelled");
            Ok(())
        }
    }
}

/// The stopped machine's switch-over: a pause for `migrate-continue` where asked, then its
/// images given up and its state sent.
async fn switch_over(
    sys: &Rc<System>,
    mut ch: Connected,
    was: RunState,
    bitmaps: &[crate::bitmap_migration::Outgoing],
    postcopy: bool,
) -> Result<(), Abort> {
    let m = &sys.migration;
    if m.has("pause-before-switchover") {
        set_status(sys, "pre-switchover");
        unless_cancelled(sys, async {
            while m.status.get() == "pre-switchover" {
                m.go_on.notified().await;
            }
        })
        .await?;
    }
    set_status(
        sys,
        if postcopy {
            "postcopy-active"
        } else {
            "device"
        },
    );
    // The destination takes up the run state the machine had (QEMU's global state). In
    // postcopy, it runs once it has the first part; the bitmaps' bits follow.
    let state = crate::vmstate::save_first(
        sys.machine.kind.canonical_name(),
        was.as_str(),
        &sys.devices,
        bitmaps,
        postcopy,
    );
    // The images go to the destination: everything written back and given up. One still
    // written (a job's target) keeps them all here.
    let graph = &sys.daemon.graph;
    drop(graph.drain_all().await);
    if let Err(e) = graph.inactivate_all().await {
        ferrite_block::report::error_report(&format!(
            "Could not give the images up to the destination: {}",
            ferrite_qapi::Error::from(e).desc
        ));
        let why = "Error in migration completion: Bad address";
        ferrite_block::report::error_report(why);
        return Err(Abort::Failed(why.to_owned()));
    }
    let send_failed = |e: io::Error| {
        Abort::Failed(format!(
            "Unable to write to socket: {}",
            ferrite_qapi::os_msg(&e)
        ))
    };
    unless_cancelled(sys, ch.write(&state, m.bandwidth()))
        .await?
        .map_err(send_failed)?;
    // The bitmaps' bits are gathered once the destination has what it runs with.
    let rest = unless_cancelled(sys, async {
        let rest = crate::vmstate::save_end(&sys.devices, bitmaps, postcopy);
        ch.write(&rest, m.bandwidth()).await?;
        ch.close().await
    })
    .await?;
    match rest {
        Err(e) if postcopy => match send_failed(e) {
            Abort::Failed(why) => Err(Abort::Paused(why)),
            other => Err(other),
        },
        r => r.map_err(send_failed),
    }
}

/// `migrate-start-postcopy`. ferrite's machine has no RAM: everything goes at the
/// switch-over, so nothing is left for a postcopy phase and the migration completes as
/// a precopy one does (QEMU does the same when nothing is pending by then).
///
/// # Errors
/// QEMU's texts when neither `postcopy-ram` nor `dirty-bitmaps` is on, or no migration
/// was started.
pub(crate) fn start_postcopy(sys: &System) -> Result<(), Error> {
    let m = &sys.migration;
    if !m.has("postcopy-ram") && !m.has("dirty-bitmaps") {
        return Err(Error::generic(
            "Enable postcopy with migrate_set_capability before the start of migration",
        ));
    }
    if m.status.get().is_empty() {
        return Err(Error::generic(
            "Postcopy must be started after migration has been started",
        ));
    }
    m.postcopy.set(true);
    m.go_on.notify_waiters();
    Ok(())
}

/// Whether a migration out is under way (HMP `migrate` waits on it).
pub(crate) fn in_progress(sys: &System) -> bool {
    sys.migration.in_progress()
}

/// Why the last migration out failed, if it did.
pub(crate) fn failure(sys: &System) -> Option<String> {
    let m = &sys.migration;
    (m.status.get() == "failed")
        .then(|| m.error.borrow().clone())
        .flatten()
}

/// HMP `info migrate`.
pub(crate) fn info(sys: &System) -> String {
    let q = query(sys);
    let Some(d) = q.as_dict() else {
        return String::new();
    };
    let Some(status) = d.get("status").and_then(QObject::as_str) else {
        return String::new();
    };
    let mut s = format!("Migration status: {status}");
    match d.get("error-desc").and_then(QObject::as_str) {
        Some(e) if status == "failed" => s += &format!(" ({e})\r\n"),
        _ => s += "\r\n",
    }
    let total = d.get("total-time").and_then(QObject::as_u64).unwrap_or(0);
    s += &format!("total time: {total} ms\r\n");
    s
}

/// `migrate_cancel`: a migration out under way stops; its machine runs again as it did.
pub(crate) fn cancel(sys: &System) {
    let m = &sys.migration;
    if m.in_progress() && !cancelled(sys) {
        set_status(sys, "cancelling");
        m.go_on.notify_waiters();
    }
}

/// `migrate-continue`: a migration out paused in `state` goes on.
///
/// # Errors
/// The migration is not in `state`.
pub(crate) fn continue_from(sys: &System, state: &str) -> Result<(), Error> {
    let m = &sys.migration;
    let now = match m.status.get() {
        "" => "none",
        s => s,
    };
    if now != state {
        return Err(Error::generic(format!(
            "Migration not in expected state: {now}"
        )));
    }
    if now == "pre-switchover" {
        m.status.set("device");
        m.go_on.notify_waiters();
    }
    Ok(())
}

/// `-incoming URI` at start-up, and `migrate-incoming`: waits for the state at `uri`.
///
/// # Errors
/// No `-incoming` given, one already started, an unknown channel, a channel that cannot
/// listen.
pub(crate) fn incoming(sys: &Rc<System>, uri: Option<&str>) -> Result<(), Error> {
    let m = &sys.migration;
    if !m.incoming_status.get().is_empty() {
        return Err(Error::generic(
            "The incoming migration has already been started",
        ));
    }
    if sys.machine.status() != RunState::InMigrate {
        return Err(Error::generic(
            "'-incoming' was not specified on the command line",
        ));
    }
    let source = listen(channel(uri)?).map_err(|e| {
        Error::generic(format!(
            "Failed to listen for the incoming migration: {}",
            ferrite_qapi::os_msg(&e)
        ))
    })?;
    set_incoming_status(sys, "setup");
    let sys = sys.clone();
    tokio::task::spawn_local(async move {
        if let Err(why) = run_incoming(&sys, source).await {
            failed(&sys, why.clone(), true);
            // QEMU's destination gives up and exits (its monitors told first).
            ferrite_block::report::error_report(&format!("load of migration failed: {why}"));
            sys.migration.exit_failure.set(true);
            sys.daemon.request_quit();
        }
    });
    Ok(())
}

async fn run_incoming(sys: &Rc<System>, source: Source) -> Result<(), String> {
    let os = |e: io::Error| ferrite_qapi::os_msg(&e);
    let mut input = Input::open(source).await.map_err(os)?;
    // The stream is read as it comes: a postcopy one's first part is loaded (and the
    // machine runs) before the rest arrives. Loading is tried again each time the data has
    // doubled, and at its end.
    let mut buf = Vec::new();
    let mut tried = 0;
    let machine = sys.machine.kind.canonical_name();
    let loaded = loop {
        let n = input.more(&mut buf).await.map_err(os)?;
        if !buf.is_empty() && sys.migration.incoming_status.get() != "active" {
            set_incoming_status(sys, "active");
        }
        if n != 0 && buf.len() < tried * 2 {
            continue;
        }
        tried = buf.len();
        match crate::vmstate::load(&buf, machine, &sys.devices) {
            Ok(loaded) => break loaded,
            Err(e) if e.short && n != 0 => {}
            Err(e) => return Err(e.report),
        }
    };
    loaded.restore(&sys.devices);
    let graph = &sys.daemon.graph;
    let mapping = sys.migration.mapping();
    let Some((rest_at, section)) = loaded.postcopy else {
        input.finish(&mut buf).await.map_err(os)?;
        // Bitmaps that came along are made before the images are taken over (their stored
        // copies of the same names are then left alone).
        crate::bitmap_migration::apply(graph, loaded.bitmaps.bitmaps, mapping.as_ref())?;
        take_over(sys, loaded.runstate.as_deref()).await;
        set_incoming_status(sys, "completed");
        return Ok(());
    };
    // Postcopy: the bitmaps are made now, in use and empty (those that record take the
    // writes from now on); the machine runs; their bits follow.
    let mut loader = loaded.bitmaps;
    let placed = crate::bitmap_migration::place(graph, &loader.bitmaps, mapping.as_ref())?;
    set_incoming_status(sys, "postcopy-active");
    take_over(sys, loaded.runstate.as_deref()).await;
    // After the images are taken over, which makes their bitmaps storable again.
    crate::bitmap_migration::set_arriving(&placed, true);
    let mut rest = buf.split_off(rest_at.min(buf.len()));
    let read = input.finish(&mut rest).await;
    // A source that went away first leaves its bitmaps incomplete: they are dropped.
    if let Err(e) = read
        .map_err(os)
        .and_then(|()| crate::vmstate::load_rest(&rest, section, &mut loader).map_err(|e| e.report))
    {
        ferrite_block::report::error_report(&format!("dirty bitmaps migration failed: {e}"));
    }
    crate::bitmap_migration::finish(&placed, &loader.bitmaps);
    set_incoming_status(sys, "completed");
    Ok(())
}

/// The destination takes the machine over: its images, and the run state the source had.
async fn take_over(sys: &Rc<System>, runstate: Option<&str>) {
    sys.daemon.graph.set_open_inactive(false);
    // QEMU 10: a machine that ran at the source runs here if it is to start, its images
    // taken over first; else it waits paused, and one that did not run takes the source's
    // run state. Images not taken over here wait for `cont`.
    let was_running = runstate.is_none_or(|s| s == "running");
    if was_running && sys.machine.autostart() {
        // An image that cannot be taken over is reported; the machine waits paused.
        match sys.daemon.graph.activate_all().await {
            Ok(()) => sys.machine.incoming_done(RunState::Running),
            Err(e) => {
                ferrite_block::report::error_report(&e.to_string());
                sys.machine.incoming_done(RunState::Paused);
            }
        }
    } else if was_running {
        sys.machine.incoming_done(RunState::Paused);
    } else {
        let state = runstate
            .and_then(RunState::parse)
            .unwrap_or(RunState::Paused);
        sys.machine.incoming_done(state);
    }
    sys.devices.migration_done();
}
