"""The `quorum` driver against qemu-storage-daemon: its option checks, reads voted on over
three children (a corrupted child reported with QUORUM_REPORT_BAD, rewritten with
`rewrite-corrupted`; no majority is QUORUM_FAILURE and EIO), writes to every child, and
`read-pattern=fifo`."""
import json
import subprocess
import time

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder


def child(i):
    return {"driver": "raw", "node-name": f"c{i}",
            "file": {"driver": "file", "filename": f"c{i}.img", "locking": "off"}}


def corrupt(d, i, pattern, offset="1M", length="64k"):
    """Changes child i's file behind the daemon's back."""
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                    str(d.workdir / f"c{i}.img")], check=True, capture_output=True)


def io(uri, *ops):
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [uri], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln]


def events(c, name):
    found = [e["data"] for e in c.events if e["event"] == name]
    c.events = [e for e in c.events if e["event"] != name]
    return found


def children_with_data(w):
    """Three 4 MiB raw children, each all 0x5a (data, not holes: an NBD server reads no
    hole)."""
    for i in range(3):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / f"c{i}.img"), "4M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M",
                        str(w / f"c{i}.img")], check=True, capture_output=True)


def transcript(d):
    w = d.workdir
    children_with_data(w)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    kids = [child(i) for i in range(3)]
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "children": []})
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 0,
                         "children": kids})
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 4,
                         "children": kids})
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "blkverify": True, "children": kids})
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "children": kids[:2], "blkverify": True, "rewrite-corrupted": True})
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "rewrite-corrupted": True, "children": kids})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(w), "W")
    out.append(("nodes", sorted((n["node-name"], n["drv"], n["image"]["virtual-size"])
                                for n in json.loads(text)
                                if not n["node-name"].startswith("#"))))
    uri = export(c, d, "q", "q", True)
    # No one else may write to or resize a child; reading it is fine.
    cmd("block-export-add", {"type": "nbd", "id": "w0", "node-name": "c0", "writable": True})
    cmd("block_resize", {"node-name": "c1", "size": 8 << 20})
    cmd("block-export-add", {"type": "nbd", "id": "r0", "node-name": "c0"})
    cmd("block-export-del", {"id": "r0"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    out.append(("read", io(uri, "read -P 0x5a 0 64k")))
    out.append(("write", io(uri, "write -P 0x61 2M 64k")))
    out.append(("children", [io(f"{w}/c{i}.img", "read -P 0x61 2M 64k") for i in range(3)]))
    # One child disagrees: the majority wins, the child is reported and rewritten.
    corrupt(d, 2, "0x13")
    out.append(("outvoted", io(uri, "read -P 0x5a 1M 64k")))
    c.cmd("query-version")
    out.append(("bad", events(c, "QUORUM_REPORT_BAD")))
    out.append(("rewritten", io(f"{w}/c2.img", "read -P 0x5a 1M 64k")))
    # No two agree: the read fails.
    corrupt(d, 1, "0x14")
    corrupt(d, 2, "0x15")
    out.append(("no majority", io(uri, "read 1M 64k")))
    c.cmd("query-version")
    out.append(("failure", events(c, "QUORUM_FAILURE")))
    out.append(("bad2", events(c, "QUORUM_REPORT_BAD")))
    cmd("block-export-del", {"id": "q", "mode": "hard"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    # Children removed and added (x-blockdev-change), down to the vote threshold.
    cmd("blockdev-add", child(3) | {"node-name": "c3", "file": {
        "driver": "file", "filename": "c0.img", "locking": "off"}})
    cmd("x-blockdev-change", {"parent": "q", "child": "children.2"})
    cmd("x-blockdev-change", {"parent": "q", "child": "children.1"})
    cmd("x-blockdev-change", {"parent": "q", "child": "children.7"})
    cmd("x-blockdev-change", {"parent": "q", "node": "c3"})
    cmd("x-blockdev-change", {"parent": "q", "child": "children.0"})
    cmd("x-blockdev-change", {"parent": "c0", "node": "c3"})
    g = c.cmd("x-debug-query-block-graph")["return"]
    names = {n["id"]: n["name"] for n in g["nodes"]}
    out.append(("edges", sorted((names[e["parent"]], e["name"], names[e["child"]])
                                for e in g["edges"] if names[e["parent"]] == "q")))
    # Its `json:` name lists the children in order, without the gaps of their names.
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    out.append(("json", [n["file"].replace(str(w), "W") for n in nodes
                         if n["node-name"] == "q"]))
    out.append(("after change", io(export(c, d, "q", "q2", True), "read -P 0x5a 0 64k")))
    cmd("block-export-del", {"id": "q2", "mode": "hard"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    cmd("blockdev-del", {"node-name": "q"})
    # fifo: the first child that answers.
    cmd("blockdev-add", {"driver": "quorum", "node-name": "f", "vote-threshold": 1,
                         "read-pattern": "fifo", "children": [child(i) for i in (1, 0)]})
    uri = export(c, d, "f", "f", True)
    out.append(("fifo", io(uri, "read -P 0x14 1M 64k")))
    c.close()
    d.stop()
    return out


def test_quorum_matches_qsd(both):
    q, f = both()
    assert_same_transcript(transcript(q), transcript(f))


def repair(d, other_user):
    """A mirror from a quorum replaces one of its children on completion (QEMU's way to
    repair a broken child); with another user of that child added meanwhile it can no
    longer, says so on stderr, and the job fails."""
    w = d.workdir
    for i in range(3):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / f"c{i}.img"), "4M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 5 0 1M", str(w / f"c{i}.img")],
                       check=True, capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "new.img"), "4M"],
                   check=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "children": [child(i) for i in range(3)]})
    cmd("blockdev-add", {"driver": "raw", "node-name": "repair",
                         "file": {"driver": "file", "filename": "new.img"}})
    cmd("blockdev-mirror", {"job-id": "m", "device": "q", "target": "repair",
                            "sync": "full", "replaces": "c0"})
    cmd("blockdev-mirror", {"job-id": "m2", "device": "q", "target": "repair",
                            "sync": "full", "replaces": "nosuch"})
    c.wait_event("BLOCK_JOB_READY")
    if other_user:
        cmd("nbd-server-start", {"addr": {"type": "unix",
                                          "data": {"path": str(w / "nbd.sock")}}})
        cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "c0"})
    cmd("block-job-complete", {"device": "m"})
    done = c.wait_event("BLOCK_JOB_COMPLETED")
    out.append(("completed", done["data"].get("error")))
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    out.append(("nodes", sorted("#" if n["node-name"].startswith("#") else n["node-name"]
                                for n in nodes)))
    graph = c.cmd("x-debug-query-block-graph")["return"]
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    out.append(("quorum edges", sorted((e["name"], names[e["child"]]) for e in graph["edges"]
                                       if names[e["parent"]] == "q")))
    c.close()
    d.stop()
    stderr = d.stderr_path.read_text()
    out.append(("stderr", [ln.split(": ", 1)[1] for ln in stderr.splitlines()
                           if "replace" in ln]))
    return out


def test_repairing_a_quorum_child_matches_qsd(both):
    for other_user in (False, True):
        q, f = both()
        assert_same_transcript(repair(q, other_user), repair(f, other_user))


def test_block_status_of_a_quorum_matches_qsd(both):
    """A quorum reports data where any child holds data and zeroes where all read zeroes,
    so a mirror of it skips what is zero (iotest 312): `qemu-img map` over an NBD export."""
    writes = [  # (child, qemu-io command)
        (0, "write -P 1 64k 64k"), (1, "write -P 1 64k 192k"),
        (0, "write -z 1M 64k"), (1, "write -z 1M 192k"), (2, "write -z 1M 128k"),
        (0, "write -P 0 2M 64k"), (1, "write -z 2M 192k"), (2, "write -P 0 2M 128k"),
    ]
    seen = []
    for d in both():
        w = d.workdir
        for i in range(3):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / f"c{i}.qcow2"),
                            "4M"], check=True)
        for i, op in writes:
            subprocess.run(["qemu-io", "-c", op, str(w / f"c{i}.qcow2")], check=True,
                           capture_output=True)
        c = d.connect()
        assert c.cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                                      "children": [{"driver": "qcow2", "file": {
                                          "driver": "file", "filename": f"c{i}.qcow2"}}
                                          for i in range(3)]}) == {"return": {}}
        uri = export(c, d, "q", "q", False)
        r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                           capture_output=True, text=True, check=True)
        seen.append([(e["start"], e["length"], e["data"], e["zero"])
                     for e in json.loads(r.stdout)])
        c.close()
    assert seen[1] == seen[0]


def rate_limit(d):
    """QUORUM_REPORT_BAD goes out at most once a second per child: errors in a burst give
    one event at once and the last one held back a second later; another child's error is
    not held back by the first's."""
    children_with_data(d.workdir)
    c = d.connect()
    out = []
    cmd = recorder(c, out)

    def failing(i, sector):
        return {"driver": "raw", "node-name": f"c{i}",
                "file": {"driver": "blkdebug",
                         "inject-error": [{"event": "read_aio", "errno": 5,
                                           "sector": sector}],
                         "image": {"driver": "file", "filename": f"c{i}.img"}}}
    cmd("blockdev-add", {"driver": "quorum", "node-name": "q", "vote-threshold": 2,
                         "children": [failing(0, 2048), failing(1, 4096), child(2)]})
    uri = export(c, d, "q", "q", True)

    def bad():
        c.cmd("query-version")
        return [(e["node-name"], e["sector-num"]) for e in events(c, "QUORUM_REPORT_BAD")]
    out.append(("burst", io(uri, *["read 1M 512"] * 4)))
    out.append(("at once", bad()))
    out.append(("other child", io(uri, "read 2M 512")))
    out.append(("not held back", bad()))
    time.sleep(1.5)
    out.append(("held back one", bad()))
    time.sleep(1.2)
    out.append(("nothing more", bad()))
    out.append(("a second later", io(uri, "read 1M 512")))
    out.append(("at once again", bad()))
    c.close()
    d.stop()
    return out


def test_report_bad_is_rate_limited_as_qsd(both):
    q, f = both()
    assert_same_transcript(rate_limit(q), rate_limit(f))
