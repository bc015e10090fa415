//! The descriptor: VMDK's text half. A file of its own for the multi-file image types, or
//! 20 sectors inside a monolithic sparse image. It says the image's type, its content ids
//! (`CID`, `parentCID`), its parent and its extents, one per line.
//!
//! QEMU reads it with `strstr` and `sscanf`, so a key is found anywhere in the text (a
//! comment too) and an extent line is scanned across line ends. These functions read it as
//! QEMU does, so that the same file opens the same way.

/// The most bytes of a descriptor file that are read (QEMU's bound).
pub(super) const MAX_DESCRIPTOR_FILE: usize = (1 << 20) - 1;

/// The largest descriptor file whose content id may be rewritten.
pub(super) const MAX_REWRITTEN: u64 = 16 << 20;

/// The bytes of `buf` a C string would hold: up to the first NUL.
pub(super) fn c_text(buf: &[u8]) -> &[u8] {
    buf.iter().position(|&b| b == 0).map_or(buf, |n| &buf[..n])
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// QEMU's probe of a descriptor file: blank lines and `#` comments, then a `version=1`,
/// `2` or `3` line.
pub(super) fn looks_like_descriptor(buf: &[u8]) -> bool {
    let mut p = 0;
    while p < buf.len() {
        match buf[p] {
            b'#' => {
                while p < buf.len() && buf[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < buf.len() && buf[p] == b' ' {
                    p += 1;
                }
                if p < buf.len() && buf[p] == b'\r' {
                    p += 1;
                }
                if p == buf.len() || buf[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &buf[p..];
                return [b'1', b'2', b'3'].iter().any(|v| {
                    let line = [b"version=".as_slice(), &[*v]].concat();
                    rest.starts_with(&[line.as_slice(), b"\n"].concat())
                        || rest.starts_with(&[line.as_slice(), b"\r\n"].concat())
                });
            }
        }
    }
    false
}

/// The quoted value after the first `name` in the text (`name="value"`), if it has a
/// closing quote and fits `max` bytes with its terminator.
pub(super) fn quoted(desc: &[u8], name: &str, max: usize) -> Option<String> {
    let start = find(desc, name.as_bytes())? + name.len() + 2;
    if start >= desc.len() {
        return None;
    }
    let len = desc[start..].iter().position(|&b| b == b'"')?;
    (len < max).then(|| String::from_utf8_lossy(&desc[start..start + len]).into_owned())
}

/// The hexadecimal content id after the first `key=` in the text (`CID` or
/// `parentCID`), as `sscanf("%x")` reads it.
pub(super) fn cid(desc: &[u8], key: &str) -> Option<u32> {
    let at = find(desc, key.as_bytes())? + key.len() + 1;
    let mut s = Scanner::new(desc.get(at..)?);
    s.skip_space();
    let negative = s.eat(b'-');
    if !negative {
        s.eat(b'+');
    }
    if s.peek() == Some(b'0') && matches!(s.peek_at(1), Some(b'x' | b'X')) {
        let after = s.peek_at(2);
        if after.is_some_and(|b| b.is_ascii_hexdigit()) {
            s.pos += 2;
        }
    }
    let mut value: u64 = 0;
    let mut digits = 0;
    while let Some(d) = s.peek().and_then(|b| (b as char).to_digit(16)) {
        value = value
            .checked_mul(16)
            .and_then(|v| v.checked_add(u64::from(d)))
            .unwrap_or(u64::MAX);
        digits += 1;
        s.pos += 1;
    }
    let value = if negative {
        value.wrapping_neg()
    } else {
        value
    };
    // scanf stores the low 32 bits.
    (digits > 0).then_some(value as u32)
}

/// The parent's file name (`parentFileNameHint="..."`): `Ok(None)` without one, `Err`
/// for one without its closing quote or longer than a path may be.
pub(super) fn parent_hint(desc: &[u8]) -> Result<Option<String>, ()> {
    const KEY: &[u8] = b"parentFileNameHint";
    const MAX_PATH: usize = 4096;
    let Some(at) = find(desc, KEY) else {
        return Ok(None);
    };
    let start = (at + KEY.len() + 2).min(desc.len());
    let len = desc[start..].iter().position(|&b| b == b'"').ok_or(())?;
    if len > MAX_PATH - 1 {
        return Err(());
    }
    Ok(Some(
        String::from_utf8_lossy(&desc[start..start + len]).into_owned(),
    ))
}

/// One extent line: `RW <sectors> <type> "<file>" [<offset>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExtentLine {
    pub(super) sectors: u64,
    pub(super) kind: String,
    pub(super) file: String,
    /// Where a flat extent's data starts in its file, in sectors.
    pub(super) flat_offset: u64,
}

/// The extent types QEMU knows.
const KINDS: [&str; 5] = ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"];

/// The descriptor's extent lines, as QEMU reads them: lines that do not scan as one, or
/// are not `RW`, or have no sectors or an unknown type, are passed over; a line that scans
/// but has the wrong number of fields for its type is refused (`Err` holds it).
pub(super) fn extent_lines(desc: &[u8]) -> Result<Vec<ExtentLine>, String> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < desc.len() {
        let next = desc[p..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(desc.len(), |n| p + n + 1);
        let fields = scan_extent(&desc[p..]);
        let line = &desc[p..next];
        let invalid = || {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            String::from_utf8_lossy(line).into_owned()
        };
        p = next;
        let Some((sectors, kind, file, offset, matches)) = fields else {
            continue;
        };
        let flat_offset = match kind.as_str() {
            "FLAT" => match offset {
                Some(o) if matches == 5 && o >= 0 => o as u64,
                _ => return Err(invalid()),
            },
            "VMFS" if matches == 4 => 0,
            "VMFS" => return Err(invalid()),
            _ if matches != 4 => return Err(invalid()),
            _ => 0,
        };
        if sectors <= 0 || !KINDS.contains(&kind.as_str()) {
            continue;
        }
        out.push(ExtentLine {
            sectors: sectors as u64,
            kind,
            file,
            flat_offset,
        });
    }
    Ok(out)
}

/// `sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\" %ld")` for an `RW` line with at least four
/// fields: (sectors, type, file, offset, fields matched).
fn scan_extent(text: &[u8]) -> Option<(i64, String, String, Option<i64>, usize)> {
    let mut s = Scanner::new(text);
    let access = s.word(10)?;
    s.skip_space();
    let sectors = s.long()?;
    s.skip_space();
    let kind = s.word(10)?;
    s.skip_space();
    if access != "RW" || !s.eat(b'"') {
        return None;
    }
    let file = s.run_until(511, b"\n\r\"")?;
    if !s.eat(b'"') {
        return Some((sectors, kind, file, None, 4));
    }
    s.skip_space();
    let offset = s.long();
    let matches = if offset.is_some() { 5 } else { 4 };
    Some((sectors, kind, file, offset, matches))
}

/// A cursor over text for the few `scanf` conversions QEMU uses.
struct Scanner<'a> {
    text: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a [u8]) -> Scanner<'a> {
        Scanner { text, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> Option<u8> {
        self.text.get(self.pos + n).copied().filter(|&b| b != 0)
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn skip_space(&mut self) {
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_whitespace() || b == 0x0b)
        {
            self.pos += 1;
        }
    }

    /// `%Ns`: up to `max` bytes that are not white space.
    fn word(&mut self, max: usize) -> Option<String> {
        self.skip_space();
        let start = self.pos;
        while self.pos - start < max
            && self
                .peek()
                .is_some_and(|b| !(b.is_ascii_whitespace() || b == 0x0b))
        {
            self.pos += 1;
        }
        (self.pos > start)
            .then(|| String::from_utf8_lossy(&self.text[start..self.pos]).into_owned())
    }

    /// `%N[^set]`: at least one and up to `max` bytes not in `set`.
    fn run_until(&mut self, max: usize, set: &[u8]) -> Option<String> {
        let start = self.pos;
        while self.pos - start < max && self.peek().is_some_and(|b| !set.contains(&b)) {
            self.pos += 1;
        }
        (self.pos > start)
            .then(|| String::from_utf8_lossy(&self.text[start..self.pos]).into_owned())
    }

    /// `%ld`: a signed decimal, clamped as `strtol` clamps.
    fn long(&mut self) -> Option<i64> {
        self.skip_space();
        let negative = self.eat(b'-');
        if !negative {
            self.eat(b'+');
        }
        let mut value: i64 = 0;
        let mut digits = 0;
        while let Some(d) = self.peek().filter(u8::is_ascii_digit) {
            let d = i64::from(d - b'0');
            value = value
                .checked_mul(10)
                .and_then(|v| {
                    if negative {
                        v.checked_sub(d)
                    } else {
                        v.checked_add(d)
                    }
                })
                .unwrap_or(if negative { i64::MIN } else { i64::MAX });
            digits += 1;
            self.pos += 1;
        }
        (digits > 0).then_some(value)
    }
}

/// The descriptor with a new content id, as QEMU rewrites it (`vmdk_write_cid`): the id
/// after the first `CID=`, then the text from `parentCID` on, the rest of the buffer as it
/// was. `None` if the text has no `parentCID`.
pub(super) fn with_cid(mut buf: Vec<u8>, new_cid: u32) -> Option<Vec<u8>> {
    let size = buf.len();
    if size == 0 {
        return None;
    }
    buf[size - 1] = 0;
    let text_len = c_text(&buf).len();
    let parent = find(&buf[..text_len], b"parentCID")?;
    let tail = buf[parent..text_len].to_vec();
    if let Some(at) = find(&buf[..text_len], b"CID") {
        let mut end = (at + 4).min(size - 1);
        for b in format!("{new_cid:x}\n").bytes() {
            if end + 1 >= size {
                break;
            }
            buf[end] = b;
            end += 1;
        }
        for &b in &tail {
            if end + 1 >= size {
                break;
            }
            buf[end] = b;
            end += 1;
        }
        buf[end] = 0;
    }
    Some(buf)
}

/// What a new image's descriptor says.
pub(super) struct NewDescriptor<'a> {
    pub(super) cid: u32,
    pub(super) parent_cid: u32,
    pub(super) create_type: &'a str,
    /// `parentFileNameHint="..."`, or nothing.
    pub(super) parent_line: String,
    /// The extent lines, each ending in a newline.
    pub(super) extents: String,
    pub(super) hw_version: &'a str,
    pub(super) cylinders: u64,
    pub(super) heads: u32,
    pub(super) adapter: &'a str,
    pub(super) tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The text QEMU writes for a new image.
    pub(super) fn render(&self) -> String {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n\
             # Extent description\n{}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            self.parent_line,
            self.extents,
            self.hw_version,
            self.cylinders,
            self.heads,
            self.adapter,
            self.tools_version
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESC: &[u8] = b"# Disk DescriptorFile\nversion=1\nCID=938876b\nparentCID=ffffffff\n\
        createType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"a-flat.vmdk\" 0\n\
        RW 100 SPARSE \"b.vmdk\"\nRO 5 FLAT \"c\" 0\n";

    #[test]
    fn keys_are_read_as_qemu_reads_them() {
        assert_eq!(cid(DESC, "CID"), Some(0x0938_876b));
        assert_eq!(cid(DESC, "parentCID"), Some(0xffff_ffff));
        assert_eq!(
            quoted(DESC, "createType", 128).as_deref(),
            Some("monolithicFlat")
        );
        assert_eq!(parent_hint(DESC), Ok(None));
        assert_eq!(
            parent_hint(b"parentFileNameHint=\"base.vmdk\"\n"),
            Ok(Some("base.vmdk".into()))
        );
        assert_eq!(parent_hint(b"parentFileNameHint=\"base"), Err(()));
        assert!(looks_like_descriptor(b"# c\n  \nversion=1\n"));
        assert!(!looks_like_descriptor(b"x\nversion=1\n"));
    }

    #[test]
    fn extent_lines_are_scanned_as_qemu_scans_them() {
        let lines = extent_lines(DESC).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].kind, "FLAT");
        assert_eq!((lines[1].sectors, lines[1].file.as_str()), (100, "b.vmdk"));
        assert_eq!(
            extent_lines(b"RW 10 FLAT \"x\"\n"),
            Err("RW 10 FLAT \"x\"".to_owned())
        );
        assert_eq!(
            extent_lines(b"RW 10 SPARSE \"x\" 3\n"),
            Err("RW 10 SPARSE \"x\" 3".to_owned())
        );
        assert_eq!(extent_lines(b"RW -1 SPARSE \"x\"\n"), Ok(vec![]));
    }

    #[test]
    fn a_new_cid_keeps_the_rest_of_the_text() {
        let mut buf = DESC.to_vec();
        buf.resize(512, 0);
        let out = with_cid(buf, 0xab).unwrap();
        let text = c_text(&out);
        assert!(
            text.starts_with(b"# Disk DescriptorFile\nversion=1\nCID=ab\nparentCID=ffffffff\n")
        );
        assert!(text.ends_with(b"RO 5 FLAT \"c\" 0\n"));
        assert_eq!(with_cid(b"CID=1\n".to_vec(), 2), None);
    }
}
