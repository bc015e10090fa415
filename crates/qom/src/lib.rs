//! QOM as a storage daemon needs it: the type hierarchy (`qom-list-types`,
//! `qom-list-properties`), the object tree (`qom-list`, `qom-get`, `qom-set`, partial paths)
//! and the user-creatable objects (`object-add`, `object-del`, `--object`): `throttle-group`,
//! `secret`, `iothread`, `main-loop`, `tls-creds-x509`, `authz-simple`, `authz-list`.
//!
//! The tree is built from [`QomNode`]s: this crate provides containers and the user objects;
//! other layers (the chardevs) plug their own nodes in, so this crate depends on none of them.
//!
//! QEMU counterparts: `qom/object.c`, `qom/qom-qmp-cmds.c`, `qom/object_interfaces.c`,
//! `block/throttle-groups.c`, `crypto/secret*.c`, `iothread.c`, `crypto/tlscredsx509.c`,
//! `authz/`.

mod error;
mod node;
mod objects;
pub mod qmp_cmds;
mod types;

pub use error::{Error, Result};
pub use node::{Children, Container, PropInfo, QomNode, resolve_path};
pub use objects::{
    ObjectRegistry, UserObject,
    secret::Secret,
    throttle::{Bucket, ThrottleConfig, ThrottleGroup},
    tls::{AuthzObject, TlsCredsObject, TlsCredsX509},
};
pub use types::{TypeInfo, find_type, type_list};
