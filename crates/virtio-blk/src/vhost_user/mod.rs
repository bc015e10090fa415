//! The `vhost-user-blk` export type (QEMU: `vu_blk_exp_create`, `vhost_user_server_start`):
//! a listening socket, one front end at a time (the next may connect once it left), the
//! protocol on a thread of its own and the queues served on the main thread.

mod backend;
mod queue;
mod vring;

use crate::device::Device;
use backend::Backend;
use ferrite_export::{ExportInstance, ExportSetup, ExportType, InFlight, LocalFut};
use ferrite_qapi::{Args, Error, os_msg};
use ferrite_socket::UnixAddr;
use queue::Served;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::task::{JoinHandle, JoinSet};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vring::QueueSlot;

/// What `GET_ID` answers (QEMU's serial for this export).
const SERIAL: &str = "vhost_user_blk";

/// The `vhost-user-blk` export type.
#[derive(Default)]
pub struct VhostUserBlkExportType;

impl VhostUserBlkExportType {
    /// The type.
    pub fn new() -> Rc<VhostUserBlkExportType> {
        Rc::new(VhostUserBlkExportType)
    }
}

/// The listening socket `addr` names: a unix socket bound here (an old socket file is
/// replaced, as QEMU does), or an inherited one by number.
fn listen(addr: &Args) -> Result<(UnixListener, Option<String>), Error> {
    match addr.str("type")? {
        "unix" => {
            let made = ferrite_socket::unix::listen(&UnixAddr::parse(addr)?, 1)?;
            let file = made.file.map(|f| f.to_string_lossy().into_owned());
            Ok((made.listener, file))
        }
        "fd" => {
            let fd = ferrite_socket::monitor_fd::take_socket(addr.str("str")?)
                .map_err(Error::generic)?;
            Ok((UnixListener::from(fd), None))
        }
        _ => Err(Error::generic(
            "Only socket address types 'unix' and 'fd' are supported",
        )),
    }
}

/// Accepts front ends one after the other until told to stop; each connection gets a fresh
/// `vhost-user-backend` daemon, so nothing of one front end's set-up reaches the next.
fn accept_loop(
    listener: UnixListener,
    backend: Backend,
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    queues: UnboundedSender<Vec<Arc<QueueSlot>>>,
) {
    let mut listener = Listener::from(listener);
    while !stop.load(Ordering::Acquire) {
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            match VhostUserDaemon::new("vhost-user-blk".into(), backend.clone(), memory) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "vhost-user-blk: cannot serve");
                    return;
                }
            };
        let slots = vring::take_made();
        if queues.send(slots.clone()).is_err() {
            return;
        }
        if daemon.start(&mut listener).is_err() {
            // The socket was shut down: the export is ending.
            return;
        }
        if let Ok(mut c) = current.lock() {
            *c = daemon.shutdown_handle();
        }
        if stop.load(Ordering::Acquire) {
            daemon.request_shutdown();
        }
        if let Err(e) = daemon.wait() {
            tracing::debug!(error = %e, "vhost-user-blk front end left");
        }
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        for slot in &slots {
            slot.close();
        }
        if let Ok(mut c) = current.lock() {
            *c = None;
        }
    }
}

/// Serves the queues of each front end that connects, on the main thread.
async fn serve(served: Rc<Served>, mut queues: UnboundedReceiver<Vec<Arc<QueueSlot>>>) {
    // Dropped (the export ends) with the tasks it holds.
    let mut tasks = JoinSet::new();
    while let Some(slots) = queues.recv().await {
        while tasks.try_join_next().is_some() {}
        for slot in slots {
            tasks.spawn_local(queue::serve(slot, served.clone()));
        }
    }
}

impl ExportType for VhostUserBlkExportType {
    fn name(&self) -> &'static str {
        "vhost-user-blk"
    }

    fn create<'a>(
        &'a self,
        setup: ExportSetup<'a>,
    ) -> LocalFut<'a, Result<Rc<dyn ExportInstance>, Error>> {
        Box::pin(async move {
            let device = Device::from_options(setup.opts, setup.writable, SERIAL)?;
            let addr = setup
                .opts
                .dict("addr")
                .ok_or_else(|| Error::generic("Parameter 'addr' is missing"))?;
            let (listener, path) = listen(&addr)?;
            let wake = OwnedFd::from(
                listener
                    .try_clone()
                    .map_err(|e| Error::generic(os_msg(&e)))?,
            );
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let backend = Backend::new(device.clone(), setup.blk.len());
            let stop = Arc::new(AtomicBool::new(false));
            let current = Arc::new(Mutex::new(None));
            let (s, c, b) = (stop.clone(), current.clone(), backend.clone());
            std::thread::Builder::new()
                .name("vhost-user-blk".into())
                .spawn(move || accept_loop(listener, b, s, c, tx))
                .map_err(|e| Error::generic(os_msg(&e)))?;
            let in_flight = Rc::new(InFlight::default());
            let served = Rc::new(Served {
                blk: setup.blk.clone(),
                device: Rc::new(device),
                in_flight: in_flight.clone(),
                backend,
            });
            let serving = tokio::task::spawn_local(serve(served, rx));
            Ok(Rc::new(VhostUserBlkExport {
                stop,
                wake,
                current,
                serving,
                in_flight,
                path,
            }) as Rc<dyn ExportInstance>)
        })
    }
}

/// A listening vhost-user-blk export.
struct VhostUserBlkExport {
    stop: Arc<AtomicBool>,
    /// The listening socket, to wake the accepting thread with `shutdown`.
    wake: OwnedFd,
    /// The connected front end's connection, to end it.
    current: Arc<Mutex<Option<ShutdownHandle>>>,
    serving: JoinHandle<()>,
    in_flight: Rc<InFlight>,
    path: Option<String>,
}

impl ExportInstance for VhostUserBlkExport {
    fn in_use(&self) -> bool {
        // A connected front end does not hold the export (QEMU removes it in safe mode).
        false
    }

    fn shut_down(&self) -> LocalFut<'_, ()> {
        Box::pin(async move {
            self.stop.store(true, Ordering::Release);
            // SAFETY: shutdown on a descriptor this export owns; it wakes a blocked accept.
            unsafe { libc::shutdown(self.wake.as_raw_fd(), libc::SHUT_RDWR) };
            if let Some(h) = self.current.lock().ok().and_then(|mut c| c.take()) {
                h.shutdown();
            }
            self.serving.abort();
            self.in_flight.wait_idle().await;
            if let Some(path) = &self.path {
                let _ = std::fs::remove_file(path);
            }
        })
    }
}
