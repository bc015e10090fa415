//! The vhost-user side, on `vhost-user-backend`'s threads: features, config space, guest
//! memory, and the queues. Each request popped from a queue is handed to the main thread as
//! a [`Job`]; the main thread answers it and calls [`Job::complete`].

use crate::device::{CONFIG_LEN, CONFIG_WCE, Device};
use crate::request::{Outcome, Request};
use ferrite_block::io::ForeignBuf;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

pub(crate) type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The largest queue a driver may set up.
const MAX_QUEUE_SIZE: usize = 1024;

/// A request on its way to the main thread, with what completing it needs.
pub(crate) struct Job {
    /// The request, read on the back end's thread; `None` for a chain without its header
    /// or its status byte.
    pub(crate) request: Option<Request>,
    head: u16,
    vring: VringRwLock,
    memory: Memory,
    event_idx: bool,
    /// The driver-readable buffers, in order: the header, then the payload.
    readable: Vec<(GuestAddress, usize)>,
    /// The driver-writable buffers, in order; the status byte is the last byte of the last.
    writable: Vec<(GuestAddress, usize)>,
}

impl Job {
    /// The request, read from the driver's buffers into a pooled buffer.
    fn gather(&self) -> Option<Request> {
        let in_len: usize = self.writable.iter().map(|(_, l)| l).sum();
        let out_len: usize = self.readable.iter().map(|(_, l)| l).sum();
        if in_len == 0 || out_len < 16 {
            return None;
        }
        let mem = self.memory.memory();
        let mut header = [0u8; 16];
        let mut payload = ferrite_block::io::pool::take(out_len - 16);
        // Byte `at` of the readable bytes goes to the header for the first 16, then to the
        // payload.
        let mut at = 0;
        for &(addr, len) in &self.readable {
            let mut done = 0;
            while done < len {
                let src = GuestAddress(addr.0.wrapping_add(done as u64));
                let n = if at < 16 {
                    let n = (16 - at).min(len - done);
                    mem.read_slice(&mut header[at..at + n], src).ok()?;
                    n
                } else {
                    let n = len - done;
                    mem.read_slice(&mut payload[at - 16..at - 16 + n], src)
                        .ok()?;
                    n
                };
                done += n;
                at += n;
            }
        }
        let mut request = Request::new(&header, payload, in_len - 1);
        request.room = self.room(in_len - 1);
        Some(request)
    }

    /// The first `len` driver-writable bytes as memory a read may fill in place, if each
    /// buffer lies inside one region of guest memory.
    fn room(&self, len: usize) -> Option<ForeignBuf> {
        let mem = self.memory.memory();
        let mut segments = Vec::with_capacity(self.writable.len());
        for &(addr, l) in &self.writable {
            let slice = mem.get_slice(addr, l).ok()?;
            segments.push((slice.ptr_guard_mut().as_ptr(), l));
        }
        let keep: Arc<GuestMemoryMmap<()>> = mem.into_inner();
        // SAFETY: each segment is a slice of guest memory mapped by `keep`'s regions, which
        // stay mapped while `keep` lives (a new memory table maps new regions and leaves
        // these to the last holder); the back end only reaches guest memory through raw
        // pointers and volatile accesses, never Rust references.
        let room = unsafe { ForeignBuf::new(segments, keep) };
        Some(room.slice(0, len))
    }

    /// Copies the outcome into the driver's buffers, puts the chain in the used ring and
    /// notifies the driver when it asked to be.
    pub(crate) fn complete(self, outcome: Option<Outcome>) {
        let mem = self.memory.memory();
        let total: usize = self.writable.iter().map(|(_, len)| len).sum();
        // As QEMU: an answered request used all the room the driver gave.
        let used = if outcome.is_some() { total as u32 } else { 0 };
        if let Some(o) = outcome {
            let mut data = &o.data[..o.data.len().min(total.saturating_sub(1))];
            for &(addr, len) in &self.writable {
                if data.is_empty() {
                    break;
                }
                let n = len.min(data.len());
                let _ = mem.write_slice(&data[..n], addr);
                data = &data[n..];
            }
            if let Some(&(addr, len)) = self.writable.last() {
                let _ = mem.write_obj(o.status, GuestAddress(addr.0.wrapping_add(len as u64 - 1)));
            }
            ferrite_block::io::pool::give(o.data);
        }
        if self.vring.add_used(self.head, used).is_err() {
            return;
        }
        let notify = !self.event_idx || self.vring.needs_notification().unwrap_or(true);
        if notify {
            let _ = self.vring.signal_used_queue();
        }
    }
}

struct Inner {
    device: Device,
    config: Mutex<[u8; CONFIG_LEN]>,
    event_idx: AtomicBool,
    memory: Mutex<Option<Memory>>,
    jobs: UnboundedSender<Job>,
}

/// The back end `vhost-user-backend` drives (shared by its threads).
#[derive(Clone)]
pub(crate) struct Backend(Arc<Inner>);

impl Backend {
    pub(crate) fn new(device: Device, len: u64, jobs: UnboundedSender<Job>) -> Backend {
        let config = device.config(len);
        Backend(Arc::new(Inner {
            device,
            config: Mutex::new(config),
            event_idx: AtomicBool::new(false),
            memory: Mutex::new(None),
            jobs,
        }))
    }

    /// Pops every available request of one queue and hands it on.
    fn drain_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(memory) = self.0.memory.lock().map_err(poisoned)?.clone() else {
            return Ok(());
        };
        let event_idx = self.0.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                let chain = {
                    let mut state = vring.get_mut();
                    let mem = memory.memory();
                    state.get_queue_mut().pop_descriptor_chain(mem)
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let mut readable = Vec::new();
                let mut writable = Vec::new();
                for desc in chain {
                    let region = (desc.addr(), desc.len() as usize);
                    if desc.is_write_only() {
                        writable.push(region);
                    } else {
                        readable.push(region);
                    }
                }
                let mut job = Job {
                    request: None,
                    head,
                    vring: vring.clone(),
                    memory: memory.clone(),
                    event_idx,
                    readable,
                    writable,
                };
                job.request = job.gather();
                if let Err(unsent) = self.0.jobs.send(job) {
                    // The export is ending: complete without an answer.
                    unsent.0.complete(None);
                }
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                return Ok(());
            }
        }
    }
}

fn poisoned<T>(_: T) -> io::Error {
    io::Error::other("lock poisoned")
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock;

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
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.drain_queue(vring),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}
