"""Dirty bitmaps: the commands' checks and texts, what writes through NBD record, counts and
QEMU's sha256 of the same bitmaps, merges across nodes; compared with qemu-storage-daemon."""
import subprocess

from blockjobs import export_del
from conftest import wait_for  # noqa: F401  (shared helpers live there)


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=True,
                          timeout=120)


def nbd_writes(sock, ops):
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    out = run(*args, f"nbd+unix:///q?socket={sock}")
    assert "failed" not in out.stdout + out.stderr


def session(q, d, img, other):
    r = []
    c = lambda name, args=None: r.append(q.cmd(name, args))  # noqa: E731
    c("blockdev-add", {"node-name": "q", "driver": "qcow2",
                       "file": {"driver": "file", "filename": str(img)}})
    c("blockdev-add", {"node-name": "o", "driver": "qcow2",
                       "file": {"driver": "file", "filename": str(other)}})
    c("blockdev-add", {"node-name": "n", "driver": "null-co", "size": 4 << 20})
    for args in [
        {"node": "q", "name": "b0"},
        {"node": "q", "name": "b0"},
        {"node": "q", "name": "b1", "granularity": 512, "disabled": True},
        {"node": "q", "name": "b2", "granularity": 4096},
        {"node": "q", "name": "bad", "granularity": 1000},
        {"node": "q", "name": "bad", "granularity": 256},
        {"node": "q", "name": ""},
        {"node": "q", "name": "x" * 1024},
        {"node": "nope", "name": "b"},
        {"node": "n", "name": "p", "persistent": True},
        {"node": "n", "name": "nb"},
        {"node": "o", "name": "ob", "granularity": 65536},
    ]:
        c("block-dirty-bitmap-add", args)
    sock = str(d.workdir / "nbd.sock")
    c("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    c("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
    nbd_writes(sock, ["write 0 512", "write 70000 100000", "write -z 1M 64k",
                      "discard 2M 128k", "write 4193792 512"])
    c("block-dirty-bitmap-enable", {"node": "q", "name": "b1"})
    nbd_writes(sock, ["write 3M 4096", "write 5000 1"])
    c("query-named-block-nodes", {"flat": True})
    for name in ("b0", "b1", "b2", "zz"):
        c("x-debug-block-dirty-bitmap-sha256", {"node": "q", "name": name})
    c("block-dirty-bitmap-disable", {"node": "q", "name": "b0"})
    c("block-dirty-bitmap-merge", {"node": "q", "target": "b2",
                                   "bitmaps": ["b1", {"node": "o", "name": "ob"}]})
    c("block-dirty-bitmap-merge", {"node": "q", "target": "b2", "bitmaps": ["zz"]})
    c("block-dirty-bitmap-merge", {"node": "q", "target": "b2",
                                   "bitmaps": [{"node": "n", "name": "nb"}]})
    c("x-debug-block-dirty-bitmap-sha256", {"node": "q", "name": "b2"})
    c("block-dirty-bitmap-clear", {"node": "q", "name": "b1"})
    c("x-debug-block-dirty-bitmap-sha256", {"node": "q", "name": "b1"})
    c("block-dirty-bitmap-remove", {"node": "q", "name": "b0"})
    c("block-dirty-bitmap-remove", {"node": "q", "name": "b0"})
    c("block-dirty-bitmap-clear", {"node": "q", "name": "zz"})
    c("block-dirty-bitmap-enable", {"node": "q", "name": "zz"})
    c("query-named-block-nodes", {"flat": True})
    return r


def test_bitmap_commands_and_recording_match_qemu(both):
    seen = []
    for d in both():
        img, other = d.workdir / "q.qcow2", d.workdir / "o.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
        run("qemu-img", "create", "-q", "-f", "qcow2", other, "4M")
        q = d.connect()
        replies = session(q, d, img, other)
        # File names and sizes differ between the two runs' directories.
        for r in replies:
            for n in r.get("return", []) if isinstance(r.get("return"), list) else []:
                n.pop("image", None)
                n.pop("file", None)
                if n["node-name"].startswith("#block"):
                    n["node-name"] = "#block"  # auto names differ
        seen.append(replies)
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


def bitmap_state(q, node="q"):
    nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
    bitmaps = next(n for n in nodes if n["node-name"] == node).get("dirty-bitmaps", [])
    return [(b, q.cmd("x-debug-block-dirty-bitmap-sha256", {"node": node, "name": b["name"]}))
            for b in bitmaps]


def image_bitmaps(img):
    import json
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", img).stdout)
    return info["format-specific"]["data"].get("bitmaps")


def test_persistent_bitmaps_survive_restart_like_qemu(both):
    seen = []
    for d in both():
        img = d.workdir / "q.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
        # One bitmap QEMU made and filled.
        run("qemu-img", "bitmap", "--add", "-g", "4096", img, "made")
        run("qemu-io", "-c", "write 8k 4k", img)
        out = []
        q = d.connect()
        q.cmd("blockdev-add", {"node-name": "q", "driver": "qcow2",
                               "file": {"driver": "file", "filename": str(img)}})
        out.append(bitmap_state(q))
        out.append(image_bitmaps(img))
        for args in [{"name": "p", "persistent": True},
                     {"name": "d", "persistent": True, "disabled": True},
                     {"name": "t"}]:
            out.append(q.cmd("block-dirty-bitmap-add", dict(args, node="q")))
        sock = str(d.workdir / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                   "writable": True})
        nbd_writes(sock, ["write 0 512", "write 1M 100k", "write 4190208 4096"])
        out.append(bitmap_state(q))
        out.append(image_bitmaps(img))
        # Bitmaps follow their node when it grows (stored for the new size).
        export_del(q.cmd, "e")
        out.append(q.cmd("block_resize", {"node-name": "q", "size": 6 << 20}))
        out.append(bitmap_state(q))
        q.cmd("quit")
        d.proc.wait(timeout=10)
        out.append(image_bitmaps(img))
        run("qemu-img", "check", img)
        seen.append(out)
    for d in both():
        # Each program reopens the image the other one wrote.
        img = d.workdir.parent / ("ferrite0" if "qsd" in d.workdir.name else "qsd0") / "q.qcow2"
        q = d.connect()
        q.cmd("blockdev-add", {"node-name": "q", "driver": "qcow2", "read-only": True,
                               "file": {"driver": "file", "filename": str(img)}})
        seen.append(bitmap_state(q))
    theirs, ours, qsd_reads_ours, ferrite_reads_qemus = seen
    assert ours == theirs
    assert qsd_reads_ours == ferrite_reads_qemus


def test_nbd_exports_bitmaps_like_qemu(both):
    """Pull-mode incremental backup: a bitmap read over NBD as qemu:dirty-bitmap:NAME."""
    seen = []
    for d in both():
        img = d.workdir / "q.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
        q = d.connect()
        out = []
        q.cmd("blockdev-add", {"node-name": "q", "driver": "qcow2",
                               "file": {"driver": "file", "filename": str(img)}})
        for args in [{"name": "b0"}, {"name": "b1", "granularity": 4096}]:
            q.cmd("block-dirty-bitmap-add", dict(args, node="q"))
        sock = str(d.workdir / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        q.cmd("block-export-add", {"type": "nbd", "id": "w", "node-name": "q", "name": "q",
                                   "writable": True})
        nbd_writes(sock, ["write 0 512", "write 1M 100k", "write 3M 4k"])
        out.append(q.cmd("block-export-add", {"type": "nbd", "id": "r0", "node-name": "q",
                                              "name": "r0", "bitmaps": ["b0"]}))
        out.append(q.cmd("block-export-add", {"type": "nbd", "id": "r0", "node-name": "q",
                                              "name": "r0", "bitmaps": ["nope"]}))
        q.cmd("block-dirty-bitmap-disable", {"node": "q", "name": "b0"})
        q.cmd("block-dirty-bitmap-disable", {"node": "q", "name": "b1"})
        out.append(q.cmd("block-export-add", {
            "type": "nbd", "id": "r", "node-name": "q", "name": "r",
            "bitmaps": ["b0", {"node": "q", "name": "b1"}], "allocation-depth": True}))
        out.append(q.cmd("block-dirty-bitmap-remove", {"node": "q", "name": "b0"}))
        out.append(q.cmd("block-dirty-bitmap-clear", {"node": "q", "name": "b1"}))
        uri = f"nbd+unix:///r?socket={sock}"
        for ctx in ("qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"):
            out.append(run("nbdinfo", f"--map={ctx}", uri).stdout)
        out.append(run("nbdinfo", "--json", uri).stdout.count("qemu:dirty-bitmap:"))
        out.append(q.cmd("block-export-del", {"id": "r"}))
        wait_gone = []
        while q.cmd("query-block-exports")["return"] != [] and len(wait_gone) < 100:
            wait_gone.append(1)
            q.cmd("block-export-del", {"id": "w"})
        out.append(q.cmd("block-dirty-bitmap-remove", {"node": "q", "name": "b0"}))
        seen.append(out)
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


def bitmap_image(path):
    """A qcow2 image with two persistent bitmaps holding 1 MiB of writes: (its bytes, where
    the bitmaps extension's fields start, the directory entries as (offset in the file,
    table offset))."""
    import struct
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
    run("qemu-img", "bitmap", "--add", path, "b1")
    run("qemu-img", "bitmap", "--add", path, "b2")
    run("qemu-io", "-c", "write 0 1M", path)
    d = bytearray(path.read_bytes())
    p = struct.unpack(">I", d[100:104])[0]
    while True:
        kind, length = struct.unpack(">II", d[p:p + 8])
        assert kind != 0, "no bitmaps extension"
        if kind == 0x23852875:
            ext = p + 8
            break
        p += 8 + (length + 7) // 8 * 8
    at = struct.unpack(">Q", d[ext + 16:ext + 24])[0]
    entries = []
    for _ in range(2):
        table, = struct.unpack(">Q", d[at:at + 8])
        name_size, extra = struct.unpack(">HI", d[at + 18:at + 24])
        entries.append((at, table))
        at += (24 + extra + name_size + 7) // 8 * 8
    return d, ext, entries


def _be(d, at, value, size):
    d[at:at + size] = value.to_bytes(size, "big")


# (name, how to damage the image); each is refused by QEMU with its own text, or opened.
BITMAP_DAMAGE = [
    ("table entry reserved bit", lambda d, x, e: _be(d, e[1][1], int.from_bytes(
        d[e[1][1]:e[1][1] + 8], "big") | 2, 8)),
    ("table entry unaligned", lambda d, x, e: _be(d, e[1][1], (int.from_bytes(
        d[e[1][1]:e[1][1] + 8], "big") & ~0x1ff) + 512, 8)),
    ("table entry all ones with an offset", lambda d, x, e: _be(d, e[1][1], int.from_bytes(
        d[e[1][1]:e[1][1] + 8], "big") | 1, 8)),
    ("reserved flag", lambda d, x, e: _be(d, e[0][0] + 12, 2 | 4, 4)),
    ("table offset unaligned", lambda d, x, e: _be(d, e[0][0], e[0][1] + 512, 8)),
    ("table offset zero", lambda d, x, e: _be(d, e[0][0], 0, 8)),
    ("table size zero", lambda d, x, e: _be(d, e[0][0] + 8, 0, 4)),
    ("table size too big", lambda d, x, e: _be(d, e[0][0] + 8, 2, 4)),
    ("unknown type", lambda d, x, e: _be(d, e[0][0] + 16, 2, 1)),
    ("granularity below 512", lambda d, x, e: _be(d, e[0][0] + 17, 8, 1)),
    ("extra data", lambda d, x, e: _be(d, e[0][0] + 20, 8, 4)),
    ("more bitmaps than counted", lambda d, x, e: _be(d, x, 1, 4)),
    ("fewer bitmaps than counted", lambda d, x, e: _be(d, x, 3, 4)),
    ("no bitmaps counted", lambda d, x, e: _be(d, x, 0, 4)),
    ("too many bitmaps", lambda d, x, e: _be(d, x, 70000, 4)),
    ("extension reserved field", lambda d, x, e: _be(d, x + 4, 1, 4)),
    ("directory size zero", lambda d, x, e: _be(d, x + 8, 0, 8)),
    ("directory too big", lambda d, x, e: _be(d, x + 8, (64 << 20) + 8, 8)),
    ("directory unaligned", lambda d, x, e: _be(d, x + 16, int.from_bytes(
        d[x + 16:x + 24], "big") + 512, 8)),
    ("extension length", lambda d, x, e: _be(d, x - 4, 16, 4)),
    ("in use with a short table (stale, opens)", lambda d, x, e: (
        _be(d, e[0][0] + 12, 3, 4), _be(d, e[0][0] + 8, 0x100, 4))),
    ("autoclear bit cleared (bitmaps dropped, opens)", lambda d, x, e: _be(
        d, 88, int.from_bytes(d[88:96], "big") & ~1, 8)),
]


def test_damaged_bitmaps_are_refused_like_qemu(both, tmp_path):
    """A bitmap that breaks the format's rules is never loaded as clean: an incremental
    backup from it would miss data. Each damage is refused with QEMU's text (or, where QEMU
    opens the image, opened with the same bitmaps)."""
    base = tmp_path / "base.qcow2"
    data, ext, entries = bitmap_image(base)
    seen = []
    for d in both():
        out = []
        q = d.connect()
        for i, (name, damage) in enumerate(BITMAP_DAMAGE):
            img = d.workdir / f"{i}.qcow2"
            broken = bytearray(data)
            damage(broken, ext, entries)
            img.write_bytes(bytes(broken))
            r = q.cmd("blockdev-add", {"node-name": f"n{i}", "driver": "qcow2",
                                       "read-only": True,
                                       "file": {"driver": "file", "filename": str(img)}})
            if "error" in r:
                out.append((name, r["error"]["class"], r["error"]["desc"]))
            else:
                nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
                bitmaps = [n.get("dirty-bitmaps") for n in nodes if n["node-name"] == f"n{i}"]
                out.append((name, "opened", bitmaps))
        seen.append(out)
    theirs, ours = seen
    for t, o in zip(theirs, ours):
        assert o == t
    # Most are refused: none of those may open in ferrite.
    assert sum(1 for t in theirs if t[1] != "opened") >= 20


def test_stored_bitmaps_load_under_auto_read_only_as_qsd_loads_them(both):
    """An image with stored bitmaps opened with `auto-read-only` (what `-drive` does): the
    image writes its bitmaps' in-use flags as it opens, through a file whose descriptor is
    otherwise opened for writing only for a writer."""
    seen = []
    for d in both():
        img = d.workdir / "b.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        run("qemu-img", "bitmap", "--add", img, "b0")
        q = d.connect()
        out = [q.cmd("blockdev-add", {"node-name": "q", "driver": "qcow2",
                                      "auto-read-only": True,
                                      "file": {"driver": "file", "filename": str(img)}})]
        nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append(sorted((n["node-name"], n["ro"], [b["name"] for b in n["dirty-bitmaps"]])
                          for n in nodes if not n["node-name"].startswith("#")))
        info = run("qemu-img", "info", "-U", "--output=json", img).stdout
        out.append("in-use" in info)
        d.stop()
        out.append(run("qemu-img", "check", img).returncode)
        seen.append(out)
    assert seen[1] == seen[0]
    assert seen[0][0] == {"return": {}} and seen[0][2]


def test_a_bitmap_a_backup_uses_records_through_its_successor_like_qemu(both):
    """While a backup uses a bitmap, the bitmap is busy and still `recording` (its successor
    records, listed as an anonymous bitmap just before it, iotests 124 and 257); a disabled
    bitmap's successor records nothing. What the successor recorded joins the bitmap when
    the job ends."""
    seen = []
    for d in both():
        w = d.workdir
        for name in ("q", "t1", "t2"):
            run("qemu-img", "create", "-q", "-f", "qcow2", w / f"{name}.qcow2", "4M")
        q = d.connect()
        out = []
        state = lambda: out.append(  # noqa: E731
            next(n for n in q.cmd("query-named-block-nodes", {"flat": True})["return"]
                 if n["node-name"] == "q").get("dirty-bitmaps"))
        for name in ("q", "t1", "t2"):
            q.cmd("blockdev-add", {"node-name": name, "driver": "qcow2", "file": {
                "driver": "file", "filename": str(w / f"{name}.qcow2")}})
        q.cmd("block-dirty-bitmap-add", {"node": "q", "name": "on"})
        q.cmd("block-dirty-bitmap-add", {"node": "q", "name": "off", "disabled": True})
        sock = str(w / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q",
                                   "writable": True})
        nbd_writes(sock, ["write 0 64k", "write 1M 128k"])
        for bitmap, target in (("on", "t1"), ("off", "t2")):
            out.append(q.cmd("blockdev-backup", {
                "job-id": "j", "device": "q", "target": target, "sync": "bitmap",
                "bitmap": bitmap, "bitmap-mode": "on-success", "auto-finalize": False}))
            q.wait_event("BLOCK_JOB_PENDING")
            state()
            nbd_writes(sock, ["write 2M 64k", "write 3M 4k"])
            state()
            q.cmd("block-job-finalize", {"id": "j"})
            q.wait_event("BLOCK_JOB_COMPLETED")
            state()
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    # The enabled bitmap kept the writes made while the job used it.
    assert theirs[3][0]["count"] == 2 * 65536


def test_bitmaps_of_an_image_opened_read_only_are_kept_quietly_like_qsd(both):
    """Stored bitmaps loaded from an image opened read-only cannot change and are not lost:
    quitting says nothing and leaves them in the image; a reopen to read-write makes them
    changeable again (iotest 165's read-only round)."""
    def image(d):
        img = d.workdir / "r.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        run("qemu-img", "bitmap", "--add", img, "b0")
        run("qemu-io", "-c", "write 0 64k", img)
        return img

    seen = []
    for reopen in (False, True):
        for d in both():
            img = image(d)
            q = d.connect()
            opts = {"node-name": "q", "driver": "qcow2",
                    "file": {"driver": "file", "filename": str(img)}}
            out = [q.cmd("blockdev-add", dict(opts, **{"read-only": True}))]
            if reopen:
                out.append(q.cmd("blockdev-reopen",
                                 {"options": [dict(opts, **{"read-only": False})]}))
            out.append(q.cmd("block-dirty-bitmap-clear", {"node": "q", "name": "b0"}))
            out.append(bitmap_state(q))
            q.cmd("quit")
            d.proc.wait(timeout=10)
            out.append(d.stderr_path.read_text())
            out.append(image_bitmaps(img))
            seen.append(out)
    assert seen[1] == seen[0]
    assert seen[3] == seen[2]
    assert seen[0][3] == "" and seen[2][4] == ""
    assert seen[2][2] == {"return": {}}
    assert seen[0][1]["error"]["desc"] == "Bitmap 'b0' is readonly and cannot be modified"
