//! Where a relative file name an image records (its backing file) points.

use crate::error::{Error, Result};
use ferrite_qobject::{QDict, QObject};

/// `json:{...}` options as a tree: dotted keys (`file.filename`) become nested dicts, as
/// QEMU's `qdict_crumple` makes them. `None` when the text is not a JSON object.
fn json_options(text: &str) -> Option<QDict> {
    let QObject::Dict(flat) = ferrite_qobject::from_json(text).ok()? else {
        return None;
    };
    let mut out = QDict::new();
    for (key, value) in flat {
        let value = match value {
            QObject::Dict(d) => {
                QObject::Dict(json_options(&ferrite_qobject::to_json(&QObject::Dict(d)))?)
            }
            v => v,
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop()?;
        let mut at = &mut out;
        for p in parts {
            if !matches!(at.get(p), Some(QObject::Dict(_))) {
                at.insert(p, QDict::new());
            }
            let Some(QObject::Dict(next)) = at.get_mut(p) else {
                return None;
            };
            at = next;
        }
        at.insert(last, value);
    }
    Some(out)
}

/// The host device driver QEMU finds for a name before any prefix (its
/// `find_hdev_driver`): `host_cdrom` for a block device that answers the CD-ROM status
/// request, `host_device` for any other block or character device and for names under
/// `/dev/cdrom`.
fn host_device_driver(name: &str) -> Option<&'static str> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(name)
        && file
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
        && cdrom_answers(&file)
    {
        return Some("host_cdrom");
    }
    let device = std::fs::metadata(name).is_ok_and(|m| {
        let t = m.file_type();
        t.is_block_device() || t.is_char_device()
    });
    (device || name.starts_with("/dev/cdrom")).then_some("host_device")
}

/// Whether the block device answers Linux's `CDROM_DRIVE_STATUS`.
fn cdrom_answers(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    const CDROM_DRIVE_STATUS: libc::c_ulong = 0x5326;
    const CDSL_CURRENT: libc::c_int = libc::c_int::MAX;
    // SAFETY: the descriptor is open for the call; this request takes an integer argument
    // and writes no memory.
    unsafe { libc::ioctl(file.as_raw_fd(), CDROM_DRIVE_STATUS, CDSL_CURRENT) >= 0 }
}

/// The options of the protocol node a file name stands for: `json:{...}` says them all,
/// `blkdebug:CONFIG:IMAGE` is a blkdebug node over the image's file, `blkverify:RAW:TEST` a
/// blkverify node over both (the image under test by name only), a host device or CD-ROM
/// drive a `host_device` or `host_cdrom` node, `http://...`,
/// `https://...`, `ftp://...` and `ftps://...` a node of that driver, `null-co://` a null node, `file:PATH` a file, anything else a file (QEMU's protocol prefixes, for those
/// ferrite has).
pub fn protocol_options(name: &str) -> QDict {
    if let Some(mut d) = name.strip_prefix("json:").and_then(json_options) {
        // A file name alone names a file (QEMU finds the protocol from the name).
        if d.get("driver").is_none() && d.get("filename").is_some() {
            d.insert("driver", "file");
        }
        return d;
    }
    if let Some(driver) = host_device_driver(name) {
        return QDict::new().with("driver", driver).with("filename", name);
    }
    if matches!(
        name.split_once(':'),
        Some(("nbd" | "nbd+tcp" | "nbd+unix", _))
    ) {
        // A name that is no NBD address is left for the driver to refuse with QEMU's text.
        return nbd_parse_filename(name)
            .unwrap_or_else(|_| QDict::new().with("driver", "nbd").with("filename", name));
    }
    if name.starts_with("ssh:") {
        // A name that is no ssh URL is left for the driver to refuse with QEMU's text.
        return match ssh_url(name) {
            Ok(Some(d)) => d,
            _ => QDict::new().with("driver", "ssh").with("filename", name),
        };
    }
    if let Some(d) = vvfat_options(name) {
        return d;
    }
    if let Some(d) = iscsi_options(name) {
        return d;
    }
    if name.starts_with("nfs:") {
        // A name that is no NFS URL is left for the driver to refuse with QEMU's text.
        return nfs_url(name)
            .unwrap_or_else(|_| QDict::new().with("driver", "nfs").with("filename", name));
    }
    // URLs name the nodes of QEMU's curl drivers by their prefix.
    for driver in ["http", "https", "ftp", "ftps"] {
        if name
            .strip_prefix(driver)
            .is_some_and(|r| r.starts_with(':'))
        {
            return QDict::new().with("driver", driver).with("url", name);
        }
    }
    if name == "null-co://" || name == "null-aio://" {
        return QDict::new().with("driver", name.trim_end_matches("://"));
    }
    // `file:PATH` (and the host device prefixes) name the protocol outright.
    for driver in ["file", "host_device", "host_cdrom"] {
        if let Some(path) = name.strip_prefix(driver).and_then(|r| r.strip_prefix(':')) {
            return QDict::new().with("driver", driver).with("filename", path);
        }
    }
    if let Some((config, image)) = name
        .strip_prefix("blkdebug:")
        .and_then(|rest| rest.split_once(':'))
    {
        let mut d = QDict::new()
            .with("driver", "blkdebug")
            .with("image", protocol_options(image));
        if !config.is_empty() {
            d.insert("config", config);
        }
        return d;
    }
    // `blkverify:RAW:TEST`: the raw copy by its file name, the image under test by its
    // name too, its format probed when the node opens.
    if let Some((raw, test)) = name
        .strip_prefix("blkverify:")
        .and_then(|rest| rest.split_once(':'))
    {
        return QDict::new()
            .with("driver", "blkverify")
            .with("raw", protocol_options(raw))
            .with("test", QDict::new().with("filename", test));
    }
    QDict::new().with("driver", "file").with("filename", name)
}

/// As [`protocol_options`] where QEMU looks the name's protocol up (`bdrv_find_protocol`):
/// an image opened or created by name without its protocol as the format.
///
/// # Errors
/// "Unknown protocol 'X'" for a prefix that names none.
pub fn known_protocol_options(name: &str) -> crate::Result<QDict> {
    match unknown_protocol(name) {
        Some(protocol) => Err(crate::Error::UnknownProtocol(protocol.to_owned())),
        None => Ok(protocol_options(name)),
    }
}

/// The protocol prefix of `name` when ferrite has no such protocol (QEMU's "Unknown
/// protocol"): a name whose first `:` comes before any `/` names its protocol
/// (`foo:bar`), other names are files.
pub fn unknown_protocol(name: &str) -> Option<&str> {
    const KNOWN: [&str; 20] = [
        "file",
        "nfs",
        "iscsi",
        "iser",
        "fat",
        "ssh",
        "http",
        "https",
        "ftp",
        "ftps",
        "host_device",
        "host_cdrom",
        "nbd",
        "nbd+tcp",
        "nbd+unix",
        "null-co",
        "null-aio",
        "blkdebug",
        "blkverify",
        "json",
    ];
    let at = name.find([':', '/'])?;
    let protocol = &name[..at];
    (name[at..].starts_with(':') && !KNOWN.contains(&protocol)).then_some(protocol)
}

/// The iscsi driver's options for `iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET/LUN`
/// (and `iser://`), as libiscsi's URL parser and QEMU's `iscsi_parse_filename` make them:
/// the LUN as text, as QEMU keeps it, and defaults from a system emulator's `-iscsi`. A name that is no such URL is left for the driver to
/// refuse with QEMU's "Failed to parse URL".
fn iscsi_options(name: &str) -> Option<QDict> {
    let (transport, rest) = if let Some(r) = name.strip_prefix("iscsi://") {
        ("tcp", r)
    } else if let Some(r) = name.strip_prefix("iser://") {
        ("iser", r)
    } else {
        return None;
    };
    let refused = || QDict::new().with("driver", "iscsi").with("filename", name);
    let (portal_part, path) = match rest.split_once('/') {
        Some(p) => p,
        None => return Some(refused()),
    };
    let (user, portal) = match portal_part.rsplit_once('@') {
        Some((u, p)) => (Some(u), p),
        None => (None, portal_part),
    };
    let (target, lun) = match path.rsplit_once('/') {
        Some((t, l)) if !t.is_empty() && !portal.is_empty() => (t, l),
        _ => return Some(refused()),
    };
    let Ok(lun) = lun.parse::<u32>() else {
        return Some(refused());
    };
    let mut d = QDict::new()
        .with("driver", "iscsi")
        .with("transport", transport)
        .with("portal", portal)
        .with("target", target)
        .with("lun", lun.to_string());
    // A system emulator's `-iscsi` group fills in what is missing, its credentials
    // before the URL's.
    for (key, value) in crate::emulator::iscsi_defaults(target) {
        if d.get(&key).is_none() {
            // `-iscsi` takes the digest in upper case, the driver's option in lower.
            let value = match key.as_str() {
                "header-digest" => value.to_ascii_lowercase(),
                _ => value,
            };
            d.insert(key, value);
        }
    }
    if let Some(user) = user.filter(|u| !u.is_empty()) {
        let (u, p) = user.split_once('%').unwrap_or((user, ""));
        for (key, value) in [("user", u), ("password", p)] {
            if d.get(key).is_none() {
                d.insert(key, value);
            }
        }
    }
    Some(d)
}

/// vvfat's options for `fat:[12:|16:|32:][floppy:][rw:]DIR` (QEMU's
/// `vvfat_parse_filename`): the directory follows the last `:`, or the one before it when
/// that names a DOS drive (`fat:rw:c:/dir` is `c:/dir`).
fn vvfat_options(name: &str) -> Option<QDict> {
    name.strip_prefix("fat:")?;
    let fat_type = [32, 16, 12]
        .into_iter()
        .find(|t| name.contains(&format!(":{t}:")))
        .unwrap_or(0);
    let last = name.rfind(':')?;
    let bytes = name.as_bytes();
    let drive = bytes[last - 2] == b':' && bytes[last - 1].is_ascii_alphabetic();
    let dir = if drive {
        &name[last - 1..]
    } else {
        &name[last + 1..]
    };
    Some(
        QDict::new()
            .with("driver", "vvfat")
            .with("dir", dir)
            .with("fat-type", i64::from(fat_type))
            .with("floppy", name.contains(":floppy:"))
            .with("rw", name.contains(":rw:")),
    )
}

/// The NBD client's options for an NBD name (QEMU's `nbd_parse_filename`): a URI
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+tcp://...`, `nbd+unix:///EXPORT?socket=PATH`) or the
/// older `nbd:unix:PATH[:exportname=EXPORT]` and `nbd:HOST:PORT[:exportname=EXPORT]`.
/// `None` for anything else, or a name that does not parse (it then opens as a file, and
/// fails as one).
fn nbd_options(name: &str) -> Option<QDict> {
    let nbd = |server: QDict, export: &str| {
        let d = QDict::new().with("driver", "nbd").with("server", server);
        if export.is_empty() {
            d
        } else {
            d.with("export", export)
        }
    };
    let inet = |host: &str, port: &str| {
        QDict::new()
            .with("type", "inet")
            .with("host", host)
            .with("port", if port.is_empty() { "10809" } else { port })
    };
    let unix = |path: &str| QDict::new().with("type", "unix").with("path", path);
    if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?')?;
        let export = path.strip_prefix('/').unwrap_or(path);
        let socket = query.strip_prefix("socket=")?;
        return Some(nbd(unix(socket), export));
    }
    if let Some(rest) = name
        .strip_prefix("nbd://")
        .or_else(|| name.strip_prefix("nbd+tcp://"))
    {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, p),
            _ => (authority, ""),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        return Some(nbd(inet(host, port), export));
    }
    let rest = name.strip_prefix("nbd:")?;
    let (rest, export) = match rest.split_once(":exportname=") {
        Some((r, e)) => (r, e),
        None => (rest, ""),
    };
    if let Some(path) = rest.strip_prefix("unix:") {
        return Some(nbd(unix(path), export));
    }
    let (host, port) = rest.rsplit_once(':')?;
    Some(nbd(inet(host, port), export))
}

/// The options of an NBD node opened by file name with its driver named (QEMU's
/// `nbd_parse_filename`): `nbd:unix:PATH[:exportname=E]`, `nbd:HOST:PORT[:exportname=E]`,
/// or an `nbd://`, `nbd+tcp://` or `nbd+unix://` URL.
///
/// # Errors
/// QEMU's texts for a name that names no server.
pub fn nbd_parse_filename(name: &str) -> Result<QDict, String> {
    if name.contains("://") {
        // GLib's URL parser takes a numeric port only.
        let port_ok = name
            .split_once("://")
            .map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or(""))
            .and_then(|authority| authority.rsplit_once(':'))
            .is_none_or(|(h, p)| {
                h.ends_with(']') && !h.starts_with('[') || p.bytes().all(|b| b.is_ascii_digit())
            });
        return nbd_options(name)
            .filter(|_| port_ok)
            .ok_or_else(|| "No valid URL specified".to_owned());
    }
    let missing = || "NBD server address missing".to_owned();
    let file = match name.split_once(":exportname=") {
        // QEMU stops reading at an empty export name: no server is left.
        Some((_, "")) => return Err(missing()),
        Some((file, _)) => file,
        None => name,
    };
    let host_spec = file
        .strip_prefix("nbd:")
        .ok_or_else(|| "File name string for NBD must start with 'nbd:'".to_owned())?;
    if host_spec.is_empty() {
        return Err(missing());
    }
    nbd_options(name).ok_or_else(|| format!("error parsing address '{host_spec}'"))
}

/// A node's `server` address as QEMU's node keeps it, for its strong options: flat
/// `server.*` keys in the order QEMU inserts them (`type`, `host`, `port`, then the rest),
/// which decides the order `json:` names show keys that share a hash bucket.
pub fn flat_server(server: &QDict) -> QDict {
    let lead = ["type", "host", "port"];
    let first = lead.into_iter().filter_map(|k| Some((k, server.get(k)?)));
    let rest = server.iter().filter(|(k, _)| !lead.contains(k));
    let mut out = QDict::new();
    for (k, v) in first.chain(rest) {
        out.insert(format!("server.{k}"), v.clone());
    }
    out
}

/// The parts of a URL after `SCHEME://`, as GLib's parser splits them (nothing decoded).
struct Url<'a> {
    user: Option<&'a str>,
    /// Without an IPv6 address's brackets.
    host: &'a str,
    port: Option<&'a str>,
    path: &'a str,
    query: Option<&'a str>,
}

impl<'a> Url<'a> {
    fn parse(rest: &'a str) -> Url<'a> {
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':')),
                None => (v6, None),
            },
            None => match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            },
        };
        Url {
            user,
            host,
            port,
            path,
            query,
        }
    }
}

/// The nfs driver's options for `nfs://HOST/PATH[?uid=N&gid=N&tcp-syncnt=N&readahead=N&
/// pagecache=N&debug=N]` (QEMU's `nfs_parse_uri`: the port and user in the URL are
/// ignored, numbers in C's notations).
///
/// # Errors
/// QEMU's text for a name that is no such URL.
pub fn nfs_url(name: &str) -> std::result::Result<QDict, String> {
    let invalid = || "Invalid URI specified".to_owned();
    // A URI starts with its scheme: a name without one is none.
    let scheme = name.split_once(':').map(|(s, _)| s).filter(|s| {
        s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    let Some(scheme) = scheme else {
        return Err(invalid());
    };
    if scheme != "nfs" {
        return Err("URI scheme must be 'nfs'".to_owned());
    }
    let rest = &name[scheme.len() + 1..];
    let Some(rest) = rest.strip_prefix("//") else {
        return Err("missing hostname in URI".to_owned());
    };
    let url = Url::parse(rest);
    if url
        .port
        .is_some_and(|p| !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid());
    }
    let strict = |s: &str| strict_percent_decode(s).ok_or_else(invalid);
    let host = strict(url.host)?;
    if host.is_empty() {
        return Err("missing hostname in URI".to_owned());
    }
    let path = strict(url.path)?;
    if path.is_empty() {
        return Err("missing file path in URI".to_owned());
    }
    let mut d = QDict::new()
        .with("driver", "nfs")
        .with(
            "server",
            QDict::new().with("type", "inet").with("host", host),
        )
        .with("path", path);
    if let Some(q) = url.query {
        strict(q)?;
    }
    for param in url.query.into_iter().flat_map(|q| q.split('&')) {
        // GLib's iteration ends at a parameter without a value, and QEMU takes that end
        // as the list's: it and those after are ignored.
        let Some((name, value)) = param.split_once('=') else {
            break;
        };
        let (name, value) = (strict(name)?, strict(value)?);
        let Some((false, n)) = ferrite_qapi::visit::parse_c_integer(&value) else {
            return Err(format!("Invalid value for NFS parameter: {name}"));
        };
        let key = match name.as_str() {
            "uid" => "user",
            "gid" => "group",
            "tcp-syncnt" => "tcp-syn-count",
            "readahead" => "readahead-size",
            "pagecache" => "page-cache-size",
            "debug" => "debug",
            _ => return Err(format!("Unknown NFS parameter name: {name}")),
        };
        d.insert(key, i64::try_from(n).unwrap_or(i64::MAX));
    }
    Ok(d)
}

/// `%XX` escapes replaced by their bytes; `None` for a malformed escape or text that is
/// not UTF-8 after (GLib refuses such URLs).
fn strict_percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !ok(i + 1) || !ok(i + 2) {
                return None;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    let decoded = percent_decode(s);
    (!decoded.contains('\u{fffd}') || s.contains('\u{fffd}')).then_some(decoded)
}

/// The ssh driver's options for an `ssh://[USER@]HOST[:PORT]/PATH[?host_key_check=...]`
/// name (QEMU's `parse_uri` and its translation of `host_key_check`: `no`, `yes`,
/// `md5:HASH`, `sha1:HASH`, `sha256:HASH`). A name without a host or a path lacks the
/// option the schema then asks for.
fn ssh_options(name: &str) -> Option<QDict> {
    let rest = name.strip_prefix("ssh:")?;
    let mut d = QDict::new().with("driver", "ssh");
    let Some(rest) = rest.strip_prefix("//") else {
        return Some(d);
    };
    let Url {
        user,
        host,
        port,
        path,
        query,
    } = Url::parse(rest);
    let user = user.map(percent_decode);
    if let Some(u) = user.filter(|u| !u.is_empty()) {
        d.insert("user", u);
    }
    let port = port.filter(|p| !p.is_empty()).unwrap_or("22");
    if !host.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        d.insert(
            "server",
            QDict::new()
                .with("host", percent_decode(host))
                .with("port", port),
        );
    }
    if !path.is_empty() {
        d.insert("path", percent_decode(path));
    }
    for param in query.into_iter().flat_map(|q| q.split('&')) {
        match param.split_once('=') {
            Some(("host_key_check", v)) => {
                // A setting QEMU does not know is left for the schema to refuse.
                let check = ssh_host_key_check(v).unwrap_or_else(|_| QDict::new().with("mode", v));
                d.insert("host-key-check", check);
            }
            Some((other, _)) => {
                crate::report::warn_report(&format!("Unsupported parameter '{other}' in URI"));
            }
            None => {
                crate::report::warn_report(&format!(
                    "Failed to parse SSH URI parameters '{}'",
                    query.unwrap_or_default()
                ));
                break;
            }
        }
    }
    Some(d)
}

/// The ssh driver's options for a name given to it (QEMU's ssh `parse_uri`, through
/// GLib's URI parser): `Ok(None)` for a name that parser does not read (no scheme, a port
/// that is no number), of which QEMU says nothing and the node then lacks its server.
///
/// # Errors
/// QEMU's texts for a URL of another scheme, or without a host or a path.
pub fn ssh_url(name: &str) -> std::result::Result<Option<QDict>, String> {
    let Some((scheme, rest)) = uri_scheme(name) else {
        return Ok(None);
    };
    // GLib gives the scheme in lower case.
    if !scheme.eq_ignore_ascii_case("ssh") {
        return Err("URI scheme must be 'ssh'".to_owned());
    }
    let missing_host = || Err("missing hostname in URI".to_owned());
    let Some(after) = rest.strip_prefix("//") else {
        return missing_host();
    };
    let url = Url::parse(after);
    let port_ok = url.port.is_none_or(|p| {
        p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().map_or(p.is_empty(), |n| n <= 65535)
    });
    let (Some(host), Some(path), true) = (
        strict_percent_decode(url.host),
        strict_percent_decode(url.path),
        port_ok,
    ) else {
        return Ok(None);
    };
    if host.is_empty() {
        return missing_host();
    }
    if path.is_empty() {
        return Err("missing remote path in URI".to_owned());
    }
    Ok(ssh_options(&format!("ssh:{rest}")))
}

/// An absolute URL's scheme (RFC 3986: a letter, then letters, digits, `+`, `-` and `.`)
/// and what follows its `:`.
fn uri_scheme(name: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = name.split_once(':')?;
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    (first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some((scheme, rest))
}

/// The ssh driver's `host-key-check` for its older `host_key_check` text: `no`, `yes`,
/// `md5:HASH`, `sha1:HASH`, `sha256:HASH`.
///
/// # Errors
/// QEMU's text for any other setting.
pub fn ssh_host_key_check(text: &str) -> Result<QDict> {
    Ok(match text.split_once(':') {
        Some((kind @ ("md5" | "sha1" | "sha256"), hash)) => QDict::new()
            .with("mode", "hash")
            .with("type", kind)
            .with("hash", hash),
        _ if text == "no" => QDict::new().with("mode", "none"),
        _ if text == "yes" => QDict::new().with("mode", "known_hosts"),
        _ => {
            return Err(Error::Qapi(ferrite_qapi::Error::generic(format!(
                "unknown host_key_check setting ({text})"
            ))));
        }
    })
}

/// `%XX` escapes replaced by their bytes (a malformed one is kept as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// protocol names as they are, relative ones beside the image (QEMU's rule).
///
/// # Errors
/// A relative name in an image that has no plain file name of its own.
pub fn backing_path(image: &str, name: &str) -> Result<String> {
    if name.starts_with('/') || name.contains(':') {
        return Ok(name.to_owned());
    }
    if image.starts_with("json:") {
        return Err(Error::RelativeBackingName(image.to_owned()));
    }
    Ok(match image.rfind('/') {
        Some(i) => format!("{}/{}", &image[..i], name),
        None => name.to_owned(),
    })
}

/// The directory names relative to `node`'s image are taken from, ending in `/` (empty for
/// the working directory): that of the file under its filters and formats (QEMU's
/// `bdrv_dirname`).
///
/// # Errors
/// No file names it (the bottom node's name is not a plain path).
pub fn base_directory(node: &crate::Node) -> Result<String> {
    if let Some(child) = node.filtered().or_else(|| node.child("file")) {
        return base_directory(&child);
    }
    if let Some(why) = node.driver().base_directory_refused() {
        return Err(Error::Qapi(ferrite_qapi::Error::generic(why)));
    }
    let name = node.filename();
    if name.is_empty() || name.starts_with("json:") {
        return Err(Error::NoBaseDirectory(node.driver_name().to_owned()));
    }
    Ok(name
        .rfind('/')
        .map_or_else(String::new, |i| name[..=i].to_owned()))
}

#[cfg(test)]
mod tests {
    use super::backing_path;

    #[test]
    fn unknown_protocols_are_named_as_qemu_names_them() {
        assert_eq!(super::unknown_protocol("foo:bar"), Some("foo"));
        assert_eq!(super::unknown_protocol("/a/foo:bar"), None);
        assert_eq!(super::unknown_protocol("./foo:bar"), None);
        assert_eq!(super::unknown_protocol("file:/a"), None);
        assert_eq!(super::unknown_protocol("nbd+unix:///e?socket=/s"), None);
        assert_eq!(super::unknown_protocol("disk.img"), None);
        assert_eq!(super::unknown_protocol("https://h/x"), None);
    }

    #[test]
    fn nfs_names_open_the_nfs_driver() {
        use ferrite_qobject::{from_json, to_json};
        let j = |n: &str| to_json(&super::protocol_options(n).into());
        let canon = |t: &str| to_json(&from_json(t).expect("json"));
        assert_eq!(
            j("nfs://[::1]:2049/e/a%20b.raw?uid=010&gid=0x10&debug=2#frag"),
            canon(
                r#"{"driver": "nfs", "server": {"type": "inet", "host": "::1"}, "path": "/e/a b.raw", "user": 8, "group": 16, "debug": 2}"#
            )
        );
        // A parameter without a value ends the list (GLib's iteration stops there).
        assert_eq!(
            j("nfs://h/a?pagecache&foo=1"),
            canon(r#"{"driver": "nfs", "server": {"type": "inet", "host": "h"}, "path": "/a"}"#)
        );
        let err = |n: &str| super::nfs_url(n).unwrap_err();
        assert_eq!(err("nfs:foo"), "missing hostname in URI");
        assert_eq!(err("disk.raw"), "Invalid URI specified");
        assert_eq!(err("http://h/a"), "URI scheme must be 'nfs'");
        assert_eq!(err("nfs://h"), "missing file path in URI");
        assert_eq!(err("nfs://h:x/a"), "Invalid URI specified");
        assert_eq!(err("nfs://h/a?x=%zz"), "Invalid URI specified");
        assert_eq!(
            err("nfs://h/a?uid=-1"),
            "Invalid value for NFS parameter: uid"
        );
        assert_eq!(err("nfs://h/a?foo=1"), "Unknown NFS parameter name: foo");
        assert_eq!(
            j("nfs://h/a?foo=1"),
            canon(r#"{"driver": "nfs", "filename": "nfs://h/a?foo=1"}"#)
        );
        assert_eq!(super::unknown_protocol("nfs://h/a"), None);
    }

    #[test]
    fn fat_names_open_vvfat() {
        use ferrite_qobject::{from_json, to_json};
        let j = |n: &str| to_json(&super::protocol_options(n).into());
        let canon = |t: &str| to_json(&from_json(t).expect("json"));
        assert_eq!(
            j("fat:16:rw:/tmp/d"),
            canon(
                r#"{"driver": "vvfat", "dir": "/tmp/d", "fat-type": 16, "floppy": false, "rw": true}"#
            )
        );
        assert_eq!(
            j("fat:floppy:c:/x"),
            canon(
                r#"{"driver": "vvfat", "dir": "c:/x", "fat-type": 0, "floppy": true, "rw": false}"#
            )
        );
        assert_eq!(super::unknown_protocol("fat:/d"), None);
    }

    #[test]
    fn iscsi_names_open_the_iscsi_driver() {
        use ferrite_qobject::{from_json, to_json};
        let j = |n: &str| to_json(&super::protocol_options(n).into());
        let canon = |t: &str| to_json(&from_json(t).expect("json"));
        assert_eq!(
            j("iscsi://u%p@127.0.0.1:3270/iqn.2026-12.org.x:t/1"),
            canon(
                r#"{"driver": "iscsi", "transport": "tcp", "portal": "127.0.0.1:3270", "target": "iqn.2026-12.org.x:t", "lun": "1", "user": "u", "password": "p"}"#
            )
        );
        assert_eq!(
            j("iser://[::1]/t/0"),
            canon(
                r#"{"driver": "iscsi", "transport": "iser", "portal": "[::1]", "target": "t", "lun": "0"}"#
            )
        );
        assert_eq!(
            j("iscsi://h/t"),
            canon(r#"{"driver": "iscsi", "filename": "iscsi://h/t"}"#)
        );
        assert_eq!(super::unknown_protocol("iscsi://h/t/1"), None);
    }

    #[test]
    fn ssh_names_open_the_ssh_driver() {
        use ferrite_qobject::{from_json, to_json};
        let j = |n: &str| to_json(&super::protocol_options(n).into());
        let canon = |t: &str| to_json(&from_json(t).expect("json"));
        assert_eq!(
            j("ssh://u@h:2222/tmp/a%20b.img?host_key_check=md5:a4:25"),
            canon(
                r#"{"driver": "ssh", "user": "u", "server": {"host": "h", "port": "2222"}, "path": "/tmp/a b.img", "host-key-check": {"mode": "hash", "type": "md5", "hash": "a4:25"}}"#
            )
        );
        assert_eq!(
            j("ssh://[::1]/x?host_key_check=no"),
            canon(
                r#"{"driver": "ssh", "server": {"host": "::1", "port": "22"}, "path": "/x", "host-key-check": {"mode": "none"}}"#
            )
        );
        // Names that are no ssh URL go to the driver, which refuses them with QEMU's reason.
        for name in ["ssh://h", "ssh:///x", "ssh:x", "ssh://h:x/p"] {
            assert_eq!(
                j(name),
                canon(&format!(r#"{{"driver": "ssh", "filename": "{name}"}}"#))
            );
        }
        assert_eq!(super::unknown_protocol("ssh://h/x"), None);
    }

    #[test]
    fn names_given_to_the_ssh_driver_read_as_qemus_parse_uri() {
        let err = |n: &str| super::ssh_url(n).expect_err(n);
        assert_eq!(err("nbd:unix:/s"), "URI scheme must be 'ssh'");
        assert_eq!(err("http://h/x"), "URI scheme must be 'ssh'");
        assert_eq!(err("ssh:"), "missing hostname in URI");
        assert_eq!(err("ssh:foo"), "missing hostname in URI");
        assert_eq!(err("ssh:///p"), "missing hostname in URI");
        assert_eq!(err("ssh://h"), "missing remote path in URI");
        // What GLib's parser does not read, QEMU says nothing of.
        for unread in [
            "off",
            "1a:b",
            "ssh://h:x/p",
            "ssh://h:65536/p",
            "ssh://h/%zz",
        ] {
            assert_eq!(super::ssh_url(unread), Ok(None), "{unread}");
        }
        let ok = super::ssh_url("SSH://u@h:2/p")
            .expect("parses")
            .expect("read");
        assert_eq!(ok.get("path").and_then(|v| v.as_str()), Some("/p"));
        assert_eq!(ok.get("user").and_then(|v| v.as_str()), Some("u"));
    }

    #[test]
    fn unknown_protocols_are_refused_where_qemu_looks_them_up() {
        let e = super::known_protocol_options("a:b").expect_err("a:b");
        assert_eq!(e.to_string(), "Unknown protocol 'a'");
        assert!(super::known_protocol_options("/x/a:b").is_ok());
        assert!(super::known_protocol_options("nbd:unix:/s").is_ok());
    }

    #[test]
    fn nbd_names_that_name_no_server_go_to_the_driver() {
        for name in ["nbd:", "nbd:x", "nbd://h:x/", "nbd+unix:///e"] {
            let d = super::protocol_options(name);
            assert_eq!(
                d.get("driver").and_then(|v| v.as_str()),
                Some("nbd"),
                "{name}"
            );
            assert_eq!(d.get("filename").and_then(|v| v.as_str()), Some(name));
        }
    }

    #[test]
    fn web_names_open_the_web_drivers() {
        let d = super::protocol_options("https://h:8443/a.img?x");
        assert_eq!(d.get("driver").and_then(|v| v.as_str()), Some("https"));
        assert_eq!(
            d.get("url").and_then(|v| v.as_str()),
            Some("https://h:8443/a.img?x")
        );
        let plain = super::protocol_options("http://h/a");
        assert_eq!(plain.get("driver").and_then(|v| v.as_str()), Some("http"));
        let ftps = super::protocol_options("ftps://h/a");
        assert_eq!(ftps.get("driver").and_then(|v| v.as_str()), Some("ftps"));
    }

    #[test]
    fn names_given_to_the_nbd_driver_read_as_qemus_nbd_parse_filename() {
        use super::nbd_parse_filename;
        let err = |n: &str| nbd_parse_filename(n).expect_err(n);
        assert_eq!(err("x"), "File name string for NBD must start with 'nbd:'");
        assert_eq!(err("nbd:"), "NBD server address missing");
        assert_eq!(err("nbd:unix:/s:exportname="), "NBD server address missing");
        assert_eq!(err("nbd:h"), "error parsing address 'h'");
        assert_eq!(err("nbd://h:port/"), "No valid URL specified");
        assert_eq!(err("nbd+unix:///e"), "No valid URL specified");
        let ok = nbd_parse_filename("nbd:unix:/s:exportname=e").expect("parses");
        assert_eq!(ok.get("export").and_then(|v| v.as_str()), Some("e"));
        assert!(nbd_parse_filename("nbd://[::1]:10/").is_ok());
    }

    #[test]
    fn nbd_names_open_the_nbd_client() {
        use super::protocol_options;
        use ferrite_qobject::{from_json, to_json};
        let j = |n: &str| to_json(&protocol_options(n).into());
        let canon = |t: &str| to_json(&from_json(t).expect("json"));
        assert_eq!(
            j("nbd+unix:///exp?socket=/s/nbd"),
            canon(
                r#"{"driver": "nbd", "server": {"type": "unix", "path": "/s/nbd"}, "export": "exp"}"#
            )
        );
        assert_eq!(
            j("nbd+unix:///?socket=/s"),
            canon(r#"{"driver": "nbd", "server": {"type": "unix", "path": "/s"}}"#)
        );
        assert_eq!(
            j("nbd://h:1234/e"),
            canon(
                r#"{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "1234"}, "export": "e"}"#
            )
        );
        assert_eq!(
            j("nbd://h"),
            canon(r#"{"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "10809"}}"#)
        );
        assert_eq!(
            j("nbd:unix:/s:exportname=x"),
            canon(r#"{"driver": "nbd", "server": {"type": "unix", "path": "/s"}, "export": "x"}"#)
        );
        assert_eq!(
            j("nbd:localhost:10810"),
            canon(
                r#"{"driver": "nbd", "server": {"type": "inet", "host": "localhost", "port": "10810"}}"#
            )
        );
    }

    #[test]
    fn protocol_names_open_what_they_name() {
        use ferrite_qobject::QObject;
        let image_filename = |d: &ferrite_qobject::QDict| match d.get("image") {
            Some(QObject::Dict(i)) => i
                .get("filename")
                .and_then(QObject::as_str)
                .map(str::to_owned),
            _ => None,
        };
        let d = super::protocol_options(
            r#"json:{"driver": "blkdebug", "image.driver": "file", "image.filename": "/x"}"#,
        );
        assert_eq!(d.get("driver").and_then(QObject::as_str), Some("blkdebug"));
        assert_eq!(image_filename(&d).as_deref(), Some("/x"));
        let d = super::protocol_options("blkdebug::/img");
        assert_eq!(d.get("driver").and_then(QObject::as_str), Some("blkdebug"));
        assert_eq!(image_filename(&d).as_deref(), Some("/img"));
        let f = super::protocol_options("file:/x/y:z.img");
        assert_eq!(f.get("driver").and_then(QObject::as_str), Some("file"));
        assert_eq!(
            f.get("filename").and_then(QObject::as_str),
            Some("/x/y:z.img")
        );
        let d = super::protocol_options("null-co://");
        assert_eq!(d.get("driver").and_then(QObject::as_str), Some("null-co"));
        let d = super::protocol_options("/plain:name");
        assert_eq!(d.get("driver").and_then(QObject::as_str), Some("file"));
    }

    #[test]
    fn relative_names_sit_beside_the_image() {
        assert_eq!(
            backing_path("/a/b/top.qcow2", "base.qcow2").unwrap(),
            "/a/b/base.qcow2"
        );
        assert_eq!(
            backing_path("top.qcow2", "base.qcow2").unwrap(),
            "base.qcow2"
        );
        assert_eq!(backing_path("/a/top", "/x/base").unwrap(), "/x/base");
        assert_eq!(
            backing_path("/a/top", "nbd:unix:/s").unwrap(),
            "nbd:unix:/s"
        );
        assert!(backing_path("json:{}", "base").is_err());
    }
}
