//! The `key=value` texts login PDUs carry (RFC 7143, section 6), and what the operational
//! keys settle to.

/// Texts as sent: each `key=value` ended by a NUL.
pub(crate) fn encode(pairs: &[(&str, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// The pairs of a data segment (text that is no pair is skipped).
pub(crate) fn decode(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter_map(|item| {
            let s = String::from_utf8_lossy(item);
            let (k, v) = s.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The value of `key` among `pairs`.
pub(crate) fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// What the session's operational keys settled to.
#[derive(Debug, Clone)]
pub(crate) struct Negotiated {
    pub(crate) header_digest: bool,
    /// The target's `MaxRecvDataSegmentLength`: the most data one PDU to it may carry.
    pub(crate) max_send: usize,
    pub(crate) first_burst: usize,
    pub(crate) initial_r2t: bool,
    pub(crate) immediate_data: bool,
}

/// The operational keys ferrite offers (those of libiscsi's offer QEMU relies on).
pub(crate) const OFFER_FIRST_BURST: usize = 256 << 10;
pub(crate) const OFFER_MAX_BURST: usize = 16_776_192;

impl Negotiated {
    /// The settled values from the target's answers (RFC 7143's defaults where it is
    /// silent), given what was offered for the header digest.
    pub(crate) fn settle(answers: &[(String, String)], offered_digest: &str) -> Negotiated {
        let num = |k: &str, default: usize| {
            get(answers, k)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        let yes = |k: &str, default: bool| match get(answers, k) {
            Some(v) => v.eq_ignore_ascii_case("yes"),
            None => default,
        };
        let header_digest = match get(answers, "HeaderDigest") {
            Some(v) => v.eq_ignore_ascii_case("CRC32C"),
            // A target that does not answer takes the first offered.
            None => offered_digest.starts_with("CRC32C"),
        };
        // A boolean with `Or` semantics is yes when either side says so; `And`, when both.
        let initial_r2t = yes("InitialR2T", true);
        let immediate_data = yes("ImmediateData", true);
        let max_burst = num("MaxBurstLength", 262_144).min(OFFER_MAX_BURST);
        Negotiated {
            header_digest,
            max_send: num("MaxRecvDataSegmentLength", 8192).max(512),
            first_burst: num("FirstBurstLength", 65_536)
                .min(OFFER_FIRST_BURST)
                .min(max_burst),
            initial_r2t,
            immediate_data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip() {
        let bytes = encode(&[("A", "1".into()), ("Bee", "x=y".into())]);
        assert_eq!(bytes, b"A=1\0Bee=x=y\0");
        let pairs = decode(&bytes);
        assert_eq!(get(&pairs, "Bee"), Some("x=y"));
        assert_eq!(get(&pairs, "C"), None);
    }

    #[test]
    fn silence_means_the_defaults() {
        let n = Negotiated::settle(&[], "None,CRC32C");
        assert!(!n.header_digest && n.initial_r2t && n.immediate_data);
        assert_eq!((n.max_send, n.first_burst), (8192, 65536));
        let a = decode(b"HeaderDigest=CRC32C\0InitialR2T=No\0MaxRecvDataSegmentLength=65536\0FirstBurstLength=999999999\0");
        let n = Negotiated::settle(&a, "CRC32C");
        assert!(n.header_digest && !n.initial_r2t);
        assert_eq!((n.max_send, n.first_burst), (65536, 262_144));
    }
}
