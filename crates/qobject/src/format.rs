//! Writes values as QEMU writes them (QEMU counterpart: `qobject/qjson.c`).
//!
//! Compact form separates members with `", "` and keys with `": "`; the pretty form puts each
//! member on its own line, indented by four spaces. Dict members come in QEMU's hash order,
//! doubles as C's `%.17g`, and every character outside printable ASCII as `\uXXXX`.

use crate::value::{QDict, QObject};
use std::fmt::Write;

/// The compact JSON text of `value`, as QEMU's monitor writes it (without the line end).
pub fn to_json(value: &QObject) -> String {
    let mut out = String::new();
    write_value(&mut out, value, None);
    out
}

/// The pretty-printed JSON text of `value` (`pretty=on` monitors).
pub fn to_json_pretty(value: &QObject) -> String {
    let mut out = String::new();
    write_value(&mut out, value, Some(0));
    out
}

fn newline(out: &mut String, indent: Option<usize>) {
    if let Some(n) = indent {
        out.push('\n');
        for _ in 0..n {
            out.push_str("    ");
        }
    }
}

fn write_value(out: &mut String, value: &QObject, indent: Option<usize>) {
    let inner = indent.map(|n| n + 1);
    let sep = if indent.is_some() { "," } else { ", " };
    match value {
        QObject::Null => out.push_str("null"),
        QObject::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QObject::Int(i) => {
            let _ = write!(out, "{i}");
        }
        QObject::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        QObject::Double(d) => out.push_str(&format_double(*d)),
        QObject::String(s) => write_string(out, s),
        QObject::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, inner);
                write_value(out, item, inner);
            }
            newline(out, indent);
            out.push(']');
        }
        QObject::Dict(dict) => write_dict(out, dict, indent),
    }
}

fn write_dict(out: &mut String, dict: &QDict, indent: Option<usize>) {
    let inner = indent.map(|n| n + 1);
    let sep = if indent.is_some() { "," } else { ", " };
    out.push('{');
    for (i, (key, value)) in dict.iter_qemu_order().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        newline(out, inner);
        write_string(out, key);
        out.push_str(": ");
        write_value(out, value, inner);
    }
    newline(out, indent);
    out.push('}');
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='\u{7e}' => out.push(ch),
            _ => {
                let mut units = [0u16; 2];
                for unit in ch.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// A double as C's `printf("%.17g")` writes it: 17 significant digits, trailing zeros dropped,
/// exponent form when the exponent is below -4 or at least 17.
pub fn format_double(d: f64) -> String {
    const PRECISION: i32 = 17;
    if d.is_nan() {
        return if d.is_sign_negative() { "-nan" } else { "nan" }.to_owned();
    }
    if d.is_infinite() {
        return if d < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    // Rust's `{:e}` rounds correctly to the requested digits; read the exponent back from it.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, d);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..PRECISION).contains(&exp) {
        let mantissa = trim_fraction(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (PRECISION - 1 - exp).max(0) as usize;
        trim_fraction(&format!("{d:.decimals$}")).to_owned()
    }
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_match_printf_17g() {
        assert_eq!(format_double(1000.0), "1000");
        assert_eq!(
            format_double(18446744073709551616.0),
            "1.8446744073709552e+19"
        );
        assert_eq!(format_double(0.1), "0.10000000000000001");
        assert_eq!(format_double(1.5e-7), "1.4999999999999999e-07");
        assert_eq!(format_double(-0.0), "-0");
        assert_eq!(format_double(1e16), "10000000000000000");
        assert_eq!(format_double(1e17), "1e+17");
        assert_eq!(format_double(0.0001), "0.0001");
    }

    #[test]
    fn strings_escape_like_qemu() {
        let v = QObject::from("a\"\\\u{1}\u{e9}\u{1F600}/");
        assert_eq!(to_json(&v), r#""a\"\\\u0001\u00E9\uD83D\uDE00/""#);
    }

    #[test]
    fn pretty_form() {
        let v = QObject::Dict(QDict::new().with("return", QDict::new()));
        assert_eq!(to_json_pretty(&v), "{\n    \"return\": {\n    }\n}");
        let v = QObject::List(vec![QObject::Int(1), QObject::Int(2)]);
        assert_eq!(to_json_pretty(&v), "[\n    1,\n    2\n]");
    }
}
