//! `ferrite-system-x86_64`: qemu-system's command line and monitor over ferrite's block
//! layer, so that test harnesses written for `qemu-system-x86_64 -accel qtest` (QEMU's own
//! iotests first) run against ferrite.
//!
//! There is no guest CPU: the machine (`machine`) is a board of device stand-ins
//! (`devices`), each holding a `BlockBackend`, with a run state the monitor changes. The
//! options (`cli`) the storage daemon also has are handed to its wiring in order; `-drive`
//! (`drive`) and `-device` follow, then the monitors, the qtest channel (`qtest`) and the
//! main loop. The monitors answer the machine's commands (`commands`, `hmp`) and every
//! command of the storage daemon.

mod bitmap_migration;
mod cli;
mod commands;
mod defaults;
mod devices;
mod drive;
mod fds;
mod help;
mod hmp;
mod io_limits;
mod iscsi_group;
mod machine;
mod migration;
mod migration_parameters;
mod qemu_io;
mod qtest;
mod savevm;
mod vmstate;

use cli::SysOption;
use commands::SystemCommands;
use devices::Devices;
use ferrite_block::BlockBackend;
use ferrite_block::clock::VirtualClock;
use ferrite_storage_daemon::front_end::{
    CliOption, Daemon, DaemonizeHandle, OnTermination, OptionError, keyval,
};
use machine::Machine;
use std::cell::RefCell;
use std::process::ExitCode;
use std::rc::Rc;

/// Everything the main loop owns: the storage daemon's state and the machine's.
pub(crate) struct System {
    pub(crate) daemon: Rc<Daemon>,
    pub(crate) machine: Rc<Machine>,
    pub(crate) devices: Rc<Devices>,
    /// The drives `-drive` made (the graph keeps backends only weakly).
    pub(crate) drives: RefCell<Vec<Rc<BlockBackend>>>,
    pub(crate) clock: Rc<VirtualClock>,
    /// The qtest channel's log, closed at exit.
    pub(crate) qtest_log: RefCell<Option<Rc<qtest::QtestLog>>>,
    /// Where a migration to or from this machine stands.
    pub(crate) migration: migration::MigrationState,
}

impl System {
    /// What a stopping machine does to its images (QEMU's `vm_stop`, also when the machine
    /// was stopped already): every node drained once and what was written flushed, so that
    /// whatever comes next (a migration's switch-over, a quit) finds it on the images.
    pub(crate) async fn settle_images(&self) {
        drop(self.daemon.graph.drain_all().await);
        self.daemon.graph.flush_all().await;
    }
}

/// A start-up failure, printed after the program name.
struct Failure(String);

fn failed(opt: &SysOption, e: impl std::fmt::Display) -> Failure {
    Failure(format!("{}: {e}", opt.describe()))
}

/// An old-style character device spec (`-qmp unix:/path,server,nowait`, `stdio`,
/// `tcp:host:port`) as `-chardev` options with `id`; `Err` names a backend there is not.
fn legacy_chardev(spec: &str, id: &str) -> Result<Option<String>, String> {
    if spec == "none" {
        return Ok(None);
    }
    let (head, opts) = spec.split_once(',').unwrap_or((spec, ""));
    let flags: Vec<String> = opts
        .split(',')
        .filter(|o| !o.is_empty())
        .map(|o| match o {
            "server" => "server=on".to_owned(),
            "nowait" => "wait=off".to_owned(),
            "wait" => "wait=on".to_owned(),
            other => other.to_owned(),
        })
        .collect();
    let rest = if flags.is_empty() {
        String::new()
    } else {
        format!(",{}", flags.join(","))
    };
    let text = if head == "stdio" || head == "null" {
        format!("{head},id={id}{rest}")
    } else if let Some(path) = head.strip_prefix("file:") {
        format!("file,id={id},path={path}{rest}")
    } else if let Some(path) = head.strip_prefix("pipe:") {
        format!("pipe,id={id},path={path}{rest}")
    } else if let Some(path) = head.strip_prefix("unix:") {
        format!("socket,id={id},path={path}{rest}")
    } else if let Some(addr) = head.strip_prefix("tcp:") {
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| head.to_owned())?;
        format!("socket,id={id},host={host},port={port}{rest}")
    } else {
        return Err(head.to_owned());
    };
    Ok(Some(text))
}

/// QEMU's two lines for a spec naming no backend.
fn bad_spec(o: &SysOption, backend: &str, prog: &str) -> Failure {
    let d = o.describe();
    Failure(format!(
        "{d}: '{backend}' is not a valid char driver\n{prog}: {d}: parse error: {}",
        o.text()
    ))
}

/// The machine type the options ask for, and a check of their accelerators as QEMU tries
/// them: in order, the first that works is used and those after it are never looked at.
/// Tells blkdebug whether that is qtest, and says so: qtest runs the virtual clock.
fn machine_type(options: &[SysOption]) -> Result<(&'static machine::MachineType, bool), Failure> {
    let mut kind = "pc".to_owned();
    let mut accels: Vec<(&SysOption, String)> = Vec::new();
    for o in options {
        let (implied, key) = match o.name {
            "machine" => ("type", "accel"),
            "accel" => ("accel", "accel"),
            _ => continue,
        };
        let parsed = keyval::parse(o.text(), Some(implied)).map_err(|e| failed(o, e.cli_text()))?;
        if o.name == "machine"
            && let Some(t) = parsed.value.get("type").and_then(|v| v.as_str())
        {
            kind = t.to_owned();
        }
        if let Some(a) = parsed.value.get(key).and_then(|v| v.as_str()) {
            accels.extend(a.split(':').map(|a| (o, a.to_owned())));
        }
    }
    if let Some((o, a)) = accels.first()
        && !matches!(a.as_str(), "qtest" | "kvm" | "tcg")
    {
        return Err(failed(o, format!("invalid accelerator {a}")));
    }
    let qtest = accels.first().is_some_and(|(_, a)| a == "qtest");
    ferrite_drivers::set_qtest(qtest);
    Ok((machine::machine_type(&kind).map_err(Failure)?, qtest))
}

/// What the legacy disk options mean as `-drive`.
fn legacy_drive(o: &SysOption) -> Option<String> {
    let file = o.text().replace(',', ",,");
    Some(match o.name {
        "hda" => format!("file={file},index=0,media=disk"),
        "hdb" => format!("file={file},index=1,media=disk"),
        "hdc" => format!("file={file},index=2,media=disk"),
        "hdd" => format!("file={file},index=3,media=disk"),
        "cdrom" => format!("file={file},index=2,media=cdrom"),
        "fda" => format!("if=floppy,file={file},index=0"),
        "fdb" => format!("if=floppy,file={file},index=1"),
        "drive" => o.text().to_owned(),
        _ => return None,
    })
}

/// Runs one option the storage daemon also has through its wiring, with qemu-system's
/// spelling of the option in a failure.
async fn daemon_option(
    daemon: &Rc<Daemon>,
    o: &SysOption,
    opt: CliOption,
    prog: &str,
) -> Result<(), Failure> {
    let starting =
        ferrite_storage_daemon::front_end::start(daemon, std::slice::from_ref(&opt), prog);
    match ferrite_block::report::at_option(o.describe(), starting).await {
        Ok(_) => Ok(()),
        Err(OptionError(msg)) => {
            let tail = msg
                .strip_prefix(&opt.describe())
                .and_then(|t| t.strip_prefix(": "))
                .unwrap_or(&msg);
            Err(failed(o, tail))
        }
    }
}

/// Acts on the options: backends, drives, devices, then monitors and qtest.
/// A `throttle-group` made by `-object` keeps the host's clock under qtest: QEMU makes
/// command-line objects before the accelerator, and a group picks its clock as it is made
/// (iotest stream-error-on-reset relies on it).
fn keep_host_clock(daemon: &Daemon, text: &str) {
    let Ok(parsed) = keyval::parse(text, Some("qom-type")) else {
        return;
    };
    if parsed.value.get("qom-type").and_then(|t| t.as_str()) != Some("throttle-group") {
        return;
    }
    let Some(id) = parsed.value.get("id").and_then(|i| i.as_str()) else {
        return;
    };
    if let Some(obj) = daemon.objects.get(id)
        && let Some(g) = obj.as_any().downcast_ref::<ferrite_qom::ThrottleGroup>()
    {
        g.set_host_clock();
    }
}

async fn start(sys: &Rc<System>, options: &[SysOption], prog: &str) -> Result<bool, Failure> {
    let daemon = &sys.daemon;
    let mut monitors: Vec<(&SysOption, CliOption)> = Vec::new();
    let mut human_monitors: Vec<(&SysOption, String)> = Vec::new();
    let mut qtest: Option<(&SysOption, String)> = None;
    let mut qtest_log: Option<&str> = None;
    let (mut paused, mut incoming, mut snapshot) = (false, false, false);
    let loadvm = options.iter().rev().find(|o| o.name == "loadvm");
    if loadvm.is_some() {
        let given = |name: &str| options.iter().any(|o| o.name == name);
        if given("incoming") {
            return Err(Failure(
                "'incoming' and 'loadvm' options are mutually exclusive".into(),
            ));
        }
        if given("preconfig") {
            return Err(Failure(
                "'preconfig' and 'loadvm' options are mutually exclusive".into(),
            ));
        }
    }
    let mut compat = 0;
    // A machine waiting for an incoming migration opens its images inactive: they are
    // the source's until the migration is over.
    if options.iter().any(|o| o.name == "incoming") {
        daemon.graph.set_open_inactive(true);
    }
    // qemu-system keeps -object options by id as it parses them, before making any.
    let mut object_ids = std::collections::HashSet::new();
    for o in options.iter().filter(|o| o.name == "object") {
        if let Some(args) = ferrite_storage_daemon::front_end::object_options(o.text())
            && let Ok(id) = args.str("id")
            && !object_ids.insert(id.to_owned())
        {
            return Err(failed(o, format!("Duplicate ID '{id}' for object")));
        }
    }
    // Descriptor sets first: any file name may refer to one.
    for o in options.iter().filter(|o| o.name == "add-fd") {
        fds::add_from_command_line(o.text()).map_err(|e| failed(o, e))?;
    }
    // The backends, in order.
    for o in options {
        let v = o.text();
        match o.name {
            "chardev" => daemon_option(daemon, o, CliOption::Chardev(v.into()), prog).await?,
            "object" => {
                match ferrite_storage_daemon::front_end::object_options(v) {
                    // qemu-system reports what making the object finds without the option
                    // (only parsing errors name it).
                    Some(args) => daemon
                        .objects
                        .add(&args)
                        .map_err(|e| Failure(ferrite_qapi::Error::from(e).cli_text()))?,
                    None => daemon_option(daemon, o, CliOption::Object(v.into()), prog).await?,
                }
                keep_host_clock(daemon, v);
            }
            "blockdev" => daemon_option(daemon, o, CliOption::Blockdev(v.into()), prog).await?,
            "mon" => {
                // qemu-system's monitors are human ones unless they say `mode=control`.
                let parsed =
                    keyval::parse(v, Some("chardev")).map_err(|e| failed(o, e.cli_text()))?;
                match parsed.value.get("mode").and_then(|m| m.as_str()) {
                    Some("control") => monitors.push((o, CliOption::Monitor(v.into()))),
                    None | Some("readline") => {
                        let id = parsed.value.get("chardev").and_then(|c| c.as_str());
                        let id = id.ok_or_else(|| failed(o, "Parameter 'chardev' is missing"))?;
                        human_monitors.push((o, id.to_owned()));
                    }
                    Some(m) => return Err(failed(o, format!("unknown monitor mode \"{m}\""))),
                }
            }
            "qmp" | "qmp-pretty" => {
                let id = format!("compat_monitor{compat}");
                compat += 1;
                if let Some(text) = legacy_chardev(v, &id).map_err(|b| bad_spec(o, &b, prog))? {
                    daemon_option(daemon, o, CliOption::Chardev(text), prog).await?;
                    let pretty = if o.name == "qmp-pretty" {
                        ",pretty=on"
                    } else {
                        ""
                    };
                    monitors.push((
                        o,
                        CliOption::Monitor(format!("chardev={id},mode=control{pretty}")),
                    ));
                }
            }
            "monitor" => {
                let id = format!("compat_monitor{compat}");
                compat += 1;
                if let Some(text) = legacy_chardev(v, &id).map_err(|b| bad_spec(o, &b, prog))? {
                    daemon_option(daemon, o, CliOption::Chardev(text), prog).await?;
                    human_monitors.push((o, id));
                }
            }
            "qtest-log" => qtest_log = Some(v),
            "qtest" => {
                let id = match v.strip_prefix("chardev:") {
                    Some(id) => id.to_owned(),
                    None => {
                        if let Some(text) =
                            legacy_chardev(v, "qtest").map_err(|b| bad_spec(o, &b, prog))?
                        {
                            daemon_option(daemon, o, CliOption::Chardev(text), prog).await?;
                        }
                        "qtest".to_owned()
                    }
                };
                qtest = Some((o, id));
            }
            "S" => paused = true,
            "incoming" => incoming = true,
            "snapshot" => snapshot = true,
            _ => {}
        }
    }
    for o in options.iter().filter(|o| o.name == "global") {
        let (driver, property, value) =
            defaults::parse_global(o.text()).map_err(|e| failed(o, e))?;
        sys.devices.add_global(&driver, &property, &value);
    }
    // Drives after every -blockdev, as QEMU configures them, then the default ones where
    // the command line put none.
    let board = sys.machine.kind.board;
    let wanted = defaults::Defaults::of(options, board);
    let mut counter = drive::DriveCounter::default();
    let mut default_options = Vec::new();
    let mut drive_devices = Vec::new();
    let mut orphans = Vec::new();
    let mut made = Vec::new();
    for o in options {
        if let Some(text) = legacy_drive(o) {
            if text.contains("format=help") {
                print!("{}", daemon.graph.registry().format_help());
                return Ok(false);
            }
            made.push((o, add_drive(sys, &mut counter, o, &text, snapshot).await?));
        }
    }
    for (on, interface, index, text) in [
        (wanted.cdrom, "ide", 2, defaults::CDROM),
        (wanted.floppy, "floppy", 0, defaults::FLOPPY),
    ] {
        if on && !counter.taken(interface, index) {
            default_options.push(SysOption {
                name: "drive",
                value: Some(text.to_owned()),
            });
        }
    }
    for o in &default_options {
        made.push((
            o,
            add_drive(sys, &mut counter, o, o.text(), snapshot).await?,
        ));
    }
    for (o, d) in made {
        sys.drives.borrow_mut().push(d.blk);
        drive_devices.extend(d.device.map(|dev| (o, dev)));
        orphans.extend(d.orphan.map(|why| (o, why)));
    }
    if counter.any("floppy") {
        sys.devices.add_floppy_controller();
    }
    sys.devices
        .parallel
        .set(board != machine::Board::None && defaults::has_parallel(options, wanted));
    // An incoming migration's destination does not own its images yet: they start
    // inactive (written by nobody until the migration, or an export, activates them).
    if incoming {
        daemon
            .graph
            .inactivate_all()
            .await
            .map_err(|e| Failure(ferrite_qapi::Error::from(e).desc))?;
        sys.devices.set_incoming(true);
    }
    // The monitors greet before the devices are made: a device's error comes after the
    // human monitor's banner, as in QEMU.
    for (o, opt) in monitors {
        daemon_option(daemon, o, opt, prog).await?;
    }
    for (o, id) in human_monitors {
        let dev = daemon
            .chardevs
            .get(&id)
            .ok_or_else(|| failed(o, format!("chardev \"{id}\" not found")))?;
        let fe = dev
            .attach_frontend()
            .map_err(|e| failed(o, e.to_string()))?;
        hmp::readline::serve(fe, Rc::new(SystemCommands(sys.clone()))).await;
    }
    if let Some((o, why)) = orphans.first() {
        return Err(failed(o, why));
    }
    // The board's devices, then -device, then the drives' own -device (if=virtio).
    let (board, own): (Vec<_>, Vec<_>) = drive_devices
        .iter()
        .partition(|(_, d)| d.made_by != drive::MadeBy::Device);
    sys.devices
        .add_board_devices(board.into_iter().map(|(_, d)| d).collect())
        .map_err(|e| Failure(e.cli_text()))?;
    for o in options.iter().filter(|o| o.name == "device") {
        let parsed =
            keyval::parse(o.text(), Some("driver")).map_err(|e| failed(o, e.cli_text()))?;
        if let Err(e) = sys.devices.add(&parsed.value) {
            let text = e.cli_text();
            if matches!(
                text.as_str(),
                "Cannot change iothread of active block backend" | "HBA does not support iothreads"
            ) {
                // QEMU polls its main loop while it moves nodes between iothreads: the
                // human monitor's prompt is out before the error.
                sys.machine.let_monitors_prompt();
                let shown = sys.machine.prompt_shown();
                let _ = tokio::time::timeout(std::time::Duration::from_millis(200), shown).await;
            }
            return Err(failed(o, text));
        }
    }
    for (o, d) in own {
        sys.devices
            .add(&d.props)
            .map_err(|e| failed(o, e.cli_text()))?;
    }
    if let Some((o, id)) = qtest {
        let dev = daemon
            .chardevs
            .get(&id)
            .ok_or_else(|| failed(o, format!("chardev '{id}' not found")))?;
        let fe = dev
            .attach_frontend()
            .map_err(|e| failed(o, e.to_string()))?;
        let log = Rc::new(
            qtest::QtestLog::open(qtest_log).map_err(|e| failed(o, format!("qtest log: {e}")))?,
        );
        *sys.qtest_log.borrow_mut() = Some(log.clone());
        qtest::serve(fe, sys.clock.clone(), log);
    }
    if let Some(o) = loadvm {
        load_at_start(sys, o.text(), prog).await?;
    }
    sys.machine.start(paused, incoming);
    // `-incoming URI` waits for the state there at once (`defer`: for migrate-incoming).
    if let Some(o) = options.iter().rev().find(|o| o.name == "incoming")
        && o.text() != "defer"
    {
        migration::incoming(sys, Some(o.text())).map_err(|e| failed(o, e.desc))?;
    }
    Ok(true)
}

/// One `-drive` (or legacy disk option) `o`, whose `-drive` text is `text`.
async fn add_drive(
    sys: &Rc<System>,
    counter: &mut drive::DriveCounter,
    o: &SysOption,
    text: &str,
    snapshot: bool,
) -> Result<drive::Drive, Failure> {
    // What the drive's nodes report while they open names the option, as in QEMU.
    let adding = drive::add(&sys.daemon.graph, &sys.devices, counter, text, snapshot);
    ferrite_block::report::at_option(o.describe(), adding)
        .await
        .map_err(|e| failed(o, e.cli_text()))
}

/// `-loadvm NAME`: the machine starts from snapshot `name`. A failure ends the program
/// once the human monitors have shown their prompt (QEMU loads it with its main loop
/// running), with what was wrong with the VM state first.
async fn load_at_start(sys: &Rc<System>, name: &str, prog: &str) -> Result<(), Failure> {
    let Err(f) = savevm::load(sys, name, None, None).await else {
        return Ok(());
    };
    sys.machine.let_monitors_prompt();
    let shown = sys.machine.prompt_shown();
    let _ = tokio::time::timeout(std::time::Duration::from_millis(200), shown).await;
    if let Some(report) = f.report {
        eprintln!("{prog}: {report}");
    }
    Err(Failure(f.error.desc))
}

/// The program: parses `std::env::args`, runs the machine, and says how it ended.
pub fn main() -> ExitCode {
    ferrite_storage_daemon::front_end::tune_allocator();
    ferrite_qapi::use_system_schema();
    let argv: Vec<String> = std::env::args().collect();
    let prog = ferrite_block::report::program();
    let mut options = match cli::parse_args(argv.get(1..).unwrap_or(&[])) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err((o, e)) = cli::apply_sets(&mut options) {
        eprintln!("{prog}: {}", failed(&o, e).0);
        return ExitCode::FAILURE;
    }
    // Help options act when reached, before anything else runs.
    for o in &options {
        let text = o.text();
        let help = text == "help" || text == "?";
        match o.name {
            "h" | "help" => {
                print!("{}", help::help_text(&prog));
                return ExitCode::SUCCESS;
            }
            "version" => {
                print!("{}", help::version_text());
                return ExitCode::SUCCESS;
            }
            "machine" if help || text.starts_with("help,") => {
                print!("{}", help::machine_help());
                return ExitCode::SUCCESS;
            }
            "device" if help => {
                print!("{}", help::device_help());
                return ExitCode::SUCCESS;
            }
            _ => {}
        }
    }
    // What qemu-system checks as it reads these options, in order.
    let (mut uuid, mut iscsi_groups) = (None, Vec::new());
    for o in &options {
        let read = match o.name {
            "uuid" => machine::parse_uuid(o.text()).map(|u| uuid = Some(u)),
            "iscsi" => {
                let mut warnings = Vec::new();
                let group = iscsi_group::parse(o.text(), &iscsi_groups, &mut warnings);
                for w in warnings {
                    eprintln!("{prog}: {}: warning: {w}", o.describe());
                }
                group.map(|g| iscsi_groups.push(g))
            }
            _ => Ok(()),
        };
        if let Err(e) = read {
            eprintln!("{prog}: {}", failed(o, e).0);
            return ExitCode::FAILURE;
        }
    }
    ferrite_block::emulator::set_iscsi_groups(iscsi_groups);
    let (kind, qtest) = match machine_type(&options) {
        Ok(k) => k,
        Err(Failure(e)) => {
            eprintln!("{prog}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let name = options.iter().rev().find(|o| o.name == "name").map(|o| {
        let t = o.text();
        t.strip_prefix("guest=")
            .unwrap_or(t)
            .split(',')
            .next()
            .unwrap_or("")
            .to_owned()
    });
    ferrite_storage_daemon::front_end::main_loop(&prog.clone(), async move {
        let daemon = Daemon::new();
        daemon.graph.registry().set_for_emulator();
        ferrite_drivers::register_emulator_only(daemon.graph.registry());
        crate::fds::use_named_fds_for_sockets();
        let machine = Machine::new(kind, name, uuid, daemon.events.clone());
        let devices = Devices::new(
            machine.clone(),
            daemon.graph.clone(),
            daemon.events.clone(),
            daemon.jobs.clone(),
            {
                let daemon = daemon.clone();
                Box::new(move |path| daemon.qom_path_exists(path))
            },
        );
        let sys = Rc::new(System {
            daemon: daemon.clone(),
            machine,
            devices,
            drives: RefCell::new(Vec::new()),
            clock: Rc::new(VirtualClock::default()),
            qtest_log: RefCell::new(None),
            migration: migration::MigrationState::default(),
        });
        if qtest {
            // Under qtest, time is what the test makes it (throttled requests wait on it).
            ferrite_block::clock::use_virtual(sys.clock.clone());
        }
        daemon.set_commands(Rc::new(SystemCommands(sys.clone())));
        match start(&sys, &options, &prog).await {
            Ok(false) => ExitCode::SUCCESS,
            Ok(true) => {
                let killed = sys.clone();
                let on_termination: OnTermination = Box::new(move |t| {
                    Box::pin(async move {
                        // Said unless a qtest driver runs the machine (a test's signal).
                        if killed.qtest_log.borrow().is_none() {
                            ferrite_block::report::error_report(&t.report());
                        }
                        killed.machine.killed();
                        // The machine stops (QEMU's vm_shutdown) before the daemon's own
                        // shutdown, as after `quit`.
                        killed.settle_images().await;
                    })
                });
                let run = ferrite_storage_daemon::front_end::run(
                    daemon.clone(),
                    None,
                    DaemonizeHandle::none(),
                    Some(on_termination),
                );
                let _: () = run.await;
                if let Some(log) = sys.qtest_log.borrow().as_ref() {
                    log.closed();
                }
                if sys.migration.exit_failure.get() {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(Failure(msg)) => {
                eprintln!("{prog}: {msg}");
                daemon.shut_down().await;
                daemon.chardevs.close_all();
                ExitCode::FAILURE
            }
        }
    })
}
