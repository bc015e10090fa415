//! The human monitor's VM snapshot commands (QEMU: `hmp_savevm`, `hmp_loadvm`,
//! `hmp_delvm`); `info snapshots` is `crate::savevm::info`.

use super::args::parse;
use crate::System;
use crate::machine::RunState;
use crate::savevm;
use std::rc::Rc;

/// Runs `savevm`, `loadvm` or `delvm` with the text after the command's name.
pub(crate) async fn run(sys: &Rc<System>, cmd: &str, rest: &str) -> String {
    let signature = if cmd == "savevm" { "name:s?" } else { "name:s" };
    let args = match parse(cmd, signature, rest) {
        Ok(a) => a,
        Err(usage) => return usage,
    };
    let name = args.text("name");
    let r = match (cmd, name) {
        ("savevm", name) => savevm::save(sys, name, true, None, None).await,
        ("loadvm", Some(name)) => return loadvm(sys, name).await,
        (_, name) => savevm::delete(sys, name.unwrap_or_default(), None).await,
    };
    match r {
        Ok(()) => String::new(),
        Err(e) => format!("Error: {}\n", e.desc),
    }
}

/// `loadvm NAME`: the machine stops and, once the snapshot is loaded, goes back to what it
/// was doing; a failure leaves it stopped.
async fn loadvm(sys: &Rc<System>, name: &str) -> String {
    let was = sys.machine.status();
    sys.machine.stop_for(RunState::RestoreVm);
    match savevm::load(sys, name, None, None).await {
        Ok(()) => {
            sys.machine.resume(was);
            String::new()
        }
        Err(f) => {
            let report = f.report.map(|r| format!("{r}\n")).unwrap_or_default();
            format!("{report}Error: {}\n", f.error.desc)
        }
    }
}
