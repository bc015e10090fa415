//! User-creatable objects (`/objects`), created by `object-add` and `--object`.

pub(crate) mod event_loop;
pub(crate) mod pr_manager;
pub(crate) mod secret;
pub(crate) mod thread_context;
pub(crate) mod throttle;
pub(crate) mod tls;

use crate::error::{Error, Result};
use crate::node::QomNode;
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use indexmap::IndexMap;
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;

/// An object `object-add` can create.
pub trait UserObject {
    /// Its QOM type.
    fn type_name(&self) -> &'static str;

    /// Reads a property; `None` if there is no such property.
    fn get(&self, name: &str) -> Option<Result<QObject>>;

    /// Writes a property after creation; `None` if there is no such property.
    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>>;

    /// For the layers that use the object (a throttle filter, an encrypted image).
    fn as_any(&self) -> &dyn Any;
}

/// The object types `object-add` makes.
const CREATABLE: &[&str] = &[
    "authz-list",
    "authz-simple",
    "iothread",
    "main-loop",
    "pr-manager-helper",
    "secret",
    "secret_keyring",
    "thread-context",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
];

/// The `/objects` container.
#[derive(Default)]
pub struct ObjectRegistry {
    objects: RefCell<IndexMap<String, Rc<dyn UserObject>>>,
}

impl ObjectRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// An object by id.
    pub fn get(&self, id: &str) -> Option<Rc<dyn UserObject>> {
        self.objects.borrow().get(id).cloned()
    }

    /// Creates an object from checked `ObjectOptions`.
    ///
    /// Objects are children of QEMU's `/objects` container, whose own `type` property an
    /// id cannot take.
    ///
    /// # Errors
    /// A malformed or duplicate id, or the type's own validation.
    pub fn add(&self, options: &Args) -> Result<()> {
        let id = options.str("id")?;
        if !ferrite_qapi::id_wellformed(id) {
            return Err(Error::InvalidId);
        }
        // QEMU sets the properties, then adds the object under its id, then completes it:
        // a bad property value is reported before a duplicate id, a failure to complete
        // after.
        let ty = options.str("qom-type")?;
        // The schema has every type QEMU's has; ferrite makes those a storage daemon has.
        // QEMU's type for `authz-listfile` is `authz-list-file`: it cannot make one either.
        if !CREATABLE.contains(&ty) {
            return Err(Error::NoSuchType(ty.to_owned()));
        }
        match ty {
            "throttle-group" => throttle::check_values(options)?,
            "thread-context" => drop(thread_context::initial_affinity(options)?),
            "iothread" => event_loop::check_values(options, false)?,
            // The main loop applies its thread pool's bounds as they are set.
            "main-loop" => event_loop::check_values(options, true)?,
            "secret_keyring" => secret::check_values(options)?,
            _ => {}
        }
        if id == ferrite_qapi::QOM_CONTAINER_PROPERTY || self.objects.borrow().contains_key(id) {
            return Err(Error::DuplicateId(id.to_owned()));
        }
        let obj: Rc<dyn UserObject> = match options.str("qom-type")? {
            "throttle-group" => Rc::new(throttle::ThrottleGroup::create(options)?),
            "secret" | "secret_keyring" => {
                Rc::new(secret::Secret::create(options, |id| self.secret_bytes(id))?)
            }
            "tls-creds-x509" => Rc::new(tls::TlsCredsX509::create(options, |id| {
                self.secret_text(id)
            })?),
            "authz-simple" => Rc::new(tls::AuthzObject::simple(options)?),
            "authz-list" => Rc::new(tls::AuthzObject::list(options)?),
            "tls-creds-psk" => Rc::new(tls::TlsCredsObject::psk(options)?),
            "tls-creds-anon" => Rc::new(tls::TlsCredsObject::anon(options)?),
            "iothread" => Rc::new(event_loop::EventLoop::create(options, true)?),
            "main-loop" => {
                // Properties are applied (and checked) before the object completes, where
                // the second main loop is refused.
                let main_loop = event_loop::EventLoop::create(options, false)?;
                if self
                    .objects
                    .borrow()
                    .values()
                    .any(|o| o.type_name() == "main-loop")
                {
                    return Err(Error::SecondMainLoop);
                }
                Rc::new(main_loop)
            }
            "thread-context" => Rc::new(thread_context::ThreadContext::create(options)?),
            "pr-manager-helper" => Rc::new(pr_manager::PrManagerHelper::create(options)?),
            other => return Err(Error::NoSuchType(other.to_owned())),
        };
        self.objects.borrow_mut().insert(id.to_owned(), obj);
        Ok(())
    }

    /// The id of the object of QOM type `ty` that `path` names as QEMU's
    /// `object_resolve_path_type` finds it: `/objects/<id>`, or a partial path that ends a
    /// single such object's (`<id>`, `objects/<id>`; the empty path names the only object
    /// of the type there is). `None` when nothing or more than one object matches.
    pub fn resolve_typed(&self, path: &str, ty: &str) -> Option<String> {
        let objects = self.objects.borrow();
        let of_type = || {
            objects
                .iter()
                .filter(move |(_, o)| o.type_name() == ty)
                .map(|(id, _)| id)
        };
        if let Some(absolute) = path.strip_prefix('/') {
            let id = absolute.strip_prefix("objects/")?;
            return of_type().find(|o| o.as_str() == id).cloned();
        }
        let mut found = of_type().filter(|id| {
            path.is_empty() || path == id.as_str() || path.strip_prefix("objects/") == Some(id)
        });
        let first = found.next()?;
        found.next().is_none().then(|| first.clone())
    }

    /// The bytes of the `secret` or `secret_keyring` object `id` (QEMU's
    /// `qcrypto_secret_lookup`).
    ///
    /// # Errors
    /// No such object, or not a secret: QEMU's texts.
    pub fn secret_bytes(&self, id: &str) -> Result<Vec<u8>> {
        let obj = self
            .get(id)
            .ok_or_else(|| Error::SecretLookup(format!("No secret with id '{id}'")))?;
        let secret = obj
            .as_any()
            .downcast_ref::<secret::Secret>()
            .ok_or_else(|| Error::SecretLookup(format!("Object with id '{id}' is not a secret")))?;
        Ok(secret.value().to_vec())
    }

    /// The text of the secret `id` (QEMU's `qcrypto_secret_lookup_as_utf8`).
    ///
    /// # Errors
    /// No such object, not a secret, not UTF-8: QEMU's texts.
    pub fn secret_text(&self, id: &str) -> Result<String> {
        String::from_utf8(self.secret_bytes(id)?)
            .map_err(|_| Error::SecretLookup(format!("Data from secret {id} is not valid UTF-8")))
    }

    /// Deletes an object.
    ///
    /// # Errors
    /// "object 'x' not found", or the object is still in use.
    pub fn del(&self, id: &str) -> Result<()> {
        let obj = self
            .get(id)
            .ok_or_else(|| Error::ObjectNotFound(id.to_owned()))?;
        // The registry holds one reference; any other holder is a user of the object. The
        // main loop is always in use (QEMU never lets it go).
        if Rc::strong_count(&obj) > 2 || obj.type_name() == "main-loop" {
            return Err(Error::InUse(id.to_owned()));
        }
        self.objects.borrow_mut().shift_remove(id);
        Ok(())
    }

    /// Every object, by id.
    pub fn all(&self) -> Vec<(String, Rc<dyn UserObject>)> {
        self.objects
            .borrow()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// A user object as a tree node.
struct ObjectNode(Rc<dyn UserObject>);

impl QomNode for ObjectNode {
    fn type_name(&self) -> String {
        self.0.type_name().into()
    }
    fn get(&self, name: &str) -> Option<Result<QObject>> {
        self.0.get(name)
    }
    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        self.0.set(name, value)
    }
}

impl QomNode for ObjectRegistry {
    fn type_name(&self) -> String {
        "container".into()
    }

    fn children(&self) -> Vec<(String, Rc<dyn QomNode>)> {
        self.all()
            .into_iter()
            .map(|(id, o)| (id, Rc::new(ObjectNode(o)) as Rc<dyn QomNode>))
            .collect()
    }
}

/// Checks a value being set on a property against the schema member of the same name in the
/// object type's properties struct.
pub(crate) fn check_prop(props_type: &str, name: &str, value: &QObject) -> Result<QObject> {
    let schema = ferrite_qapi::schema();
    let member = schema
        .struct_members(props_type)
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| Error::PropertyNotFound(name.to_owned()))?;
    Ok(ferrite_qapi::visit::check_member(
        schema, &member.ty, name, value,
    )?)
}

/// "Property cannot be set after initialization": creation-time-only properties.
pub(crate) fn frozen() -> Error {
    Error::SetAfterInit
}
