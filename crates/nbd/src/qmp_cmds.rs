//! NBD and export QMP commands (QEMU: `blockdev-nbd.c`, `block/export/export.c`).

use crate::service::{NbdService, RemoveMode};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

fn ok() -> Result<QObject, Error> {
    Ok(QDict::new().into())
}

fn mode(args: &Args) -> RemoveMode {
    match args.opt_str("mode") {
        Some("hard") => RemoveMode::Hard,
        _ => RemoveMode::Safe,
    }
}

/// `nbd-server-start`.
///
/// # Errors
/// As [`NbdService::start`].
pub fn qmp_nbd_server_start(nbd: &Rc<NbdService>, args: &Args) -> Result<QObject, Error> {
    nbd.start(args, false)?;
    ok()
}

/// `nbd-server-stop`.
///
/// # Errors
/// "NBD server not running".
pub async fn qmp_nbd_server_stop(nbd: &NbdService) -> Result<QObject, Error> {
    nbd.stop().await?;
    ok()
}

/// `block-export-add`.
///
/// # Errors
/// As [`NbdService::add`].
pub async fn qmp_block_export_add(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    nbd.add(args).await?;
    ok()
}

/// `block-export-del`.
///
/// # Errors
/// As [`NbdService::del`].
pub async fn qmp_block_export_del(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    nbd.del(args.str("id")?, mode(args)).await?;
    ok()
}

/// `query-block-exports`.
pub fn qmp_query_block_exports(nbd: &NbdService) -> QObject {
    nbd.query()
        .into_iter()
        .map(QObject::Dict)
        .collect::<Vec<_>>()
        .into()
}

/// `nbd-server-add` (deprecated): an export whose id is its name.
///
/// # Errors
/// As [`NbdService::add`]; a `bitmap` that does not exist.
pub async fn qmp_nbd_server_add(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    let device = args.str("device")?;
    // As QEMU: the device is looked up first, by either kind of name.
    nbd.graph().lookup(device)?;
    let name = args.opt_str("name").unwrap_or(device);
    let mut opts = QDict::new()
        .with("type", "nbd")
        .with("id", name)
        .with("node-name", device)
        .with("name", name)
        .with("writable", args.bool_or("writable", false));
    opts.insert_opt("description", args.opt_str("description"));
    if let Some(b) = args.opt_str("bitmap") {
        opts.insert("bitmaps", vec![QObject::from(b)]);
    }
    nbd.add(&Args::new(opts)).await?;
    ok()
}

/// `nbd-server-remove` (deprecated).
///
/// # Errors
/// As [`NbdService::del_by_name`].
pub async fn qmp_nbd_server_remove(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    nbd.del_by_name(args.str("name")?, mode(args)).await?;
    ok()
}
