#!/usr/bin/env python3
"""fio's nbd engine (iodepth 16) over an NBD export of a `vvfat` node: a host directory
holding one 400 MiB file (in the page cache) seen as a FAT16 disk, against
ferrite-storage-daemon and qemu-storage-daemon in the same run, with nbdkit's floppy plugin
(a FAT32 disk made of a directory, read-only) as the non-QEMU anchor of the read rows.
Reads cover the file's data; the `rw` rows write into it (each server gets a fresh copy of
the directory), every write reaching the host file. Prints IOPS (4k) or MiB/s (1M) and
ferrite/qsd (higher is better)."""
import os
import shutil
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "4")
FILE_MB = 400
# Past the disks' metadata (the FAT16 disk's file starts at 300 KiB, the floppy plugin's
# within its first MiB), within the file.
OFFSET = 4 << 20
SIZE = f"{FILE_MB - 8}M"

ROWS = [
    ("seq read 1M", False, ["--rw=read", "--bs=1M"]),
    ("rand read 4k", False, ["--rw=randread", "--bs=4k"]),
    ("rand write 4k (rw)", True, ["--rw=randwrite", "--bs=4k"]),
    ("seq write 1M (rw)", True, ["--rw=write", "--bs=1M"]),
]


def make_dir(d, name):
    path = os.path.join(d, name)
    os.mkdir(path)
    with open(os.path.join(path, "big.bin"), "wb") as f:
        chunk = bytes(range(256)) * 4096
        for _ in range(FILE_MB):
            f.write(chunk)
    subprocess.run(["cat", os.path.join(path, "big.bin")], stdout=subprocess.DEVNULL, check=True)
    return path


def measure(binary, d, directory, rw, extra):
    sock = os.path.join(d, "nbd.sock")
    if binary == "nbdkit":
        args = ["nbdkit", "-f", "-U", sock, "floppy", directory]
    else:
        node = f"driver=vvfat,node-name=q,dir={directory}," + ("rw=on" if rw else "read-only=on")
        args = [binary, "--blockdev", node,
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", f"nbd,id=e0,node-name=q,writable={'on' if rw else 'off'}"]
    uri = f"nbd+unix:///{'' if binary == 'nbdkit' else 'q'}?socket={sock}"
    with common.running(args, sock):
        iops, mib = common.fio(uri, SIZE, RUNTIME, [f"--offset={OFFSET}", *extra])
    os.unlink(sock) if os.path.exists(sock) else None
    return iops, mib


def main():
    common.require_built(FERRITE)
    print(f"vvfat over NBD (fio iodepth 16, {RUNTIME}s per row, a {FILE_MB} MiB file; "
          "nbdkit floppy as the anchor of the reads)")
    print(f"{'row':<24}{'qsd':>12}{'ferrite':>12}{'ratio':>8}{'nbdkit':>12}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        shared = make_dir(d, "shared")
        for row, rw, extra in ROWS:
            figures = {}
            for binary in (QSD, FERRITE) + (() if rw else ("nbdkit",)):
                directory = shared
                if rw:
                    directory = make_dir(d, "rw")
                figures[binary] = measure(binary, d, directory, rw, extra)
                if rw:
                    shutil.rmtree(directory)
            pick = 1 if "1M" in row else 0
            unit = "MiB/s" if pick else "iops"
            q, f = figures[QSD][pick], figures[FERRITE][pick]
            k = f"{figures['nbdkit'][pick]:>7.0f}{unit}" if "nbdkit" in figures else ""
            print(f"{row:<24}{q:>7.0f}{unit}{f:>7.0f}{unit}{f / q:>8.2f}{k}")


if __name__ == "__main__":
    main()
