#!/usr/bin/env python3
"""fio's nbd engine (libnbd) over NBD with TLS, iodepth 16, against ferrite-storage-daemon
and qemu-storage-daemon in the same run, on a fully written raw image in the page cache:
1M sequential reads and writes and 4k random reads and writes, with x509 credentials
(rustls in ferrite; AES-GCM as both ends negotiate it) and with a pre-shared key
(`tls-creds-psk`: ferrite's own TLS 1.3 PSK records against GnuTLS's). fio's nbd engine
cannot be given a key file (libnbd refuses local files in its URIs), so the PSK rows copy
the export with libnbd's nbdcopy instead: whole-image reads and writes in 256 KiB requests
over 4 connections, and in 4 KiB requests 16 deep over one. The x509 server does not
ask for a client certificate (fio's libnbd may not read one from a file), so the rows
measure the encrypted data path. Prints IOPS, MiB/s and the ratio ferrite/qsd (higher is
better)."""
import os
import subprocess
import tempfile
import time

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


# Each kind of credentials: the server's object and the client's URI.
KINDS = {
    "x509": ("tls-creds-x509,id=tls0,dir={d},endpoint=server,verify-peer=off",
             "nbds+unix:///r?socket={sock}&tls-verify-peer=false"),
    "psk": ("tls-creds-psk,id=tls0,dir={d},endpoint=server",
            "nbds+unix://alice@/r?socket={sock}&tls-psk-file={d}/keys.psk"),
}

# nbdcopy's rows: (name, arguments, whether it writes the export).
COPY_ROWS = [
    ("read 256k x4", [], False),
    ("write 256k x4", [], True),
    ("read 4k qd16", ["--connections=1", "--requests=16", "--request-size=4096"], False),
    ("write 4k qd16", ["--connections=1", "--requests=16", "--request-size=4096"], True),
]


def serving(binary, kind, d, img):
    """The daemon serving `img` over TLS with credentials of `kind`: (context, URI)."""
    sock = os.path.join(d, "nbd.sock")
    # The last daemon's socket file stays behind it: a fresh one is waited for.
    if os.path.exists(sock):
        os.unlink(sock)
    creds, uri = KINDS[kind]
    args = [binary,
            "--object", creds.format(d=d),
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=raw,node-name=r,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
            "--export", "nbd,id=e0,node-name=r,writable=on"]
    return common.running(args, sock), uri.format(sock=sock, d=d)


def measure(binary, extra, d, img):
    ctx, uri = serving(binary, "x509", d, img)
    with ctx:
        return common.fio(uri, f"{SIZE_MB}M", RUNTIME, extra)


def copy_rate(binary, extra, writes, d, img, source):
    """MiB/s of nbdcopy copying the whole export out (or `source` in), best of three."""
    ctx, uri = serving(binary, "psk", d, img)
    best = 0.0
    with ctx:
        for _ in range(3):
            args = [source, uri] if writes else [uri, "null:"]
            subprocess.run(["sync"], check=True)
            t = time.monotonic()
            subprocess.run(["nbdcopy", *extra, *args], check=True, capture_output=True)
            best = max(best, SIZE_MB / (time.monotonic() - t))
    return best


def main():
    common.require_built(FERRITE)
    print(f"NBD with TLS (fio iodepth 16, {RUNTIME}s per row, {SIZE_MB} MiB raw image, cached)")
    print(f"{'row':<20}{'qsd':>18}{'ferrite':>18}{'ratio':>8}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        certificates(d)
        subprocess.run(["psktool", "-u", "alice", "-p", os.path.join(d, "keys.psk")],
                       check=True, capture_output=True)
        img = os.path.join(d, "data.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, f"{SIZE_MB}M"], check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x33 0 {SIZE_MB}M", img],
                       check=True, capture_output=True)
        for row, extra in ROWS:
            theirs = measure(QSD, extra, d, img)
            ours = measure(FERRITE, extra, d, img)
            unit = 1 if "1M" in row else 0
            fmt = (lambda v: f"{v[1]:>12.0f} MiB/s") if unit else (lambda v: f"{v[0]:>13.0f} IOPS")
            label = f"x509 {row}"
            print(f"{label:<20}{fmt(theirs):>18}{fmt(ours):>18}"
                  f"{ours[unit] / theirs[unit]:>8.2f}")
        # The data nbdcopy writes in: a cached file that is not zeros (nbdcopy skips zeros).
        source = os.path.join(d, "source.raw")
        subprocess.run(["cp", img, source], check=True)
        for row, extra, writes in COPY_ROWS:
            theirs = copy_rate(QSD, extra, writes, d, img, source)
            ours = copy_rate(FERRITE, extra, writes, d, img, source)
            label = f"psk {row}"
            print(f"{label:<20}{theirs:>12.0f} MiB/s{ours:>12.0f} MiB/s{ours / theirs:>8.2f}")

if __name__ == "__main__":
    main()
