#!/usr/bin/env python3
"""fio's nbd engine over a unix-socket NBD export of a raw file node, iodepth 16, against
ferrite-storage-daemon and qemu-storage-daemon in the same run (default options and
aio=io_uring). Prints IOPS / bandwidth and the ratio ferrite/qsd (higher is better), and
resident memory with one export and one client."""
import os
import subprocess
import tempfile
import threading
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "8")
SIZE = "1G"

JOBS = [
    ("seq read 1M", ["--rw=read", "--bs=1M"]),
    ("rand read 4k", ["--rw=randread", "--bs=4k"]),
    ("rand write 4k", ["--rw=randwrite", "--bs=4k"]),
]


def daemon_args(binary, d, img, aio, sock):
    qmp = os.path.join(d, "qmp.sock")
    return [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}" + (",aio=io_uring" if aio else ""),
            "--blockdev", "raw,node-name=d0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=d0,writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


def fio(sock, extra):
    return common.fio(f"nbd+unix:///d0?socket={sock}", SIZE, RUNTIME, extra)


def measure(binary, aio):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = os.path.join(d, "disk.raw")
        # A fully written image, so reads hit data rather than holes.
        subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=1024",
                        "status=none"], check=True)
        sock = os.path.join(d, "nbd.sock")
        with common.running(daemon_args(binary, d, img, aio, sock), sock) as p:
            results = {}
            peak = [0]
            stop = threading.Event()

            def watch():
                while not stop.is_set():
                    peak[0] = max(peak[0], common.rss_kib(p.pid))
                    time.sleep(0.1)
            t = threading.Thread(target=watch)
            t.start()
            for name, extra in JOBS:
                results[name] = fio(sock, extra)
            stop.set()
            t.join()
            results["rss"] = peak[0]
            return results


def main():
    common.require_built(FERRITE)
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file node")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}")
    for aio in (False, True):
        label = "aio=io_uring" if aio else "default"
        q = measure(QSD, aio)
        f = measure(FERRITE, aio)
        for name, _ in JOBS:
            fi, fb = f[name]
            qi, qb = q[name]
            if "1M" in name:
                print(f"{label + ' ' + name:26}{fb:11.0f}MiB/s{qb:9.0f}MiB/s{fb / qb:8.2f}")
            else:
                print(f"{label + ' ' + name:26}{fi:10.0f}iops{qi:10.0f}iops{fi / qi:8.2f}")
        print(f"{label + ' peak RSS (KiB)':26}{f['rss']:14d}{q['rss']:14d}{f['rss'] / q['rss']:8.2f}")


if __name__ == "__main__":
    main()
