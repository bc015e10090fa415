//! `info block` and `info block-jobs`: the human view of `query-block`,
//! `query-named-block-nodes` and `query-block-jobs`, in QEMU's layout.

use super::SystemCommands;
use ferrite_qobject::{QDict, QObject};
use std::fmt::Write;

/// The fields of a query's answer, absent ones as QEMU's zero values.
trait Fields {
    fn text(&self, key: &str) -> Option<&str>;
}

impl Fields for QDict {
    fn text(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| v.as_str())
    }
}

/// What `info block` was asked for: `[-n] [-v] [DEVICE]`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Request<'a> {
    nodes: bool,
    verbose: bool,
    device: Option<&'a str>,
}

fn usage(problem: &str) -> String {
    format!("block: {problem}\nTry \"help info block\" for more information\n")
}

fn parse(args: &str) -> Result<Request<'_>, String> {
    let mut r = Request::default();
    for word in args.split_whitespace() {
        match word.strip_prefix('-') {
            Some(flags) if r.device.is_none() && !flags.is_empty() => {
                for f in flags.chars() {
                    match f {
                        'n' => r.nodes = true,
                        'v' => r.verbose = true,
                        _ => return Err(usage(&format!("unsupported option -{f}"))),
                    }
                }
            }
            _ if r.device.is_none() => r.device = Some(word),
            _ => return Err(usage("extraneous characters at the end of line")),
        }
    }
    Ok(r)
}

/// A list a query returned.
async fn query(cmds: &SystemCommands, name: &str, args: QDict) -> Result<Vec<QObject>, String> {
    match cmds.run_for_hmp(name, args).await {
        Ok(QObject::List(l)) => Ok(l),
        Ok(_) => Ok(Vec::new()),
        Err(e) => Err(format!("Error: {}\n", e.desc)),
    }
}

/// `info block [-n] [-v] [DEVICE]`: the devices' drives, or (with `-n`, or when no drive
/// is called DEVICE) the named nodes.
pub(crate) async fn info_block(cmds: &SystemCommands, args: &str) -> String {
    let request = match parse(args) {
        Ok(r) => r,
        Err(e) => return e,
    };
    if request.verbose {
        return "Error: 'info block -v' (the image details) is not implemented by ferrite yet\n"
            .into();
    }
    let mut out = String::new();
    let wanted = |name: Option<&str>| request.device.is_none_or(|d| name == Some(d));
    let mut printed = false;
    if !request.nodes {
        let blocks = match query(cmds, "query-block", QDict::new()).await {
            Ok(b) => b,
            Err(e) => return e,
        };
        for (i, info) in blocks.iter().filter_map(|b| b.as_dict()).enumerate() {
            if !wanted(info.text("device")) {
                continue;
            }
            // Entries after the first start with a blank line, printed or not before.
            if i > 0 {
                out.push('\n');
            }
            describe(
                &mut out,
                Some(info),
                info.get("inserted").and_then(|i| i.as_dict()),
            );
            printed = true;
        }
    }
    if printed || (request.device.is_none() && !request.nodes) {
        return out;
    }
    let args = QDict::new().with("flat", false);
    let nodes = match query(cmds, "query-named-block-nodes", args).await {
        Ok(n) => n,
        Err(e) => return e,
    };
    for (i, node) in nodes.iter().filter_map(|n| n.as_dict()).enumerate() {
        if !wanted(node.text("node-name")) {
            continue;
        }
        if i > 0 {
            out.push('\n');
        }
        describe(&mut out, None, Some(node));
    }
    out
}

/// One drive (`info`, from query-block) or node (`inserted` alone).
fn describe(out: &mut String, info: Option<&QDict>, inserted: Option<&QDict>) {
    let node_name = inserted.and_then(|i| i.text("node-name"));
    match info
        .and_then(|i| i.text("device"))
        .filter(|d| !d.is_empty())
    {
        Some(device) => {
            out.push_str(device);
            if let Some(n) = node_name {
                let _ = write!(out, " ({n})");
            }
        }
        None => out.push_str(
            node_name
                .or_else(|| info.and_then(|i| i.text("qdev")))
                .unwrap_or("<anonymous>"),
        ),
    }
    let flag = |d: &QDict, key: &str| d.get(key).and_then(|v| v.as_bool()).unwrap_or(false);
    match inserted {
        Some(i) => {
            let _ = writeln!(
                out,
                ": {} ({}{}{}{})",
                i.text("file").unwrap_or(""),
                i.text("drv").unwrap_or(""),
                if flag(i, "ro") { ", read-only" } else { "" },
                if flag(i, "encrypted") {
                    ", encrypted"
                } else {
                    ""
                },
                if i.get("active").and_then(|v| v.as_bool()) == Some(false) {
                    ", inactive"
                } else {
                    ""
                },
            );
        }
        None => out.push_str(": [not inserted]\n"),
    }
    if let Some(info) = info {
        if let Some(qdev) = info.text("qdev") {
            let _ = writeln!(out, "    Attached to:      {qdev}");
        }
        if let Some(status) = info.text("io-status").filter(|s| *s != "ok") {
            let _ = writeln!(out, "    I/O status:       {status}");
        }
        if flag(info, "removable") {
            let _ = writeln!(
                out,
                "    Removable device: {}locked, tray {}",
                if flag(info, "locked") { "" } else { "not " },
                if flag(info, "tray_open") {
                    "open"
                } else {
                    "closed"
                },
            );
        }
    }
    let Some(i) = inserted else { return };
    let cache = i.get("cache").and_then(|c| c.as_dict());
    let cache_flag = |key: &str| cache.is_some_and(|c| flag(c, key));
    let _ = writeln!(
        out,
        "    Cache mode:       {}{}{}",
        if cache_flag("writeback") {
            "writeback"
        } else {
            "writethrough"
        },
        if cache_flag("direct") { ", direct" } else { "" },
        if cache_flag("no-flush") {
            ", ignore flushes"
        } else {
            ""
        },
    );
    if let Some(backing) = i.text("backing_file") {
        let depth = i.get("backing_file_depth").and_then(|d| d.as_i64());
        let _ = writeln!(
            out,
            "    Backing file:     {backing} (chain depth: {})",
            depth.unwrap_or(0)
        );
    }
    if let Some(dz) = i.text("detect_zeroes").filter(|d| *d != "off") {
        let _ = writeln!(out, "    Detect zeroes:    {dz}");
    }
    let num = |key: &str| i.get(key).and_then(|v| v.as_i64()).unwrap_or(0);
    if ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"]
        .iter()
        .any(|k| num(k) != 0)
    {
        out.push_str("    I/O throttling:  ");
        for key in [
            "bps",
            "bps_rd",
            "bps_wr",
            "bps_max",
            "bps_rd_max",
            "bps_wr_max",
            "iops",
            "iops_rd",
            "iops_wr",
            "iops_max",
            "iops_rd_max",
            "iops_wr_max",
            "iops_size",
        ] {
            let _ = write!(out, " {key}={}", num(key));
        }
        let _ = writeln!(out, " group={}", i.text("group").unwrap_or(""));
    }
}

/// `info blockstats`: each drive's I/O counters, one line each.
pub(crate) async fn info_blockstats(cmds: &SystemCommands, args: &str) -> String {
    if !args.trim().is_empty() {
        return "blockstats: extraneous characters at the end of line\n\
                Try \"help info blockstats\" for more information\n"
            .into();
    }
    let stats = match query(cmds, "query-blockstats", QDict::new()).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let mut out = String::new();
    for s in stats.iter().filter_map(QObject::as_dict) {
        // A device's backend without a name prints as "" (QEMU's).
        let Some(device) = s.text("device") else {
            continue;
        };
        let Some(counters) = s.get("stats").and_then(QObject::as_dict) else {
            continue;
        };
        out.push_str(device);
        out.push(':');
        for key in [
            "rd_bytes",
            "wr_bytes",
            "rd_operations",
            "wr_operations",
            "flush_operations",
            "wr_total_time_ns",
            "rd_total_time_ns",
            "flush_total_time_ns",
            "rd_merged",
            "wr_merged",
            "idle_time_ns",
        ] {
            let n = counters.get(key).and_then(QObject::as_i64).unwrap_or(0);
            out.push_str(&format!(" {key}={n}"));
        }
        out.push('\n');
    }
    out
}

/// `info block-jobs`.
pub(crate) async fn info_block_jobs(cmds: &SystemCommands) -> String {
    let jobs = match query(cmds, "query-block-jobs", QDict::new()).await {
        Ok(j) => j,
        Err(e) => return e,
    };
    if jobs.is_empty() {
        return "No active jobs\n".into();
    }
    let mut out = String::new();
    for job in jobs.iter().filter_map(|j| j.as_dict()) {
        let num = |key: &str| job.get(key).and_then(|v| v.as_i64()).unwrap_or(0);
        let device = job.text("device").unwrap_or("");
        let kind = job.text("type").unwrap_or("");
        if kind == "stream" {
            let _ = write!(out, "Streaming device {device}");
        } else {
            let _ = write!(out, "Type {kind}, device {device}");
        }
        let _ = writeln!(
            out,
            ": Completed {} of {} bytes, speed limit {} bytes/s",
            num("offset"),
            num("len"),
            num("speed")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{Request, parse};

    #[test]
    fn flags_come_before_the_device() {
        assert_eq!(
            parse("-n -v disk"),
            Ok(Request {
                nodes: true,
                verbose: true,
                device: Some("disk")
            })
        );
        assert_eq!(parse("-nv").map(|r| (r.nodes, r.verbose)), Ok((true, true)));
        assert!(parse("-x").is_err());
        assert!(parse("a b").is_err());
    }
}
