//! `x-blockdev-amend`'s work: changing the options of an open image in place. For qcow2
//! QEMU amends only encryption, and ferrite opens no encrypted image, so what is left is to
//! accept an empty change and refuse the rest as QEMU refuses it for a plain image.

use crate::node::Node;
use ferrite_qapi::{Args, Error};

/// The checks made before the job starts.
///
/// # Errors
/// QEMU's texts for another driver than the node's and for drivers that cannot amend.
pub fn check(node: &Node, opts: &Args) -> Result<(), Error> {
    if opts.str("driver")? != node.driver_name() {
        return Err(Error::generic(
            "x-blockdev-amend doesn't support changing the block driver",
        ));
    }
    if node.driver_name() != "qcow2" {
        return Err(Error::generic("Driver does not support x-blockdev-amend"));
    }
    Ok(())
}

/// Applies `opts` to `node`.
///
/// # Errors
/// An encryption change on an image that is not encrypted.
pub async fn amend(_node: &Node, opts: &Args) -> Result<(), Error> {
    if opts.get("encrypt").is_some() {
        return Err(Error::generic("image is not encrypted, can't amend"));
    }
    Ok(())
}
