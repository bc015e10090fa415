"""Image fleecing with `copy-before-write` and `snapshot-access` nodes added by the user: the
point in time read over NBD while a client writes the source, discards giving ranges up,
push backups from the snapshot with `discard-source`, the filter's `bitmap`, `on-cbw-error`
and `min-cluster-size` options, and backup's `x-perf`; each compared with
qemu-storage-daemon running the same session."""
import json
import subprocess
import time

import pytest

from conftest import wait_for
from test_backup import add, export, qcow2, run, small_fs, wait_job_gone


def qemu_io_out(uri, *ops, read_only=False):
    """qemu-io's answers without timings: what each operation did, or its error."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for op in ops:
        args += ["-c", op]
    r = run(*args, uri, check=False)
    return [line for line in (r.stdout + r.stderr).splitlines()
            if "ops/sec" not in line]


def neutral(out, d):
    """`out` with the daemon's own directory named alike for both programs."""
    return json.loads(json.dumps(out).replace(str(d.workdir), "W"))


def node_view(q, names):
    """What queries show of `names`: driver, image and internal bitmaps."""
    out = {}
    for n in q.cmd("query-named-block-nodes", {"flat": True})["return"]:
        if n["node-name"] in names:
            image = {k: v for k, v in n["image"].items() if k != "actual-size"}
            out[n["node-name"]] = (n["drv"], n["ro"], n["file"], image,
                                   n.get("dirty-bitmaps"))
    return out


def allocated(path):
    """Bytes of `path` that hold data in its own layer."""
    r = run("qemu-img", "map", "--output=json", "-U", path)
    return sum(e["length"] for e in json.loads(r.stdout) if e["data"])


def fleecing_nodes(q, d, tmp_opts=None, cbw_opts=None):
    """src under a copy-before-write filter writing to tmp, and its snapshot-access view;
    exports of both (the filter's for the guest's writes)."""
    add(q, "src", d.workdir / "src.qcow2")
    add(q, "tmp", d.workdir / "tmp.qcow2", discard="unmap", **(tmp_opts or {}))
    r = q.cmd("blockdev-add", dict({"driver": "copy-before-write", "node-name": "cbw",
                                    "file": "src", "target": "tmp"}, **(cbw_opts or {})))
    assert r == {"return": {}}, r
    r = q.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                               "file": "cbw", "discard": "unmap"})
    assert r == {"return": {}}, r
    guest = export(q, d, "cbw", "cbw", True)
    snap = export(q, d, "acc", "acc", True)
    return guest, snap


def make_source(d, size="4M"):
    src = d.workdir / "src.qcow2"
    qcow2(src, size)
    run("qemu-io", "-c", "write -P 1 0 2M", "-c", "write -P 2 3M 64k", src)
    qcow2(d.workdir / "tmp.qcow2", size)
    expected = d.workdir / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", src, expected)
    return expected


def test_snapshot_access_serves_the_point_in_time_like_qemu(both):
    """Writes through the filter leave the snapshot as it was; a discard gives whole
    clusters up (they read as EINVAL over NBD); the filter's internal bitmaps, node
    queries and refusals are QEMU's."""
    seen = []
    for d in both():
        expected = make_source(d)
        q = d.connect()
        guest, snap = fleecing_nodes(q, d)
        out = [node_view(q, {"cbw", "acc"})]
        out.append(qemu_io_out(guest, "write -P 9 0 64k", "write -P 9 2M 64k",
                               "write -P 9 3M 4k", "write -z 1M 128k", "discard 3200k 64k"))
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, snap, check=False)
        out.append((r.returncode, r.stdout))
        out.append(node_view(q, {"cbw"}))
        # Given up: 1M..2M whole, and of 100k..300k only the clusters wholly inside.
        out.append(qemu_io_out(snap, "discard 1M 1M", "discard 100k 200k"))
        out.append(qemu_io_out(snap, "read -P 1 0 64k", "read -P 2 3M 64k"))
        out.append(qemu_io_out(snap, "read 1M 4k"))
        out.append(qemu_io_out(snap, "read 128k 4k"))
        out.append(qemu_io_out(snap, "read 64k 64k"))
        out.append(qemu_io_out(snap, "read 192k 64k"))
        out.append(qemu_io_out(snap, "write -P 7 0 4k"))
        out.append(qemu_io_out(snap, "write -z 0 4k"))
        out.append(node_view(q, {"cbw"}))
        r = run("qemu-img", "map", "-f", "raw", "--output=json", "--start-offset=2M", snap)
        out.append(json.loads(r.stdout))
        # The guest still sees its writes.
        out.append(qemu_io_out(guest, "read -P 9 0 64k", "read -P 0 1M 128k"))
        for cmd, args in [
            ("blockdev-del", {"node-name": "cbw"}),
            ("blockdev-reopen", {"options": [{"driver": "snapshot-access", "node-name": "acc",
                                              "file": "cbw"}]}),
            ("block_resize", {"node-name": "acc", "size": 1 << 20}),
            ("blockdev-add", {"driver": "snapshot-access", "node-name": "x"}),
        ]:
            out.append(q.cmd(cmd, args))
        seen.append(neutral(out, d))
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, json.dumps([i, a, b])
    assert len(ours) == len(theirs)


def test_fleecing_push_backup_with_discard_source_like_qemu(both):
    """The usual push backup with fleecing: a backup job copies the snapshot to the real
    target while the guest writes, with discard-source so the temporary image gives back
    every cluster once the job has it. The target is the point in time; the temporary image
    ends empty."""
    seen = []
    for d in both():
        expected = make_source(d, "8M")
        run("qemu-io", "-c", "write -P 3 5M 3M", d.workdir / "src.qcow2")
        run("qemu-img", "convert", "-O", "raw", d.workdir / "src.qcow2", expected)
        tgt = d.workdir / "tgt.qcow2"
        qcow2(tgt, "8M")
        q = d.connect()
        guest, _ = fleecing_nodes(q, d)
        add(q, "tgt", tgt)
        out = [q.cmd("blockdev-backup", {"job-id": "push", "device": "acc", "target": "tgt",
                                         "sync": "full", "discard-source": True,
                                         "speed": 1 << 20})]
        out.append(qemu_io_out(guest, *[f"write -P {0x40 + i} {i * 700}k 300k"
                                        for i in range(10)]))
        assert q.cmd("block-job-set-speed", {"device": "push", "speed": 0}) == {"return": {}}
        ev = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
        out.append((ev.get("error"), ev["offset"] == ev["len"]))
        wait_job_gone(q, "push")
        out.append(q.cmd("blockdev-del", {"node-name": "tgt"}))
        r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, tgt, check=False)
        out.append((r.returncode, r.stdout))
        assert q.cmd("block-export-del", {"id": "acc"}) == {"return": {}}
        wait_for(lambda: q.cmd("blockdev-del", {"node-name": "acc"}) == {"return": {}},
                 what="the snapshot export to go")
        # Nothing left to keep nor to read (how much the guest's writes copied first
        # depends on timing).
        access, _, dirty = node_view(q, {"cbw"})["cbw"][4]
        out.append((access["count"], dirty["count"]))
        d.stop()
        out.append(allocated(d.workdir / "tmp.qcow2"))
        out.append(run("qemu-img", "check", d.workdir / "tmp.qcow2", check=False).returncode)
        seen.append(neutral(out, d))
    # QEMU can leave a cluster behind in the temporary image (a guest write's copy that
    # ends after the job discarded it); ferrite waits for such copies.
    left = [out.pop(-2) for out in seen]
    theirs, ours = seen
    assert ours == theirs
    assert left[1] == 0, f"the temporary image kept {left[1]} bytes (QEMU: {left[0]})"


def test_discard_source_empties_a_plain_source_like_qemu(both):
    """discard-source on an ordinary source discards what was copied (with discard=unmap
    on the node; without it nothing is discarded); a read-only source refuses it."""
    seen = []
    for d in both():
        src, src2, src3, tgt = (d.workdir / n for n in
                                ("src.qcow2", "src2.qcow2", "src3.qcow2", "tgt.qcow2"))
        for p in (src, src2, src3):
            qcow2(p, "4M")
            run("qemu-io", "-c", "write -P 1 0 2M", "-c", "write -P 2 3M 64k", p)
        qcow2(tgt, "4M")
        original = d.workdir / "orig.raw"
        run("qemu-img", "convert", "-O", "raw", src, original)
        q = d.connect()
        add(q, "src", src, discard="unmap")
        add(q, "src2", src2)
        add(q, "tgt", tgt)
        out = []
        for job, dev in (("a", "src"), ("b", "src2")):
            out.append(q.cmd("blockdev-backup", {"job-id": job, "device": dev, "target": "tgt",
                                                 "sync": "full", "discard-source": True}))
            ev = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
            out.append((ev["device"], ev.get("error"), ev["offset"]))
            wait_job_gone(q, job)
        add(q, "ro", src3, **{"read-only": True})
        out.append(q.cmd("blockdev-backup", {"job-id": "c", "device": "ro", "target": "tgt",
                                             "sync": "full", "discard-source": True}))
        for n in ("src", "src2", "ro", "tgt"):
            assert q.cmd("blockdev-del", {"node-name": n}) == {"return": {}}
        out.append((allocated(src), allocated(src2)))
        r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", original, tgt, check=False)
        out.append(r.returncode)
        seen.append(neutral(out, d))
    theirs, ours = seen
    assert ours == theirs
    assert ours[-2][0] == 0


def test_filter_bitmap_and_option_errors_like_qemu(both):
    """A filter with `bitmap` keeps only what the bitmap marks: the rest of the snapshot
    cannot be read and is not copied. Option errors, x-perf errors and their order are
    QEMU's."""
    seen = []
    for d in both():
        make_source(d)
        qcow2(d.workdir / "small.qcow2", "2M")
        qcow2(d.workdir / "tgt.qcow2", "4M")
        q = d.connect()
        add(q, "src", d.workdir / "src.qcow2")
        add(q, "tmp", d.workdir / "tmp.qcow2")
        add(q, "small", d.workdir / "small.qcow2")
        add(q, "tgt", d.workdir / "tgt.qcow2")
        out = []
        for cmd, args in [
            ("block-dirty-bitmap-add", {"node": "src", "name": "b0", "granularity": 4096}),
            ("block-dirty-bitmap-add", {"node": "small", "name": "s0"}),
            ("block-dirty-bitmap-add", {"node": "tgt", "name": "t0"}),
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "tmp", "bitmap": {"node": "src", "name": "nope"}}),
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "tmp", "bitmap": {"node": "nonode", "name": "b0"}}),
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "tmp", "bitmap": {"node": "small", "name": "s0"}}),
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "tmp", "min-cluster-size": 3000}),
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "tmp", "cbw-timeout": -1}),
            # Accepted (only backup insists on equal sizes).
            ("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                              "target": "small"}),
            ("blockdev-del", {"node-name": "c"}),
            ("blockdev-backup", {"device": "src", "target": "tmp", "sync": "full",
                                 "job-id": "1bad", "x-perf": {"max-workers": 0}}),
            ("blockdev-backup", {"device": "src", "target": "src", "sync": "full",
                                 "x-perf": {"max-workers": 0}}),
            ("blockdev-backup", {"device": "src", "target": "small", "sync": "full",
                                 "job-id": "j", "x-perf": {"max-chunk": -1}}),
            ("blockdev-backup", {"device": "src", "target": "tmp", "sync": "full",
                                 "job-id": "1bad", "x-perf": {"max-chunk": 1000}}),
            ("blockdev-backup", {"device": "src", "target": "small", "sync": "full",
                                 "job-id": "j", "x-perf": {"max-chunk": 1000}}),
            ("blockdev-backup", {"device": "src", "target": "tmp", "sync": "full",
                                 "job-id": "j", "speed": -1,
                                 "x-perf": {"min-cluster-size": 1000}}),
            ("blockdev-backup", {"device": "src", "target": "tmp", "sync": "full",
                                 "job-id": "j", "x-perf": {"min-cluster-size": 131072,
                                                           "max-chunk": 65536}}),
            ("blockdev-backup", {"device": "src", "target": "tmp", "sync": "full",
                                 "job-id": "1bad", "speed": -1}),
        ]:
            out.append(q.cmd(cmd, args))
        # Dirty in b0: 4k at 0 and 4k at 3M: the clusters of both are kept, nothing else.
        r = q.cmd("block-dirty-bitmap-clear", {"node": "src", "name": "b0"})
        assert r == {"return": {}}
        guest = export(q, d, "src", "src", True)
        out.append(qemu_io_out(guest, "write -P 1 0 4k", "write -P 2 3M 4k"))
        r = q.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "c",
                                   "file": "src", "target": "tmp",
                                   "bitmap": {"node": "src", "name": "b0"}})
        out.append(r)
        # Once used, the filter lets nobody else write its source.
        r = q.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                   "file": "c"})
        out.append(r)
        assert q.cmd("block-export-del", {"id": "src"}) == {"return": {}}
        wait_for(lambda: all(e["id"] != "src" for e in q.cmd("query-block-exports")["return"]),
                 what="the export to go")
        r = q.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                   "file": "c"})
        out.append(r)
        guest = export(q, d, "c", "c", True)
        snap_uri = export(q, d, "acc", "acc", False)
        out.append(node_view(q, {"c"}))
        out.append(qemu_io_out(guest, "write -P 5 0 2M", "write -P 5 3M 64k"))
        out.append(node_view(q, {"c"}))
        out.append(qemu_io_out(snap_uri, "read -P 1 0 64k", "read -P 2 3M 64k",
                               read_only=True))
        out.append(qemu_io_out(snap_uri, "read 64k 4k", read_only=True))
        seen.append(neutral(out, d))
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, json.dumps([i, a, b])
    assert len(ours) == len(theirs)


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_copy_failures_break_what_on_cbw_error_says_like_qemu(both, mode):
    """The temporary image fills up: with break-guest-write the guest's write fails and the
    snapshot stays readable; with break-snapshot the write succeeds and the snapshot is
    gone (a backup reading it fails)."""
    seen = []
    mounts = []
    try:
        for d in both():
            make_source(d, "8M")
            run("qemu-io", "-c", "write -P 3 2M 6M", d.workdir / "src.qcow2")
            fs = d.workdir / "fs"
            small_fs(fs, "1M")
            mounts.append(fs)
            qcow2(fs / "tmp.qcow2", "8M")
            (d.workdir / "tmp.qcow2").unlink()
            (d.workdir / "tmp.qcow2").symlink_to(fs / "tmp.qcow2")
            tgt = d.workdir / "tgt.qcow2"
            qcow2(tgt, "8M")
            q = d.connect()
            guest, snap = fleecing_nodes(q, d, cbw_opts={"on-cbw-error": mode})
            add(q, "tgt", tgt)
            out = [q.cmd("blockdev-backup", {"job-id": "push", "device": "acc",
                                             "target": "tgt", "sync": "full", "speed": 1})]
            out.append(qemu_io_out(guest, "write -P 9 4M 2M"))
            out.append(qemu_io_out(guest, "read -P 9 4M 64k"))
            out.append(qemu_io_out(snap, "read 0 4k"))
            assert q.cmd("block-job-set-speed", {"device": "push", "speed": 0}) \
                == {"return": {}}
            ev = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
            out.append((ev.get("error"), ev["offset"] == ev["len"]))
            wait_job_gone(q, "push")
            seen.append(neutral(out, d))
            d.stop()
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
    theirs, ours = seen
    assert ours == theirs


@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
def test_cbw_timeout_like_qemu(both, mode):
    """A copy slower than cbw-timeout (a target with 2 s latency, a 1 s limit) counts as
    failed: the guest's write fails, or goes on and breaks the snapshot."""
    seen = []
    for d in both():
        make_source(d)
        q = d.connect()
        add(q, "src", d.workdir / "src.qcow2")
        r = q.cmd("blockdev-add", {"driver": "null-co", "node-name": "slow", "size": 4 << 20,
                                   "latency-ns": 2_000_000_000, "read-zeroes": True})
        assert r == {"return": {}}, r
        r = q.cmd("blockdev-add", {"driver": "copy-before-write", "node-name": "cbw",
                                   "file": "src", "target": "slow", "cbw-timeout": 1,
                                   "on-cbw-error": mode})
        assert r == {"return": {}}, r
        r = q.cmd("blockdev-add", {"driver": "snapshot-access", "node-name": "acc",
                                   "file": "cbw"})
        assert r == {"return": {}}, r
        guest = export(q, d, "cbw", "cbw", True)
        snap = export(q, d, "acc", "acc", False)
        started = time.monotonic()
        out = [qemu_io_out(guest, "write -P 9 0 64k")]
        # The copy goes on in the background.
        out.append(qemu_io_out(snap, "read -P 1 64k 64k", read_only=True))
        took = time.monotonic() - started
        assert 0.9 < took < 1.9, took
        out.append(qemu_io_out(snap, "read -P 1 0 64k", read_only=True))
        out.append(qemu_io_out(guest, "read -P 9 0 64k"))
        seen.append(neutral(out, d))
    theirs, ours = seen
    assert ours == theirs


def test_x_perf_sets_chunk_and_cluster_like_qemu(both):
    """x-perf takes effect: min-cluster-size sets the copy granularity (the backup filter's
    bitmaps), max-chunk the size of one background request (under speed 1, only the first
    request goes before the limiter holds the job)."""
    seen = []
    for d in both():
        make_source(d)
        qcow2(d.workdir / "tgt.qcow2", "4M")
        q = d.connect()
        add(q, "src", d.workdir / "src.qcow2")
        add(q, "tgt", d.workdir / "tgt.qcow2")
        out = [q.cmd("blockdev-backup", {
            "job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 1,
            "filter-node-name": "ff",
            "x-perf": {"min-cluster-size": 131072, "max-chunk": 262144, "max-workers": 1}})]
        time.sleep(0.5)
        job = q.cmd("query-block-jobs")["return"][0]
        out.append((job["offset"], job["len"]))
        out.append(node_view(q, {"ff"}))
        out.append(q.cmd("block-job-cancel", {"device": "j"}))
        q.wait_event("BLOCK_JOB_CANCELLED")
        seen.append(neutral(out, d))
    theirs, ours = seen
    assert ours == theirs
    assert ours[1] == [262144, 4 << 20], ours[1]
