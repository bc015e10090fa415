//! Checks a value against a schema type, with QEMU's error texts, before any side effect.
//!
//! Two flavours, as in QEMU's qobject input visitor: [`Mode::Strict`] for QMP, where JSON types
//! must match, and [`Mode::Keyval`] for the command line, where every scalar arrives as a
//! string and is converted (`on`/`off`, numbers with base prefixes, sizes with suffixes). Both
//! return the checked value with scalars in their proper JSON type, so a handler sees the same
//! thing whichever way the input came. Members are visited in declaration order; the first
//! error wins, and unexpected members are reported only after every declared one is fine.

use crate::error::Error;
use crate::schema::{Builtin, IntWidth, Member, Schema, TypeDef, TypeRef};
use ferrite_qobject::{QDict, QObject, QType};

/// How scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QMP: the JSON type must match.
    Strict,
    /// Command line: scalars are strings to convert.
    Keyval,
}

/// Checks `value` against the named struct or union type, giving the checked dict.
///
/// # Errors
/// QEMU's "Parameter 'x' is missing", "Parameter 'x' is unexpected", "Invalid parameter type
/// for 'x', expected: T", "Parameter 'x' does not accept value 'y'" and range errors.
pub fn check_object(
    schema: &Schema,
    type_name: &str,
    value: &QObject,
    mode: Mode,
) -> Result<QDict, Error> {
    let v = Visitor { schema, mode };
    match v.named(type_name, value, &Path::Root)? {
        QObject::Dict(d) => Ok(d),
        _ => Err(Error::generic(format!(
            "Invalid parameter type for 'null', expected: {type_name}"
        ))),
    }
}

/// Checks `value` against any type reference.
///
/// # Errors
/// As [`check_object`].
pub fn check_value(
    schema: &Schema,
    ty: &TypeRef,
    value: &QObject,
    mode: Mode,
) -> Result<QObject, Error> {
    Visitor { schema, mode }.visit(ty, value, &Path::Root)
}

/// Checks a value given for a named member (as `qom-set` gives a property value), so that
/// errors name the member.
///
/// # Errors
/// As [`check_object`].
pub fn check_member(
    schema: &Schema,
    ty: &TypeRef,
    name: &str,
    value: &QObject,
) -> Result<QObject, Error> {
    Visitor {
        schema,
        mode: Mode::Strict,
    }
    .visit(ty, value, &Path::Member(&Path::Root, name))
}

/// Where in the input a value sits, for QEMU's dotted names (`backend.data.addr`, `list[2]`).
enum Path<'a> {
    Root,
    Member(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    /// The bare member name, as QEMU's core visitors report enum and range errors (`null`
    /// for list elements).
    fn leaf(&self) -> &str {
        match self {
            Path::Member(_, name) => name,
            _ => "null",
        }
    }

    /// The member's own name, or "null" for a list element or the root (what QEMU's
    /// generated alternate visitors name in their type errors).
    fn last(&self) -> String {
        match self {
            Path::Member(_, name) => (*name).to_owned(),
            Path::Root | Path::Index(..) => "null".to_owned(),
        }
    }

    fn full(&self) -> String {
        match self {
            Path::Root => "null".to_owned(),
            Path::Member(Path::Root, name) => (*name).to_owned(),
            Path::Member(parent, name) => format!("{}.{name}", parent.full()),
            Path::Index(parent, i) => format!("{}[{i}]", parent.full()),
        }
    }
}

fn wrong_type(path: &Path, expected: &str) -> Error {
    Error::generic(format!(
        "Invalid parameter type for '{}', expected: {expected}",
        path.full()
    ))
}

fn bad_value(path: &Path, expected: &str) -> Error {
    Error::generic(format!("Parameter '{}' expects {expected}", path.full()))
}

fn out_of_range(path: &Path, expected: &str) -> Error {
    Error::generic(format!("Parameter '{}' expects {expected}", path.leaf()))
}

struct Visitor<'s> {
    schema: &'s Schema,
    mode: Mode,
}

impl Visitor<'_> {
    fn visit(&self, ty: &TypeRef, value: &QObject, path: &Path) -> Result<QObject, Error> {
        match ty {
            TypeRef::Builtin(b) => self.builtin(*b, value, path),
            TypeRef::Named(name) => self.named(name, value, path),
            TypeRef::Array(elem) => {
                let QObject::List(items) = value else {
                    return Err(wrong_type(path, "array"));
                };
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.visit(elem, item, &Path::Index(path, i))?);
                }
                Ok(QObject::List(out))
            }
        }
    }

    fn named(&self, name: &str, value: &QObject, path: &Path) -> Result<QObject, Error> {
        let Some(def) = self.schema.type_def(name) else {
            return Err(Error::generic(format!("Unknown type '{name}'")));
        };
        match def {
            TypeDef::Enum(values) => {
                let s = self.string(value, path)?;
                if values.iter().any(|v| v.name == s) {
                    Ok(QObject::String(s.to_owned()))
                } else {
                    Err(Error::generic(format!(
                        "Parameter '{}' does not accept value '{s}'",
                        path.leaf()
                    )))
                }
            }
            TypeDef::Struct(members) => {
                let dict = self.dict(value, path)?;
                let mut out = QDict::new();
                self.members(members, dict, path, &mut out)?;
                self.no_extra(dict, &out, path)?;
                Ok(QObject::Dict(out))
            }
            TypeDef::Union { base, tag, cases } => {
                let dict = self.dict(value, path)?;
                let mut out = QDict::new();
                self.members(base, dict, path, &mut out)?;
                let variant = out
                    .get(tag)
                    .and_then(QObject::as_str)
                    .and_then(|t| cases.get(t));
                if let Some(variant) = variant {
                    let members = self.schema.struct_members(variant);
                    self.members(members, dict, path, &mut out)?;
                }
                self.no_extra(dict, &out, path)?;
                Ok(QObject::Dict(out))
            }
            TypeDef::Alternate(choices) => {
                let choice = choices
                    .iter()
                    .find(|c| self.accepts(c, value))
                    .ok_or_else(|| {
                        Error::generic(format!(
                            "Invalid parameter type for '{}', expected: {name}",
                            path.last()
                        ))
                    })?;
                self.visit(choice, value, path)
            }
        }
    }

    /// Whether an alternate's member would take this value (by its JSON type, as QEMU picks).
    fn accepts(&self, ty: &TypeRef, value: &QObject) -> bool {
        let qtype = value.qtype();
        match ty {
            TypeRef::Array(_) => qtype == QType::List,
            TypeRef::Builtin(b) => match (self.mode, b) {
                (_, Builtin::Any) => true,
                // On the command line a string may hold any scalar.
                (Mode::Keyval, Builtin::Null) => value.as_str() == Some(""),
                (Mode::Keyval, _) => qtype == QType::String,
                (Mode::Strict, Builtin::Str) => qtype == QType::String,
                (Mode::Strict, Builtin::Bool) => qtype == QType::Bool,
                (Mode::Strict, Builtin::Null) => qtype == QType::Null,
                (Mode::Strict, _) => qtype == QType::Number,
            },
            TypeRef::Named(n) => match self.schema.type_def(n) {
                Some(TypeDef::Enum(_)) => qtype == QType::String,
                Some(TypeDef::Struct(_) | TypeDef::Union { .. }) => qtype == QType::Dict,
                Some(TypeDef::Alternate(inner)) => inner.iter().any(|t| self.accepts(t, value)),
                None => false,
            },
        }
    }

    fn dict<'v>(&self, value: &'v QObject, path: &Path) -> Result<&'v QDict, Error> {
        value.as_dict().ok_or_else(|| wrong_type(path, "object"))
    }

    fn string<'v>(&self, value: &'v QObject, path: &Path) -> Result<&'v str, Error> {
        value.as_str().ok_or_else(|| wrong_type(path, "string"))
    }

    fn members(
        &self,
        members: &[Member],
        dict: &QDict,
        path: &Path,
        out: &mut QDict,
    ) -> Result<(), Error> {
        for m in members {
            let mpath = Path::Member(path, &m.name);
            match dict.get(&m.name) {
                Some(v) => {
                    let checked = self.visit(&m.ty, v, &mpath)?;
                    out.insert(m.name.clone(), checked);
                }
                None if m.optional => {}
                None => {
                    return Err(Error::generic(format!(
                        "Parameter '{}' is missing",
                        mpath.full()
                    )));
                }
            }
        }
        Ok(())
    }

    fn no_extra(&self, dict: &QDict, visited: &QDict, path: &Path) -> Result<(), Error> {
        match dict.visitor_leftovers(visited.keys()).first().copied() {
            None => Ok(()),
            Some((key, value)) => {
                let full = Path::Member(path, key).full();
                // A keyval group (`a.b=1` where `a` takes no members) is reported as a group.
                if self.mode == Mode::Keyval && value.qtype() == QType::Dict {
                    Err(Error::generic(format!(
                        "Parameters '{full}.*' are unexpected"
                    )))
                } else {
                    Err(Error::generic(format!("Parameter '{full}' is unexpected")))
                }
            }
        }
    }

    fn builtin(&self, b: Builtin, value: &QObject, path: &Path) -> Result<QObject, Error> {
        if b == Builtin::Any {
            return Ok(value.clone());
        }
        match self.mode {
            Mode::Strict => strict_scalar(b, value, path),
            Mode::Keyval => {
                if value.qtype() == QType::Dict {
                    return Err(Error::generic(format!(
                        "Parameters '{}.*' are unexpected",
                        path.full()
                    )));
                }
                let s = value.as_str().ok_or_else(|| wrong_type(path, "string"))?;
                keyval_scalar(b, s, path)
            }
        }
    }
}

fn range_name(signed: bool, w: IntWidth) -> &'static str {
    match (signed, w) {
        (true, IntWidth::W8) => "int8_t",
        (true, IntWidth::W16) => "int16_t",
        (true, IntWidth::W32) => "int32_t",
        (true, IntWidth::W64) => "int64_t",
        (false, IntWidth::W8) => "uint8_t",
        (false, IntWidth::W16) => "uint16_t",
        (false, IntWidth::W32) => "uint32_t",
        (false, IntWidth::W64) => "uint64_t",
    }
}

fn check_signed(i: i64, w: IntWidth, path: &Path) -> Result<QObject, Error> {
    let ok = match w {
        IntWidth::W8 => i8::try_from(i).is_ok(),
        IntWidth::W16 => i16::try_from(i).is_ok(),
        IntWidth::W32 => i32::try_from(i).is_ok(),
        IntWidth::W64 => true,
    };
    if ok {
        Ok(QObject::Int(i))
    } else {
        Err(out_of_range(path, range_name(true, w)))
    }
}

fn check_unsigned(u: u64, w: IntWidth, path: &Path) -> Result<QObject, Error> {
    let ok = match w {
        IntWidth::W8 => u8::try_from(u).is_ok(),
        IntWidth::W16 => u16::try_from(u).is_ok(),
        IntWidth::W32 => u32::try_from(u).is_ok(),
        IntWidth::W64 => true,
    };
    if ok {
        Ok(QObject::from(u))
    } else {
        Err(out_of_range(path, range_name(false, w)))
    }
}

/// QEMU reads negative numbers into unsigned members by wrapping them (kept for
/// compatibility), so `-1` is `u64::MAX`.
fn wrap_unsigned(value: &QObject) -> Option<u64> {
    value.as_u64().or_else(|| value.as_i64().map(|i| i as u64))
}

fn strict_scalar(b: Builtin, value: &QObject, path: &Path) -> Result<QObject, Error> {
    match b {
        Builtin::Str => match value {
            QObject::String(_) => Ok(value.clone()),
            _ => Err(wrong_type(path, "string")),
        },
        Builtin::Bool => match value {
            QObject::Bool(_) => Ok(value.clone()),
            _ => Err(wrong_type(path, "boolean")),
        },
        Builtin::Null => match value {
            QObject::Null => Ok(QObject::Null),
            _ => Err(wrong_type(path, "null")),
        },
        Builtin::Number => match value.as_f64() {
            Some(_) => Ok(value.clone()),
            None => Err(wrong_type(path, "number")),
        },
        Builtin::Int(w) => {
            let i = value.as_i64().ok_or_else(|| wrong_type(path, "integer"))?;
            check_signed(i, w, path)
        }
        Builtin::UInt(w) => {
            let u = wrap_unsigned(value).ok_or_else(|| bad_value(path, "uint64"))?;
            check_unsigned(u, w, path)
        }
        Builtin::Size => {
            let u = wrap_unsigned(value).ok_or_else(|| bad_value(path, "uint64"))?;
            Ok(QObject::from(u))
        }
        Builtin::Any => Ok(value.clone()),
    }
}

/// Parses an integer as C's `strtoll(s, 0)`-based helpers do: optional sign, `0x` hex,
/// leading-`0` octal, decimal; the whole string must be consumed. Whether it was negative,
/// and its magnitude.
pub fn parse_c_integer(s: &str) -> Option<(bool, u64)> {
    let t = s.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok().map(|v| (neg, v))
}

/// `qemu_strtosz`: a number (decimal, or hex without fraction) with an optional suffix
/// B, k/K, M, G, T, P, E (binary multiples); fractions allowed with a suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == 'x' || c == 'X'))
        .unwrap_or(s.len());
    // Hex digits include 'b'/'e' etc.; a trailing suffix letter must not be eaten as hex.
    let (num, suffix) = if s.starts_with("0x") || s.starts_with("0X") {
        s.split_at(split)
    } else {
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        s.split_at(split)
    };
    let mult: u64 = match suffix {
        "" | "B" | "b" => 1,
        "k" | "K" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return None,
    };
    if let Some(hex) = num.strip_prefix("0x").or_else(|| num.strip_prefix("0X")) {
        let v = u64::from_str_radix(hex, 16).ok()?;
        return v.checked_mul(mult);
    }
    if num.contains('.') {
        if mult == 1 {
            return None;
        }
        let v: f64 = num.parse().ok()?;
        let bytes = v * mult as f64;
        if !(0.0..18446744073709551616.0).contains(&bytes) {
            return None;
        }
        return Some(bytes as u64);
    }
    let v: u64 = num.parse().ok()?;
    v.checked_mul(mult)
}

/// What a size option takes, as QEMU words it after "expects" (with its hint lines).
pub const SIZE_HINT: &str = "a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n";

fn keyval_scalar(b: Builtin, s: &str, path: &Path) -> Result<QObject, Error> {
    match b {
        Builtin::Str => Ok(QObject::from(s)),
        Builtin::Bool => match s {
            "on" | "yes" | "true" | "y" => Ok(QObject::Bool(true)),
            "off" | "no" | "false" | "n" => Ok(QObject::Bool(false)),
            _ => Err(bad_value(path, "'on' or 'off'")),
        },
        Builtin::Null => {
            if s.is_empty() {
                Ok(QObject::Null)
            } else {
                Err(bad_value(path, "null"))
            }
        }
        Builtin::Number => s
            .trim()
            .parse::<f64>()
            .map(QObject::Double)
            .map_err(|_| bad_value(path, "number")),
        Builtin::Int(w) => {
            let (neg, mag) = parse_c_integer(s).ok_or_else(|| bad_value(path, "integer"))?;
            let i = if neg {
                0i64.checked_sub_unsigned(mag)
            } else {
                i64::try_from(mag).ok()
            };
            let i = i.ok_or_else(|| bad_value(path, "integer"))?;
            check_signed(i, w, path)
        }
        Builtin::UInt(w) => {
            let (neg, mag) = parse_c_integer(s).ok_or_else(|| bad_value(path, "integer"))?;
            let u = if neg { mag.wrapping_neg() } else { mag };
            check_unsigned(u, w, path)
        }
        Builtin::Size => parse_size(s)
            .map(QObject::from)
            .ok_or_else(|| bad_value(path, SIZE_HINT)),
        Builtin::Any => Ok(QObject::from(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::schema;
    use ferrite_qobject::from_json;

    fn strict(ty: &str, json: &str) -> Result<QDict, String> {
        check_object(schema(), ty, &from_json(json).unwrap(), Mode::Strict).map_err(|e| e.desc)
    }

    #[test]
    fn missing_before_unexpected() {
        assert_eq!(
            strict("q_obj_chardev-add-arg", r#"{"id":"x","bogus":1}"#),
            Err("Parameter 'backend' is missing".into())
        );
    }

    #[test]
    fn nested_paths_are_dotted() {
        let e = strict(
            "q_obj_chardev-add-arg",
            r#"{"id":"x","backend":{"type":"socket","data":{"addr":{"type":"unix","data":{}}}}}"#,
        );
        assert_eq!(
            e,
            Err("Parameter 'backend.data.addr.data.path' is missing".into())
        );
    }

    #[test]
    fn wrong_types_and_enums() {
        assert_eq!(
            strict("q_obj_chardev-add-arg", r#"{"id":5}"#),
            Err("Invalid parameter type for 'id', expected: string".into())
        );
        assert_eq!(
            strict("ObjectOptions", r#"{"qom-type":"nope","id":"x"}"#),
            Err("Parameter 'qom-type' does not accept value 'nope'".into())
        );
        assert_eq!(
            strict("q_obj_qmp_capabilities-arg", r#"{"enable":["x"]}"#),
            Err("Parameter 'null' does not accept value 'x'".into())
        );
    }

    #[test]
    fn keyval_converts_scalars() {
        let v = from_json(r#"{"qom-type":"iothread","id":"i","poll-max-ns":"0x10"}"#).unwrap();
        let d = check_object(schema(), "ObjectOptions", &v, Mode::Keyval).unwrap();
        assert_eq!(d.get("poll-max-ns"), Some(&QObject::Int(16)));
        let v = from_json(r#"{"qom-type":"iothread","id":"i","poll-max-ns":"abc"}"#).unwrap();
        let e = check_object(schema(), "ObjectOptions", &v, Mode::Keyval).unwrap_err();
        assert_eq!(e.desc, "Parameter 'poll-max-ns' expects integer");
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1.5k"), Some(1536));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1Z"), None);
    }
}
