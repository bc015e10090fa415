//! The URLs the drivers take and the redirections they follow: scheme, credentials, host,
//! port and the request target, as libcurl reads them.

use crate::error::Failure;

/// The schemes served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    Https,
    Ftp,
    /// FTP over TLS from the first byte (libcurl's `ftps://`).
    Ftps,
}

impl Scheme {
    fn parse(s: &str) -> Option<Scheme> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            "ftp" => Some(Scheme::Ftp),
            "ftps" => Some(Scheme::Ftps),
            _ => None,
        }
    }

    /// Its name, as the driver and URLs have it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Ftp => "ftp",
            Scheme::Ftps => "ftps",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
            Scheme::Ftp => 21,
            Scheme::Ftps => 990,
        }
    }
}

/// A parsed URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Url {
    pub(crate) scheme: Scheme,
    /// Credentials written in the URL (`user:password@`), decoded.
    pub(crate) user: Option<String>,
    pub(crate) password: Option<String>,
    /// The host, without the brackets of an IPv6 address.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The path and query (`/` at least); the fragment is not sent.
    pub(crate) target: String,
}

impl Url {
    /// Parses `s` (an absolute URL).
    ///
    /// # Errors
    /// Not an absolute `http`/`https` URL with a host and a port that fits 16 bits.
    pub(crate) fn parse(s: &str) -> Result<Url, Failure> {
        if s.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(Failure::Malformed);
        }
        let (scheme, rest) = s.split_once("://").ok_or(Failure::Malformed)?;
        let scheme = Scheme::parse(scheme).ok_or(Failure::Unsupported(scheme.to_owned()))?;
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let at = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(at);
        let target = match target {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            Some(u) => match u.split_once(':') {
                Some((n, p)) => (Some(decode(n)), Some(decode(p))),
                None => (Some(decode(u)), None),
            },
            None => (None, None),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(Failure::Malformed)?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(Failure::Malformed);
        }
        let port = match port {
            None | Some("") => scheme.default_port(),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|_| p.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(Failure::BadPort)?,
        };
        Ok(Url {
            scheme,
            user,
            password,
            host: host.to_owned(),
            port,
            target,
        })
    }

    /// The `Host` header's value: the port only when it is not the scheme's own.
    pub(crate) fn host_header(&self) -> String {
        let host = self.bracketed_host();
        if self.port == self.scheme.default_port() {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The host as a request names it (an IPv6 address in brackets).
    pub(crate) fn bracketed_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// The URL without credentials (a redirection's `Referer`).
    pub(crate) fn without_credentials(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme.as_str(),
            self.host_header(),
            self.target
        )
    }

    /// Whether `other` is the same server (scheme, host and port): credentials and cookies
    /// given for one are not sent to another.
    pub(crate) fn same_origin(&self, other: &Url) -> bool {
        self.scheme == other.scheme
            && self.host.eq_ignore_ascii_case(&other.host)
            && self.port == other.port
    }

    /// Where a redirection's `Location` leads from here: an absolute URL, one without a
    /// scheme (`//host/path`), an absolute path, a query or a path relative to this one's.
    ///
    /// # Errors
    /// The new URL does not parse.
    pub(crate) fn join(&self, location: &str) -> Result<Url, Failure> {
        let location = location.trim();
        if location.contains("://") {
            return Url::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", self.scheme.as_str()));
        }
        let target = if location.starts_with('/') {
            location.to_owned()
        } else if location.starts_with('?') {
            let path = self.target.split('?').next().unwrap_or("/");
            format!("{path}{location}")
        } else {
            let path = self.target.split('?').next().unwrap_or("/");
            let dir = &path[..=path.rfind('/').unwrap_or(0)];
            format!("{dir}{location}")
        };
        let target = target.split('#').next().unwrap_or("/").to_owned();
        Ok(Url {
            target,
            ..self.clone()
        })
    }
}

/// `%XX` escapes decoded (credentials in a URL, FTP path segments).
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_as_libcurl_reads_them() {
        let u = Url::parse("http://u%40x:p%3A@[::1]:8080/a/b.img?x=1#frag").unwrap();
        assert_eq!(u.scheme, Scheme::Http);
        assert_eq!(u.user.as_deref(), Some("u@x"));
        assert_eq!(u.password.as_deref(), Some("p:"));
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 8080);
        assert_eq!(u.target, "/a/b.img?x=1");
        assert_eq!(u.host_header(), "[::1]:8080");
        let u = Url::parse("https://example.com").unwrap();
        assert_eq!((u.port, u.target.as_str()), (443, "/"));
        assert_eq!(u.host_header(), "example.com");
        assert_eq!(Url::parse("http://h?q").unwrap().target, "/?q");
        assert_eq!(Url::parse("http://h:99999/"), Err(Failure::BadPort));
        assert_eq!(Url::parse("http://h:8x/"), Err(Failure::BadPort));
        assert_eq!(Url::parse("http://h/a b"), Err(Failure::Malformed));
        assert_eq!(Url::parse("http://"), Err(Failure::Malformed));
        assert_eq!(Url::parse("http:/h/x"), Err(Failure::Malformed));
    }

    #[test]
    fn redirections_resolve_against_the_url() {
        let u = Url::parse("http://h:81/d/e/f.img?q").unwrap();
        assert_eq!(u.join("/x").unwrap().target, "/x");
        assert_eq!(u.join("g.img").unwrap().target, "/d/e/g.img");
        assert_eq!(u.join("?r").unwrap().target, "/d/e/f.img?r");
        let other = u.join("//o:82/y").unwrap();
        assert_eq!((other.host.as_str(), other.port), ("o", 82));
        let tls = u.join("https://s/z").unwrap();
        assert_eq!(tls.scheme, Scheme::Https);
        assert!(!u.same_origin(&tls));
        assert!(u.same_origin(&u.join("/x").unwrap()));
    }
}
