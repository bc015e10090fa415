//! `--chardev` options (QEMU's QemuOpts syntax) turned into a `ChardevBackend`.

use crate::error::{Error, Result};
use ferrite_qobject::{QDict, QObject};

/// A parsed `--chardev`: its id, its `ChardevBackend` (unchecked), and whether startup must
/// wait for a client (`server=on` with `wait` left on).
#[derive(Debug)]
pub struct ChardevOpts {
    /// The chardev id.
    pub id: String,
    /// The backend description, in `chardev-add`'s form.
    pub backend: QDict,
    /// Whether a listening socket must get its first client before startup continues.
    pub wait: bool,
}

const COMMON_KEYS: &[&str] = &["id", "backend", "logfile", "logappend", "mux"];

fn keys_for(backend: &str) -> Option<&'static [&'static str]> {
    Some(match backend {
        "socket" => &[
            "path",
            "host",
            "port",
            "fd",
            "to",
            "ipv4",
            "ipv6",
            "server",
            "wait",
            "delay",
            "nodelay",
            "telnet",
            "tn3270",
            "websocket",
            "reconnect",
            "reconnect-ms",
            "tls-creds",
            "tls-authz",
            "abstract",
            "tight",
            "keep-alive",
        ],
        "file" => &["path", "input-path", "append"],
        "pipe" => &["path"],
        "stdio" => &["signal"],
        "ringbuf" | "memory" => &["size"],
        "null" => &[],
        _ => return None,
    })
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Error::ExpectsBool(key.to_owned())),
    }
}

/// Splits QemuOpts text: `backend,key=value,flag,...` with `,,` for a literal comma.
fn split_opts(text: &str) -> Vec<(String, Option<String>)> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    let mut parts = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    for p in parts {
        match p.split_once('=') {
            Some((k, v)) => items.push((k.to_owned(), Some(v.to_owned()))),
            None => items.push((p, None)),
        }
    }
    items
}

/// Translates `--chardev` text into a `ChardevBackend`.
///
/// # Errors
/// QEMU's texts for an unknown backend, a missing id and unknown or ill-typed options.
pub fn backend_from_opts(text: &str) -> Result<ChardevOpts> {
    let mut items = split_opts(text).into_iter();
    let mut opts: Vec<(String, String)> = Vec::new();
    if let Some((first, value)) = items.next() {
        match value {
            None => opts.push(("backend".into(), first)),
            Some(v) => opts.push((first, v)),
        }
    }
    for (k, v) in items {
        // A bare key is a boolean flag set to on.
        opts.push((k, v.unwrap_or_else(|| "on".into())));
    }
    let get = |k: &str| {
        opts.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let backend = get("backend").ok_or(Error::BackendMissing)?.to_owned();
    let allowed = keys_for(&backend).ok_or_else(|| Error::UnknownBackend(backend.clone()))?;
    if let Some((bad, _)) = opts
        .iter()
        .find(|(k, _)| !COMMON_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()))
    {
        return Err(Error::InvalidParameter(bad.clone()));
    }
    let id = get("id").ok_or(Error::NoId)?.to_owned();
    if get("mux").map(|v| parse_bool("mux", v)).transpose()? == Some(true) {
        return Err(Error::MuxUnsupported);
    }
    let mut data = QDict::new();
    let flag = |data: &mut QDict, opt: &str, member: &str| -> Result<()> {
        if let Some(v) = get(opt) {
            data.insert(member, parse_bool(opt, v)?);
        }
        Ok(())
    };
    if let Some(log) = get("logfile") {
        data.insert("logfile", log);
    }
    flag(&mut data, "logappend", "logappend")?;
    let mut wait = false;
    match backend.as_str() {
        "socket" => {
            let server = get("server").map(|v| parse_bool("server", v)).transpose()?;
            let server = server.unwrap_or(false);
            wait = server
                && get("wait")
                    .map(|v| parse_bool("wait", v))
                    .transpose()?
                    .unwrap_or(true);
            let addr = if let Some(path) = get("path") {
                let mut u = QDict::new().with("path", path);
                flag(&mut u, "abstract", "abstract")?;
                flag(&mut u, "tight", "tight")?;
                QDict::new().with("type", "unix").with("data", u)
            } else if get("host").is_some() || get("port").is_some() {
                let port = get("port").ok_or(Error::NoPort)?;
                let mut i = QDict::new()
                    .with("host", get("host").unwrap_or(""))
                    .with("port", port);
                if let Some(to) = get("to") {
                    let to: i64 = to.parse().map_err(|_| Error::ExpectsNumber("to".into()))?;
                    i.insert("to", to);
                }
                flag(&mut i, "ipv4", "ipv4")?;
                flag(&mut i, "ipv6", "ipv6")?;
                flag(&mut i, "keep-alive", "keep-alive")?;
                QDict::new().with("type", "inet").with("data", i)
            } else {
                QDict::new()
                    .with("type", "fd")
                    .with("data", QDict::new().with("str", get("fd").unwrap_or("")))
            };
            data.insert("addr", addr);
            data.insert("server", server);
            data.insert("wait", wait);
            if let Some(d) = get("delay") {
                data.insert("nodelay", !parse_bool("delay", d)?);
            }
            flag(&mut data, "nodelay", "nodelay")?;
            flag(&mut data, "telnet", "telnet")?;
            flag(&mut data, "tn3270", "tn3270")?;
            flag(&mut data, "websocket", "websocket")?;
            for key in ["reconnect", "reconnect-ms"] {
                if let Some(v) = get(key) {
                    let n: i64 = v
                        .parse()
                        .map_err(|_| Error::ExpectsNumber(key.to_owned()))?;
                    data.insert(key, n);
                }
            }
            for key in ["tls-creds", "tls-authz"] {
                if let Some(v) = get(key) {
                    data.insert(key, v);
                }
            }
        }
        "file" => {
            let path = get("path").ok_or(Error::NoFilename)?;
            data.insert("out", path);
            if let Some(p) = get("input-path") {
                data.insert("in", p);
            }
            flag(&mut data, "append", "append")?;
        }
        "pipe" => {
            let path = get("path").ok_or(Error::NoPipePath)?;
            data.insert("device", path);
        }
        "stdio" => flag(&mut data, "signal", "signal")?,
        "ringbuf" | "memory" => {
            if let Some(size) = get("size") {
                let size = ferrite_qapi::visit::parse_size(size)
                    .and_then(|s| i64::try_from(s).ok())
                    .ok_or_else(|| Error::ExpectsSize("size".into()))?;
                data.insert("size", size);
            }
        }
        _ => {}
    }
    let backend = QDict::new()
        .with("type", QObject::from(backend))
        .with("data", data);
    Ok(ChardevOpts { id, backend, wait })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_qobject::to_json;

    #[test]
    fn socket_server_defaults_to_wait() {
        let o = backend_from_opts("socket,id=c,path=/tmp/s,server=on").unwrap();
        assert!(o.wait);
        let o = backend_from_opts("socket,id=c,path=/tmp/s,server,wait=off").unwrap();
        assert!(!o.wait);
        assert_eq!(o.id, "c");
    }

    #[test]
    fn errors_match_qemu() {
        let e = |t: &str| backend_from_opts(t).unwrap_err().to_string();
        assert_eq!(e("nope,id=c"), "'nope' is not a valid char driver name");
        assert_eq!(e("null"), "chardev: no id specified");
        assert_eq!(e("null,id=c,bogus=1"), "Invalid parameter 'bogus'");
        assert_eq!(
            e("socket,id=c,server=maybe"),
            "Parameter 'server' expects 'on' or 'off'"
        );
    }

    #[test]
    fn commas_escape() {
        let o = backend_from_opts("file,id=f,path=/tmp/a,,b").unwrap();
        assert!(to_json(&QObject::Dict(o.backend)).contains("/tmp/a,b"));
    }
}
