//! The text of QEMU's legacy option groups (`QemuOpts`: `-iscsi`, `-chardev`, `-drive`...):
//! `key=value` items split at commas, `,,` standing for a comma in a value.

/// The items of `text` in order, each a key and its value; an item without `=` has none
/// (a short-form boolean, or the group's implied first option).
pub fn split(text: &str) -> Vec<(String, Option<String>)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (p, None),
        })
        .collect()
}

/// A bare `KEY` (on) or `noKEY` (off), the deprecated short form of a boolean: the
/// option's name, its value and QEMU's warning.
pub fn short_form_boolean(key: &str) -> (String, &'static str, String) {
    let (name, value) = match key.strip_prefix("no") {
        Some(name) => (name, "off"),
        None => (key, "on"),
    };
    let warning =
        format!("short-form boolean option '{key}' deprecated\nPlease use {name}={value} instead");
    (name.to_owned(), value, warning)
}

/// A QemuOpts boolean (`qapi_bool_parse`): on/yes/true/y or off/no/false/n.
pub fn boolean(value: &str) -> Option<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Why [`number`] refused a value.
#[derive(Debug, PartialEq, Eq)]
pub enum NumberError {
    /// Not a number ("Parameter '...' expects a number").
    Invalid,
    /// More than 64 bits ("Value '...' is too large for parameter '...'").
    TooLarge,
}

/// A QemuOpts number (`qemu_strtou64` with base 0): decimal, `0x` hexadecimal or `0` octal,
/// after optional white space and sign; a minus sign wraps, as `strtoull` does.
pub fn number(value: &str) -> Result<u64, NumberError> {
    let v = value.trim_start_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b');
    let (negative, digits) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let (radix, digits) = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (16, hex)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumberError::Invalid);
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| NumberError::TooLarge)?;
    Ok(if negative { n.wrapping_neg() } else { n })
}

/// The value type of a QemuOpts option (`QemuOptType`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OptType {
    /// Any text.
    Str,
    /// `qemu_strtou64` with base 0.
    Number,
    /// on/off and their synonyms.
    Bool,
    /// A size with an optional suffix (`qemu_strtosz`).
    Size,
}

/// A value QEMU's option parser refuses for an option of its type, with QEMU's text.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A boolean option (named) with another value.
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    ExpectsBool(String),
    /// A number option (named) with another value.
    #[error("Parameter '{0}' expects a number")]
    ExpectsNumber(String),
    /// A number option beyond 64 bits.
    #[error("Value '{value}' is too large for parameter '{key}'")]
    NumberTooLarge {
        /// The text given.
        value: String,
        /// The option.
        key: String,
    },
    /// A size option (named) with another value.
    #[error("Parameter '{0}' expects {hint}", hint = crate::visit::SIZE_HINT.trim_end())]
    ExpectsSize(String),
}

/// Checks `value` for option `key` of type `ty`, as QEMU's `qemu_opt_parse` does.
///
/// # Errors
/// QEMU's text for a value that is not of the type.
pub fn check(key: &str, ty: OptType, value: &str) -> Result<(), ValueError> {
    match ty {
        OptType::Str => Ok(()),
        OptType::Bool => boolean(value)
            .map(drop)
            .ok_or_else(|| ValueError::ExpectsBool(key.to_owned())),
        OptType::Number => number(value).map(drop).map_err(|e| match e {
            NumberError::Invalid => ValueError::ExpectsNumber(key.to_owned()),
            NumberError::TooLarge => ValueError::NumberTooLarge {
                value: value.to_owned(),
                key: key.to_owned(),
            },
        }),
        OptType::Size => crate::visit::parse_size(value)
            .map(drop)
            .ok_or_else(|| ValueError::ExpectsSize(key.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn items_split_at_single_commas() {
        let items = super::split("a=1,,2,b,c=");
        assert_eq!(
            items,
            [
                ("a".to_owned(), Some("1,2".to_owned())),
                ("b".to_owned(), None),
                ("c".to_owned(), Some(String::new())),
            ]
        );
    }

    #[test]
    fn numbers_read_as_strtoull_reads_them() {
        use super::{NumberError, number};
        assert_eq!(number("0x10"), Ok(16));
        assert_eq!(number("010"), Ok(8));
        assert_eq!(number(" -1"), Ok(u64::MAX));
        assert_eq!(number("1k"), Err(NumberError::Invalid));
        assert_eq!(number(""), Err(NumberError::Invalid));
        assert_eq!(number("18446744073709551616"), Err(NumberError::TooLarge));
    }
}
