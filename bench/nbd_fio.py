#!/usr/bin/env python3
"""fio's nbd engine over a unix-socket NBD export of a raw file node, iodepth 16, against
ferrite-storage-daemon and qemu-storage-daemon in the same run (default options and
aio=io_uring), with nbdkit's file plugin as a non-QEMU anchor (it has no aio choice: the same
figure stands beside both). Prints IOPS / bandwidth and the ratio ferrite/qsd (higher is
better), resident memory with one export and one client, and what fio reaches writing the
file itself from one thread (no NBD), the ceiling a server's random writes are held to; and
what fio's nbd engine reaches against ferrite's export of a `null-co` node, which does no I/O:
the ceiling of the client and the NBD path on this machine (fio takes one of its cores)."""
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
    # The file's cache dropped first: writes then fill small folios, as on an image that has
    # lived in the page cache for a while, rather than the large ones dd's writes leave.
    ("rand write 4k, cold", ["--rw=randwrite", "--bs=4k"]),
]


def daemon_args(binary, d, img, aio, sock):
    qmp = os.path.join(d, "qmp.sock")
    return [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}" + (",aio=io_uring" if aio else ""),
            "--blockdev", "raw,node-name=d0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=d0,writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


def nbdkit_args(d, img, sock):
    return ["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "file", f"file={img}"]


def fio(sock, extra):
    return common.fio(f"nbd+unix:///d0?socket={sock}", SIZE, RUNTIME, extra)


def image(d):
    """A fully written image, so reads hit data rather than holes."""
    img = os.path.join(d, "disk.raw")
    subprocess.run(["dd", "if=/dev/urandom", f"of={img}", "bs=1M", "count=1024",
                    "status=none"], check=True)
    return img


def null_ceiling():
    """4k random writes to ferrite's export of a null-co node: IOPS."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        sock = os.path.join(d, "nbd.sock")
        args = [FERRITE, "--blockdev", "null-co,node-name=d0,size=1073741824",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "nbd,id=e0,node-name=d0,writable=on"]
        with common.running(args, sock):
            return fio(sock, ["--rw=randwrite", "--bs=4k"])[0]


def measure(binary, aio):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = image(d)
        sock = os.path.join(d, "nbd.sock")
        args = nbdkit_args(d, img, sock) if binary == "nbdkit" else \
            daemon_args(binary, d, img, aio, sock)
        with common.running(args, sock) as p:
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
                if name.endswith("cold"):
                    common.drop_cache(img)
                results[name] = fio(sock, extra)
            stop.set()
            t.join()
            results["rss"] = peak[0]
            return results


def main():
    common.require_built(FERRITE)
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file node")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    k = measure("nbdkit", False)
    for aio in (False, True):
        label = "aio=io_uring" if aio else "default"
        q = measure(QSD, aio)
        f = measure(FERRITE, aio)
        common.print_rows(JOBS, f, q, k, label + " ")
        print(f"{label + ' peak RSS (KiB)':26}{f['rss']:14d}{q['rss']:14d}"
              f"{f['rss'] / q['rss']:8.2f}{k['rss']:14d}")
    for cold in (False, True):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
            direct = common.direct_write(image(d), SIZE, RUNTIME, cold)
        name = "rand write 4k" + (", cold" if cold else "")
        print(f"{'fio psync 1 thread' + (', cold' if cold else ''):26}{direct:10.0f}iops"
              f"   (ferrite's io_uring {name}: {f[name][0] / direct:.2f} of it)")
    ceiling = null_ceiling()
    print(f"{'null-co export (no I/O)':26}{ceiling:10.0f}iops   (fio's nbd engine's ceiling; "
          f"ferrite's io_uring cold row: {f['rand write 4k, cold'][0] / ceiling:.2f} of it)")


if __name__ == "__main__":
    main()
