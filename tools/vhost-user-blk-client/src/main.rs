//! A vhost-user-blk front end for tests and benchmarks (what a VMM does, without a guest):
//! it negotiates features, maps guest memory from a memfd, sets up split virtqueues and
//! drives virtio-blk requests, so that ferrite's and qemu-storage-daemon's exports can be
//! compared and measured with the same client.
//!
//! ```text
//! vhost-user-blk-client SOCKET info
//! vhost-user-blk-client SOCKET run          (requests on stdin, one per line; answers on stdout)
//! vhost-user-blk-client SOCKET bench RW BS DEPTH SECONDS QUEUES
//! ```
//! A request line is `OP SECTOR LEN [BYTE]`: OP is `read`, `write` (LEN bytes of BYTE), `flush`,
//! `get-id`, `discard`/`zeroes`/`zeroes-unmap` (one segment of LEN sectors), `type:N` (a
//! request of raw type N), or `submit-write` (sent without waiting for its answer; `exit` then
//! leaves with it in flight).

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, Write as _};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
/// Guest memory: 64 KiB of rings per queue, then one slot per request in flight.
const RING_AREA: u64 = 64 << 10;
const MAX_QUEUES: u64 = 8;
const SLOTS: u64 = 64;
/// What a request offers the device to fill.
#[derive(Clone, Copy)]
struct Room {
    len: u32,
    /// In two descriptors, the second half of the slot's data area before the first.
    scattered: bool,
}

/// Descriptors a slot may use (header, two data buffers, status).
const DESCS: u64 = 4;
const SLOT_DATA: u64 = 1 << 20;
const SLOT: u64 = SLOT_DATA + 4096;
const MEM_SIZE: u64 = RING_AREA * MAX_QUEUES + SLOTS * SLOT;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// One split virtqueue the front end drives.
struct Queue {
    index: usize,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

struct Device {
    fe: Frontend,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    /// Where guest memory is mapped in this process (the front end's addresses).
    hva: u64,
}

/// Gives the back end queue `q`'s size, rings, first index and eventfds.
fn setup_queue(fe: &mut Frontend, hva: u64, q: &Queue, base: u16) -> Res<()> {
    let index = q.index;
    fe.set_vring_num(index, QUEUE_SIZE)?;
    fe.set_vring_addr(
        index,
        &VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: hva + q.desc,
            used_ring_addr: hva + q.used,
            avail_ring_addr: hva + q.avail,
            log_addr: None,
        },
    )?;
    fe.set_vring_base(index, base)?;
    fe.set_vring_call(index, &q.call)?;
    fe.set_vring_kick(index, &q.kick)?;
    Ok(())
}

/// Where slot `s` keeps its header, status byte and data.
fn slot(s: u64) -> (u64, u64, u64) {
    let base = RING_AREA * MAX_QUEUES + s * SLOT;
    (base, base + 16, base + 4096)
}

impl Device {
    fn connect(path: &str, want_queues: usize) -> Res<(Device, String)> {
        let mut fe = Frontend::connect(path, MAX_QUEUES)?;
        fe.set_owner()?;
        let features = fe.get_features()?;
        let ack = features
            & (VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
                | 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_DISCARD
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_BLK_SIZE
                | 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO);
        fe.set_features(ack)?;
        let mut info = format!("features {features:#x}\n");
        let mut queue_num = 1;
        if ack & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = fe.get_protocol_features()?;
            info += &format!("protocol-features {:#x}\n", pf.bits());
            let want = pf & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ);
            fe.set_protocol_features(want)?;
            if want.contains(VhostUserProtocolFeatures::MQ) {
                queue_num = fe.get_queue_num()?;
                info += &format!("queue-num {queue_num}\n");
            }
            if want.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, cfg) = fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])?;
                let hex: String = cfg.iter().map(|b| format!("{b:02x}")).collect();
                info += &format!("config {hex}\n");
            }
        }
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])?;
        let region = mem.iter().next().ok_or("no memory region")?;
        let hva = region.as_ptr() as u64;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region)?])?;
        let n = want_queues.min(queue_num as usize).max(1);
        let mut queues = Vec::new();
        for index in 0..n {
            let base = index as u64 * RING_AREA;
            let q = Queue {
                index,
                desc: base,
                avail: base + 4096,
                used: base + 8192,
                next_avail: 0,
                last_used: 0,
                kick: EventFd::new(0)?,
                // Non-blocking: a wait clears every queue's descriptor, also those that did
                // not fire.
                call: EventFd::new(libc::EFD_NONBLOCK)?,
            };
            setup_queue(&mut fe, hva, &q, 0)?;
            queues.push(q);
        }
        if ack & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for q in &queues {
                fe.set_vring_enable(q.index, true)?;
            }
        }
        Ok((
            Device {
                fe,
                mem,
                queues,
                hva,
            },
            info,
        ))
    }

    /// Stops queue `q` (`GET_VRING_BASE`, as a driver's reset does); returns where the back
    /// end stopped.
    fn stop(&mut self, q: usize) -> Res<u32> {
        Ok(self.fe.get_vring_base(q)?)
    }

    /// Starts queue `q` again at `base` with a new kick eventfd, and kicks it once.
    fn start(&mut self, q: usize, base: u32) -> Res<()> {
        self.queues[q].kick = EventFd::new(0)?;
        setup_queue(&mut self.fe, self.hva, &self.queues[q], base as u16)?;
        self.fe.set_vring_enable(q, true)?;
        self.queues[q].kick.write(1)?;
        Ok(())
    }

    /// Puts a request in queue `q` using slot `s`; `data` is written for a device-readable
    /// payload, or `room.len` bytes are offered for the device to fill.
    fn submit(
        &mut self,
        q: usize,
        s: u64,
        kind: u32,
        sector: u64,
        out: Option<&[u8]>,
        room: Room,
    ) -> Res<()> {
        let Room { len, scattered } = room;
        let (hdr, status, data) = slot(s);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(hdr))?;
        self.mem.write_obj(0xffu8, GuestAddress(status))?;
        let queue = &mut self.queues[q];
        let first = (s * DESCS) as u16 % QUEUE_SIZE;
        let mut descs = vec![(hdr, 16u32, 0u16)];
        if let Some(bytes) = out {
            self.mem.write_slice(bytes, GuestAddress(data))?;
            descs.push((data, bytes.len() as u32, 0));
        } else if len > 0 && scattered {
            // The second half first, then the first: the device must follow the chain's
            // order, not the memory's.
            let half = len / 2;
            descs.push((data + u64::from(half), len - half, F_WRITE));
            descs.push((data, half, F_WRITE));
        } else if len > 0 {
            descs.push((data, len, F_WRITE));
        }
        descs.push((status, 1, F_WRITE));
        let count = descs.len();
        for (i, (addr, l, flags)) in descs.into_iter().enumerate() {
            let id = first + i as u16;
            let at = queue.desc + u64::from(id) * 16;
            let next = if i + 1 < count { F_NEXT } else { 0 };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&l.to_le_bytes());
            d[12..14].copy_from_slice(&(flags | next).to_le_bytes());
            d[14..16].copy_from_slice(&(id + 1).to_le_bytes());
            self.mem.write_slice(&d, GuestAddress(at))?;
        }
        let ring = queue.avail + 4 + u64::from(queue.next_avail % QUEUE_SIZE) * 2;
        self.mem.write_obj(first, GuestAddress(ring))?;
        fence(Ordering::SeqCst);
        queue.next_avail = queue.next_avail.wrapping_add(1);
        self.mem.store(
            queue.next_avail,
            GuestAddress(queue.avail + 2),
            Ordering::Release,
        )?;
        queue.kick.write(1)?;
        Ok(())
    }

    /// Completed requests of queue `q`: (slot, used length); waits for at least one.
    fn reap(&mut self, q: usize, wait: bool) -> Res<Vec<(u64, u32)>> {
        let queue = &mut self.queues[q];
        loop {
            let idx: u16 = self
                .mem
                .load(GuestAddress(queue.used + 2), Ordering::Acquire)?;
            let mut done = Vec::new();
            while queue.last_used != idx {
                let at = queue.used + 4 + u64::from(queue.last_used % QUEUE_SIZE) * 8;
                let id: u32 = self.mem.read_obj(GuestAddress(at))?;
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4))?;
                done.push((u64::from(id) / DESCS, len));
                queue.last_used = queue.last_used.wrapping_add(1);
            }
            if !done.is_empty() || !wait {
                return Ok(done);
            }
            let mut pfd = libc::pollfd {
                fd: queue.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            let _ = queue.call.read();
        }
    }

    /// The requests (queue, slot) answered on any queue, after sleeping until one is when
    /// none was.
    fn reap_any(&mut self) -> Res<Vec<(usize, u64)>> {
        let mut answered = Vec::new();
        for q in 0..self.queues.len() {
            answered.extend(self.reap(q, false)?.into_iter().map(|(s, _)| (q, s)));
        }
        if answered.is_empty() {
            self.wait_any();
        }
        Ok(answered)
    }

    /// Sleeps until some queue's call descriptor fires (or a moment passed).
    fn wait_any(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|q| libc::pollfd {
                fd: q.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        for q in &self.queues {
            let _ = q.call.read();
        }
    }

    fn status(&self, s: u64) -> Res<u8> {
        Ok(self.mem.read_obj(GuestAddress(slot(s).1))?)
    }

    fn data(&self, s: u64, len: usize) -> Res<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(slot(s).2))?;
        Ok(v)
    }
}

/// Runs the request lines on stdin, one at a time, printing each answer.
fn run(dev: &mut Device) -> Res<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut pending = 0u64;
    let mut answers = Vec::new();
    for line in stdin.lock().lines() {
        let line = line?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(&op) = f.first() else { continue };
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match op {
            // Leave with whatever is in flight.
            "exit" => std::process::exit(0),
            "stop" => {
                let base = dev.stop(0)?;
                writeln!(out, "stop: base {base}")?;
                out.flush()?;
                continue;
            }
            "start" => {
                dev.start(0, num(1) as u32)?;
                writeln!(out, "start: done")?;
                out.flush()?;
                continue;
            }
            "disable" | "enable" => {
                dev.fe.set_vring_enable(0, op == "enable")?;
                // A request with a reply: the back end has taken the one above by now.
                dev.fe.get_features()?;
                writeln!(out, "{op}: done")?;
                out.flush()?;
                continue;
            }
            "answered" => {
                // How many of the requests submitted without waiting are answered by now.
                answers.extend(dev.reap(0, false)?);
                writeln!(out, "answered: {}", answers.len())?;
                out.flush()?;
                continue;
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_millis(num(1)));
                continue;
            }
            "wait" => {
                // Answers of the requests submitted without waiting, in slot order.
                while answers.len() < pending as usize {
                    answers.extend(dev.reap(0, true)?);
                }
                answers.sort();
                for (s, used) in answers.drain(..) {
                    writeln!(out, "wait: slot {s} status {} used {used}", dev.status(s)?)?;
                }
                pending = 0;
                out.flush()?;
                continue;
            }
            _ => {}
        }
        let (sector, len, byte) = (num(1), num(2), num(3) as u8);
        let s = 1 + pending;
        let segment = |flags: u32| {
            let mut seg = Vec::new();
            seg.extend_from_slice(&sector.to_le_bytes());
            seg.extend_from_slice(&(len as u32).to_le_bytes());
            seg.extend_from_slice(&flags.to_le_bytes());
            seg
        };
        let (kind, payload, room) = match op {
            "read" | "read-scattered" => (0, None, len as u32),
            "write" | "submit-write" => (1, Some(vec![byte; len as usize]), 0),
            "flush" => (4, None, 0),
            "get-id" => (8, None, len as u32),
            "discard" => (11, Some(segment(0)), 0),
            "discard-unmap" => (11, Some(segment(1)), 0),
            "zeroes" => (13, Some(segment(0)), 0),
            "zeroes-unmap" => (13, Some(segment(1)), 0),
            t if t.starts_with("type:") => (t[5..].parse()?, None, 0),
            _ => return Err(format!("unknown request {op}").into()),
        };
        // A discard or write-zeroes names its range in its segment, not in the header.
        let segmented = op.starts_with("discard") || op.starts_with("zeroes");
        let sector = if segmented { 0 } else { sector };
        let scattered = op == "read-scattered";
        let offered = Room {
            len: room,
            scattered,
        };
        dev.submit(0, s, kind, sector, payload.as_deref(), offered)?;
        if op == "submit-write" {
            pending += 1;
            writeln!(out, "{line}: submitted")?;
            out.flush()?;
            continue;
        }
        let used = loop {
            let got = dev.reap(0, true)?;
            if let Some(&(_, used)) = got.iter().find(|(slot, _)| *slot == s) {
                break used;
            }
        };
        let status = dev.status(s)?;
        let mut answer = format!("{line}: status {status} used {used}");
        if room > 0 && status == 0 {
            let mut data = dev.data(s, room as usize)?;
            if scattered {
                // Back into the chain's order.
                data.rotate_left(room as usize / 2);
            }
            if data.len() <= 32 {
                answer += &format!(
                    " data {}",
                    String::from_utf8_lossy(&data).trim_end_matches('\0')
                );
            } else {
                let digest: String = Sha256::digest(&data)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                answer += &format!(" sha256 {digest}");
            }
        }
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

/// Keeps `depth` requests in flight over the queues for `seconds`; prints IOPS and MiB/s.
fn bench(dev: &mut Device, rw: &str, bs: u32, depth: u64, seconds: u64, size: u64) -> Res<()> {
    let write = rw.contains("write");
    let random = rw.starts_with("rand");
    let sectors = size / 512 / u64::from(bs / 512);
    let payload = vec![0x5au8; bs as usize];
    let mut seq = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next_sector = |rng: &mut u64| {
        let block = if random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            *rng % sectors
        } else {
            seq = (seq + 1) % sectors;
            seq
        };
        block * u64::from(bs / 512)
    };
    let mut issue = |dev: &mut Device, q: usize, s: u64| {
        let sector = next_sector(&mut rng);
        let (out, room) = if write {
            (Some(&payload[..]), 0)
        } else {
            (None, bs)
        };
        let room = Room {
            len: room,
            scattered: false,
        };
        dev.submit(q, s, u32::from(write), sector, out, room)
    };
    let queues = dev.queues.len();
    let depth = depth.min(SLOTS);
    for s in 0..depth {
        issue(dev, (s as usize) % queues, s)?;
    }
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        for (q, s) in dev.reap_any()? {
            done += 1;
            issue(dev, q, s)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // Every request answered before the connection ends, as a front end stopping a device
    // does: qemu-storage-daemon 10.0 aborts (`!server->wait_idle`) when a request arrives
    // while it waits for those in flight at a disconnect.
    let mut pending = depth;
    while pending > 0 {
        pending -= (dev.reap_any()?.len() as u64).min(pending);
    }
    let iops = done as f64 / secs;
    println!(
        "iops {iops:.0} mibps {:.1}",
        iops * f64::from(bs) / f64::from(1 << 20)
    );
    Ok(())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: vhost-user-blk-client SOCKET info|run|bench RW BS DEPTH SECONDS QUEUES";
    let (Some(socket), Some(cmd)) = (args.get(1), args.get(2)) else {
        return Err(usage.into());
    };
    let arg = |i: usize| args.get(i).and_then(|v| v.parse::<u64>().ok()).ok_or(usage);
    match cmd.as_str() {
        "info" => {
            let (_, info) = Device::connect(socket, 1)?;
            print!("{info}");
        }
        "run" => {
            let (mut dev, _) = Device::connect(socket, 1)?;
            run(&mut dev)?;
            dev.fe.reset_owner().ok();
        }
        "bench" => {
            let rw = args.get(3).ok_or(usage)?;
            let (mut dev, info) = Device::connect(socket, arg(7)? as usize)?;
            // The config space starts with the capacity in sectors, little-endian.
            let hex = info
                .lines()
                .find_map(|l| l.strip_prefix("config "))
                .ok_or("no config space")?;
            let mut le = [0u8; 8];
            for (i, b) in le.iter_mut().enumerate() {
                *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
            }
            let capacity = u64::from_le_bytes(le) * 512;
            bench(&mut dev, rw, arg(4)? as u32, arg(5)?, arg(6)?, capacity)?;
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
