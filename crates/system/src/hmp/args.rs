//! A human monitor command's arguments, read by its signature as QEMU's monitor reads them
//! (`reuse:-n,device:B,target:s,format:s?`): flags first, then words in order, a quoted
//! word as one, sizes with a unit suffix, integers as expressions; what does not fit is an error that ends with
//! `Try "help CMD" for more information`.

use std::collections::HashMap;

/// A parsed argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Flag,
    Text(String),
    Size(i64),
    Int(i64),
}

/// The arguments by name.
#[derive(Debug, Default)]
pub(crate) struct Parsed(HashMap<&'static str, Value>);

impl Parsed {
    pub(crate) fn flag(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub(crate) fn text(&self, name: &str) -> Option<&str> {
        match self.0.get(name) {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        }
    }

    pub(crate) fn size(&self, name: &str) -> Option<i64> {
        match self.0.get(name) {
            Some(Value::Size(n)) => Some(*n),
            _ => None,
        }
    }

    pub(crate) fn int(&self, name: &str) -> Option<i64> {
        match self.0.get(name) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        }
    }
}

/// One parameter of a signature.
struct Param {
    name: &'static str,
    kind: &'static str,
    optional: bool,
}

fn params(signature: &'static str) -> Vec<Param> {
    signature
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (name, kind) = p.split_once(':').unwrap_or((p, "s"));
            let (kind, optional) = match kind.strip_suffix('?') {
                Some(k) => (k, true),
                None => (kind, false),
            };
            Param {
                name,
                kind,
                optional,
            }
        })
        .collect()
}

/// The next word of `rest` (a double-quoted one may hold spaces), and what follows it.
fn word(rest: &str) -> Option<(String, &str)> {
    let rest = rest.trim_start();
    if rest.is_empty() {
        return None;
    }
    if let Some(q) = rest.strip_prefix('"') {
        let end = q.find('"')?;
        return Some((q[..end].to_owned(), &q[end + 1..]));
    }
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some((rest[..end].to_owned(), &rest[end..]))
}

/// A size: digits, maybe a fraction, and a unit (`B`, `K`, `M`, `G`, `T`, `P`, `E`; none
/// means MiB), as QEMU's monitor reads an octet count. Returns the bytes and what
/// follows the number.
fn size(rest: &str) -> Option<(i64, &str)> {
    let rest = rest.trim_start();
    let digits = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let number: f64 = rest[..digits].parse().ok()?;
    let mut tail = &rest[digits..];
    let shift = match tail.chars().next().map(|c| c.to_ascii_uppercase()) {
        Some('B') => 0,
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        Some('P') => 50,
        Some('E') => 60,
        _ => -1,
    };
    let shift = if shift >= 0 {
        tail = &tail[1..];
        shift
    } else {
        20
    };
    let bytes = number * (1u64 << shift) as f64;
    if !(0.0..9.2e18).contains(&bytes) {
        return None;
    }
    Some((bytes as i64, tail))
}

fn usage(cmd: &str, problem: &str) -> String {
    format!("{problem}\nTry \"help {cmd}\" for more information\n")
}

/// Reads `line` (what follows the command's name) by `signature`.
///
/// # Errors
/// QEMU's text for the first argument that does not fit.
pub(crate) fn parse(cmd: &str, signature: &'static str, line: &str) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    let mut rest = line;
    let params = params(signature);
    let mut i = 0;
    while i < params.len() {
        // A run of flags: `-x` words, each letter one of the run's.
        if params[i].kind.starts_with('-') {
            let run: Vec<&Param> = params[i..]
                .iter()
                .take_while(|p| p.kind.starts_with('-'))
                .collect();
            loop {
                let trimmed = rest.trim_start();
                let Some(letters) = trimmed.strip_prefix('-') else {
                    break;
                };
                let end = letters.find(char::is_whitespace).unwrap_or(letters.len());
                for c in letters[..end].chars() {
                    let p = run
                        .iter()
                        .find(|p| p.kind[1..].starts_with(c))
                        .ok_or_else(|| usage(cmd, &format!("{cmd}: unsupported option -{c}")))?;
                    out.0.insert(p.name, Value::Flag);
                }
                rest = &letters[end..];
            }
            i += run.len();
            continue;
        }
        let p = &params[i];
        i += 1;
        match p.kind {
            "o" => match size(rest) {
                Some((n, tail)) => {
                    out.0.insert(p.name, Value::Size(n));
                    rest = tail;
                }
                None if p.optional && rest.trim().is_empty() => {}
                None => return Err(usage(cmd, "invalid size")),
            },
            "l" => match super::expr::read(rest) {
                Ok((n, tail)) => {
                    out.0.insert(p.name, Value::Int(n));
                    rest = tail;
                }
                Err(_) if p.optional && rest.trim().is_empty() => {}
                Err(e) => return Err(usage(cmd, &e)),
            },
            "S" => {
                let text = rest.trim();
                if text.is_empty() && !p.optional {
                    return Err(usage(cmd, &format!("{cmd}: string expected")));
                }
                if !text.is_empty() {
                    out.0.insert(p.name, Value::Text(text.to_owned()));
                }
                rest = "";
            }
            kind => match word(rest) {
                Some((w, tail)) => {
                    out.0.insert(p.name, Value::Text(w));
                    rest = tail;
                }
                None if p.optional => {}
                None => {
                    let what = match kind {
                        "B" => "block device name",
                        "F" => "filename",
                        _ => "string",
                    };
                    return Err(usage(cmd, &format!("{cmd}: {what} expected")));
                }
            },
        }
    }
    if !rest.trim().is_empty() {
        return Err(usage(
            cmd,
            &format!("{cmd}: extraneous characters at the end of line"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse;

    const BACKUP: &str = "reuse:-n,full:-f,compress:-c,device:B,target:s,format:s?";

    #[test]
    fn flags_then_words() {
        let p = parse("drive_backup", BACKUP, "-n -f disk \"/a b.qcow2\"").unwrap();
        assert!(p.flag("reuse") && p.flag("full") && !p.flag("compress"));
        assert_eq!(p.text("device"), Some("disk"));
        assert_eq!(p.text("target"), Some("/a b.qcow2"));
        assert_eq!(p.text("format"), None);
        let p = parse("drive_backup", BACKUP, "-nc disk t raw").unwrap();
        assert!(p.flag("reuse") && p.flag("compress"));
        assert_eq!(p.text("format"), Some("raw"));
    }

    #[test]
    fn what_does_not_fit_is_named() {
        assert_eq!(
            parse("drive_backup", BACKUP, "").unwrap_err(),
            "drive_backup: block device name expected\nTry \"help drive_backup\" for more information\n"
        );
        assert!(
            parse("drive_backup", BACKUP, "-x d t")
                .unwrap_err()
                .starts_with("drive_backup: unsupported option -x\n")
        );
        let resize = "device:B,size:o";
        assert_eq!(
            parse("r", resize, "d 2M").unwrap().size("size"),
            Some(2 << 20)
        );
        assert_eq!(
            parse("r", resize, "d 4096B").unwrap().size("size"),
            Some(4096)
        );
        assert_eq!(
            parse("r", resize, "d 3").unwrap().size("size"),
            Some(3 << 20)
        );
        assert!(
            parse("r", resize, "d")
                .unwrap_err()
                .starts_with("invalid size\n")
        );
        assert!(
            parse("r", resize, "d 2X")
                .unwrap_err()
                .starts_with("r: extraneous characters at the end of line\n")
        );
    }
}
