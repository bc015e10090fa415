//! blkdebug's two option groups, `inject-error` and `set-state`, as QEMU holds them before it
//! makes rules of them: filled from a config file, read line by line as QEMU's
//! `qemu_config_parse` reads one, then from the node's own rule lists. Each group is checked
//! against its options' names and types as it is added, with QEMU's texts.

use ferrite_qapi::qemu_opts::{self, OptType};
use ferrite_qobject::{QDict, QObject};
use std::io::{BufRead, BufReader, Read};

/// The options of the `inject-error` group, in QEMU's order.
const INJECT_ERROR: &[(&str, OptType)] = &[
    ("event", OptType::Str),
    ("state", OptType::Number),
    ("iotype", OptType::Str),
    ("errno", OptType::Number),
    ("sector", OptType::Number),
    ("once", OptType::Bool),
    ("immediately", OptType::Bool),
];

/// The options of the `set-state` group.
const SET_STATE: &[(&str, OptType)] = &[
    ("event", OptType::Str),
    ("state", OptType::Number),
    ("new_state", OptType::Number),
];

/// Which group a rule's options belong to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Group {
    InjectError,
    SetState,
}

impl Group {
    /// Both groups, in the order QEMU makes rules of them.
    pub(super) const ALL: [Group; 2] = [Group::InjectError, Group::SetState];

    pub(super) fn name(self) -> &'static str {
        match self {
            Group::InjectError => "inject-error",
            Group::SetState => "set-state",
        }
    }

    fn options(self) -> &'static [(&'static str, OptType)] {
        match self {
            Group::InjectError => INJECT_ERROR,
            Group::SetState => SET_STATE,
        }
    }
}

/// One entry of a group: the options of one rule, checked.
#[derive(Debug)]
pub(super) struct RuleOpts {
    pub(super) group: Group,
    id: Option<String>,
    values: Vec<(String, String)>,
}

impl RuleOpts {
    /// A string option.
    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A number option (checked when added).
    pub(super) fn number(&self, name: &str) -> Option<u64> {
        self.get(name).and_then(|v| qemu_opts::number(v).ok())
    }

    /// A boolean option (checked when added); off when absent.
    pub(super) fn flag(&self, name: &str) -> bool {
        self.get(name).and_then(qemu_opts::boolean).unwrap_or(false)
    }
}

/// The groups' entries, in the order they were added.
#[derive(Default)]
pub(super) struct Groups {
    entries: Vec<RuleOpts>,
}

impl Groups {
    /// The entries of `group`, in order.
    pub(super) fn of(&self, group: Group) -> impl Iterator<Item = &RuleOpts> {
        self.entries.iter().filter(move |e| e.group == group)
    }

    /// Adds a group's entry from a dictionary of its options (`qemu_opts_from_qdict`): the
    /// group must exist, its `id` be an identifier not yet used in it, and each option be
    /// one of the group's, of its type.
    fn add(&mut self, group_name: &str, dict: &QDict) -> Result<(), String> {
        let group = Group::ALL
            .into_iter()
            .find(|g| g.name() == group_name)
            .ok_or_else(|| format!("There is no option group '{group_name}'"))?;
        let id = dict.get("id").and_then(QObject::as_str).map(str::to_owned);
        if let Some(id) = &id {
            if !is_identifier(id) {
                return Err("Parameter 'id' expects an identifier".to_owned());
            }
            if self.of(group).any(|e| e.id.as_ref() == Some(id)) {
                return Err(format!("Duplicate ID '{id}' for {group_name}"));
            }
        }
        let mut values = Vec::new();
        for (key, value) in dict.iter_qemu_order().filter(|(k, _)| *k != "id") {
            let value = match value {
                QObject::String(s) => s.clone(),
                QObject::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
                QObject::Int(_) | QObject::UInt(_) | QObject::Double(_) => {
                    ferrite_qobject::to_json(value)
                }
                _ => continue,
            };
            let Some(&(_, kind)) = group.options().iter().find(|(name, _)| *name == key) else {
                return Err(format!("Invalid parameter '{key}'"));
            };
            qemu_opts::check(key, kind, &value).map_err(|e| e.to_string())?;
            values.push((key.to_owned(), value));
        }
        self.entries.push(RuleOpts { group, id, values });
        Ok(())
    }

    /// Adds the rules of a node's `inject-error` and `set-state` lists, named
    /// `inject-error.0`... as QEMU names them.
    pub(super) fn add_lists(&mut self, opts: &ferrite_qapi::Args) -> Result<(), String> {
        for group in Group::ALL {
            let Some(QObject::List(items)) = opts.get(group.name()) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let Some(d) = item.as_dict() else { continue };
                let mut d = d.clone();
                d.insert("id", format!("{}.{i}", group.name()));
                self.add(group.name(), &d)?;
            }
        }
        Ok(())
    }

    /// Adds the groups of the config file at `path`.
    pub(super) fn read_file(&mut self, path: &str) -> Result<(), String> {
        let file = std::fs::File::open(path).map_err(|e| {
            format!(
                "Could not read blkdebug config file: {}",
                ferrite_qapi::os_msg(&e)
            )
        })?;
        self.read(BufReader::new(file))
    }

    /// Reads a config file as `qemu_config_parse` does. Lines are read 1023 bytes at most at
    /// a time (a longer one goes on as the next line) and scanned as C's `sscanf` scans them,
    /// so up to their first NUL:
    /// - a line that begins with a newline or `#` is skipped;
    /// - `[group]` or `[group "id"]` begins a group; the one before is added then;
    /// - any other line with something but white space is `key = "value"`, or, when it does
    ///   not read so, its first word with an empty value; a line of white space (or of NULs)
    ///   is "parse error".
    fn read(&mut self, mut reader: impl BufRead) -> Result<(), String> {
        // What the header scans left in QEMU's `group` buffer, even when they failed: the
        // last group is added under it.
        let mut group = String::new();
        let mut current: Option<(String, QDict)> = None;
        let mut raw = Vec::new();
        loop {
            raw.clear();
            let read = (&mut reader)
                .take(1023)
                .read_until(b'\n', &mut raw)
                .map_err(|e| format!("Cannot read config file: {}", ferrite_qapi::os_msg(&e)))?;
            if read == 0 {
                break;
            }
            if raw[0] == b'\n' || raw[0] == b'#' {
                continue;
            }
            let line = raw.split(|&b| b == 0).next().unwrap_or_default();
            if raw[0] == b'[' {
                if let Some(header) = scan_header(line, &mut group) {
                    let mut dict = QDict::new();
                    if let Some(id) = header.id {
                        dict.insert("id", id);
                    }
                    if let Some((name, prev)) = current.replace((group.clone(), dict)) {
                        self.add(&name, &prev)?;
                    }
                    continue;
                }
            }
            let Some((key, value)) = scan_pair(line) else {
                return Err("parse error".to_owned());
            };
            match &mut current {
                Some((_, dict)) => dict.insert(key, value),
                None => return Err("no group defined".to_owned()),
            }
        }
        if let Some((_, dict)) = current {
            self.add(&group, &dict)?;
        }
        Ok(())
    }
}

/// QEMU's identifiers: a letter, then letters, digits, `-`, `.` and `_`.
fn is_identifier(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A group's header line.
struct Header {
    id: Option<String>,
}

/// `[%63s "%63[^"]"]`, then `[%63[^]]]`: a header, if either reads. Each conversion that
/// succeeds writes `group`, as it writes QEMU's buffer, whether the header reads or not.
fn scan_header(line: &[u8], group: &mut String) -> Option<Header> {
    let mut scan = Scan::new(line);
    if scan.literal(b'[') {
        if let Some(name) = scan.word(63) {
            *group = text(name);
            scan.skip_space();
            if scan.literal(b'"') {
                if let Some(id) = scan.until(b'"', 63) {
                    return Some(Header { id: Some(text(id)) });
                }
            }
        }
    }
    let mut scan = Scan::new(line);
    if scan.literal(b'[') {
        if let Some(name) = scan.until(b']', 63) {
            *group = text(name);
            return Some(Header { id: None });
        }
    }
    None
}

/// ` %63s = "%1023[^"]"`, or ` %63s` alone (its value empty): a key and its value, unless
/// the line has nothing but white space.
fn scan_pair(line: &[u8]) -> Option<(String, String)> {
    let mut scan = Scan::new(line);
    let key = text(scan.word(63)?);
    scan.skip_space();
    let mut value = String::new();
    if scan.literal(b'=') {
        scan.skip_space();
        if scan.literal(b'"') {
            if let Some(v) = scan.until(b'"', 1023) {
                value = text(v);
            }
        }
    }
    Some((key, value))
}

/// Bytes of a config file as text; what is not UTF-8 becomes U+FFFD, as QEMU's JSON writer
/// shows it.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// C's `isspace`.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// A cursor over a line as `sscanf` reads it.
struct Scan<'a> {
    rest: &'a [u8],
}

impl<'a> Scan<'a> {
    fn new(line: &'a [u8]) -> Self {
        Scan { rest: line }
    }

    fn skip_space(&mut self) {
        let n = self.rest.iter().take_while(|&&b| is_c_space(b)).count();
        self.rest = &self.rest[n..];
    }

    /// A literal byte.
    fn literal(&mut self, byte: u8) -> bool {
        match self.rest.split_first() {
            Some((&b, rest)) if b == byte => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    /// Up to `max` bytes for which `keep` holds, at least one.
    fn take(&mut self, max: usize, keep: impl Fn(u8) -> bool) -> Option<&'a [u8]> {
        let n = self.rest.iter().take(max).take_while(|&&b| keep(b)).count();
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        (n > 0).then_some(taken)
    }

    /// `%Ns`: white space skipped, then a word.
    fn word(&mut self, max: usize) -> Option<&'a [u8]> {
        self.skip_space();
        self.take(max, |b| !is_c_space(b))
    }

    /// `%N[^c]`.
    fn until(&mut self, stop: u8, max: usize) -> Option<&'a [u8]> {
        self.take(max, |b| b != stop)
    }
}

#[cfg(test)]
mod tests {
    use super::{Group, Groups};

    fn read(text: &[u8]) -> Result<Groups, String> {
        let mut groups = Groups::default();
        groups.read(text).map(|()| groups)
    }

    #[test]
    fn config_files_read_as_qemu_reads_them() {
        let g = read(b"# errors\n[inject-error]\nevent = \"read_aio\"\nerrno = \"28\"\n\n[set-state]\nstate = \"1\"\n  event = \"write_aio\"\nnew_state = \"2\"\n").unwrap();
        let inject: Vec<_> = g.of(Group::InjectError).collect();
        assert_eq!(inject.len(), 1);
        assert_eq!(inject[0].get("event"), Some("read_aio"));
        assert_eq!(inject[0].number("errno"), Some(28));
        let set: Vec<_> = g.of(Group::SetState).collect();
        assert_eq!(set[0].number("new_state"), Some(2));
        assert_eq!(set[0].get("event"), Some("write_aio"));
    }

    #[test]
    fn lines_qemu_cannot_read() {
        let err = |t: &[u8]| read(t).err().unwrap_or_default();
        assert_eq!(err(b"event = \"x\"\n"), "no group defined");
        assert_eq!(err(b"[inject-error]\n  \n"), "parse error");
        assert_eq!(err(&[0u8; 4096]), "parse error");
        assert_eq!(err(b"[inject-error]\r\n\r\n"), "parse error");
        // An unquoted value reads as an empty one; a word alone as an option.
        assert_eq!(
            err(b"[inject-error]\nevent = read_aio\n")
                .is_empty()
                .then_some(()),
            Some(())
        );
        assert_eq!(
            err(b"[inject-error]\nevent=\"read_aio\"\n"),
            "Invalid parameter 'event=\"read_aio\"'"
        );
        assert_eq!(err(b"[foo]\n"), "There is no option group 'foo'");
        // A header that does not read leaves `]` in QEMU's group buffer.
        assert_eq!(err(b"[inject-error]\n[]\n"), "There is no option group ']'");
        assert_eq!(
            err(b"[inject-error \"1a\"]\n"),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            err(b"[inject-error \"a\"]\n[inject-error \"a\"]\n"),
            "Duplicate ID 'a' for inject-error"
        );
        assert_eq!(
            err(b"[set-state]\nstate = \"x\"\n"),
            "Parameter 'state' expects a number"
        );
        assert_eq!(
            err(b"[inject-error]\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
    }
}
