//! QEMU's keyval syntax for command-line options: `key=value,a.b=c,list.0=x`, with `,,` for a
//! literal comma, an implied first key (`qcow2,file=f` is `driver=qcow2,file=f`), and `help`.
//! A value starting with `{` is JSON instead. QEMU counterpart: `util/keyval.c`.

use ferrite_qapi::Error;
use ferrite_qobject::{QDict, QObject, from_json};

/// A parsed option: the value tree (scalars are strings in keyval form) and whether `help`
/// was asked for.
#[derive(Debug)]
pub struct Parsed {
    /// The value tree.
    pub value: QDict,
    /// Whether `help` was given.
    pub help: bool,
    /// Whether it came as JSON (its scalars are typed and are checked strictly).
    pub json: bool,
}

fn valid_fragment(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= 128
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses an option's text; `implied` names the key of a leading bare value.
///
/// # Errors
/// QEMU's keyval texts: "Invalid parameter 'k'", "Expected '=' after parameter 'k'",
/// "Parameters 'a.*' used inconsistently", JSON parse errors, and list index errors.
pub fn parse(text: &str, implied: Option<&str>) -> Result<Parsed, Error> {
    if text.starts_with('{') {
        let v = from_json(text).map_err(|e| Error::generic(e.to_string()))?;
        return match v {
            QObject::Dict(d) => Ok(Parsed {
                value: d,
                help: false,
                json: true,
            }),
            _ => Err(Error::generic("JSON argument must be an object")),
        };
    }
    let mut root = QDict::new();
    let mut help = false;
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() || first {
        // Key: up to '=' or ','.
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after = &rest[key_end..];
        if !after.starts_with('=') {
            // A bare item: `help`, or the implied key's value.
            if key == "help" || key == "?" {
                help = true;
                rest = after.strip_prefix(',').unwrap_or(after);
                first = false;
                continue;
            }
            match (first, implied) {
                (true, Some(implied_key)) if !key.is_empty() => {
                    let (value, remaining) = read_value(rest);
                    insert(&mut root, implied_key, value)?;
                    rest = remaining;
                    first = false;
                    continue;
                }
                _ => {
                    if key.is_empty() && after.is_empty() {
                        break;
                    }
                    if valid_key(key) {
                        return Err(Error::generic(format!(
                            "Expected '=' after parameter '{key}'"
                        )));
                    }
                    return Err(Error::generic(format!("Invalid parameter '{key}'")));
                }
            }
        }
        if !valid_key(key) {
            return Err(Error::generic(format!("Invalid parameter '{key}'")));
        }
        let (value, remaining) = read_value(&after[1..]);
        insert(&mut root, key, value)?;
        rest = remaining;
        first = false;
    }
    let value = listify(root, "")?;
    Ok(Parsed {
        value,
        help,
        json: false,
    })
}

fn valid_key(key: &str) -> bool {
    key.split('.').all(valid_fragment)
}

/// Reads a value up to an unescaped comma; returns it and the text after the comma.
fn read_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                value.push(',');
                i += 2;
                continue;
            }
            return (value, &s[i + 1..]);
        }
        let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
        value.push_str(&s[i..i + ch_len]);
        i += ch_len;
    }
    (value, "")
}

fn insert(root: &mut QDict, key: &str, value: String) -> Result<(), Error> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = root;
    for (i, part) in parts.iter().enumerate() {
        let prefix = parts[..=i].join(".");
        if i == parts.len() - 1 {
            if matches!(cur.get(part), Some(QObject::Dict(_))) {
                return Err(Error::generic(format!(
                    "Parameters '{prefix}.*' used inconsistently"
                )));
            }
            // A repeated key: the last one wins, as in QEMU.
            cur.insert(*part, value);
            return Ok(());
        }
        if !cur.contains_key(part) {
            cur.insert(*part, QDict::new());
        }
        cur = match cur.get_mut(part) {
            Some(QObject::Dict(d)) => d,
            _ => {
                return Err(Error::generic(format!(
                    "Parameters '{prefix}.*' used inconsistently"
                )));
            }
        };
    }
    Ok(())
}

/// Turns every dict whose keys are all decimal numbers into a list, checking 0..n.
fn listify(dict: QDict, prefix: &str) -> Result<QDict, Error> {
    let mut out = QDict::new();
    for (k, v) in dict {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        out.insert(k, listify_value(v, &path)?);
    }
    Ok(out)
}

fn listify_value(v: QObject, path: &str) -> Result<QObject, Error> {
    let QObject::Dict(d) = v else {
        return Ok(v);
    };
    let numeric = !d.is_empty() && d.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit()));
    if !numeric {
        return Ok(QObject::Dict(listify(d, path)?));
    }
    let mut items: Vec<(usize, QObject)> = Vec::new();
    for (k, v) in d {
        let idx: usize = k
            .parse()
            .map_err(|_| Error::generic(format!("Invalid parameter '{path}.{k}'")))?;
        let sub = format!("{path}.{k}");
        items.push((idx, listify_value(v, &sub)?));
    }
    items.sort_by_key(|(i, _)| *i);
    for (expected, (idx, _)) in items.iter().enumerate() {
        if *idx != expected {
            return Err(Error::generic(format!(
                "Parameter '{path}.{expected}' is missing"
            )));
        }
    }
    Ok(QObject::List(items.into_iter().map(|(_, v)| v).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_qobject::to_json;

    fn kv(text: &str, implied: Option<&str>) -> String {
        to_json(&QObject::Dict(parse(text, implied).unwrap().value))
    }

    #[test]
    fn implied_key_and_dots() {
        assert_eq!(
            kv("qcow2,file.filename=a,,b,node-name=n", Some("driver")),
            to_json(&QObject::Dict(
                QDict::new()
                    .with("driver", "qcow2")
                    .with("file", QDict::new().with("filename", "a,b"))
                    .with("node-name", "n")
            ))
        );
    }

    #[test]
    fn lists_from_numeric_keys() {
        let p = parse("bitmaps.0=a,bitmaps.1=b", None).unwrap();
        assert_eq!(
            p.value.get("bitmaps"),
            Some(&QObject::List(vec!["a".into(), "b".into()]))
        );
        let e = parse("bitmaps.0=a,bitmaps.2=b", None).unwrap_err();
        assert_eq!(e.desc, "Parameter 'bitmaps.1' is missing");
    }

    #[test]
    fn help_and_errors() {
        assert!(parse("help", Some("qom-type")).unwrap().help);
        assert!(parse("iothread,help", Some("qom-type")).unwrap().help);
        assert_eq!(
            parse("a=1,b", None).unwrap_err().desc,
            "Expected '=' after parameter 'b'"
        );
        assert_eq!(
            parse("a=1,b!=2", None).unwrap_err().desc,
            "Invalid parameter 'b!'"
        );
        assert_eq!(
            parse("a=1,a.b=2", None).unwrap_err().desc,
            "Parameters 'a.*' used inconsistently"
        );
    }

    #[test]
    fn json_form() {
        let p = parse(r#"{"qom-type":"iothread","id":"x"}"#, Some("qom-type")).unwrap();
        assert!(p.json);
    }
}
