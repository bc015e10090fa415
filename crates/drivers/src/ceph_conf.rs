//! Whether a Ceph configuration file would load, judged as librados judges it when QEMU's
//! `rbd` driver hands it the `conf` option (a file it cannot parse is EINVAL: "error
//! reading conf file X: Invalid argument", before any secret is looked at).
//!
//! The rules below were learned by giving qemu-storage-daemon 10.0.2 (and the librados it
//! links) files that differ in one thing each:
//! - before the first section only empty lines and comments (`#` or `;`, indented or not),
//!   or a single `key = value` as the very first line followed by nothing but blank lines
//!   and comments;
//! - a section header is `[name]` at the start of a line, with nothing after it but blanks
//!   and a comment;
//! - in a section: `key = value` lines (indented or not), blank lines and comments; a value
//!   may be double-quoted (then only blanks and a comment may follow); a backslash at the
//!   end of a line continues it on the next (not past the end of the file);
//! - a NUL byte, or a byte that is not ASCII, is refused (librados aborts on the latter, and
//!   QEMU with it; ferrite only refuses the file).

/// Whether librados would load `text` as a configuration file.
pub(crate) fn loads(text: &[u8]) -> bool {
    if text.iter().any(|&b| b == 0 || !b.is_ascii()) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    let Some(lines) = logical_lines(text) else {
        return false;
    };
    let mut state = State::Start;
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let blank_only = !line.is_empty() && line.trim_start_matches([' ', '\t']).is_empty();
        let kind = if line.is_empty() {
            Line::Empty
        } else if blank_only {
            Line::Blank
        } else if is_comment(line.trim_start_matches([' ', '\t'])) {
            Line::Comment
        } else if line.starts_with('[') {
            if !is_header(line) {
                return false;
            }
            Line::Header
        } else if is_key_value(line) {
            Line::KeyValue
        } else {
            return false;
        };
        state = match (state, kind) {
            (_, Line::Empty | Line::Comment) => state,
            (State::Start, Line::Blank) => return false,
            (_, Line::Blank) => state,
            (_, Line::Header) if state != State::TopKeyValue => State::Section,
            (State::Start, Line::KeyValue) if i == 0 => State::TopKeyValue,
            (State::Section, Line::KeyValue) => State::Section,
            _ => return false,
        };
    }
    true
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before any section or key.
    Start,
    /// After the one key the first line may give outside a section.
    TopKeyValue,
    /// Inside a section.
    Section,
}

enum Line {
    Empty,
    Blank,
    Comment,
    Header,
    KeyValue,
}

/// The file's lines with continuations (a backslash ending a line) joined; `None` where
/// the last line continues past the end of the file.
fn logical_lines(text: &str) -> Option<Vec<String>> {
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut out = Vec::new();
    let mut pending: Option<String> = None;
    for raw in body.split('\n') {
        let mut line = pending.take().unwrap_or_default();
        line.push_str(raw);
        match line.strip_suffix('\\') {
            Some(head) => pending = Some(head.to_owned()),
            None => out.push(line),
        }
    }
    if pending.is_some() {
        return None;
    }
    Some(out)
}

fn is_comment(s: &str) -> bool {
    s.starts_with('#') || s.starts_with(';')
}

/// What may follow a header or a quoted value: blanks, then a comment or nothing.
fn is_tail(s: &str) -> bool {
    let s = s.trim_start_matches([' ', '\t', '\r']);
    s.is_empty() || is_comment(s)
}

fn is_header(line: &str) -> bool {
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    match rest.split_once(']') {
        Some((name, tail)) => !name.is_empty() && is_tail(tail),
        None => false,
    }
}

fn is_key_value(line: &str) -> bool {
    let Some((key, value)) = line.split_once('=') else {
        return false;
    };
    let key = key.trim_matches([' ', '\t']);
    if key.is_empty() || key.contains(['#', ';']) {
        return false;
    }
    let value = value.trim_start_matches([' ', '\t']);
    match value.strip_prefix('"') {
        Some(quoted) => {
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => return is_tail(&quoted[i + 1..]),
                    _ => {}
                }
            }
            false
        }
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::loads;

    #[test]
    fn files_librados_loads() {
        for text in [
            "",
            "\n\n",
            "\r\n",
            "[global]\nfoo = bar\n",
            "# comment\n\n",
            "  # indented comment\n",
            ";c\n",
            "a = b\n",
            "a=b\n",
            "a = \"quoted\"\n",
            "k = \"a\\\"b\"\n",
            "k = \"a\" # c\n",
            "key with spaces = v\n",
            "a = b # comment\n",
            "a = b\n# c\n",
            "a = b\n  \n",
            "a = b\n\n\n",
            "a = \n",
            "a = b = c\n",
            "a \\\n= b\n",
            "[sec with space]\n",
            "[a] # c\n",
            "[a];c\n",
            "[0]\n",
            "# x\n[a]\nk = v\n",
            "\n[a]\nb = c\n\n[d]\n",
            "[s]\na = b\nc = d\\\n  e\n",
            "[s]\na = b\n  \n",
            "[s]\n  indented = x\na:b = c\na-b_c/d = 1\n",
        ] {
            assert!(loads(text.as_bytes()), "{text:?}");
        }
    }

    #[test]
    fn files_librados_refuses() {
        for text in [
            "foo\n",
            "a\n",
            "= b\n",
            "  \n",
            "\t\n",
            " \n[s]\n",
            "[global\n",
            "[]\n",
            "[a]b\n",
            " [a]\n",
            "[a]\n  [b]\n",
            "[a]\nk\n",
            "a = b\nc = d\n",
            "a = b\n\nc = d\n",
            "# x\na = b\n",
            "\na = b\n",
            "a = b\n[x]\n",
            "a=b\nfoo\n",
            "a = \"unterminated\n",
            "a = \"q\" x\n",
            "k = v\\\n",
            "a = b\n\0\n",
            "\u{e9} = b\n",
        ] {
            assert!(!loads(text.as_bytes()), "{text:?}");
        }
        assert!(!loads(&[0; 100]));
        assert!(!loads(b"#\xff\n"));
    }
}
