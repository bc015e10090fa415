//! The `http` and `https` block drivers (QEMU: `block/curl.c`, there through libcurl): a
//! read-only node whose bytes a web server serves, read by byte ranges.
//!
//! - `url.rs`: the URL and the redirections' targets;
//! - `conn.rs`: one connection: made, secured for `https` (`ferrite-tls`), HTTP/1.1
//!   requests and replies on it;
//! - `client.rs`: requests as libcurl makes them for QEMU (redirections, credentials,
//!   cookie, the time limit, kept connections);
//! - `proxy.rs`: the proxy from the environment, as libcurl picks it;
//! - `window.rs`: a range of the image fetched in one transfer, read while it arrives;
//! - `driver.rs`: the nodes: their options in QEMU's order and words, the size at open,
//!   reads through windows with read-ahead;
//! - `error.rs`: libcurl's words for what failed.

mod client;
mod conn;
mod driver;
mod error;
mod proxy;
mod url;
mod window;

use ferrite_block::Registry;
use std::rc::Rc;

/// Registers `http` and `https`.
pub fn register(registry: &Registry) {
    for scheme in [url::Scheme::Http, url::Scheme::Https] {
        registry.register(Rc::new(driver::HttpFactory { scheme }));
    }
}
