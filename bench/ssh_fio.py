#!/usr/bin/env python3
"""A disk image on an SSH server, served again over NBD: fio's nbd engine (iodepth 16)
against a writable NBD export of an `ssh` node whose file is a 1 GiB raw image on a local
OpenSSH sshd (SFTP, the page cache behind it). ferrite and qemu-storage-daemon (its libssh
driver) in the same run, with nbdkit's ssh plugin (libssh too) as the non-QEMU anchor.
Prints IOPS / bandwidth and the ratio ferrite/qsd (higher is better)."""
import os
import sys
import tempfile
from pathlib import Path

import common
from nbd_fio import FERRITE, QSD, RUNTIME, SIZE, image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests/python"))
from sshserver import SSHD, SshServer  # noqa: E402

JOBS = common.REMOTE_JOBS


def daemon_args(binary, d, server, img, sock):
    node = (f"driver=ssh,server.host=127.0.0.1,server.port={server.port},"
            f"path={img},host-key-check.mode=none")
    return common.node_export_args(binary, d, node, sock)


def nbdkit_args(server, img, sock):
    return ["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "ssh",
            "host=127.0.0.1", f"port={server.port}", f"path={img}",
            "verify-remote-host=false"]


def measure(binary, d, server, img):
    sock = os.path.join(d, f"{os.path.basename(binary)}.sock")
    args = (nbdkit_args(server, img, sock) if binary == "nbdkit"
            else daemon_args(binary, d, server, img, sock))
    return common.fio_jobs(args, sock, SIZE, RUNTIME, JOBS)


def main():
    common.require_built(FERRITE)
    if not os.path.exists(SSHD):
        print("ssh: skipped, sshd is not installed (apt-get install openssh-server)")
        return
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file on a local sshd "
          "(SFTP), through an ssh node")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        img = image(d)
        server = SshServer(Path(d) / "sshd")
        os.environ["SSH_AUTH_SOCK"] = server.agent_sock
        try:
            k = measure("nbdkit", d, server, img)
            q = measure(QSD, d, server, img)
            f = measure(FERRITE, d, server, img)
        finally:
            server.stop()
    common.print_rows(JOBS, f, q, k)


if __name__ == "__main__":
    main()
