//! Secrets drivers take by id (`key-secret`): the program's `secret` objects, found through
//! a lookup the program installs.

use std::cell::RefCell;
use std::rc::Rc;

/// Finds a secret's bytes by id.
pub type SecretLookup = Rc<dyn Fn(&str) -> Option<Vec<u8>>>;

/// The secrets of the program's objects.
#[derive(Default)]
pub struct Secrets {
    lookup: RefCell<Option<SecretLookup>>,
}

impl Secrets {
    /// How ids are found.
    pub fn set_lookup(&self, f: SecretLookup) {
        *self.lookup.borrow_mut() = Some(f);
    }

    /// The secret `id`.
    ///
    /// # Errors
    /// QEMU's "No secret with id 'x'".
    pub fn get(&self, id: &str) -> crate::Result<Vec<u8>> {
        let lookup = self.lookup.borrow().clone();
        lookup
            .and_then(|f| f(id))
            .ok_or_else(|| ferrite_qapi::Error::generic(format!("No secret with id '{id}'")).into())
    }
}
