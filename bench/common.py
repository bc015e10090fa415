"""Helpers shared by the benchmarks: start a daemon and read its memory use."""
import contextlib
import json
import os
import socket
import subprocess
import sys
import time


@contextlib.contextmanager
def running(args, wait_for):
    """Runs a daemon with `args` once the socket `wait_for` exists; stops it afterwards. A
    socket an earlier run left there (nbdkit leaves its own) is removed first, so that it
    is not taken for the new daemon's."""
    if os.path.exists(wait_for):
        os.unlink(wait_for)
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if os.path.exists(wait_for):
                break
            time.sleep(0.01)
        yield p
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            print(f"  ({os.path.basename(args[0])} did not exit 30 s after SIGTERM: killed)")
            p.kill()
            p.wait()


def require_built(binary):
    """Exits with advice when the release binary is missing."""
    if not os.path.exists(binary):
        sys.exit(f"{binary} not built: run cargo build --release")


def status_kib(pid, field):
    """A memory figure of process `pid` from /proc (`VmRSS`, `VmHWM`...), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    """Resident memory of process `pid`, in KiB."""
    return status_kib(pid, "VmRSS")


def peak_kib(pid):
    """Peak resident memory of process `pid`, in KiB."""
    return status_kib(pid, "VmHWM")


def fio(uri, size, runtime, extra, timeout=None):
    """fio's nbd engine at iodepth 16 against `uri`: (IOPS, MiB/s) of the side that moved data.
    Dirty pages are written back first, so an earlier run's write-back does not slow this one.
    With `timeout` (seconds), a run that has not ended by then raises TimeoutExpired."""
    return fio_run(["--ioengine=nbd", f"--uri={uri}", "--iodepth=16", f"--size={size}",
                    f"--runtime={runtime}", *extra], timeout)


def export_fio(binary, d, img, fmt, size, runtime, extra, nodes=None):
    """fio against an NBD export (`q`, on a unix socket in `d`) of `img` opened as `fmt`
    over a file node (`f0`) by `binary`, or as the `--blockdev` options `nodes` say:
    (IOPS, MiB/s)."""
    sock = os.path.join(d, "nbd.sock")
    nodes = nodes or [f"driver={fmt},node-name=q,file=f0"]
    args = [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}",
            *[a for n in nodes for a in ("--blockdev", n)],
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=q,writable=on"]
    with running(args, sock):
        return fio(f"nbd+unix:///q?socket={sock}", size, runtime, extra)


def node_export_args(binary, d, node, sock):
    """`binary` (ferrite or qsd) with the `--blockdev` options `node` (node `s0`) exported
    writable over NBD as `d0` on the unix socket `sock`, and a QMP monitor in `d`."""
    qmp = os.path.join(d, "qmp.sock")
    return [binary, "--blockdev", f"node-name=s0,{node}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=s0,name=d0,writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


# The four fio jobs the benches of remote nodes (nbd, ssh, iscsi, nfs) run: 1M sequential
# and 4k random, reads and writes.
REMOTE_JOBS = [
    ("seq read 1M", ["--rw=read", "--bs=1M"]),
    ("seq write 1M", ["--rw=write", "--bs=1M"]),
    ("rand read 4k", ["--rw=randread", "--bs=4k"]),
    ("rand write 4k", ["--rw=randwrite", "--bs=4k"]),
]


def fio_jobs(args, sock, size, runtime, jobs):
    """Starts the server `args` (ready when `sock` exists) and runs each fio job of `jobs`
    ((name, fio options) pairs) against its NBD export `d0`: {name: (IOPS, MiB/s)}."""
    with running(args, sock):
        return {name: fio(f"nbd+unix:///d0?socket={sock}", size, runtime, extra,
                          timeout=int(runtime) + 60)
                for name, extra in jobs}


def print_rows(jobs, f, q, k, label=""):
    """One line per fio job: ferrite's figure, qsd's, the ratio and the anchor's (`k`);
    MiB/s for the 1M jobs, IOPS for the others. Each of `f`, `q`, `k` maps a job's name to
    (IOPS, MiB/s); a qsd figure of None is a run qsd never finished."""
    for name, _ in jobs:
        row = f"{label}{name}"
        if q[name] is None:
            fi, fb = f[name]
            print(f"{row:26}{fb if '1M' in name else fi:14.0f}   qsd hung: no figure")
            continue
        (fi, fb), (qi, qb), (ki, kb) = f[name], q[name], k[name]
        if "1M" in name:
            print(f"{row:26}{fb:11.0f}MiB/s{qb:9.0f}MiB/s{fb / qb:8.2f}{kb:9.0f}MiB/s")
        else:
            print(f"{row:26}{fi:10.0f}iops{qi:10.0f}iops{fi / qi:8.2f}{ki:10.0f}iops")


def fio_run(args, timeout=None):
    """fio with `args` after a sync, time based: (IOPS, MiB/s) of the side that moved data."""
    os.sync()
    cmd = ["fio", "--name=b", "--time_based", "--output-format=json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=timeout).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return side["iops"], side["bw"] / 1024.0


def drop_cache(img):
    """Writes `img`'s dirty pages back and drops it from the page cache."""
    os.sync()
    fd = os.open(img, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def direct_write(img, size, runtime, cold=False):
    """4k random writes by fio's psync engine from one thread, straight to the file, with the
    file's page cache as the servers found it (fio would drop it first, and a 4k write into
    the large folios that dd leaves costs ext4 several times one into a small folio): the
    ceiling of a server that writes the file from one thread. IOPS."""
    if cold:
        drop_cache(img)
    return fio_run(["--ioengine=psync", "--invalidate=0", f"--filename={img}", f"--size={size}",
                    f"--runtime={runtime}", "--rw=randwrite", "--bs=4k"])[0]


def cached_read(img, size, runtime, threads):
    """1 MiB sequential reads of `img` (already in the page cache) by fio's psync engine from
    `threads` threads, no server between: what copying cached data into a process's memory
    reaches on this machine, the ceiling of a server's large reads. IOPS."""
    return fio_run(["--ioengine=psync", "--invalidate=0", f"--filename={img}", f"--size={size}",
                    f"--runtime={runtime}", "--rw=read", "--bs=1M", f"--numjobs={threads}",
                    "--group_reporting"])[0]


class Qmp:
    """A QMP connection that keeps the events that arrive while it waits for replies."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self.f.readline()
        self.events = []
        self.cmd("qmp_capabilities")

    def cmd(self, name, args=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "event" in m:
                self.events.append(m)
                continue
            if "error" in m:
                raise RuntimeError(f"{name}: {m['error']}")
            return m["return"]

    def wait_event(self, name):
        for i, m in enumerate(self.events):
            if m["event"] == name:
                del self.events[:i + 1]
                return m
        while True:
            m = json.loads(self.f.readline())
            if m.get("event") == name:
                self.events.clear()
                return m
