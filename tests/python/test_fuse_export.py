"""FUSE exports against qemu-storage-daemon: the same export refusals, the same file at the
mount point (stat, reads, writes, short writes at the end, fallocate, truncate, SEEK_DATA and
SEEK_HOLE, chmod and what is refused), the same image afterwards, and the export's end
(`block-export-del`, daemon exit, a daemon killed with SIGKILL)."""
import ctypes
import errno
import hashlib
import json
import os
import signal
import subprocess

import pytest

from conftest import assert_same_image, assert_same_transcript, recorder, wait_for

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
MiB = 1 << 20


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def fallocate(fd, mode, off, length):
    if LIBC.fallocate(fd, mode, off, length) != 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"


def errname(fn):
    """What a file operation did: its result, or the errno's name."""
    try:
        r = fn()
        return r if r is not None else "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def make_image(path):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 1M", "-c", "write -P 0xa5 5M 512k",
                    "-c", "write -z 6M 64k", str(path)], check=True, capture_output=True)


def data_map(fd, size):
    """Every data and hole boundary, as SEEK_DATA/SEEK_HOLE report them."""
    out, at = [], 0
    while at < size:
        d = errname(lambda: os.lseek(fd, at, os.SEEK_DATA))
        if not isinstance(d, int):
            out.append(("data", at, d))
            break
        h = os.lseek(fd, d, os.SEEK_HOLE)
        out.append((d, h))
        at = h
    out.append(("past-end", errname(lambda: os.lseek(fd, size + 1, os.SEEK_HOLE)),
                errname(lambda: os.lseek(fd, size, os.SEEK_DATA)),
                errname(lambda: os.lseek(fd, size, os.SEEK_HOLE))))
    return out


def file_workout(mnt):
    """Everything a user does to the file at the mount point, and what came back."""
    out = []
    st = os.stat(mnt)
    out.append(("stat", st.st_size, oct(st.st_mode), st.st_nlink, st.st_uid, st.st_blksize))
    # Whole seconds: a time that moves at every stat makes the kernel drop its cache.
    out.append(("times", [t % 10**9 for t in (st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns)]))
    with open(mnt, "rb") as f:
        out.append(("sha", hashlib.sha256(f.read()).hexdigest()))
    fd = os.open(mnt, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        out.append(("map", data_map(fd, size)))
        out.append(("pwrite", os.pwrite(fd, b"\x11" * 3 * 65536, 2 * MiB + 512)))
        out.append(("pwrite-end", os.pwrite(fd, b"\x22" * 8192, size - 4096)))
        out.append(("pwrite-at-end", errname(lambda: os.pwrite(fd, b"x", size))))
        out.append(("pread-end", os.pread(fd, 8192, size - 4096)[:8]))
        out.append(("pread-past", os.pread(fd, 10, size + 4096)))
        out.append(("punch", fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                       MiB, 256 << 10)))
        out.append(("punch-no-keep", fallocate(fd, FALLOC_FL_PUNCH_HOLE, MiB, 4096)))
        out.append(("zero-range", fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                            5 * MiB + 4096, 8192)))
        out.append(("alloc-inside", fallocate(fd, 0, 0, 4096)))
        out.append(("map", data_map(fd, size)))
        out.append(("fsync", errname(lambda: os.fsync(fd))))
        out.append(("seek-bad", errname(lambda: os.lseek(fd, 0, 3 + 7))))
    finally:
        os.close(fd)
    out.append(("utime", errname(lambda: os.utime(mnt, (1, 1)))))
    out.append(("chmod-644", errname(lambda: os.chmod(mnt, 0o644))))
    out.append(("mode", oct(os.stat(mnt).st_mode)))
    out.append(("chmod-600", errname(lambda: os.chmod(mnt, 0o600))))
    out.append(("chown", errname(lambda: os.chown(mnt, 1, 1))))
    out.append(("owner", os.stat(mnt).st_uid))
    os.chown(mnt, 0, 0)
    out.append(("truncate-grow", errname(lambda: os.truncate(mnt, 9 * MiB)),
                os.stat(mnt).st_size))
    out.append(("truncate-back", errname(lambda: os.truncate(mnt, 8 * MiB)),
                os.stat(mnt).st_size))
    with open(mnt, "rb") as f:
        out.append(("sha", hashlib.sha256(f.read()).hexdigest()))
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 2097664 64k",
                        "-c", "read -P 0 1M 256k", "-c", "write -P 0x33 7M 4k", mnt],
                       capture_output=True, text=True)
    out.append(("qemu-io", r.returncode, [ln for ln in r.stdout.splitlines()
                                          if " ops; " not in ln]))
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", mnt],
                                     capture_output=True, text=True, check=True).stdout)
    out.append(("qemu-img", info["format"], info["virtual-size"]))
    return out


def read_only_workout(mnt):
    out = []
    out.append(("mode", oct(os.stat(mnt).st_mode)))
    out.append(("open-rw", errname(lambda: os.close(os.open(mnt, os.O_RDWR)))))
    out.append(("chmod-w", errname(lambda: os.chmod(mnt, 0o600))))
    out.append(("truncate", errname(lambda: os.truncate(mnt, MiB))))
    with open(mnt, "rb") as f:
        out.append(("sha", hashlib.sha256(f.read()).hexdigest()))
    return out


def growable_workout(mnt):
    out = []
    fd = os.open(mnt, os.O_RDWR)
    try:
        out.append(("pwrite-past", os.pwrite(fd, b"\x44" * 8192, 8 * MiB + 4096)))
        out.append(("size", os.fstat(fd).st_size))
        out.append(("alloc-end", fallocate(fd, 0, 9 * MiB, MiB), os.fstat(fd).st_size))
        out.append(("zero-grow", fallocate(fd, FALLOC_FL_ZERO_RANGE, 10 * MiB, MiB),
                    os.fstat(fd).st_size))
        out.append(("tail", os.pread(fd, 8, 8 * MiB + 4096)))
    finally:
        os.close(fd)
    return out


def transcript(d):
    """One daemon's whole FUSE session: refusals, three exports, removal, and the image."""
    w = d.workdir
    make_image(w / "img.qcow2")
    for name in ("mnt", "mnt2"):
        (w / name).write_bytes(b"")
    (w / "dir").mkdir()
    c = d.connect()
    out = []

    cmd = recorder(c, out)

    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "img.qcow2"})
    cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    cmd("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True,
                         "size": 1 << 20, "read-zeroes": True})

    def export(**kw):
        return cmd("block-export-add", {"type": "fuse", **kw})

    export(id="bad id", **{"node-name": "q", "mountpoint": "mnt"})
    export(id="e", **{"node-name": "q", "mountpoint": "missing"})
    export(id="e", **{"node-name": "q", "mountpoint": "dir"})
    export(id="e", **{"node-name": "ro", "mountpoint": "mnt", "writable": True})
    export(id="e", **{"node-name": "q", "mountpoint": "mnt", "allow-inactive": True})
    export(id="e", **{"node-name": "nope", "mountpoint": "mnt"})
    export(id="e", **{"node-name": "q", "mountpoint": "mnt", "writable": True,
                      "allow-other": "on"})
    export(id="e2", **{"node-name": "q", "mountpoint": "mnt"})
    export(id="e", **{"node-name": "q", "mountpoint": "mnt2"})
    cmd("query-block-exports", {})
    cmd("blockdev-del", {"node-name": "q"})
    out.append(("mounted", mounted(w / "mnt")))
    out.extend(file_workout(str(w / "mnt")))
    cmd("block-export-del", {"id": "e"})
    out.append(("event", c.wait_event("BLOCK_EXPORT_DELETED")["data"]))
    out.append(("mounted-after-del", mounted(w / "mnt")))

    export(id="r", **{"node-name": "q", "mountpoint": "mnt", "allow-other": "off"})
    out.extend(read_only_workout(str(w / "mnt")))
    out.append(("chmod-other", errname(lambda: os.chmod(w / "mnt", 0o404))))
    cmd("block-export-del", {"id": "r"})
    c.wait_event("BLOCK_EXPORT_DELETED")

    export(id="g", **{"node-name": "q", "mountpoint": "mnt", "writable": True,
                      "growable": True})
    out.extend(growable_workout(str(w / "mnt")))
    cmd("block-export-del", {"id": "g", "mode": "hard"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    cmd("query-block-exports", {})
    export(id="x", **{"node-name": "q", "mountpoint": "mnt"})
    c.close()
    d.stop()
    out.append(("mounted-after-exit", mounted(w / "mnt"), mounted(w / "mnt2")))
    return out


def test_fuse_export_matches_qsd(both):
    q, f = both()
    expected = transcript(q)
    got = transcript(f)
    assert_same_transcript(expected, got)
    assert_same_image(q.workdir / "img.qcow2", f.workdir / "img.qcow2", "qcow2")


def fallocate_transcript(d):
    """fallocate past the end of a raw file's export grows it allocated (iotest 308)."""
    w = d.workdir
    img = w / "img.raw"
    img.write_bytes(b"\x11" * 65536)
    (w / "mnt").write_bytes(b"")
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    cmd("block-export-add", {"type": "fuse", "id": "e", "node-name": "f",
                             "mountpoint": "mnt", "writable": True})
    used = os.stat(img).st_blocks
    fd = os.open(w / "mnt", os.O_RDWR)
    try:
        out.append(("inside", fallocate(fd, 0, 0, 4096)))
        out.append(("at-end", fallocate(fd, 0, 65536, 65536), os.fstat(fd).st_size))
        out.append(("after-gap", fallocate(fd, 0, 196608, 65536), os.fstat(fd).st_size))
    finally:
        os.close(fd)
    # 128 KiB were allocated: 256 sectors more, at least (file systems may add metadata).
    out.append(("grew", os.stat(img).st_blocks - used >= 256))
    cmd("block-export-del", {"id": "e"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    c.close()
    d.stop()
    return out


def test_fallocate_past_the_end_allocates_as_qsd(both):
    q, f = both()
    assert_same_transcript(fallocate_transcript(q), fallocate_transcript(f))


def open_file_transcript(d):
    """The export's end while a process holds the file open: the mount goes at once, both
    on `block-export-del` and on SIGTERM (a plain unmount would fail with EBUSY and leave a
    dead mount behind the daemon: iotests' FUSE runs of 060 and 080 found it)."""
    w = d.workdir
    img = w / "img.raw"
    img.write_bytes(b"\x11" * MiB)
    (w / "mnt").write_bytes(b"")
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    export = {"type": "fuse", "node-name": "f", "mountpoint": "mnt", "writable": True}
    cmd("block-export-add", {"id": "e", **export})
    fd = os.open(w / "mnt", os.O_RDWR)
    try:
        cmd("block-export-del", {"id": "e"})
        out.append(("event", c.wait_event("BLOCK_EXPORT_DELETED")["data"]))
        out.append(("mounted-after-del", mounted(w / "mnt"), os.stat(w / "mnt").st_size))
    finally:
        out.append(("close-after-del", errname(lambda: os.close(fd))))
    cmd("block-export-add", {"id": "e2", **export})
    fd = os.open(w / "mnt", os.O_RDWR)
    try:
        out.append(("read", os.pread(fd, 4, 0)))
        c.close()
        d.stop()
        out.append(("mounted-after-exit", mounted(w / "mnt"), os.stat(w / "mnt").st_size))
        out.append(("held-file", errname(lambda: os.pread(fd, 4, 512 * 1024))))
    finally:
        out.append(("close-after-exit", errname(lambda: os.close(fd))))
    return out


def test_the_mount_goes_while_a_file_is_open_as_qsd(both):
    q, f = both()
    assert_same_transcript(open_file_transcript(q), open_file_transcript(f))


def test_a_killed_daemon_leaves_no_mount_in_the_way(ferrite, tmp_path):
    """SIGKILL leaves a dead mount (the kernel answers ENOTCONN); the next daemon exporting
    there detaches it and mounts (qemu-storage-daemon fails to stat it instead)."""
    img = tmp_path / "img.qcow2"
    make_image(img)
    mnt = tmp_path / "mnt"
    mnt.write_bytes(b"")
    opts = ["--blockdev", f"file,node-name=f,filename={img}",
            "--blockdev", "qcow2,node-name=q,file=f",
            "--export", f"fuse,id=e,node-name=q,mountpoint={mnt},writable=on"]
    d = ferrite(opts)
    wait_for(lambda: mounted(mnt), what="mount")
    with open(mnt, "r+b") as fh:
        fh.seek(3 * MiB)
        fh.write(b"\x77" * 4096)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    assert errname(lambda: os.stat(mnt)) == "ENOTCONN"
    d2 = ferrite(opts)
    # The dead mount goes first (the empty file shows), then the new one comes.
    wait_for(lambda: errname(lambda: os.stat(mnt).st_size) == 8 * MiB, what="a live mount")
    with open(mnt, "rb") as fh:
        fh.seek(3 * MiB)
        assert fh.read(4096) == b"\x77" * 4096
    d2.stop()
    assert not mounted(mnt)
    assert os.stat(mnt).st_size == 0


def test_fuse_export_with_an_nbd_export_of_the_same_node(ferrite, tmp_path):
    """Exports of two types on one node: each in the list, a write through NBD is read back
    through the file, and stopping the NBD server ends only the NBD export. (A writable FUSE
    export takes `resize`, which an NBD export does not share: QEMU refuses both together.)"""
    img = tmp_path / "img.qcow2"
    make_image(img)
    mnt = tmp_path / "mnt"
    mnt.write_bytes(b"")
    sock = tmp_path / "nbd.sock"
    d = ferrite(["--blockdev", f"file,node-name=f,filename={img}",
                 "--blockdev", "qcow2,node-name=q,file=f",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", f"fuse,id=e,node-name=q,mountpoint={mnt}",
                 "--export", "nbd,id=n,node-name=q,writable=on"])
    c = d.connect()
    exports = c.cmd("query-block-exports")["return"]
    assert [(e["id"], e["type"]) for e in exports] == [("n", "nbd"), ("e", "fuse")]
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 4M 64k",
                        f"nbd+unix:///q?socket={sock}"], capture_output=True, text=True)
    assert "wrote 65536/65536" in r.stdout, r.stdout + r.stderr
    with open(mnt, "rb") as fh:
        fh.seek(4 * MiB)
        assert fh.read(65536) == b"\x66" * 65536
    assert c.cmd("nbd-server-stop") == {"return": {}}
    assert c.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "n"}
    assert [e["id"] for e in c.cmd("query-block-exports")["return"]] == ["e"]
    assert mounted(mnt)
    c.close()
    d.stop()
    assert not mounted(mnt)


def test_a_refused_command_line_leaves_no_mount(ferrite, tmp_path):
    """An export after a FUSE export failing ends the daemon; the mount goes with it
    (qemu-storage-daemon leaves it mounted and dead)."""
    img = tmp_path / "img.qcow2"
    make_image(img)
    mnt = tmp_path / "mnt"
    mnt.write_bytes(b"")
    d = None
    try:
        d = ferrite(["--blockdev", f"file,node-name=f,filename={img}",
                     "--blockdev", "qcow2,node-name=q,file=f",
                     "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
                     "--export", f"fuse,id=e,node-name=q,mountpoint={mnt},writable=on",
                     "--export", "nbd,id=n,node-name=q"])
        d.proc.wait(10)
        stderr = d.stderr_path.read_text()
    except RuntimeError as e:
        stderr = str(e)
    assert d is None or d.proc.returncode == 1
    assert "Permission conflict on node 'q'" in stderr
    assert not mounted(mnt)


@pytest.fixture(autouse=True)
def _no_mount_left(tmp_path):
    yield
    for p in tmp_path.rglob("mnt*"):
        if mounted(p):
            subprocess.run(["umount", "-l", str(p)], check=False)
