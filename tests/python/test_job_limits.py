"""Jobs held back by limits, against qemu-storage-daemon: a slow stream waits after its
first chunk (the chunk just moved counts against the speed), and `quit` ends a mirror that
reads through a throttled node at once (the daemon drains before it cancels jobs)."""
import json
import subprocess
import time

from conftest import normalize


def test_slow_stream_stops_after_its_first_chunk(both):
    def scenario(d):
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "base.img"), "1M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", str(w / "base.img")],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(w / "base.img"),
                        "-F", "qcow2", str(w / "top.img")], check=True)
        c = d.connect()
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "drv0",
                               "file": {"driver": "file", "filename": str(w / "top.img")}})
        r = [c.cmd("block-stream", {"device": "drv0", "job-id": "job0", "speed": 1})]
        time.sleep(0.3)
        r.append(c.cmd("blockdev-del", {"node-name": "drv0"}))
        r.append(c.cmd("block-job-cancel", {"device": "job0"}))
        ev = c.wait_event("BLOCK_JOB_CANCELLED")
        r.append({k: v for k, v in ev.items() if k != "timestamp"})
        c.close()
        return [normalize(str(x)) for x in r]

    q, f = both()
    expected = scenario(q)
    assert "'offset': 524288" in expected[-1]
    assert scenario(f) == expected


def test_quit_ends_a_mirror_reading_through_a_throttled_node(both):
    def scenario(d):
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "src.img"), "64M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 42 0 64M",
                        str(w / "src.img")], check=True, capture_output=True)
        c = d.connect()
        c.cmd("object-add", {"qom-type": "throttle-group", "id": "tg",
                             "limits": {"bps-read": 4096}})
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "source",
                               "file": {"driver": "file", "filename": str(w / "src.img")}})
        c.cmd("blockdev-add", {"driver": "throttle", "node-name": "throttled-source",
                               "throttle-group": "tg", "file": "source"})
        c.cmd("blockdev-add", {"driver": "null-co", "node-name": "target",
                               "size": 64 << 20})
        c.cmd("blockdev-mirror", {"job-id": "mirror", "device": "throttled-source",
                                  "target": "target", "sync": "full"})
        started = time.monotonic()
        r = c.cmd("quit")
        d.proc.wait(10)
        return r, d.proc.returncode, time.monotonic() - started < 5

    q, f = both()
    expected = scenario(q)
    assert expected == ({"return": {}}, 0, True)
    assert scenario(f) == expected


def _backing_chain(w, size="40M"):
    """base.img with 64 KiB of data at 0, top.img over it with 64 KiB at 1 MiB, and an
    empty target: three extents of the source's block status in its first 2 MiB."""
    for args in (["create", "-q", "-f", "qcow2", str(w / "base.img"), size],
                 ["create", "-q", "-f", "qcow2", "-b", str(w / "base.img"), "-F", "qcow2",
                  str(w / "top.img"), size],
                 ["create", "-q", "-f", "qcow2", str(w / "tgt.img"), size]):
        subprocess.run(["qemu-img", *args], check=True)
    for img, at in (("base.img", 0), ("top.img", 1 << 20)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write {at} 64k", str(w / img)],
                       check=True, capture_output=True)


def _job_transcript(d, job_cmd):
    """`job_cmd` and `query-jobs` sent in one write, then `query-jobs` again 0.5 s later and
    the job cancelled: the replies, then the BLOCK_JOB_* events without timestamps."""
    w = d.workdir
    _backing_chain(w)
    c = d.connect()
    for node, img in (("src", "top.img"), ("tgt", "tgt.img")):
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": node,
                               "file": {"driver": "file", "filename": str(w / img)}})
    c.cmd("block-dirty-bitmap-add", {"node": "src", "name": "b"})
    lines = c.transcript(json.dumps(job_cmd).encode() + b'{"execute":"query-jobs"}')
    time.sleep(0.5)
    lines += c.transcript(b'{"execute":"query-jobs"}'
                          b'{"execute":"block-job-cancel","arguments":{"device":"j"}}')
    time.sleep(0.3)
    lines += c.transcript(b'{"execute":"query-jobs"}')
    c.close()
    msgs = [json.loads(x) for x in lines]
    # QEMU runs a job with nothing to copy to its end inside the command (the command's
    # drained section polls its event loop), so its events may come before the command's
    # reply: replies and events are compared each in their own order.
    replies = [m for m in msgs if "event" not in m]
    events = [{k: v for k, v in m.items() if k != "timestamp"} for m in msgs
              if m.get("event", "").startswith("BLOCK_JOB_")]
    return [normalize(json.dumps(m)) for m in replies + events]


def test_jobs_at_speed_one_start_and_move_as_qemus(both):
    """What a slow job shows right after its command and half a second later: a backup's
    total is known at once, its first request is one extent of the source (64 KiB here, not
    a megabyte), a backup with nothing to copy is over before the next command, and a
    mirror issues a whole buffer's worth of chunks before its rate limit sleeps."""
    q, f = both()
    for job in ({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"},
                {"job-id": "j", "device": "src", "target": "tgt", "sync": "none"},
                {"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap",
                 "bitmap": "b", "bitmap-mode": "always"}):
        cmd = {"execute": "blockdev-backup", "arguments": dict(job, speed=1)}
        expected = _job_transcript(q, cmd)
        assert _job_transcript(f, cmd) == expected, job
        q, f = both()
    cmd = {"execute": "blockdev-mirror",
           "arguments": {"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                         "speed": 1}}
    expected = _job_transcript(q, cmd)
    assert '"current-progress": 16777216' in expected[3]
    got = _job_transcript(f, cmd)
    # Left out: how far the mirror got before the first query-jobs, which is timing (QEMU's
    # first block-status read of the qcow2 metadata yields to its thread pool; ferrite's
    # copies, started before that query, may have landed already on a busy machine).
    assert got[:1] + got[2:] == expected[:1] + expected[2:]


def test_a_backup_task_takes_the_whole_clusters_of_a_data_extent_like_qsd(both):
    """A copy task covers the source's data extent rounded down to whole clusters (one
    cluster if shorter, all of them where it reaches the end): a slow backup of a file whose
    data ends 8 bytes into its fourth cluster (where the file ends) copies three clusters at once, then waits for
    the rate limit before the last (qsd seed 866 of the system differential)."""
    seen = []
    for d in both():
        src = d.workdir / "src.raw"
        # A node's length is whole sectors: the 504 bytes after the file's end read as
        # zeroes, an extent of their own.
        src.write_bytes(b"\x5a" * (3 * 65536 + 8))
        q = d.connect()
        assert q.cmd("blockdev-add", {"driver": "file", "node-name": "src",
                                      "filename": str(src)}) == {"return": {}}
        assert q.cmd("drive-backup", {"job-id": "j", "device": "src", "sync": "full",
                                      "speed": 512, "target": str(d.workdir / "t.raw")}) \
            == {"return": {}}
        time.sleep(1)
        assert q.cmd("block-job-cancel", {"device": "j"}) == {"return": {}}
        ev = q.wait_event("BLOCK_JOB_CANCELLED")
        seen.append((ev["data"]["offset"], ev["data"]["len"]))
    theirs, ours = seen
    assert ours == theirs == (3 * 65536, 4 * 65536)
