//! One queue served on the main thread: wait for the front end's kick, pop the requests,
//! answer each through the block backend and put it in the used ring (QEMU's export also
//! serves its queues in its event loop, from the kick's fd handler).

use super::backend::{Backend, Memory};
use super::vring::QueueSlot;
use crate::device::Device;
use crate::request::{self, Outcome, Request};
use ferrite_block::BlockBackend;
use ferrite_block::io::ForeignBuf;
use ferrite_export::InFlight;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};

/// What the queues of one export answer with.
pub(crate) struct Served {
    pub(crate) blk: Rc<BlockBackend>,
    pub(crate) device: Rc<Device>,
    pub(crate) in_flight: Rc<InFlight>,
    pub(crate) backend: Backend,
}

/// A kick eventfd the main thread's reactor watches.
type Kick = AsyncFd<Arc<OwnedFd>>;

/// Watches `fd` (made non-blocking: the main thread reads it only to clear it, and two kicks
/// can be cleared by one read).
fn watch(fd: Arc<OwnedFd>) -> Option<Kick> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor `fd` owns; O_NONBLOCK only changes how reads wait.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return None;
        }
    }
    // SAFETY: the Arc keeps the descriptor open, and it names the same eventfd, for as long
    // as the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
}

/// Clears a kick eventfd's count.
fn clear(kick: &Kick) {
    let mut count = [0u8; 8];
    // SAFETY: reads 8 bytes into a buffer of 8 from a non-blocking eventfd.
    unsafe { libc::read(kick.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
}

/// Serves the queue until the front end's connection is over: a new kick eventfd replaces the
/// old one, a stopped or disabled queue is left alone until it is started again.
pub(crate) async fn serve(slot: Arc<QueueSlot>, served: Rc<Served>) {
    let mut watched: Option<(u64, Option<Kick>)> = None;
    loop {
        if slot.closed() {
            return;
        }
        let (fd, generation) = slot.kick();
        if watched.as_ref().map(|w| w.0) != Some(generation) {
            watched = Some((generation, fd.and_then(watch)));
        }
        served.pop_all(&slot.vring);
        match watched.as_ref().and_then(|w| w.1.as_ref()) {
            Some(kick) => tokio::select! {
                _ = slot.changed.notified() => {}
                ready = kick.readable() => {
                    if let Ok(mut guard) = ready {
                        clear(kick);
                        guard.clear_ready();
                    }
                }
            },
            None => slot.changed.notified().await,
        }
    }
}

impl Served {
    /// Pops every available request of the queue and starts answering each.
    fn pop_all(self: &Rc<Self>, vring: &VringRwLock) {
        let Some(memory) = self.backend.memory() else {
            return;
        };
        let event_idx = self.backend.event_idx();
        loop {
            if event_idx {
                let _ = vring.disable_notification();
            }
            loop {
                let chain = {
                    let mut state = vring.get_mut();
                    if !QueueSlot::runnable(&state) {
                        return;
                    }
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
                let job = Job {
                    head,
                    vring: vring.clone(),
                    memory: memory.clone(),
                    event_idx,
                    readable,
                    writable,
                };
                self.start(job);
            }
            if !event_idx || !vring.enable_notification().unwrap_or(false) {
                return;
            }
        }
    }

    /// Answers one request in a task of its own.
    fn start(self: &Rc<Self>, job: Job) {
        let counted = self.in_flight.begin();
        let served = self.clone();
        tokio::task::spawn_local(async move {
            // A chain without its header or status byte is completed unanswered (QEMU
            // drops it and leaves the driver waiting).
            let outcome = match job.gather() {
                Some(r) => Some(request::process(&served.blk, &served.device, r).await),
                None => None,
            };
            job.complete(outcome);
            drop(counted);
        });
    }
}

/// A popped request, with what completing it needs.
struct Job {
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
    /// The request, read from the driver's buffers into a pooled buffer; `None` for a chain
    /// without its header or its status byte.
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
    fn complete(self, outcome: Option<Outcome>) {
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
