//! Connecting to a portal and logging in (RFC 7143, sections 6 and 12): security
//! negotiation (none or CHAP with MD5), then the operational keys, then the full-feature
//! phase. Failures read as libiscsi's, which QEMU's messages carry.

use crate::pdu::{self, FINAL, Header, IMMEDIATE, LOGIN_REQUEST, LOGIN_RESPONSE};
use crate::text::{self, Negotiated};
use md5::{Digest, Md5};
use std::io;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Who logs in where, and how.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// `HOST[:PORT]`, as the `portal` option says it.
    pub(crate) portal: String,
    pub(crate) name: String,
    pub(crate) initiator: String,
    pub(crate) chap: Option<(String, String)>,
    /// The `HeaderDigest` offer: `None`, `CRC32C`, `CRC32C,None` or `None,CRC32C`.
    pub(crate) digest: &'static str,
}

/// A logged-in connection.
pub(crate) struct LoggedIn {
    pub(crate) stream: TcpStream,
    pub(crate) negotiated: Negotiated,
    pub(crate) cmdsn: u32,
    pub(crate) exp_statsn: u32,
    pub(crate) max_cmdsn: u32,
}

/// Login stages (CSG/NSG).
const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// The transit bit of a login request's byte 1.
const TRANSIT: u8 = FINAL;

/// libiscsi's words for a login's status class and detail.
fn status_text(status: u16) -> &'static str {
    match status {
        0x0101 => "Target moved temporarily",
        0x0102 => "Target moved permanently",
        0x0200 => "Initiator error",
        0x0201 => "Authentication failure",
        0x0202 => "Authorization failure",
        0x0203 => "Target not found",
        0x0204 => "Target removed",
        0x0205 => "Unsupported version",
        0x0206 => "Too many connections",
        0x0207 => "Missing parameter",
        0x0208 => "Can't include in session",
        0x0209 => "Session type not supported",
        0x020a => "Session does not exist",
        0x020b => "Invalid request during login",
        0x0300 => "Target error",
        0x0301 => "Service unavailable",
        0x0302 => "Out of resources",
        _ => "Unknown login status",
    }
}

/// The portal's host and port (3260 unless said; `[v6]` in brackets).
pub(crate) fn host_port(portal: &str) -> (String, u16) {
    if let Some(rest) = portal.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        let port = after.strip_prefix(':').and_then(|p| p.parse().ok());
        return (host.to_owned(), port.unwrap_or(3260));
    }
    match portal.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_owned(), p.parse().unwrap_or(3260)),
        _ => (portal.to_owned(), 3260),
    }
}

/// The portal's addresses (libiscsi's text when it has none).
pub(crate) async fn resolve(portal: &str) -> Result<Vec<std::net::SocketAddr>, String> {
    let (host, port) = host_port(portal);
    let addrs: Vec<_> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a.collect(),
        Err(_) => Vec::new(),
    };
    if addrs.is_empty() {
        return Err(format!(
            "Failed to start full connect Invalid target:{portal}  Can not resolv into IPv4/v6."
        ));
    }
    Ok(addrs)
}

/// libiscsi's words for a connection lost (or never made) before the session logged in: it
/// would reconnect a session that had.
const LOST_BEFORE_LOGIN: &str = "iscsi_service failed with : iscsi_service_reconnect_if_loggedin. Can not reconnect right now.\n";

/// Connects to the portal (libiscsi's texts for what fails).
async fn connect(portal: &str) -> Result<TcpStream, String> {
    for addr in resolve(portal).await? {
        if let Ok(s) = TcpStream::connect(addr).await {
            let _ = s.set_nodelay(true);
            return Ok(s);
        }
    }
    Err(LOST_BEFORE_LOGIN.into())
}

/// An initiator session id: random-type (RFC 7143, 11.12.5), different per process and
/// login.
fn isid() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish().to_be_bytes();
    [0x80, r[0], r[1], r[2], 0, 0]
}

/// A CHAP challenge or response value (`0x` hex or `0b` base64) as bytes.
fn chap_bytes(v: &str) -> Option<Vec<u8>> {
    let hex = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X"))?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

/// The CHAP response (MD5 of identifier, secret, challenge), as `0x` hex.
fn chap_response(id: u8, secret: &str, challenge: &[u8]) -> String {
    let mut md5 = Md5::new();
    md5.update([id]);
    md5.update(secret.as_bytes());
    md5.update(challenge);
    let sum = md5.finalize();
    let mut out = String::from("0x");
    for b in sum {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

struct Login {
    stream: TcpStream,
    isid: [u8; 6],
    cmdsn: u32,
    exp_statsn: u32,
    max_cmdsn: u32,
    tsih: u16,
}

impl Login {
    /// Sends one login request and reads its answer: (transit, next stage, keys).
    async fn exchange(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(&str, String)],
    ) -> Result<(bool, u8, Vec<(String, String)>), String> {
        let data = text::encode(keys);
        let flags = if transit { TRANSIT | (nsg & 3) } else { 0 } | ((csg & 3) << 2);
        let mut h = Header::new(IMMEDIATE | LOGIN_REQUEST, flags);
        h.0[8..14].copy_from_slice(&self.isid);
        h.0[14..16].copy_from_slice(&self.tsih.to_be_bytes());
        h.set_u32(16, 0)
            .set_u32(24, self.cmdsn)
            .set_u32(28, self.exp_statsn);
        h.set_data_len(data.len());
        let mut out = h.wire(false);
        out.extend_from_slice(&data);
        out.resize(out.len() + pdu::padding(data.len()), 0);
        let lost = |_: io::Error| LOST_BEFORE_LOGIN.to_owned();
        self.stream.write_all(&out).await.map_err(lost)?;
        let reply = pdu::read_pdu(&mut self.stream, false).await.map_err(lost)?;
        if reply.opcode() != LOGIN_RESPONSE {
            return Err("Failed to log in to target. Unexpected PDU during login".into());
        }
        let status = u16::from_be_bytes([reply.bhs[36], reply.bhs[37]]);
        if status != 0 {
            return Err(format!(
                "Failed to log in to target. Status: {}({status})",
                status_text(status)
            ));
        }
        self.tsih = u16::from_be_bytes([reply.bhs[14], reply.bhs[15]]);
        self.exp_statsn = reply.u32_at(24).wrapping_add(1);
        self.cmdsn = reply.u32_at(28);
        self.max_cmdsn = reply.u32_at(32);
        let transit = reply.bhs[1] & TRANSIT != 0;
        Ok((transit, reply.bhs[1] & 3, text::decode(&reply.data)))
    }
}

/// Connects and logs in to `target`'s normal session.
///
/// # Errors
/// libiscsi's text for the failure.
pub(crate) async fn login(target: &Target) -> Result<LoggedIn, String> {
    let stream = connect(&target.portal).await?;
    let mut l = Login {
        stream,
        isid: isid(),
        cmdsn: 1,
        exp_statsn: 0,
        max_cmdsn: 1,
        tsih: 0,
    };
    let auth = if target.chap.is_some() {
        "CHAP,None"
    } else {
        "None"
    };
    let first = [
        ("InitiatorName", target.initiator.clone()),
        ("TargetName", target.name.clone()),
        ("SessionType", "Normal".to_owned()),
        ("AuthMethod", auth.to_owned()),
    ];
    let (mut transit, mut nsg, keys) = l.exchange(SECURITY, OPERATIONAL, true, &first).await?;
    if text::get(&keys, "AuthMethod") == Some("CHAP") {
        let Some((user, secret)) = &target.chap else {
            return Err("Failed to log in to target. Status: Authentication failure(513)".into());
        };
        let (_, _, challenge) = l
            .exchange(SECURITY, OPERATIONAL, false, &[("CHAP_A", "5".into())])
            .await?;
        let id = text::get(&challenge, "CHAP_I").and_then(|v| v.parse::<u8>().ok());
        let c = text::get(&challenge, "CHAP_C").and_then(chap_bytes);
        let (Some(id), Some(c)) = (id, c) else {
            return Err("Failed to log in to target. Invalid CHAP challenge".into());
        };
        let answer = [
            ("CHAP_N", user.clone()),
            ("CHAP_R", chap_response(id, secret, &c)),
        ];
        (transit, nsg, _) = l.exchange(SECURITY, OPERATIONAL, true, &answer).await?;
    }
    // Some targets want another round before they move on.
    let mut rounds = 0;
    while !(transit && nsg == OPERATIONAL) {
        rounds += 1;
        if rounds > 8 {
            return Err("Failed to log in to target. Security negotiation did not end".into());
        }
        (transit, nsg, _) = l.exchange(SECURITY, OPERATIONAL, true, &[]).await?;
    }
    let offer = [
        ("HeaderDigest", target.digest.to_owned()),
        ("DataDigest", "None".to_owned()),
        ("InitialR2T", "No".to_owned()),
        ("ImmediateData", "Yes".to_owned()),
        ("MaxBurstLength", text::OFFER_MAX_BURST.to_string()),
        ("FirstBurstLength", text::OFFER_FIRST_BURST.to_string()),
        ("MaxRecvDataSegmentLength", pdu::MAX_RECV.to_string()),
        ("MaxConnections", "1".to_owned()),
        ("MaxOutstandingR2T", "1".to_owned()),
        ("DefaultTime2Wait", "2".to_owned()),
        ("DefaultTime2Retain", "0".to_owned()),
        ("DataPDUInOrder", "Yes".to_owned()),
        ("DataSequenceInOrder", "Yes".to_owned()),
        ("ErrorRecoveryLevel", "0".to_owned()),
        ("IFMarker", "No".to_owned()),
        ("OFMarker", "No".to_owned()),
    ];
    let (mut transit, mut nsg, mut answers) =
        l.exchange(OPERATIONAL, FULL_FEATURE, true, &offer).await?;
    let mut rounds = 0;
    while !(transit && nsg == FULL_FEATURE) {
        rounds += 1;
        if rounds > 8 {
            return Err("Failed to log in to target. Negotiation did not end".into());
        }
        let more;
        (transit, nsg, more) = l.exchange(OPERATIONAL, FULL_FEATURE, true, &[]).await?;
        answers.extend(more);
    }
    Ok(LoggedIn {
        negotiated: Negotiated::settle(&answers, target.digest),
        stream: l.stream,
        cmdsn: l.cmdsn,
        exp_statsn: l.exp_statsn,
        max_cmdsn: l.max_cmdsn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portals_name_host_and_port() {
        assert_eq!(host_port("10.0.0.1"), ("10.0.0.1".into(), 3260));
        assert_eq!(host_port("h:3270"), ("h".into(), 3270));
        assert_eq!(host_port("[::1]:99"), ("::1".into(), 99));
        assert_eq!(host_port("[::1]"), ("::1".into(), 3260));
    }

    #[test]
    fn chap_answers_as_rfc_1994_says() {
        // MD5(0x01 || "secret" || 0x0102), computed with Python's hashlib.
        assert_eq!(
            chap_response(1, "secret", &[1, 2]),
            "0x18c6ee42cdcc2258144945ad28cad5a2"
        );
        assert_eq!(chap_bytes("0x0aFF"), Some(vec![10, 255]));
        assert_eq!(chap_bytes("0x0"), None);
        assert_eq!(chap_bytes("zz"), None);
    }
}
