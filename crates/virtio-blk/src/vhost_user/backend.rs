//! The vhost-user protocol's side, on `vhost-user-backend`'s thread: features, config space
//! and guest memory. The queues themselves are served on the main thread ([`super::queue`]).

use super::vring::MainVring;
use crate::device::{CONFIG_LEN, CONFIG_WCE, Device};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The largest queue a driver may set up.
const MAX_QUEUE_SIZE: usize = 1024;

struct Inner {
    device: Device,
    config: Mutex<[u8; CONFIG_LEN]>,
    event_idx: AtomicBool,
    memory: Mutex<Option<Memory>>,
}

/// The back end `vhost-user-backend` drives (shared by its threads).
#[derive(Clone)]
pub(crate) struct Backend(Arc<Inner>);

impl Backend {
    pub(crate) fn new(device: Device, len: u64) -> Backend {
        let config = device.config(len);
        Backend(Arc::new(Inner {
            device,
            config: Mutex::new(config),
            event_idx: AtomicBool::new(false),
            memory: Mutex::new(None),
        }))
    }

    /// The front end's memory, once it gave its table.
    pub(crate) fn memory(&self) -> Option<Memory> {
        self.0.memory.lock().ok().and_then(|m| m.clone())
    }

    /// Whether the front end acknowledged `VIRTIO_RING_F_EVENT_IDX`.
    pub(crate) fn event_idx(&self) -> bool {
        self.0.event_idx.load(Ordering::Acquire)
    }
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("lock poisoned")
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = MainVring;

    fn num_queues(&self) -> usize {
        usize::from(self.0.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.0.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.0.config.lock().map(|c| *c).unwrap_or([0; CONFIG_LEN]);
        let start = (offset as usize).min(CONFIG_LEN);
        let end = start.saturating_add(size as usize).min(CONFIG_LEN);
        config[start..end].to_vec()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write cache flag may change (QEMU's rule).
        if offset as usize != CONFIG_WCE || buf.len() != 1 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.0.config.lock().map_err(poisoned)?[CONFIG_WCE] = buf[0];
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.0.memory.lock().map_err(poisoned)? = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[MainVring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // The library's workers watch no kick of ours ([`MainVring`]): nothing comes here
        // but their exit event.
        Ok(())
    }
}
