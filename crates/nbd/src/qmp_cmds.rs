//! The NBD server's QMP commands (QEMU: `blockdev-nbd.c`); the export commands every type
//! shares are `ferrite_export::qmp_cmds`.

use crate::service::NbdService;
use ferrite_export::RemoveMode;
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

fn ok() -> Result<QObject, Error> {
    Ok(QDict::new().into())
}

/// `nbd-server-start`.
///
/// # Errors
/// As [`NbdService::start`].
pub fn qmp_nbd_server_start(nbd: &Rc<NbdService>, args: &Args) -> Result<QObject, Error> {
    nbd.start(args)?;
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

/// `nbd-server-add` (deprecated): an export whose id is its name.
///
/// # Errors
/// As `block-export-add`; a `bitmap` that does not exist.
pub async fn qmp_nbd_server_add(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    let device = args.str("device")?;
    // As QEMU: the device is looked up first, by either kind of name; the export is of
    // the node found.
    let node = nbd.graph().lookup(device)?;
    let name = args.opt_str("name").unwrap_or(device);
    // Unlike block-export-add, a writable export of a read-only node is made read-only.
    let writable = args.bool_or("writable", false) && !node.is_read_only();
    let mut opts = QDict::new()
        .with("type", "nbd")
        .with("id", name)
        .with("node-name", node.name())
        .with("name", name)
        .with("writable", writable);
    opts.insert_opt("description", args.opt_str("description"));
    if let Some(b) = args.opt_str("bitmap") {
        opts.insert("bitmaps", vec![QObject::from(b)]);
    }
    nbd.all_exports().add(&Args::new(opts)).await?;
    // The export of a drive ends when its medium goes (QEMU's eject notifier).
    if let Some(blk) = nbd
        .graph()
        .backends()
        .into_iter()
        .find(|b| b.name() == device)
    {
        let exports = Rc::downgrade(&nbd.all_exports());
        let id = name.to_owned();
        blk.on_medium_removed(Box::new(move || {
            let (exports, id) = (exports.clone(), id.clone());
            tokio::task::spawn_local(async move {
                if let Some(e) = exports.upgrade() {
                    let _ = e.del(&id, RemoveMode::Hard).await;
                }
            });
        }));
    }
    ok()
}

/// `nbd-server-remove` (deprecated).
///
/// # Errors
/// As [`NbdService::del_by_id`].
pub async fn qmp_nbd_server_remove(nbd: &NbdService, args: &Args) -> Result<QObject, Error> {
    nbd.del_by_id(args.str("name")?, RemoveMode::parse(args.opt_str("mode")))
        .await?;
    ok()
}
