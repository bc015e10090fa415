#!/usr/bin/env python3
"""Full backup of a fully allocated qcow2 image to a new qcow2 target, against
ferrite-storage-daemon and qemu-storage-daemon in the same run: seconds from blockdev-backup
to BLOCK_JOB_COMPLETED and peak memory; then the same while fio writes 4k randomly through
an NBD export of the source as fast as it can (backup time, and the guest's write latency and
IOPS), also to a target with 1 MiB clusters (copy-before-write copies whole target clusters),
and at a fixed rate both programs can serve (backup time under the same guest load);
then an incremental backup after 5% of the clusters changed.
Each figure is the median of BACKUP_ROUNDS (3) rounds in which the two programs alternate:
one run of each varies by up to 2x here with the state of the page cache and write-back.
Ratios are qsd/ferrite for times and latency (higher: ferrite faster), ferrite/qsd for IOPS."""
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
SIZE_MB = int(os.environ.get("BACKUP_SIZE_MB", "4096"))
ROUNDS = int(os.environ.get("BACKUP_ROUNDS", "3"))


def daemon(binary, d, targets, cluster="64k"):
    """A daemon with the source exported over NBD and a new qcow2 node per name in
    `targets` (clusters of `cluster`, the copy granularity): (its arguments, QMP socket, NBD
    socket)."""
    qmp_sock, nbd_sock = os.path.join(d, "qmp.sock"), os.path.join(d, "nbd.sock")
    for p in (qmp_sock, nbd_sock):
        if os.path.exists(p):
            os.unlink(p)
    args = [binary, "--chardev", f"socket,id=m,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m",
            "--blockdev", f"driver=file,node-name=sf,filename={os.path.join(d, 'src.qcow2')}",
            "--blockdev", "driver=qcow2,node-name=src,file=sf"]
    for name in targets:
        path = os.path.join(d, f"{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cluster}", path, f"{SIZE_MB}M"], check=True)
        args += ["--blockdev", f"driver=file,node-name={name}-f,filename={path}",
                 "--blockdev", f"driver=qcow2,node-name={name},file={name}-f"]
    args += ["--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
             "--export", "nbd,id=e0,node-name=src,writable=on"]
    return args, qmp_sock, nbd_sock


# The guest's rate in the equal-load row: below what either program serves during a backup
# (qemu-storage-daemon reached 200-240 of 500 asked, here).
FIXED_IOPS = 200


def backup(binary, d, with_writer, rate_iops=None, cluster="64k"):
    args, qmp_sock, nbd_sock = daemon(binary, d, ["tgt"], cluster)
    with common.running(args, qmp_sock) as p:
        q = common.Qmp(qmp_sock)
        # Start each run without the previous one's dirty pages to write back.
        os.sync()
        writer = None
        if with_writer:
            writer = subprocess.Popen(
                ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///src?socket={nbd_sock}",
                 "--iodepth=16", "--rw=randwrite", "--bs=4k", f"--size={SIZE_MB}M",
                 "--time_based", "--runtime=600", "--output-format=json"]
                + ([f"--rate_iops={rate_iops}"] if rate_iops else []),
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
        start = time.monotonic()
        q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                  "sync": "full"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        seconds = time.monotonic() - start
        if "error" in ev["data"]:
            raise RuntimeError(ev["data"]["error"])
        lat_us = iops = None
        if writer:
            writer.send_signal(signal.SIGINT)
            out = writer.communicate()[0]
            job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
            lat_us = job["clat_ns"]["mean"] / 1000.0
            iops = job["iops"]
        return seconds, common.peak_kib(p.pid), lat_us, iops


def incremental(binary, d):
    """Full backup with a new bitmap (one transaction), 5% of the clusters rewritten through
    NBD, then the incremental backup: its seconds."""
    args, qmp_sock, nbd_sock = daemon(binary, d, ["full", "inc"])
    with common.running(args, qmp_sock):
        q = common.Qmp(qmp_sock)
        q.cmd("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "f", "device": "src",
                                                 "target": "full", "sync": "full"}}]})
        q.wait_event("BLOCK_JOB_COMPLETED")
        clusters = SIZE_MB * 16
        subprocess.run(["fio", "--name=w", "--ioengine=nbd",
                        f"--uri=nbd+unix:///src?socket={nbd_sock}", "--rw=randwrite",
                        "--bs=64k", f"--size={SIZE_MB}M", f"--number_ios={clusters // 20}",
                        "--norandommap=0", "--iodepth=16"], check=True, capture_output=True)
        os.sync()
        start = time.monotonic()
        q.cmd("blockdev-backup", {"job-id": "i", "device": "src", "target": "inc",
                                  "sync": "incremental", "bitmap": "b0"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        if "error" in ev["data"]:
            raise RuntimeError(ev["data"]["error"])
        return time.monotonic() - start


def median(values):
    return statistics.median(values)


def rounds(run):
    """`run(binary)` for qemu-storage-daemon then ferrite, ROUNDS times alternating (so
    neither always meets the page cache and write-back the other left): per program, the
    median of each figure `run` returns (a tuple)."""
    got = {QSD: [], FERRITE: []}
    for _ in range(ROUNDS):
        for binary in (QSD, FERRITE):
            got[binary].append(run(binary))
    return tuple(tuple(median(col) for col in zip(*got[b])) for b in (QSD, FERRITE))


def row(name, theirs, ours, higher_is_better=False):
    ratio = ours / theirs if higher_is_better else theirs / ours
    print(f"{name:<34}{theirs:>12.2f}{ours:>12.2f}{ratio:>8.2f}")


def main():
    common.require_built(FERRITE)
    print(f"full backup of a {SIZE_MB} MiB allocated qcow2 to a new qcow2; median of {ROUNDS} "
          "rounds, the programs alternating")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        src = os.path.join(d, "src.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", src, f"{SIZE_MB}M"], check=True)
        # qemu-io writes at most 2 GiB per request.
        fill = []
        for at in range(0, SIZE_MB, 1024):
            fill += ["-c", f"write -P 0x5a {at}M {min(1024, SIZE_MB - at)}M"]
        subprocess.run(["qemu-io", *fill, src], check=True, capture_output=True)
        print(f"{'row':<34}{'qsd':>12}{'ferrite':>12}{'ratio':>8}")
        q, f = rounds(lambda b: backup(b, d, False)[:2])
        row("seconds, idle", q[0], f[0])
        row("peak MiB, idle", q[1] / 1024, f[1] / 1024)
        for cluster in ("64k", "1M"):
            q, f = rounds(lambda b: backup(b, d, True, cluster=cluster))
            tag = f"writer, {cluster} clusters"
            row(f"seconds, {tag}", q[0], f[0])
            row(f"peak MiB, {tag}", q[1] / 1024, f[1] / 1024)
            row(f"guest write latency us, {cluster}", q[2], f[2])
            row(f"guest write IOPS, {cluster}", q[3], f[3], higher_is_better=True)
        # The same guest load on both: the backup's own speed under it.
        q, f = rounds(lambda b: backup(b, d, True, FIXED_IOPS))
        tag = f"writer at {FIXED_IOPS} IOPS"
        row(f"seconds, {tag}", q[0], f[0])
        row(f"write latency us, {tag}", q[2], f[2])
        q, f = rounds(lambda b: (incremental(b, d),))
        row("seconds, incremental 5%", q[0], f[0])


if __name__ == "__main__":
    main()
