//! Creating and amending images through the driver registry: `blockdev-create`'s and
//! `x-blockdev-amend`'s work (QEMU: `bdrv_co_create`, `bdrv_co_amend`).

use crate::backend::BlockBackend;
use crate::driver::ReqFlags;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use crate::perm::Perm;
use crate::registry::{DriverFactory, NameCreation};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
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

/// The protocol an image created by file name `filename` goes through, with the location
/// the name gives (QEMU's `bdrv_find_protocol`), and how that protocol makes its part.
///
/// # Errors
/// "Unknown protocol 'X'", "Protocol driver 'X' does not support image creation".
pub fn by_name_protocol(graph: &Graph, filename: &str) -> Result<(QDict, NameCreation)> {
    by_name_location(graph, crate::filename::known_protocol_options(filename)?)
}

/// As [`by_name_protocol`] for a location already found (a name given with its
/// protocol as the format: `host_device`, `nbd`).
///
/// # Errors
/// As [`by_name_protocol`].
pub fn by_name_location(graph: &Graph, location: QDict) -> Result<(QDict, NameCreation)> {
    let driver = driver_of(&location, "file");
    let how = graph
        .registry()
        .get(&driver)
        .map_or(NameCreation::Unsupported, |f| f.name_creation());
    if how == NameCreation::Unsupported {
        return Err(Error::ProtocolCannotCreate(driver));
    }
    Ok((location, how))
}

/// Makes the protocol part of an image created by file name, `size` bytes, at the location
/// [`by_name_protocol`] found (QEMU's `bdrv_co_create_file`).
///
/// # Errors
/// The protocol's creation failing, or the storage to reuse failing to open, grow or be
/// written.
pub async fn create_by_name(
    graph: &Rc<Graph>,
    (location, how): (QDict, NameCreation),
    size: u64,
) -> Result<()> {
    match how {
        NameCreation::ReuseExisting => reuse_existing(graph, location, size).await,
        _ => {
            // `file` is created by its name; the others at a location.
            let opts = if location.get("filename").is_some() {
                location.with("size", size)
            } else {
                let driver = driver_of(&location, "");
                let mut rest = location;
                rest.remove("driver");
                QDict::new()
                    .with("driver", driver)
                    .with("location", rest)
                    .with("size", size)
            };
            create(graph, &Args::new(opts)).await
        }
    }
}

/// QEMU's `bdrv_co_create_opts_simple`: storage that exists already is opened, grown to
/// `size` where the protocol can grow it (and found at least that big), and its first
/// sector zeroed so that no old image header is read in it.
async fn reuse_existing(graph: &Rc<Graph>, location: QDict, size: u64) -> Result<()> {
    let driver = driver_of(&location, "");
    let failed = |e| Error::NoExistingTarget {
        driver: driver.clone(),
        cause: Box::new(e),
    };
    // A name the protocol did not claim, given to the driver named as the format.
    let name = location.get("filename").and_then(|n| n.as_str());
    let parsed = match (name, graph.registry().get(&driver)) {
        (Some(name), Some(factory)) => factory.parse_filename(name),
        _ => None,
    };
    let location = match parsed {
        Some(options) => options.map_err(failed)?,
        None => location,
    };
    let node = graph
        .open_inline(&Args::new(location.with("read-only", false)))
        .await
        .map_err(failed)?;
    let r = async {
        let blk = BlockBackend::new(
            graph,
            &node,
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::all(),
        )?;
        match blk.truncate(size).await {
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) && node.len() >= size => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {
                return Err(Error::ResizeUnsupported);
            }
            Err(e) => return Err(Error::Resize(e)),
            Ok(()) => {}
        }
        let head = node.len().min(512);
        if head > 0 {
            blk.write_zeroes(0, head, ReqFlags::MAY_UNMAP)
                .await
                .map_err(Error::ClearFirstSector)?;
        }
        Ok(())
    }
    .await;
    graph.close_inline(&node).await;
    r
}

fn driver_of(location: &QDict, default: &str) -> String {
    location
        .get("driver")
        .and_then(|d| d.as_str())
        .unwrap_or(default)
        .to_owned()
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
