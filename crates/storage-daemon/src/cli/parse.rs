//! argv to an ordered list of options, as qemu-storage-daemon's `getopt_long` loop sees them.
//! Pure: no option is acted on here.

/// One command-line option, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliOption {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// `--trace`.
    Trace(String),
    /// `--blockdev`.
    Blockdev(String),
    /// `--chardev`.
    Chardev(String),
    /// `--daemonize`.
    Daemonize,
    /// `--export`.
    Export(String),
    /// `--monitor` (qemu-system's `-mon`).
    Monitor(String),
    /// `--nbd-server`.
    NbdServer(String),
    /// `--object`.
    Object(String),
    /// `--pidfile`.
    Pidfile(String),
}

impl CliOption {
    /// How the option is written in messages (`--object iothread,id=x`).
    pub fn describe(&self) -> String {
        match self {
            CliOption::Help => "--help".into(),
            CliOption::Version => "--version".into(),
            CliOption::Daemonize => "--daemonize".into(),
            CliOption::Trace(v) => format!("--trace {v}"),
            CliOption::Blockdev(v) => format!("--blockdev {v}"),
            CliOption::Chardev(v) => format!("--chardev {v}"),
            CliOption::Export(v) => format!("--export {v}"),
            CliOption::Monitor(v) => format!("--monitor {v}"),
            CliOption::NbdServer(v) => format!("--nbd-server {v}"),
            CliOption::Object(v) => format!("--object {v}"),
            CliOption::Pidfile(v) => format!("--pidfile {v}"),
        }
    }
}

/// Long options: name and whether it takes a value.
const LONG: &[(&str, bool)] = &[
    ("help", false),
    ("version", false),
    ("trace", true),
    ("blockdev", true),
    ("chardev", true),
    ("daemonize", false),
    ("export", true),
    ("monitor", true),
    ("nbd-server", true),
    ("object", true),
    ("pidfile", true),
];

fn make(name: &str, value: Option<String>) -> CliOption {
    let v = value.unwrap_or_default();
    match name {
        "help" => CliOption::Help,
        "version" => CliOption::Version,
        "trace" => CliOption::Trace(v),
        "blockdev" => CliOption::Blockdev(v),
        "chardev" => CliOption::Chardev(v),
        "daemonize" => CliOption::Daemonize,
        "export" => CliOption::Export(v),
        "monitor" => CliOption::Monitor(v),
        "nbd-server" => CliOption::NbdServer(v),
        "object" => CliOption::Object(v),
        _ => CliOption::Pidfile(v),
    }
}

/// Splits argv (without the program name) into options.
///
/// # Errors
/// getopt's texts: "unrecognized option '--x'", "option '--x' requires an argument",
/// "invalid option -- 'x'", and "ARG: Unexpected argument" for a stray argument.
pub(crate) fn parse_args(args: &[String]) -> Result<Vec<CliOption>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if let Some(long) = arg.strip_prefix("--") {
            if long.is_empty() {
                // "--" ends the options; anything after is a stray argument.
                if let Some(stray) = args.get(i) {
                    return Err(format!("{stray}: Unexpected argument"));
                }
                break;
            }
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (long, None),
            };
            // getopt_long accepts unambiguous prefixes of long options.
            let matches: Vec<&(&str, bool)> = LONG
                .iter()
                .filter(|(n, _)| *n == name || n.starts_with(name))
                .collect();
            let exact = LONG.iter().find(|(n, _)| *n == name);
            let (full, takes) = match (exact, matches.as_slice()) {
                (Some(e), _) => *e,
                (None, [only]) => **only,
                (None, []) => return Err(format!("unrecognized option '--{name}'")),
                (None, _) => return Err(format!("option '--{name}' is ambiguous")),
            };
            let value = if takes {
                match inline {
                    Some(v) => Some(v),
                    None => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("option '--{full}' requires an argument"))?;
                        i += 1;
                        Some(v.clone())
                    }
                }
            } else {
                if inline.is_some() {
                    return Err(format!("option '--{full}' doesn't allow an argument"));
                }
                None
            };
            out.push(make(full, value));
        } else if let Some(short) = arg.strip_prefix('-').filter(|s| !s.is_empty()) {
            for (pos, c) in short.char_indices() {
                match c {
                    'h' => out.push(CliOption::Help),
                    'V' => out.push(CliOption::Version),
                    'T' => {
                        let rest = &short[pos + 1..];
                        let value = if !rest.is_empty() {
                            rest.to_owned()
                        } else {
                            let v = args
                                .get(i)
                                .ok_or("option requires an argument -- 'T'".to_owned())?;
                            i += 1;
                            v.clone()
                        };
                        out.push(CliOption::Trace(value));
                        break;
                    }
                    other => return Err(format!("invalid option -- '{other}'")),
                }
            }
        } else {
            return Err(format!("{arg}: Unexpected argument"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Vec<CliOption>, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn long_forms_and_order() {
        assert_eq!(
            p(&["--object", "iothread,id=a", "--monitor=c", "-T", "x", "-Vh"]).unwrap(),
            vec![
                CliOption::Object("iothread,id=a".into()),
                CliOption::Monitor("c".into()),
                CliOption::Trace("x".into()),
                CliOption::Version,
                CliOption::Help,
            ]
        );
    }

    #[test]
    fn getopt_errors() {
        assert_eq!(
            p(&["--bogus"]).unwrap_err(),
            "unrecognized option '--bogus'"
        );
        assert_eq!(
            p(&["--pidfile"]).unwrap_err(),
            "option '--pidfile' requires an argument"
        );
        assert_eq!(p(&["stray"]).unwrap_err(), "stray: Unexpected argument");
        assert_eq!(p(&["-x"]).unwrap_err(), "invalid option -- 'x'");
        assert_eq!(
            p(&["--pid", "f"]).unwrap(),
            vec![CliOption::Pidfile("f".into())]
        );
    }
}
