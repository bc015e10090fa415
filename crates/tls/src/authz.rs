//! Authorization objects (QEMU: `authz/simple.c`, `authz/list.c`): they
//! judge an identity, for NBD a TLS client's distinguished name.

use ferrite_qobject::QObject;

/// An object that says whether an identity may connect.
pub trait Authz {
    /// Whether `identity` is allowed.
    ///
    /// # Errors
    /// The object cannot decide (a list file that no longer reads).
    fn is_allowed(&self, identity: &str) -> Result<bool, String>;
}

/// `authz-simple`: exactly one identity.
pub struct AuthzSimple(pub String);

impl Authz for AuthzSimple {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        Ok(identity == self.0)
    }
}

/// A rule's or the list's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Refuse.
    Deny,
    /// Let in.
    Allow,
}

impl Policy {
    /// From its QAPI name.
    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "deny" => Some(Policy::Deny),
            "allow" => Some(Policy::Allow),
            _ => None,
        }
    }

    /// Its QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Deny => "deny",
            Policy::Allow => "allow",
        }
    }
}

/// One rule of a list.
#[derive(Debug, Clone)]
pub struct AuthzRule {
    /// The identity, or a glob of `*` and `?`.
    pub pattern: String,
    /// What a match decides.
    pub policy: Policy,
    /// Whether `pattern` is a glob (else exact).
    pub glob: bool,
}

/// `authz-list`: the first matching rule decides, else the default policy.
#[derive(Debug, Clone)]
pub struct AuthzList {
    /// When no rule matches (default: deny).
    pub policy: Policy,
    /// In order.
    pub rules: Vec<AuthzRule>,
}

impl AuthzList {
    /// A list from `AuthZListProperties` (already checked against the schema).
    pub fn from_qobject(props: &QObject) -> AuthzList {
        let dict = props.as_dict();
        let policy = dict
            .and_then(|d| d.get("policy"))
            .and_then(QObject::as_str)
            .and_then(Policy::parse)
            .unwrap_or(Policy::Deny);
        let rules = dict
            .and_then(|d| d.get("rules"))
            .and_then(QObject::as_list)
            .map(|rules| {
                rules
                    .iter()
                    .filter_map(QObject::as_dict)
                    .map(|r| AuthzRule {
                        pattern: r
                            .get("match")
                            .and_then(QObject::as_str)
                            .unwrap_or("")
                            .into(),
                        policy: r
                            .get("policy")
                            .and_then(QObject::as_str)
                            .and_then(Policy::parse)
                            .unwrap_or(Policy::Deny),
                        glob: r.get("format").and_then(QObject::as_str) == Some("glob"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        AuthzList { policy, rules }
    }
}

impl Authz for AuthzList {
    fn is_allowed(&self, identity: &str) -> Result<bool, String> {
        for rule in &self.rules {
            let hit = if rule.glob {
                glob_matches(rule.pattern.as_bytes(), identity.as_bytes())
            } else {
                rule.pattern == identity
            };
            if hit {
                return Ok(rule.policy == Policy::Allow);
            }
        }
        Ok(self.policy == Policy::Allow)
    }
}

/// glib's `g_pattern_match_simple`: `*` any run, `?` any one character, nothing escaped.
fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(b'?') => {
                p += 1;
                // One character, not one byte.
                t += 1;
                while t < text.len() && text[t] & 0xc0 == 0x80 {
                    t += 1;
                }
            }
            Some(&c) if c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::glob_matches;

    #[test]
    fn globs_match_as_glib() {
        let m = |p: &str, t: &str| glob_matches(p.as_bytes(), t.as_bytes());
        assert!(m("CN=*,O=Example", "CN=laptop,O=Example"));
        assert!(m("*", ""));
        assert!(m("a?c", "abc"));
        assert!(m("a?c", "aéc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*.example.com", "x.y.example.com"));
        assert!(!m("CN=*,O=Example", "CN=laptop,O=Other"));
    }
}
