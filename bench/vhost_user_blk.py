#!/usr/bin/env python3
"""vhost-user-blk exports of a raw file node (1 GiB, in the page cache), driven by the
suite's front end (`tools/vhost-user-blk-client`: guest memory in a memfd, split queues,
iodepth 16, waiting on the call eventfds), against ferrite-storage-daemon and
qemu-storage-daemon in the same run: 4k random reads and writes and 1 MiB sequential reads,
with one and two queues; 4k random writes again with the file's page cache dropped first
(small folios: a 4k write into the large folios dd leaves costs ext4 several times more).
Prints IOPS and the ratio ferrite/qsd (higher is better), and as the ceiling of the write rows
fio writing the same file from one thread in the same two page-cache states, and as the
ceiling of the 1 MiB rows fio reading the cached file with one and two threads."""
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
CLIENT = os.path.join(ROOT, "target/release/vhost-user-blk-client")
QSD = "qemu-storage-daemon"
SECONDS = os.environ.get("VU_SECONDS", "4")

# (row, rw, block size, queues, page cache dropped first)
ROWS = [
    ("rand read 4k, 1 queue", "randread", 4096, 1, False),
    ("rand write 4k, 1 queue", "randwrite", 4096, 1, False),
    ("seq read 1M, 1 queue", "read", 1 << 20, 1, False),
    ("rand read 4k, 2 queues", "randread", 4096, 2, False),
    ("rand write 4k, 2 queues", "randwrite", 4096, 2, False),
    ("seq read 1M, 2 queues", "read", 1 << 20, 2, False),
    ("rand write 4k, 1 q, cold", "randwrite", 4096, 1, True),
    ("rand write 4k, 2 q, cold", "randwrite", 4096, 2, True),
]


def image(d):
    img = os.path.join(d, "disk.raw")
    subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=1024", "status=none"],
                   check=True)
    return img


def measure(binary, d):
    img = image(d)
    sock = os.path.join(d, "vu.sock")
    args = [binary, "--blockdev", f"file,node-name=f,filename={img}",
            "--export", f"vhost-user-blk,id=v,node-name=f,writable=on,num-queues=2,"
                        f"addr.type=unix,addr.path={sock}"]
    out = []
    with common.running(args, sock):
        for _, rw, bs, queues, cold in ROWS:
            if cold:
                common.drop_cache(img)
            os.sync()
            r = subprocess.run([CLIENT, sock, "bench", rw, str(bs), "16", SECONDS, str(queues)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"{binary}: {rw} {bs} {queues}: {r.stderr.strip()}")
            out.append(float(r.stdout.split()[1]))
    return out


def main():
    common.require_built(FERRITE)
    common.require_built(CLIENT)
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        q = measure(QSD, d1)
        f = measure(FERRITE, d2)
    with tempfile.TemporaryDirectory() as d:
        img = image(d)
        copy = [common.cached_read(img, "1G", SECONDS, threads) for threads in (1, 2)]
        direct = [common.direct_write(img, "1G", SECONDS, cold) for cold in (False, True)]
    print("vhost-user-blk export of a raw file (IOPS, iodepth 16)")
    print(f"{'row':26} {'ferrite':>10} {'qsd':>10} {'ratio':>7}")
    for (row, *_), fv, qv in zip(ROWS, f, q):
        print(f"{row:26} {fv:10.0f} {qv:10.0f} {fv / qv:7.2f}")
    print(f"fio writing the file itself, one thread (4k random): {direct[0]:.0f} IOPS, "
          f"cold {direct[1]:.0f} IOPS")
    print(f"fio reading the cached file itself (1M sequential): {copy[0]:.0f} IOPS one thread, "
          f"{copy[1]:.0f} two (the memory-copy ceiling of the 1M rows)")


if __name__ == "__main__":
    main()
