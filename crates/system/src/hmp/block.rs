//! The human monitor's block commands (QEMU: `block-hmp-cmds.c`): each reads its arguments
//! by QEMU's signature and runs the QMP command it stands for, or, for `commit`,
//! `drive_add` and `drive_del`, what has no QMP twin.

use super::SystemCommands;
use super::args::{Parsed, parse};
use ferrite_qobject::{QDict, QObject};

/// A QMP command's outcome as the monitor prints it: nothing, or `Error: TEXT`.
async fn qmp(cmds: &SystemCommands, name: &str, args: QDict) -> String {
    match cmds.run_for_hmp(name, args).await {
        Ok(_) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

fn with_opt(d: QDict, key: &str, v: Option<&str>) -> QDict {
    match v {
        Some(v) => d.with(key, v),
        None => d,
    }
}

/// `nbd_server_start`'s address: `unix:PATH`, `fd:NAME`, `vsock:CID:PORT` or `HOST:PORT`.
fn socket_address(uri: &str) -> Result<QDict, String> {
    if let Some(path) = uri.strip_prefix("unix:") {
        return Ok(QDict::new().with("type", "unix").with("path", path));
    }
    if let Some(fd) = uri.strip_prefix("fd:") {
        return Ok(QDict::new().with("type", "fd").with("str", fd));
    }
    if let Some(rest) = uri.strip_prefix("vsock:") {
        let (cid, port) = rest
            .split_once(':')
            .ok_or_else(|| format!("error parsing address '{rest}'"))?;
        return Ok(QDict::new()
            .with("type", "vsock")
            .with("cid", cid)
            .with("port", port));
    }
    let (host, port) = match uri.strip_prefix('[') {
        Some(v6) => v6
            .split_once("]:")
            .ok_or_else(|| format!("error parsing IPv6 address '{uri}'"))?,
        None => uri
            .rsplit_once(':')
            .ok_or_else(|| format!("error parsing address '{uri}'"))?,
    };
    Ok(QDict::new()
        .with("type", "inet")
        .with("host", host)
        .with("port", port))
}

/// Runs block command `cmd` with the text after its name; `None` if it is not one.
pub(crate) async fn run(cmds: &SystemCommands, cmd: &str, rest: &str) -> Option<String> {
    let signature = match cmd {
        "drive_backup" => "reuse:-n,full:-f,compress:-c,device:B,target:s,format:s?",
        "drive_mirror" => "reuse:-n,full:-f,device:B,target:s,format:s?",
        "commit" => "device:B",
        "block_resize" => "device:B,size:o",
        "block_set_io_throttle" => "device:B,bps:l,bps_rd:l,bps_wr:l,iops:l,iops_rd:l,iops_wr:l",
        "block_stream" => "device:B,speed:o?,base:s?",
        "block_job_set_speed" => "device:B,speed:o",
        "block_job_cancel" => "force:-f,device:B",
        "block_job_complete" | "block_job_pause" | "block_job_resume" => "device:B",
        "eject" => "force:-f,device:B",
        "change" => "device:B,force:-f,target:F,arg:s?,read-only-mode:s?",
        "snapshot_blkdev" => "reuse:-n,device:B,snapshot-file:s?,format:s?",
        "nbd_server_start" => "all:-a,writable:-w,uri:s",
        "nbd_server_add" => "writable:-w,device:B,name:s?",
        "nbd_server_remove" => "force:-f,name:s",
        "nbd_server_stop" => "",
        "drive_add" => "node:-n,pci_addr:s,opts:s",
        "drive_del" => "id:B",
        _ => return None,
    };
    let a = match parse(cmd, signature, rest) {
        Ok(a) => a,
        Err(e) => return Some(e),
    };
    Some(run_parsed(cmds, cmd, &a).await)
}

async fn run_parsed(cmds: &SystemCommands, cmd: &str, a: &Parsed) -> String {
    let device = a.text("device").unwrap_or("");
    let new_image_mode = if a.flag("reuse") {
        "existing"
    } else {
        "absolute-paths"
    };
    let sync = if a.flag("full") { "full" } else { "top" };
    match cmd {
        "drive_backup" => {
            let mut args = QDict::new()
                .with("device", device)
                .with("target", a.text("target").unwrap_or(""))
                .with("sync", sync)
                .with("mode", new_image_mode);
            if a.flag("compress") {
                args.insert("compress", true);
            }
            qmp(
                cmds,
                "drive-backup",
                with_opt(args, "format", a.text("format")),
            )
            .await
        }
        "drive_mirror" => {
            let args = QDict::new()
                .with("device", device)
                .with("target", a.text("target").unwrap_or(""))
                .with("sync", sync)
                .with("mode", new_image_mode)
                .with("unmap", true);
            qmp(
                cmds,
                "drive-mirror",
                with_opt(args, "format", a.text("format")),
            )
            .await
        }
        "commit" => commit(cmds, device).await,
        "block_resize" => {
            let args = QDict::new()
                .with("device", device)
                .with("size", a.size("size").unwrap_or(0));
            qmp(cmds, "block_resize", args).await
        }
        "block_set_io_throttle" => {
            let mut args = QDict::new().with("device", device);
            for key in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
                args.insert(key, a.int(key).unwrap_or(0));
            }
            qmp(cmds, "block_set_io_throttle", args).await
        }
        "block_stream" => {
            let mut args = QDict::new().with("device", device).with("job-id", device);
            if let Some(s) = a.size("speed") {
                args.insert("speed", s);
            }
            qmp(cmds, "block-stream", with_opt(args, "base", a.text("base"))).await
        }
        "block_job_set_speed" => {
            let args = QDict::new()
                .with("device", device)
                .with("speed", a.size("speed").unwrap_or(0));
            qmp(cmds, "block-job-set-speed", args).await
        }
        "block_job_cancel" => {
            let args = QDict::new()
                .with("device", device)
                .with("force", a.flag("force"));
            qmp(cmds, "block-job-cancel", args).await
        }
        "block_job_complete" | "block_job_pause" | "block_job_resume" => {
            let name = cmd.replace('_', "-");
            qmp(cmds, &name, QDict::new().with("device", device)).await
        }
        "eject" => {
            let args = QDict::new()
                .with("device", device)
                .with("force", a.flag("force"));
            qmp(cmds, "eject", args).await
        }
        "change" => {
            let args = QDict::new()
                .with("device", device)
                .with("filename", a.text("target").unwrap_or(""))
                .with("force", a.flag("force"));
            let args = with_opt(args, "format", a.text("arg"));
            let args = with_opt(args, "read-only-mode", a.text("read-only-mode"));
            qmp(cmds, "blockdev-change-medium", args).await
        }
        "snapshot_blkdev" => {
            let Some(file) = a.text("snapshot-file") else {
                return "Error: Parameter 'snapshot-file' is missing\n".into();
            };
            let args = QDict::new()
                .with("device", device)
                .with("snapshot-file", file)
                .with("mode", new_image_mode);
            qmp(
                cmds,
                "blockdev-snapshot-sync",
                with_opt(args, "format", a.text("format")),
            )
            .await
        }
        "nbd_server_start" => nbd_server_start(cmds, a).await,
        "nbd_server_add" => {
            let args = QDict::new()
                .with("device", device)
                .with("writable", a.flag("writable"));
            qmp(
                cmds,
                "nbd-server-add",
                with_opt(args, "name", a.text("name")),
            )
            .await
        }
        "nbd_server_remove" => {
            let mut args = QDict::new().with("name", a.text("name").unwrap_or(""));
            if a.flag("force") {
                args.insert("mode", "hard");
            }
            qmp(cmds, "nbd-server-remove", args).await
        }
        "nbd_server_stop" => qmp(cmds, "nbd-server-stop", QDict::new()).await,
        "drive_add" => drive_add(cmds, a).await,
        "drive_del" => drive_del(cmds, a.text("id").unwrap_or("")).await,
        _ => String::new(),
    }
}

/// `nbd_server_start [-a] [-w] URI`: the server, and with `-a` an export of every drive
/// with a medium (writable with `-w`); if one fails, the server stops again.
async fn nbd_server_start(cmds: &SystemCommands, a: &Parsed) -> String {
    let all = a.flag("all");
    if a.flag("writable") && !all {
        return "Error: -w only valid together with -a\n".into();
    }
    let addr = match socket_address(a.text("uri").unwrap_or("")) {
        Ok(addr) => addr,
        Err(e) => return format!("Error: {e}\n"),
    };
    let out = qmp(cmds, "nbd-server-start", QDict::new().with("addr", addr)).await;
    if !out.is_empty() || !all {
        return out;
    }
    let blocks = match cmds.run_for_hmp("query-block", QDict::new()).await {
        Ok(QObject::List(b)) => b,
        _ => Vec::new(),
    };
    for b in blocks.iter().filter_map(QObject::as_dict) {
        if b.get("inserted").is_none() {
            continue;
        }
        let device = b.get("device").and_then(QObject::as_str).unwrap_or("");
        let args = QDict::new()
            .with("device", device)
            .with("writable", a.flag("writable"));
        let out = qmp(cmds, "nbd-server-add", args).await;
        if !out.is_empty() {
            let _ = cmds.run_for_hmp("nbd-server-stop", QDict::new()).await;
            return out;
        }
    }
    String::new()
}

/// `commit DEVICE`: the drive's image into its backing file, at once; `commit all`: that
/// of every backend with a medium over an image with a backing file, in turn, up to the
/// first failure.
async fn commit(cmds: &SystemCommands, device: &str) -> String {
    let sys = cmds.system();
    let graph = &sys.daemon.graph;
    let failed = |e: std::io::Error| {
        format!(
            "'commit' error for '{device}': {}\n",
            ferrite_qapi::os_msg(&e)
        )
    };
    if device == "all" {
        for blk in graph.backends() {
            let Some(top) = blk.node().map(|n| n.skip_filters()) else {
                continue;
            };
            if top.child("backing").is_some()
                && let Err(e) = ferrite_jobs::commit_now(graph, &top).await
            {
                return failed(e);
            }
        }
        return String::new();
    }
    let Some(blk) = graph.backends().into_iter().find(|b| b.name() == device) else {
        return format!("Device '{device}' not found\n");
    };
    let Some(node) = blk.node() else {
        return format!("Device '{device}' has no medium\n");
    };
    let top = node.skip_implicit_filters();
    match ferrite_jobs::commit_now(graph, &top).await {
        Ok(()) => String::new(),
        Err(e) => failed(e),
    }
}

/// `drive_add [-n] ADDR OPTS`: a drive as `-drive if=none` makes (prints `OK`), or with
/// `-n` a node as `blockdev-add` would.
async fn drive_add(cmds: &SystemCommands, a: &Parsed) -> String {
    let sys = cmds.system();
    let opts = a.text("opts").unwrap_or("");
    if a.flag("node") {
        let parsed = match ferrite_storage_daemon::front_end::keyval::parse(opts, None) {
            Ok(p) => p.value,
            Err(e) => return format!("{}\n", e.desc),
        };
        let checked = match sys.daemon.graph.check_cli_options(&parsed) {
            Ok(c) => c,
            Err(e) => return format!("{}\n", ferrite_qapi::Error::from(e).desc),
        };
        return match cmds.run_for_hmp("blockdev-add", checked).await {
            Ok(_) => String::new(),
            Err(e) => format!("{}\n", e.desc),
        };
    }
    let interface = opts
        .split(',')
        .find_map(|o| o.strip_prefix("if="))
        .unwrap_or("ide");
    if interface != "none" {
        let code = match interface {
            "ide" => 1,
            "scsi" => 2,
            "floppy" => 3,
            "pflash" => 4,
            "mtd" => 5,
            "sd" => 6,
            "virtio" => 7,
            "xen" => 8,
            _ => 0,
        };
        return format!("Can't hot-add drive to type {code}\n");
    }
    let mut counter = crate::drive::DriveCounter::default();
    match crate::drive::add(&sys.daemon.graph, &sys.devices, &mut counter, opts, false).await {
        Ok(d) => {
            sys.drives.borrow_mut().push(d.blk);
            "OK\n".into()
        }
        Err(e) => format!("{}\n", e.desc),
    }
}

/// `drive_del ID`: a node the monitor added goes as `blockdev-del`; a drive loses its
/// medium and its name (a device keeps its now empty backend).
async fn drive_del(cmds: &SystemCommands, id: &str) -> String {
    let sys = cmds.system();
    let graph = &sys.daemon.graph;
    if let Some(node) = graph.find(id)
        && graph.is_monitor_owned(&node)
    {
        return match cmds
            .run_for_hmp("blockdev-del", QDict::new().with("node-name", id))
            .await
        {
            Ok(_) => String::new(),
            Err(e) => format!("{}\n", e.desc),
        };
    }
    let Some(blk) = graph.backends().into_iter().find(|b| b.name() == id) else {
        return format!("Device '{id}' not found\n");
    };
    if let Some(node) = blk.node()
        && let Err(e) = graph.check_op(&node, ferrite_block::BlockOp::DriveDel)
    {
        return format!("{}\n", ferrite_qapi::Error::from(e).desc);
    }
    sys.devices.drive_del(&blk).await;
    sys.drives
        .borrow_mut()
        .retain(|b| !std::rc::Rc::ptr_eq(b, &blk));
    String::new()
}

#[cfg(test)]
mod tests {
    use super::socket_address;

    #[test]
    fn addresses_as_qemu_reads_them() {
        let unix = socket_address("unix:/tmp/s").unwrap();
        assert_eq!(unix.get("path").and_then(|p| p.as_str()), Some("/tmp/s"));
        let inet = socket_address("[::1]:10809").unwrap();
        assert_eq!(inet.get("host").and_then(|p| p.as_str()), Some("::1"));
        let inet = socket_address("localhost:10809").unwrap();
        assert_eq!(inet.get("port").and_then(|p| p.as_str()), Some("10809"));
        assert!(socket_address("nothing").is_err());
    }
}
