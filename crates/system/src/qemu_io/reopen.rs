//! qemu-io's `reopen [-c MODE] [-o OPTIONS] [-r|-w]`: the drive's node opened again with
//! some of its options changed, the others kept (QEMU's `bdrv_reopen` with
//! `keep_old_opts`). `-o backing.x=y` reaches a child; a cache mode (`-c`, `-o cache.*`)
//! passes to the children that took theirs from the node.

use ferrite_block::{BlockBackend, Graph, Node};
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

/// The arguments after `reopen`: its output (an error's text, or nothing).
pub(crate) async fn run(graph: &Rc<Graph>, blk: &BlockBackend, args: &[&str]) -> String {
    let usage = |what: &str| format!("{what}\nTry \"help reopen\" for more information\n");
    let (mut mode, mut text, mut read_only) = (None, None, None);
    let mut it = args.iter();
    while let Some(&a) = it.next() {
        let value = |it: &mut std::slice::Iter<&str>, attached: &str| {
            if attached.is_empty() {
                it.next().map(|v| (*v).to_owned())
            } else {
                Some(attached.to_owned())
            }
        };
        match a.get(..2) {
            Some("-c") => mode = value(&mut it, &a[2..]),
            Some("-o") => text = value(&mut it, &a[2..]),
            Some("-r") => read_only = Some(true),
            Some("-w") => read_only = Some(false),
            _ => return usage("reopen: invalid arguments"),
        }
    }
    let Some(top) = blk.node() else {
        return "Cannot reopen a drive without a medium\n".into();
    };
    let mut plan = Plan::default();
    if let Some(text) = &text {
        let given = match ferrite_storage_daemon::front_end::keyval::parse(text, None) {
            Ok(p) => p.value,
            Err(e) => return format!("{}\n", e.desc),
        };
        if let Err(e) = plan.options(graph, &top, &given) {
            return format!("{e}\n");
        }
    }
    if let Some(mode) = &mode {
        let (writeback, direct, no_flush) = match mode.as_str() {
            "none" | "off" => (true, true, false),
            "directsync" => (false, true, false),
            "writeback" => (true, false, false),
            "unsafe" => (true, false, true),
            "writethrough" => (false, false, false),
            _ => return "Invalid cache option\n".into(),
        };
        blk.set_write_cache(writeback);
        plan.cache(graph, &top, Some(direct), Some(no_flush));
    }
    if let Some(ro) = read_only {
        plan.read_only(&top, ro);
    }
    let list: Vec<Args> = plan
        .nodes
        .iter()
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
        Ok(()) => String::new(),
        Err(e) => format!("{}\n", ferrite_qapi::Error::from(e).desc),
    }
}
