//! `tls-creds-x509`, `tls-creds-psk` and `tls-creds-anon` (QEMU: `crypto/tlscreds*.c`),
//! the TLS credentials the NBD server and client take by id, and
//! the authorization objects `authz-simple` and `authz-list`
//! (`authz/`) a server's `tls-authz` names. `ferrite-tls` loads and judges; these are the
//! objects around it.

use super::{UserObject, frozen};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use ferrite_tls::{
    AnonCreds, AnonOptions, Authz, AuthzList, AuthzSimple, Creds, CredsKind, Endpoint, PskCreds,
    PskOptions, X509Creds, X509Options,
};
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

/// The `endpoint` property (QEMU's default: client).
fn endpoint_of(options: &Args) -> Endpoint {
    match options.opt_str("endpoint") {
        Some("server") => Endpoint::Server,
        _ => Endpoint::Client,
    }
}

/// The `priority` property: a GnuTLS priority string, judged when a session starts.
fn priority_of(options: &Args) -> Option<String> {
    options.opt_str("priority").map(str::to_owned)
}

/// A `tls-creds-x509` object.
pub struct TlsCredsX509 {
    creds: Rc<Creds>,
    passwordid: Option<String>,
}

impl TlsCredsX509 {
    /// Loads the credentials; `secret` finds the password `passwordid` names.
    pub(crate) fn create(
        options: &Args,
        secret: impl Fn(&str) -> Result<String>,
    ) -> Result<TlsCredsX509> {
        let priority = priority_of(options);
        let key_password = options
            .opt_str("passwordid")
            .map(|id| secret(id).map_err(|e| e.to_string()));
        let endpoint = endpoint_of(options);
        let creds = X509Creds::load(X509Options {
            dir: options.opt_str("dir").map(str::to_owned),
            endpoint,
            verify_peer: options.opt_bool("verify-peer").unwrap_or(true),
            sanity_check: options.opt_bool("sanity-check").unwrap_or(true),
            key_password,
            priority,
        })
        .map_err(Error::Tls)?;
        Ok(TlsCredsX509 {
            creds: Rc::new(Creds::new(CredsKind::X509(Box::new(creds)), None)),
            passwordid: options.opt_str("passwordid").map(str::to_owned),
        })
    }

    /// The loaded credentials.
    pub fn creds(&self) -> Rc<Creds> {
        self.creds.clone()
    }
}

impl UserObject for TlsCredsX509 {
    fn type_name(&self) -> &'static str {
        "tls-creds-x509"
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        let CredsKind::X509(c) = self.creds.kind() else {
            return None;
        };
        let o = c.options();
        Some(Ok(match name {
            "verify-peer" => QObject::from(o.verify_peer),
            "dir" => QObject::from(o.dir.clone().unwrap_or_default()),
            "endpoint" => QObject::from(o.endpoint.as_str()),
            "priority" => QObject::from(self.creds.priority().unwrap_or_default()),
            "passwordid" => QObject::from(self.passwordid.clone().unwrap_or_default()),
            "sanity-check" => QObject::from(o.sanity_check),
            _ => return None,
        }))
    }

    fn set(&self, name: &str, _value: &QObject) -> Option<Result<()>> {
        match name {
            "verify-peer" | "dir" | "endpoint" | "priority" | "passwordid" | "sanity-check" => {
                Some(Err(frozen()))
            }
            _ => None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A `tls-creds-psk` or `tls-creds-anon` object. Its properties may be set again once it is
/// made, as QEMU's: only `qom-get` sees the new values; the credentials stay as they were
/// loaded.
pub struct TlsCredsObject {
    type_name: &'static str,
    creds: Rc<Creds>,
    props: RefCell<QDict>,
}

impl TlsCredsObject {
    /// `tls-creds-psk`: a client's key loaded at once, a server's file checked.
    pub(crate) fn psk(options: &Args) -> Result<TlsCredsObject> {
        let username = options.opt_str("username").map(str::to_owned);
        let (endpoint, dir, props) = Self::common(options)?;
        let creds = PskCreds::load(PskOptions {
            dir,
            endpoint,
            username: username.clone(),
        })
        .map_err(Error::Tls)?;
        Ok(TlsCredsObject {
            type_name: "tls-creds-psk",
            creds: Rc::new(Creds::new(CredsKind::Psk(creds), priority_of(options))),
            props: RefCell::new(props.with("username", username.unwrap_or_default().as_str())),
        })
    }

    /// `tls-creds-anon`: a server's DH parameters loaded, if its directory has them.
    pub(crate) fn anon(options: &Args) -> Result<TlsCredsObject> {
        let (endpoint, dir, props) = Self::common(options)?;
        let creds = AnonCreds::load(AnonOptions { dir, endpoint }).map_err(Error::Tls)?;
        Ok(TlsCredsObject {
            type_name: "tls-creds-anon",
            creds: Rc::new(Creds::new(CredsKind::Anon(creds), priority_of(options))),
            props: RefCell::new(props),
        })
    }

    /// The properties every kind of credentials has, checked.
    fn common(options: &Args) -> Result<(Endpoint, Option<String>, QDict)> {
        let endpoint = endpoint_of(options);
        let dir = options.opt_str("dir").map(str::to_owned);
        let props = QDict::new()
            .with("endpoint", endpoint.as_str())
            .with("dir", dir.clone().unwrap_or_default().as_str())
            .with(
                "verify-peer",
                options.opt_bool("verify-peer").unwrap_or(true),
            )
            .with("priority", options.opt_str("priority").unwrap_or_default());
        Ok((endpoint, dir, props))
    }

    /// The loaded credentials.
    pub fn creds(&self) -> Rc<Creds> {
        self.creds.clone()
    }
}

impl UserObject for TlsCredsObject {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        self.props.borrow().get(name).cloned().map(Ok)
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        let mut props = self.props.borrow_mut();
        props.get(name)?;
        if name == "priority" {
            // Read at each session, as QEMU reads it.
            self.creds.set_priority(value.as_str().map(str::to_owned));
        }
        props.insert(name, value.clone());
        Some(Ok(()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `authz-simple` or `authz-list`.
pub struct AuthzObject {
    type_name: &'static str,
    authz: Rc<dyn Authz>,
    /// The properties it was created with, for `qom-get`.
    props: QDict,
}

impl AuthzObject {
    pub(crate) fn simple(options: &Args) -> Result<AuthzObject> {
        let identity = options.str("identity")?.to_owned();
        Ok(AuthzObject {
            type_name: "authz-simple",
            props: QDict::new().with("identity", identity.as_str()),
            authz: Rc::new(AuthzSimple(identity)),
        })
    }

    pub(crate) fn list(options: &Args) -> Result<AuthzObject> {
        let list = AuthzList::from_qobject(&QObject::Dict(options.as_dict().clone()));
        let rules: Vec<QObject> = list
            .rules
            .iter()
            .map(|r| {
                QDict::new()
                    .with("match", r.pattern.as_str())
                    .with("policy", r.policy.as_str())
                    .with("format", if r.glob { "glob" } else { "exact" })
                    .into()
            })
            .collect();
        Ok(AuthzObject {
            type_name: "authz-list",
            props: QDict::new()
                .with("policy", list.policy.as_str())
                .with("rules", rules),
            authz: Rc::new(list),
        })
    }

    /// The authorization it gives.
    pub fn authz(&self) -> Rc<dyn Authz> {
        self.authz.clone()
    }
}

impl UserObject for AuthzObject {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        self.props.get(name).cloned().map(Ok)
    }

    fn set(&self, name: &str, _value: &QObject) -> Option<Result<()>> {
        self.props.get(name).map(|_| Err(frozen()))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
