#!/usr/bin/env python3
"""A logical unit on an iSCSI target, served again over NBD: fio's nbd engine (iodepth 16)
against a writable NBD export of an `iscsi` node whose unit is a 1 GiB raw file behind tgt's
user-space target (tgtd, on this machine). ferrite and qemu-storage-daemon (its libiscsi
driver) in the same run. Debian has no non-QEMU iSCSI initiator that serves NBD (nbdkit's
iscsi plugin is not packaged), so the anchor is tgt's file itself through nbdkit's file
plugin: the ceiling without the iSCSI hop. Prints IOPS / bandwidth and the ratio
ferrite/qsd (higher is better)."""
import os
import sys
import tempfile
from pathlib import Path

import common
from nbd_fio import FERRITE, QSD, RUNTIME, SIZE, image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/python"))
from iscsitarget import TGTD, Target  # noqa: E402

JOBS = common.REMOTE_JOBS


def daemon_args(binary, d, tgt, iqn, sock):
    node = f"driver=iscsi,transport=tcp,portal={tgt.portal},target={iqn},lun=1"
    return common.node_export_args(binary, d, node, sock)


def measure(binary, d, tgt, iqn, img):
    sock = os.path.join(d, f"{os.path.basename(binary)}.sock")
    args = (["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "file", img]
            if binary == "nbdkit" else daemon_args(binary, d, tgt, iqn, sock))
    return common.fio_jobs(args, sock, SIZE, RUNTIME, JOBS)


def main():
    common.require_built(FERRITE)
    if not os.path.exists(TGTD):
        print("iscsi: skipped, tgt is not installed (apt-get install tgt)")
        return
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file behind tgtd "
          "(iSCSI over loopback), through an iscsi node; anchor: the file through nbdkit")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = image(d)
        tgt = Target(Path(d) / "tgt")
        try:
            iqn = tgt.add("bench", img)
            k = measure("nbdkit", d, tgt, iqn, img)
            q = measure(QSD, d, tgt, iqn, img)
            f = measure(FERRITE, d, tgt, iqn, img)
        finally:
            tgt.stop()
    common.print_rows(JOBS, f, q, k)


if __name__ == "__main__":
    main()
