//! The `fuse` export type (QEMU: `fuse_export_create`, `fuse_export_shutdown`,
//! `fuse_export_delete`).

use crate::kernel::Op;
use crate::mount::{detach, mount, stat_clearing_dead_mount};
use crate::serve::FileState;
use ferrite_block::Perm;
use ferrite_export::{ExportInstance, ExportSetup, ExportType, LocalFut};
use ferrite_qapi::Error;
use fuser::BackgroundSession;
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use tokio::task::JoinHandle;

/// The `fuse` export type: the mount points in use.
#[derive(Default)]
pub struct FuseExportType {
    mountpoints: Rc<RefCell<HashSet<String>>>,
}

impl FuseExportType {
    /// The type, with no exports.
    pub fn new() -> Rc<FuseExportType> {
        Rc::new(FuseExportType::default())
    }

    fn start(&self, setup: &ExportSetup<'_>) -> Result<FuseExport, Error> {
        let opts = setup.opts;
        let growable = opts.bool_or("growable", false);
        // A writable or growable export may resize the node for as long as it lasts.
        if growable || setup.writable {
            let (perm, shared) = setup.blk.perm();
            setup.blk.set_perm(perm | Perm::RESIZE, shared)?;
        }
        let mountpoint = opts.str("mountpoint")?.to_owned();
        // The same path twice would mount over our own mount (QEMU compares the strings).
        if self.mountpoints.borrow().contains(&mountpoint) {
            return Err(Error::generic(format!(
                "There already is a FUSE export on '{mountpoint}'"
            )));
        }
        let meta = stat_clearing_dead_mount(&mountpoint).map_err(|e| {
            Error::generic(format!(
                "Failed to stat '{mountpoint}': {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
        if !meta.is_file() {
            return Err(Error::generic(format!(
                "'{mountpoint}' is not a regular file"
            )));
        }
        let state = Rc::new(FileState::new(setup.blk.clone(), setup.writable, growable));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Op>();
        let mounted = match opts.opt_str("allow-other").unwrap_or("auto") {
            "auto" => mount(&mountpoint, true, tx.clone())
                .map(|s| (s, true))
                .or_else(|_| mount(&mountpoint, false, tx).map(|s| (s, false))),
            on_off => {
                let on = on_off == "on";
                mount(&mountpoint, on, tx).map(|s| (s, on))
            }
        };
        let (session, allow_other) = mounted.map_err(|e| {
            tracing::warn!(error = %e, mountpoint, "FUSE mount failed");
            Error::generic("Failed to mount FUSE session to export")
        })?;
        state.allow_other.set(allow_other);
        self.mountpoints.borrow_mut().insert(mountpoint.clone());
        let serving = tokio::task::spawn_local(state.clone().serve(rx));
        Ok(FuseExport {
            mountpoints: self.mountpoints.clone(),
            mountpoint,
            state,
            session: RefCell::new(Some(session)),
            serving,
        })
    }
}

impl ExportType for FuseExportType {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn create<'a>(
        &'a self,
        setup: ExportSetup<'a>,
    ) -> LocalFut<'a, Result<Rc<dyn ExportInstance>, Error>> {
        Box::pin(async move { Ok(Rc::new(self.start(&setup)?) as Rc<dyn ExportInstance>) })
    }
}

/// A mounted FUSE export.
struct FuseExport {
    mountpoints: Rc<RefCell<HashSet<String>>>,
    mountpoint: String,
    state: Rc<FileState>,
    session: RefCell<Option<BackgroundSession>>,
    serving: JoinHandle<()>,
}

impl ExportInstance for FuseExport {
    fn in_use(&self) -> bool {
        // Open files do not hold a FUSE export: QEMU removes it in safe mode too.
        false
    }

    fn shut_down(&self) -> LocalFut<'_, ()> {
        Box::pin(async move {
            // Unmounted (detached) first, so no new file can be opened; requests the
            // kernel still sends for files already open are answered ENOTCONN.
            if let Some(session) = self.session.borrow_mut().take() {
                detach(&self.mountpoint);
                drop(session);
            }
            self.serving.abort();
            self.state.quiesce().await;
            self.mountpoints.borrow_mut().remove(&self.mountpoint);
        })
    }
}
