//! TLS as QEMU's programs do it (QEMU: `crypto/tlscreds*.c`, `crypto/tlssession.c`,
//! `authz/`), for NBD's STARTTLS on both ends and for socket chardevs (QMP over TLS).
//!
//! - `creds.rs`: `tls-creds-x509`: the files of a directory, checked at creation as QEMU
//!   checks them, and the rustls configurations made from them;
//! - `sanity.rs`: the checks of the program's own certificates (times, constraints,
//!   usage, purpose, the pair) with QEMU's texts;
//! - `peer.rs`: what QEMU checks of the peer once the handshake is done (trust, times, the
//!   authorization of a client's name, a server's host name);
//! - `dn.rs`: a certificate's distinguished name as GnuTLS writes it (the identity
//!   authorization lists judge);
//! - `authz.rs`: `authz-simple` and `authz-list`;
//! - `priority.rs`: GnuTLS priority strings (the credentials' `priority`), read as GnuTLS
//!   reads them, and what they allow;
//! - `psk.rs`: `tls-creds-psk`: a user's pre-shared key from a directory's `keys.psk`;
//! - `anon.rs`: `tls-creds-anon`: nothing but a server's optional DH parameters;
//! - `tls13/`: TLS 1.3 with a pre-shared key, both ends (rustls has no external PSKs);
//! - `tls12/`: TLS 1.2 with anonymous Diffie-Hellman, both ends (nor anonymous suites);
//! - `record.rs`, `wire.rs`: what those two share: the records of an established session,
//!   and the handshake's messages on the wire;
//! - `session.rs`: the handshake on a stream, server and client, for either kind;
//! - `web.rs`: TLS to web servers (the `https` block driver), checked as libcurl checks.
//!
//! rustls does the protocol for x509 credentials. It checks nothing of the peer during the handshake beyond the
//! handshake signatures: the peer is judged afterwards by QEMU's rules (`peer.rs`), so that
//! a refusal is the same one QEMU makes, at the same moment.

mod anon;
mod authz;
mod creds;
mod dn;
mod peer;
mod priority;
mod psk;
mod record;
mod sanity;
mod session;
mod tls12;
mod tls13;
mod web;
mod wire;

pub use anon::{AnonCreds, AnonOptions};
pub use authz::{Authz, AuthzList, AuthzRule, AuthzSimple, Policy};
pub use creds::{Endpoint, X509Creds, X509Options};
pub use priority::{Kind, Priority, PriorityError, Profile};
pub use psk::{PskCreds, PskOptions};
pub use record::OwnTlsStream;
pub use session::{ClientStream, Creds, CredsKind, ServerStream, TlsStream, accept, connect};
pub use web::{WebStream, WebTls};

use std::rc::Rc;

/// What an id names among the program's objects.
pub enum Found<T> {
    /// An object of the kind looked for.
    Yes(T),
    /// An object of another kind.
    OtherType,
    /// No object.
    Missing,
}

/// Finds credentials by id.
pub type CredsLookup = Rc<dyn Fn(&str) -> Found<Rc<Creds>>>;
/// Finds authorization objects by id.
pub type AuthzLookup = Rc<dyn Fn(&str) -> Found<Rc<dyn Authz>>>;

/// The program's TLS objects, as the layers that take them by id (`tls-creds`,
/// `tls-authz`) find them.
#[derive(Clone)]
pub struct Objects {
    /// Credentials.
    pub creds: CredsLookup,
    /// Authorization objects.
    pub authz: AuthzLookup,
}

impl Objects {
    /// A program without TLS objects.
    pub fn none() -> Objects {
        Objects {
            creds: Rc::new(|_| Found::Missing),
            authz: Rc::new(|_| Found::Missing),
        }
    }

    /// The credentials `id`, for `endpoint`.
    ///
    /// # Errors
    /// QEMU's texts: no such object, not credentials, the other endpoint's.
    pub fn creds_for(&self, id: &str, endpoint: Endpoint) -> Result<Rc<Creds>, String> {
        match (self.creds)(id) {
            Found::Yes(c) if c.endpoint() == endpoint => Ok(c),
            Found::Yes(_) => Err(format!(
                "Expected TLS credentials for a {} endpoint",
                endpoint.as_str()
            )),
            Found::OtherType => Err(format!("Object with id '{id}' is not TLS credentials")),
            Found::Missing => Err(format!("No TLS credentials with id '{id}'")),
        }
    }
}
