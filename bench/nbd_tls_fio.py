#!/usr/bin/env python3
"""fio's nbd engine (libnbd) over NBD with TLS (x509, AES-GCM as both ends negotiate it),
iodepth 16, against ferrite-storage-daemon and qemu-storage-daemon in the same run, on a
fully written raw image in the page cache: 1M sequential reads and writes and 4k random
reads and writes. The server does not ask for a client certificate (fio's libnbd may not
read one from a file), so the rows measure the encrypted data path. Prints IOPS, MiB/s
and the ratio ferrite/qsd (higher is better)."""
import os
import subprocess
import tempfile

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRITE = os.environ.get("FERRITE_BIN", os.path.join(ROOT, "target/release/ferrite-storage-daemon"))
QSD = "qemu-storage-daemon"
RUNTIME = os.environ.get("FIO_RUNTIME", "6")
SIZE_MB = int(os.environ.get("TLS_SIZE_MB", "512"))

ROWS = [
    ("seq read 1M", ["--rw=read", "--bs=1M"]),
    ("seq write 1M", ["--rw=write", "--bs=1M"]),
    ("rand read 4k", ["--rw=randread", "--bs=4k"]),
    ("rand write 4k", ["--rw=randwrite", "--bs=4k"]),
]


def certificates(d):
    """A CA and a server certificate for 127.0.0.1, made with certtool."""
    def certtool(*args):
        subprocess.run(["certtool", *args], check=True, capture_output=True)
    key = os.path.join(d, "server-key.pem")
    certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", key)
    with open(os.path.join(d, "ca.info"), "w") as f:
        f.write("cn = bench CA\nca\ncert_signing_key\n")
    ca = os.path.join(d, "ca-cert.pem")
    certtool("--generate-self-signed", "--load-privkey", key, "--template",
             os.path.join(d, "ca.info"), "--outfile", ca)
    with open(os.path.join(d, "server.info"), "w") as f:
        f.write("cn = bench\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\n"
                "signing_key\n")
    certtool("--generate-certificate", "--load-ca-privkey", key, "--load-ca-certificate", ca,
             "--load-privkey", key, "--template", os.path.join(d, "server.info"),
             "--outfile", os.path.join(d, "server-cert.pem"))


def measure(binary, extra, d, img):
    sock = os.path.join(d, "nbd.sock")
    # The last daemon's socket file stays behind it: a fresh one is waited for.
    if os.path.exists(sock):
        os.unlink(sock)
    args = [binary,
            "--object", f"tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=off",
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=raw,node-name=r,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
            "--export", "nbd,id=e0,node-name=r,writable=on"]
    with common.running(args, sock):
        return common.fio(f"nbds+unix:///r?socket={sock}&tls-verify-peer=false",
                          f"{SIZE_MB}M", RUNTIME, extra)


def main():
    common.require_built(FERRITE)
    print(f"NBD with TLS (fio iodepth 16, {RUNTIME}s per row, {SIZE_MB} MiB raw image, cached)")
    print(f"{'row':<16}{'qsd':>18}{'ferrite':>18}{'ratio':>8}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        certificates(d)
        img = os.path.join(d, "data.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, f"{SIZE_MB}M"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x33 0 {SIZE_MB}M", img],
                       check=True, capture_output=True)
        for row, extra in ROWS:
            theirs = measure(QSD, extra, d, img)
            ours = measure(FERRITE, extra, d, img)
            unit = 1 if "1M" in row else 0
            fmt = (lambda v: f"{v[1]:>12.0f} MiB/s") if unit else (lambda v: f"{v[0]:>13.0f} IOPS")
            print(f"{row:<16}{fmt(theirs):>18}{fmt(ours):>18}"
                  f"{ours[unit] / theirs[unit]:>8.2f}")


if __name__ == "__main__":
    main()
