//! Secrets drivers take by id (`key-secret`): the program's `secret` objects, found through
//! a lookup the program installs.

use std::cell::RefCell;
use std::rc::Rc;

/// Finds a secret's bytes by id, or says why there are none (QEMU's texts).
pub type SecretLookup = Rc<dyn Fn(&str) -> Result<Vec<u8>, String>>;

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
    /// QEMU's "No secret with id 'x'", or what the lookup says ("Object with id 'x' is not
    /// a secret").
    pub fn get(&self, id: &str) -> crate::Result<Vec<u8>> {
        let lookup = self.lookup.borrow().clone();
        lookup
            .ok_or_else(|| format!("No secret with id '{id}'"))
            .and_then(|f| f(id))
            .map_err(|text| ferrite_qapi::Error::generic(text).into())
    }
}
