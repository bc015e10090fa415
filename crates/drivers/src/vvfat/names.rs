//! Directory entries' names and times: the 8.3 short name and the VFAT long-name entries
//! QEMU makes for a host file name, and the host name a guest's entries stand for.

use super::layout::ENTRY;

/// A deleted entry's first byte, also a valid first byte of a Japanese name, which an
/// entry then stores as [`KANJI_FAKE`].
const DELETED: u8 = 0xe5;
const KANJI_FAKE: u8 = 0x05;
/// Attributes of a long-name entry.
pub(crate) const LONG_NAME: u8 = 0x0f;

/// An entry's first byte when it is free, or deleted.
pub(crate) fn is_free(entry: &[u8]) -> bool {
    entry[0] == 0 || entry[0] == DELETED
}

/// A short name's character as QEMU keeps it (upper case), or 0 where it has none.
fn short_char(c: char) -> u8 {
    let mut upper = c.to_uppercase();
    let c = match (upper.next(), upper.next()) {
        (Some(u), None) => u,
        _ => c,
    };
    let code = c as u32;
    // QEMU tests the character with strchr, which sees only its low byte: a wide
    // character whose low byte is one of the symbols passes, as that byte.
    let low = code as u8;
    if c.is_ascii_digit()
        || c.is_ascii_uppercase()
        || (low != 0 && b"$%'-_@~`!(){}^#&".contains(&low))
    {
        low
    } else {
        0
    }
}

/// The 8.3 name QEMU gives `name` in a directory already holding the short names
/// `taken`: upper case, invalid characters dropped, a `~N` tail where the name lost
/// something or clashes. `None` if no tail up to `~999998` is free.
pub(crate) fn short_name(name: &str, taken: &[[u8; 11]]) -> Option<[u8; 11]> {
    let mut out = [b' '; 11];
    let mut copied = 0;
    let mut lossy = false;
    let mut last_dot = None;
    for (at, c) in name.char_indices() {
        if c == '.' {
            if copied == 0 {
                lossy = true;
            } else {
                lossy |= last_dot.is_some();
                last_dot = Some(at);
            }
        } else if last_dot.is_none() {
            let v = short_char(c);
            if copied < 8 && v != 0 {
                out[copied] = v;
                copied += 1;
            } else {
                lossy = true;
            }
        }
    }
    if let Some(dot) = last_dot {
        let mut j = 0;
        for c in name[dot + 1..].chars() {
            let v = short_char(c);
            if j < 3 && v != 0 {
                out[8 + j] = v;
                j += 1;
            } else {
                lossy = true;
            }
        }
    }
    if out[0] == DELETED {
        out[0] = KANJI_FAKE;
    }
    let base_len = out[..8].iter().position(|&b| b == b' ').unwrap_or(8);
    for i in u32::from(lossy)..999_999 {
        if i > 0 {
            let tail = format!("~{i}");
            let at = base_len.min(8 - tail.len());
            out[at..at + tail.len()].copy_from_slice(tail.as_bytes());
        }
        if !taken.contains(&out) {
            return Some(out);
        }
    }
    None
}

/// The checksum of a short name that its long-name entries carry.
pub(crate) fn checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Where the 13 UTF-16 characters of a long-name entry sit.
const LONG_SLOTS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/// The long-name entries of `name` in the order they are stored (the last part first),
/// their checksum still to be set.
pub(crate) fn long_entries(name: &str) -> Vec<[u8; ENTRY]> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    let count = (units.len() * 2).div_ceil(26);
    // A terminating NUL where there is room, then 0xffff padding.
    units.push(0);
    let mut entries = vec![[0u8; ENTRY]; count];
    for (i, e) in entries.iter_mut().enumerate() {
        e[0] = (count - i) as u8 | if i == 0 { 0x40 } else { 0 };
        e[11] = LONG_NAME;
        // Entry i holds part count - 1 - i.
        let part = count - 1 - i;
        for (k, &slot) in LONG_SLOTS.iter().enumerate() {
            let unit = units.get(part * 13 + k).copied().unwrap_or(0xffff);
            e[slot..slot + 2].copy_from_slice(&unit.to_le_bytes());
        }
    }
    entries
}

/// A long name gathered from its entries, as a directory is read.
#[derive(Default)]
pub(crate) struct LongName {
    units: Vec<u16>,
    expected: u8,
    checksum: Option<u8>,
}

impl LongName {
    /// Takes one long-name entry; false (and forgets the name) where it does not follow
    /// the one before.
    pub(crate) fn take(&mut self, e: &[u8]) -> bool {
        let seq = e[0] & 0x3f;
        if e[0] & 0x40 != 0 {
            self.units = vec![0xffff; usize::from(seq) * 13];
            self.expected = seq;
            self.checksum = Some(e[13]);
        } else if self.checksum != Some(e[13]) || seq + 1 != self.expected {
            self.clear();
            return false;
        }
        if seq == 0 || e[12] != 0 || e[26] != 0 || e[27] != 0 {
            self.clear();
            return false;
        }
        self.expected = seq;
        let base = usize::from(seq - 1) * 13;
        for (k, &slot) in LONG_SLOTS.iter().enumerate() {
            self.units[base + k] = u16::from_le_bytes([e[slot], e[slot + 1]]);
        }
        true
    }

    pub(crate) fn clear(&mut self) {
        *self = LongName::default();
    }

    /// The name, if complete and made for the short entry `short`.
    pub(crate) fn finish(&mut self, short: &[u8]) -> Option<String> {
        let done = self.expected == 1 && self.checksum == Some(checksum(short));
        let units = std::mem::take(&mut self.units);
        self.clear();
        if !done {
            return None;
        }
        let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
        String::from_utf16(&units[..end]).ok()
    }
}

/// The host name of a short entry without a long name: lower case, as QEMU names it.
pub(crate) fn host_name_of_short(e: &[u8]) -> Option<String> {
    let base = trim(&e[..8]);
    let ext = trim(&e[8..11]);
    let valid = |b: &u8| b.is_ascii() && short_char(char::from(*b)) == *b;
    if base.is_empty() || !base.iter().all(valid) || !ext.iter().all(valid) {
        return None;
    }
    let mut name: Vec<u8> = base.to_ascii_lowercase();
    if !ext.is_empty() {
        name.push(b'.');
        name.extend(ext.to_ascii_lowercase());
    }
    String::from_utf8(name).ok()
}

fn trim(b: &[u8]) -> &[u8] {
    let end = b.iter().rposition(|&c| c != b' ').map_or(0, |p| p + 1);
    &b[..end]
}

/// A time as a FAT entry's date and time words, in local time.
pub(crate) fn fat_date_time(secs: i64) -> (u16, u16) {
    let tm = ferrite_block::clock::local_tm(secs);
    let time = (tm.tm_sec / 2) | (tm.tm_min << 5) | (tm.tm_hour << 11);
    let date = tm.tm_mday | ((tm.tm_mon + 1) << 5) | ((tm.tm_year - 80) << 9);
    (date as u16, time as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &[u8; 11]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    #[test]
    fn short_names_are_qemus() {
        assert_eq!(s(&short_name("file0.txt", &[]).unwrap()), "FILE0   TXT");
        assert_eq!(
            s(&short_name("Big_File.Name.txt", &[]).unwrap()),
            "BIG_FI~1TXT"
        );
        assert_eq!(s(&short_name(".hidden", &[]).unwrap()), "HIDDEN~1   ");
        assert_eq!(s(&short_name("a b.c", &[]).unwrap()), "AB~1    C  ");
        let taken = [*b"FILE0   TXT"];
        assert_eq!(s(&short_name("FILE0.TXT", &taken).unwrap()), "FILE0~1 TXT");
        assert_eq!(
            s(&short_name("longername.txt", &[]).unwrap()),
            "LONGER~1TXT"
        );
    }

    #[test]
    fn long_names_round_trip() {
        for name in [
            "a",
            "file0.txt",
            "exactly-13ch",
            "exactly-13chr",
            "ünïcode näme.txt",
        ] {
            let short = short_name(name, &[]).unwrap();
            let mut entries = long_entries(name);
            for e in &mut entries {
                e[13] = checksum(&short);
            }
            let mut long = LongName::default();
            for e in &entries {
                assert!(long.take(e));
            }
            assert_eq!(long.finish(&short).as_deref(), Some(name));
        }
    }

    #[test]
    fn a_long_name_for_another_entry_is_dropped() {
        let mut long = LongName::default();
        for e in long_entries("x.txt") {
            long.take(&e);
        }
        assert_eq!(long.finish(b"X       TXT"), None);
        assert_eq!(
            host_name_of_short(b"NEWFILE TXT").as_deref(),
            Some("newfile.txt")
        );
        assert_eq!(host_name_of_short(b"A/B     TXT"), None);
    }
}
