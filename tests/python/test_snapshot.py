"""External snapshots (blockdev-snapshot, blockdev-snapshot-sync) and change-backing-file:
the overlay takes the node's place under its users (an NBD export keeps working and now
writes to the overlay), the old image stays as it was; checks and texts as QEMU gives them."""
import json
import re

import pytest

from test_backup import qcow2, run


def session(q, w):
    out = []
    c = lambda name, args=None: out.append(q.cmd(name, args))  # noqa: E731
    c("blockdev-add", {"node-name": "base", "driver": "qcow2",
                       "file": {"driver": "file", "filename": str(w / "b.qcow2")}})
    sock = str(w / "nbd.sock")
    c("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    c("block-export-add", {"type": "nbd", "id": "e", "node-name": "base", "writable": True})
    c("blockdev-add", {"node-name": "ov", "driver": "qcow2",
                       "file": {"driver": "file", "filename": str(w / "o.qcow2")}})
    c("blockdev-snapshot", {"node": "nope", "overlay": "ov"})
    c("blockdev-snapshot", {"node": "base", "overlay": "nope"})
    # A node over itself, or over one above it, would be a cycle; a file some format reads
    # is in use.
    c("blockdev-snapshot", {"node": "ov", "overlay": "ov"})
    c("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    c("blockdev-snapshot", {"node": "base", "overlay": "ov"})
    c("blockdev-snapshot", {"node": "ov", "overlay": "base"})
    c("blockdev-add", {"node-name": "f2", "driver": "file", "filename": str(w / "o.qcow2"),
                       "locking": "off"})
    c("blockdev-add", {"node-name": "raw2", "driver": "raw", "file": "f2"})
    c("blockdev-snapshot", {"node": "ov", "overlay": "f2"})
    c("blockdev-del", {"node-name": "raw2"})
    c("blockdev-del", {"node-name": "f2"})
    uri = f"nbd+unix:///base?socket={sock}"
    run("qemu-io", "-f", "raw", "-c", "write -P 2 512k 64k", uri)
    c("blockdev-snapshot-sync", {"node-name": "base", "snapshot-file": str(w / "s.qcow2")})
    c("blockdev-snapshot-sync", {"node-name": "ov", "snapshot-file": str(w / "s.qcow2"),
                                 "snapshot-node-name": "ov"})
    c("blockdev-snapshot-sync", {"device": "ov", "snapshot-file": str(w / "s.qcow2")})
    c("blockdev-snapshot-sync", {"node-name": "ov", "snapshot-file": str(w / "s.qcow2"),
                                 "snapshot-node-name": "s1"})
    run("qemu-io", "-f", "raw", "-c", "write -P 3 0 64k", uri)
    c("query-block-exports")
    c("query-named-block-nodes", {"flat": False})
    c("change-backing-file", {"device": "s1", "image-node-name": "ov",
                              "backing-file": "b.qcow2"})
    c("change-backing-file", {"device": "s1", "image-node-name": "base",
                              "backing-file": "x"})
    c("change-backing-file", {"device": "ov", "image-node-name": "s1",
                              "backing-file": "x"})
    c("blockdev-del", {"node-name": "base"})
    c("blockdev-del", {"node-name": "s1"})
    return out


def test_external_snapshots_match_qemu(both):
    seen = []
    for d in both():
        w = d.workdir
        qcow2(w / "b.qcow2", "4M")
        run("qemu-io", "-c", "write -P 1 0 1M", w / "b.qcow2")
        qcow2(w / "o.qcow2", "4M")
        q = d.connect()
        out = session(q, w)
        q.cmd("quit")
        d.proc.wait(timeout=10)
        images = {}
        for name in ("b", "o", "s"):
            info = json.loads(run("qemu-img", "info", "--output=json", w / f"{name}.qcow2").stdout)
            images[name] = {k: info.get(k) for k in ("backing-filename", "backing-filename-format")}
            run("qemu-img", "check", w / f"{name}.qcow2")
        # What each layer holds: base untouched after the snapshot, the rest above.
        run("qemu-io", "-c", "read -P 1 0 1M", w / "b.qcow2")
        r = run("qemu-io", "-r", "-c", "read -P 3 0 64k", "-c", "read -P 1 64k 448k",
                "-c", "read -P 2 512k 64k", w / "s.qcow2")
        assert "Pattern verification failed" not in r.stdout, r.stdout
        text = json.dumps([out, images]).replace(str(w), "W")
        # Where clusters land in the files may differ; what they hold may not.
        text = re.sub(r'"actual-size": \d+', '"actual-size": 0', text)
        seen.append(json.loads(re.sub(r"#block\d+", "#block", text)))
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours[0], theirs[0])):
        assert a == b, i
    assert ours[1] == theirs[1]


def test_internal_snapshots_match_qemu(both):
    """blockdev-snapshot-internal-sync and -delete-internal-sync: checks and texts, the
    snapshot table qemu-img lists, a revert to the point in time, and no leaks."""
    seen = []
    for d in both():
        w = d.workdir
        img = w / "i.qcow2"
        qcow2(img, "4M", "-o", "cluster_size=4096")
        run("qemu-io", "-c", "write -P 1 0 1M", "-c", "write -c -P 5 2M 64k", img)
        q = d.connect()
        out = []
        c = lambda name, args=None: out.append(q.cmd(name, args))  # noqa: E731
        c("blockdev-add", {"node-name": "q", "driver": "qcow2",
                           "file": {"driver": "file", "filename": str(img)}})
        c("blockdev-add", {"node-name": "n", "driver": "null-co"})
        sock = str(w / "nbd.sock")
        c("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        c("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
        uri = f"nbd+unix:///q?socket={sock}"
        for args in [{"device": "q", "name": "s1"}, {"device": "q", "name": "s1"},
                     {"device": "q", "name": ""}, {"device": "n", "name": "x"},
                     {"device": "nope", "name": "x"}]:
            c("blockdev-snapshot-internal-sync", args)
        run("qemu-io", "-f", "raw", "-c", "write -P 2 0 64k", "-c", "write -P 3 1M 64k",
            "-c", "write -z 2M 4k", uri)
        c("transaction", {"actions": [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": "q", "name": "s2"}},
            {"type": "abort", "data": {}}]})
        c("blockdev-snapshot-internal-sync", {"device": "q", "name": "s3"})
        run("qemu-io", "-f", "raw", "-c", "write -P 4 0 4k", uri)
        c("query-named-block-nodes", {"flat": True})
        for args in [{"device": "q", "name": "zz"}, {"device": "q"},
                     {"device": "q", "id": "2", "name": "s3"}, {"device": "q", "id": "2"}]:
            c("blockdev-snapshot-delete-internal-sync", args)
        q.cmd("quit")
        d.proc.wait(timeout=10)
        check = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
        out.append({k: check.get(k, 0) for k in ("leaks", "corruptions", "check-errors")})
        out.append([line.split()[1] for line in
                    run("qemu-img", "snapshot", "-l", img).stdout.splitlines()[2:]])
        run("qemu-img", "snapshot", "-a", "s1", img)
        r = run("qemu-io", "-r", "-c", "read -P 1 0 1M", "-c", "read -P 5 2M 64k", img)
        assert "Pattern verification failed" not in r.stdout, r.stdout
        text = json.dumps(out).replace(str(w), "W")
        text = re.sub(r'"(date-sec|date-nsec|vm-clock-sec|vm-clock-nsec|actual-size)": \d+',
                      r'"\1": 0', text)
        seen.append(json.loads(re.sub(r"#block\d+", "#block", text)))
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


def test_an_image_with_internal_snapshots_shrinks_as_qemus(both):
    """block_resize to a smaller size keeps the snapshots whole: the image is clean, the
    active layer is shorter, and going back to the snapshot brings its size and data back."""
    seen = []
    for d in both():
        img = d.workdir / "s.qcow2"
        qcow2(img, "4M")
        run("qemu-io", "-c", "write -P 1 0 4M", img)
        run("qemu-img", "snapshot", "-c", "snap", img)
        run("qemu-io", "-c", "write -P 2 0 4M", img)
        q = d.connect()
        out = [q.cmd("blockdev-add", {"node-name": "n", "driver": "qcow2",
                                      "file": {"driver": "file", "filename": str(img)}}),
               q.cmd("block_resize", {"node-name": "n", "size": 1 << 20})]
        q.cmd("quit")
        d.proc.wait(timeout=10)
        check = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
        out.append({k: check.get(k, 0) for k in ("leaks", "corruptions", "check-errors")})
        out.append(json.loads(run("qemu-img", "info", "--output=json", img).stdout)
                   ["virtual-size"])
        r = run("qemu-io", "-r", "-c", "read -P 2 0 1M", img)
        assert "Pattern verification failed" not in r.stdout, r.stdout
        run("qemu-img", "snapshot", "-a", "snap", img)
        out.append(json.loads(run("qemu-img", "info", "--output=json", img).stdout)
                   ["virtual-size"])
        r = run("qemu-io", "-r", "-c", "read -P 1 0 4M", img)
        assert "Pattern verification failed" not in r.stdout, r.stdout
        check = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
        out.append({k: check.get(k, 0) for k in ("leaks", "corruptions", "check-errors")})
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs


def _refcount_image(path, bits, bump_last):
    """An image with 2-bit or 1-bit refcounts and 100 KiB of data; `bump_last` gives the
    last data cluster a refcount of 3 (a leak that a snapshot's +1 overflows, part way)."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"refcount_bits={bits},cluster_size=4096", path, "4M")
    run("qemu-io", "-c", "write -P 1 0 100k", path)
    if bump_last:
        extents = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
        last = [e for e in extents if e["data"]][-1]
        cluster = (last["offset"] + last["length"] - 4096) // 4096
        d = bytearray(path.read_bytes())
        reftable = int.from_bytes(d[48:56], "big")
        block = int.from_bytes(d[reftable:reftable + 8], "big")
        bit = cluster * bits
        d[block + bit // 8] |= 3 << (bit % 8)
        path.write_bytes(bytes(d))


def _check(path):
    r = run("qemu-img", "check", "--output=json", path, check=False)
    return json.loads(r.stdout)


def test_a_failed_internal_snapshot_is_undone(both):
    """A snapshot whose refcount increments overflow fails with QEMU's error, and leaves no
    error qemu-img check did not see before: the references already taken are given back
    and the COPIED flags put right (QEMU leaves leaks)."""
    seen = []
    for d in both():
        q = d.connect()
        out = []
        for i, (bits, bump) in enumerate([(1, False), (2, True)]):
            img = d.workdir / f"r{i}.qcow2"
            _refcount_image(img, bits, bump)
            errors_before = _check(img).get("corruptions", 0)
            q.cmd("blockdev-add", {"node-name": f"n{i}", "driver": "qcow2",
                                   "file": {"driver": "file", "filename": str(img)}})
            r = q.cmd("blockdev-snapshot-internal-sync", {"device": f"n{i}", "name": "s"})
            q.cmd("blockdev-del", {"node-name": f"n{i}"})
            after = _check(img)
            out.append((r["error"]["desc"], after.get("corruptions", 0) <= errors_before,
                        run("qemu-img", "snapshot", "-l", img).stdout))
            if "ferrite" in d.workdir.name:
                assert after.get("corruptions", 0) == 0, after
                assert "check-errors" not in after or after["check-errors"] == 0
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs


# (format, snapshot file, mode): what QEMU answers for each, when opening the overlay by its
# name or making it fails (qsd seed 2863).
OVERLAYS_BY_NAME = [
    ("null-co", "overlay.img", "absolute-paths"),
    ("vvfat", "overlay.img", "absolute-paths"),
    ("blkdebug", "overlay.img", "absolute-paths"),
    ("raw", "overlay.img", "absolute-paths"),
    ("null-co", "disk.raw", "existing"),
    ("null-co", "null-co://", "existing"),
    ("file", "disk.raw", "existing"),
    ("vvfat", "disk.raw", "existing"),
    ("blkdebug", "disk.raw", "existing"),
    ("blkdebug", "blkdebug::disk.raw", "existing"),
    ("blkverify", "disk.raw", "existing"),
    ("nbd", "disk.raw", "existing"),
    ("throttle", "disk.raw", "existing"),
    ("quorum", "disk.raw", "existing"),
    ("nfs", "disk.raw", "existing"),
    ("nfs", "http://h/disk.raw", "existing"),
]


@pytest.mark.parametrize("fmt,name,mode", OVERLAYS_BY_NAME)
def test_an_overlay_named_by_its_file_is_opened_as_qemu_opens_it(both, fmt, name, mode):
    """`blockdev-snapshot-sync`'s overlay is made and opened by its file name: a format that
    cannot make images says so before anything about backing files, and a protocol or a
    filter QEMU opens as one reads the name itself."""
    seen = []
    for d in both():
        (d.workdir / "disk.raw").write_bytes(bytes(65536))
        q = d.connect()
        assert "return" in q.cmd("blockdev-add", {"driver": "null-co", "node-name": "n0"})
        seen.append(q.cmd("blockdev-snapshot-sync", {
            "node-name": "n0", "snapshot-file": name, "snapshot-node-name": "ov",
            "format": fmt, "mode": mode}))
        seen.append(sorted(p.name for p in d.workdir.iterdir()))
    theirs, ours = seen[:2], seen[2:]
    assert ours == theirs
    assert "error" in ours[0]
