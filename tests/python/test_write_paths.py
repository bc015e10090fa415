"""The write fast paths keep NBD's guarantees: writes from several clients to overlapping,
unaligned ranges land in the order their replies came (a write sent after another's reply
lands after it, a read after a reply sees the write, no torn or reordered blocks), pipelined
writes all land, and FUA and flush mean what they say when the daemon is SIGKILLed right
after the reply. Each on a file system whose buffered writes go through the write lanes (the
test directory's, ext4 here) and on XFS, whose page cache takes non-blocking writes on the
main thread; with every I/O backend, for raw and qcow2."""
import os
import random
import shutil
import signal
import struct
import subprocess

import pytest

import nbdclient as nc
from conftest import wait_for

SIZE = 8 << 20
BACKENDS = ["aio=threads", "aio=io_uring", "cache.direct=on", "cache.direct=on,aio=native"]


def run(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check,
                          timeout=120)


@pytest.fixture(scope="module")
def xfs_dir(tmp_path_factory):
    """A directory on a fresh XFS file system (a loop-mounted image), or a skip saying why."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs)")
    base = tmp_path_factory.mktemp("xfs")
    img, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(320 << 20)
    run("mkfs.xfs", "-q", "-f", img)
    r = run("mount", "-o", "loop", img, mnt, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS image here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        run("umount", "-l", mnt, check=False)


@pytest.fixture(params=["ext4-lane", "xfs-nowait"])
def place(request, tmp_path):
    if request.param == "xfs-nowait":
        d = request.getfixturevalue("xfs_dir") / tmp_path.name
        d.mkdir()
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def start(ferrite, place, fmt, backend, prealloc=True):
    img = place / f"disk.{fmt}"
    opts = ["-o", "preallocation=metadata"] if fmt == "qcow2" and prealloc else []
    run("qemu-img", "create", "-q", "-f", fmt, *opts, img, str(SIZE))
    sock = str(place / "nbd.sock")
    d = ferrite(["--blockdev", f"driver=file,node-name=f0,filename={img},{backend}",
                 "--blockdev", f"{fmt},node-name=d0,file=f0",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "nbd,id=e0,node-name=d0,writable=on"])
    wait_for(lambda: os.path.exists(sock), what="NBD socket")
    return d, img, sock


def client(sock):
    c = nc.Nbd(sock)
    c.go("d0")
    return c


def write(c, offset, data, flags=0):
    c.request(nc.CMD_WRITE, offset, len(data), flags=flags, payload=data)
    err, _ = c.simple_reply()
    assert err == 0, f"write at {offset} failed: {err}"


def read(c, offset, length):
    c.request(nc.CMD_READ, offset, length)
    err, data = c.simple_reply(length)
    assert err == 0, f"read at {offset} failed: {err}"
    return data


def stamp(n, length):
    return (struct.pack(">I", n) * (length // 4 + 1))[:length]


def image_matches(img, fmt, model, tmp):
    expected = tmp / "expected.raw"
    expected.write_bytes(bytes(model))
    r = run("qemu-img", "compare", "-f", "raw", "-F", fmt, expected, img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clients_see_each_others_writes_in_reply_order(ferrite, place, tmp_path, fmt, backend):
    d, img, sock = start(ferrite, place, fmt, backend)
    clients = [client(sock) for _ in range(4)]
    model = bytearray(SIZE)
    rng = random.Random(7)
    # Overlapping, unaligned regions in the first 64 KiB, each written by a different client
    # than the one before it; the next client reads it back at once.
    # Every other write fills whole pages, which ferrite may write on its main thread while
    # the others go to a write lane: the two must still land in reply order.
    for r in range(400):
        if r % 2:
            offset = rng.randrange(0, 14) * 4096
            length = rng.choice([4096, 8192, 12288])
        else:
            offset = rng.randrange(0, 60000)
            length = rng.choice([1, 511, 4096, 4097, 12288, 65536 - offset])
        data = stamp(r, length)
        write(clients[r % 4], offset, data)
        model[offset:offset + length] = data
        assert read(clients[(r + 1) % 4], offset, length) == data, f"round {r}"
        if r % 50 == 49:
            assert read(clients[(r + 2) % 4], 0, 65536) == model[:65536], f"round {r}"
    # Pipelined: each client sends 64 writes before reading any reply, to its own blocks,
    # with some FUA; then another client reads them all.
    for i, c in enumerate(clients):
        base = (1 << 20) + i * (512 << 10)
        for k in range(64):
            at = base + k * 8192 + (100 if k % 3 else 0)
            c.request(nc.CMD_WRITE, at, 4096,
                      flags=nc.FLAG_FUA if k % 5 == 0 else 0, payload=stamp(1000 + k + i, 4096))
            model[at:at + 4096] = stamp(1000 + k + i, 4096)
        for _ in range(64):
            err, _ = c.simple_reply()
            assert err == 0
    for i in range(4):
        base = (1 << 20) + i * (512 << 10)
        got = read(clients[(i + 1) % 4], base, 512 << 10)
        assert got == model[base:base + (512 << 10)], f"client {i}'s pipelined writes"
    for c in clients:
        c.close()
    d.stop()
    image_matches(img, fmt, model, tmp_path)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fua_and_flushed_writes_survive_sigkill(ferrite, place, tmp_path, fmt, backend):
    # An empty qcow2 image: the writes allocate, so FUA must also make the mapping durable.
    d, img, sock = start(ferrite, place, fmt, backend, prealloc=False)
    c = client(sock)
    model = bytearray(SIZE)
    rng = random.Random(11)
    # Pipelined writes in flight together may land in any order, so none overlap; but pairs
    # share a 4 KiB block (read-modify-write with O_DIRECT must not lose either).
    slot = 48 << 10
    for k in range(150):
        offset = k * slot + rng.randrange(0, 4096)
        length = rng.choice([512, 3000, 4096, 40000])
        first, second = stamp(k, 700), stamp(10000 + k, length)
        c.request(nc.CMD_WRITE, offset, 700, payload=first)
        c.request(nc.CMD_WRITE, offset + 700, length, payload=second)
        model[offset:offset + 700] = first
        model[offset + 700:offset + 700 + length] = second
    for _ in range(300):
        assert c.simple_reply()[0] == 0
    c.request(nc.CMD_FLUSH)
    assert c.simple_reply()[0] == 0
    # After the flush: FUA writes only, the last one's reply just before the kill.
    for k in range(20):
        offset = rng.randrange(0, SIZE - 70000)
        data = stamp(500 + k, 8192)
        write(c, offset, data, flags=nc.FLAG_FUA)
        model[offset:offset + 8192] = data
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    image_matches(img, fmt, model, tmp_path)
