//! The machine: its type (which buses its board has), its name, and its run state, changed
//! by `stop`, `cont`, `system_reset`, `system_powerdown` and `quit` with QEMU's events.
//! There is no guest CPU: "running" means the devices would take requests from a guest.

use ferrite_qapi::Error;
use ferrite_qmp::{Event, EventBus};
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// A machine type `-machine help` lists.
pub(crate) struct MachineType {
    pub(crate) name: &'static str,
    pub(crate) desc: &'static str,
    pub(crate) board: Board,
}

impl MachineType {
    /// The name of the machine type itself: the versioned one an alias stands for.
    pub(crate) fn canonical_name(&self) -> &'static str {
        self.desc
            .split_once("(alias of ")
            .and_then(|(_, rest)| rest.strip_suffix(')'))
            .unwrap_or(self.name)
    }
}

/// What a machine's board carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Board {
    /// i440FX: PCI, two IDE buses, a floppy controller.
    Pc,
    /// Q35: PCI Express, AHCI (IDE buses).
    Q35,
    /// Nothing at all.
    None,
}

impl Board {
    /// Whether the board has a PCI bus.
    pub(crate) fn has_pci(self) -> bool {
        self != Board::None
    }

    /// The units on each IDE bus: master and slave on the PIIX controller, one port each
    /// on the AHCI one.
    pub(crate) fn ide_units(self) -> u32 {
        if self == Board::Q35 { 1 } else { 2 }
    }

    /// The CPUs the board starts with (QEMU's `none` machine makes none).
    pub(crate) fn boot_cpus(self) -> i64 {
        i64::from(self != Board::None)
    }

    /// The type of the board's PCI host bridge, the system bus's device that carries the
    /// root bus.
    pub(crate) fn host_bridge(self) -> &'static str {
        if self == Board::Q35 {
            "q35-pcihost"
        } else {
            "i440FX-pcihost"
        }
    }

    /// The name of the board's root PCI bus.
    pub(crate) fn root_bus(self) -> &'static str {
        if self == Board::Q35 {
            "pcie.0"
        } else {
            "pci.0"
        }
    }

    /// The IDE buses (`ide.0`, `ide.1`...).
    pub(crate) fn ide_buses(self) -> u32 {
        match self {
            Board::Pc => 2,
            Board::Q35 => 6,
            Board::None => 0,
        }
    }

    /// The flash devices for firmware (`system.flash0`, `system.flash1` on the PC boards).
    pub(crate) fn flash_slots(self) -> u32 {
        if self.has_pci() { 2 } else { 0 }
    }

    /// Whether the board has a floppy controller.
    pub(crate) fn has_floppy(self) -> bool {
        self == Board::Pc
    }
}

/// The machine types, as `-machine help` lists them; the one marked "(default)" is what
/// runs without `-machine`.
pub(crate) const MACHINES: &[MachineType] = &[
    MachineType {
        name: "pc",
        desc: "Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)",
        board: Board::Pc,
    },
    MachineType {
        name: "pc-i440fx-10.0",
        desc: "Standard PC (i440FX + PIIX, 1996) (default)",
        board: Board::Pc,
    },
    MachineType {
        name: "q35",
        desc: "Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-10.0)",
        board: Board::Q35,
    },
    MachineType {
        name: "pc-q35-10.0",
        desc: "Standard PC (Q35 + ICH9, 2009)",
        board: Board::Q35,
    },
    MachineType {
        name: "none",
        desc: "empty machine",
        board: Board::None,
    },
];

/// The UUID `-uuid TEXT` gives the machine, in lower case: `TEXT` is 32 hexadecimal
/// digits grouped 8-4-4-4-12 by hyphens.
///
/// # Errors
/// qemu-system's text, without the option's name.
pub(crate) fn parse_uuid(text: &str) -> Result<String, String> {
    let well_formed = text.len() == 36
        && text.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
    if !well_formed {
        return Err("failed to parse UUID string: wrong format".to_owned());
    }
    Ok(text.to_ascii_lowercase())
}

/// The machine type called `name`.
///
/// # Errors
/// QEMU's text for an unknown type.
pub(crate) fn machine_type(name: &str) -> Result<&'static MachineType, String> {
    MACHINES.iter().find(|m| m.name == name).ok_or_else(|| {
        format!(
            "unsupported machine type: \"{name}\"\nUse -machine help to list supported machines"
        )
    })
}

/// QAPI `RunState`, the values a machine without a CPU reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunState {
    /// Not started yet (`-S`, or reset while stopped).
    Prelaunch,
    /// Waiting for an incoming migration (`-incoming`).
    InMigrate,
    Running,
    Paused,
    /// Stopped while `savevm` saves the machine.
    SaveVm,
    /// Stopped while `loadvm` restores the machine (and left so when it fails).
    RestoreVm,
    /// Stopped while a migration sends the machine's state.
    FinishMigrate,
    /// After a migration sent the machine away.
    PostMigrate,
}

impl RunState {
    /// The run state QAPI name `name` stands for, of those this machine reaches.
    pub(crate) fn parse(name: &str) -> Option<RunState> {
        [
            RunState::Prelaunch,
            RunState::InMigrate,
            RunState::Running,
            RunState::Paused,
            RunState::SaveVm,
            RunState::RestoreVm,
            RunState::FinishMigrate,
            RunState::PostMigrate,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    /// Its QAPI name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::InMigrate => "inmigrate",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::SaveVm => "save-vm",
            RunState::RestoreVm => "restore-vm",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }
}

/// The machine's state.
pub(crate) struct Machine {
    pub(crate) kind: &'static MachineType,
    /// `-name`.
    pub(crate) name: Option<String>,
    /// `-uuid`, in lower case (the nil UUID without one).
    uuid: String,
    state: Cell<RunState>,
    /// Start when an incoming migration ends (cleared by `stop` while waiting for one).
    autostart: Cell<bool>,
    /// Whether KVM is enabled: never, without a guest CPU.
    kvm_present: bool,
    events: Rc<EventBus>,
    /// Called by `system_reset` after the RESET event (devices finish their unplugs).
    on_reset: RefCell<Vec<Box<dyn Fn()>>>,
    /// `quit` was asked: the program is ending.
    quitting: Cell<bool>,
    /// Start-up is over (the human monitor shows its prompt from then on).
    started: Cell<bool>,
    /// The human monitors may show their prompt although start-up goes on (QEMU polled its
    /// main loop meanwhile).
    prompt_early: Cell<bool>,
    /// A human monitor's prompt is out.
    prompt_shown: Cell<bool>,
    started_notify: tokio::sync::Notify,
}

impl Machine {
    pub(crate) fn new(
        kind: &'static MachineType,
        name: Option<String>,
        uuid: Option<String>,
        events: Rc<EventBus>,
    ) -> Rc<Machine> {
        let uuid = uuid.unwrap_or_else(|| ferrite_block::emulator::NIL_UUID.to_owned());
        // What drivers read of the machine (an iSCSI initiator's default name).
        ferrite_block::emulator::set_machine(name.clone(), Some(uuid.clone()));
        Rc::new(Machine {
            kind,
            name,
            uuid,
            state: Cell::new(RunState::Prelaunch),
            autostart: Cell::new(true),
            kvm_present: std::path::Path::new("/dev/kvm").exists(),
            events,
            on_reset: RefCell::new(Vec::new()),
            quitting: Cell::new(false),
            started: Cell::new(false),
            prompt_early: Cell::new(false),
            prompt_shown: Cell::new(false),
            started_notify: tokio::sync::Notify::new(),
        })
    }

    fn emit(&self, name: &'static str, data: Option<QDict>) {
        self.events.emit(Event { name, data });
    }

    /// Start-up is done: run, unless `-S` (stay in prelaunch) or `-incoming` (wait for it).
    pub(crate) fn start(&self, paused: bool, incoming: bool) {
        self.started.set(true);
        self.started_notify.notify_waiters();
        if incoming {
            self.state.set(RunState::InMigrate);
            self.autostart.set(!paused);
        } else if !paused {
            self.state.set(RunState::Running);
        }
    }

    /// Waits until start-up is over.
    pub(crate) async fn started(&self) {
        self.wait_for(|| self.started.get()).await;
    }

    /// Lets the human monitors show their prompt before start-up is over: QEMU runs its
    /// main loop while it moves nodes between iothreads, and the prompt goes out then.
    pub(crate) fn let_monitors_prompt(&self) {
        self.prompt_early.set(true);
        self.started_notify.notify_waiters();
    }

    /// Waits until the human monitors may show their prompt.
    pub(crate) async fn prompt_allowed(&self) {
        self.wait_for(|| self.started.get() || self.prompt_early.get())
            .await;
    }

    /// A human monitor has shown its prompt.
    pub(crate) fn prompt_is_out(&self) {
        self.prompt_shown.set(true);
        self.started_notify.notify_waiters();
    }

    /// Waits until a human monitor has shown its prompt.
    pub(crate) async fn prompt_shown(&self) {
        self.wait_for(|| self.prompt_shown.get()).await;
    }

    async fn wait_for(&self, done: impl Fn() -> bool) {
        while !done() {
            let n = self.started_notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if done() {
                return;
            }
            n.await;
        }
    }

    /// Whether the machine runs once its incoming migration is over (no `-S`, or `cont`
    /// while it waited).
    pub(crate) fn autostart(&self) -> bool {
        self.autostart.get()
    }

    /// The incoming migration is over: the machine goes to `state` (running: with
    /// RESUME).
    pub(crate) fn incoming_done(&self, state: RunState) {
        self.state.set(state);
        if state == RunState::Running {
            self.emit("RESUME", None);
        }
    }

    /// Its run state.
    pub(crate) fn status(&self) -> RunState {
        self.state.get()
    }

    /// Whether the machine runs.
    pub(crate) fn is_running(&self) -> bool {
        self.state.get() == RunState::Running
    }

    /// Adds what `system_reset` does after its event.
    pub(crate) fn on_reset(&self, f: Box<dyn Fn()>) {
        self.on_reset.borrow_mut().push(f);
    }

    /// `query-status`.
    pub(crate) fn query_status(&self) -> QObject {
        QDict::new()
            .with("running", self.is_running())
            .with("status", self.state.get().as_str())
            .into()
    }

    /// `stop`: a running machine pauses (STOP); one not yet started stays stopped when it
    /// would have started.
    pub(crate) fn stop(&self) {
        match self.state.get() {
            RunState::Running => {
                self.state.set(RunState::Paused);
                self.emit("STOP", None);
            }
            RunState::InMigrate => self.autostart.set(false),
            _ => self.state.set(RunState::Paused),
        }
    }

    /// Stops a running machine for a VM snapshot (QEMU's `vm_stop(state)`): it goes to
    /// `state`, with STOP; a machine that is not running stays as it is. Returns the state
    /// to go back to ([`Machine::resume`]).
    pub(crate) fn stop_for(&self, state: RunState) -> RunState {
        let was = self.state.get();
        if was == RunState::Running {
            self.state.set(state);
            self.emit("STOP", None);
        }
        was
    }

    /// Goes back to `was` after a VM snapshot (QEMU's `vm_resume`): running again, with
    /// RESUME, or in that state.
    pub(crate) fn resume(&self, was: RunState) {
        if was != RunState::Running {
            self.state.set(was);
        } else if self.state.get() != RunState::Running {
            self.state.set(RunState::Running);
            self.emit("RESUME", None);
        }
    }

    /// `cont`.
    pub(crate) fn cont(&self) -> Result<(), Error> {
        match self.state.get() {
            RunState::Running => {}
            RunState::InMigrate => self.autostart.set(true),
            _ => {
                self.state.set(RunState::Running);
                self.emit("RESUME", None);
            }
        }
        Ok(())
    }

    /// `system_reset`: RESET; a machine that was not running goes back to prelaunch.
    pub(crate) fn system_reset(&self) {
        self.emit("RESET", Some(shutdown_data("host-qmp-system-reset")));
        if !matches!(self.state.get(), RunState::Running | RunState::InMigrate) {
            self.state.set(RunState::Prelaunch);
        }
        self.reset_devices();
    }

    /// Resets the devices without a RESET event, as loading a VM snapshot does before its
    /// state is read (QEMU's reset for `snapshot-load`).
    pub(crate) fn reset_devices(&self) {
        for f in self.on_reset.borrow().iter() {
            f();
        }
    }

    /// `system_powerdown`: the button is pressed (POWERDOWN); no guest answers it.
    pub(crate) fn system_powerdown(&self) {
        self.emit("POWERDOWN", None);
    }

    /// `quit`: SHUTDOWN, before the daemon's own shutdown.
    pub(crate) fn quit(&self) {
        self.quitting.set(true);
        self.emit("SHUTDOWN", Some(shutdown_data("host-qmp-quit")));
    }

    /// A terminating signal: SHUTDOWN, before the daemon's own shutdown (QEMU's
    /// `qemu_system_killed`, which ends the program whatever `-no-shutdown` says).
    pub(crate) fn killed(&self) {
        self.quitting.set(true);
        self.emit("SHUTDOWN", Some(shutdown_data("host-signal")));
    }

    /// Whether `quit` was asked.
    pub(crate) fn is_quitting(&self) -> bool {
        self.quitting.get()
    }

    /// `query-name`.
    pub(crate) fn query_name(&self) -> QObject {
        let mut d = QDict::new();
        if let Some(n) = &self.name {
            d.insert("name", n.as_str());
        }
        d.into()
    }

    /// `-uuid`, in lower case, or the nil UUID.
    pub(crate) fn uuid(&self) -> &str {
        &self.uuid
    }

    /// `query-uuid`.
    pub(crate) fn query_uuid(&self) -> QObject {
        QDict::new().with("UUID", self.uuid.as_str()).into()
    }

    /// `query-kvm`.
    pub(crate) fn query_kvm(&self) -> QObject {
        QDict::new()
            .with("enabled", false)
            .with("present", self.kvm_present)
            .into()
    }

    /// The HMP `info status` line.
    pub(crate) fn status_line(&self) -> String {
        match self.state.get() {
            RunState::Running => "VM status: running\r\n".into(),
            s => format!("VM status: paused ({})\r\n", s.as_str()).replace(" (paused)", ""),
        }
    }
}

fn shutdown_data(reason: &str) -> QDict {
    QDict::new().with("guest", false).with("reason", reason)
}
