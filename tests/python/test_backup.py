"""Backup: blockdev-backup keeps the point in time while a client writes the source through
NBD (sync full, top and none with a fleecing export), block job verbs and events as
qemu-storage-daemon gives them, rate limiting, and quit cancelling running jobs."""
import json
import subprocess
import time

import pytest

from blockjobs import (add, export, full_source_and_small_target, qcow2, qemu_io, run,
                       small_fs, source_and_target, wait_job_gone)
from conftest import wait_for


WRITES = [f"write -P {0x40 + i} {i * 700 * 1024} 300k" for i in range(10)]


@pytest.mark.parametrize("sync", ["full", "top"])
def test_backup_keeps_the_point_in_time_while_the_source_is_written(ferrite, tmp_path, sync):
    base, src, tgt = tmp_path / "base.qcow2", tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    if sync == "top":
        qcow2(base)
        run("qemu-io", "-c", "write -P 0x11 0 8M", base)
        qcow2(src, "8M", "-b", base.name, "-F", "qcow2")
        run("qemu-io", "-c", "write -P 0x22 1M 2M", "-c", "write -z 5M 1M", src)
        qcow2(tgt, "8M", "-b", base.name, "-F", "qcow2")
    else:
        qcow2(src)
        run("qemu-io", "-c", "write -P 0x22 0 3M", "-c", "write -P 0x33 4M 3M", src)
        qcow2(tgt)
    # The point in time: what the source shows now.
    expected = tmp_path / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", src, expected)
    d = ferrite()
    q = d.connect()
    add(q, "src", src)
    add(q, "tgt", tgt, backing=None)
    uri = export(q, d, "src", "src", True)
    r = q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                  "sync": sync, "speed": 2 << 20})
    assert r == {"return": {}}, r
    qemu_io(uri, *WRITES)
    jobs = q.cmd("query-block-jobs")["return"]
    assert jobs and jobs[0]["offset"] < jobs[0]["len"], "the job ended before the writes"
    assert q.cmd("block-job-set-speed", {"device": "b", "speed": 0}) == {"return": {}}
    ev = q.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"], ev
    wait_job_gone(q, "b")
    # The source has the new data; the target the old.
    qemu_io(uri, *[w.replace("write", "read") for w in WRITES], read_only=True)
    d.stop()
    run("qemu-img", "check", tgt)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, tgt, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fleecing_export_shows_the_point_in_time(ferrite, tmp_path):
    src, fleece = tmp_path / "src.qcow2", tmp_path / "fleece.qcow2"
    qcow2(src)
    run("qemu-io", "-c", "write -P 0x22 0 3M", "-c", "write -P 0x33 4M 3M", src)
    qcow2(fleece, "8M", "-b", src.name, "-F", "qcow2")
    expected = tmp_path / "expected.raw"
    run("qemu-img", "convert", "-O", "raw", src, expected)
    d = ferrite()
    q = d.connect()
    add(q, "src", src)
    add(q, "fleece", fleece, backing="src")
    src_uri = export(q, d, "src", "src", True)
    r = q.cmd("blockdev-backup", {"job-id": "f", "device": "src", "target": "fleece",
                                  "sync": "none"})
    assert r == {"return": {}}, r
    fleece_uri = export(q, d, "fleece", "fleece", False)
    qemu_io(src_uri, *WRITES)
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", expected, fleece_uri, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # The job runs until cancelled.
    assert q.cmd("query-block-jobs")["return"][0]["status"] == "running"
    assert q.cmd("block-export-del", {"id": "fleece"}) == {"return": {}}
    assert q.cmd("block-job-cancel", {"device": "f"}) == {"return": {}}
    ev = q.wait_event("BLOCK_JOB_CANCELLED")
    assert ev["data"]["type"] == "backup"
    wait_job_gone(q, "f")
    qemu_io(src_uri, *[w.replace("write", "read") for w in WRITES], read_only=True)


def script(tmp):
    """A session of block job verbs and errors; the same on both daemons."""
    return [
        ("blockdev-add", {"node-name": "src", "driver": "qcow2",
                          "file": {"driver": "file", "filename": str(tmp / "src.qcow2")}}),
        ("blockdev-add", {"node-name": "tgt", "driver": "qcow2",
                          "file": {"driver": "file", "filename": str(tmp / "tgt.qcow2")}}),
        ("blockdev-backup", {"device": "src", "target": "tgt", "sync": "full"}),
        ("blockdev-backup", {"job-id": "x", "device": "src", "target": "src", "sync": "full"}),
        ("blockdev-backup", {"job-id": "x", "device": "nope", "target": "src", "sync": "full"}),
        ("blockdev-backup", {"job-id": "x", "device": "src", "target": "tgt",
                             "sync": "incremental"}),
        ("blockdev-backup", {"job-id": "x", "device": "src", "target": "tgt", "sync": "full",
                             "bitmap-mode": "always"}),
        ("blockdev-backup", {"job-id": "x", "device": "src", "target": "tgt", "sync": "full",
                             "bitmap": "b0"}),
        ("blockdev-backup", {"job-id": "j1", "device": "src", "target": "tgt", "sync": "full",
                             "speed": 65536, "auto-finalize": False, "auto-dismiss": False}),
        ("blockdev-backup", {"job-id": "j1", "device": "src", "target": "tgt", "sync": "full"}),
        ("block-job-change", {"id": "j1", "type": "mirror", "copy-mode": "write-blocking"}),
        ("block-job-change", {"id": "nope", "type": "mirror", "copy-mode": "write-blocking"}),
        ("block-job-pause", {"device": "j1"}),
        ("block-job-pause", {"device": "j1"}),
        ("block-job-cancel", {"device": "j1"}),
        ("block-job-complete", {"device": "j1"}),
        ("block-job-set-speed", {"device": "j1", "speed": -1}),
        ("block-job-finalize", {"id": "j1"}),
        ("block-job-dismiss", {"id": "j1"}),
        ("job-dismiss", {"id": "j1"}),
        ("block-job-resume", {"device": "j1"}),
        ("block-job-resume", {"device": "j1"}),
        ("block-job-set-speed", {"device": "j1", "speed": 0}),
    ]


def test_block_job_verbs_and_events_match_qemu(both, tmp_path):
    seen = []
    for d in both():
        qcow2(d.workdir / "src.qcow2", "4M")
        run("qemu-io", "-c", "write -P 1 0 3M", d.workdir / "src.qcow2")
        qcow2(d.workdir / "tgt.qcow2", "4M")
        q = d.connect()
        replies = []
        for name, args in script(d.workdir):
            replies.append(q.cmd(name, args))
            if name == "block-job-pause" and "return" in replies[-1]:
                # A job pauses at its next pause point (at once when it is idle).
                wait_for(lambda: q.cmd("query-block-jobs")["return"][0]["status"] == "paused",
                         what="the job to pause")
        # Pending (auto-finalize off): finalize, then dismiss.
        q.wait_event("BLOCK_JOB_PENDING")
        info = q.cmd("query-block-jobs")["return"]
        for i in info:
            i.pop("offset")
            i.pop("busy")
        replies.append(info)
        replies.append(q.cmd("block-job-dismiss", {"id": "j1"}))
        replies.append(q.cmd("block-job-finalize", {"id": "j1"}))
        replies.append(q.cmd("query-block-jobs"))
        replies.append(q.cmd("job-dismiss", {"id": "j1"}))
        replies.append(q.cmd("query-jobs"))
        events = []
        for e in q.events:
            data = dict(e["data"])
            if e["event"] == "BLOCK_JOB_COMPLETED":
                assert data.pop("offset") == data["len"]
            events.append((e["event"], data))
        seen.append((replies, events))
    theirs, ours = seen
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]


def test_quit_cancels_running_jobs(both):
    seen = []
    for d in both():
        qcow2(d.workdir / "src.qcow2", "4M")
        qcow2(d.workdir / "tgt.qcow2", "4M")
        q = d.connect()
        for name, args in script(d.workdir)[:2]:
            q.cmd(name, args)
        assert q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                         "sync": "none"}) == {"return": {}}
        q.send(b'{"execute": "quit"}')
        msgs = []
        while True:
            m = json.loads(q.recv_raw())
            if "event" in m:
                msgs.append((m["event"], m["data"].get("status")))
            else:
                msgs.append(m)
                break
        # QEMU's drain at exit pauses and resumes the job once more; that artifact aside,
        # the job is cancelled before quit returns.
        seen.append([m for m in msgs
                     if m not in (("JOB_STATUS_CHANGE", "paused"), ("JOB_STATUS_CHANGE", "running"))])
        d.proc.wait(timeout=10)
    theirs, ours = seen
    assert ours == theirs


def incremental_chain(ferrite, tmp_path, size, *writes):
    """A source (with `writes`), a full-backup target and an incremental target backed by
    it, all added to a daemon that exports the source: (daemon, qmp, uri, source, inc)."""
    src, full, inc = tmp_path / "src.qcow2", tmp_path / "full.qcow2", tmp_path / "inc.qcow2"
    qcow2(src, size)
    run("qemu-io", *[a for w in writes for a in ("-c", w)], src)
    qcow2(full, size)
    qcow2(inc, size, "-b", full.name, "-F", "qcow2")
    d = ferrite()
    q = d.connect()
    add(q, "src", src)
    add(q, "full", full)
    add(q, "inc", inc, backing=None)
    return d, q, export(q, d, "src", "src", True), src, inc


def test_incremental_backup_rebased_onto_the_full_reproduces_the_source(ferrite, tmp_path):
    d, q, uri, src, inc = incremental_chain(ferrite, tmp_path, "8M", "write -P 0x22 0 3M",
                                            "write -P 0x33 4M 3M")
    assert q.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"}) == {"return": {}}
    assert q.cmd("blockdev-backup", {"job-id": "f", "device": "src", "target": "full",
                                     "sync": "full"}) == {"return": {}}
    q.wait_event("BLOCK_JOB_COMPLETED")
    wait_job_gone(q, "f")
    qemu_io(uri, "write -P 0x44 100k 8k", "write -P 0x55 5M 1M", "write -z 6M 64k")
    bitmaps = q.cmd("query-named-block-nodes", {"flat": True})["return"]
    count = next(n for n in bitmaps if n["node-name"] == "src")["dirty-bitmaps"][0]["count"]
    assert count == (1 + 16 + 1) * 65536
    assert q.cmd("blockdev-backup", {"job-id": "i", "device": "src", "target": "inc",
                                     "sync": "incremental", "bitmap": "b0"}) == {"return": {}}
    ev = q.wait_event("BLOCK_JOB_COMPLETED")
    assert ev["data"]["len"] == count and "error" not in ev["data"], ev
    wait_job_gone(q, "i")
    bitmaps = q.cmd("query-named-block-nodes", {"flat": True})["return"]
    b0 = next(n for n in bitmaps if n["node-name"] == "src")["dirty-bitmaps"][0]
    assert b0["count"] == 0 and not b0["busy"], b0
    d.stop()
    run("qemu-img", "check", inc)
    # The incremental holds only the changed clusters; over the full it is the source.
    assert run("qemu-img", "map", "--output=json", inc).stdout.count('"depth": 0') >= 1
    r = run("qemu-img", "compare", src, inc, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bitmap_outcomes_match_qemu(both):
    """The user's bitmap after a bitmap backup that succeeds or is cancelled, for each
    bitmap-mode, and the checks on bitmap options."""
    seen = []
    for d in both():
        qcow2(d.workdir / "src.qcow2", "4M")
        q = d.connect()
        for name, args in script(d.workdir)[:1]:
            q.cmd(name, args)
        uri = export(q, d, "src", "src", True)
        out = []
        checks = [
            {"sync": "bitmap", "bitmap": "b0"},
            {"sync": "none", "bitmap": "b0", "bitmap-mode": "always"},
            {"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
            {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
            {"sync": "bitmap", "bitmap": "zz", "bitmap-mode": "always"},
            {"sync": "bitmap"},
            {"sync": "full", "bitmap-mode": "always"},
            # Without a bitmap, the sync mode's need for one is told first (iotest 257).
            {"sync": "bitmap", "bitmap-mode": "never"},
            {"sync": "incremental", "bitmap-mode": "always"},
        ]
        qcow2(d.workdir / "t.qcow2", "4M")
        add(q, "t", d.workdir / "t.qcow2")
        q.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b0"})
        for c in checks:
            out.append(q.cmd("blockdev-backup", dict(c, **{"job-id": "x", "device": "src",
                                                          "target": "t"})))
        q.cmd("block-dirty-bitmap-remove", {"node": "src", "name": "b0"})
        for i, (mode, cancel) in enumerate([(m, c) for m in ("on-success", "never", "always")
                                            for c in (False, True)]):
            tgt = d.workdir / f"t{i}.qcow2"
            qcow2(tgt, "4M")
            add(q, f"t{i}", tgt)
            q.cmd("block-dirty-bitmap-add", {"node": "src", "name": f"b{i}"})
            qemu_io(uri, "write -P 1 0 64k", "write -P 2 1M 192k", "write -P 3 3M 64k")
            out.append(q.cmd("blockdev-backup", {
                "job-id": f"j{i}", "device": "src", "target": f"t{i}", "sync": "bitmap",
                "bitmap": f"b{i}", "bitmap-mode": mode, "speed": 1 if cancel else 0}))
            if cancel:
                qemu_io(uri, "write -P 4 2M 64k", "write -P 5 0 64k")
                out.append(q.cmd("block-dirty-bitmap-remove", {"node": "src", "name": f"b{i}"}))
                out.append(q.cmd("block-job-cancel", {"device": f"j{i}", "force": True}))
            wait_job_gone(q, f"j{i}")
            nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
            out.append(next(n for n in nodes if n["node-name"] == "src")["dirty-bitmaps"])
            out.append(q.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "src",
                                                                    "name": f"b{i}"}))
            q.cmd("block-dirty-bitmap-remove", {"node": "src", "name": f"b{i}"})
        seen.append(out)
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


@pytest.mark.parametrize("policy", ["report", "stop", "enospc", "ignore"])
def test_target_errors_follow_the_policy_like_qemu(both, tmp_path, policy):
    """A target on a full filesystem: BLOCK_JOB_ERROR, then the job fails (report), or
    pauses with io-status nospace (stop, enospc) or retries (ignore) until there is room."""
    seen = []
    mounts = []
    try:
        for d in both():
            q = full_source_and_small_target(d, mounts)
            src, fs = d.workdir / "src.qcow2", mounts[-1]
            out = [q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                             "sync": "full", "on-target-error": policy})]
            err = q.wait_event("BLOCK_JOB_ERROR")["data"]
            out.append(err)
            if policy in ("stop", "enospc"):
                wait_for(lambda: q.cmd("query-block-jobs")["return"][0]["status"] == "paused",
                         what="the job to stop")
                info = q.cmd("query-block-jobs")["return"][0]
                out.append((info["status"], info["io-status"], info["paused"]))
            if policy != "report":
                run("mount", "-o", "remount,size=64M", fs)
                if policy != "ignore":
                    out.append(q.cmd("block-job-resume", {"device": "b"}))
            end = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
            out.append((end.get("error"), end["offset"] == end["len"]))
            wait_job_gone(q, "b")
            d.stop()
            if policy != "report":
                r = run("qemu-img", "compare", src, fs / "tgt.qcow2", check=False)
                out.append(r.returncode)
            seen.append(out)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
    theirs, ours = seen
    assert ours == theirs


def test_drive_backup_matches_qemu(both):
    """drive-backup creates the target (backed by the source for none; by the source's
    backing file for top, which falls back to full without one), and drops its node at the
    end; compared with qemu-storage-daemon."""
    import re
    seen = []
    for d in both():
        w = d.workdir
        qcow2(w / "s.qcow2", "4M")
        run("qemu-io", "-c", "write -P 1 0 1M", w / "s.qcow2")
        q = d.connect()
        add(q, "src", w / "s.qcow2")
        out = []
        for i, extra in enumerate([{"sync": "full"}, {"sync": "none"}, {"sync": "top"},
                                   {"sync": "full", "mode": "existing"},
                                   {"sync": "full", "format": "raw"},
                                   {"sync": "full", "format": "file"}]):
            target = str(w / (f"d{i}.raw" if extra.get("format") else f"d{i}.qcow2"))
            out.append(q.cmd("drive-backup", dict(extra, **{"job-id": f"d{i}", "device": "src",
                                                            "target": target})))
        for i in (0, 2, 4, 5):
            wait_job_gone(q, f"d{i}")
        # Only the fleecing job (none) runs on: its target and filter are in the graph.
        nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append(sorted((n["drv"], n["image"]["filename"], n.get("backing_file"))
                          for n in nodes))
        q.cmd("block-job-cancel", {"device": "d1"})
        wait_job_gone(q, "d1")
        out.append(q.cmd("query-named-block-nodes", {"flat": True})["return"])
        seq = {}
        for e in q.events:
            data = e["data"]
            seq.setdefault(data.get("id") or data.get("device"), []).append(
                (e["event"], data.get("status"), data.get("len"), data.get("error")))
        for job in seq:
            seq[job] = [x for x in seq[job] if x[1] not in ("paused", "running")]
        out.append(seq)
        d.stop()
        for i in (0, 2):
            r = run("qemu-img", "compare", w / "s.qcow2", w / f"d{i}.qcow2", check=False)
            out.append(r.returncode)
        r = run("qemu-img", "compare", w / "s.qcow2", w / "d4.raw", check=False)
        out.append(r.returncode)
        info = json.loads(run("qemu-img", "info", "--output=json", w / "d1.qcow2").stdout)
        out.append(info.get("backing-filename"))
        text = re.sub(r"#block\d+", "#block", json.dumps(out).replace(str(w), "W"))
        seen.append(json.loads(re.sub(r'"actual-size": \d+', '"actual-size": 0', text)))
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


def test_drive_backup_to_an_existing_image_probes_its_format(both):
    """drive-backup with mode=existing and no format opens the target as what it is, not as
    the source's format: a raw source backs up compressed into an existing qcow2 image
    (iotest 055 with raw images). Compared with qemu-storage-daemon."""
    seen = []
    for d in both():
        w = d.workdir
        run("qemu-img", "create", "-q", "-f", "raw", w / "s.raw", "4M")
        run("qemu-io", "-f", "raw", "-c", "write -P 7 64k 1M", w / "s.raw")
        qcow2(w / "t.qcow2", "4M")
        q = d.connect()
        assert q.cmd("blockdev-add", {"driver": "raw", "node-name": "src", "file": {
            "driver": "file", "filename": str(w / "s.raw")}}) == {"return": {}}
        out = [q.cmd("drive-backup", {"job-id": "b", "device": "src", "sync": "full",
                                      "compress": True, "mode": "existing",
                                      "target": str(w / "t.qcow2")})]
        wait_job_gone(q, "b")
        out.append([(e["event"], e["data"].get("error")) for e in q.events
                    if e["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")])
        out.append(q.cmd("drive-backup", {"job-id": "c", "device": "src", "sync": "full",
                                          "mode": "existing", "target": str(w / "none.qcow2")}))
        d.stop()
        out.append(run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", w / "s.raw",
                       w / "t.qcow2", check=False).returncode)
        info = json.loads(run("qemu-img", "check", "--output=json", w / "t.qcow2").stdout)
        out.append(info.get("compressed-clusters", 0) > 0)
        seen.append(json.loads(json.dumps(out).replace(str(w), "W")))
    theirs, ours = seen
    assert ours == theirs


def test_speed_holds_the_rate(both):
    """A 16 MiB backup at 8 MiB/s takes about two seconds in either program, and the job's
    offset grows at that rate meanwhile (block-job-set-speed changes it on the fly)."""
    took = []
    for d in both():
        src, tgt = d.workdir / "src.qcow2", d.workdir / "tgt.qcow2"
        qcow2(src, "16M")
        run("qemu-io", "-c", "write -P 0x22 0 16M", src)
        qcow2(tgt, "16M")
        q = d.connect()
        add(q, "src", src)
        add(q, "tgt", tgt)
        start = time.monotonic()
        r = q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                      "sync": "full", "speed": 8 << 20})
        assert r == {"return": {}}, r
        time.sleep(1)
        offset = q.cmd("query-block-jobs")["return"][0]["offset"]
        assert 6 << 20 <= offset <= 11 << 20, (d.workdir.name, offset)
        q.wait_event("BLOCK_JOB_COMPLETED")
        took.append(time.monotonic() - start)
    for t in took:
        assert 1.6 < t < 2.6, took


def test_drains_pause_a_running_backup_like_qemu(both):
    """A rate-limited backup of an exported source while a client writes through the export:
    transactions drain the source, and the job pauses and resumes for each, with the same
    events as in qemu-storage-daemon; the target still ends up as the point in time."""
    seen = []
    for d in both():
        w = d.workdir
        qcow2(w / "src.qcow2", "8M")
        run("qemu-io", "-c", "write -P 0x22 0 8M", w / "src.qcow2")
        expected = w / "expected.raw"
        run("qemu-img", "convert", "-O", "raw", w / "src.qcow2", expected)
        qcow2(w / "tgt.qcow2", "8M")
        q = d.connect()
        add(q, "src", w / "src.qcow2")
        add(q, "tgt", w / "tgt.qcow2")
        uri = export(q, d, "src", "src", True)
        out = [q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                         "sync": "full", "speed": 2 << 20})]
        writer = subprocess.Popen(
            ["qemu-io", "-f", "raw", *[a for i in range(64)
                                       for a in ("-c", f"write -P {i + 1} {i * 128}k 4k")],
             uri], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in range(3):
            out.append(q.cmd("transaction", {"actions": [{
                "type": "block-dirty-bitmap-add", "data": {"node": "src", "name": f"b{i}"}}]}))
        assert writer.wait(timeout=60) == 0
        out.append(q.cmd("block-job-set-speed", {"device": "j", "speed": 0}))
        wait_job_gone(q, "j")
        out.append([(e["event"], e["data"].get("status")) for e in q.events
                    if e["event"] in ("JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED")])
        d.stop()
        r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", expected, w / "tgt.qcow2",
                check=False)
        out.append(r.returncode)
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs


def test_filters_come_and_go_under_verified_client_io(ferrite, tmp_path):
    """A client writes and reads back patterns through an export while backups put their
    copy-before-write filter above the source and take it out again, one after the other:
    every read sees the write before it, and the source ends with every pattern in place."""
    src = tmp_path / "src.qcow2"
    qcow2(src, "16M")
    d = ferrite()
    q = d.connect()
    add(q, "src", src)
    uri = export(q, d, "src", "src", True)
    ops = []
    for i in range(2000):
        off = (i % 64) * 256 * 1024
        ops += [f"write -P {(i % 250) + 1} {off} 64k", f"read -P {(i % 250) + 1} {off} 64k"]
    client = subprocess.Popen(["qemu-io", "-f", "raw", *[a for o in ops for a in ("-c", o)],
                               uri], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    backups = 0
    while client.poll() is None and backups < 40:
        tgt = tmp_path / f"t{backups}.qcow2"
        qcow2(tgt, "16M")
        add(q, f"t{backups}", tgt)
        r = q.cmd("blockdev-backup", {"job-id": f"j{backups}", "device": "src",
                                      "target": f"t{backups}", "sync": "full"})
        assert r == {"return": {}}, r
        wait_job_gone(q, f"j{backups}")
        assert q.cmd("blockdev-del", {"node-name": f"t{backups}"}) == {"return": {}}
        backups += 1
    output, _ = client.communicate(timeout=120)
    assert client.returncode == 0, output
    assert "failed" not in output and "Pattern verification" not in output, output
    assert backups >= 5, f"the client finished after {backups} backups"
    # The last write to each region is what it holds.
    last = {}
    for i in range(2000):
        last[(i % 64) * 256 * 1024] = (i % 250) + 1
    qemu_io(uri, *[f"read -P {p} {off} 64k" for off, p in sorted(last.items())],
            read_only=True)
    nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
    assert sorted(n["node-name"] for n in nodes if not n["node-name"].startswith("#")) == ["src"]
    d.stop()
    run("qemu-img", "check", src)


def test_block_graph_shows_the_job_like_qemu(both):
    """x-debug-query-block-graph during a backup: the export's backend above the
    copy-before-write filter, the job's own vertex with its 'main node' and 'target' edges,
    and every permission, as qemu-storage-daemon shows them."""
    import re
    seen = []
    for d in both():
        w = d.workdir
        qcow2(w / "src.qcow2", "4M")
        qcow2(w / "tgt.qcow2", "4M")
        q = d.connect()
        add(q, "src", w / "src.qcow2")
        add(q, "tgt", w / "tgt.qcow2")
        export(q, d, "src", "src", True)
        assert q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                         "sync": "none"}) == {"return": {}}
        graph = q.cmd("x-debug-query-block-graph")["return"]
        q.cmd("block-job-cancel", {"device": "j"})
        wait_job_gone(q, "j")
        after = q.cmd("x-debug-query-block-graph")["return"]
        seen.append(re.sub(r"#block\d+", "#block", json.dumps([graph, after], sort_keys=True)))
    theirs, ours = seen
    assert ours == theirs


def test_images_a_command_makes_are_announced_as_qsd_announces_them(both):
    """drive-backup, drive-mirror and blockdev-snapshot-sync say "Formatting 'FILE', fmt=..."
    on standard output for each image they make, with the format's creation options."""
    seen = []
    for d in both():
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "sb.qcow2"), "1M"],
                       check=True)
        q = d.connect()
        q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q",
                               "file": {"driver": "file", "filename": str(w / "sb.qcow2")}})
        out = [q.cmd("drive-backup", {"job-id": "b", "device": "q", "sync": "full",
                                      "target": str(w / "bk.raw"), "format": "raw"})]
        wait_job_gone(q, "b")
        out.append(q.cmd("drive-backup", {"job-id": "b2", "device": "q", "sync": "top",
                                          "target": str(w / "bk.qcow2")}))
        wait_job_gone(q, "b2")
        out.append(q.cmd("drive-mirror", {"job-id": "m", "device": "q", "sync": "full",
                                          "target": str(w / "mi.qcow2")}))
        q.wait_event("BLOCK_JOB_READY")
        q.cmd("block-job-cancel", {"device": "m"})
        wait_job_gone(q, "m")
        out.append(q.cmd("blockdev-snapshot-sync", {"node-name": "q", "snapshot-node-name": "o",
                                                    "snapshot-file": str(w / "ov.qcow2")}))
        d.stop()
        out.append(d.stdout_path.read_text().replace(str(w), "W").splitlines())
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    assert len(ours[-1]) == 4


def test_a_read_error_fails_only_the_extent_it_hits_like_qsd(both):
    """Each copy stops where the source's mapping does (QEMU's block-copy asks block status
    first): on an image whose clusters lie out of order in the file, a read error on the
    second read leaves the first extent copied, and the job's offset says so (iotest 257)."""
    seen = []
    for d in both():
        w = d.workdir
        img = w / "src.qcow2"
        qcow2(img, "4M")
        # Guest clusters 1, 0, then 2-3: three host runs in the first megabyte.
        run("qemu-io", "-c", "write -P 1 64k 64k", "-c", "write -P 2 0 64k",
            "-c", "write -P 3 128k 128k", img)
        qcow2(w / "tgt.qcow2", "4M")
        q = d.connect()
        q.cmd("blockdev-add", {
            "node-name": "src", "driver": "qcow2", "file": {
                "driver": "blkdebug",
                "set-state": [{"event": "read_aio", "state": 1, "new_state": 2}],
                "inject-error": [{"event": "read_aio", "state": 2, "errno": 5,
                                  "once": True}],
                "image": {"driver": "file", "filename": str(img)}}})
        add(q, "tgt", w / "tgt.qcow2", backing=None)
        q.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                  "sync": "full", "x-perf": {"max-workers": 1}})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        del ev["timestamp"]
        seen.append(ev)
    theirs, ours = seen
    assert ours == theirs
    assert theirs["data"]["offset"] == 65536 and "error" in theirs["data"]


def test_a_paused_backup_copies_nothing_more_like_qemu(both):
    """iotest 055's pause check: a rate-limited backup asked to pause, then unlimited, stops
    (paused and not busy) only once what it had in flight has landed, so its offset stands
    still until it is resumed (ferrite pauses inside its rate-limit wait with chunks still in flight; their
    progress no longer moves the offset of a paused job)."""
    for d in both():
        w = d.workdir
        q = source_and_target(d, "64M", "-P 0x5a 0 64M")
        add(q, "tgt", w / "tgt.qcow2")
        assert q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                         "sync": "full", "speed": 64 * 1024}) == {"return": {}}
        assert q.cmd("block-job-pause", {"device": "j"}) == {"return": {}}
        assert q.cmd("block-job-set-speed", {"device": "j", "speed": 0}) == {"return": {}}
        # Paused, and no longer busy: iotests' pause_wait.
        wait_for(lambda: (lambda j: j["paused"] and not j["busy"])(
            q.cmd("query-block-jobs")["return"][0]), what="paused")
        offsets = []
        for _ in range(5):
            offsets.append(q.cmd("query-block-jobs")["return"][0]["offset"])
            time.sleep(0.1)
        assert len(set(offsets)) == 1, (d.binary, offsets)
        assert q.cmd("block-job-resume", {"device": "j"}) == {"return": {}}
        wait_job_gone(q, "j")
        d.stop()


def test_compressed_backup_needs_a_target_that_stores_compressed_clusters_like_qsd(both):
    """blockdev-backup with compress: refused for a target whose driver cannot store
    compressed clusters (a file, raw over qcow2, the compress filter: QEMU's text, with
    the target's device name, empty for a node), taken through filters that pass compressed
    writes on to a qcow2 image (throttle, copy-on-read), whose clusters then are
    compressed (qemu-img check's figures)."""
    seen = []
    for d in both():
        w = d.workdir
        qcow2(w / "s.qcow2", "4M")
        run("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 512k", w / "s.qcow2")
        q = d.connect()
        add(q, "src", w / "s.qcow2")
        out = []
        q.cmd("object-add", {"qom-type": "throttle-group", "id": "g", "limits": {}})
        targets = {}
        for name, wrap in [("file", None), ("raw", "raw"), ("throttle", "throttle"),
                           ("cor", "copy-on-read"), ("compress", "compress"), ("qcow2", "")]:
            img = w / f"t-{name}.qcow2"
            if name == "file":
                run("qemu-img", "create", "-q", "-f", "raw", img, "4M")
                out.append(q.cmd("blockdev-add", {"driver": "file", "node-name": "t-file",
                                                  "filename": str(img)}))
            else:
                qcow2(img, "4M")
                add(q, f"q-{name}", img)
                if wrap:
                    opts = {"driver": wrap, "node-name": f"t-{name}", "file": f"q-{name}"}
                    if wrap == "throttle":
                        opts["throttle-group"] = "g"
                    out.append(q.cmd("blockdev-add", opts))
            targets[name] = img
            node = f"t-{name}" if name == "file" or wrap else f"q-{name}"
            r = q.cmd("blockdev-backup", {"job-id": f"j-{name}", "device": "src",
                                          "target": node, "sync": "full", "compress": True})
            out.append((name, r))
            if "return" in r:
                wait_job_gone(q, f"j-{name}")
        for name in ("throttle", "cor", "qcow2"):
            q.cmd("blockdev-del", {"node-name": f"t-{name}"}) if name != "qcow2" else None
            q.cmd("blockdev-del", {"node-name": f"q-{name}"})
            check = run("qemu-img", "check", targets[name]).stdout
            out.append((name, [line for line in check.splitlines() if "clusters" in line],
                        run("qemu-img", "compare", w / "s.qcow2", targets[name],
                            check=False).returncode))
        seen.append(out)
        d.stop()
    theirs, ours = seen
    assert ("file", {"error": {"class": "GenericError",
                               "desc": "Compression is not supported for this drive "}}) in theirs
    assert any("compressed" in line for line in theirs[-1][1])
    assert ours == theirs


def test_backup_ends_without_flushing_its_target(both):
    """QEMU's backup does not flush its target when it ends (a target the user added is
    flushed when the user closes it): a target whose flushes fail still completes, as
    qemu-storage-daemon's does. ferrite flushed, so the job failed, and each backup waited
    for the page cache to reach the disk."""
    def scenario(d):
        w = d.workdir
        q = source_and_target(d, "1M", "0 512k")
        r = q.cmd("blockdev-add", {
            "driver": "qcow2", "node-name": "tgt",
            "file": {"driver": "blkdebug",
                     "inject-error": [{"event": "flush_to_disk", "errno": 5}],
                     "image": {"driver": "file", "filename": str(w / "tgt.qcow2")}}})
        assert r == {"return": {}}, r
        r = q.cmd("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                      "sync": "full"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        q.close()
        return r, ev["data"]

    qsd, ferrite = both()
    expected = scenario(qsd)
    assert "error" not in expected[1]
    assert scenario(ferrite) == expected
