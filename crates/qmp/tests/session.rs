//! Sessions over in-memory streams: event delivery, ordering and out-of-band overtaking.

use ferrite_qapi::{Args, Error};
use ferrite_qmp::{CommandFuture, Commands, Event, EventBus, Monitor, MonitorOptions};
use ferrite_qobject::{QDict, QObject, from_json};
use std::rc::Rc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::Notify;

/// `query-version` emits an event, then returns; `quit` blocks until released.
struct Fake {
    events: Rc<EventBus>,
    release: Rc<Notify>,
}

impl Commands for Fake {
    fn run<'a>(&'a self, name: &'a str, _args: Args) -> CommandFuture<'a> {
        Box::pin(async move {
            match name {
                "query-version" => {
                    self.events.emit(Event {
                        name: "TEST_EVENT",
                        data: Some(QDict::new().with("n", 1i64)),
                    });
                    Ok(QObject::Dict(QDict::new()))
                }
                "quit" => {
                    self.release.notified().await;
                    Ok(QObject::Dict(QDict::new()))
                }
                _ => Err(Error::generic("unexpected")),
            }
        })
    }
}

struct Client {
    rd: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    wr: tokio::io::WriteHalf<DuplexStream>,
}

impl Client {
    async fn send(&mut self, s: &str) {
        self.wr.write_all(s.as_bytes()).await.unwrap();
    }
    async fn recv(&mut self) -> QObject {
        let mut line = String::new();
        self.rd.read_line(&mut line).await.unwrap();
        assert!(line.ends_with("\r\n"), "{line:?}");
        from_json(line.trim_end()).unwrap()
    }
}

fn start(monitor: &Rc<Monitor>) -> Client {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(theirs);
    let m = monitor.clone();
    tokio::task::spawn_local(async move { m.serve(Box::pin(r), Box::pin(w)).await });
    let (cr, cw) = tokio::io::split(ours);
    Client {
        rd: BufReader::new(cr),
        wr: cw,
    }
}

fn setup() -> (Rc<Monitor>, Rc<EventBus>, Rc<Notify>) {
    let events = EventBus::new();
    let release = Rc::new(Notify::new());
    let cmds = Rc::new(Fake {
        events: events.clone(),
        release: release.clone(),
    });
    let version = from_json(r#"{"qemu":{"major":10,"minor":0,"micro":2},"package":"t"}"#).unwrap();
    let monitor = Monitor::new(
        cmds,
        events.clone(),
        version,
        MonitorOptions {
            pretty: false,
            oob_offered: true,
        },
    );
    (monitor, events, release)
}

fn get<'a>(v: &'a QObject, key: &str) -> Option<&'a QObject> {
    v.as_dict().and_then(|d| d.get(key))
}

#[tokio::test(flavor = "current_thread")]
async fn events_reach_command_mode_sessions_only_and_precede_the_reply() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (monitor, _events, _release) = setup();
            let mut a = start(&monitor);
            let mut b = start(&monitor);
            a.recv().await; // greetings
            b.recv().await;
            a.send(r#"{"execute":"qmp_capabilities"}"#).await;
            assert_eq!(a.recv().await, from_json(r#"{"return":{}}"#).unwrap());
            a.send(r#"{"execute":"query-version","id":7}"#).await;
            let ev = a.recv().await;
            assert_eq!(
                get(&ev, "event").and_then(QObject::as_str),
                Some("TEST_EVENT")
            );
            let ts = get(&ev, "timestamp").and_then(QObject::as_dict).unwrap();
            assert!(ts.get("seconds").and_then(QObject::as_i64).unwrap() > 1_600_000_000);
            assert!(
                (0..1_000_000).contains(&ts.get("microseconds").and_then(QObject::as_i64).unwrap())
            );
            let rsp = a.recv().await;
            assert_eq!(get(&rsp, "id"), Some(&QObject::Int(7)));
            // b is still negotiating: it gets no event, only its own error reply.
            b.send(r#"{"execute":"query-version"}"#).await;
            let rsp = b.recv().await;
            assert!(get(&rsp, "error").is_some(), "{rsp:?}");
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn exec_oob_overtakes_a_running_in_band_command() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (monitor, _events, release) = setup();
            let mut a = start(&monitor);
            a.recv().await;
            a.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
                .await;
            a.recv().await;
            a.send(r#"{"execute":"quit","id":"slow"}{"exec-oob":"query-version","id":"fast"}"#)
                .await;
            // The oob request is answered (refused: no command allows oob) while quit waits.
            let first = a.recv().await;
            assert_eq!(get(&first, "id").and_then(QObject::as_str), Some("fast"));
            release.notify_one();
            let second = a.recv().await;
            assert_eq!(get(&second, "id").and_then(QObject::as_str), Some("slow"));
        })
        .await;
}
