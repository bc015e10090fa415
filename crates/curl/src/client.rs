//! Requests as libcurl makes them for QEMU's drivers: redirections followed (the referrer
//! set, credentials kept for the first server, the cookie sent to every one), `Accept: */*`, Basic
//! authentication, a time limit on each whole transfer, idle connections kept for the next
//! request and a fresh one made when a kept one turns out closed.

use crate::conn::{Conn, Framing, Reply};
use crate::error::{Failure, Phase};
use crate::proxy::{Proxy, ProxyEnv};
use crate::url::Url;
use base64::Engine;
use ferrite_tls::WebTls;
use std::cell::{Cell, RefCell};

/// The most redirections followed for one request.
const MAX_REDIRECTS: u32 = 30;
/// The most idle connections kept.
const MAX_IDLE: usize = 8;
/// A redirection's body up to this size is read to keep its connection; a longer one is
/// dropped with the connection.
const SMALL_BODY: u64 = 64 << 10;

/// What a request asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Method {
    /// The head only: the size, and whether ranges are served.
    Head,
    /// The bytes `start..=last`.
    Range { start: u64, last: u64 },
}

/// How a node reaches its server.
pub(crate) struct Client {
    url: Url,
    /// `Authorization` for the URL's server, if credentials were given.
    authorization: Option<String>,
    cookie: Option<String>,
    tls: WebTls,
    proxies: ProxyEnv,
    /// The proxy credentials of the options (over a proxy URL's).
    proxy_user: Option<String>,
    proxy_password: Option<String>,
    idle: RefCell<Vec<Conn>>,
}

/// The credentials and cookie a client sends.
pub(crate) struct Credentials {
    /// The user, over the URL's.
    pub(crate) user: Option<String>,
    /// The password, over the URL's.
    pub(crate) password: Option<String>,
    pub(crate) cookie: Option<String>,
    /// The proxy's user and password, over those of the proxy's URL.
    pub(crate) proxy_user: Option<String>,
    pub(crate) proxy_password: Option<String>,
}

/// `Basic` credentials, if there is a user or a password.
fn basic(user: Option<&str>, password: Option<&str>) -> Option<String> {
    (user.is_some() || password.is_some()).then(|| {
        let pair = format!("{}:{}", user.unwrap_or(""), password.unwrap_or(""));
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    })
}

impl Client {
    pub(crate) fn new(url: Url, creds: Credentials, tls: WebTls) -> Client {
        let user = creds.user.or_else(|| url.user.clone());
        let password = creds.password.or_else(|| url.password.clone());
        Client {
            authorization: basic(user.as_deref(), password.as_deref()),
            url,
            cookie: creds.cookie,
            tls,
            proxies: ProxyEnv::from_process(),
            proxy_user: creds.proxy_user,
            proxy_password: creds.proxy_password,
            idle: RefCell::new(Vec::new()),
        }
    }

    /// `Proxy-Authorization` for `proxy`.
    fn proxy_authorization(&self, proxy: &Proxy) -> Option<String> {
        let user = self.proxy_user.as_deref().or(proxy.user.as_deref());
        let password = self.proxy_password.as_deref().or(proxy.password.as_deref());
        basic(user, password)
    }

    /// The image's size, by a `HEAD` request; its server must serve byte ranges.
    pub(crate) async fn probe(&self, phase: &Cell<Phase>) -> Result<u64, Failure> {
        let mut ranges = false;
        let (conn, reply) = self
            .exchange(Method::Head, phase, &mut |r| ranges |= r.accepts_ranges())
            .await?;
        let size = reply.content_length().ok_or(Failure::NoSize)?;
        if !ranges {
            return Err(Failure::NoRanges);
        }
        self.keep(conn);
        Ok(size)
    }

    /// The bytes `start..=last`, given to `sink` piece by piece as they arrive.
    pub(crate) async fn fetch(
        &self,
        start: u64,
        last: u64,
        phase: &Cell<Phase>,
        sink: &mut dyn FnMut(Vec<u8>) -> u64,
    ) -> Result<(), Failure> {
        let (mut conn, reply) = self
            .exchange(Method::Range { start, last }, phase, &mut |_| {})
            .await?;
        match reply.status {
            206 => {
                let answered = reply
                    .header("content-range")
                    .and_then(|v| v.trim().strip_prefix("bytes "))
                    .and_then(|v| v.split(['-', '/']).next())
                    .and_then(|s| s.trim().parse::<u64>().ok());
                if answered.is_some_and(|a| a != start) {
                    return Err(Failure::WrongRange);
                }
            }
            // The whole file: usable from its start only.
            200 if start == 0 => {}
            200 => return Err(Failure::NoRanges),
            _ => return Err(Failure::WrongRange),
        }
        conn.read_body(reply.framing(false), phase, sink).await?;
        self.keep(conn);
        Ok(())
    }

    /// One request, its redirections followed: the final reply, with its connection at
    /// the start of the body. Each reply's head is shown to `seen` (QEMU's header callback
    /// sees the redirections' too). An error status fails the request.
    async fn exchange(
        &self,
        method: Method,
        phase: &Cell<Phase>,
        seen: &mut dyn FnMut(&Reply),
    ) -> Result<(Conn, Reply), Failure> {
        let mut url = self.url.clone();
        let mut referer = None;
        for _ in 0..=MAX_REDIRECTS {
            let (mut conn, reply) = self
                .request(&url, method, referer.as_deref(), phase)
                .await?;
            seen(&reply);
            if reply.status >= 400 {
                return Err(Failure::Status(reply.status));
            }
            let Some(location) = reply.redirection() else {
                return Ok((conn, reply));
            };
            let next = url.join(location)?;
            if let Framing::Length(n) = reply.framing(matches!(method, Method::Head))
                && n <= SMALL_BODY
            {
                conn.read_body(Framing::Length(n), phase, &mut |_| 1)
                    .await?;
                self.keep(conn);
            }
            referer = Some(url.without_credentials());
            url = next;
        }
        Err(Failure::TooManyRedirects(MAX_REDIRECTS))
    }

    /// One request to `url`: on a kept connection to its server if there is one (again on
    /// a new one if the server had closed it), else on a new one.
    async fn request(
        &self,
        url: &Url,
        method: Method,
        referer: Option<&str>,
        phase: &Cell<Phase>,
    ) -> Result<(Conn, Reply), Failure> {
        let proxy = self.proxies.for_url(url)?;
        let head = self.head(url, method, referer, proxy.as_ref());
        if let Some(mut conn) = self.take_idle(url, proxy.as_ref()) {
            conn.origin = url.clone();
            match conn.round_trip(&head).await {
                Ok(reply) => return Ok((conn, reply)),
                Err(Failure::EmptyReply | Failure::Send(_) | Failure::Recv(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let tunnel = proxy.as_ref().map(|p| (p, self.tunnel(url, p)));
        let tunnel = tunnel.as_ref().map(|(p, t)| (*p, t.as_str()));
        let mut conn = Conn::open(url, &self.tls, phase, tunnel).await?;
        let reply = conn.round_trip(&head).await?;
        Ok((conn, reply))
    }

    /// The `CONNECT` request of a tunnel to `url`'s server through `proxy`.
    fn tunnel(&self, url: &Url, proxy: &Proxy) -> String {
        let to = format!("{}:{}", url.bracketed_host(), url.port);
        let mut h = format!("CONNECT {to} HTTP/1.1\r\nHost: {to}\r\n");
        if let Some(auth) = self.proxy_authorization(proxy) {
            h.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        h.push_str("Proxy-Connection: Keep-Alive\r\n\r\n");
        h
    }

    /// The request's head.
    /// A plain `http` request through a proxy names the whole URL and carries the proxy's
    /// credentials.
    fn head(
        &self,
        url: &Url,
        method: Method,
        referer: Option<&str>,
        proxy: Option<&Proxy>,
    ) -> String {
        let verb = match method {
            Method::Head => "HEAD",
            Method::Range { .. } => "GET",
        };
        let forwarded = proxy.filter(|_| url.scheme == crate::url::Scheme::Http);
        let target = match forwarded {
            Some(_) => url.without_credentials(),
            None => url.target.clone(),
        };
        let mut h = format!(
            "{verb} {target} HTTP/1.1\r\nHost: {}\r\n",
            url.host_header()
        );
        if let Some(auth) = forwarded.and_then(|p| self.proxy_authorization(p)) {
            h.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        let first_server = url.same_origin(&self.url);
        if let Some(auth) = self.authorization.as_ref().filter(|_| first_server) {
            h.push_str(&format!("Authorization: {auth}\r\n"));
        }
        if let Method::Range { start, last } = method {
            h.push_str(&format!("Range: bytes={start}-{last}\r\n"));
        }
        h.push_str("Accept: */*\r\n");
        // The cookie goes wherever a redirection leads, as libcurl sends it.
        if let Some(cookie) = &self.cookie {
            h.push_str(&format!("Cookie: {cookie}\r\n"));
        }
        if let Some(r) = referer {
            h.push_str(&format!("Referer: {r}\r\n"));
        }
        if forwarded.is_some() {
            h.push_str("Proxy-Connection: Keep-Alive\r\n");
        }
        h.push_str("\r\n");
        h
    }

    fn take_idle(&self, url: &Url, proxy: Option<&Proxy>) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        let i = idle
            .iter()
            .position(|c| c.origin.same_origin(url) && c.via.as_ref() == proxy)?;
        Some(idle.swap_remove(i))
    }

    /// Keeps `conn` for a later request, if it may carry one.
    fn keep(&self, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if conn.reusable() && idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Closes the kept connections.
    pub(crate) fn close_idle(&self) {
        self.idle.borrow_mut().clear();
    }
}
