//! UTF-8 as QEMU reads it ("modified UTF-8": `C0 80` is NUL; surrogates, noncharacters and
//! overlong forms are invalid). QEMU counterpart: `util/unicode.c`.

/// Whether `cp` is a Unicode scalar value QEMU accepts in a string.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
}

/// Decodes the sequence at the start of `s` (non-empty). Returns the code point, or `None` if
/// the sequence is invalid, and how many bytes were consumed either way. Like QEMU, a broken
/// multi-byte sequence consumes its lead byte and the continuation bytes seen before the break.
pub(crate) fn decode_one(s: &[u8]) -> (Option<u32>, usize) {
    let lead = s[0];
    if lead < 0x80 {
        return (Some(u32::from(lead)), 1);
    }
    if lead >= 0xFE || lead & 0x40 == 0 {
        return (None, 1);
    }
    let len = lead.leading_ones() as usize;
    let mut cp = u32::from(lead) & ((1u32 << (7 - len)) - 1);
    let mut used = 1;
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => {
                cp = (cp << 6) | u32::from(b & 0x3F);
                used += 1;
            }
            _ => return (None, used),
        }
    }
    const MIN_FOR_LEN: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let overlong = cp < MIN_FOR_LEN[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, used);
    }
    (Some(cp), used)
}

/// Text from bytes that may not be valid UTF-8, with U+FFFD for each invalid sequence as QEMU
/// reports it (for example in "stray '...'" errors and `ringbuf-read` with format utf8).
pub fn lossy_from_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if let Ok(valid) = std::str::from_utf8(rest) {
            // Fast path; still re-check noncharacters QEMU refuses.
            if valid.chars().all(|c| is_valid_codepoint(c as u32)) {
                out.push_str(valid);
                break;
            }
        }
        let (cp, used) = decode_one(rest);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        rest = &rest[used..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf8_nul_decodes() {
        assert_eq!(decode_one(&[0xC0, 0x80]), (Some(0), 2));
    }

    #[test]
    fn overlong_and_surrogates_are_invalid() {
        assert_eq!(decode_one(&[0xC1, 0x81]).0, None);
        assert_eq!(decode_one(&[0xED, 0xA0, 0x80]).0, None);
        assert_eq!(decode_one(&[0xEF, 0xBF, 0xBF]).0, None); // U+FFFF
    }

    #[test]
    fn lossy_replaces_each_bad_sequence() {
        assert_eq!(lossy_from_bytes(b"a\xff\xfeb"), "a\u{FFFD}\u{FFFD}b");
        assert_eq!(lossy_from_bytes("h\u{e9}".as_bytes()), "h\u{e9}");
    }
}
