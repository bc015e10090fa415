#!/usr/bin/env python3
"""fio's nbd engine over an NBD export of the simple image formats (VMDK, QED, VDI, VHD,
Parallels, VHDX; iodepth 16; and the blklogwrites filter over a raw image), against ferrite-storage-daemon and qemu-storage-daemon in
the same run: 4k random reads and writes on a fully allocated image, 64k random writes into
an empty one (placing grains/blocks/clusters), and for VMDK 1M sequential reads of a
stream-optimized (compressed) image; compressed qcow2 images (what cloud images are) read
sequentially and randomly. FORMAT_ROWS=prefix runs only the rows starting with it.
Prints IOPS and the ratio ferrite/qsd (higher is better)."""
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "4")
SIZE_MB = int(os.environ.get("FORMAT_SIZE_MB", "256"))

# (row, format, qemu-img options, image state, fio arguments)
ROWS = [
    ("vmdk full: rand read 4k", "vmdk", [], "full", ["--rw=randread", "--bs=4k"]),
    ("vmdk full: rand write 4k", "vmdk", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("vmdk empty: rand write 64k", "vmdk", [], "empty", ["--rw=randwrite", "--bs=64k"]),
    ("vmdk stream: seq read 1M", "vmdk", ["-o", "subformat=streamOptimized"], "full",
     ["--rw=read", "--bs=1M"]),
    ("qcow2 compressed: seq read 1M", "qcow2", ["-c"], "full", ["--rw=read", "--bs=1M"]),
    ("qcow2 compressed: rand read 4k", "qcow2", ["-c"], "full", ["--rw=randread", "--bs=4k"]),
    ("qed full: rand read 4k", "qed", [], "full", ["--rw=randread", "--bs=4k"]),
    ("qed full: rand write 4k", "qed", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("qed empty: rand write 64k", "qed", [], "empty", ["--rw=randwrite", "--bs=64k"]),
    ("vdi full: rand write 4k", "vdi", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("vdi empty: rand write 64k", "vdi", [], "empty", ["--rw=randwrite", "--bs=64k"]),
    ("vpc full: rand write 4k", "vpc", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("vpc empty: rand write 64k", "vpc", [], "empty", ["--rw=randwrite", "--bs=64k"]),
    ("parallels full: rand read 4k", "parallels", [], "full", ["--rw=randread", "--bs=4k"]),
    ("parallels full: rand write 4k", "parallels", [], "full",
     ["--rw=randwrite", "--bs=4k"]),
    ("parallels empty: rand write 64k", "parallels", [], "empty",
     ["--rw=randwrite", "--bs=64k"]),
    ("vhdx full: rand read 4k", "vhdx", [], "full", ["--rw=randread", "--bs=4k"]),
    ("vhdx full: rand write 4k", "vhdx", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("vhdx empty: rand write 64k", "vhdx", ["-o", "block_size=1M"], "empty",
     ["--rw=randwrite", "--bs=64k"]),
    # The blklogwrites filter over a raw image, its log a file beside it.
    ("blklogwrites: rand write 4k", "blklogwrites", [], "full", ["--rw=randwrite", "--bs=4k"]),
    ("blklogwrites: seq write 1M", "blklogwrites", [], "full", ["--rw=write", "--bs=1M"]),
]

# Filters, whose image is raw: the nodes over `f0` (the image's file node).
FILTER_NODES = {
    "blklogwrites": lambda d: [f"driver=file,node-name=l0,filename={os.path.join(d, 'log')}",
                               "driver=blklogwrites,node-name=q,file=f0,log=l0"],
}


def make_image(d, fmt, opts, state):
    fmt = "raw" if fmt in FILTER_NODES else fmt
    img = os.path.join(d, f"disk.{fmt}")
    if state == "empty":
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *opts, img, f"{SIZE_MB}M"],
                       check=True)
        return img
    # Full: converted from a raw file of mixed bytes (compressible, as disks are).
    raw = os.path.join(d, "src.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, f"{SIZE_MB}M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {SIZE_MB}M", raw],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, raw, img], check=True)
    os.unlink(raw)
    return img


def measure(binary, fmt, opts, state, extra):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = make_image(d, fmt, opts, state)
        nodes = FILTER_NODES[fmt](d) if fmt in FILTER_NODES else None
        if nodes:
            open(os.path.join(d, "log"), "wb").close()
        return common.export_fio(binary, d, img, fmt, f"{SIZE_MB}M", RUNTIME, extra,
                                 nodes)[0]


def main():
    common.require_built(FERRITE)
    print(f"image formats over NBD (fio iodepth 16, {RUNTIME}s per row, {SIZE_MB} MiB image)")
    print(f"{'row':<32}{'qsd IOPS':>12}{'ferrite IOPS':>14}{'ratio':>8}")
    only = os.environ.get("FORMAT_ROWS")
    for row, fmt, opts, state, extra in ROWS:
        if only and not row.startswith(only):
            continue
        theirs = measure(QSD, fmt, opts, state, extra)
        ours = measure(FERRITE, fmt, opts, state, extra)
        print(f"{row:<32}{theirs:>12.0f}{ours:>14.0f}{ours / theirs:>8.2f}")


if __name__ == "__main__":
    main()
