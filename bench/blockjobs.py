#!/usr/bin/env python3
"""Mirror, active commit and stream against ferrite-storage-daemon and qemu-storage-daemon in
the same run:
- mirror of a fully allocated qcow2 (4 GiB) to a new qcow2: seconds to ready, seconds to
  completed (job-complete at ready), peak memory; then the same while fio writes 4k randomly
  through an NBD export of the source at a fixed rate (seconds to converge, write latency);
- active commit of a fully allocated 1 GiB overlay into its base: seconds to completed;
- stream of a 2 GiB backing chain (data in the base, an empty top): seconds to completed.
Ratios are qsd/ferrite (higher: ferrite faster or leaner)."""
import json
import os
import signal
import subprocess
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
MIRROR_MB = int(os.environ.get("MIRROR_SIZE_MB", "4096"))
COMMIT_MB = int(os.environ.get("COMMIT_SIZE_MB", "1024"))
STREAM_MB = int(os.environ.get("STREAM_SIZE_MB", "2048"))
# The guest's rate while the mirror converges: below what either program serves.
WRITER_IOPS = 500


def qcow2(path, size_mb, backing=None):
    extra = ["-b", os.path.basename(backing), "-F", "qcow2"] if backing else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, path, f"{size_mb}M"],
                   check=True)


def fill(path, size_mb, pattern):
    """Writes every byte (qemu-io writes at most 2 GiB per request)."""
    ops = []
    for at in range(0, size_mb, 1024):
        ops += ["-c", f"write -P {pattern} {at}M {min(1024, size_mb - at)}M"]
    subprocess.run(["qemu-io", *ops, path], check=True, capture_output=True)


def node_args(name, path, backing=None):
    opts = f"driver=qcow2,node-name={name},file={name}-f"
    if backing:
        opts += f",backing={backing}"
    return ["--blockdev", f"driver=file,node-name={name}-f,filename={path}", "--blockdev", opts]


def start_args(binary, d, nodes):
    qmp_sock, nbd_sock = os.path.join(d, "qmp.sock"), os.path.join(d, "nbd.sock")
    for p in (qmp_sock, nbd_sock):
        if os.path.exists(p):
            os.unlink(p)
    args = [binary, "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m"]
    for n in nodes:
        args += node_args(*n)
    args += ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    return args, qmp_sock, nbd_sock


def mirror(binary, d, src, with_writer):
    """(seconds to ready, seconds to completed, peak KiB, mean write latency in us)."""
    tgt = os.path.join(d, "tgt.qcow2")
    if os.path.exists(tgt):
        os.unlink(tgt)
    qcow2(tgt, MIRROR_MB)
    args, qmp_sock, nbd_sock = start_args(binary, d, [("src", src), ("tgt", tgt)])
    with common.running(args, qmp_sock) as p:
        q = common.Qmp(qmp_sock)
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "src",
                                   "writable": True})
        os.sync()
        writer = None
        if with_writer:
            writer = subprocess.Popen(
                ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///src?socket={nbd_sock}",
                 "--iodepth=16", "--rw=randwrite", "--bs=4k", f"--size={MIRROR_MB}M",
                 "--time_based", "--runtime=600", f"--rate_iops={WRITER_IOPS}",
                 "--output-format=json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
        start = time.monotonic()
        q.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                  "sync": "full"})
        q.wait_event("BLOCK_JOB_READY")
        ready = time.monotonic() - start
        lat_us = None
        if writer:
            writer.send_signal(signal.SIGINT)
            out = writer.communicate()[0]
            lat_us = json.loads(out[out.index("{"):])["jobs"][0]["write"]["clat_ns"]["mean"] / 1000
        q.cmd("block-job-complete", {"device": "m"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        done = time.monotonic() - start
        if "error" in ev["data"]:
            raise RuntimeError(ev["data"]["error"])
        return ready, done, common.peak_kib(p.pid), lat_us


def timed_job(binary, d, nodes, command, args, complete):
    """Seconds from the command to BLOCK_JOB_COMPLETED (completing at ready if asked)."""
    run_args, qmp_sock, _ = start_args(binary, d, nodes)
    with common.running(run_args, qmp_sock):
        q = common.Qmp(qmp_sock)
        os.sync()
        start = time.monotonic()
        q.cmd(command, args)
        if complete:
            q.wait_event("BLOCK_JOB_READY")
            q.cmd("block-job-complete", {"device": args["job-id"]})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        if "error" in ev["data"]:
            raise RuntimeError(ev["data"]["error"])
        return time.monotonic() - start


def commit_chain(d):
    base, top = os.path.join(d, "cbase.qcow2"), os.path.join(d, "ctop.qcow2")
    for f in (base, top):
        if os.path.exists(f):
            os.unlink(f)
    qcow2(base, COMMIT_MB)
    qcow2(top, COMMIT_MB, backing=base)
    fill(top, COMMIT_MB, "0x6b")
    return [("base", base), ("top", top, "base")]


def stream_chain(d):
    base, top = os.path.join(d, "sbase.qcow2"), os.path.join(d, "stop.qcow2")
    for f in (base, top):
        if os.path.exists(f):
            os.unlink(f)
    qcow2(base, STREAM_MB)
    fill(base, STREAM_MB, "0x73")
    qcow2(top, STREAM_MB, backing=base)
    return [("base", base), ("top", top, "base")]


def row(label, theirs, ours, scale=1.0, fmt="{:>12.2f}"):
    print(f"{label:<34}" + fmt.format(theirs * scale) + fmt.format(ours * scale)
          + f"{theirs / ours:>8.2f}")


def main():
    common.require_built(FERRITE)
    print(f"block jobs: mirror of a {MIRROR_MB} MiB allocated qcow2, active commit of a "
          f"{COMMIT_MB} MiB overlay, stream of a {STREAM_MB} MiB chain (one run)")
    print(f"{'row':<34}{'qsd':>12}{'ferrite':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        src = os.path.join(d, "src.qcow2")
        qcow2(src, MIRROR_MB)
        fill(src, MIRROR_MB, "0x5a")
        theirs, ours = mirror(QSD, d, src, False), mirror(FERRITE, d, src, False)
        row("mirror: seconds to ready", theirs[0], ours[0])
        row("mirror: seconds to completed", theirs[1], ours[1])
        row("mirror: peak MiB", theirs[2], ours[2], 1 / 1024, "{:>12.1f}")
        theirs, ours = mirror(QSD, d, src, True), mirror(FERRITE, d, src, True)
        row(f"mirror, writer {WRITER_IOPS} IOPS: s to ready", theirs[0], ours[0])
        row(f"mirror, writer {WRITER_IOPS} IOPS: lat us", theirs[3], ours[3], 1, "{:>12.0f}")
        os.unlink(src)
        times = []
        for b in (QSD, FERRITE):
            nodes = commit_chain(d)
            times.append(timed_job(b, d, nodes, "block-commit",
                                   {"job-id": "c", "device": "top"}, True))
        row("active commit: seconds", *times)
        times = []
        for b in (QSD, FERRITE):
            nodes = stream_chain(d)
            times.append(timed_job(b, d, nodes, "block-stream",
                                   {"job-id": "s", "device": "top"}, False))
        row("stream: seconds", *times)


if __name__ == "__main__":
    main()
