//! Parser and formatter behaviour, including property tests.

use ferrite_qobject::{JsonStreamer, Limits, QDict, QObject, from_json, to_json};
use proptest::prelude::*;

fn parse_all(bytes: &[u8]) -> Vec<Result<String, String>> {
    let mut s = JsonStreamer::new();
    let mut out = Vec::new();
    s.feed(bytes, |r| {
        out.push(r.map(|v| to_json(&v)).map_err(|e| e.to_string()))
    });
    out
}

#[test]
fn messages_split_without_newlines() {
    let r = parse_all(br#"{"a":1}{'b':'x\'y'} [1, 2.5, -0, 18446744073709551615]{}"#);
    assert_eq!(
        r,
        vec![
            Ok(r#"{"a": 1}"#.into()),
            Ok(r#"{"b": "x'y"}"#.into()),
            Ok("[1, 2.5, 0, 18446744073709551615]".into()),
            Ok("{}".into()),
        ]
    );
}

#[test]
fn errors_match_qemu_texts() {
    let cases: &[(&[u8], &str)] = &[
        (br#"{"a":1,"a":2}"#, "JSON parse error, duplicate key"),
        (b"}", "JSON parse error, expecting value"),
        (b"\x01", "JSON parse error, stray '\u{1}'"),
        (b"{\"a\" 1}", "JSON parse error, missing : in object pair"),
        (b"{1:2}", "JSON parse error, key is not a string in object"),
        (b"[1 2]", "JSON parse error, expected separator in list"),
        (
            b"{\"a\":1 \"b\"}",
            "JSON parse error, expected separator in dict",
        ),
        (b"[nul]", "JSON parse error, invalid keyword 'nul'"),
        (
            b"[\"\\x\"]",
            "JSON parse error, invalid escape sequence in string",
        ),
        (
            b"[\"\\uD800\"]",
            "JSON parse error, \\uD800 is not a valid Unicode character",
        ),
        (
            b"[\"\xc3\x28\"]",
            "JSON parse error, invalid UTF-8 sequence in string",
        ),
    ];
    for (input, want) in cases {
        let r = parse_all(input);
        assert_eq!(r.first(), Some(&Err(want.to_string())), "input {input:?}");
    }
}

#[test]
fn numbers_keep_their_kind() {
    assert_eq!(
        from_json("9223372036854775807").unwrap(),
        QObject::Int(i64::MAX)
    );
    assert_eq!(
        from_json("9223372036854775808").unwrap(),
        QObject::UInt(1 << 63)
    );
    assert_eq!(
        from_json("18446744073709551616").unwrap(),
        QObject::Double(18446744073709551616.0)
    );
    assert_eq!(
        from_json("-9223372036854775809").unwrap(),
        QObject::Double(-9223372036854775808.0)
    );
    assert_eq!(from_json("1e3").unwrap(), QObject::Double(1000.0));
}

#[test]
fn nesting_limit_holds_and_parsing_recovers() {
    let mut input = "[".repeat(1025).into_bytes();
    input.extend_from_slice(b"\x01{\"ok\":true}");
    let r = parse_all(&input);
    assert_eq!(r[0], Err("JSON nesting depth limit exceeded".into()));
    assert_eq!(r.last(), Some(&Ok(r#"{"ok": true}"#.into())));
}

#[test]
fn size_and_count_limits_hold() {
    let limits = Limits {
        max_message_bytes: 100,
        max_tokens: 10,
        max_nesting: 1024,
    };
    let mut s = JsonStreamer::with_limits(limits);
    let mut out = Vec::new();
    let big = format!("[\"{}\"]", "x".repeat(500));
    s.feed(big.as_bytes(), |r| out.push(r.map_err(|e| e.to_string())));
    assert_eq!(out[0], Err("JSON token size limit exceeded".into()));
    out.clear();
    s.feed(b"\x01[1,2,3,4,5,6,7,8]", |r| {
        out.push(r.map_err(|e| e.to_string()))
    });
    assert!(out.contains(&Err("JSON token count limit exceeded".into())));
}

fn arb_qobject() -> impl Strategy<Value = QObject> {
    let leaf = prop_oneof![
        Just(QObject::Null),
        any::<bool>().prop_map(QObject::Bool),
        any::<i64>().prop_map(QObject::Int),
        ((i64::MAX as u64 + 1)..=u64::MAX).prop_map(QObject::UInt),
        any::<f64>()
            .prop_filter("finite", |d| d.is_finite())
            .prop_map(QObject::Double),
        "\\PC*".prop_map(QObject::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(QObject::List),
            prop::collection::vec(("[a-z-]{1,8}", inner), 0..8)
                .prop_map(|kv| QObject::Dict(kv.into_iter().collect::<QDict>())),
        ]
    })
}

/// A canonical text: dict keys sorted (QEMU's hash order lists keys of one bucket newest
/// first, so re-parsing may swap them), numbers as the formatter writes them (a double holding
/// an integer prints without a fraction, as in QEMU, and so comes back as an integer).
fn canon(v: &QObject) -> String {
    match v {
        QObject::Dict(d) => {
            let mut members: Vec<_> = d
                .iter()
                .map(|(k, v)| format!("{k:?}:{}", canon(v)))
                .collect();
            members.sort();
            format!("{{{}}}", members.join(","))
        }
        QObject::List(l) => format!("[{}]", l.iter().map(canon).collect::<Vec<_>>().join(",")),
        other => to_json(&from_json(&to_json(other)).unwrap()),
    }
}

proptest! {
    #[test]
    fn format_then_parse_round_trips(v in arb_qobject()) {
        let text = to_json(&v);
        let back = from_json(&text).unwrap();
        prop_assert_eq!(canon(&back), canon(&v));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut s = JsonStreamer::new();
        s.feed(&bytes, |_| {});
        s.finish(|_| {});
    }

    #[test]
    fn chunking_does_not_change_results(v in arb_qobject(), split in 0usize..200) {
        let text = format!("{{\"v\": {}}}", to_json(&v));
        let whole = parse_all(text.as_bytes());
        let cut = split.min(text.len());
        let mut s = JsonStreamer::new();
        let mut parts = Vec::new();
        s.feed(&text.as_bytes()[..cut], |r| parts.push(r.map(|v| to_json(&v)).map_err(|e| e.to_string())));
        s.feed(&text.as_bytes()[cut..], |r| parts.push(r.map(|v| to_json(&v)).map_err(|e| e.to_string())));
        prop_assert_eq!(whole, parts);
    }
}
