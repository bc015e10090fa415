//! The qcow2 driver through the core's public API: damaged images (property tests) and the
//! same requests through ferrite and qemu-io compared.

mod fuzz;
mod snapshots;
mod vs_qemu_io;

use std::rc::Rc;

/// A registry with the qcow2 driver and the drivers it stacks on.
pub(crate) fn drivers() -> Rc<ferrite_block::Registry> {
    let r = ferrite_block::Registry::new();
    ferrite_drivers::register(&r);
    ferrite_qcow2::register(&r);
    r
}
