//! Acting on the command line, in order, and running until told to stop.

use crate::cli::keyval;
use crate::cli::parse::CliOption;
use crate::daemon::Daemon;
use crate::process::{DaemonizeHandle, PidFile};
use crate::signals::Termination;
use ferrite_chardev::{ChardevOpts, Origin, backend_from_opts};
use ferrite_qapi::schema::TypeRef;
use ferrite_qapi::visit::{Mode, check_object, check_value};
use ferrite_qapi::{Args, Error, schema};
use ferrite_qmp::{Monitor, MonitorOptions};
use ferrite_qobject::QObject;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

/// What start-up ended with.
pub enum Startup {
    /// Running: serve until quit.
    Running(Option<PidFile>),
    /// A help text was asked for and printed.
    Exit,
    /// A help text that QEMU prints as a failure (`--chardev ...,help`) was printed.
    ExitFailure,
}

/// Start-up failed on an option: the message QEMU would print after the program name.
pub struct OptionError(pub String);

fn located(opt: &CliOption, e: impl Into<CliError>) -> OptionError {
    OptionError(format!("{}: {}", opt.describe(), e.into().0))
}

/// An error's text as the command line prints it (with any hint).
struct CliError(String);

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError(e.cli_text())
    }
}

/// The layers' errors, as the command line prints them.
macro_rules! cli_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError(Error::from(e).cli_text())
            }
        }
    )*};
}

cli_error_from!(
    ferrite_block::Error,
    ferrite_nbd::Error,
    ferrite_export::Error,
    ferrite_chardev::Error,
    ferrite_qom::Error
);

impl From<String> for CliError {
    fn from(s: String) -> Self {
        CliError(s)
    }
}

/// Checks a keyval or JSON option against a schema type.
fn checked(parsed: &keyval::Parsed, type_name: &str) -> Result<Args, Error> {
    let mode = if parsed.json {
        Mode::Strict
    } else {
        Mode::Keyval
    };
    check_object(
        schema(),
        type_name,
        &QObject::Dict(parsed.value.clone()),
        mode,
    )
    .map(Args::new)
}

/// An option parsed and checked against its QAPI type: what start-up acts on.
pub(crate) enum Checked {
    /// Acted on before start-up (help, version, traces, daemonize).
    Nothing,
    Chardev {
        id: String,
        backend: Args,
        wait: bool,
        mux: bool,
    },
    /// A help text, and whether QEMU exits with failure after it.
    Help {
        text: String,
        failed: bool,
    },
    Monitor(Args),
    /// `--object help` or `--object TYPE,help`.
    ObjectHelp(Option<String>),
    Object(Args),
    Blockdev(Args),
    NbdServer(Args),
    Export(Args),
    Pidfile(PathBuf),
}

/// Parses an option's text (keyval or JSON) and checks it against its QAPI type, acting on
/// nothing.
pub(crate) fn check(opt: &CliOption) -> Result<Checked, OptionError> {
    let keyval = |text: &str, implied: Option<&str>, ty: &str| {
        let parsed = keyval::parse(text, implied).map_err(|e| located(opt, e))?;
        checked(&parsed, ty).map_err(|e| located(opt, e))
    };
    Ok(match opt {
        CliOption::Help | CliOption::Version | CliOption::Trace(_) | CliOption::Daemonize => {
            Checked::Nothing
        }
        CliOption::Chardev(text) => match backend_from_opts(text).map_err(|e| located(opt, e))? {
            ChardevOpts::BackendHelp(text) => Checked::Help {
                text,
                failed: false,
            },
            ChardevOpts::OptionHelp(text) => Checked::Help { text, failed: true },
            ChardevOpts::Create(spec) => {
                let backend = check_value(
                    schema(),
                    &TypeRef::Named("ChardevBackend".into()),
                    &QObject::Dict(spec.backend),
                    Mode::Strict,
                )
                .map_err(|e| located(opt, e))?;
                Checked::Chardev {
                    id: spec.id,
                    backend: Args::new(backend.as_dict().cloned().unwrap_or_default()),
                    wait: spec.wait,
                    mux: spec.mux,
                }
            }
        },
        CliOption::Monitor(text) => {
            Checked::Monitor(keyval(text, Some("chardev"), "MonitorOptions")?)
        }
        CliOption::Object(text) => {
            let parsed = keyval::parse(text, Some("qom-type")).map_err(|e| located(opt, e))?;
            if parsed.help {
                let ty = parsed.value.get("qom-type").and_then(QObject::as_str);
                Checked::ObjectHelp(ty.map(str::to_owned))
            } else {
                Checked::Object(checked(&parsed, "ObjectOptions").map_err(|e| located(opt, e))?)
            }
        }
        CliOption::Blockdev(text) => {
            Checked::Blockdev(keyval(text, Some("driver"), "BlockdevOptions")?)
        }
        CliOption::NbdServer(text) => Checked::NbdServer(keyval(text, None, "NbdServerOptions")?),
        CliOption::Export(text) => {
            Checked::Export(keyval(text, Some("type"), "BlockExportOptions")?)
        }
        CliOption::Pidfile(path) => Checked::Pidfile(PathBuf::from(path)),
    })
}

/// The options of an `--object` as `object-add` takes them, for a front end that makes the
/// object itself; `None` where it is not one to make (help, or a text that does not parse
/// or whose id is not an identifier: [`start`] reports those).
pub fn object_options(text: &str) -> Option<Args> {
    match check(&CliOption::Object(text.to_owned())) {
        Ok(Checked::Object(args)) if args.str("id").is_ok_and(ferrite_qapi::id_wellformed) => {
            Some(args)
        }
        _ => None,
    }
}

/// Processes the options in order (QEMU's `process_options`), then writes the pid file.
pub async fn start(
    daemon: &Rc<Daemon>,
    options: &[CliOption],
    prog: &str,
) -> Result<Startup, OptionError> {
    let mut pidfile: Option<PathBuf> = None;
    for opt in options {
        if let CliOption::Chardev(text) = opt {
            for w in ferrite_chardev::deprecations(text) {
                eprintln!("{prog}: {}: warning: {w}", opt.describe());
            }
        }
        match check(opt)? {
            Checked::Nothing => {}
            Checked::Help { text, failed } => {
                print!("{text}");
                return Ok(if failed {
                    Startup::ExitFailure
                } else {
                    Startup::Exit
                });
            }
            Checked::Chardev {
                id,
                backend,
                wait,
                mux,
            } => {
                let dev = if mux {
                    daemon
                        .chardevs
                        .add_muxed(&id, &backend, Origin::CommandLine)
                } else {
                    daemon.chardevs.add(&id, &backend, Origin::CommandLine)
                }
                .map_err(|e| located(opt, e))?;
                if wait {
                    eprintln!(
                        "{prog}: {}: info: waiting for connection on: {}",
                        opt.describe(),
                        dev.filename()
                    );
                    dev.wait_for_client().await;
                }
            }
            Checked::Monitor(args) => add_monitor(daemon, &args).map_err(|e| located(opt, e))?,
            Checked::ObjectHelp(ty) => {
                let text = ferrite_qom::qmp_cmds::object_help(ty.as_deref())
                    .map_err(|e| located(opt, e))?;
                print!("{text}");
                return Ok(Startup::Exit);
            }
            Checked::Object(args) => daemon.objects.add(&args).map_err(|e| located(opt, e))?,
            Checked::Blockdev(args) => {
                let adding = daemon.graph.blockdev_add(&args);
                ferrite_block::report::at_option(opt.describe(), adding)
                    .await
                    .map_err(|e| located(opt, e))?;
            }
            Checked::NbdServer(args) => daemon.nbd.start(&args).map_err(|e| located(opt, e))?,
            Checked::Export(args) => daemon
                .exports
                .add(&args)
                .await
                .map_err(|e| located(opt, e))?,
            Checked::Pidfile(path) => pidfile = Some(path),
        }
    }
    let pidfile = match pidfile {
        Some(p) => Some(
            PidFile::write(&p).map_err(|e| OptionError(format!("cannot create PID file: {e}")))?,
        ),
        None => None,
    };
    Ok(Startup::Running(pidfile))
}

/// `--monitor`: attaches a QMP monitor to a chardev and serves its connections.
fn add_monitor(daemon: &Rc<Daemon>, args: &Args) -> Result<(), Error> {
    if args.opt_str("mode") == Some("readline") {
        return Err(Error::generic("Only QMP is supported"));
    }
    let id = args.str("chardev")?;
    let dev = daemon
        .chardevs
        .get(id)
        .ok_or_else(|| Error::generic(format!("chardev \"{id}\" not found")))?;
    let fe = dev
        .attach_frontend()
        .map_err(|e| Error::generic(e.to_string()))?;
    let monitor = Monitor::new(
        daemon.commands(),
        daemon.events.clone(),
        Daemon::version_info(),
        MonitorOptions {
            pretty: args.bool_or("pretty", false),
            oob_offered: dev.supports_oob(),
        },
    );
    daemon.monitors.borrow_mut().push(monitor.clone());
    if dev.kind() == "socket" {
        daemon.socket_monitors.borrow_mut().push(monitor.clone());
    }
    tokio::task::spawn_local(async move {
        while let Some(conn) = fe.accept().await {
            let fds = conn
                .fds
                .map(|f| -> ferrite_qmp::FdSource { Rc::new(move || f.take()) });
            monitor
                .serve_passing_fds(
                    conn.reader,
                    conn.writer,
                    fds,
                    ferrite_qmp::Lifetime {
                        greet: conn.opened,
                        output_outlives_input: conn.output_outlives_input,
                    },
                )
                .await;
            fe.disconnected();
        }
    });
    Ok(())
}

/// What a front end does when a signal ends the program, before the daemon shuts down
/// (qemu-system reports it and stops the machine; qemu-storage-daemon does nothing).
pub type OnTermination = Box<dyn FnOnce(Termination) -> Pin<Box<dyn Future<Output = ()>>>>;

/// Serves until `quit` or a signal, then shuts down in QEMU's order.
pub async fn run(
    daemon: Rc<Daemon>,
    pidfile: Option<PidFile>,
    mut handle: DaemonizeHandle,
    on_termination: Option<OnTermination>,
) {
    handle.startup_done();
    daemon.start_commands();
    // Housekeeping: metadata caches left unused are dropped (cache-clean-interval).
    let graph = Rc::downgrade(&daemon.graph);
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(g) = graph.upgrade() else { break };
            g.clean_caches(std::time::Instant::now());
        }
    });
    let signals = crate::signals::wait_for_termination();
    let termination = tokio::select! {
        _ = daemon.quit_requested() => None,
        t = signals => Some(t),
    };
    if let (Some(t), Some(f)) = (termination, on_termination) {
        f(t).await;
    }
    // After a signal the block layer is still up (`quit` shut it down before answering);
    // what its shutdown announces goes out before the monitors are flushed.
    daemon.shut_down().await;
    // Let every monitor deliver what it has queued (the quit return among it), but do not
    // let a client that stopped reading hold the exit.
    let monitors = daemon.monitors.borrow().clone();
    let flush = async {
        for m in &monitors {
            m.flush_all().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), flush).await;
    // A socket's client may hang up first; a stdio or pipe client cannot, and the images
    // stay locked until the exit (a test runs `qemu-img` right after `quit`).
    let sockets = daemon.socket_monitors.borrow().clone();
    let hang_ups = async {
        for m in &sockets {
            m.sessions_closed().await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), hang_ups).await;
    daemon.chardevs.close_all();
    drop(pidfile);
}
