//! The system front end's command table: the machine's commands, then everything the
//! storage daemon answers.

use crate::System;
use ferrite_qapi::{Args, Error};
use ferrite_qmp::{CommandFuture, Commands};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

fn empty() -> Result<QObject, Error> {
    Ok(QObject::Dict(QDict::new()))
}

/// The table monitors of `ferrite-system-x86_64` call into.
pub(crate) struct SystemCommands(pub(crate) Rc<System>);

impl SystemCommands {
    async fn run(&self, name: &str, args: Args) -> Result<QObject, Error> {
        let sys = &self.0;
        match name {
            "query-status" => Ok(sys.machine.query_status()),
            "stop" => {
                // An incoming machine only keeps from starting; nothing of it runs yet.
                let incoming = sys.machine.status() == crate::machine::RunState::InMigrate;
                sys.machine.stop();
                if !incoming {
                    sys.settle_images().await;
                }
                empty()
            }
            "cont" => {
                // QEMU: every drive's I/O status starts again from ok; images a finished
                // migration (or `active=off`) left inactive come back first.
                for blk in sys.daemon.graph.backends() {
                    if blk.iostatus_enabled() {
                        blk.set_iostatus(ferrite_block::IoStatus::Ok);
                    }
                }
                sys.daemon.jobs.reset_block_iostatus();
                if sys.machine.status() != crate::machine::RunState::InMigrate {
                    sys.daemon
                        .graph
                        .activate_all()
                        .await
                        .map_err(ferrite_qapi::Error::from)?;
                }
                sys.machine.cont()?;
                empty()
            }
            "system_reset" => {
                sys.machine.system_reset();
                empty()
            }
            "system_powerdown" => {
                sys.machine.system_powerdown();
                empty()
            }
            "query-name" => Ok(sys.machine.query_name()),
            "query-uuid" => Ok(sys.machine.query_uuid()),
            "query-kvm" => Ok(sys.machine.query_kvm()),
            "device_add" => {
                sys.devices.hotplug(args.as_dict())?;
                empty()
            }
            "device_del" => {
                sys.devices.del(args.str("id")?).await?;
                empty()
            }
            "block_set_io_throttle" => {
                let blk = sys
                    .devices
                    .named_drive(args.opt_str("device"), args.opt_str("id"))?;
                crate::io_limits::qmp_block_set_io_throttle(&sys.daemon.graph, &blk, &args)?;
                empty()
            }
            "migrate-set-capabilities" => {
                crate::migration::set_capabilities(sys, &args)?;
                empty()
            }
            "query-migrate-capabilities" => Ok(crate::migration::query_capabilities(sys)),
            "migrate-set-parameters" => {
                crate::migration::set_parameters(sys, &args)?;
                empty()
            }
            "query-migrate-parameters" => Ok(crate::migration::query_parameters(sys)),
            "migrate-start-postcopy" => {
                crate::migration::start_postcopy(sys)?;
                empty()
            }
            "query-migrate" => Ok(crate::migration::query(sys)),
            "migrate" => {
                crate::migration::migrate(sys, &args)?;
                empty()
            }
            "migrate-incoming" => {
                crate::migration::incoming(sys, args.opt_str("uri"))?;
                empty()
            }
            "migrate_cancel" => {
                crate::migration::cancel(sys);
                empty()
            }
            "migrate-continue" => {
                crate::migration::continue_from(sys, args.str("state")?)?;
                empty()
            }
            "snapshot-save" | "snapshot-load" | "snapshot-delete" => {
                crate::savevm::start_job(sys, name, &args)?;
                empty()
            }
            "human-monitor-command" => {
                let line = args.str("command-line")?.to_owned();
                // The CPU the command runs on (`-smp` makes no CPUs here), its index cut
                // to a C int as QEMU's `monitor_set_cpu` takes it.
                if let Some(cpu) = args.opt_i64("cpu-index")
                    && !(0..sys.machine.kind.board.boot_cpus()).contains(&i64::from(cpu as i32))
                {
                    return Err(Error::generic("Parameter 'cpu-index' expects a CPU number"));
                }
                Ok(QObject::String(crate::hmp::run(self, &line, false).await))
            }
            "quit" => {
                sys.machine.quit();
                // The machine stops first (QEMU's vm_shutdown), so a running job pauses and
                // resumes before the daemon's own shutdown drains again and cancels it.
                ferrite_block::report::in_main_loop(sys.settle_images()).await;
                sys.daemon.run("quit", args).await
            }
            _ if let Some(r) = crate::fds::run(name, &args) => r,
            "qom-get" | "qom-set"
                if let Some(r) = sys.devices.qom_drive(&args, name == "qom-set").await =>
            {
                r
            }
            _ => match sys.devices.run_medium_command(name, &args).await {
                Some(r) => r,
                None => sys.daemon.run(name, args).await,
            },
        }
    }

    /// Runs a command for the human monitor.
    pub(crate) async fn run_for_hmp(&self, name: &str, args: QDict) -> Result<QObject, Error> {
        Box::pin(self.run(name, Args::new(args))).await
    }

    /// The system the table serves.
    pub(crate) fn system(&self) -> &Rc<System> {
        &self.0
    }
}

impl Commands for SystemCommands {
    fn run<'a>(&'a self, name: &'a str, args: Args) -> CommandFuture<'a> {
        Box::pin(async move {
            // QEMU reads its monitors once start-up (a `-loadvm` included) is over.
            self.0.machine.started().await;
            ferrite_block::report::in_monitor_command(SystemCommands::run(self, name, args)).await
        })
    }
}
