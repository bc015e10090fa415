#!/usr/bin/env python3
"""FUSE exports: 1 GiB written and read sequentially through the mounted file (fio, 1 MiB
blocks, psync), and 4k random reads at iodepth 16 (libaio), of a raw file node, against
ferrite-storage-daemon and qemu-storage-daemon in the same run, each twice in turn (qsd,
ferrite, qsd, ferrite) and the better of its two runs kept, since whichever daemon writes
second meets the first one's write-back. Prints MiB/s or IOPS and the ratio ferrite/qsd
(higher is better)."""
import json
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
SIZE = os.environ.get("FUSE_SIZE", "1G")

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
    for binary in (QSD, FERRITE, QSD, FERRITE):
        with tempfile.TemporaryDirectory() as d:
            runs[binary].append(measure(binary, d))
    q, f = ([max(r) for r in zip(*runs[b])] for b in (QSD, FERRITE))
    print(f"FUSE export of a raw file ({SIZE})")
    print(f"{'row':28} {'ferrite':>10} {'qsd':>10} {'ratio':>7}")
    for (row, _, _), fv, qv in zip(ROWS, f, q):
        print(f"{row:28} {fv:10.0f} {qv:10.0f} {fv / qv:7.2f}")


if __name__ == "__main__":
    main()
