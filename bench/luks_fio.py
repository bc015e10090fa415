#!/usr/bin/env python3
"""fio's nbd engine over an NBD export of a LUKS-encrypted qcow2 image (iodepth 16; QEMU's
default cipher, aes-256-xts-plain64), against ferrite-storage-daemon and
qemu-storage-daemon in the same run: 1M sequential reads and writes and 4k random reads and
writes on a fully written image. Prints IOPS and the ratio ferrite/qsd (higher is better)."""
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "6")
SIZE_MB = int(os.environ.get("LUKS_SIZE_MB", "512"))
SECRET = "secret,id=s0,data=bench"

ROWS = [
    ("seq read 1M", ["--rw=read", "--bs=1M"]),
    ("seq write 1M", ["--rw=write", "--bs=1M"]),
    ("rand read 4k", ["--rw=randread", "--bs=4k"]),
    ("rand write 4k", ["--rw=randwrite", "--bs=4k"]),
]


def make_image(d):
    img = os.path.join(d, "enc.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", SECRET,
                    "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                    img, f"{SIZE_MB}M"], check=True)
    subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", "-c",
                    f"write -P 0x33 0 {SIZE_MB}M",
                    f"driver=qcow2,encrypt.key-secret=s0,file.filename={img}"],
                   check=True, capture_output=True)
    return img


def measure(binary, extra):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = make_image(d)
        sock = os.path.join(d, "nbd.sock")
        args = [binary, "--object", SECRET,
                "--blockdev", f"driver=file,node-name=f0,filename={img}",
                "--blockdev", "driver=qcow2,node-name=q,file=f0,encrypt.format=luks,encrypt.key-secret=s0",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "nbd,id=e0,node-name=q,writable=on"]
        subprocess.run(["sync"], check=True)
        with common.running(args, sock):
            return common.fio(f"nbd+unix:///q?socket={sock}", f"{SIZE_MB}M", RUNTIME,
                              extra)[0]


def main():
    common.require_built(FERRITE)
    print(f"LUKS-encrypted qcow2 over NBD (fio iodepth 16, {RUNTIME}s per row, "
          f"{SIZE_MB} MiB image)")
    print(f"{'row':<16}{'qsd IOPS':>12}{'ferrite IOPS':>14}{'ratio':>8}")
    for row, extra in ROWS:
        theirs = measure(QSD, extra)
        ours = measure(FERRITE, extra)
        print(f"{row:<16}{theirs:>12.0f}{ours:>14.0f}{ours / theirs:>8.2f}")


if __name__ == "__main__":
    main()
