//! The daemon's state (everything the main loop owns) and its QMP command table.

use crate::cli::help::{QEMU_VERSION, package};
use crate::latch::Latch;
use ferrite_block::{EventSink, Graph};
use ferrite_blockdev::{bitmap_cmds as bm, qmp_cmds as blk, snapshot_cmds, transaction};
use ferrite_chardev::{Chardev, ChardevRegistry, qmp_cmds as chr};
use ferrite_export::{Exports, qmp_cmds as export};
use ferrite_jobs::JobManager;
use ferrite_nbd::{NbdService, qmp_cmds as nbd};
use ferrite_qapi::{Args, Error, ErrorClass, QapiEvent, introspect, schema};
use ferrite_qmp::{CommandFuture, Commands, Event, EventBus, Monitor};
use ferrite_qobject::{QDict, QObject};
use ferrite_qom::{Container, ObjectRegistry, QomNode, qmp_cmds as qom};
use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;

/// Everything the main loop owns (QEMU's global state, minus the globals).
pub struct Daemon {
    /// Where events go to the monitors.
    pub events: Rc<EventBus>,
    /// The character devices.
    pub chardevs: Rc<ChardevRegistry>,
    /// The user-created QOM objects.
    pub objects: Rc<ObjectRegistry>,
    /// The block graph.
    pub graph: Rc<Graph>,
    /// The block exports.
    pub exports: Rc<Exports>,
    /// The NBD server.
    pub nbd: Rc<NbdService>,
    /// The jobs.
    pub jobs: Rc<JobManager>,
    qom_root: Rc<dyn QomNode>,
    /// The QMP monitors.
    pub monitors: RefCell<Vec<Rc<Monitor>>>,
    /// The monitors on sockets, whose clients the exit waits a moment for to hang up.
    pub socket_monitors: RefCell<Vec<Rc<Monitor>>>,
    quit: Latch,
    /// Set once the block layer has been shut down (`shut_down`).
    shut_down: Cell<bool>,
    /// Open once the command line has been acted on: no command runs before (QEMU's
    /// monitors dispatch nothing before its main loop).
    started: Latch,
    schema_info: OnceCell<QObject>,
    /// The command table monitors use: the daemon's own unless a front end set one that
    /// adds its commands (the system front end's machine).
    commands: RefCell<Option<Rc<dyn Commands>>>,
}

/// The block layer's events, delivered through the monitors' event bus.
struct BusSink(Rc<EventBus>);

impl EventSink for BusSink {
    fn emit(&self, event: &dyn QapiEvent) {
        // Every event the layers emit is checked against the schema in debug builds (the
        // whole test suite runs them).
        debug_assert!(
            ferrite_qapi::check_event(event).is_ok(),
            "{:?}",
            ferrite_qapi::check_event(event)
        );
        self.0.emit(Event {
            name: event.name(),
            data: event.data(),
        });
    }
}

/// A command that returns nothing (`{}`), its error turned into QMP's.
fn done<T, E: Into<Error>>(r: Result<T, E>) -> Result<QObject, Error> {
    r.map(|_| QObject::Dict(QDict::new())).map_err(Into::into)
}

/// A chardev as a QOM object under `/chardevs`.
struct ChardevNode(Rc<Chardev>);

impl QomNode for ChardevNode {
    fn type_name(&self) -> String {
        format!("chardev-{}", self.0.kind())
    }

    fn get(&self, name: &str) -> Option<ferrite_qom::Result<QObject>> {
        match (self.0.kind(), name) {
            ("socket", "connected") => Some(Ok(self.0.connected().into())),
            _ => None,
        }
    }
}

impl Daemon {
    /// The state at start-up: every driver and export type registered, nothing else.
    pub fn new() -> Rc<Daemon> {
        let chardevs = Rc::new(ChardevRegistry::new());
        let objects = Rc::new(ObjectRegistry::new());
        let chardev_view = chardevs.clone();
        let root: Rc<dyn QomNode> = Rc::new(Container::new(vec![
            (
                "backend".into(),
                Rc::new(Container::new(Vec::new())) as Rc<dyn QomNode>,
            ),
            ("objects".into(), objects.clone() as Rc<dyn QomNode>),
            (
                "chardevs".into(),
                Rc::new(Container::dynamic(move || {
                    chardev_view
                        .all()
                        .into_iter()
                        .map(|c| {
                            (
                                c.id().to_owned(),
                                Rc::new(ChardevNode(c)) as Rc<dyn QomNode>,
                            )
                        })
                        .collect()
                })) as Rc<dyn QomNode>,
            ),
        ]));
        let events = EventBus::new();
        // The storage daemon's monitors keep no descriptors by name (a front end with
        // `getfd` installs its own lookup): a socket address of type `fd` in a command is
        // refused as qemu-storage-daemon refuses it.
        ferrite_socket::monitor_fd::set_lookup(Rc::new(|_| {
            ferrite_qmp::current_session()
                .map(|_| Err("only QEMU supports file descriptor passing".to_owned()))
        }));
        // Rate limits run on the block layer's clock: the virtual one under qtest.
        events.set_sleep(Rc::new(|d| Box::pin(ferrite_block::clock::sleep(d))));
        let sink: Rc<dyn EventSink> = Rc::new(BusSink(events.clone()));
        let registry = ferrite_block::Registry::new();
        ferrite_drivers::register(&registry);
        ferrite_qcow2::register(&registry);
        let tls = crate::object_links::tls_objects(&objects);
        chardevs.set_tls_objects(tls.clone());
        ferrite_nbd::client::register(&registry, tls.clone());
        ferrite_curl::register(&registry);
        ferrite_ssh::register(&registry);
        ferrite_iscsi::register(&registry);
        ferrite_nfs::register(&registry);
        let graph = Graph::new(sink.clone(), registry);
        crate::object_links::link(&graph, &objects);
        let exports = Exports::new(graph.clone(), sink.clone());
        let nbd = NbdService::new(graph.clone(), &exports);
        nbd.set_tls_objects(tls);
        exports.register(ferrite_fuse::FuseExportType::new());
        exports.register(ferrite_virtio_blk::VhostUserBlkExportType::new());
        exports.register(ferrite_virtio_blk::VduseBlkExportType::new());
        let jobs = JobManager::new(sink);
        let daemon = Rc::new(Daemon {
            events,
            chardevs,
            objects,
            graph,
            exports,
            nbd,
            jobs,
            qom_root: root,
            monitors: RefCell::new(Vec::new()),
            socket_monitors: RefCell::new(Vec::new()),
            quit: Latch::default(),
            shut_down: Cell::new(false),
            started: Latch::default(),
            schema_info: OnceCell::new(),
            commands: RefCell::new(None),
        });
        // A mux's C-a x ends the program as `quit` does.
        let weak = Rc::downgrade(&daemon);
        daemon.chardevs.set_quit_hook(Rc::new(move || {
            if let Some(d) = weak.upgrade() {
                d.request_quit();
            }
        }));
        daemon
    }

    /// Makes `commands` the table the monitors attached from now on use.
    pub fn set_commands(&self, commands: Rc<dyn Commands>) {
        *self.commands.borrow_mut() = Some(commands);
    }

    /// The table a new monitor uses.
    pub(crate) fn commands(self: &Rc<Self>) -> Rc<dyn Commands> {
        self.commands
            .borrow()
            .clone()
            .unwrap_or_else(|| Rc::new(DaemonCommands(self.clone())))
    }

    /// The `VersionInfo` of the greeting and `query-version`.
    pub fn version_info() -> QObject {
        let (major, minor, micro) = QEMU_VERSION;
        QDict::new()
            .with(
                "qemu",
                QDict::new()
                    .with("major", major)
                    .with("minor", minor)
                    .with("micro", micro),
            )
            .with("package", package())
            .into()
    }

    /// Shuts the block layer down in QEMU's order (the end of qemu-storage-daemon's and
    /// qemu-system's main): exports closed, then running jobs force-cancelled inside a drain
    /// of everything (so that throttled requests do not hold the cancel back), then every
    /// node flushed and closed. `quit` does it before it answers (QEMU's events come before
    /// the reply); a signal, or a failed start, after the main loop. Done once.
    pub async fn shut_down(&self) {
        if self.shut_down.replace(true) {
            return;
        }
        ferrite_block::report::in_main_loop(async {
            self.exports.close_all().await;
            self.nbd.close().await;
            let drained = self.graph.drain_all().await;
            self.jobs.cancel_all().await;
            drop(drained);
            self.graph.flush_all().await;
            self.graph.close_all().await;
        })
        .await;
    }

    /// Whether the absolute QOM path `path` names one of the daemon's objects (a user
    /// object, a chardev or one of their containers).
    pub fn qom_path_exists(&self, path: &str) -> bool {
        ferrite_qom::resolve_path(&self.qom_root, path).is_ok()
    }

    /// Asks the main loop to shut down (`quit`, a signal).
    pub fn request_quit(&self) {
        self.quit.open();
    }

    /// Waits until shutdown is requested.
    pub(crate) async fn quit_requested(&self) {
        self.quit.wait().await;
    }

    /// Lets the monitors' commands run: the command line has been acted on.
    pub fn start_commands(&self) {
        self.started.open();
    }

    /// Runs one checked command.
    pub async fn run(&self, name: &str, args: Args) -> Result<QObject, Error> {
        let empty = || Ok(QObject::Dict(QDict::new()));
        match name {
            "query-version" => Ok(Self::version_info()),
            "query-commands" => Ok(schema()
                .commands()
                .map(|c| QObject::Dict(QDict::new().with("name", c.name.as_str())))
                .collect::<Vec<_>>()
                .into()),
            "query-qmp-schema" => Ok(self
                .schema_info
                .get_or_init(|| introspect::schema_info(schema()))
                .clone()),
            "quit" => {
                self.shut_down().await;
                self.request_quit();
                empty()
            }
            "blockdev-add" => blk::qmp_blockdev_add(&self.graph, &args).await,
            "blockdev-create" => done(ferrite_jobs::qmp_blockdev_create(
                &self.jobs,
                &self.graph,
                &args,
            )),
            "x-blockdev-amend" => done(ferrite_jobs::qmp_x_blockdev_amend(
                &self.jobs,
                &self.graph,
                &args,
            )),
            "blockdev-mirror" => done(
                ferrite_blockdev::job_cmds::qmp_blockdev_mirror(&self.jobs, &self.graph, &args)
                    .await,
            ),
            "drive-mirror" => done(
                ferrite_blockdev::job_cmds::qmp_drive_mirror(&self.jobs, &self.graph, &args).await,
            ),
            "x-blockdev-change" => blk::qmp_x_blockdev_change(&self.graph, &args),
            "x-blockdev-set-iothread" => blk::qmp_x_blockdev_set_iothread(&self.graph, &args),
            "block-commit" => done(
                ferrite_blockdev::job_cmds::qmp_block_commit(&self.jobs, &self.graph, &args).await,
            ),
            "block-stream" => done(
                ferrite_blockdev::job_cmds::qmp_block_stream(&self.jobs, &self.graph, &args).await,
            ),
            "blockdev-backup"
            | "drive-backup"
            | "blockdev-snapshot"
            | "blockdev-snapshot-sync"
            | "blockdev-snapshot-internal-sync" => {
                done(transaction::qmp_single_action(&self.jobs, &self.graph, name, &args).await)
            }
            "block-dirty-bitmap-add" => done(bm::add(&self.graph, &args)),
            "block-dirty-bitmap-remove" => {
                // A persistent bitmap leaves the image at once, as in QEMU.
                let (node, name) = (args.str("node")?, args.str("name")?);
                let stored = bm::lookup(&self.graph, node, name)
                    .ok()
                    .filter(|(_, b)| b.is_persistent());
                drop(bm::remove(&self.graph, &args)?);
                if let Some((node, _)) = stored {
                    node.driver()
                        .remove_stored_bitmap(&node, name)
                        .await
                        .map_err(|e| {
                            Error::generic(format!(
                                "Failed to remove bitmap '{name}' from the image: {}",
                                ferrite_qapi::os_msg(&e)
                            ))
                        })?;
                }
                Ok(QObject::Dict(QDict::new()))
            }
            "block-dirty-bitmap-clear" => done(bm::clear(&self.graph, &args)),
            "block-dirty-bitmap-enable" => done(bm::set_enabled(&self.graph, &args, true)),
            "block-dirty-bitmap-disable" => done(bm::set_enabled(&self.graph, &args, false)),
            "block-dirty-bitmap-merge" => done(bm::merge(&self.graph, &args)),
            "x-debug-block-dirty-bitmap-sha256" => {
                bm::sha256(&self.graph, &args).map_err(Into::into)
            }
            "transaction" => {
                done(transaction::qmp_transaction(&self.jobs, &self.graph, &args).await)
            }
            "blockdev-snapshot-delete-internal-sync" => {
                snapshot_cmds::delete_internal_sync(&self.graph, &args)
                    .await
                    .map(QObject::Dict)
                    .map_err(Into::into)
            }
            "change-backing-file" => {
                done(snapshot_cmds::change_backing_file(&self.graph, &args).await)
            }
            "blockdev-del" => blk::qmp_blockdev_del(&self.graph, &args).await,
            "blockdev-reopen" => blk::qmp_blockdev_reopen(&self.graph, &args).await,
            "query-named-block-nodes" => blk::qmp_query_named_block_nodes(&self.graph, &args),
            "query-block" => Ok(blk::qmp_query_block(&self.graph)),
            "query-blockstats" => Ok(blk::qmp_query_blockstats(&self.graph, &args)),
            "block_resize" => blk::qmp_block_resize(&self.graph, &args).await,
            "block-set-write-threshold" => blk::qmp_block_set_write_threshold(&self.graph, &args),
            "x-debug-query-block-graph" => Ok(blk::qmp_x_debug_query_block_graph(&self.graph)),
            "nbd-server-start" => nbd::qmp_nbd_server_start(&self.nbd, &args),
            "nbd-server-stop" => nbd::qmp_nbd_server_stop(&self.nbd).await,
            "nbd-server-add" => nbd::qmp_nbd_server_add(&self.nbd, &args).await,
            "nbd-server-remove" => nbd::qmp_nbd_server_remove(&self.nbd, &args).await,
            "block-export-add" => export::qmp_block_export_add(&self.exports, &args).await,
            "blockdev-set-active" => done(blk::qmp_blockdev_set_active(&self.graph, &args).await),
            "block-export-del" => export::qmp_block_export_del(&self.exports, &args).await,
            "query-block-exports" => Ok(export::qmp_query_block_exports(&self.exports)),
            "chardev-add" => chr::qmp_chardev_add(&self.chardevs, &args),
            "chardev-change" => chr::qmp_chardev_change(&self.chardevs, &args),
            "chardev-remove" => chr::qmp_chardev_remove(&self.chardevs, &args),
            "chardev-send-break" => chr::qmp_chardev_send_break(&self.chardevs, &args),
            "query-chardev" => Ok(chr::qmp_query_chardev(&self.chardevs)),
            "query-chardev-backends" => Ok(chr::qmp_query_chardev_backends()),
            "ringbuf-write" => chr::qmp_ringbuf_write(&self.chardevs, &args),
            "ringbuf-read" => chr::qmp_ringbuf_read(&self.chardevs, &args),
            "object-add" => qom::qmp_object_add(&self.objects, &args),
            "object-del" => qom::qmp_object_del(&self.objects, &args),
            "qom-list" => qom::qmp_qom_list(&self.qom_root, &args),
            "qom-get" => qom::qmp_qom_get(&self.qom_root, &args),
            "qom-set" => qom::qmp_qom_set(&self.qom_root, &args),
            "qom-list-types" => Ok(qom::qmp_qom_list_types(&args)),
            "qom-list-properties" => qom::qmp_qom_list_properties(&args),
            _ => match ferrite_jobs::qmp_cmds::run(&self.jobs, name, &args).await {
                Some(r) => r,
                None => Err(Error::new(
                    ErrorClass::CommandNotFound,
                    format!("The command {name} has not been found"),
                )),
            },
        }
    }
}

/// The command table the monitors call into.
pub struct DaemonCommands(pub Rc<Daemon>);

impl Commands for DaemonCommands {
    fn run<'a>(&'a self, name: &'a str, args: Args) -> CommandFuture<'a> {
        Box::pin(async move {
            self.0.started.wait().await;
            ferrite_block::report::in_monitor_command(self.0.run(name, args)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command the schema declares has a handler: with arguments that fail in the
    /// handler (or succeed), nothing answers "has not been found".
    #[tokio::test(flavor = "current_thread")]
    async fn every_schema_command_has_a_handler() {
        let d = Daemon::new();
        for c in schema().commands() {
            if c.name == "qmp_capabilities" {
                continue; // handled by the session itself
            }
            let r = d.run(&c.name, Args::default()).await;
            if let Err(e) = r {
                assert_ne!(e.class, ErrorClass::CommandNotFound, "{}", c.name);
            }
        }
    }
}
