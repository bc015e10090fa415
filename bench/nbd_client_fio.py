#!/usr/bin/env python3
"""Storage reached over the network and served again: fio's nbd engine (iodepth 16) against an
NBD export of a raw node stacked on the nbd client, which reaches a second daemon of the same
program exporting a raw file (ferrite -> ferrite and qemu-storage-daemon ->
qemu-storage-daemon, in the same run). The nbd client is what a backup to a remote machine or
a storage migration writes through. Prints IOPS / bandwidth and the ratio ferrite/qsd (higher
is better), with nbdkit's nbd plugin in front of nbdkit's file plugin as a non-QEMU anchor."""
import os
import tempfile

import common
from nbd_fio import FERRITE, QSD, RUNTIME, SIZE, image, nbdkit_args

JOBS = common.REMOTE_JOBS


def back_args(binary, d, img, sock):
    """The remote side: a raw file exported over NBD."""
    qmp = os.path.join(d, "back-qmp.sock")
    return [binary, "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "raw,node-name=d0,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=d0,writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


def front_args(binary, d, remote, sock):
    """The local side: the nbd client to the remote export, exported again."""
    qmp = os.path.join(d, "front-qmp.sock")
    return [binary,
            "--blockdev", f"driver=nbd,node-name=n0,server.type=unix,server.path={remote},"
                          "export=d0",
            "--blockdev", "raw,node-name=d0,file=n0",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=d0,writable=on",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


def nbdkit_front(remote, sock):
    return ["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "nbd",
            f"socket={remote}", "export=d0"]


def measure(binary):
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = image(d)
        remote = os.path.join(d, "back.sock")
        sock = os.path.join(d, "front.sock")
        if binary == "nbdkit":
            back, front = nbdkit_args(d, img, remote), nbdkit_front(remote, sock)
        else:
            back, front = back_args(binary, d, img, remote), front_args(binary, d, remote, sock)
        with common.running(back, remote), common.running(front, sock):
            return {name: common.fio(f"nbd+unix:///d0?socket={sock}", SIZE, RUNTIME, extra)
                    for name, extra in JOBS}


def main():
    common.require_built(FERRITE)
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file behind an nbd "
          "client node, each program to itself")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    k = measure("nbdkit")
    q = measure(QSD)
    f = measure(FERRITE)
    common.print_rows(JOBS, f, q, k)


if __name__ == "__main__":
    main()
