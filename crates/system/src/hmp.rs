//! The human monitor through `human-monitor-command`: the commands a block-layer test sends
//! there, answered with QEMU's text (lines end in CR LF).

use crate::commands::SystemCommands;
use ferrite_qobject::QDict;

/// The output of one command line.
pub(crate) async fn run(cmds: &SystemCommands, line: &str) -> String {
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
        ("stop" | "s", _) => simple("stop").await,
        ("cont" | "c", _) => simple("cont").await,
        ("system_reset", _) => simple("system_reset").await,
        ("system_powerdown", _) => simple("system_powerdown").await,
        ("info", "status") => cmds.system().machine.status_line(),
        ("info", "name") => match &cmds.system().machine.name {
            Some(n) => format!("{n}\r\n"),
            None => String::new(),
        },
        ("info", "version") => {
            let (a, b, c) = ferrite_storage_daemon::front_end::QEMU_VERSION;
            let pkg = ferrite_storage_daemon::front_end::package();
            format!(
                "{a}.{b}.{c}{}\r\n",
                if pkg.is_empty() {
                    pkg
                } else {
                    format!(" ({pkg})")
                }
            )
        }
        (
            "info" | "qemu-io" | "drive_add" | "drive_del" | "device_add" | "device_del" | "savevm"
            | "loadvm" | "commit" | "change" | "eject" | "block_resize",
            _,
        ) => format!(
            "Error: the human monitor command '{line}' is not implemented by ferrite yet\r\n"
        ),
        _ => format!("unknown command: '{cmd}'\r\n"),
    }
}
