#!/usr/bin/env python3
"""fio's nbd engine over an NBD export of a qcow2 node (iodepth 16), against
ferrite-storage-daemon and qemu-storage-daemon in the same run: 4k random writes into an
empty image (the allocation path), 4k random reads and writes and 1M sequential reads on a
fully allocated image, and the same reads on a two-layer backing chain. Prints IOPS and the
ratio ferrite/qsd (higher is better); last, ferrite's 64k random writes to the allocated
qcow2 image against the same to a raw file (what qcow2's mapping costs a write)."""
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "6")
SIZE_MB = int(os.environ.get("QCOW2_SIZE_MB", "1024"))

# (row, image kind, fio arguments)
ROWS = [
    ("empty: rand write 4k", "empty", ["--rw=randwrite", "--bs=4k"]),
    ("full: rand read 4k", "full", ["--rw=randread", "--bs=4k"]),
    ("full: rand write 4k", "full", ["--rw=randwrite", "--bs=4k"]),
    ("full: seq read 1M", "full", ["--rw=read", "--bs=1M"]),
    ("full: rand write 64k", "full", ["--rw=randwrite", "--bs=64k"]),
    ("chain: rand read 4k", "chain", ["--rw=randread", "--bs=4k"]),
    ("chain: seq read 1M", "chain", ["--rw=read", "--bs=1M"]),
]


def make_image(d, kind):
    img = os.path.join(d, "top.qcow2")
    size = f"{SIZE_MB}M"
    if kind == "chain":
        base = os.path.join(d, "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, size], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0x11 0 {SIZE_MB // 2}M", base],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        img, size], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0x22 {SIZE_MB // 2}M {SIZE_MB // 2}M", img],
                       check=True, capture_output=True)
    else:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, size], check=True)
        if kind == "full":
            subprocess.run(["qemu-io", "-c", f"write -P 0x33 0 {size}", img], check=True,
                           capture_output=True)
    return img


def export_fio(binary, d, img, fmt, extra):
    """fio against an NBD export (`q`) of `img` opened as `fmt` over a file node."""
    return common.export_fio(binary, d, img, fmt, f"{SIZE_MB}M", RUNTIME, extra)[0]


def measure(binary, kind, extra):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        return export_fio(binary, d, make_image(d, kind), "qcow2", extra)


def raw_64k(binary):
    """64k random writes through an export of a raw file node of the same size."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = os.path.join(d, "disk.raw")
        # Written as the qcow2 image is (one qemu-io request), so the page cache holds both
        # files the same way: 4k-64k writes into large folios cost ext4 more.
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, f"{SIZE_MB}M"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x33 0 {SIZE_MB}M", img],
                       check=True, capture_output=True)
        return export_fio(binary, d, img, "raw", ["--rw=randwrite", "--bs=64k"])


def main():
    common.require_built(FERRITE)
    print(f"qcow2 over NBD (fio iodepth 16, {RUNTIME}s per row, {SIZE_MB} MiB image)")
    print(f"{'row':<24}{'qsd IOPS':>12}{'ferrite IOPS':>14}{'ratio':>8}")
    results = {}
    for row, kind, extra in ROWS:
        theirs = measure(QSD, kind, extra)
        ours = measure(FERRITE, kind, extra)
        results[row] = ours
        print(f"{row:<24}{theirs:>12.0f}{ours:>14.0f}{ours / theirs:>8.2f}")
    raw = raw_64k(FERRITE)
    q = results["full: rand write 64k"]
    print(f"ferrite 64k rand write: qcow2 {q:.0f} IOPS, raw {raw:.0f} IOPS, qcow2/raw {q / raw:.2f}")


if __name__ == "__main__":
    main()
