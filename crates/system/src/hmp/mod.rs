//! The human monitor through `human-monitor-command`: the commands a block-layer test sends
//! there, answered with QEMU's text (lines end in CR LF).

mod args;
mod block;
mod expr;
mod info_block;
mod migration;
pub(crate) mod readline;
mod vm_snapshots;

use crate::commands::SystemCommands;
use crate::qemu_io;
use ferrite_qobject::QDict;

/// The output of one command line; lines end in CR LF, as every human monitor writes them.
pub(crate) async fn run(cmds: &SystemCommands, line: &str, terminal: bool) -> String {
    crlf(&answer(cmds, line, terminal).await)
}

/// `text` with each line ending in CR LF.
fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// `terminal`: a monitor on a character device, which can wait for a command to end
/// (`human-monitor-command` cannot).
async fn answer(cmds: &SystemCommands, line: &str, terminal: bool) -> String {
    let line = line.trim();
    let (cmd, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    let rest = rest.trim();
    let simple = |name: &'static str| async move {
        match cmds.run_for_hmp(name, QDict::new()).await {
            Ok(_) => String::new(),
            Err(e) => format!("Error: {}\r\n", e.desc),
        }
    };
    match (cmd, rest) {
        ("", _) => String::new(),
        ("quit" | "q", _) => simple("quit").await,
        ("stop" | "s", _) => simple("stop").await,
        ("cont" | "c", _) => simple("cont").await,
        ("system_reset", _) => simple("system_reset").await,
        ("system_powerdown", _) => simple("system_powerdown").await,
        ("info", "status") => cmds.system().machine.status_line(),
        ("info", "name") => match &cmds.system().machine.name {
            Some(n) => format!("{n}\r\n"),
            None => String::new(),
        },
        ("info", "uuid") => format!("{}\r\n", cmds.system().machine.uuid()),
        ("info", "block-jobs") => info_block::info_block_jobs(cmds).await,
        ("info", stats) if stats == "blockstats" || stats.starts_with("blockstats ") => {
            info_block::info_blockstats(cmds, &stats["blockstats".len()..]).await
        }
        ("info", block) if block == "block" || block.starts_with("block ") => {
            info_block::info_block(cmds, &block[5..]).await
        }
        ("info", "version") => format!("{}\r\n", crate::help::version()),
        ("info", "qtree") => cmds.system().devices.qtree(),
        ("qemu-io", _) => qemu_io(cmds, rest).await,
        ("info", "snapshots") => crate::savevm::info(cmds.system()),
        ("info", "migrate_parameters") => crate::migration::info_parameters(cmds.system()),
        ("info", "migrate") => crate::migration::info(cmds.system()),
        (cmd, rest) if let Some(out) = migration::run(cmds, cmd, rest, terminal).await => out,
        ("savevm" | "loadvm" | "delvm", _) => vm_snapshots::run(cmds.system(), cmd, rest).await,
        (cmd, rest) if let Some(out) = block::run(cmds, cmd, rest).await => out,
        ("info" | "device_add" | "device_del", _) => format!(
            "Error: the human monitor command '{line}' is not implemented by ferrite yet\r\n"
        ),
        _ => format!("unknown command: '{cmd}'\r\n"),
    }
}

/// `qemu-io [-d] DEVICE "COMMAND"`.
async fn qemu_io(cmds: &SystemCommands, args: &str) -> String {
    let (qdev, args) = match args.strip_prefix("-d") {
        Some(rest) if rest.starts_with(char::is_whitespace) => (true, rest.trim_start()),
        _ => (false, args),
    };
    let (device, command) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
    let command = command.trim();
    // One argument: a quoted string, or a single word.
    let line = match command.strip_prefix('"') {
        Some(q) => match q.find('"') {
            Some(end) if q[end + 1..].trim().is_empty() => q[..end].to_owned(),
            _ => return EXTRANEOUS.into(),
        },
        None if command.split_whitespace().count() > 1 => return EXTRANEOUS.into(),
        None => command.to_owned(),
    };
    let sys = cmds.system();
    let graph = &sys.daemon.graph;
    let target = if qdev {
        match sys.devices.drive_of(device) {
            Ok(blk) => qemu_io::Target::Drive(blk),
            Err(e) => return format!("Error: {}\r\n", e.desc),
        }
    } else if let Some(blk) = graph.backends().into_iter().find(|b| b.name() == device) {
        qemu_io::Target::Drive(blk)
    } else if let Some(node) = graph.find(device) {
        qemu_io::Target::Node(node)
    } else {
        return format!("Error: Cannot find device='' nor node-name='{device}'\r\n");
    };
    qemu_io::run(&sys.daemon, target, &line).await
}

const EXTRANEOUS: &str = "qemu-io: extraneous characters at the end of line\r\nTry \"help qemu-io\" for more information\r\n";
