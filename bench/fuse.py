#!/usr/bin/env python3
"""FUSE exports: 1 GiB written and read sequentially through the mounted file (fio, 1 MiB
blocks, psync), and 4k random reads at iodepth 16 (libaio), of a raw file node, against
ferrite-storage-daemon and qemu-storage-daemon in the same run, in turns (qsd, ferrite, qsd,
ferrite...; FUSE_ROUNDS turns each, 3 by default) after one unmeasured turn that warms the
machine up (its first 1 GiB write after a pause has been measured at half the speed of the
next). Prints, per row, each program's median and range (MiB/s or IOPS) and the ratio of the
medians, ferrite/qsd (higher is better): on this machine one program's runs of the same
row differ by up to 1.5x, so a single pair decides nothing."""
import json
import os
import statistics
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
SIZE = os.environ.get("FUSE_SIZE", "1G")
ROUNDS = int(os.environ.get("FUSE_ROUNDS", "3"))

# (row, fio arguments, figure)
ROWS = [
    ("seq write 1M (MiB/s)", ["--rw=write", "--bs=1M", "--ioengine=psync", "--end_fsync=1"],
     "bw"),
    ("seq read 1M (MiB/s)", ["--rw=read", "--bs=1M", "--ioengine=psync"], "bw"),
    ("rand read 4k qd16 (IOPS)", ["--rw=randread", "--bs=4k", "--ioengine=libaio",
                                  "--iodepth=16", "--runtime=5", "--time_based"], "iops"),
]


def run_fio(mnt, args):
    os.sync()
    out = subprocess.run(["fio", "--name=b", f"--filename={mnt}", f"--size={SIZE}",
                          "--output-format=json", *args],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] > 0 else job["write"]
    return {"bw": side["bw"] / 1024.0, "iops": side["iops"]}


def measure(binary, d):
    img = os.path.join(d, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, SIZE], check=True)
    mnt = os.path.join(d, "mnt")
    open(mnt, "w").close()
    qmp = os.path.join(d, "qmp.sock")
    args = [binary, "--blockdev", f"file,node-name=f,filename={img},aio=threads",
            "--export", f"fuse,id=e,node-name=f,mountpoint={mnt},writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]
    with common.running(args, qmp):
        return [run_fio(mnt, a)[fig] for _, a, fig in ROWS]


def main():
    common.require_built(FERRITE)
    runs = {QSD: [], FERRITE: []}
    with tempfile.TemporaryDirectory() as d:
        measure(QSD, d)
    for binary in (QSD, FERRITE) * ROUNDS:
        with tempfile.TemporaryDirectory() as d:
            runs[binary].append(measure(binary, d))
    print(f"FUSE export of a raw file ({SIZE}), median of {ROUNDS} runs each [range]")
    print(f"{'row':28} {'ferrite':>22} {'qsd':>22} {'ratio':>7}")
    for i, (row, _, _) in enumerate(ROWS):
        f, q = (sorted(r[i] for r in runs[b]) for b in (FERRITE, QSD))
        fm, qm = statistics.median(f), statistics.median(q)
        print(f"{row:28} {fm:8.0f} [{f[0]:5.0f}-{f[-1]:5.0f}] {qm:8.0f} [{q[0]:5.0f}-{q[-1]:5.0f}]"
              f" {fm / qm:7.2f}")


if __name__ == "__main__":
    main()
