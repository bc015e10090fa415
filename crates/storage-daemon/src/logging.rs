//! Diagnostic logging with `tracing`: off unless `-T` or `FERRITE_LOG` asks for it, and
//! always to stderr or a file, never stdout (a stdio monitor may be using it).

use std::fs::OpenOptions;
use std::sync::Mutex;
use tracing_subscriber::EnvFilter;

/// Our tracing targets, for `-T help`.
const TARGETS: &[&str] = &[
    "ferrite_qobject",
    "ferrite_qapi",
    "ferrite_qmp",
    "ferrite_qom",
    "ferrite_chardev",
    "ferrite_storage_daemon",
];

/// Turns QEMU-style `-T` values into one filter: `[enable=]PATTERN`, `events=FILE` (one
/// pattern a line) and `file=FILE`. A bare `*` enables everything at debug level.
fn directives(traces: &[String]) -> Result<(Vec<String>, Option<String>), String> {
    let mut out = Vec::new();
    let mut file = None;
    for t in traces {
        for item in t.split(',') {
            let (k, v) = item.split_once('=').unwrap_or(("enable", item));
            match k {
                "enable" => out.push(v.to_owned()),
                "file" => file = Some(v.to_owned()),
                "events" => {
                    let text = std::fs::read_to_string(v).map_err(|e| {
                        format!("could not read '{v}': {}", ferrite_qapi::os_msg(&e))
                    })?;
                    out.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(str::to_owned),
                    );
                }
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
    }
    let out = out
        .into_iter()
        .map(|p| if p == "*" { "debug".to_owned() } else { p })
        .collect();
    Ok((out, file))
}

/// `-T help`.
pub(crate) fn print_targets() {
    for t in TARGETS {
        println!("{t}");
    }
}

/// Installs the subscriber, if anything asked for output.
pub(crate) fn init(traces: &[String]) -> Result<(), String> {
    let (mut dirs, file) = directives(traces)?;
    if let Ok(env) = std::env::var("FERRITE_LOG") {
        dirs.push(env);
    }
    if dirs.is_empty() {
        return Ok(());
    }
    let mut filter = EnvFilter::new("off");
    for d in &dirs {
        let directive = d
            .parse()
            .map_err(|e| format!("invalid trace pattern '{d}': {e}"))?;
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match file {
        Some(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| format!("could not open '{path}': {}", ferrite_qapi::os_msg(&e)))?;
            builder.with_writer(Mutex::new(f)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}
