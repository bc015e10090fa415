#!/usr/bin/env python3
"""A file on an NFS export, served again over NBD: fio's nbd engine (iodepth 16) against a
writable NBD export of an `nfs` node whose file is a 1 GiB raw image exported by
nfs-ganesha's user-space NFSv3 server (on this machine, over loopback). ferrite and
qemu-storage-daemon (its libnfs driver) in the same run. nbdkit's nfs plugin is not
packaged in Debian, so the anchor is the exported file itself through nbdkit's file
plugin: the ceiling without the NFS hop. The `ra 1M` rows read sequentially one request at
a time from a node with QEMU's `readahead-size=1048576` (libnfs's readahead in qsd). Prints
IOPS / bandwidth and the ratio ferrite/qsd (higher is better)."""
import os
import sys
import tempfile
from pathlib import Path

import common
from nbd_fio import FERRITE, QSD, RUNTIME, SIZE, image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/python"))
from nfsserver import Server, missing  # noqa: E402

JOBS = common.REMOTE_JOBS
# One reader at a time, with QEMU's `readahead-size` at its largest (1 MiB): libnfs's
# readahead and page cache in qsd, ferrite's in ferrite.
READAHEAD = ",readahead-size=1048576"
JOBS_READAHEAD = [
    ("seq read 4k qd1", ["--rw=read", "--bs=4k", "--iodepth=1"]),
    ("seq read 64k qd1", ["--rw=read", "--bs=64k", "--iodepth=1"]),
]


def measure(binary, d, img, jobs=JOBS, node_options=""):
    sock = os.path.join(d, f"{os.path.basename(binary)}.sock")
    if binary == "nbdkit":
        args = ["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "file", img]
    else:
        node = f"driver=nfs,server.type=inet,server.host=127.0.0.1,path={img}{node_options}"
        args = common.node_export_args(binary, d, node, sock)
    return common.fio_jobs(args, sock, SIZE, RUNTIME, jobs)


def main():
    common.require_built(FERRITE)
    why = missing()
    if why:
        print(f"nfs: skipped, {why}")
        return
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file exported by "
          "nfs-ganesha (NFSv3 over loopback), through an nfs node; anchor: the file through "
          "nbdkit")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        server = Server(Path(d) / "nfs")
        try:
            img = image(str(server.export))
            k = measure("nbdkit", d, img)
            q = measure(QSD, d, img)
            f = measure(FERRITE, d, img)
            ra = [measure(b, d, img, JOBS_READAHEAD, READAHEAD) for b in (FERRITE, QSD)]
            ka = measure("nbdkit", d, img, JOBS_READAHEAD)
        finally:
            server.stop()
    common.print_rows(JOBS, f, q, k)
    common.print_rows(JOBS_READAHEAD, *ra, ka, label="ra 1M: ")


if __name__ == "__main__":
    main()
