"""ferrite-system-x86_64 against qemu-system-x86_64 10.0: the probes test harnesses make,
command-line errors, and one QMP transcript (run state, drives, devices, hot-unplug, the human
monitor, quit) with its events.

Debian's qemu-system has no qtest accelerator, so QEMU runs with `-accel tcg -S`: its guest
never starts (the machine stays in prelaunch or paused as the commands put it), which is
what ferrite's machine without a CPU is. ferrite runs with `-accel qtest`, as QEMU's iotests
start it."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, RawQmp, assert_same_transcript, normalize, wait_for

SYSTEM = os.environ.get(
    "FERRITE_SYSTEM_BIN",
    os.path.join(os.path.dirname(os.environ.get(
        "FERRITE_BIN", str(ROOT / "target" / "debug" / "ferrite-storage-daemon"))),
        "ferrite-system-x86_64"))
QEMU = shutil.which("qemu-system-x86_64")

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")


def run(binary, *args):
    r = subprocess.run([binary, *args], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    prog = os.path.basename(binary)
    return r.returncode, r.stdout.replace(prog, "PROG"), r.stderr.replace(prog, "PROG")


def test_probes_name_what_qemu_names():
    # The default machine, found as iotests' testenv finds it.
    _, out, _ = run(SYSTEM, "-machine", "help")
    _, qout, _ = run(QEMU, "-machine", "help")
    for name in ["pc", "pc-i440fx-10.0", "q35", "pc-q35-10.0", "none"]:
        mine = [l for l in out.splitlines() if l.split(" ", 1)[0] == name]
        theirs = [l for l in qout.splitlines() if l.split(" ", 1)[0] == name]
        assert mine == theirs, name
    assert out.splitlines()[0] == "Supported machines are:"
    # Each device line is QEMU's line for that model.
    _, out, _ = run(SYSTEM, "-M", "none", "-device", "help")
    _, qout, _ = run(QEMU, "-M", "none", "-device", "help")
    lines = [l for l in out.splitlines() if l.startswith("name ")]
    names = sorted(l.split('"')[1] for l in lines)
    assert names == sorted(["pci-bridge", "pcie-root-port", "ide-cd", "ide-hd", "lsi53c895a",
                            "floppy", "scsi-cd", "scsi-hd", "virtio-blk-pci",
                            "virtio-scsi-pci"]), names
    for l in lines:
        assert l in qout.splitlines(), l
    # Two "Supported formats" lines, each naming drivers QEMU has too.
    _, out, _ = run(SYSTEM, "-drive", "format=help")
    _, qout, _ = run(QEMU, "-drive", "format=help")
    mine, theirs = out.splitlines(), qout.splitlines()
    assert [l.split(":")[0] for l in mine] == [l.split(":")[0] for l in theirs]
    for m, t in zip(mine, theirs):
        assert set(m.split(":")[1].split()) <= set(t.split(":")[1].split())
        assert "qcow2" in m.split() and "raw" in m.split()
    _, out, _ = run(SYSTEM, "-version")
    assert re.match(r"QEMU emulator version 10\.0\.2 \(.*\)\n", out)


ERRORS = [
    ["-foo"],
    ["-drive"],
    ["-M", "foo"],
    ["-M", "none", "-accel", "foo"],
    ["-M", "none", "-device", "foo"],
    ["-M", "none", "-drive", "if=foo,file=IMG"],
    ["-M", "none", "-drive", "if=none,file=IMG,format=qcow2,bogus=1"],
    ["-M", "none", "-drive", "if=none,file=IMG,format=nosuch"],
    ["-M", "none", "-drive", "if=none,id=x,file=IMG,format=qcow2",
     "-drive", "if=none,id=x,file=IMG,format=qcow2"],
    ["-M", "none", "-drive", "if=virtio,file=IMG,format=qcow2"],
    ["-M", "none", "-drive", "if=none,file=/nonexistent/img"],
    ["-device", "virtio-blk-pci"],
    ["-device", "virtio-blk-pci,drive=nosuch"],
    ["-drive", "if=none,id=d,file=IMG,format=qcow2", "-device", "virtio-blk-pci,drive=d",
     "-device", "virtio-blk-pci,drive=d"],
    ["-qmp", "foo"],
    ["-drive", "if=none,file=IMG,format=qcow2,throttling.iops-total=abc"],
    ["-drive", "if=none,file=IMG,format=qcow2,throttling.bps-total=1,throttling.bps-read=1"],
    ["-drive", "if=none,file=IMG,format=qcow2,throttling.nosuch=1"],
    ["-drive", "if=none,file=IMG,format=qcow2,throttling.iops-size=5"],
    ["-drive", "if=none,file=IMG,format=qcow2,throttling.bps-total=5,throttling.bps-total-max=1"],
    ["-device", "ide-cd,id=a", "-device", "ide-cd,id=b", "-device", "ide-cd,id=c"],
    ["-M", "q35", "-device", "ide-cd,id=a", "-device", "ide-cd,id=b"],
    ["-device", "ide-cd,id=a,unit=2"],
    ["-device", "ide-cd,id=a,bus=ide.1", "-device", "ide-cd,id=b,bus=ide.1,unit=0"],
    # -drive's own checks and bdrv_open's words for options that open nothing (iotest 051).
    ["-drive", "file=IMG,driver=raw,format=qcow2"],
    ["-drive", "file=IMG,readonly=on,read-only=off"],
    ["-drive", "driver=file"],
    ["-drive", "driver=file,filename="],
    ["-drive", "driver=nbd"],
    ["-drive", "driver=raw"],
    ["-drive", "file.driver=file"],
    ["-drive", "file.driver=nbd"],
    ["-drive", "file.driver=raw"],
    ["-drive", "foo=bar"],
    ["-drive", "file=foo:bar"],
    ["-hda", "foo:bar"],
    ["-drive", "file.filename=foo:bar"],
    ["-drive", "file=IMG,driver=raw,backing.file.filename=IMG"],
    ["-drive", "file=IMG,file.backing.driver=file,file.backing.filename=IMG"],
    ["-drive", "file=IMG,if=none,node-name=disk", "-object", "iothread,id=t0",
     "-device", "virtio-scsi,iothread=t0,id=s0",
     "-device", "scsi-hd,bus=s0.0,drive=disk,share-rw=on",
     "-device", "lsi53c895a,id=lsi0", "-device", "scsi-hd,bus=lsi0.0,drive=disk,share-rw=on"],
    ["-drive", "file=IMG,if=none,node-name=disk", "-object", "iothread,id=t0",
     "-device", "virtio-scsi,iothread=t0,id=s0",
     "-device", "scsi-hd,bus=s0.0,drive=disk,share-rw=on",
     "-device", "virtio-blk-pci,drive=disk,iothread=t0,share-rw=on"],
    # -object: parsing errors name the option (a duplicate id among them found as they are
    # parsed); what making the object finds does not.
    ["-object", "secret,id=k,data=x", "-object", "secret,id=k,data=y"],
    ["-object", "iothread,id=1i"],
    ["-object", "secret_keyring,id=k"],
    ["-object", "secret,id=k"],
    ["-object", "secret_keyring,id=k,serial=1"],
    ["-object", "secret,id=k,data=x,keyid=nope"],
    ["-object", "throttle-group,id=t,x-iops-total=-1"],
    ["-object", "iothread,id=i,thread-pool-min=5,thread-pool-max=2"],
    # virtio devices' queues and iothread links: set as properties, judged at realize.
    ["-drive", "if=none,id=d,file=IMG", "-device", "virtio-blk-pci,drive=d,num-queues=0"],
    ["-drive", "if=none,id=d,file=IMG", "-device", "virtio-blk-pci,drive=d,num-queues=x"],
    ["-drive", "if=none,id=d,file=IMG", "-device", "virtio-blk-pci,drive=d,num-queues=-1"],
    ["-drive", "if=none,id=d,file=IMG", "-device", "virtio-blk-pci,drive=d,queue-size=2"],
    ["-drive", "if=none,id=d,file=IMG", "-device", "virtio-blk-pci,drive=d,queue-size=96"],
    ["-drive", "if=none,id=d,file=IMG",
     "-device", "virtio-blk-pci,drive=d,num-queues=0,queue-size=3"],
    ["-device", "virtio-blk-pci,num-queues=x"],
    ["-device", "virtio-blk-pci,iothread=nosuch,drive=nosuch"],
    ["-object", "secret,id=s,data=x", "-drive", "if=none,id=d,file=IMG",
     "-device", "virtio-blk-pci,drive=d,iothread=s"],
    ["-device", "virtio-scsi-pci,num_queues=1023"],
    ["-device", "virtio-scsi-pci,iothread=nosuch"],
    # A bad detect-zeroes is found with the drive's common options, before the format.
    ["-drive", "if=none,file=IMG,detect-zeroes=bogus,format=nosuch,werror=x"],
    ["-drive", "if=none,detect-zeroes=bogus"],
    # Board drives past the board's IDE buses or floppy drives are orphans; a device names
    # only the IDE buses there are.
    ["-drive", "if=ide,index=9,file=IMG"],
    ["-M", "q35", "-drive", "if=ide,index=6,file=IMG"],
    ["-drive", "if=floppy,index=2,file=IMG"],
    ["-M", "none", "-drive", "if=floppy,file=IMG"],
    ["-drive", "if=none,id=d,file=IMG", "-device", "ide-hd,drive=d,bus=ide.5"],
    ["-M", "q35", "-drive", "if=none,id=d,file=IMG", "-device", "ide-hd,drive=d,bus=ide.6"],
]


@pytest.mark.parametrize("args", ERRORS, ids=lambda a: " ".join(a))
def test_command_line_errors_read_as_qemus(tmp_path, args):
    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    args = [a.replace("IMG", str(img)) for a in args]
    # No accelerator of our own: the first that works is used, and an invalid one after
    # it would go unnoticed.
    base = ["-nodefaults", "-display", "none", "-S"]
    q = run(QEMU, *base, *args)
    f = run(SYSTEM, *base, *args)
    assert q[0] == 1
    assert f == q


def test_too_many_virtio_blk_queues_are_refused_where_qemu_aborts(tmp_path):
    """qemu-system aborts on more than 1024 virtio-blk queues; ferrite says why."""
    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    dev = "virtio-blk-pci,drive=d,num-queues=1025"
    rc, _, err = run(SYSTEM, "-nodefaults", "-display", "none", "-S",
                     "-drive", f"if=none,id=d,file={img}", "-device", dev)
    assert (rc, err) == (1, f"PROG: -device {dev}: num-queues property must be at most 1024\n")


class Machine:
    """A qemu-system-like program with a QMP monitor, stopped at start (-S) unless not
    `paused`."""

    def __init__(self, binary, accel, workdir, extra, paused=True):
        self.sock = str(workdir / "qmp.sock")
        args = [binary, "-nodefaults", "-display", "none", "-accel", accel,
                *(["-S"] if paused else []),
                "-chardev", f"socket,id=mon,path={self.sock},server=on,wait=off",
                "-mon", "chardev=mon,mode=control", *extra]
        self.stderr = workdir / "stderr.txt"
        self.stdout = workdir / "stdout.txt"
        self.proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=open(self.stdout, "wb"),
                                     stderr=open(self.stderr, "wb"))
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None,
                 what="QMP socket")
        assert self.proc.poll() is None, self.stderr.read_text()
        self.qmp = RawQmp(self.sock)
        self.qmp.cmd("qmp_capabilities")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def hide(value):
    """What legitimately differs: generated node names, timestamps, the package string."""
    text = normalize(json.dumps(value, sort_keys=True))
    text = re.sub(r"#block\d+", "#blockN", text)
    text = re.sub(r'"actual-size": \d+', '"actual-size": 0', text)
    text = re.sub(r'"offset": \d+', '"offset": 0', text)
    text = re.sub(r'"busy": (true|false)', '"busy": false', text)
    return json.loads(text)


STEPS = [
    ("query-status", None),
    ("cont", None),
    ("query-status", None),
    ("stop", None),
    ("stop", None),
    ("query-status", None),
    ("system_reset", None),
    ("query-status", None),
    ("system_powerdown", None),
    ("query-name", None),
    ("query-block", None),
    ("query-blockstats", None),
    ("device_add", {"driver": "virtio-blk-pci", "id": "hot", "drive": "spare"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "hot2", "drive": "spare"}),
    ("device_add", {"driver": "nosuch"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "x", "drive": "spare", "nope": 1}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "x"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "hot", "drive": "n2"}),
    ("query-block", None),
    ("device_del", {"id": "hot"}),
    ("device_del", {"id": "nosuch"}),
    ("query-block", None),
    ("system_reset", None),
    # The unplug completes after the reset, soon after the command's return.
    ("sleep", None),
    ("query-block", None),
    ("human-monitor-command", {"command-line": "info status"}),
    ("human-monitor-command", {"command-line": "cont"}),
    ("human-monitor-command", {"command-line": "info status"}),
    ("human-monitor-command", {"command-line": "nosuch"}),
    # Bitmap commands find a drive by its name.
    ("block-dirty-bitmap-add", {"node": "drive0", "name": "b0"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "drive0", "name": "b0"}),
    # A job named after its drive (no job-id), slowed so that it is still there at the end;
    # how far it got is timing.
    ("block-stream", {"device": "drive0", "speed": 1}),
    ("query-block-jobs", None),
]


def transcript(binary, accel, workdir):
    img = workdir / "disk.qcow2"
    base = workdir / "base.qcow2"
    spare = workdir / "spare.raw"
    other = workdir / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", str(base)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(img)], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(spare), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "2M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-name", "guest=vm1",
        "-drive", f"if=virtio,id=drive0,file={img},format=qcow2,cache=writeback,aio=threads",
        "-drive", f"if=none,id=spare,file={spare},format=raw",
        "-blockdev", f"driver=qcow2,node-name=n2,file.driver=file,file.filename={other}",
        "-device", "virtio-blk-pci,id=vblk,drive=n2",
    ])
    return run_steps(m, STEPS)


def taken_events(m):
    """The events `m` sent since the last taken, without their timestamps."""
    events = [hide({k: v for k, v in e.items() if k != "timestamp"}) for e in m.qmp.events]
    m.qmp.events.clear()
    return events


def run_steps(m, steps):
    """Runs `steps` on machine `m`, then quits it: each reply and the events it caused."""
    out = []
    try:
        for name, args in steps:
            if name == "sleep":
                # What happens meanwhile counts with the step before: whether QEMU's events
                # of a reset come before its reply or just after depends on the load.
                time.sleep(0.5)
                m.qmp.cmd("query-status")
                out[-1][1].extend(taken_events(m))
                continue
            r = m.qmp.cmd(name, args)
            out.append((name, args, hide(r)))
            out.append(("events", taken_events(m)))
        r = m.qmp.cmd("quit")
        out.append(("quit", hide(r)))
        m.proc.wait(10)
        out.append(("exit", m.proc.returncode))
    finally:
        m.stop()
    return out


def same_dirs(got):
    """ferrite's transcript with its work directory named as QEMU's."""
    return json.loads(json.dumps(got).replace("/f/", "/q/"))


def compare_with_qemu(tmp_path, transcript_of):
    """Runs `transcript_of(binary, accel, workdir)` for qemu-system and for ferrite, each in
    its own directory, and compares what they said."""
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = transcript_of(QEMU, "tcg", tmp_path / "q")
    got = transcript_of(SYSTEM, "qtest", tmp_path / "f")
    assert_same_transcript(json.loads(json.dumps(expected)), same_dirs(got))


def test_machine_transcript_matches_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, transcript)


# Removable media: trays, media in and out, what each refusal says, and the tray events.
MEDIA_STEPS = [
    ("query-block", None),
    ("blockdev-open-tray", {"id": "cd0"}),
    ("blockdev-open-tray", {"id": "cd0"}),
    ("blockdev-remove-medium", {"id": "cd0"}),
    ("query-block", None),
    ("blockdev-insert-medium", {"id": "cd0", "node-name": "new"}),
    ("blockdev-insert-medium", {"id": "cd0", "node-name": "new"}),
    ("blockdev-close-tray", {"id": "cd0"}),
    ("blockdev-close-tray", {"id": "cd0"}),
    ("query-block", None),
    ("blockdev-remove-medium", {"id": "cd0"}),
    ("eject", {"id": "cd0"}),
    ("eject", {"device": "cdrive"}),
    ("blockdev-close-tray", {"device": "cdrive"}),
    ("blockdev-change-medium", {"id": "cd0", "filename": "@old@", "format": "qcow2"}),
    ("blockdev-change-medium", {"id": "cd0", "filename": "@raw@"}),
    ("query-block", None),
    # Devices made on a node and without a drive.
    ("blockdev-open-tray", {"id": "scd"}),
    ("blockdev-remove-medium", {"id": "scd"}),
    ("blockdev-close-tray", {"id": "scd"}),
    ("blockdev-change-medium", {"id": "empty", "filename": "@raw@", "format": "raw"}),
    ("query-block", None),
    # A floppy drive has no tray: media go straight in and out.
    ("blockdev-open-tray", {"id": "fd"}),
    ("blockdev-remove-medium", {"id": "fd"}),
    ("query-block", None),
    ("blockdev-insert-medium", {"id": "fd", "node-name": "ro"}),
    ("query-block", None),
    ("blockdev-change-medium", {"id": "fd", "filename": "@old@", "format": "qcow2",
                                "read-only-mode": "read-write"}),
    ("blockdev-change-medium", {"id": "fd", "filename": "@raw@", "format": "raw"}),
    ("query-block", None),
    # Refusals.
    ("eject", {"id": "hd"}),
    ("blockdev-open-tray", {"id": "hd"}),
    ("blockdev-close-tray", {"id": "hd"}),
    ("blockdev-remove-medium", {"id": "hd"}),
    ("blockdev-insert-medium", {"id": "hd", "node-name": "spare"}),
    ("blockdev-open-tray", {}),
    ("blockdev-open-tray", {"id": "cd0", "device": "cdrive"}),
    ("blockdev-open-tray", {"id": "nosuch"}),
    ("blockdev-open-tray", {"device": "nosuch"}),
    ("blockdev-open-tray", {"id": "vscsi"}),
    ("blockdev-insert-medium", {"id": "cd0", "node-name": "nosuch"}),
    ("blockdev-insert-medium", {"id": "cd0", "node-name": "n-hd"}),
    ("blockdev-change-medium", {"id": "cd0", "filename": "/nonexistent.img"}),
    ("blockdev-change-medium", {"id": "cd0", "filename": "@raw@", "format": "nosuch"}),
    ("blockdev-remove-medium", {"id": "nosuch"}),
    # A drive without a device: no tray to open, the medium simply goes.
    ("blockdev-open-tray", {"device": "lone"}),
    ("eject", {"device": "lone"}),
    ("query-block", None),
    ("block_resize", {"device": "lone", "size": 65536}),
]


def media_transcript(binary, accel, workdir):
    old = workdir / "old.qcow2"
    new = workdir / "new.qcow2"
    raw = workdir / "cd.raw"
    for path, fmt, size in [(old, "qcow2", "1440k"), (new, "qcow2", "1440k"),
                            (raw, "raw", "1M")]:
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=cdrive,file={old},format=qcow2,media=cdrom",
        "-device", "ide-cd,drive=cdrive,id=cd0",
        "-device", "ide-cd,id=empty",
        "-blockdev", f"driver=raw,node-name=n-scd,file.driver=file,file.filename={raw},read-only=on",
        "-device", "virtio-scsi-pci,id=vscsi",
        "-device", "scsi-cd,drive=n-scd,id=scd",
        "-drive", f"if=none,id=fdrive,file={raw},format=raw,force-share=on,read-only=on",
        "-device", "floppy,drive=fdrive,id=fd",
        "-blockdev", f"driver=qcow2,node-name=n-hd,file.driver=file,file.filename={new}",
        "-device", "ide-hd,drive=n-hd,id=hd,bus=ide.0",
        "-drive", f"if=none,id=lone,file={raw},format=raw,force-share=on,read-only=on",
        "-blockdev", f"driver=qcow2,node-name=new,file.driver=file,file.filename={new},"
                     "force-share=on,read-only=on",
        "-blockdev", f"driver=raw,node-name=ro,read-only=on,file.driver=file,"
                     f"file.filename={raw}",
        "-blockdev", "driver=null-co,node-name=spare",
    ])
    subst = {"@old@": str(old), "@raw@": str(raw)}
    steps = [(n, None if a is None else {k: subst.get(v, v) for k, v in a.items()})
             for n, a in MEDIA_STEPS]
    return run_steps(m, steps)


def test_removable_media_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, media_transcript)


# A drive's own I/O limits: from -drive throttling.*, changed, moved to another group, refused,
# turned off; query-block reports them.
THROTTLE_STEPS = [
    ("query-block", None),
    ("block_set_io_throttle", {"device": "drive0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                               "iops": 100, "iops_rd": 0, "iops_wr": 0}),
    ("query-block", None),
    ("block_set_io_throttle", {"id": "/machine/peripheral/vd/virtio-backend", "bps": 1000000,
                               "bps_rd": 0, "bps_wr": 0, "iops": 10, "iops_rd": 0, "iops_wr": 0,
                               "bps_max": 2000000, "bps_max_length": 3, "iops_size": 4096,
                               "group": "g2"}),
    ("query-block", None),
    ("block_set_io_throttle", {"id": "vd", "bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0,
                               "iops_rd": 0, "iops_wr": 0}),
    ("block_set_io_throttle", {"device": "drive0", "bps": 1, "bps_rd": 1, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    ("block_set_io_throttle", {"device": "drive0", "bps": 10, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0, "bps_max": 5}),
    ("block_set_io_throttle", {"device": "drive0", "bps": -1, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    ("block_set_io_throttle", {"device": "drive0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0, "iops_size": 512}),
    ("block_set_io_throttle", {"device": "empty", "bps": 1, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    ("block_set_io_throttle", {"device": "nosuch", "bps": 1, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    ("block_set_io_throttle", {"bps": 1, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
                               "iops_wr": 0}),
    ("block_set_io_throttle", {"device": "drive0", "bps": 0, "bps_rd": 0, "bps_wr": 0,
                               "iops": 0, "iops_rd": 0, "iops_wr": 0}),
    ("query-block", None),
]

# Requests held by the limits: each op's time as qemu-io reports it (the first of a burst
# goes at once, the next wait for the bucket to drain).
THROTTLED_IO = [
    'qemu-io drive0 "write 0 512k"',
    'qemu-io drive0 "write 0 512k"',
    'qemu-io drive0 "read 0 512k"',
    "block_set_io_throttle iops=4",
    'qemu-io drive0 "write 0 4k"',
    'qemu-io drive0 "write 0 4k"',
    'qemu-io drive0 "read 0 4k"',
]


def throttle_transcript(binary, accel, workdir):
    img = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=drive0,file={img},format=qcow2,throttling.iops-total=50,"
                  "throttling.group=gx",
        "-drive", "if=none,id=empty",
        "-device", "virtio-blk-pci,id=vd,drive=drive0",
    ])
    return run_steps(m, THROTTLE_STEPS)


def throttled_op_times(binary, accel, workdir):
    raw = workdir / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=drive0,file={raw},format=raw,throttling.bps-total=1048576",
    ])
    try:
        for line in THROTTLED_IO:
            if line.startswith("block_set_io_throttle"):
                limits = {k: 0 for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd",
                                         "iops_wr"]}
                limits["iops"] = 4
                assert m.qmp.cmd("block_set_io_throttle", dict(limits, device="drive0")) \
                    == {"return": {}}
                continue
            assert m.qmp.cmd("human-monitor-command", {"command-line": line}) \
                == {"return": ""}
    finally:
        m.stop()
    return [float(t) for t in re.findall(r"ops; (\d+\.\d+) sec", m.stdout.read_text())]


def test_drive_io_limits_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, throttle_transcript)


def test_drive_io_limits_hold_requests_as_qemus_do(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = throttled_op_times(QEMU, "tcg", tmp_path / "q")
    # With tcg the host's clock runs (under qtest the test would have to move it).
    got = throttled_op_times(SYSTEM, "tcg", tmp_path / "f")
    assert len(expected) == len(got) == 6
    # 0, 0.4, 0.5 s at 1 MiB/s; 0, 0.15, 0.25 s at 4 IOPS.
    assert expected[1] > 0.3
    for e, g in zip(expected, got):
        assert abs(e - g) < 0.1, (expected, got)


def qtest_channel(path):
    """A connection to a qtest socket: a function that sends a line and returns the
    answer, and the file and socket under it."""
    import socket
    qt = socket.socket(socket.AF_UNIX)
    qt.connect(path)
    qtf = qt.makefile("rw")

    def qtest(line):
        qtf.write(line + "\n")
        qtf.flush()
        return qtf.readline().strip()
    return qtest, qtf, qt


def test_qtest_clock_drives_throttled_requests(tmp_path):
    """Under -accel qtest, limits set once the machine runs (`block_set_io_throttle`) hold
    requests on the virtual clock: nothing moves while the test does not step it, and a
    step of N seconds lets N seconds' worth through (093's check: within 10%). A command
    line's `-drive` limits keep the host's clock, as QEMU makes those drives before its
    accelerator (measured with qemu-system-x86_64 10.0.2 built with qtest: 2 requests at
    once, 10 more in a second of real time, 1 more for a 5 s step; iotest
    mirror-change-copy-mode relies on it)."""
    qtest_sock = str(tmp_path / "qtest.sock")
    m = Machine(SYSTEM, "qtest", tmp_path, [
        "-chardev", f"socket,id=qt,path={qtest_sock},server=on,wait=off",
        "-qtest", "chardev:qt",
        "-drive", "if=none,id=drive0,file=null-co://,format=raw,file.read-zeroes=on",
        "-drive", "if=none,id=host,file=null-co://,format=raw,file.read-zeroes=on,"
                  "throttling.bps-total=40960",
    ])
    try:
        qtest, qtf, qt = qtest_channel(qtest_sock)

        def read_bytes(drive):
            stats = m.qmp.cmd("query-blockstats")["return"]
            return next(s["stats"]["rd_bytes"] for s in stats if s["device"] == drive)

        def reads(drive, n):
            for _ in range(n):
                assert m.qmp.cmd("human-monitor-command",
                                 {"command-line": f'qemu-io {drive} "aio_read 0 4096"'}) \
                    == {"return": ""}

        limits = {k: 0 for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"]}
        assert m.qmp.cmd("block_set_io_throttle",
                         dict(limits, bps=40960, device="drive0")) == {"return": {}}
        assert qtest("clock_step 5000000000") == "OK 5000000000"
        reads("drive0", 100)
        reads("host", 100)
        start = read_bytes("drive0")
        host_start = read_bytes("host")
        # The first requests go at once (a tenth of a second's worth); then nothing moves
        # while the clock stands still, except on the host's clock.
        assert 0 < start <= 2 * 4096
        assert 0 < host_start <= 2 * 4096
        time.sleep(1)
        assert read_bytes("drive0") == start
        host_later = read_bytes("host")
        assert 7 * 4096 <= host_later - host_start <= 14 * 4096, host_later - host_start
        assert qtest("clock_step 5000000000") == "OK 10000000000"
        done = read_bytes("drive0") - start
        # 40960 bytes/s for 5 s: 50 requests of 4 KiB; the host's clock did not jump.
        assert 45 * 4096 <= done <= 55 * 4096, done
        assert read_bytes("host") - host_later <= 3 * 4096
        # Without an amount, the clock goes to the next timer: one more request.
        assert qtest("clock_step").startswith("OK 10")
        assert read_bytes("drive0") - start - done == 4096
        # QEMU's qtest log on standard error: the channel opening, each command and answer,
        # and the channel closing.
        qtf.close()
        qt.close()
        wait_for(lambda: "CLOSED" in m.stderr.read_text(), what="qtest log")
        log = m.stderr.read_text().splitlines()
        assert re.fullmatch(r"\[I \d+\.\d{6}\] OPENED", log[0]), log
        assert re.fullmatch(r"\[R \+\d+\.\d{6}\] clock_step 5000000000", log[1]), log
        assert re.fullmatch(r"\[S \+\d+\.\d{6}\] OK 5000000000", log[2]), log
        assert re.fullmatch(r"\[I \+\d+\.\d{6}\] CLOSED", log[-1]), log
    finally:
        m.stop()


def test_graph_changes_release_throttled_requests_below(tmp_path):
    """A graph change drains the nodes it touches; requests held below them by a throttle
    (waiting on a clock only the test moves, under qtest) go on instead of holding the
    drain for ever (QEMU's iotest 255: a commit started over throttled reads)."""
    base, mid, top = (tmp_path / n for n in ("base", "mid", "top"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "8M"], check=True)
    for img in (mid, top):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    m = Machine(SYSTEM, "qtest", tmp_path, [
        "-object", "throttle-group,x-bps-read=4096,id=throttle0",
        "-blockdev", f"file,filename={base},node-name=base",
        "-blockdev", "throttle,throttle-group=throttle0,file=base,node-name=throttled",
        "-blockdev", f"file,filename={mid},node-name=mid-file",
        "-blockdev", "qcow2,file=mid-file,node-name=mid,backing=throttled",
        "-drive", f"if=none,id=overlay,driver=qcow2,file={top},backing=mid",
    ])
    try:
        for _ in range(2):
            assert m.qmp.cmd("human-monitor-command",
                             {"command-line": 'qemu-io overlay "aio_read 0 4k"'}) \
                == {"return": ""}
        # The second read waits in the throttle; the commit's graph change must not.
        assert m.qmp.cmd("block-commit", {"job-id": "job0", "device": "overlay",
                                          "top-node": "mid"}) == {"return": {}}
        m.qmp.cmd("block-job-cancel", {"device": "job0", "force": True})
    finally:
        m.stop()


QEMU_IO = [
    'qemu-io drive0 "write -P 0x5a 0 512"',
    'qemu-io drive0 "read -P 0x5a 0 512"',
    'qemu-io drive0 "read -P 0x5b 0 512"',
    'qemu-io drive0 "aio_write -P 1 64k 64k"',
    'qemu-io drive0 "aio_flush"',
    'qemu-io drive0 "write -z 0 64k"',
    'qemu-io drive0 "read -P 0 0 64k"',
    'qemu-io drive0 "discard 0 64k"',
    'qemu-io drive0 "flush"',
    'qemu-io drive0 "bogus"',
    'qemu-io drive0 "write 2M 512"',
    'qemu-io nul "read 0 512"',
    'qemu-io -d nosuch "read 0 512"',
    'qemu-io nosuch "read 0 512"',
    'qemu-io -d vblk "write -P 7 1k 1k"',
    'qemu-io -d /machine/peripheral/vblk/virtio-backend "write -P 7 1k 1k"',
    'qemu-io drive0 "read -v 60k 40"',
    'qemu-io drive0 "write -P0x3c 4k 512"',
    'qemu-io drive0 "read -P0x3c 4k 512"',
    'qemu-io drive0 "write -zu 8k 4k"',
    'qemu-io drive0 read 0 512',
    'qemu-io drive0 "write -P 0x5a 0 512" extra',
    # blkdebug breakpoints: a request held at its event, the monitor free meanwhile.
    'qemu-io dbg "break write_aio bp0"',
    'qemu-io dbg "break nosuch bp1"',
    'qemu-io dbg "aio_write -P 9 0 512"',
    'qemu-io dbg "wait_break bp0"',
    'qemu-io dbg "resume bp0"',
    'qemu-io dbg "aio_flush"',
    'qemu-io dbg "resume bp0"',
    'qemu-io dbg "remove_break bp0"',
    'qemu-io drive0 "break write_aio bp2"',
    'qemu-io dbg "read -P 9 0 512"',
]


def qemu_io_transcript(binary, accel, workdir):
    img = workdir / "h.qcow2"
    other = workdir / "o.qcow2"
    debugged = workdir / "d.qcow2"
    for f in (img, other, debugged):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(f), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=drive0,file={img},format=qcow2",
        "-drive", f"if=none,id=dbg,file=blkdebug::{debugged},format=qcow2",
        "-blockdev", "driver=null-co,node-name=nul,size=1048576",
        "-blockdev", f"driver=qcow2,node-name=o,file.driver=file,file.filename={other}",
        "-device", "virtio-blk-pci,id=vblk,drive=o",
    ])
    try:
        answers = [m.qmp.cmd("human-monitor-command", {"command-line": c}) for c in QEMU_IO]
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    printed = re.sub(r"\d+ ops; [0-9:. ]+sec \([^)]*\)", "N ops; T", m.stdout.read_text())
    check = subprocess.run(["qemu-img", "check", str(other)], capture_output=True, text=True)
    dump = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 7 1k 1k", str(other)],
                          capture_output=True, text=True).stdout
    return answers, printed, check.returncode, dump.splitlines()[0]


def test_hmp_qemu_io_prints_what_qemu_prints(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = qemu_io_transcript(QEMU, "tcg", tmp_path / "q")
    # Under qtest blkdebug is silent about held requests (QEMU's too); under tcg it is not.
    got = qemu_io_transcript(SYSTEM, "tcg", tmp_path / "f")
    assert got == expected
    assert "blkdebug: Suspended request 'bp0'" in got[1]
    (tmp_path / "f2").mkdir()
    quiet = qemu_io_transcript(SYSTEM, "qtest", tmp_path / "f2")
    assert quiet[1] == got[1].replace("blkdebug: Suspended request 'bp0'\n", "").replace(
        "blkdebug: Resuming request 'bp0'\n", "")
    assert "Pattern verification failed" in got[1]
    assert got[3] == "read 1024/1024 bytes at offset 1024"


def throttled_aio_transcript(binary, accel, workdir):
    """96 qemu-io aio_writes on a drive limited to 64 writes a second (bursts of 64): the
    first burst goes at once, the rest as the limit lets them, on the host's clock even
    under qtest (a command line's drives are made before the accelerator)."""
    img = workdir / "s.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "2M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"file={img},if=none,format=raw,iops_wr=64,iops_wr_max=64,id=source"],
        paused=False)
    try:
        began = time.monotonic()
        for i in range(96):
            m.qmp.cmd("human-monitor-command",
                      {"command-line": f'qemu-io source "aio_write -P 7 {16384 * i} 16384"'})
        first = m.qmp.cmd("query-blockstats")["return"][0]["stats"]["wr_operations"]
        # What the limit lets through while the commands were sent (on a loaded machine
        # sending them takes a while): the burst, then 64 a second.
        allowed = 64 + 64 * (time.monotonic() - began) + 1
        wait_for(lambda: m.stdout.read_text().count("\nwrote ") + 1 >= 96
                 or "failed" in m.stdout.read_text(), timeout=20, what="the writes")
        printed = m.stdout.read_text()
        other = subprocess.run(["qemu-io", "-f", "raw", "-c", "quit", str(img)],
                               capture_output=True, text=True)
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    dump = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 7 0 1536k", str(img)],
                          capture_output=True, text=True).stdout
    return (first <= allowed, printed.count("wrote 16384/16384"), "failed" in printed,
            other.returncode != 0, dump.splitlines()[0])


def test_hmp_qemu_io_aio_writes_wait_for_a_drives_limits_as_qemus(tmp_path):
    """The write permission qemu-io takes on a drive stays, as QEMU's does: writes still
    queued behind the drive's limits when an earlier one ends do not lose it (iotest
    mirror-change-copy-mode with raw images)."""
    compare_with_qemu(tmp_path, throttled_aio_transcript)


IOTHREAD_STEPS = [
    ("blockdev-add", {"driver": "null-co", "node-name": "hd0", "read-zeroes": True,
                      "read-only": True}),
    ("blockdev-add", {"driver": "raw", "node-name": "over", "file": "hd0",
                      "read-only": True}),
    ("object-add", {"qom-type": "iothread", "id": "io0"}),
    ("object-add", {"qom-type": "iothread", "id": "io1"}),
    ("device_add", {"driver": "virtio-scsi", "id": "scsi0", "iothread": "io0"}),
    ("device_add", {"driver": "virtio-scsi", "id": "scsi1", "iothread": "io1"}),
    ("device_add", {"driver": "scsi-hd", "id": "a", "drive": "hd0", "bus": "scsi0.0"}),
    # The same node, or one above it, cannot go into another iothread meanwhile.
    ("device_add", {"driver": "scsi-hd", "id": "b", "drive": "hd0", "bus": "scsi1.0"}),
    ("device_add", {"driver": "scsi-hd", "id": "b", "drive": "over", "bus": "scsi1.0"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "v", "drive": "hd0"}),
    ("device_add", {"driver": "scsi-hd", "id": "c", "drive": "hd0", "bus": "scsi0.0"}),
    ("device_del", {"id": "a"}),
    ("device_del", {"id": "c"}),
    ("device_add", {"driver": "scsi-hd", "id": "b", "drive": "hd0", "bus": "scsi1.0"}),
    ("query-block", None),
]


def test_iothreads_of_devices_sharing_a_node_follow_qtest(tmp_path):
    """Under -accel qtest, QEMU's virtio devices really run in their iothreads (qtest allows
    ioeventfd; TCG does not, so qemu-system under TCG is no oracle here): a node in use by a
    device in one iothread cannot be taken into another, as iotest 240's golden output says,
    until that device is gone."""
    m = Machine(SYSTEM, "qtest", tmp_path, [])
    got = [r for step in run_steps(m, IOTHREAD_STEPS) if step[0] != "events"
           for r in [step[-1]]]
    clash = {"error": {"class": "GenericError",
                       "desc": "Cannot change iothread of active block backend"}}
    ok = {"return": {}}
    assert got[:14] == [ok] * 7 + [clash, clash, clash, ok, ok, ok, ok]
    assert len(got[14]["return"]) == 1 and got[14]["return"][0]["qdev"] == "b"


def backing_across_iothreads_steps(io_a, io_b):
    """iotest 245's iothread cases: a backing file is attached where the two images' devices
    run; an image without a device follows the other."""
    steps = [
        ("blockdev-add", {"driver": "null-co", "node-name": n, "read-zeroes": True})
        for n in ("hd0", "hd2")
    ] + [
        ("object-add", {"qom-type": "iothread", "id": "io0"}),
        ("object-add", {"qom-type": "iothread", "id": "io1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "top", "file": "hd0"}),
    ]
    for i, (io, node) in enumerate([(io_a, "top"), (io_b, "hd2")]):
        steps.append(("device_add", {"driver": "virtio-scsi", "id": f"scsi{i}",
                                     **({"iothread": io} if io else {})}))
        if io:
            steps.append(("device_add", {"driver": "scsi-hd", "drive": node,
                                         "share-rw": True, "bus": f"scsi{i}.0"}))
    # raw takes no backing file: a qcow2-less stand-in is a filter's file edge instead.
    steps += [
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "top",
                                          "file": "hd2"}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "top",
                                          "file": "hd0"}]}),
    ]
    return steps


@pytest.mark.parametrize("io_a,io_b,ok", [("io0", "io1", False), ("io0", "io0", True),
                                          ("io0", "", True), ("", "io0", True)])
def test_a_child_goes_where_its_parent_runs_as_iotest_245_says(tmp_path, io_a, io_b, ok):
    """Attaching a child puts parent and child in one iothread: the child moves to the
    parent's, else the parent to the child's; devices in two iothreads refuse (iotest 245's
    golden words). Under qtest, as QEMU's devices really run in their iothreads there."""
    m = Machine(SYSTEM, "qtest", tmp_path, [])
    got = [step[-1] for step in run_steps(m, backing_across_iothreads_steps(io_a, io_b))
           if step[0] in ("blockdev-reopen",)]
    clash = {"error": {"class": "GenericError",
                       "desc": "Cannot change iothread of active block backend"}}
    assert got[0] == ({"return": {}} if ok else clash)
    assert got[1] == {"return": {}}


def test_hmp_qemu_io_patterns_land_as_qemu_io_writes_them(tmp_path):
    """`-P0xab` is the byte 0xab and `0x3ff0000` an offset (hex digits include `b`, which is
    no size suffix there), as the installed qemu-io reads the image back."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    m = Machine(SYSTEM, "qtest", tmp_path, [
        "-blockdev", f"driver=qcow2,file.driver=file,file.filename={img},node-name=src"])
    try:
        for cmd in ["write -P0xab 0 64k", "write -P0xd5 0x3ff0000 64k", "write -P 010 1M 4k"]:
            # qemu-io prints on standard output, not to the monitor.
            r = m.qmp.cmd("human-monitor-command", {"command-line": f'qemu-io src "{cmd}"'})
            assert r == {"return": ""}, r
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    for check in ["read -P0xab 0 64k", "read -P0xd5 0x3ff0000 64k", "read -P8 1M 4k"]:
        r = subprocess.run(["qemu-io", "-c", check, str(img)], capture_output=True, text=True)
        assert "Pattern verification failed" not in r.stdout, (check, r.stdout)


QOM_DRIVE_STEPS = [
    ("qom-get", {"path": "/machine/peripheral/sda", "property": "drive"}),
    ("qom-get", {"path": "/machine/peripheral/hd", "property": "drive"}),
    ("qom-set", {"path": "/machine/peripheral/sda", "property": "drive", "value": "nope"}),
    ("qom-set", {"path": "/machine/peripheral/sda", "property": "drive", "value": "n1"}),
    ("qom-get", {"path": "/machine/peripheral/sda", "property": "drive"}),
    ("query-block", None),
    ("qom-set", {"path": "/machine/peripheral/sda", "property": "drive", "value": "n0"}),
    ("qom-get", {"path": "/machine/peripheral/sda", "property": "drive"}),
]


def qom_drive_transcript(binary, accel, workdir):
    disk = workdir / "d0.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-blockdev", "driver=null-co,node-name=n0,read-zeroes=on",
        "-blockdev", "driver=null-co,node-name=n1,read-zeroes=on",
        "-drive", f"if=none,id=d0,file={disk},format=raw",
        "-device", "virtio-scsi", "-device", "scsi-hd,id=sda,drive=n0",
        "-device", "scsi-hd,id=hd,drive=d0"])
    return run_steps(m, QOM_DRIVE_STEPS)


def test_qom_drive_of_devices_matches_qemu_system(tmp_path):
    """A device's `drive` property: read as its drive's name (or its node's), and set to
    another node while the device is in use (fleecing puts a filter in front this way)."""
    compare_with_qemu(tmp_path, qom_drive_transcript)


def info_block(binary, accel, *drive_args):
    """`info block` of a machine made with `drive_args`, as the human monitor prints it."""
    r = subprocess.run([binary, "-accel", accel, "-S", "-nodefaults", "-display", "none",
                        "-monitor", "stdio", *drive_args], input="info block\nquit\n",
                       capture_output=True, text=True, timeout=30)
    prog = os.path.basename(binary)
    out = re.sub(r"\x1b\[[0-9]*[A-Za-z]", "", r.stdout)
    out = re.sub(r"#block\d+", "#blockN", out)
    lines = [ln for ln in out.splitlines() if not ln.startswith("(qemu)")]
    return r.returncode, lines, r.stderr.replace(prog, "PROG")


@pytest.mark.parametrize("drive", [
    # -drive keeps its options as text: `json:` names show "on" where -blockdev shows true.
    "if=none,driver=null-co,read-zeroes=on",
    # QEMU's option lists take what the schema does not: size suffixes, discard=on|off.
    "if=none,driver=null-co,read-zeroes=on,size=1M,discard=on",
    "if=none,driver=null-co,discard=off,size=64k",
    "if=none,driver=null-co,discard=nope",
    # The board's firmware flash.
    "if=pflash,driver=null-co,read-zeroes=on,size=1M",
    # The old names of the I/O limits (iotest mirror-change-copy-mode), and both names.
    "if=none,id=d,driver=null-co,iops_wr=16,iops_wr_max=16,bps=1048576,group=g",
    "if=none,id=d,driver=null-co,iops_wr=16,throttling.iops-write=3",
    # detect-zeroes is the drive's, set on the node after it opens: unmap needs no discard.
    "if=none,id=d,driver=null-co,read-zeroes=on,detect-zeroes=unmap",
    "if=none,id=d,detect-zeroes=unmap",
])
def test_drive_options_read_and_show_as_qemus(drive):
    want = info_block(QEMU, "tcg", "-drive", drive)
    got = info_block(SYSTEM, "qtest", "-drive", drive)
    assert got == want


@pytest.mark.parametrize("name", [
    # A protocol that reads names of its own refuses one that is not its (QEMU's reasons).
    "file=nbd:", "file=nbd:x", "file=nbd://h:x/", "file=nbd:unix:/x:exportname=,format=raw",
    "file=off,format=nbd", "file=ssh://h", "file=ssh:foo,format=qcow2", "file=ssh://h:x/p",
    "file=nbd:unix:/x,format=ssh", "file=off,format=ssh",
    # A prefix that names no protocol.
    "file=a:b", "file=a:b,format=raw",
])
def test_drive_file_names_are_read_as_qemus_protocols_read_them(name):
    want = info_block(QEMU, "tcg", "-drive", f"if=none,{name}")
    got = info_block(SYSTEM, "qtest", "-drive", f"if=none,{name}")
    assert want[0] != 0, want
    assert got == want


def test_command_line_throttle_groups_keep_the_host_clock_under_qtest():
    """QEMU makes `-object` throttle groups before the accelerator, so under qtest they leak
    in real time (iotest stream-error-on-reset relies on it; the installed qemu-system has no
    qtest accelerator to compare with): three 64 KiB reads at 64 KiB/s take about two
    seconds instead of waiting for a `clock_step` that never comes."""
    script = 'qemu-io th "read 0 64k"\n' * 3 + "quit\n"
    started = time.monotonic()
    r = subprocess.run([SYSTEM, "-accel", "qtest", "-nodefaults", "-display", "none",
                        "-monitor", "stdio",
                        "-object", "throttle-group,id=t,x-bps-total=65536",
                        "-blockdev", "null-co,node-name=n,size=1048576,read-zeroes=on",
                        "-blockdev", "throttle,node-name=th,throttle-group=t,file=n"],
                       input=script, capture_output=True, text=True, timeout=30)
    took = time.monotonic() - started
    assert r.stdout.count("read 65536/65536 bytes at offset 0") == 3, r.stdout + r.stderr
    assert 1.5 < took < 10, took


def names_and_aes_transcript(binary, accel, workdir):
    """A node name a -drive's id already has (iotest 087), and an AES-encrypted qcow2 image,
    which QEMU's system emulators refuse (its tools still open them)."""
    aes = workdir / "aes.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "--object", "secret,id=s,data=123456", "-f",
                    "qcow2", "-o", "encryption=on,encrypt.key-secret=s", str(aes), "1M"],
                   check=True)
    raw = workdir / "d.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"driver=raw,id=disk,node-name=test-node,file={raw}"])
    return run_steps(m, [
        ("blockdev-add", {"driver": "qcow2", "node-name": "disk",
                          "file": {"driver": "null-co"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "test-node",
                          "file": {"driver": "null-co"}}),
        ("object-add", {"qom-type": "secret", "id": "sec0", "data": "123456"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a",
                          "file": {"driver": "file", "filename": str(aes)},
                          "encrypt": {"format": "aes", "key-secret": "sec0"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "a",
                          "file": {"driver": "file", "filename": str(aes)}}),
    ])


def test_node_names_and_aes_images_are_refused_as_qemu_system_refuses_them(tmp_path):
    compare_with_qemu(tmp_path, names_and_aes_transcript)


def test_drive_children_given_by_file_name_open_as_qemus(tmp_path):
    """`-drive` names the images of a quorum under a raw node by file name alone
    (`file.children.N.file.filename`): their protocol is a file, as QEMU infers it
    (iotest 312)."""
    imgs = [tmp_path / f"q.{i}" for i in range(3)]
    for img in imgs:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    drive = "if=none,id=q,driver=raw,file.driver=quorum,file.vote-threshold=2," + ",".join(
        f"file.children.{i}.file.filename={img},file.children.{i}.driver=qcow2"
        for i, img in enumerate(imgs))
    # The quorum's `json:` name lists its children differently (left as it is).
    def without_json(r):
        return r[0], [re.sub(r"json:\{.*\}", "JSON", ln) for ln in r[1]], r[2]
    want = without_json(info_block(QEMU, "tcg", "-drive", drive))
    got = without_json(info_block(SYSTEM, "qtest", "-drive", drive))
    assert want[0] == 0, want
    assert got == want


def test_quit_on_a_stdio_monitor_exits_at_once(tmp_path):
    """After `quit` over a stdio monitor the program ends at once and its images are free:
    iotest 312 runs `qemu-img map` on the mirror's target right after the answer. (ferrite
    waited 200 ms for the client to hang up, which a stdio client never does.)"""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    p = subprocess.Popen([SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
                          "-qmp", "stdio", "-drive", f"if=virtio,file={img},format=qcow2"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        p.stdin.write('{"execute": "qmp_capabilities"}\n')
        p.stdin.flush()
        p.stdout.readline()
        p.stdin.write('{"execute": "quit"}\n')
        p.stdin.flush()
        while '"return"' not in p.stdout.readline():
            pass
        answered = time.monotonic()
        p.wait(timeout=10)
        assert time.monotonic() - answered < 0.15
    finally:
        p.kill()
        p.wait()


BLKDEBUG_ERRORS = """
[inject-error]
event = "read_aio"
errno = "5"
sector = "64"

[inject-error]
event = "write_aio"
errno = "5"
sector = "64"
"""

STATS_IO = ["aio_read 0 512", "aio_write 0 4096", "aio_read -i 0 512", "aio_write -i 0 512",
            "aio_read 32768 512", "aio_write 32768 512", "aio_flush",
            # qemu-io's synchronous commands and zero writes are left out of the accounting,
            # failed or invalid ones too; a compressed write to raw is refused.
            "read 0 512", "write 0 4096", "write -z 0 4096", "aio_write -z 0 512",
            "discard 0 512", "flush", "readv 0 512 512", "writev -P 3 0 512 1024",
            "read 32768 512", "read 1099511627776 512", "write -c 0 65536", "read 0",
            "aio_discard 0 512"]


def stats_machine(binary, accel, workdir, extra_opts="", qtest_sock=None):
    conf = workdir / "blkdebug.conf"
    conf.write_text(BLKDEBUG_ERRORS)
    qtest = ["-chardev", f"socket,id=qt,path={qtest_sock},server=on,wait=off",
             "-qtest", "chardev:qt"] if qtest_sock else []
    return Machine(binary, accel, workdir, qtest + [
        "-drive", f"if=none,id=drive0,file=blkdebug:{conf}:null-co://,format=raw,"
                  "file.image.read-zeroes=on,stats-intervals.0=10,stats-intervals.1=60"
                  + extra_opts])


def drive_stats(m):
    return next(s["stats"] for s in m.qmp.cmd("query-blockstats")["return"]
                if s["device"] == "drive0")


def stats_transcript(binary, accel, workdir):
    """What query-blockstats shows after reads, writes, invalid and failed requests and a
    flush through a drive with two stats intervals; times by whether they are 0."""
    out = []
    for opts in (",stats-account-invalid=on,stats-account-failed=off",
                 ",stats-account-invalid=off,stats-account-failed=on"):
        d = workdir / str(len(out))
        d.mkdir()
        m = stats_machine(binary, accel, d, opts)
        try:
            out.append(("idle", "idle_time_ns" in drive_stats(m)))
            for op in STATS_IO:
                m.qmp.cmd("human-monitor-command",
                          {"command-line": f'qemu-io drive0 "{op}"'})
            stats = drive_stats(m)
            out.append(sorted((k, v if not re.search(r"time_ns|latency|depth", k) else v > 0)
                              for k, v in stats.items() if k != "timed_stats"))
            out.append([sorted((k, v if k == "interval_length" else v > 0)
                               for k, v in t.items()) for t in stats["timed_stats"]])
        finally:
            m.stop()
        out.append(("printed", sorted(set(
            re.sub(r"\d+ ops; .*", "", m.stdout.read_text()).splitlines()))))
    for bad in ("0", "x", "4294967296"):
        r = subprocess.run([binary, "-nodefaults", "-display", "none", "-accel", accel, "-S",
                            "-drive", f"if=none,id=d,driver=null-co,stats-intervals.0={bad}"],
                           capture_output=True, text=True, timeout=20)
        out.append((bad, r.returncode, re.sub(r"^[^:]*: -drive [^:]*: ", "", r.stderr)))
    return out


def test_blockstats_match_qemu_system(tmp_path):
    """query-blockstats of a drive as qemu-system's: counts and bytes of reads, writes and
    flushes, invalid ones (qemu-io's -i) and failed ones (blkdebug), what
    stats-account-invalid and -failed leave out of the times, wr_highest_offset (failed
    writes count there too), the intervals of stats-intervals and their refusals."""
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = stats_transcript(QEMU, "tcg", tmp_path / "q")
    got = stats_transcript(SYSTEM, "tcg", tmp_path / "f")
    assert got == expected


def test_blockstats_under_qtest_count_a_millisecond_per_request(tmp_path):
    """Under qtest the figures are exact, as QEMU's are there (iotest 136): every request
    takes 1 ms and the times run on the virtual clock."""
    qtest_sock = str(tmp_path / "qtest.sock")
    m = stats_machine(SYSTEM, "qtest", tmp_path, qtest_sock=qtest_sock)
    try:
        qtest = qtest_channel(qtest_sock)[0]
        assert qtest("clock_step 1000000000") == "OK 1000000000"
        for op in STATS_IO:
            m.qmp.cmd("human-monitor-command", {"command-line": f'qemu-io drive0 "{op}"'})
        assert qtest("clock_step 2000000000") == "OK 3000000000"
        s = drive_stats(m)
        # One read and one write done, one of each failed (accounted by default), a flush.
        assert (s["rd_total_time_ns"], s["wr_total_time_ns"], s["flush_total_time_ns"]) == \
            (2_000_000, 2_000_000, 1_000_000)
        assert s["idle_time_ns"] == 2_000_000_000
        # The node's highest write, accounted or not (the refused compressed write of 64k).
        assert s["wr_highest_offset"] == 65536
        ten, sixty = s["timed_stats"]
        assert (ten["interval_length"], sixty["interval_length"]) == (10, 60)
        for k in ("rd", "wr", "flush"):
            assert ten[f"min_{k}_latency_ns"] == ten[f"max_{k}_latency_ns"] == \
                ten[f"avg_{k}_latency_ns"] == 1_000_000
        assert ten["avg_rd_queue_depth"] > 0
        # Past both windows of the 10 s interval, it is empty; the 60 s one is not.
        assert qtest("clock_step 20000000000") == "OK 23000000000"
        ten, sixty = drive_stats(m)["timed_stats"]
        assert ten["max_rd_latency_ns"] == 0 and ten["avg_rd_queue_depth"] == 0
        assert sixty["max_rd_latency_ns"] == 1_000_000
    finally:
        m.stop()


def nbd_fd_transcript(binary, accel, workdir):
    """An NBD client on a socket the monitor was handed (`getfd`, server type `fd`): it opens
    and reads, its file name is a `json:` one, and the name is used up."""
    import socket
    img = workdir / "src.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", str(img)],
                   check=True, capture_output=True)
    sock = workdir / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "-x", "img",
                               str(img)], stderr=subprocess.DEVNULL)
    m = Machine(binary, accel, workdir, [])
    out = []
    try:
        wait_for(lambda: sock.exists(), what="qemu-nbd socket")
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(sock))
        socket.send_fds(m.qmp.s, [b" "], [conn.fileno()])
        conn.close()
        steps = [("getfd", {"fdname": "nbd-conn"})]
        for name in ("byfd", "again"):
            steps.append(("blockdev-add", {"driver": "nbd", "node-name": name,
                                           "export": "img",
                                           "server": {"type": "fd", "str": "nbd-conn"}}))
        steps.append(("blockdev-add", {"driver": "nbd", "node-name": "bynumber",
                                       "server": {"type": "fd", "str": "7"}}))
        for name, args in steps:
            out.append((name, m.qmp.cmd(name, args)))
        nodes = m.qmp.cmd("query-named-block-nodes")["return"]
        out.append([(n["node-name"], n["image"]["filename"]) for n in nodes])
        out.append(m.qmp.cmd("human-monitor-command",
                             {"command-line": 'qemu-io byfd "read -P 0x5a 0 64k"'}))
        out.append(m.qmp.cmd("blockdev-del", {"node-name": "byfd"}))
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
        server.kill()
        server.wait()
    printed = re.sub(r"\d+ ops; .*", "", m.stdout.read_text())
    return out, printed


def test_nbd_client_on_a_passed_socket_matches_qemu_system(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = nbd_fd_transcript(QEMU, "tcg", tmp_path / "q")
    got = nbd_fd_transcript(SYSTEM, "tcg", tmp_path / "f")
    assert got == expected
    assert "read 65536/65536 bytes at offset 0" in got[1]


def quit_with_job_transcript(binary, accel, workdir, end="quit"):
    """`quit` (or SIGTERM, `end="signal"`) with a running backup that drive-backup started
    on a drive: the events from the command to the end, as qemu-system sends them (the
    machine's own drain at shutdown, then the daemon's, each pausing and resuming the job,
    then the cancel), and what it said on standard error, the program's name and the
    sender's pid hidden."""
    img = workdir / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 8M", str(img)],
                   check=True, capture_output=True)
    m = Machine(binary, accel, workdir, ["-drive", f"file={img},if=none,id=disk"])
    try:
        r = m.qmp.cmd("drive-backup", {"device": "disk", "target": str(workdir / "copy.qcow2"),
                                       "format": "qcow2", "sync": "full", "speed": 65536})
        out = [r]
        time.sleep(0.5)
        if end == "quit":
            m.qmp.cmd("quit")
        else:
            m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(20) == 0
        # Everything the monitor sent after the command: QMP events until the socket
        # closes.
        while True:
            try:
                msg = m.qmp.recv_msgs(1)[0]
            except Exception:
                break
            m.qmp.events.append(msg)
        for e in m.qmp.events:
            data = e.get("data", {})
            out.append((e["event"], data.get("status"), data.get("reason"), data.get("len")))
    finally:
        m.stop()
    said = re.sub(r"^\S+: ", "PROG: ", m.stderr.read_text(), flags=re.M)
    out.append(re.sub(r"from pid \d+", "from pid N", said))
    return out


@pytest.mark.parametrize("end", ["quit", "signal"])
def test_quit_with_a_running_job_matches_qemu_system(tmp_path, end):
    """A signal ends the machine as `quit` does, but says so on standard error and gives
    the SHUTDOWN event its own reason."""
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = quit_with_job_transcript(QEMU, "tcg", tmp_path / "q", end)
    got = quit_with_job_transcript(SYSTEM, "tcg", tmp_path / "f", end)
    assert got == expected
    assert [e[1] for e in got[1:-1]].count("paused") == 3
    reason = {"quit": "host-qmp-quit", "signal": "host-signal"}[end]
    assert ("SHUTDOWN", None, reason, None) in got
    assert ("terminating on signal 15 from pid N" in got[-1]) == (end == "signal")


def test_a_device_refused_between_iothreads_speaks_after_the_prompt(tmp_path):
    """QEMU runs its main loop while it moves nodes between iothreads, so a human monitor on
    stdio shows its prompt before such a -device refusal (iotest 051); other refusals come
    straight after the banner."""
    img = tmp_path / "p.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    args = ["-nodefaults", "-display", "none", "-S", "-monitor", "stdio",
            "-drive", f"file={img},if=none,node-name=disk", "-object", "iothread,id=t0",
            "-device", "virtio-scsi,iothread=t0,id=s0",
            "-device", "scsi-hd,bus=s0.0,drive=disk,share-rw=on",
            "-device", "lsi53c895a,id=lsi0",
            "-device", "scsi-hd,bus=lsi0.0,drive=disk,share-rw=on"]

    def merged(binary):
        r = subprocess.run([binary, *args], input="quit\n", stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=30)
        return r.returncode, r.stdout.replace(os.path.basename(binary), "PROG")
    q = merged(QEMU)
    assert "(qemu) PROG: -device scsi-hd,bus=lsi0.0" in q[1]
    assert merged(SYSTEM) == q


@pytest.fixture(scope="module")
def verify_images(tmp_path_factory):
    """A qcow2 image, a raw copy of what it reads (zeroes) and an empty blkdebug config."""
    d = tmp_path_factory.mktemp("verify")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "t.qcow2"), "128K"],
                   check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "t.raw"), "128K"],
                   check=True)
    (d / "rules.conf").write_text("")
    return d


@pytest.mark.parametrize("drive", [
    "file=blkverify:D/t.raw:D/t.qcow2",
    "file.driver=blkverify,file.raw.filename=D/t.raw,file.test.file.filename=D/t.qcow2",
    "file.driver=blkdebug,file.image.filename=D/t.qcow2,file.inject-error.0.event=l1_update",
    "file.driver=blkverify,file.raw.filename=D/t.raw,file.test.file.driver=blkdebug,"
    "file.test.file.image.filename=D/t.qcow2,file.test.file.inject-error.0.event=l1_update",
    "file.driver=blkdebug,file.config=D/rules.conf,file.image.filename=D/t.qcow2",
    "file.driver=blkdebug,file.image.filename=D/t.qcow2",
    "file.driver=blkdebug,file.image.filename=D/nosuch.qcow2",
    "format=qcow2,file.driver=blkdebug,file.image.filename=D/t.qcow2",
    # Named as the format, they read the name itself: blkdebug as its image's, vvfat only
    # a `fat:` one.
    "format=blkdebug,file=D/t.qcow2",
    "format=vvfat,file=D/nosuch",
    # So does a driver given for the name's node.
    "file=D/t.qcow2,file.driver=blkdebug",
    "file=blkdebug::D/t.qcow2,file.driver=blkdebug",
])
def test_drives_over_blkdebug_and_blkverify_probe_and_name_as_qemus(verify_images, drive):
    """A drive whose format is not given is probed through the protocol node its `file.*`
    options describe (blkdebug, blkverify, whose image under test is probed too), and such
    nodes show QEMU's names: `blkdebug:CONFIG:IMAGE`, `blkverify:RAW:TEST`, else `json:`."""
    args = ["-drive", "if=none,id=drv0," + drive.replace("D/", f"{verify_images}/")]
    expected = info_block(QEMU, "tcg", *args)
    got = info_block(SYSTEM, "tcg", *args)
    if "nosuch" in drive:
        assert got == expected
        return
    assert expected[0] == 0
    assert got == expected


@pytest.mark.parametrize("drive", [
    # A -drive has no schema before the driver: a child missing is the driver's complaint.
    "format=blkverify,file=D/t.qcow2",
    "driver=blkverify",
    "driver=blkverify,raw.driver=file,raw.filename=D/t.raw",
    "driver=blkverify,test.driver=file,test.filename=D/t.qcow2",
    "driver=blkdebug",
    "format=blkdebug,file.driver=file,file.filename=D/t.qcow2",
    "driver=quorum",
    "driver=quorum,vote-threshold=1",
    "file=D/t.qcow2,file.driver=blkverify",
    "file=D/t.qcow2,file.driver=quorum",
    # A driver given for the name's node that reads names itself.
    "file=D/t.qcow2,file.driver=vvfat",
    "file=D/t.qcow2,file.driver=null-co",
    "file=D/t.qcow2,file.driver=nbd",
    "file=nbd://localhost:1/x,file.driver=file",
])
def test_drives_missing_a_child_or_misnamed_are_refused_as_qemu_refuses(verify_images, drive):
    """QEMU's own texts where a -drive's driver misses a child it opens by its own name or
    cannot read the name it is given (`A block device must be specified for "raw"`)."""
    args = ["-drive", "if=none,id=drv0," + drive.replace("D/", f"{verify_images}/")]
    expected = info_block(QEMU, "tcg", *args)
    assert expected[0] != 0
    assert info_block(SYSTEM, "tcg", *args) == expected


def reopen_drive_transcript(binary, accel, workdir):
    imgs = [workdir / f"d{i}.qcow2" for i in range(3)]
    for img in imgs:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=drive0,file={imgs[0]},format=qcow2,cache=writeback,aio=threads,"
                  "node-name=node0,readonly=on",
        "-drive", f"if=none,id=drive1,file={imgs[1]},format=qcow2,aio=native,cache.direct=on,"
                  "node-name=node1,readonly=on",
        # Two drives reading one image: neither may become writable.
        "-drive", f"if=none,id=drive2,file={imgs[2]},format=qcow2,node-name=node2,readonly=on",
        "-drive", f"if=none,id=drive3,file={imgs[2]},format=qcow2,node-name=node3,readonly=on",
    ])
    reopen = lambda node, img, **extra: {"options": [dict({  # noqa: E731
        "node-name": node, "driver": "qcow2",
        "file": {"driver": "file", "filename": str(img)}}, **extra)]}
    steps = [
        ("blockdev-reopen", reopen("node0", imgs[0], **{"read-only": False})),
        ("blockdev-reopen", reopen("node1", imgs[1], **{"read-only": True})),
        ("blockdev-reopen", reopen("node2", imgs[2], **{"read-only": False})),
        ("query-named-block-nodes", {"flat": True}),
    ]
    return run_steps(m, steps)


def test_a_drives_aio_is_not_an_option_a_reopen_must_repeat(tmp_path):
    """`-drive aio=` is an open flag in QEMU: reopening the drive's nodes without it is
    no reset (iotest 165 reopens a drive read-write so). A reopen refused for a lock
    changes nothing, the file below included."""
    compare_with_qemu(tmp_path, reopen_drive_transcript)


def probed_raw_transcript(binary, accel, workdir):
    """A `-drive` whose raw format was probed: QEMU's warning, and its first sector kept
    from turning into another format's header (whole or in part), through an NBD export."""
    img = workdir / "c.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    header = workdir / "hdr"
    header.write_bytes(b"QFI\xfb\0\0\0\3" + bytes(504))
    magic = workdir / "magic"
    magic.write_bytes(b"QFI\xfb\0\0\0\3")
    # The magic with version 0 is no qcow2 header to QEMU's probe: it may be written.
    not_qcow2 = workdir / "v0"
    not_qcow2.write_bytes(b"QFI\xfb" + bytes(508))
    m = Machine(binary, accel, workdir, ["-drive", f"if=none,id=d0,file={img}"])
    out = []
    try:
        node = m.qmp.cmd("query-block")["return"][0]["inserted"]["node-name"]
        sock = str(workdir / "nbd.sock")
        m.qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        out.append(m.qmp.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": node,
                                                  "name": "e", "writable": True}))
        for op in ("write -P 0x11 0 512", f"write -s {header} 0 512", f"write -s {magic} 0 8",
                   f"write -s {magic} 1 8", f"write -s {header} 512 512", "read -P 0x11 0 512",
                   f"write -s {not_qcow2} 0 512"):
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", op,
                                f"nbd+unix:///e?socket={sock}"], capture_output=True, text=True)
            out.append((op.replace(str(workdir), "W"), r.stdout.splitlines()[:1]))
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    out.append(m.stderr.read_text().replace(str(workdir), "W"))
    return out


def test_a_probed_raw_drive_warns_and_guards_its_first_sector_as_qemus(tmp_path):
    compare_with_qemu(tmp_path, probed_raw_transcript)


ROOT_PORT_STEPS = [
    ("query-block", None),
    ("device_add", {"driver": "pcie-root-port", "id": "root1", "bus": "pcie.0", "chassis": 2}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "vb", "drive": "spare", "bus": "root1"}),
    ("device_add", {"driver": "pcie-root-port", "id": "r2", "nope": 1}),
    ("query-block", None),
]


def root_port_transcript(binary, accel, workdir):
    """Q35 with PCI Express root ports (iotest nbd-tls-iothread's machine): devices behind
    them, from the command line and hot-plugged."""
    img = workdir / "disk.qcow2"
    spare = workdir / "spare.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(spare), "1M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-machine", "q35", "-object", "iothread,id=iothread0",
        "-device", '{"driver":"pcie-root-port", "id":"root0", "multifunction":true, '
                   '"bus":"pcie.0"}',
        "-device", '{"driver":"virtio-scsi-pci", "id":"vscsi", "bus":"root0", '
                   '"iothread":"iothread0"}',
        "-device", '{"driver":"scsi-hd", "id":"image1", "drive":"disk", "bus":"vscsi.0"}',
        "-blockdev", f'{{"driver":"qcow2", "node-name":"disk", "file":{{"driver":"file", '
                     f'"filename":"{img}"}}}}',
        "-drive", f"if=none,id=spare,file={spare},format=raw",
    ])
    return run_steps(m, ROOT_PORT_STEPS)


def test_pcie_root_ports_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, root_port_transcript)
