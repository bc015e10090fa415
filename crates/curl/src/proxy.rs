//! The proxy a request goes through, chosen as libcurl chooses it: `http_proxy` for `http`
//! URLs (lower case only), `https_proxy`/`HTTPS_PROXY` for `https`, then `all_proxy`/
//! `ALL_PROXY`, none for a host `no_proxy`/`NO_PROXY` names. Only HTTP proxies: `http` URLs
//! are asked of them whole, `https` ones through a `CONNECT` tunnel.

use crate::error::Failure;
use crate::url::{Scheme, Url};

/// libcurl's port for a proxy that names none.
const DEFAULT_PORT: u16 = 1080;

/// A proxy: where it listens, and its credentials if it wants some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Proxy {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
}

/// The proxy settings of the environment, read once per node.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProxyEnv {
    http: Option<String>,
    https: Option<String>,
    all: Option<String>,
    no_proxy: Option<String>,
}

impl ProxyEnv {
    /// The process's settings.
    pub(crate) fn from_process() -> ProxyEnv {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok())
                .filter(|v| !v.is_empty())
        };
        ProxyEnv {
            http: var(&["http_proxy"]),
            https: var(&["https_proxy", "HTTPS_PROXY"]),
            all: var(&["all_proxy", "ALL_PROXY"]),
            no_proxy: var(&["no_proxy", "NO_PROXY"]),
        }
    }

    /// The proxy for `url`, if any.
    ///
    /// # Errors
    /// The setting is not a proxy ferrite can use.
    pub(crate) fn for_url(&self, url: &Url) -> Result<Option<Proxy>, Failure> {
        if self.exempt(&url.host) {
            return Ok(None);
        }
        let setting = match url.scheme {
            Scheme::Http => self.http.as_ref(),
            Scheme::Https => self.https.as_ref(),
            // FTP goes to its server directly.
            Scheme::Ftp | Scheme::Ftps => return Ok(None),
        }
        .or(self.all.as_ref());
        setting.map(|s| Proxy::parse(s)).transpose()
    }

    /// Whether `no_proxy` names `host`: `*`, the host itself, or a domain it is in.
    fn exempt(&self, host: &str) -> bool {
        let Some(list) = &self.no_proxy else {
            return false;
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        list.split(',').map(str::trim).any(|entry| {
            let entry = entry.trim_start_matches('.').to_ascii_lowercase();
            entry == "*"
                || (!entry.is_empty() && (host == entry || host.ends_with(&format!(".{entry}"))))
        })
    }
}

impl Proxy {
    /// `[http://][user[:password]@]host[:port]`.
    fn parse(s: &str) -> Result<Proxy, Failure> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => return Err(Failure::Unsupported(format!("{scheme} proxy"))),
            None => s,
        };
        let url = Url::parse(&format!("http://{rest}"))?;
        let explicit_port = rest
            .split('/')
            .next()
            .and_then(|a| a.rsplit_once(']').map_or(Some(a), |(_, p)| Some(p)))
            .is_some_and(|a| a.rsplit_once('@').map_or(a, |(_, h)| h).contains(':'));
        Ok(Proxy {
            host: url.host,
            port: if explicit_port {
                url.port
            } else {
                DEFAULT_PORT
            },
            user: url.user,
            password: url.password,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(http: &str, no: &str) -> ProxyEnv {
        ProxyEnv {
            http: Some(http.into()),
            https: None,
            all: Some("http://all:3128".into()),
            no_proxy: (!no.is_empty()).then(|| no.into()),
        }
    }

    #[test]
    fn proxies_are_chosen_as_libcurl_chooses_them() {
        let u = |s: &str| Url::parse(s).unwrap();
        let e = env("u:p@proxy", "example.com,.local");
        let p = e.for_url(&u("http://h/x")).unwrap().unwrap();
        assert_eq!(
            (
                p.host.as_str(),
                p.port,
                p.user.as_deref(),
                p.password.as_deref()
            ),
            ("proxy", 1080, Some("u"), Some("p"))
        );
        let all = e.for_url(&u("https://h/x")).unwrap().unwrap();
        assert_eq!((all.host.as_str(), all.port), ("all", 3128));
        assert_eq!(e.for_url(&u("http://www.example.com/")).unwrap(), None);
        assert_eq!(e.for_url(&u("http://a.local/")).unwrap(), None);
        assert!(e.for_url(&u("http://notexample.com/")).unwrap().is_some());
        assert_eq!(env("p", "*").for_url(&u("http://h/")).unwrap(), None);
        assert!(env("socks5://p", "").for_url(&u("http://h/")).is_err());
        let port = env("http://[::1]:8080", "")
            .for_url(&u("http://h/"))
            .unwrap()
            .unwrap();
        assert_eq!((port.host.as_str(), port.port), ("::1", 8080));
    }
}
