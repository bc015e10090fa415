//! The human monitor's migration commands (QEMU: `migration/migration-hmp-cmds.c`): each
//! runs the QMP command of the same meaning; `migrate` without `-d` waits for the end on
//! a terminal (`human-monitor-command` cannot wait: the migration goes on detached).

use super::args::parse;
use crate::commands::SystemCommands;
use ferrite_qobject::{QDict, QObject};

/// Runs migration command `cmd` with the text after its name, if it is one.
pub(crate) async fn run(
    cmds: &SystemCommands,
    cmd: &str,
    rest: &str,
    terminal: bool,
) -> Option<String> {
    let (signature, qmp) = match cmd {
        "migrate" => ("detach:-d,resume:-r,uri:s", "migrate"),
        "migrate_incoming" => ("uri:s", "migrate-incoming"),
        "migrate_cancel" => ("", "migrate_cancel"),
        "migrate_continue" => ("state:s", "migrate-continue"),
        "migrate_start_postcopy" => ("", "migrate-start-postcopy"),
        "migrate_set_capability" => ("capability:s,state:s", "migrate-set-capabilities"),
        "migrate_set_parameter" => ("parameter:s,value:s", "migrate-set-parameters"),
        _ => return None,
    };
    let args = match parse(cmd, signature, rest) {
        Ok(a) => a,
        Err(usage) => return Some(usage),
    };
    let text = |k| args.text(k).unwrap_or_default().to_owned();
    let qargs = match cmd {
        "migrate" | "migrate_incoming" => QDict::new().with("uri", text("uri")),
        "migrate_continue" => QDict::new().with("state", text("state")),
        "migrate_set_capability" => {
            let state = match text("state").as_str() {
                "on" => true,
                "off" => false,
                _ => return Some("Error: 'state' expects 'on' or 'off'\r\n".into()),
            };
            let cap = QDict::new()
                .with("capability", text("capability"))
                .with("state", state);
            QDict::new().with("capabilities", QObject::List(vec![cap.into()]))
        }
        "migrate_set_parameter" => {
            match crate::migration_parameters::hmp_argument(&text("parameter"), &text("value")) {
                Ok(d) => d,
                Err(e) => return Some(e),
            }
        }
        _ => QDict::new(),
    };
    if let Err(e) = cmds.run_for_hmp(qmp, qargs).await {
        return Some(format!("Error: {}\r\n", e.desc));
    }
    if cmd == "migrate" && !args.flag("detach") && !terminal {
        return Some(
            "terminal does not allow synchronous migration, continuing detached\r\n".into(),
        );
    }
    if cmd == "migrate" && !args.flag("detach") {
        // The monitor waits for the migration to end, and says why it failed.
        let sys = cmds.system();
        while crate::migration::in_progress(sys) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if let Some(why) = crate::migration::failure(sys) {
            return Some(format!("Error: {why}\r\n"));
        }
    }
    Some(String::new())
}
