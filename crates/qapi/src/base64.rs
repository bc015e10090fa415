//! Base64 as QEMU's commands take it (`qbase64_decode`): only the alphabet, `=` and line
//! breaks are allowed, then GLib decodes leniently: line breaks are skipped, so `=` counts as a zero digit anywhere, a group's
//! `=` only drops the bytes after it, and digits short of a whole group are ignored.

/// The bytes `text` stands for, or `None` if it has a character outside the alphabet (QEMU's
/// "Base64 data contains invalid characters").
pub fn decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let mut group = 0u32;
    let mut digits = 0;
    // The last two characters read, for the padding each group's end is judged by.
    let mut recent = [0u8; 2];
    for &c in text {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => 0,
            b'\n' => continue,
            _ => return None,
        };
        recent = [recent[1], c];
        group = (group << 6) | u32::from(value);
        digits += 1;
        if digits == 4 {
            let [_, a, b, c] = group.to_be_bytes();
            out.push(a);
            if recent[0] != b'=' {
                out.push(b);
            }
            if recent[1] != b'=' {
                out.push(c);
            }
            (group, digits) = (0, 0);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn decodes_as_glib_after_qemus_check() {
        let d = |s: &str| decode(s.as_bytes());
        assert_eq!(d("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(d("YQ==").unwrap(), b"a");
        assert_eq!(d("YWI=").unwrap(), b"ab");
        // Short of a group: ignored.
        assert_eq!(d("/").unwrap(), b"");
        assert_eq!(d("YWJjZ").unwrap(), b"abc");
        // `=` inside counts as zero; only a group's last two characters drop bytes.
        assert_eq!(d("Y=Q=").unwrap(), vec![0x60, 0x04]);
        assert_eq!(d("====").unwrap(), vec![0]);
        assert_eq!(d("").unwrap(), b"");
        assert!(d("%%").is_none());
        assert_eq!(d("QU\nJD\n").unwrap(), b"ABC");
        assert!(d("QUJD\r\n").is_none());
    }
}
