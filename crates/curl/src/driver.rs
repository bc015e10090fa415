//! The nodes: opened with a `HEAD` request (the size, and whether the server serves byte
//! ranges) or FTP's `SIZE`, read through windows of the image, each fetched by one
//! transfer (a ranged `GET`, or `REST` and `RETR`) of the read and `readahead` bytes after
//! it. At most eight transfers run at
//! once, as in QEMU; a read inside a window already received, or being received, takes
//! its bytes from there.

use crate::client::{Client, Credentials};
use crate::error::{Failure, Phase, timed};
use crate::ftp::FtpClient;
use crate::url::{Scheme, Url};
use crate::window::{Outcome, Window};
use ferrite_block::driver::{BoxFut, Driver, Extent};
use ferrite_block::{DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

/// What is read after each read unless `readahead` says otherwise.
const READAHEAD: i64 = 256 << 10;
/// Seconds a transfer may take unless `timeout` says otherwise, and the most it may say.
const TIMEOUT: i64 = 5;
const TIMEOUT_MAX: i64 = 10000;
/// Transfers at once.
const TRANSFERS: usize = 8;
/// Windows kept once received.
const KEPT: usize = 8;
/// The options that make a node what it is (QEMU's strong options), in its order.
const STRONG: [&str; 8] = [
    "url",
    "sslverify",
    "cookie",
    "cookie-secret",
    "username",
    "password-secret",
    "proxy-username",
    "proxy-password-secret",
];

/// Failed reads reported on standard error before the reports stop (QEMU's count, for the
/// whole program).
static REPORTS_LEFT: AtomicU32 = AtomicU32::new(100);

/// A driver for one scheme.
pub(crate) struct CurlFactory {
    pub(crate) scheme: Scheme,
}

impl DriverFactory for CurlFactory {
    fn name(&self) -> &'static str {
        self.scheme.as_str()
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            ctx.apply_auto_read_only(|| {
                Error::generic("curl driver does not support writes").into()
            })?;
            let opts = ctx.opts();
            let options = Options::check(opts, self.scheme.as_str(), &|id| {
                ctx.graph().secrets().get(id).and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| {
                        Error::generic(format!("Data from secret {id} is not valid UTF-8")).into()
                    })
                })
            })?;
            let opening = |f: Failure| Error::generic(format!("CURL: Error opening file: {f}"));
            let url = Url::parse(&options.url).map_err(opening)?;
            let tls = ferrite_tls::WebTls::new(options.verify).map_err(Error::generic)?;
            let protocol = match self.scheme {
                Scheme::Http | Scheme::Https => {
                    Protocol::Http(Client::new(url, options.credentials, tls))
                }
                Scheme::Ftp | Scheme::Ftps => Protocol::Ftp(FtpClient::new(
                    url,
                    options.credentials.user,
                    options.credentials.password,
                    tls,
                )),
            };
            let client = Transport {
                protocol,
                timeout: options.timeout,
            };
            let size = client.probe().await.map_err(opening)?;
            let mut strong = QDict::new();
            for key in STRONG {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            Ok(Box::new(Remote {
                scheme: self.scheme,
                url: options.url,
                plain: options.plain,
                size,
                readahead: options.readahead,
                client: Rc::new(client),
                windows: RefCell::new(Vec::new()),
                slots: Arc::new(Semaphore::new(TRANSFERS)),
                transfers: RefCell::new(Vec::new()),
                strong,
            }) as Box<dyn Driver>)
        })
    }
}

/// How a node reaches its server, and the time a whole transfer may take.
struct Transport {
    protocol: Protocol,
    timeout: Option<Duration>,
}

enum Protocol {
    Http(Client),
    Ftp(FtpClient),
}

impl Transport {
    async fn probe(&self) -> Result<u64, Failure> {
        let phase = Cell::new(Phase::Resolving);
        timed(self.timeout, &phase, async {
            match &self.protocol {
                Protocol::Http(c) => c.probe(&phase).await,
                Protocol::Ftp(c) => c.probe(&phase).await,
            }
        })
        .await
    }

    async fn fetch(
        &self,
        start: u64,
        last: u64,
        sink: &mut dyn FnMut(Vec<u8>) -> u64,
    ) -> Result<(), Failure> {
        let phase = Cell::new(Phase::Resolving);
        timed(self.timeout, &phase, async {
            match &self.protocol {
                Protocol::Http(c) => c.fetch(start, last, &phase, sink).await,
                Protocol::Ftp(c) => c.fetch(start, last, &phase, sink).await,
            }
        })
        .await
    }

    fn close_idle(&self) {
        if let Protocol::Http(c) = &self.protocol {
            c.close_idle();
        }
    }
}

/// A node's options, checked in QEMU's order and words.
struct Options {
    url: String,
    readahead: u64,
    timeout: Option<Duration>,
    verify: bool,
    credentials: Credentials,
    /// Whether the URL alone names the node (no option that changes what it reads).
    plain: bool,
}

type SecretLookup<'a> = dyn Fn(&str) -> ferrite_block::Result<String> + 'a;

impl Options {
    fn check(
        opts: &Args,
        scheme: &str,
        secret: &SecretLookup<'_>,
    ) -> ferrite_block::Result<Options> {
        let readahead = opts.opt_i64("readahead").unwrap_or(READAHEAD);
        if readahead < 0 {
            return Err(Error::generic(format!(
                "Value '{readahead}' is out of range for parameter 'readahead'"
            ))
            .into());
        }
        if readahead % 512 != 0 {
            return Err(Error::generic(format!(
                "HTTP_READAHEAD_SIZE {readahead} is not a multiple of 512"
            ))
            .into());
        }
        let timeout = opts.opt_i64("timeout").unwrap_or(TIMEOUT);
        if !(0..=TIMEOUT_MAX).contains(&timeout) {
            return Err(Error::generic("timeout parameter is too large or negative").into());
        }
        let verify = opts.opt_bool("sslverify").unwrap_or(true);
        let cookie = match (opts.opt_str("cookie"), opts.opt_str("cookie-secret")) {
            (Some(_), Some(_)) => {
                return Err(Error::generic(
                    "curl driver cannot handle both cookie and cookie secret",
                )
                .into());
            }
            (Some(c), None) => Some(c.to_owned()),
            (None, Some(id)) => Some(secret(id)?),
            (None, None) => None,
        };
        let url = opts.str("url")?.to_owned();
        let prefix = format!("{scheme}://");
        if !url.starts_with(&prefix) {
            return Err(Error::generic(format!(
                "{scheme} curl driver cannot handle the URL '{url}' (does not start with \
                 '{prefix}')"
            ))
            .into());
        }
        let user = opts.opt_str("username").map(str::to_owned);
        let password = opts.opt_str("password-secret").map(secret).transpose()?;
        let proxy_user = opts.opt_str("proxy-username");
        let proxy_password = opts
            .opt_str("proxy-password-secret")
            .map(secret)
            .transpose()?;
        let plain = verify
            && cookie.is_none()
            && user.is_none()
            && password.is_none()
            && proxy_user.is_none()
            && proxy_password.is_none();
        Ok(Options {
            url,
            readahead: readahead as u64,
            timeout: (timeout > 0).then(|| Duration::from_secs(timeout as u64)),
            verify,
            credentials: Credentials {
                user,
                password,
                cookie,
                proxy_user: proxy_user.map(str::to_owned),
                proxy_password,
            },
            plain,
        })
    }
}

/// An open node.
struct Remote {
    scheme: Scheme,
    url: String,
    plain: bool,
    size: u64,
    readahead: u64,
    client: Rc<Transport>,
    /// Windows under way and the last ones received, oldest first.
    windows: RefCell<Vec<Rc<Window>>>,
    /// A permit for each transfer that may run.
    slots: Arc<Semaphore>,
    /// The transfers started, to stop those under way when the node closes.
    transfers: RefCell<Vec<tokio::task::AbortHandle>>,
    strong: QDict,
}

impl Remote {
    /// A usable window that covers `offset..end`.
    fn covering(&self, offset: u64, end: u64) -> Option<Rc<Window>> {
        self.windows
            .borrow()
            .iter()
            .rev()
            .find(|w| w.outcome() != Outcome::Failed && w.covers(offset, end))
            .cloned()
    }

    /// The window to read `offset..end` from: one that covers it, or a new transfer of it
    /// and what follows it.
    async fn window(&self, offset: u64, end: u64) -> io::Result<Rc<Window>> {
        if let Some(w) = self.covering(offset, end) {
            return Ok(w);
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::EIO))?;
        // Another read may have asked for it while this one waited.
        if let Some(w) = self.covering(offset, end) {
            return Ok(w);
        }
        let len = (end - offset)
            .saturating_add(self.readahead)
            .min(self.size - offset);
        tracing::debug!(offset, len, "remote transfer started");
        let window = Rc::new(Window::new(offset, len));
        self.keep(window.clone());
        let client = self.client.clone();
        let filling = window.clone();
        let task = tokio::task::spawn_local(async move {
            let last = filling.start + filling.len - 1;
            let result = client
                .fetch(filling.start, last, &mut |piece| filling.push(piece))
                .await;
            tracing::debug!(
                start = filling.start,
                len = filling.len,
                ok = result.is_ok(),
                "remote transfer over"
            );
            if let Err(f) = &result {
                report(f);
            }
            filling.finish(result.is_ok());
            drop(permit);
        });
        let mut transfers = self.transfers.borrow_mut();
        transfers.retain(|t| !t.is_finished());
        transfers.push(task.abort_handle());
        Ok(window)
    }

    /// Adds `window`, letting go of the oldest received ones beyond those kept.
    fn keep(&self, window: Rc<Window>) {
        let mut windows = self.windows.borrow_mut();
        windows.push(window);
        while windows
            .iter()
            .filter(|w| w.outcome() != Outcome::Underway)
            .count()
            > KEPT
        {
            if let Some(i) = windows
                .iter()
                .position(|w| w.outcome() != Outcome::Underway)
            {
                windows.remove(i);
            }
        }
    }
}

/// A failed read on standard error, as QEMU reports it (a hundred times, then no more).
fn report(f: &Failure) {
    let left =
        REPORTS_LEFT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    match left {
        Ok(1) => {
            ferrite_block::report::error_report(&format!("curl: {f}"));
            ferrite_block::report::error_report("curl: further errors suppressed");
        }
        Ok(_) => ferrite_block::report::error_report(&format!("curl: {f}")),
        Err(_) => {}
    }
}

impl Driver for Remote {
    fn format_name(&self) -> &'static str {
        self.scheme.as_str()
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let end = (offset + len as u64).min(self.size);
            let have = end.saturating_sub(offset) as usize;
            let mut out = ferrite_block::io::pool::take(len);
            // Past the end reads as zeroes, as in QEMU.
            out[have..].fill(0);
            if have == 0 {
                return Ok(out);
            }
            let window = self.window(offset, end).await?;
            if !window.wait_until(end).await {
                ferrite_block::io::pool::give(out);
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            window.copy_out(offset, &mut out[..have]);
            Ok(out)
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _data: Vec<u8>,
        _flags: ferrite_block::driver::ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _flags: ferrite_block::driver::ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::EPERM)) })
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Err(io::Error::from_raw_os_error(libc::ENOTSUP)) })
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn plain_filename(&self) -> Option<String> {
        self.plain.then(|| self.url.clone())
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn disconnect<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            for t in self.transfers.borrow_mut().drain(..) {
                t.abort();
            }
            self.windows.borrow_mut().clear();
            self.client.close_idle();
            Ok(())
        })
    }
}
