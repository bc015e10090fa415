//! Creating and amending images through the driver registry: `blockdev-create`'s and
//! `x-blockdev-amend`'s work (QEMU: `bdrv_co_create`, `bdrv_co_amend`).

use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::registry::DriverFactory;
use ferrite_qapi::Args;
use std::rc::Rc;

/// The driver that creates the image `opts` (`BlockdevCreateOptions`) describes.
///
/// # Errors
/// QEMU's "Block driver 'x' not found or not supported" (a driver of the schema's that
/// neither program has: `blkreplay`), "Driver does not support blockdev-create".
pub fn check_driver(graph: &Graph, opts: &Args) -> Result<Rc<dyn DriverFactory>> {
    let name = opts.str("driver")?;
    let factory = graph
        .registry()
        .get(name)
        .ok_or_else(|| Error::NoSuchDriverToCreate(name.to_owned()))?;
    if !factory.can_create() {
        return Err(Error::CannotCreate);
    }
    Ok(factory)
}

/// Creates the image `opts` describes.
///
/// # Errors
/// QEMU's texts for bad options and for the storage failing.
pub async fn create(graph: &Rc<Graph>, opts: &Args) -> Result<()> {
    let factory = check_driver(graph, opts)?;
    let _own_nodes = graph.creation_scope();
    factory.create(graph, opts).await
}

/// The checks `x-blockdev-amend` makes before its job starts.
///
/// # Errors
/// QEMU's texts for a driver that is not here, another driver than the node's and
/// drivers that cannot amend.
pub fn check_amend(graph: &Graph, node: &Node, opts: &Args) -> Result<Rc<dyn DriverFactory>> {
    let name = opts.str("driver")?;
    if graph.registry().get(name).is_none() {
        return Err(Error::NoSuchDriverToCreate(name.to_owned()));
    }
    if name != node.driver_name() {
        return Err(Error::AmendChangesDriver);
    }
    graph
        .registry()
        .get(node.driver_name())
        .filter(|f| f.can_amend())
        .ok_or(Error::CannotAmend)
}

/// Applies `opts` to `node`.
///
/// # Errors
/// The driver refusing the change.
pub async fn amend(graph: &Graph, node: &Rc<Node>, opts: &Args, force: bool) -> Result<()> {
    check_amend(graph, node, opts)?
        .amend(graph, node, opts, force)
        .await
}
