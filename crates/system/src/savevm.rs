//! VM snapshots, the machine's half (QEMU: `save_snapshot`, `load_snapshot`,
//! `delete_snapshot` and `info snapshots`): the machine stops while one is taken or loaded,
//! its state (`vmstate`) goes into the VM state area of one image, and every image the
//! snapshot covers takes or returns to an internal snapshot of the same name
//! (`ferrite_blockdev::vm_snapshot`).

use crate::System;
use crate::machine::RunState;
use crate::vmstate;
use ferrite_block::driver::NewSnapshot;
use ferrite_blockdev::vm_snapshot;
use ferrite_jobs::{JobType, OneStep};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::QDict;
use ferrite_qobject::QObject;
use std::rc::Rc;

/// Which images a snapshot command names: all of them (`None`), or these nodes.
pub(crate) type DeviceList<'a> = Option<&'a [String]>;

/// A failed `loadvm`: what QEMU reports on its way (a refused VM state), then the error.
pub(crate) struct LoadFailure {
    pub(crate) report: Option<String>,
    pub(crate) error: Error,
}

impl From<Error> for LoadFailure {
    fn from(error: Error) -> LoadFailure {
        LoadFailure {
            report: None,
            error,
        }
    }
}

/// The local time of `secs` since the epoch, as `strftime` formats it with `fmt`.
fn local_time(secs: i64, fmt: &std::ffi::CStr) -> String {
    let tm = ferrite_block::clock::local_tm(secs);
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is writable for its length, `fmt` is NUL-terminated, `tm` initialised.
    let n = unsafe { libc::strftime(buf.as_mut_ptr().cast(), buf.len(), fmt.as_ptr(), &tm) };
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `savevm [NAME]` and `snapshot-save`: stops the machine, writes its state into the VM
/// state area of `vmstate` (or the first image that can take it) and takes snapshot
/// `name` (else one named after the time) of every image covered; a snapshot of that name
/// goes first if `overwrite`, else refuses.
///
/// # Errors
/// QEMU's texts: an image that cannot take snapshots, a name taken, no image for the VM
/// state, an image failing.
pub(crate) async fn save(
    sys: &Rc<System>,
    name: Option<&str>,
    overwrite: bool,
    vmstate: Option<&str>,
    devices: DeviceList<'_>,
) -> Result<(), Error> {
    let graph = &sys.daemon.graph;
    crate::migration::check_not_blocked(sys)?;
    vm_snapshot::check_all_can_snapshot(graph, devices).map_err(Error::from)?;
    if let Some(name) = name {
        if overwrite {
            vm_snapshot::delete_all(graph, name, devices)
                .await
                .map_err(Error::from)?;
        } else if vm_snapshot::all_have(graph, name, devices).map_err(Error::from)? {
            return Err(Error::generic(format!(
                "Snapshot '{name}' already exists in one or more devices"
            )));
        }
    }
    let target = vm_snapshot::vmstate_node(graph, vmstate, devices).map_err(Error::from)?;
    let was = sys.machine.stop_for(RunState::SaveVm);
    let drained = graph.drain_all().await;
    let now = NewSnapshot::now("", ferrite_block::clock::vm_clock_ns());
    let name = match name {
        Some(n) => n.to_owned(),
        None => local_time(i64::from(now.date_sec), c"vm-%Y%m%d%H%M%S"),
    };
    // QEMU records the run state from before the machine stopped for the snapshot.
    let state = vmstate::save(
        sys.machine.kind.canonical_name(),
        was.as_str(),
        &sys.devices,
        &[],
    );
    let snap = NewSnapshot {
        name,
        vm_state_size: state.len() as u64,
        ..now
    };
    let r = match vm_snapshot::save_vmstate(&target, 0, state).await {
        Err(e) => Err(Error::generic(format!(
            "Error while writing VM state: {}",
            ferrite_qapi::os_msg(&e)
        ))),
        Ok(()) => match vm_snapshot::create_all(graph, &snap, &target, devices).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = vm_snapshot::delete_all(graph, &snap.name, devices).await;
                Err(Error::from(e))
            }
        },
    };
    drop(drained);
    sys.machine.resume(was);
    r
}

/// `loadvm NAME`'s work once the machine is stopped (QEMU's `load_snapshot`): every image
/// covered goes back to snapshot `name`, and the machine's devices to the state saved with
/// it.
///
/// # Errors
/// QEMU's texts: an image that cannot take snapshots, no such snapshot on every image, a
/// disk-only snapshot, an image failing, a VM state this machine cannot take (with what
/// was wrong with it as the report).
pub(crate) async fn load(
    sys: &Rc<System>,
    name: &str,
    vmstate: Option<&str>,
    devices: DeviceList<'_>,
) -> Result<(), LoadFailure> {
    let graph = &sys.daemon.graph;
    vm_snapshot::check_all_can_snapshot(graph, devices).map_err(Error::from)?;
    if !vm_snapshot::all_have(graph, name, devices).map_err(Error::from)? {
        return Err(Error::generic(format!(
            "Snapshot '{name}' does not exist in one or more devices"
        ))
        .into());
    }
    let source = vm_snapshot::vmstate_node(graph, vmstate, devices).map_err(Error::from)?;
    let size = match vm_snapshot::find(&source, name) {
        None => return Err(Error::generic("Snapshot can not be found").into()),
        Some(s) => s.get("vm-state-size").and_then(|v| v.as_u64()).unwrap_or(0),
    };
    if size == 0 {
        return Err(Error::generic(
            "This is a disk-only snapshot. Revert to it  offline using qemu-img",
        )
        .into());
    }
    let drained = graph.drain_all().await;
    let r = restore(sys, name, &source, size, devices).await;
    drop(drained);
    r
}

/// The images back to snapshot `name`, then the devices to the state `source` kept.
async fn restore(
    sys: &Rc<System>,
    name: &str,
    source: &Rc<ferrite_block::Node>,
    size: u64,
    devices: DeviceList<'_>,
) -> Result<(), LoadFailure> {
    vm_snapshot::goto_all(&sys.daemon.graph, name, devices)
        .await
        .map_err(Error::from)?;
    let bad_state = |report: Option<String>, errno: i32| LoadFailure {
        report,
        error: Error::generic(format!("Error {} while loading VM state", -errno)),
    };
    let len = usize::try_from(size).map_err(|_| bad_state(None, libc::EFBIG))?;
    let bytes = vm_snapshot::load_vmstate(source, 0, len)
        .await
        .map_err(|e| bad_state(None, e.raw_os_error().unwrap_or(libc::EIO)))?;
    // The devices start from their reset state, as the stream then describes them.
    sys.machine.reset_devices();
    let loaded = vmstate::load(&bytes, sys.machine.kind.canonical_name(), &sys.devices)
        .map_err(|e| bad_state(Some(e.report), e.errno))?;
    loaded.restore(&sys.devices);
    Ok(())
}

/// `delvm NAME` and `snapshot-delete`: snapshot `name` goes from every image covered.
///
/// # Errors
/// An image that cannot take snapshots, or failing.
pub(crate) async fn delete(
    sys: &Rc<System>,
    name: &str,
    devices: DeviceList<'_>,
) -> Result<(), Error> {
    let graph = &sys.daemon.graph;
    vm_snapshot::check_all_can_snapshot(graph, devices).map_err(Error::from)?;
    vm_snapshot::delete_all(graph, name, devices)
        .await
        .map_err(Error::from)
}

/// `snapshot-save`, `snapshot-load` and `snapshot-delete`: the work of `savevm`, `loadvm`
/// and `delvm` as a job of that type, on the images `devices` names, the VM state in node
/// `vmstate`; a save never replaces a snapshot (QEMU's snapshot jobs).
///
/// # Errors
/// A bad or duplicate job ID; what the job finds goes into its `error`.
pub(crate) fn start_job(sys: &Rc<System>, command: &str, args: &Args) -> Result<(), Error> {
    let id = args.str("job-id")?.to_owned();
    let tag = args.str("tag")?.to_owned();
    let vmstate = args.opt_str("vmstate").map(str::to_owned);
    let devices: Vec<String> = match args.get("devices") {
        Some(QObject::List(l)) => l
            .iter()
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let jobs = sys.daemon.jobs.clone();
    let sys = sys.clone();
    let (kind, step): (JobType, OneStep) = match command {
        "snapshot-save" => (
            JobType::SnapshotSave,
            Box::pin(async move {
                save(&sys, Some(&tag), false, vmstate.as_deref(), Some(&devices))
                    .await
                    .map_err(|e| e.desc)
            }),
        ),
        "snapshot-load" => (
            JobType::SnapshotLoad,
            Box::pin(async move {
                let was = sys.machine.status();
                sys.machine.stop_for(RunState::RestoreVm);
                match load(&sys, &tag, vmstate.as_deref(), Some(&devices)).await {
                    Ok(()) => {
                        sys.machine.resume(was);
                        Ok(())
                    }
                    Err(f) => {
                        if let Some(r) = f.report {
                            ferrite_block::report::error_report(&r);
                        }
                        Err(f.error.desc)
                    }
                }
            }),
        ),
        _ => (
            JobType::SnapshotDelete,
            Box::pin(async move { delete(&sys, &tag, Some(&devices)).await.map_err(|e| e.desc) }),
        ),
    };
    ferrite_jobs::start_one_step(&jobs, id, kind, step).map_err(Error::from)
}

/// QEMU's `size_to_str`: three significant digits and a binary unit ("603 KiB").
fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = v as f64 / (1000.0 / 1024.0);
    // frexp's exponent: the bits the value needs.
    let bits = if scaled < 1.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((bits - 1).max(0) / 10).min(6) as usize;
    let x = v as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", g3(x), UNITS[i])
}

/// `%0.3g` of a value under 1000 (or just reaching it by rounding).
fn g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let digits = x.abs().log10().floor() as i32 + 1;
    let decimals = (3 - digits).max(0) as usize;
    let s = format!("{x:.decimals$}");
    if s.starts_with("1000") {
        return "1e+03".into();
    }
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// One line of a snapshot table (QEMU's `bdrv_snapshot_dump`), `id` in place of its ID;
/// the heading without a snapshot.
fn dump(s: Option<(&QDict, &str)>) -> String {
    let Some((s, id)) = s else {
        return format!(
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
    };
    let num = |k: &str| s.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let clock = num("vm-clock-sec") * 1_000_000_000 + num("vm-clock-nsec");
    let secs = clock / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (clock / 1_000_000) % 1000
    );
    let date = local_time(num("date-sec") as i64, c"%Y-%m-%d %H:%M:%S");
    let icount = s
        .get("icount")
        .and_then(|v| v.as_u64())
        .map_or_else(|| "--".to_owned(), |n| n.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        id,
        s.get("name").and_then(|v| v.as_str()).unwrap_or(""),
        size_to_str(num("vm-state-size")),
        date,
        clock,
        icount
    )
}

/// `info snapshots`: the snapshots every image has (loadable), then per image those only
/// some have.
pub(crate) fn info(sys: &Rc<System>) -> String {
    let graph = &sys.daemon.graph;
    let source = match vm_snapshot::vmstate_node(graph, None, None) {
        Ok(n) => n,
        Err(e) => return format!("{e}\n"),
    };
    let all = vm_snapshot::list(&source);
    let mut images: Vec<(String, Vec<QDict>)> = graph
        .top_level_nodes()
        .iter()
        .filter(|n| vm_snapshot::can_snapshot(n))
        .map(|n| (n.device_name(), vm_snapshot::list(n)))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if images.is_empty() {
        return "There is no snapshot available.\n".into();
    }
    let name_of = |s: &QDict| {
        s.get("name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let mut out = String::from("List of snapshots present on all disks:\n");
    let global: Vec<&QDict> = all
        .iter()
        .filter(|s| vm_snapshot::all_have(graph, &name_of(s), None).unwrap_or(false))
        .collect();
    for s in &global {
        for (_, list) in &mut images {
            list.retain(|x| name_of(x) != name_of(s));
        }
    }
    if global.is_empty() {
        out.push_str("None\n");
    } else {
        out.push_str(&dump(None));
        out.push('\n');
        for s in global {
            out.push_str(&dump(Some((s, "--"))));
            out.push('\n');
        }
    }
    for (image, list) in images.iter().filter(|(_, l)| !l.is_empty()) {
        out.push_str(&format!(
            "\nList of partial (non-loadable) snapshots on '{image}':\n"
        ));
        out.push_str(&dump(None));
        out.push('\n');
        for s in list {
            let id = s.get("id").and_then(|v| v.as_str()).unwrap_or("");
            out.push_str(&dump(Some((s, id))));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_qemu_prints_them() {
        for (v, s) in [
            (0, "0 B"),
            (12, "12 B"),
            (999, "999 B"),
            (1000, "0.977 KiB"),
            (1024, "1 KiB"),
            (617_472, "603 KiB"),
            (1_572_864, "1.5 MiB"),
        ] {
            assert_eq!(size_to_str(v), s, "{v}");
        }
    }
}
