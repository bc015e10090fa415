//! `thread-context`: a thread with a CPU affinity of the user's, for threads started from it
//! to inherit (QEMU starts its memory preallocation threads so). A storage daemon starts
//! none, but the thread is real: its id and affinity are what `thread-id` and
//! `cpu-affinity` report, as `taskset -p` sees them.

use super::{UserObject, check_prop};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::any::Any;
use std::cell::Cell;
use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

const PROPS: &str = "ThreadContextProperties";

/// The CPUs of an affinity, as given.
type CpuList = Vec<u16>;

/// The affinity the properties ask for, judged as QEMU's setters judge them while the
/// object is made (before its id is added): `cpu-affinity` is set before `node-affinity`,
/// and the two cannot be mixed.
pub(crate) fn initial_affinity(options: &Args) -> Result<Option<CpuList>> {
    let mut cpus = None;
    if let Some(v) = options.get("cpu-affinity") {
        cpus = Some(cpu_affinity(&cpus, v)?);
    }
    if let Some(v) = options.get("node-affinity") {
        cpus = Some(node_affinity(&cpus, v)?);
    }
    Ok(cpus)
}

/// A list of `uint16` as the schema checks it.
fn u16_list(name: &str, value: &QObject) -> Result<Vec<u16>> {
    let checked = check_prop(PROPS, name, value)?;
    Ok(checked
        .as_list()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_i64().and_then(|i| u16::try_from(i).ok()))
        .collect())
}

fn cpu_affinity(earlier: &Option<CpuList>, value: &QObject) -> Result<CpuList> {
    let cpus = u16_list("cpu-affinity", value)?;
    if earlier.is_some() {
        return Err(Error::MixedAffinity);
    }
    if cpus.is_empty() {
        return Err(Error::EmptyCpuList);
    }
    Ok(cpus)
}

fn node_affinity(earlier: &Option<CpuList>, value: &QObject) -> Result<CpuList> {
    let nodes = u16_list("node-affinity", value)?;
    if earlier.is_some() {
        return Err(Error::MixedAffinity);
    }
    if nodes.is_empty() {
        return Err(Error::EmptyNodeList);
    }
    let cpus = cpus_of_nodes(&nodes);
    if cpus.is_empty() {
        return Err(Error::NodesSelectNoCpus);
    }
    Ok(cpus)
}

/// The CPUs of NUMA nodes, from sysfs; a node that does not exist has none.
fn cpus_of_nodes(nodes: &[u16]) -> CpuList {
    let mut cpus: CpuList = nodes
        .iter()
        .filter_map(|n| {
            std::fs::read_to_string(format!("/sys/devices/system/node/node{n}/cpulist")).ok()
        })
        .flat_map(|list| parse_cpu_list(&list))
        .collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// A kernel CPU list (`0-3,8,10-11`); what does not parse is left out.
fn parse_cpu_list(text: &str) -> Vec<u16> {
    text.trim()
        .split(',')
        .filter(|r| !r.is_empty())
        .flat_map(|range| {
            let (lo, hi) = range.split_once('-').unwrap_or((range, range));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if lo <= hi => (lo..=hi).collect(),
                _ => Vec::new(),
            }
        })
        .collect()
}

/// The kernel's CPU mask of `cpus`: one bit per CPU, in words as long as the kernel's.
fn mask_of(cpus: &[u16]) -> Vec<libc::c_ulong> {
    const BITS: usize = libc::c_ulong::BITS as usize;
    let top = cpus.iter().copied().max().map_or(0, usize::from);
    let mut mask = vec![0 as libc::c_ulong; top / BITS + 1];
    for &c in cpus {
        let c = usize::from(c);
        mask[c / BITS] |= 1 << (c % BITS);
    }
    mask
}

/// `sched_setaffinity` or `sched_getaffinity` (`call`) of thread `tid` with `mask`.
fn affinity_call(
    call: libc::c_long,
    tid: libc::pid_t,
    mask: &mut [libc::c_ulong],
) -> io::Result<()> {
    // SAFETY: the kernel reads or writes at most `size_of_val(mask)` bytes of a buffer that
    // is that long and borrowed for the whole call; nothing else is passed by pointer.
    let rc = unsafe { libc::syscall(call, tid, std::mem::size_of_val(mask), mask.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the affinity of thread `tid`.
fn set_affinity(tid: libc::pid_t, cpus: &[u16]) -> io::Result<()> {
    affinity_call(libc::SYS_sched_setaffinity, tid, &mut mask_of(cpus))
}

/// The affinity of thread `tid`.
fn affinity(tid: libc::pid_t) -> io::Result<CpuList> {
    let bits = libc::c_ulong::BITS as usize;
    // Room for 65536 CPUs, more than any kernel's mask.
    let mut mask = vec![0 as libc::c_ulong; 65536 / bits];
    affinity_call(libc::SYS_sched_getaffinity, tid, &mut mask)?;
    Ok((0..mask.len() * bits)
        .filter(|&c| mask[c / bits] & (1 << (c % bits)) != 0)
        .filter_map(|c| u16::try_from(c).ok())
        .collect())
}

/// A `thread-context` object: its thread, which waits until the object goes.
pub(crate) struct ThreadContext {
    tid: libc::pid_t,
    /// Dropping it ends the thread.
    stop: Cell<Option<mpsc::Sender<()>>>,
    thread: Cell<Option<JoinHandle<()>>>,
}

impl ThreadContext {
    /// Starts the thread (QEMU names it `TC <id>`) and gives it the affinity asked for.
    ///
    /// # Errors
    /// The properties, as [`initial_affinity`]; the thread not starting; the affinity
    /// refused ("Setting CPU affinity failed: ...").
    pub(crate) fn create(options: &Args) -> Result<ThreadContext> {
        let cpus = initial_affinity(options)?;
        let id = options.str("id")?;
        let (stop, stopped) = mpsc::channel::<()>();
        let (tell_tid, tid) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("TC {id}"))
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let _ = tell_tid.send(unsafe { libc::gettid() });
                // Until the object goes: every sender dropped ends the wait.
                let _ = stopped.recv();
            })
            .map_err(Error::ThreadStart)?;
        let tid = tid.recv().map_err(|_| {
            Error::ThreadStart(io::Error::other("the thread ended before it started"))
        })?;
        let me = ThreadContext {
            tid,
            stop: Cell::new(Some(stop)),
            thread: Cell::new(Some(thread)),
        };
        if let Some(cpus) = cpus {
            set_affinity(tid, &cpus).map_err(Error::SetAffinity)?;
        }
        Ok(me)
    }
}

impl Drop for ThreadContext {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl UserObject for ThreadContext {
    fn type_name(&self) -> &'static str {
        "thread-context"
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        match name {
            "thread-id" => Some(Ok(QObject::Int(i64::from(self.tid)))),
            "cpu-affinity" => Some(
                affinity(self.tid)
                    .map(|cpus| {
                        let list: Vec<QObject> =
                            cpus.into_iter().map(|c| QObject::Int(c.into())).collect();
                        list.into()
                    })
                    .map_err(Error::GetAffinity),
            ),
            "node-affinity" => Some(Err(Error::WriteOnlyProperty {
                ty: "thread-context".into(),
                name: name.into(),
            })),
            _ => None,
        }
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        // Once the thread runs, each setter applies its own affinity: mixing is no longer
        // a question.
        let cpus = match name {
            "cpu-affinity" => cpu_affinity(&None, value),
            "node-affinity" => node_affinity(&None, value),
            "thread-id" => Err(Error::ReadOnlyProperty {
                ty: "thread-context".into(),
                name: name.into(),
            }),
            _ => return None,
        };
        Some(cpus.and_then(|cpus| set_affinity(self.tid, &cpus).map_err(Error::SetAffinity)))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("\n"), Vec::<u16>::new());
        assert_eq!(parse_cpu_list("3-1,x,5"), [5]);
    }

    #[test]
    fn masks_have_a_bit_per_cpu() {
        let m = mask_of(&[0, 65, 1]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0], 0b11);
        assert_eq!(m[1], 0b10);
    }
}
