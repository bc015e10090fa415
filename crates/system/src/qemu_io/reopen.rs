//! qemu-io's `reopen [-c MODE] [-o OPTIONS] [-r|-w]`: the drive's node opened again with
//! some of its options changed, the others kept (QEMU's `bdrv_reopen` with
//! `keep_old_opts`). `-o backing.x=y` reaches a child; a cache mode (`-c`, `-o cache.*`)
//! passes to the children that took theirs from the node.

use ferrite_block::{BlockBackend, Graph, Node, Perm};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

/// The options that take on/off (others keep the type their current value has, or stay
/// text).
const SWITCHES: &[&str] = &[
    "read-only",
    "auto-read-only",
    "force-share",
    "direct",
    "no-flush",
];

fn switch(text: &str) -> Option<bool> {
    match text {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// `text` as the value of option `key`, whose current value is `current`.
fn typed(key: &str, current: Option<&QObject>, text: &str) -> Result<QObject, String> {
    let bad = || format!("Parameter '{key}' expects a different type");
    match current {
        Some(QObject::Bool(_)) => switch(text).map(QObject::Bool).ok_or_else(bad),
        Some(QObject::Int(_)) => text.parse::<i64>().map(QObject::Int).map_err(|_| bad()),
        _ if SWITCHES.contains(&key) => switch(text).map(QObject::Bool).ok_or_else(bad),
        _ => Ok(QObject::String(text.to_owned())),
    }
}

/// The changes for each node touched, keyed by node name, in the order found.
#[derive(Default)]
struct Plan {
    nodes: Vec<(Rc<Node>, QDict)>,
}

impl Plan {
    fn entry(&mut self, node: &Rc<Node>) -> &mut QDict {
        let at = match self.nodes.iter().position(|(n, _)| Rc::ptr_eq(n, node)) {
            Some(i) => i,
            None => {
                self.nodes.push((node.clone(), QDict::new()));
                self.nodes.len() - 1
            }
        };
        &mut self.nodes[at].1
    }

    /// `-o` options (keyval, all text) for `node`: children's go to them, a cache mode
    /// passes on to the children that take it from the node.
    fn options(&mut self, graph: &Graph, node: &Rc<Node>, given: &QDict) -> Result<(), String> {
        let current = node.options();
        for (k, v) in given.iter() {
            match v {
                QObject::Dict(d) if node.child(k).is_some() => {
                    let child = node.child(k).ok_or_else(String::new)?;
                    self.options(graph, &child, d)?;
                }
                QObject::Dict(c) if k == "cache" => {
                    let flag = |key: &str| c.get(key).and_then(QObject::as_str).and_then(switch);
                    let (direct, no_flush) = (flag("direct"), flag("no-flush"));
                    node.keep_own_cache(direct.is_some(), no_flush.is_some());
                    self.cache(graph, node, direct, no_flush);
                }
                QObject::Dict(d) => {
                    let now = current.get(k).and_then(QObject::as_dict).cloned();
                    let mut merged = now.clone().unwrap_or_default();
                    for (k2, v2) in d.iter() {
                        let text = v2.as_str().unwrap_or_default();
                        let now2 = now.as_ref().and_then(|n| n.get(k2));
                        merged.insert(k2, typed(k2, now2, text)?);
                    }
                    self.entry(node).insert(k, merged);
                }
                QObject::String(text) => {
                    let value = typed(k, current.get(k), text)?;
                    self.entry(node).insert(k, value);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Read-only or not, for `node` and the children that take their mode from it.
    fn read_only(&mut self, node: &Rc<Node>, ro: bool) {
        self.entry(node).insert("read-only", ro);
        for c in node.children() {
            let child = c.node();
            if child.inherits_read_only() && child.users().len() == 1 {
                self.read_only(&child, ro);
            }
        }
    }

    /// Cache modes for `node` and for the children that took theirs from it (not those
    /// given their own, nor nodes another user refers to).
    fn cache(
        &mut self,
        graph: &Graph,
        node: &Rc<Node>,
        direct: Option<bool>,
        no_flush: Option<bool>,
    ) {
        let mut cache = self
            .entry(node)
            .get("cache")
            .and_then(QObject::as_dict)
            .cloned()
            .unwrap_or_else(|| {
                node.options()
                    .get("cache")
                    .and_then(QObject::as_dict)
                    .cloned()
                    .unwrap_or_default()
            });
        if let Some(d) = direct {
            cache.insert("direct", d);
        }
        if let Some(n) = no_flush {
            cache.insert("no-flush", n);
        }
        self.entry(node).insert("cache", cache);
        for c in node.children() {
            let child = c.node();
            if child.users().len() != 1 || graph.is_monitor_owned(&child) {
                continue;
            }
            let (inherits_direct, inherits_no_flush) = child.inherits_cache();
            let direct = direct.filter(|_| inherits_direct);
            let no_flush = no_flush.filter(|_| inherits_no_flush);
            if direct.is_some() || no_flush.is_some() {
                self.cache(graph, &child, direct, no_flush);
            }
        }
    }
}

/// `reopen`'s usage line, which qemu-io prints for arguments it cannot take.
pub(crate) const USAGE: &str =
    "reopen [(-r|-w)] [-c cache] [-o options] -- reopens an image with new options\n";

/// What `reopen` says when it does nothing: its usage on standard output (qemu-io's
/// `printf`), or an error in the monitor (`error_report`).
pub(crate) enum Said {
    Usage,
    Error(String),
}

impl Said {
    fn error(text: &str) -> Self {
        Said::Error(text.to_owned())
    }
}

/// What `reopen`'s arguments ask for.
struct ReopenArgs {
    /// `-c`: write-back, `cache.direct`, `cache.no-flush`.
    mode: Option<(bool, bool, bool)>,
    /// `-o`, every one given, merged.
    text: Option<String>,
    /// `-r` or `-w`.
    read_only: Option<bool>,
}

impl ReopenArgs {
    /// The arguments as qemu-io's `getopt("c:o:rw")` takes them (options may come together,
    /// a value attached to its option), checked as they come; what qemu-io says otherwise.
    fn parse(args: &[&str]) -> Result<Self, Said> {
        let mut parsed = ReopenArgs {
            mode: None,
            text: None,
            read_only: None,
        };
        let mut positional = false;
        let mut it = args.iter();
        while let Some(&arg) = it.next() {
            if arg == "--" {
                positional |= it.next().is_some();
                break;
            }
            let Some(opts) = arg.strip_prefix('-').filter(|o| !o.is_empty()) else {
                // getopt moves it to the end; it is one argument too many.
                positional = true;
                continue;
            };
            for (i, c) in opts.char_indices() {
                match c {
                    'c' | 'o' => {
                        let attached = &opts[i + c.len_utf8()..];
                        let value = if attached.is_empty() {
                            it.next().copied()
                        } else {
                            Some(attached)
                        };
                        let Some(value) = value else {
                            // getopt says so on standard error, qemu-io its usage.
                            eprintln!("reopen: option requires an argument -- '{c}'");
                            return Err(Said::Usage);
                        };
                        if c == 'c' {
                            parsed.mode = Some(cache_mode(value).ok_or_else(|| {
                                Said::Error(format!("Invalid cache option: {value}"))
                            })?);
                        } else {
                            parsed.text = Some(match parsed.text.take() {
                                Some(before) => format!("{before},{value}"),
                                None => value.to_owned(),
                            });
                        }
                        break;
                    }
                    'r' | 'w' => {
                        if parsed.read_only.is_some() {
                            return Err(Said::error("Only one -r/-w option may be given"));
                        }
                        parsed.read_only = Some(c == 'r');
                    }
                    other => {
                        eprintln!("reopen: invalid option -- '{other}'");
                        return Err(Said::Usage);
                    }
                }
            }
        }
        if positional {
            return Err(Said::Usage);
        }
        Ok(parsed)
    }
}

/// The first option given for `node` (or, after its own, for a child) that no node of its
/// driver takes: QEMU finds it left over once the node's reopen is prepared, and changed.
fn unknown_option(node: &Node, given: &QDict) -> Option<String> {
    let own = given
        .iter_qemu_order()
        .find(|(k, _)| node.child(k).is_none() && !is_node_option(node.driver_name(), k));
    if let Some((key, _)) = own {
        return Some(key.to_owned());
    }
    given.iter_qemu_order().find_map(|(k, v)| {
        let child = node.child(k)?;
        unknown_option(&child, v.as_dict()?)
    })
}

/// Whether `key` is an option of `driver`'s nodes (a member of `BlockdevOptions` for it).
fn is_node_option(driver: &str, key: &str) -> bool {
    let schema = ferrite_qapi::schema();
    let Some(ferrite_qapi::schema::TypeDef::Union { base, cases, .. }) =
        schema.type_def("BlockdevOptions")
    else {
        return true;
    };
    base.iter().any(|m| m.name == key)
        || cases
            .get(driver)
            .is_some_and(|case| schema.struct_members(case).iter().any(|m| m.name == key))
}

/// A `-c` cache mode: write-back, `cache.direct`, `cache.no-flush`.
fn cache_mode(mode: &str) -> Option<(bool, bool, bool)> {
    Some(match mode {
        "none" | "off" => (true, true, false),
        "directsync" => (false, true, false),
        "writeback" => (true, false, false),
        "unsafe" => (true, false, true),
        "writethrough" => (false, false, false),
        _ => return None,
    })
}

/// `reopen` with the arguments after it.
pub(crate) async fn run(graph: &Rc<Graph>, blk: &BlockBackend, args: &[&str]) -> Result<(), Said> {
    let ReopenArgs {
        mode,
        text,
        read_only,
    } = match ReopenArgs::parse(args) {
        Ok(a) => a,
        Err(said) => return Err(said),
    };
    let Some(top) = blk.node() else {
        return Err(Said::error("Cannot reopen a drive without a medium"));
    };
    let mut plan = Plan::default();
    let given = match text
        .as_deref()
        .map(|t| ferrite_storage_daemon::front_end::keyval::parse(t, None))
    {
        None => None,
        Some(Ok(p)) => Some(p.value),
        Some(Err(e)) => return Err(Said::Error(e.desc)),
    };
    if let Some((writeback, ..)) = mode
        && writeback != blk.write_cache()
        && blk.device().is_some()
    {
        return Err(Said::error(
            "Cannot change cache.writeback: Device attached",
        ));
    }
    // Going read-only, the backend first gives up writing (QEMU's qemu-io does; the
    // permissions stay given up whatever the reopen does then).
    if read_only.unwrap_or_else(|| top.is_read_only()) {
        let (perm, shared) = blk.perm();
        let _ = blk.set_perm(perm - (Perm::WRITE | Perm::WRITE_UNCHANGED), shared);
    }
    // Dotted keys, as keyval nests them (`cache.direct`).
    let given_has = |key: &str| {
        let mut parts = key.split('.');
        let first = parts.next().unwrap_or_default();
        let mut at = given.as_ref().and_then(|g| g.get(first));
        for part in parts {
            at = at.and_then(QObject::as_dict).and_then(|d| d.get(part));
        }
        at.is_some()
    };
    if read_only.is_some() && given_has("read-only") {
        return Err(Said::error("Cannot set both -r/-w and 'read-only'"));
    }
    if mode.is_some() && (given_has("cache.direct") || given_has("cache.no-flush")) {
        return Err(Said::error("Cannot set both -c and the cache options"));
    }
    if let Some(given) = &given {
        if let Some(key) = unknown_option(&top, given) {
            return Err(Said::Error(format!("Cannot change the option '{key}'")));
        }
        if let Err(e) = plan.options(graph, &top, given) {
            return Err(Said::Error(e));
        }
    }
    if let Some((_, direct, no_flush)) = mode {
        plan.cache(graph, &top, Some(direct), Some(no_flush));
    }
    if let Some(ro) = read_only {
        plan.read_only(&top, ro);
    }
    // A node made writable after the children it writes to, read-only before them.
    let mut nodes: Vec<_> = plan.nodes.iter().collect();
    if read_only == Some(false) {
        nodes.reverse();
    }
    let list: Vec<Args> = nodes
        .into_iter()
        .map(|(node, changes)| {
            let mut opts = node.options();
            opts.insert("node-name", node.name());
            opts.insert("driver", node.driver_name());
            // Children stay as they are: named, as a reopen refers to them (a backing file
            // always, as a reopen must say what becomes of it).
            for c in node.children() {
                if opts.get(c.name()).is_some() || c.name() == "backing" {
                    opts.insert(c.name(), c.node().name());
                }
            }
            for (k, v) in changes.iter() {
                opts.insert(k, v.clone());
            }
            Args::new(opts)
        })
        .collect();
    match graph.reopen(&list).await {
        Ok(()) => {
            if let Some((writeback, ..)) = mode {
                blk.set_write_cache(writeback);
            }
            Ok(())
        }
        Err(e) => Err(Said::Error(ferrite_qapi::Error::from(e).desc)),
    }
}
