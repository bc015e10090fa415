#!/usr/bin/env python3
"""A disk image on a web server, served again over NBD: fio's nbd engine (iodepth 16, reads
only: the drivers are read-only) against an NBD export of an `http` node whose URL is a
1 GiB raw file that nginx serves from the page cache. ferrite and qemu-storage-daemon (its
libcurl driver) in the same run, with nbdkit's curl plugin as the non-QEMU anchor. Prints
IOPS / bandwidth and the ratio ferrite/qsd (higher is better)."""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import common
from nbd_fio import FERRITE, QSD, RUNTIME, SIZE, image

JOBS = [
    ("seq read 1M", ["--rw=read", "--bs=1M"]),
    ("rand read 4k", ["--rw=randread", "--bs=4k"]),
    ("rand read 64k", ["--rw=randread", "--bs=64k"]),
]

NGINX = """daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  sendfile on;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{port}; root {d}; }}
}}
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def daemon_args(binary, d, url, sock):
    qmp = os.path.join(d, "qmp.sock")
    return [binary, "--blockdev", f"driver=http,node-name=h0,url={url},read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "nbd,id=e0,node-name=h0,name=d0",
            "--chardev", f"socket,id=c,path={qmp},server=on,wait=off", "--monitor", "c"]


def nbdkit_args(url, sock):
    return ["nbdkit", "--foreground", "--unix", sock, "--exportname=d0", "--readonly",
            "curl", f"url={url}"]


def measure(binary, d, url):
    """Each job's (IOPS, MiB/s); None for a job (and those after it) the server never
    finished: qsd 10.0.2's curl driver can hang for good once the web server has closed
    kept-alive connections (its sockets stay in CLOSE-WAIT, its main loop in poll)."""
    sock = os.path.join(d, f"{os.path.basename(binary)}.sock")
    args = nbdkit_args(url, sock) if binary == "nbdkit" else daemon_args(binary, d, url, sock)
    out = {}
    with common.running(args, sock):
        for name, extra in JOBS:
            try:
                out[name] = common.fio(f"nbd+unix:///d0?socket={sock}", SIZE, RUNTIME,
                                       ["--readonly", *extra], timeout=int(RUNTIME) + 60)
            except subprocess.TimeoutExpired:
                print(f"  ({os.path.basename(binary)} never finished '{name}')")
                out.update({n: None for n, _ in JOBS if n not in out})
                break
    return out


def main():
    common.require_built(FERRITE)
    if shutil.which("nginx") is None:
        print("http: skipped, nginx is not installed (apt-get install nginx-light)")
        return
    print(f"fio nbd engine, iodepth 16, {RUNTIME}s per job, 1 GiB raw file served by nginx, "
          "through an http node")
    print(f"{'':26}{'ferrite':>14}{'qsd':>14}{'ratio':>8}{'nbdkit':>14}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        image(d)
        os.chmod(d, 0o755)
        port = free_port()
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX.format(d=d, port=port))
        nginx = subprocess.Popen(["nginx", "-c", conf], stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            url = f"http://127.0.0.1:{port}/disk.raw"
            k = measure("nbdkit", d, url)
            q = measure(QSD, d, url)
            f = measure(FERRITE, d, url)
        finally:
            nginx.terminate()
            nginx.wait()
    common.print_rows(JOBS, f, q, k)


if __name__ == "__main__":
    main()
