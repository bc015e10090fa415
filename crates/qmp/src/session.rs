//! One monitor and its sessions: greeting, negotiation, request checks, dispatch.

use crate::context::{FdSource, NamedFds, in_session};
use crate::dispatch::Commands;
use crate::events::{EventBus, wire_text};
use crate::outbox::Outbox;
use ferrite_qapi::visit::{Mode, check_object};
use ferrite_qapi::{Args, Error, ErrorClass, schema};
use ferrite_qobject::{JsonStreamer, ParseError, QDict, QObject};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::Notify;

pub(crate) type Reader = Pin<Box<dyn AsyncRead>>;
pub(crate) type Writer = Pin<Box<dyn AsyncWrite>>;

/// In-band requests queued per session once `oob` is enabled (QEMU's limit); without it, one.
const OOB_QUEUE_LEN: usize = 8;

/// How a monitor behaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonitorOptions {
    /// Multi-line output (`--monitor ...,pretty=on`).
    pub pretty: bool,
    /// Whether the greeting offers the `oob` capability.
    pub oob_offered: bool,
}

/// A QMP monitor: serves sessions, one per connection of its chardev.
pub struct Monitor {
    commands: Rc<dyn Commands>,
    events: Rc<EventBus>,
    version: QObject,
    options: MonitorOptions,
    open_sessions: RefCell<Vec<Rc<Outbox>>>,
    /// Sessions whose input ended while their output goes on (`output_outlives_input`):
    /// no longer a client that may hang up, still a place events go to.
    lingering: RefCell<Vec<Rc<Outbox>>>,
    session_closed: Notify,
    named_fds: Rc<NamedFds>,
}

type Request = Result<QObject, ParseError>;

/// How a chardev opens and ends a connection, as its monitor sees it.
#[derive(Clone, Copy, Debug)]
pub struct Lifetime {
    /// The chardev reports itself open, which is when QEMU's monitor greets (a `udp` one
    /// never does).
    pub greet: bool,
    /// The output stays when the input ends (QEMU's fd chardevs: `stdio`, `pipe`): the
    /// session goes on receiving events there until the monitor ends.
    pub output_outlives_input: bool,
}

impl Default for Lifetime {
    fn default() -> Self {
        Lifetime {
            greet: true,
            output_outlives_input: false,
        }
    }
}

/// Per-connection state.
struct Session {
    outbox: Rc<Outbox>,
    command_mode: Cell<bool>,
    oob: Cell<bool>,
    requests: RefCell<VecDeque<Request>>,
    executing: Cell<bool>,
    reader_done: Cell<bool>,
    wake_executor: Notify,
    wake_reader: Notify,
    passed_fds: Option<FdSource>,
}

fn error_response(err: &Error, id: Option<QObject>) -> QObject {
    let mut rsp = QDict::new().with(
        "error",
        QDict::new()
            .with("class", err.class.as_str())
            .with("desc", err.desc.as_str()),
    );
    rsp.insert_opt("id", id);
    rsp.into()
}

impl Monitor {
    /// A monitor running `commands`, announcing `version` (a `VersionInfo`).
    pub fn new(
        commands: Rc<dyn Commands>,
        events: Rc<EventBus>,
        version: QObject,
        options: MonitorOptions,
    ) -> Rc<Self> {
        Rc::new(Monitor {
            commands,
            events,
            version,
            options,
            open_sessions: RefCell::new(Vec::new()),
            lingering: RefCell::new(Vec::new()),
            session_closed: Notify::new(),
            named_fds: Rc::default(),
        })
    }

    /// Serves one connection until the peer hangs up.
    pub async fn serve(
        self: &Rc<Self>,
        reader: Pin<Box<dyn AsyncRead>>,
        writer: Pin<Box<dyn AsyncWrite>>,
    ) {
        self.serve_passing_fds(reader, writer, None, Lifetime::default())
            .await;
    }

    /// Serves one connection on which the client may pass descriptors (`fds` takes the
    /// last one passed), for `getfd` and `add-fd`; `lifetime` says how the chardev opens
    /// and ends it.
    pub async fn serve_passing_fds(
        self: &Rc<Self>,
        reader: Pin<Box<dyn AsyncRead>>,
        writer: Pin<Box<dyn AsyncWrite>>,
        fds: Option<FdSource>,
        lifetime: Lifetime,
    ) {
        let outbox = Outbox::new(self.options.pretty);
        self.open_sessions.borrow_mut().push(outbox.clone());
        let session = Session {
            outbox: outbox.clone(),
            command_mode: Cell::new(false),
            oob: Cell::new(false),
            requests: RefCell::new(VecDeque::new()),
            executing: Cell::new(false),
            reader_done: Cell::new(false),
            wake_executor: Notify::new(),
            wake_reader: Notify::new(),
            passed_fds: fds,
        };
        let caps: Vec<QObject> = if self.options.oob_offered {
            vec!["oob".into()]
        } else {
            Vec::new()
        };
        let greeting = QDict::new().with(
            "QMP",
            QDict::new()
                .with("version", self.version.clone())
                .with("capabilities", caps),
        );
        if lifetime.greet {
            self.send(&session, greeting.into());
        }
        let writer_task = outbox.run_writer(writer);
        let work = async {
            tokio::join!(self.read_loop(&session, reader), self.exec_loop(&session));
            if lifetime.output_outlives_input && !outbox.is_closed() {
                self.forget_session(&outbox);
                self.lingering.borrow_mut().push(outbox.clone());
                outbox.closed().await;
                self.lingering
                    .borrow_mut()
                    .retain(|o| !Rc::ptr_eq(o, &outbox));
            }
            outbox.flushed().await;
            outbox.close();
        };
        tokio::join!(writer_task, work);
        self.forget_session(&outbox);
    }

    /// `outbox`'s client can no longer hang up (it has, or it cannot).
    fn forget_session(&self, outbox: &Rc<Outbox>) {
        self.open_sessions
            .borrow_mut()
            .retain(|o| !Rc::ptr_eq(o, outbox));
        self.session_closed.notify_waiters();
    }

    /// Waits until every client has hung up. At exit this gives a client that just read the
    /// `quit` reply time to close first: clients such as `qemu.qmp` can report a lost reply
    /// when the end of the stream follows it too closely.
    pub async fn sessions_closed(&self) {
        while !self.open_sessions.borrow().is_empty() {
            self.session_closed.notified().await;
        }
    }

    /// Waits until every open session has written what it has queued (used before exit).
    pub async fn flush_all(&self) {
        let mut sessions = self.open_sessions.borrow().clone();
        sessions.extend(self.lingering.borrow().iter().cloned());
        for s in sessions {
            s.flushed().await;
        }
    }

    fn send(&self, session: &Session, msg: QObject) {
        session.outbox.push(wire_text(&msg, self.options.pretty));
    }

    fn reader_may_read(&self, session: &Session) -> bool {
        let queued = session.requests.borrow().len();
        if session.oob.get() {
            queued < OOB_QUEUE_LEN
        } else {
            queued == 0 && !session.executing.get()
        }
    }

    async fn read_loop(&self, session: &Session, mut reader: Reader) {
        let mut streamer = JsonStreamer::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while !self.reader_may_read(session) && !session.outbox.is_closed() {
                session.wake_reader.notified().await;
            }
            if session.outbox.is_closed() {
                break;
            }
            let n = match reader.read(&mut buf).await {
                Ok(0) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "QMP connection read failed");
                    break;
                }
                Ok(n) => n,
            };
            let mut immediate = Vec::new();
            streamer.feed(&buf[..n], |req| match &req {
                Ok(QObject::Dict(d)) if is_oob_request(d) => immediate.push(req),
                _ => session.requests.borrow_mut().push_back(req),
            });
            // Out-of-band requests run at once, ahead of the queue.
            for req in immediate {
                if let Some(rsp) = self.handle(session, req).await {
                    self.send(session, rsp);
                }
            }
            session.wake_executor.notify_one();
        }
        session.reader_done.set(true);
        session.wake_executor.notify_one();
    }

    async fn exec_loop(&self, session: &Session) {
        loop {
            let next = session.requests.borrow_mut().pop_front();
            let Some(req) = next else {
                if session.reader_done.get() || session.outbox.is_closed() {
                    break;
                }
                session.wake_executor.notified().await;
                continue;
            };
            if session.outbox.is_closed() {
                // Nobody reads the replies any more (the peer reset the connection): what
                // is queued is dropped, as when the peer hangs up.
                session.requests.borrow_mut().clear();
                break;
            }
            session.executing.set(true);
            if session.oob.get() {
                session.wake_reader.notify_one();
            }
            session.outbox.wait_writable().await;
            let rsp = self.handle(session, req).await;
            session.executing.set(false);
            if let Some(rsp) = rsp {
                self.send(session, rsp);
            }
            // What the command set going (a job that has nothing to wait for) goes as far
            // as it can before the next command runs: QEMU's dispatcher passes through its
            // main loop between commands.
            tokio::task::yield_now().await;
            if session.reader_done.get() {
                // The peer hung up: QEMU drops what it had queued.
                session.requests.borrow_mut().clear();
                break;
            }
            session.wake_reader.notify_one();
        }
        session.wake_reader.notify_one();
    }

    /// Checks and runs one request; the response, if any.
    async fn handle(&self, session: &Session, req: Request) -> Option<QObject> {
        let req = match req {
            Ok(r) => r,
            Err(e) => return Some(error_response(&Error::generic(e.to_string()), None)),
        };
        let QObject::Dict(dict) = req else {
            return Some(error_response(
                &Error::generic("QMP input must be a JSON object"),
                None,
            ));
        };
        let id = dict.get("id").cloned();
        tracing::debug!(request = %ferrite_qobject::to_json(&QObject::Dict(dict.clone())), "QMP request");
        let result = self.dispatch(session, &dict).await;
        let rsp = match result {
            Ok(value) => {
                let mut rsp = QDict::new().with("return", value);
                rsp.insert_opt("id", id);
                rsp.into()
            }
            Err(mut err) => {
                if !session.command_mode.get() && err.class == ErrorClass::CommandNotFound {
                    err.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                }
                error_response(&err, id)
            }
        };
        Some(rsp)
    }

    async fn dispatch(&self, session: &Session, dict: &QDict) -> Result<QObject, Error> {
        let (name, oob) = check_request(dict, session.oob.get())?;
        let empty = QObject::Dict(QDict::new());
        let arguments = dict.get("arguments").unwrap_or(&empty);
        let negotiating = !session.command_mode.get();
        let command = match schema().command(name) {
            Some(c) if !negotiating || name == "qmp_capabilities" => c,
            _ => {
                return Err(Error::new(
                    ErrorClass::CommandNotFound,
                    format!("The command {name} has not been found"),
                ));
            }
        };
        if oob && !command.allow_oob {
            return Err(Error::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        let args = match &command.args {
            // QEMU's `'gen': false` commands check nothing here: the handler takes the
            // arguments as they came.
            Some(_) if command.open_args => arguments.as_dict().cloned().unwrap_or_default(),
            Some(ty) => check_object(schema(), ty, arguments, Mode::Strict)?,
            None => match arguments
                .as_dict()
                .and_then(|d| d.iter_visitor_order().first().map(|(k, _)| *k))
            {
                Some(extra) => {
                    return Err(Error::generic(format!("Parameter '{extra}' is unexpected")));
                }
                None => QDict::new(),
            },
        };
        if name == "qmp_capabilities" {
            return self.qmp_capabilities(session, &Args::new(args));
        }
        let run = self.commands.run(name, Args::new(args));
        in_session(session.passed_fds.clone(), self.named_fds.clone(), run).await
    }

    fn qmp_capabilities(&self, session: &Session, args: &Args) -> Result<QObject, Error> {
        if session.command_mode.get() {
            return Err(Error::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let requested: Vec<&str> = args
            .get("enable")
            .and_then(QObject::as_list)
            .unwrap_or(&[])
            .iter()
            .filter_map(QObject::as_str)
            .collect();
        let unavailable: Vec<&str> = requested
            .iter()
            .copied()
            .filter(|c| !(*c == "oob" && self.options.oob_offered))
            .collect();
        if !unavailable.is_empty() {
            return Err(Error::generic(format!(
                "Capability {} not available",
                unavailable.join(", ")
            )));
        }
        session.oob.set(requested.contains(&"oob"));
        session.command_mode.set(true);
        self.events.subscribe(&session.outbox);
        Ok(QDict::new().into())
    }
}

/// `exec-oob` without `execute`: QEMU runs such requests at once, whatever the session state.
fn is_oob_request(d: &QDict) -> bool {
    d.contains_key("exec-oob") && !d.contains_key("execute")
}

/// QEMU's checks of a request's members, in its hash order: the command name and whether it
/// came as `exec-oob`.
fn check_request(dict: &QDict, oob_enabled: bool) -> Result<(&str, bool), Error> {
    let mut exec_key: Option<&str> = None;
    for (key, value) in dict.iter_qemu_order() {
        match key {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                if value.as_str().is_none() {
                    return Err(Error::generic(format!(
                        "QMP input member '{key}' must be a string"
                    )));
                }
                if let Some(first) = exec_key {
                    return Err(Error::generic(format!(
                        "QMP input member '{key}' clashes with '{first}'"
                    )));
                }
                exec_key = Some(key);
            }
            "arguments" => {
                if value.as_dict().is_none() {
                    return Err(Error::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            _ => {
                return Err(Error::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )));
            }
        }
    }
    let key = exec_key.ok_or_else(|| Error::generic("QMP input lacks member 'execute'"))?;
    let name = dict.get(key).and_then(QObject::as_str).unwrap_or_default();
    Ok((name, key == "exec-oob"))
}
