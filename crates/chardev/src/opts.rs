//! `--chardev` options (QEMU's QemuOpts syntax) turned into a `ChardevBackend`.
//!
//! As in QEMU, every option is checked against one table for all backends (an option another
//! backend uses is accepted and ignored), then the id, then the backend's own needs.

use crate::error::{Error, Result};
use ferrite_qapi::qemu_opts;
use ferrite_qobject::{QDict, QObject};

/// A parsed `--chardev`.
#[derive(Debug)]
pub enum ChardevOpts {
    /// A chardev to make.
    Create(ChardevSpec),
    /// `--chardev help`: the backends, as QEMU lists them.
    BackendHelp(String),
    /// `--chardev ...,help`: the options, as QEMU lists them.
    OptionHelp(String),
}

/// A chardev to make: its id, its `ChardevBackend` (unchecked), whether startup must wait for a
/// client (`server=on` with `wait` left on), and `mux=on`.
#[derive(Debug)]
pub struct ChardevSpec {
    /// The chardev id.
    pub id: String,
    /// The backend description, in `chardev-add`'s form.
    pub backend: QDict,
    /// Whether a listening socket must get its first client before startup continues.
    pub wait: bool,
    /// `mux=on`: the backend is made as `<id>-base` and a multiplexer named `id` put over it.
    pub mux: bool,
}

use qemu_opts::OptType as Kind;

/// QEMU's `qemu_chardev_opts`: every option any backend takes.
const KEYS: &[(&str, Kind)] = &[
    ("backend", Kind::Str),
    ("path", Kind::Str),
    ("input-path", Kind::Str),
    ("host", Kind::Str),
    ("port", Kind::Str),
    ("fd", Kind::Str),
    ("localaddr", Kind::Str),
    ("localport", Kind::Str),
    ("to", Kind::Number),
    ("ipv4", Kind::Bool),
    ("ipv6", Kind::Bool),
    ("wait", Kind::Bool),
    ("server", Kind::Bool),
    ("delay", Kind::Bool),
    ("nodelay", Kind::Bool),
    ("reconnect", Kind::Number),
    ("reconnect-ms", Kind::Number),
    ("telnet", Kind::Bool),
    ("tn3270", Kind::Bool),
    ("tls-creds", Kind::Str),
    ("tls-authz", Kind::Str),
    ("websocket", Kind::Bool),
    ("width", Kind::Number),
    ("height", Kind::Number),
    ("cols", Kind::Number),
    ("rows", Kind::Number),
    ("mux", Kind::Bool),
    ("signal", Kind::Bool),
    ("name", Kind::Str),
    ("debug", Kind::Number),
    ("size", Kind::Size),
    ("chardev", Kind::Str),
    ("chardevs.0", Kind::Str),
    ("chardevs.1", Kind::Str),
    ("chardevs.2", Kind::Str),
    ("chardevs.3", Kind::Str),
    ("append", Kind::Bool),
    ("logfile", Kind::Str),
    ("logappend", Kind::Bool),
    ("mouse", Kind::Bool),
    ("clipboard", Kind::Bool),
    ("tight", Kind::Bool),
    ("abstract", Kind::Bool),
];

/// The backends a storage daemon has, in the order `--chardev help` lists them (QEMU walks
/// a hash table of its types; this is the order that gives for these names).
const BACKEND_HELP_ORDER: &[&str] = &[
    "pty", "file", "udp", "memory", "stdio", "socket", "ringbuf", "null", "parallel", "pipe",
    "mux", "serial", "hub",
];

/// The same backends in the order `query-chardev-backends` lists them (another walk of
/// QEMU's types).
pub(crate) const QUERY_ORDER: &[&str] = &[
    "hub", "serial", "mux", "pipe", "parallel", "null", "ringbuf", "socket", "stdio", "memory",
    "udp", "file", "pty",
];

/// Whether `--chardev NAME` has a driver (the other `ChardevBackendKind`s are refused as
/// QEMU's storage daemon refuses them).
pub(crate) fn has_driver(name: &str) -> bool {
    BACKEND_HELP_ORDER.contains(&name)
}

fn backend_help() -> String {
    let mut text = String::from("Available chardev backend types: \n");
    for name in BACKEND_HELP_ORDER {
        text.push_str(&format!("  {name}\n"));
    }
    text
}

fn option_help() -> String {
    let mut lines: Vec<String> = KEYS
        .iter()
        .map(|(name, kind)| {
            let ty = match kind {
                Kind::Str => "str",
                Kind::Number => "num",
                Kind::Bool => "bool (on/off)",
                Kind::Size => "size",
            };
            format!("  {name}=<{ty}>\n")
        })
        .collect();
    lines.sort();
    format!("chardev options:\n{}", lines.concat())
}

/// The options after QemuOpts' checks: the last value of each key wins.
struct Opts(Vec<(String, String)>);

impl Opts {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A non-empty string option.
    fn nonempty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    fn flag(&self, key: &str) -> Option<bool> {
        // Checked when parsed.
        self.get(key)
            .map(|v| qemu_opts::boolean(v).unwrap_or(false))
    }

    fn number(&self, key: &str) -> Option<i64> {
        self.get(key)
            .map(|v| qemu_opts::number(v).map_or(0, |n| n as i64))
    }

    /// Copies boolean `opt` into `data` as `member`.
    fn copy_flag(&self, data: &mut QDict, opt: &str, member: &str) {
        if let Some(b) = self.flag(opt) {
            data.insert(member, b);
        }
    }
}

/// Translates `--chardev` text into a `ChardevBackend`.
///
/// # Errors
/// QEMU's texts for an unknown backend, a missing id and unknown or ill-typed options.
pub fn backend_from_opts(text: &str) -> Result<ChardevOpts> {
    parse(text, &mut Vec::new())
}

/// The warnings QEMU prints while it parses `--chardev` text (deprecated spellings), up to
/// the option that fails, if one does.
pub fn deprecations(text: &str) -> Vec<String> {
    let mut warnings = Vec::new();
    let _ = parse(text, &mut warnings);
    warnings
}

fn parse(text: &str, warnings: &mut Vec<String>) -> Result<ChardevOpts> {
    let mut items = ferrite_qapi::qemu_opts::split(text).into_iter();
    let mut opts: Vec<(String, String)> = Vec::new();
    let mut help = false;
    if let Some((first, value)) = items.next() {
        match value {
            None if first == "help" || first == "?" => {
                return Ok(ChardevOpts::BackendHelp(backend_help()));
            }
            None => opts.push(("backend".into(), first)),
            Some(v) => opts.push((first, v)),
        }
    }
    for (key, value) in items {
        let (key, value) = match value {
            Some(v) => (key, v),
            None if key == "help" || key == "?" => {
                help = true;
                continue;
            }
            // A bare key is a boolean, `noKEY` one that is off: deprecated spellings.
            None => {
                let (name, v, warning) = ferrite_qapi::qemu_opts::short_form_boolean(&key);
                warnings.push(warning);
                (name, v.to_owned())
            }
        };
        if key != "id" {
            let Some(&(_, kind)) = KEYS.iter().find(|(k, _)| *k == key) else {
                return Err(Error::InvalidParameter(key));
            };
            qemu_opts::check(&key, kind, &value)?;
        }
        opts.push((key, value));
    }
    if help {
        return Ok(ChardevOpts::OptionHelp(option_help()));
    }
    let opts = Opts(opts);
    let id = opts.get("id").ok_or(Error::NoId)?.to_owned();
    let backend = opts
        .get("backend")
        .ok_or_else(|| Error::BackendMissing(id.clone()))?
        .to_owned();
    if !has_driver(&backend) {
        return Err(Error::UnknownBackend(backend));
    }
    let mut data = QDict::new();
    if let Some(log) = opts.get("logfile") {
        data.insert("logfile", log);
    }
    opts.copy_flag(&mut data, "logappend", "logappend");
    let mut wait = false;
    match backend.as_str() {
        "socket" => wait = socket(&opts, &mut data)?,
        "udp" => udp(&opts, &mut data)?,
        "file" => {
            data.insert("out", opts.nonempty("path").ok_or(Error::NoFilename)?);
            if let Some(p) = opts.get("input-path") {
                data.insert("in", p);
            }
            opts.copy_flag(&mut data, "append", "append");
        }
        "pipe" => data.insert("device", opts.nonempty("path").ok_or(Error::NoPipePath)?),
        "serial" => data.insert("device", opts.nonempty("path").ok_or(Error::NoSerialPath)?),
        "parallel" => data.insert(
            "device",
            opts.nonempty("path").ok_or(Error::NoParallelPath)?,
        ),
        "pty" => {
            if let Some(p) = opts.get("path") {
                data.insert("path", p);
            }
        }
        "stdio" => opts.copy_flag(&mut data, "signal", "signal"),
        "ringbuf" | "memory" => {
            if let Some(size) = opts.get("size").and_then(ferrite_qapi::visit::parse_size) {
                data.insert("size", size as i64);
            }
        }
        "mux" => data.insert("chardev", opts.nonempty("chardev").ok_or(Error::NoMuxBase)?),
        "hub" => {
            let members: Vec<QObject> = (0..4)
                .map_while(|i| opts.get(&format!("chardevs.{i}")))
                .map(QObject::from)
                .collect();
            if members.is_empty() {
                return Err(Error::HubEmpty);
            }
            data.insert("chardevs", QObject::List(members));
        }
        _ => {}
    }
    let backend = QDict::new()
        .with("type", QObject::from(backend))
        .with("data", data);
    Ok(ChardevOpts::Create(ChardevSpec {
        id,
        backend,
        wait,
        mux: opts.flag("mux").unwrap_or(false),
    }))
}

/// `socket`'s options; whether startup waits for a first client.
fn socket(opts: &Opts, data: &mut QDict) -> Result<bool> {
    let server = opts.flag("server").unwrap_or(false);
    let wait = server && opts.flag("wait").unwrap_or(true);
    let addr = if let Some(path) = opts.get("path") {
        let mut u = QDict::new().with("path", path);
        opts.copy_flag(&mut u, "abstract", "abstract");
        opts.copy_flag(&mut u, "tight", "tight");
        QDict::new().with("type", "unix").with("data", u)
    } else if opts.get("host").is_some() || opts.get("port").is_some() {
        let port = opts.get("port").ok_or(Error::NoPort)?;
        let mut i = QDict::new()
            .with("host", opts.get("host").unwrap_or(""))
            .with("port", port);
        if let Some(to) = opts.number("to") {
            i.insert("to", to);
        }
        opts.copy_flag(&mut i, "ipv4", "ipv4");
        opts.copy_flag(&mut i, "ipv6", "ipv6");
        QDict::new().with("type", "inet").with("data", i)
    } else {
        QDict::new().with("type", "fd").with(
            "data",
            QDict::new().with("str", opts.get("fd").unwrap_or("")),
        )
    };
    data.insert("addr", addr);
    data.insert("server", server);
    // Given, or a server's (whose default differs from QMP's): a client refuses it.
    if let Some(w) = opts.flag("wait").or(server.then_some(true)) {
        data.insert("wait", w);
    }
    if let Some(d) = opts.flag("delay") {
        data.insert("nodelay", !d);
    }
    opts.copy_flag(data, "nodelay", "nodelay");
    opts.copy_flag(data, "telnet", "telnet");
    opts.copy_flag(data, "tn3270", "tn3270");
    opts.copy_flag(data, "websocket", "websocket");
    for key in ["reconnect", "reconnect-ms"] {
        if let Some(n) = opts.number(key) {
            data.insert(key, n);
        }
    }
    for key in ["tls-creds", "tls-authz"] {
        if let Some(v) = opts.get(key) {
            data.insert(key, v);
        }
    }
    Ok(wait)
}

/// `udp`'s options: the remote `host` (default `localhost`) and `port`, and a local address
/// when `localaddr` or `localport` is given.
fn udp(opts: &Opts, data: &mut QDict) -> Result<()> {
    let port = opts.nonempty("port").ok_or(Error::NoUdpPort)?;
    let mut remote = QDict::new()
        .with("host", opts.nonempty("host").unwrap_or("localhost"))
        .with("port", port);
    opts.copy_flag(&mut remote, "ipv4", "ipv4");
    opts.copy_flag(&mut remote, "ipv6", "ipv6");
    data.insert(
        "remote",
        QDict::new().with("type", "inet").with("data", remote),
    );
    let (localaddr, localport) = (opts.nonempty("localaddr"), opts.nonempty("localport"));
    if localaddr.is_some() || localport.is_some() {
        let local = QDict::new()
            .with("host", localaddr.unwrap_or(""))
            .with("port", localport.unwrap_or("0"));
        data.insert(
            "local",
            QDict::new().with("type", "inet").with("data", local),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_qobject::to_json;

    fn spec(text: &str) -> ChardevSpec {
        match backend_from_opts(text).unwrap() {
            ChardevOpts::Create(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn socket_server_defaults_to_wait() {
        assert!(spec("socket,id=c,path=/tmp/s,server=on").wait);
        let o = spec("socket,id=c,path=/tmp/s,server=on,wait=off");
        assert!(!o.wait);
        assert_eq!(o.id, "c");
    }

    #[test]
    fn short_form_booleans_warn() {
        let text = "socket,id=c,path=/tmp/s,server,nowait";
        assert!(!spec(text).wait);
        assert_eq!(
            deprecations(text),
            [
                "short-form boolean option 'server' deprecated\nPlease use server=on instead",
                "short-form boolean option 'nowait' deprecated\nPlease use wait=off instead"
            ]
        );
        // Up to the option that fails.
        assert_eq!(deprecations("null,id=c,nobogus,path").len(), 1);
    }

    #[test]
    fn errors_match_qemu() {
        let e = |t: &str| backend_from_opts(t).unwrap_err().to_string();
        assert_eq!(e("nope,id=c"), "'nope' is not a valid char driver name");
        assert_eq!(e("vc,id=c"), "'vc' is not a valid char driver name");
        assert_eq!(e("nope"), "chardev: no id specified");
        assert_eq!(e("id=x"), "chardev: \"x\" missing backend");
        assert_eq!(e("nope,id=c,bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(e("null,id=c,nobogus"), "Invalid parameter 'bogus'");
        assert_eq!(
            e("null,id=c,keep-alive=on"),
            "Invalid parameter 'keep-alive'"
        );
        assert_eq!(
            e("nope,server=maybe"),
            "Parameter 'server' expects 'on' or 'off'"
        );
        assert_eq!(e("null,id=c,to=x"), "Parameter 'to' expects a number");
        assert_eq!(
            e("null,id=c,to=18446744073709551616"),
            "Value '18446744073709551616' is too large for parameter 'to'"
        );
        assert_eq!(
            e("serial,id=c"),
            "chardev: serial/tty: no device path given"
        );
        assert_eq!(
            e("parallel,id=c"),
            "chardev: parallel: no device path given"
        );
        assert_eq!(
            e("udp,id=c,host=h"),
            "chardev: udp: remote port not specified"
        );
        assert_eq!(e("mux,id=c"), "chardev: mux: no chardev given");
        assert_eq!(
            e("hub,id=c,chardevs.1=a"),
            "hub: 'chardevs' list is not defined"
        );
    }

    #[test]
    fn options_of_other_backends_are_accepted() {
        assert!(
            spec("null,id=x,path=/p,to=0x10,size=1k")
                .backend
                .get("data")
                .is_some()
        );
    }

    #[test]
    fn udp_and_hub() {
        let o = spec("udp,id=u,port=5555,localport=7");
        assert_eq!(
            to_json(&QObject::Dict(o.backend)),
            r#"{"type": "udp", "data": {"remote": {"type": "inet", "data": {"port": "5555", "host": "localhost"}}, "local": {"type": "inet", "data": {"port": "7", "host": ""}}}}"#
        );
        let o = spec("hub,id=h,chardevs.0=a,chardevs.2=b");
        assert!(to_json(&QObject::Dict(o.backend)).contains(r#""chardevs": ["a"]"#));
    }

    #[test]
    fn help() {
        assert!(matches!(
            backend_from_opts("help,id=x").unwrap(),
            ChardevOpts::BackendHelp(t) if t.starts_with("Available chardev backend types: \n  pty\n")
        ));
        assert!(matches!(
            backend_from_opts("pty,help").unwrap(),
            ChardevOpts::OptionHelp(t) if t.contains("  reconnect-ms=<num>\n  reconnect=<num>\n")
        ));
    }

    #[test]
    fn commas_escape() {
        let o = spec("file,id=f,path=/tmp/a,,b");
        assert!(to_json(&QObject::Dict(o.backend)).contains("/tmp/a,b"));
    }
}
