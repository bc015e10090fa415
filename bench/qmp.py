#!/usr/bin/env python3
"""QMP round trips per second (query-version, one client, one request in flight) and resident
memory at idle, for ferrite-storage-daemon and qemu-storage-daemon in the same run.
Prints each figure and the ratio ferrite/qsd (higher is better for rate, lower for memory)."""
import os
import socket
import tempfile
import time

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
N = int(os.environ.get("QMP_ROUNDS", "20000"))


def measure(binary):
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "qmp.sock")
        args = [binary, "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                "--monitor", "c"]
        with common.running(args, sock) as p:
            time.sleep(0.5)
            idle = common.rss_kib(p.pid)
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            f = s.makefile("rwb", buffering=0)
            f.readline()
            s.sendall(b'{"execute":"qmp_capabilities"}\n')
            f.readline()
            req = b'{"execute":"query-version"}\n'
            for _ in range(500):  # warm-up
                s.sendall(req)
                f.readline()
            t = time.perf_counter()
            for _ in range(N):
                s.sendall(req)
                f.readline()
            rate = N / (time.perf_counter() - t)
            busy = common.rss_kib(p.pid)
            s.close()
            return rate, idle, busy


def main():
    common.require_built(FERRITE)
    q = measure(QSD)
    f = measure(FERRITE)
    print(f"{'':28}{'ferrite':>12}{'qsd':>12}{'ratio':>9}")
    print(f"{'query-version round trips/s':28}{f[0]:12.0f}{q[0]:12.0f}{f[0] / q[0]:9.2f}")
    print(f"{'RSS at idle (KiB)':28}{f[1]:12d}{q[1]:12d}{f[1] / q[1]:9.2f}")
    print(f"{'RSS after the run (KiB)':28}{f[2]:12d}{q[2]:12d}{f[2] / q[2]:9.2f}")


if __name__ == "__main__":
    main()
