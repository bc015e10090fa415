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
}
