//! The drivers of QEMU's `block/curl.c`, `http`, `https`, `ftp` and `ftps` (QEMU reaches
//! them through libcurl; here the protocols are spoken directly): a read-only node whose
//! bytes a server serves, read by byte ranges.
//!
//! - `url.rs`: the URL and the redirections' targets;
//! - `conn.rs`: one connection: made, secured for `https` (`ferrite-tls`), HTTP/1.1
//!   requests and replies on it;
//! - `client.rs`: HTTP requests as libcurl makes them for QEMU (redirections,
//!   credentials, cookie, kept connections, proxies);
//! - `ftp.rs`: FTP sessions as libcurl runs them (passive mode, `REST`, `RETR`, `ABOR`);
//! - `proxy.rs`: the proxy from the environment, as libcurl picks it;
//! - `window.rs`: a range of the image fetched in one transfer, read while it arrives;
//! - `driver.rs`: the nodes: their options in QEMU's order and words, the size at open,
//!   reads through windows with read-ahead;
//! - `error.rs`: libcurl's words for what failed.

mod client;
mod conn;
mod driver;
mod error;
mod ftp;
mod proxy;
mod url;
mod window;

use ferrite_block::Registry;
use std::rc::Rc;

/// Registers `http`, `https`, `ftp` and `ftps`.
pub fn register(registry: &Registry) {
    use url::Scheme;
    for scheme in [Scheme::Http, Scheme::Https, Scheme::Ftp, Scheme::Ftps] {
        registry.register(Rc::new(driver::CurlFactory { scheme }));
    }
}
