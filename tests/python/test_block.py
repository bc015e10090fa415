"""Block graph QMP commands, compared with qemu-storage-daemon."""
import json
import os
import re
import subprocess

import pytest

from conftest import normalize, replies


def image(tmp, name="img.raw", size="1M"):
    path = os.path.join(tmp, name)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", path, size], check=True)
    return path


def seq_for(img):
    return [
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1048576}),
        ("blockdev-add", {"driver": "null-aio", "node-name": "n1", "read-zeroes": True}),
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": img}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "file": "f0", "offset": 4096, "size": 8192}),
        ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": "f0", "offset": 99999999}),
        ("blockdev-add", {"driver": "raw", "node-name": "r3", "file": "f0", "offset": 4096, "size": 1048576}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "1n"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n" * 40}),
        ("blockdev-add", {"driver": "null-co"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n9", "size": "x"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n9", "bogus": 1}),
        ("blockdev-add", {"driver": "nope", "node-name": "n9"}),
        ("blockdev-add", {"driver": "file", "node-name": "f9", "filename": "/nonexistent"}),
        ("blockdev-add", {"driver": "file", "node-name": "f9", "filename": img, "aio": "native"}),
        ("blockdev-add", {"driver": "file", "node-name": "f9", "filename": img,
                          "detect-zeroes": "unmap"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r9", "file": "nope"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r9", "file": 5}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "nope"}),
        ("block-set-write-threshold", {"node-name": "nope", "write-threshold": 1}),
        ("block-set-write-threshold", {"node-name": "f0", "write-threshold": 4096}),
        ("block_resize", {"node-name": "n0", "size": 4096}),
        ("block_resize", {"device": "r0", "size": 4096}),
        ("block_resize", {"size": 4096}),
        ("block_resize", {"node-name": "r0", "size": -1}),
        ("block_resize", {"node-name": "r1", "size": 2097152}),
        ("blockdev-add", {"driver": "file", "node-name": "ro", "filename": img, "read-only": True}),
        ("block_resize", {"node-name": "ro", "size": 4096}),
        ("query-named-block-nodes", None),
        ("query-named-block-nodes", {"flat": True}),
        ("query-block", None),
        ("blockdev-del", {"node-name": "r2"}),
        ("blockdev-del", {"node-name": "r1"}),
        ("blockdev-del", {"node-name": "n1"}),
        ("query-named-block-nodes", None),
    ]


def canon(rsp, workdir):
    text = json.dumps(rsp, sort_keys=True).replace(str(workdir), "W")
    # Auto-generated node names count differently; their shape is what matters.
    text = re.sub(r"#block\d+", "#blockN", text)
    # actual-size depends on file system allocation of the twin images, not on the daemon.
    text = re.sub(r'"actual-size": \d+', '"actual-size": A', text)
    return normalize(text)


def test_sequence_matches_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        img = image(str(d.workdir))
        c = d.connect()
        out.append([canon(c.cmd(n, a), d.workdir) for n, a in seq_for(img)])
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, seq_for("IMG")[i])


def test_blockstats_and_graph_match_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        img = image(str(d.workdir))
        c = d.connect()
        for n, a in seq_for(img)[:6]:
            c.cmd(n, a)
        stats = c.cmd("query-blockstats", {"query-nodes": True})["return"]
        for s in stats:
            def strip(x):
                x["stats"].pop("idle_time_ns", None)
                for k in list(x["stats"]):
                    if k.endswith("_time_ns"):
                        x["stats"][k] = 0
                if "parent" in x:
                    strip(x["parent"])
            strip(s)
        graph = c.cmd("x-debug-query-block-graph")["return"]
        ids = {n["id"]: n["name"] for n in graph["nodes"]}
        edges = sorted((ids[e["parent"]], ids[e["child"]], e["name"], tuple(e["perm"]),
                        tuple(e["shared-perm"])) for e in graph["edges"])
        out.append((canon(stats, d.workdir), canon(edges, d.workdir),
                    canon(c.cmd("query-blockstats"), d.workdir), canon(graph, d.workdir)))
    assert out[1] == out[0]


def test_raw_over_a_format_shows_its_cluster_size_and_dirty_flag_as_qsd(both):
    """raw asks the node below for its image information (QEMU's `raw_get_info`): over a
    qcow2 node with lazy refcounts that was written, the cluster size and the dirty flag
    are the qcow2 image's."""
    out = []
    for d in both():
        img = str(d.workdir / "lazy.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
                        img, "1M"], check=True)
        c = d.connect()
        for n, a in [("blockdev-add", {"driver": "qcow2", "node-name": "q0",
                                       "file": {"driver": "file", "filename": img}}),
                     ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "q0"}),
                     ("nbd-server-start", {"addr": {"type": "unix", "data": {
                         "path": str(d.workdir / "nbd.sock")}}}),
                     ("block-export-add", {"type": "nbd", "id": "e", "node-name": "r0",
                                           "writable": True})]:
            assert c.cmd(n, a) == {"return": {}}, (n, a)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 64k",
                        f"nbd+unix:///r0?socket={d.workdir / 'nbd.sock'}"],
                       check=True, capture_output=True)
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append({n["node-name"]: {k: n["image"].get(k) for k in ("cluster-size", "dirty-flag")}
                    for n in nodes if not n["node-name"].startswith("#")})
    assert out[0]["r0"] == {"cluster-size": 65536, "dirty-flag": True}, out[0]
    assert out[1] == out[0]


def test_write_threshold_event(ferrite, tmp_path):
    img = image(str(tmp_path))
    sock = str(tmp_path / "nbd.sock")
    d = ferrite(["--blockdev", f"file,node-name=f0,filename={img}",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", "nbd,id=e0,node-name=f0,writable=on"])
    c = d.connect()
    assert c.cmd("block-set-write-threshold", {"node-name": "f0", "write-threshold": 65536}) == {"return": {}}
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write 61440 8192",
                    f"nbd+unix:///f0?socket={sock}"], check=True, capture_output=True)
    ev = json.loads(c.recv_line())
    assert ev["event"] == "BLOCK_WRITE_THRESHOLD"
    assert ev["data"] == {"node-name": "f0", "amount-exceeded": 4096, "write-threshold": 65536}
    info = c.cmd("query-named-block-nodes")["return"]
    assert info[0]["write_threshold"] == 0


def reopen_seq(img):
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img, "read-only": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0", "read-only": True}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "nope", "file": "f0"}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "file": "f0"}]}),
        ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "r0"}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "f0",
                                          "offset": 512}]}),
        ("query-named-block-nodes", None),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "f0",
                                          "read-only": False},
                                         {"driver": "file", "node-name": "f0", "filename": img,
                                          "read-only": False}]}),
        ("query-named-block-nodes", None),
        ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0",
                                          "filename": img + ".other"}]}),
        ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0", "filename": img,
                                          "detect-zeroes": "on"}]}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "f0"}]}),
        ("query-named-block-nodes", None),
        # Cache modes may change: O_DIRECT on the file, flushes ignored above it.
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "f0",
                                          "cache": {"no-flush": True}}]}),
        ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0", "filename": img,
                                          "cache": {"direct": True}}]}),
        ("query-named-block-nodes", None),
        ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0", "filename": img,
                                          "read-only": False, "cache": {"direct": False}}]}),
        ("query-named-block-nodes", None),
    ]


def test_reopen_matches_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        img = image(str(d.workdir))
        c = d.connect()
        out.append([canon(c.cmd(n, a), d.workdir) for n, a in reopen_seq(img)])
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, reopen_seq("IMG")[i][0])


def reopen_file_seq(img):
    """`file` in a reopen: options for the child the node opened (its mode follows), another
    node's name (the edge moves), and what is refused; persistent bitmaps of an image opened
    read-only cannot be changed until it is writable."""
    inline = {"driver": "file", "filename": img}
    fmt = {"driver": "qcow2", "node-name": "fmt"}
    return [
        ("blockdev-add", {**fmt, "read-only": True, "file": {**inline, "node-name": "f0"}}),
        ("block-dirty-bitmap-remove", {"node": "fmt", "name": "b0"}),
        ("block-dirty-bitmap-clear", {"node": "fmt", "name": "b0"}),
        ("block-dirty-bitmap-disable", {"node": "fmt", "name": "b0"}),
        ("block-dirty-bitmap-add", {"node": "fmt", "name": "b1"}),
        ("block-dirty-bitmap-merge", {"node": "fmt", "target": "b0", "bitmaps": ["b1"]}),
        ("blockdev-reopen", {"options": [{**fmt, "file": inline, "read-only": False}]}),
        ("query-named-block-nodes", None),
        ("block-dirty-bitmap-clear", {"node": "fmt", "name": "b0"}),
        ("blockdev-reopen", {"options": [{**fmt, "file": inline, "read-only": True}]}),
        ("query-named-block-nodes", None),
        ("blockdev-reopen", {"options": [{**fmt, "file": inline, "read-only": False}]}),
        ("block-dirty-bitmap-remove", {"node": "fmt", "name": "b0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0"}),
        ("blockdev-reopen", {"options": [{**fmt, "file": "nope"}]}),
        ("blockdev-reopen", {"options": [{**fmt, "file": "fmt"}]}),
        ("blockdev-reopen", {"options": [{**fmt, "file": "r0"}]}),
        ("x-debug-query-block-graph", None),
        ("query-named-block-nodes", None),
        ("blockdev-reopen", {"options": [{**fmt, "file": "f0"}]}),
        ("x-debug-query-block-graph", None),
        ("blockdev-del", {"node-name": "r0"}),
    ]


def test_reopen_of_file_children_matches_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        img = os.path.join(str(d.workdir), "img.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", img, "b0"], check=True)
        c = d.connect()
        out.append([canon(modes_only(n, c.cmd(n, a)), d.workdir)
                    for n, a in reopen_file_seq(img)])
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, reopen_file_seq("IMG")[i][0])


def modes_only(name, rsp):
    """What a reopen changes in `query-named-block-nodes`: each node's mode and files, and
    the image's bitmaps (where the two programs put a stored bitmap in the file differs)."""
    if name != "query-named-block-nodes" or "return" not in rsp:
        return rsp
    return [{"node-name": n["node-name"], "ro": n["ro"], "file": n["file"],
             "bitmaps": n["image"].get("format-specific", {}).get("data", {}).get("bitmaps")}
            for n in rsp["return"]]


def reopen_backing_seq(w):
    """`backing` in a reopen: required where there is one, another node's name or null
    changes it (the image's header stays), a cycle or an unknown node is refused."""
    top = {"driver": "qcow2", "node-name": "top", "file": "tf"}
    return [
        ("blockdev-add", {"driver": "qcow2", "node-name": "other",
                          "file": {"driver": "file", "filename": f"{w}/other.qcow2"}}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top",
                          "file": {"driver": "file", "node-name": "tf",
                                   "filename": f"{w}/top.qcow2"}}),
        ("blockdev-reopen", {"options": [top]}),
        ("blockdev-reopen", {"options": [{**top, "backing": "nope"}]}),
        ("blockdev-reopen", {"options": [{**top, "backing": "top"}]}),
        ("blockdev-reopen", {"options": [{**top, "backing": "other"}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-reopen", {"options": [{**top, "backing": "other", "read-only": True}]}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "other",
                                          "file": {"driver": "file",
                                                   "filename": f"{w}/other.qcow2"},
                                          "backing": "top"}]}),
        ("blockdev-reopen", {"options": [{**top, "backing": None}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-reopen", {"options": [top]}),
        ("blockdev-del", {"node-name": "other"}),
        # A file named as it is follows its node to read-only and keeps that mode.
        ("blockdev-add", {"driver": "qcow2", "node-name": "t2",
                          "file": {"driver": "file", "node-name": "tf2",
                                   "filename": f"{w}/t2.qcow2"}}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "t2",
                                          "file": "tf2", "read-only": True}]}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "t2",
                                          "file": "tf2"}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-reopen", {"options": [{"driver": "file", "node-name": "tf2",
                                          "filename": f"{w}/t2.qcow2"}]}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "t2",
                                          "file": "tf2"}]}),
        ("query-named-block-nodes", {"flat": True}),
    ]


def test_reopen_of_backing_files_matches_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        w = d.workdir
        for name, backing in [("base", None), ("other", None), ("t2", None),
                              ("top", "base.qcow2")]:
            extra = ["-b", backing, "-F", "qcow2"] if backing else []
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra,
                            str(w / f"{name}.qcow2"), "1M"], check=True, cwd=w)
        c = d.connect()
        out.append([canon(c.cmd(n, a), w) for n, a in reopen_backing_seq(w)])
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, reopen_backing_seq("W")[i][0])


def test_reopen_read_write_lets_an_export_write(ferrite, tmp_path):
    img = image(str(tmp_path))
    sock = str(tmp_path / "nbd.sock")
    d = ferrite(["--blockdev", f"file,node-name=f0,filename={img},read-only=on",
                 "--nbd-server", f"addr.type=unix,addr.path={sock}"])
    c = d.connect()
    rsp = c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0", "writable": True})
    assert rsp["error"]["desc"] == "Cannot export read-only node as writable"
    assert c.cmd("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0",
                                                  "filename": img}]}) == {"return": {}}
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "f0",
                                      "writable": True}) == {"return": {}}
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k",
                    f"nbd+unix:///f0?socket={sock}"], check=True, capture_output=True)
    rsp = c.cmd("blockdev-reopen", {"options": [{"driver": "file", "node-name": "f0",
                                                 "filename": img, "read-only": True}]})
    # qemu-storage-daemon 10.0.2's words for a writable node a user still writes to.
    assert rsp["error"]["desc"] == "Read-only block node 'f0' cannot support read-write users"
    subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 4k", img], check=True,
                   capture_output=True)


def as_nobody():
    """For `preexec_fn`: drops root, which ignores file permissions, to user nobody."""
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)


def auto_read_only_seq(w):
    """`auto-read-only` on an image nobody may write: a file node stays writable (its
    descriptor is opened for writing only for a writer, which is then refused); a format
    over it, or a writable export of it, fails at once."""
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": f"{w}/ro.img",
                          "auto-read-only": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q", "auto-read-only": True,
                          "file": {"driver": "file", "filename": f"{w}/ro.qcow2"}}),
        ("blockdev-add", {"driver": "file", "node-name": "plain", "filename": f"{w}/ro.img"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{w}/nbd.sock"}}}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "r", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "r"}),
        ("query-named-block-nodes", {"flat": True}),
        # A writable image: read-only until a writer comes, then written.
        ("blockdev-add", {"driver": "file", "node-name": "w", "filename": f"{w}/rw.img",
                          "auto-read-only": True}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "w", "writable": True}),
        ("query-named-block-nodes", {"flat": True}),
    ]


def test_auto_read_only_of_a_file_matches_qsd(tmp_path):
    import tempfile
    from conftest import FERRITE, QSD
    out = []
    for binary in (QSD, FERRITE):
        w = tempfile.mkdtemp(dir="/tmp")
        os.chmod(w, 0o777)
        image(w, "ro.img")
        image(w, "rw.img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{w}/ro.qcow2", "1M"],
                       check=True)
        for name in ("ro.img", "ro.qcow2"):
            os.chmod(f"{w}/{name}", 0o444)
        os.chmod(f"{w}/rw.img", 0o666)
        lines = [json.dumps({"execute": "qmp_capabilities"})]
        lines += [json.dumps({"execute": n, "arguments": a}) for n, a in auto_read_only_seq(w)]
        lines.append(json.dumps({"execute": "quit"}))
        p = subprocess.run([binary, "--chardev", "stdio,id=m", "--monitor", "m"],
                           input="\n".join(lines) + "\n", capture_output=True, text=True,
                           timeout=30, preexec_fn=as_nobody, check=False)
        replies = [json.loads(line) for line in p.stdout.splitlines()]
        replies = [r for r in replies if "event" not in r and "QMP" not in r]
        for r in replies:
            if isinstance(r.get("return"), list):
                r["return"] = sorted((n["node-name"], n["ro"]) for n in r["return"])
        out.append(normalize(json.dumps(replies).replace(w, "W")))
    assert out[1] == out[0]
    assert "Could not open 'W/ro.img': Permission denied" in out[0]


def test_a_file_grown_from_nothing_has_its_first_block_as_qsd_gives_it(both):
    """QEMU writes zeroes over the first block of a file that grows from nothing (for the
    alignment probe of a later O_DIRECT open); `stat` shows it, and iotest 175 counts it."""
    blocks = []
    for d in both():
        w = str(d.workdir)
        for name in ("grown4k", "grown1m"):
            image(w, name, "0")
        c = d.connect()
        for name, size in (("grown4k", 4096), ("grown1m", 1 << 20)):
            assert c.cmd("blockdev-add", {"driver": "file", "node-name": name,
                                          "filename": f"{w}/{name}",
                                          "cache": {"direct": True}}) == {"return": {}}
            assert c.cmd("block_resize", {"node-name": name, "size": size}) == {"return": {}}
        for name, size in (("made", 1 << 20), ("made100", 100)):
            c.cmd("blockdev-create", {"job-id": name, "options": {
                "driver": "file", "filename": f"{w}/{name}", "size": size}})
            c.wait_event("JOB_STATUS_CHANGE", lambda e, n=name: e["data"] == {
                "id": n, "status": "concluded"})
            c.cmd("job-dismiss", {"id": name})
        blocks.append({n: (os.stat(f"{w}/{n}").st_size, os.stat(f"{w}/{n}").st_blocks)
                       for n in ("grown4k", "grown1m", "made", "made100")})
    assert blocks[1] == blocks[0]
    assert blocks[0]["grown1m"][1] > 0


def test_a_preallocation_that_fails_leaves_no_file_data_as_in_qsd(both, tmp_path):
    """`blockdev-create` of a file whose preallocation cannot be done: a length no file
    system holds (`full` sets the length before it writes, so nothing is written), or a
    full file system. The job's error is QEMU's and the file is cut back to nothing."""
    from blockjobs import small_fs
    fs = tmp_path / "fs"
    small_fs(fs, "4M")
    try:
        out = []
        for d in both():
            c = d.connect()
            got = []
            for n, (where, size, mode) in enumerate([
                    (d.workdir, (1 << 63) - 1, "full"), (d.workdir, 1 << 62, "falloc"),
                    (fs, 8 << 20, "full"), (fs, 8 << 20, "falloc"), (fs, 1 << 20, "full")]):
                path = where / f"{d.workdir.name}-{n}"
                assert c.cmd("blockdev-create", {"job-id": f"j{n}", "options": {
                    "driver": "file", "filename": str(path), "size": size,
                    "preallocation": mode}}) == {"return": {}}
                c.wait_event("JOB_STATUS_CHANGE", lambda e, n=n: e["data"] == {
                    "id": f"j{n}", "status": "concluded"})
                job = c.cmd("query-jobs")["return"][0]
                c.cmd("job-dismiss", {"id": f"j{n}"})
                st = path.stat()
                got.append((job.get("error"), st.st_size, st.st_blocks))
                path.unlink()
            out.append(got)
        assert out[1] == out[0]
        assert out[0][0] == ("Could not resize file: File too large", 0, 0)
        assert out[0][2] == ("Could not write zeros for preallocation: "
                             "No space left on device", 0, 0)
    finally:
        subprocess.run(["umount", "-l", str(fs)])


def test_an_image_in_use_is_never_cut_by_a_new_file_over_it_as_in_qsd(both):
    """`blockdev-create` of a file, or a drive-backup or drive-mirror target made, over an
    image a node uses: refused by the image's lock before the file is touched (ferrite
    once cut the image to nothing first); the image's data and format survive, and it
    can be inactivated and activated again."""
    out = []
    for d in both():
        w = d.workdir
        img = str(w / "in-use.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 5 0 64k", img], check=True,
                       capture_output=True)
        c = d.connect()
        got = [c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q",
                                      "file": {"driver": "file", "filename": img}})]
        assert c.cmd("blockdev-create", {"job-id": "c", "options": {
            "driver": "file", "filename": img, "size": 0}}) == {"return": {}}
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"] == {
            "id": "c", "status": "concluded"})
        got.append(c.cmd("query-jobs")["return"][0].get("error"))
        c.cmd("job-dismiss", {"id": "c"})
        for cmd in ("drive-backup", "drive-mirror"):
            got.append(c.cmd(cmd, {"device": "q", "sync": "full", "target": img}))
        for active in (False, True):
            got.append(c.cmd("blockdev-set-active", {"active": active}))
        d.stop()
        check = subprocess.run(["qemu-io", "-r", "-c", "read -P 5 0 64k", img],
                               capture_output=True, text=True)
        got.append((check.returncode, "Pattern verification failed" in check.stdout))
        out.append(got)
    assert out[1] == out[0]
    assert out[0][1] == 'Failed to get "write" lock'
    assert out[0][-1] == (0, False)


def reopen_reset_seq(img, qimg):
    """Options left out of a reopen go back to their defaults where the driver lets them
    (QEMU's mutable options: a file's x-check-cache-dropped, raw's offset and size,
    qcow2's caches and checks) and are refused otherwise (a file's locking, null-co's
    size)."""
    f = {"driver": "file", "node-name": "f0", "filename": img}
    return [
        ("blockdev-add", {**f, "locking": "off", "x-check-cache-dropped": True}),
        ("blockdev-reopen", {"options": [{**f, "locking": "off"}]}),
        ("blockdev-reopen", {"options": [{**f, "locking": "on"}]}),
        ("blockdev-reopen", {"options": [f]}),
        ("blockdev-reopen", {"options": [{**f, "locking": "off", "aio": "threads"}]}),
        ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "f0",
                          "offset": 512, "size": 4096}),
        ("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "r0", "file": "f0"}]}),
        ("query-named-block-nodes", None),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "n0"}]}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "q0", "cache-clean-interval": 5,
                          "overlap-check": {"template": "all", "main-header": False},
                          "file": {"driver": "file", "filename": qimg, "node-name": "qf"}}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0",
                                          "file": "qf"}]}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0", "file": "qf",
                                          "lazy-refcounts": True}]}),
    ]


def test_reopen_resets_to_defaults_as_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        img = image(str(d.workdir))
        qimg = str(d.workdir / "q.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qimg, "1M"], check=True)
        c = d.connect()
        out.append([canon(c.cmd(n, a), d.workdir) for n, a in reopen_reset_seq(img, qimg)])
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, reopen_reset_seq("IMG", "Q")[i][0])


def test_the_newest_backing_parent_is_named_as_qsd_names_it(both):
    """A node that is the backing file of two images: deleting it is refused naming the one
    that took it last (QEMU reports the newest of a node's blockers)."""
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        c = d.connect()
        steps = []
        for i in range(3):
            img = str(d.workdir / f"h{i}.qcow2")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True)
            steps.append(c.cmd("blockdev-add", {
                "driver": "qcow2", "node-name": f"h{i}", "backing": None,
                "file": {"driver": "file", "filename": img, "node-name": f"h{i}-file"}}))
        for parent in ("h1", "h0"):
            steps.append(c.cmd("blockdev-reopen", {"options": [
                {"driver": "qcow2", "node-name": parent, "file": f"{parent}-file",
                 "backing": "h2"}]}))
        steps.append(c.cmd("blockdev-del", {"node-name": "h2"}))
        out.append(steps)
    assert out[1] == out[0]
    assert "backing hd of 'h0'" in out[0][-1]["error"]["desc"]


def chain_opts(w, names):
    """A qcow2 chain opened inline, top first: each image's backing given as options."""
    opts = None
    for name in reversed(names):
        node = {"driver": "qcow2", "node-name": name,
                "file": {"driver": "file", "node-name": f"{name}-file",
                         "filename": f"{w}/{name}.qcow2"}}
        if opts is not None:
            node["backing"] = opts
        opts = node
    return opts


def make_chain(w, names, size="3M"):
    """qcow2 images backed one by the next (`names` top first), each with data of its own."""
    below = None
    for i, name in enumerate(reversed(names)):
        extra = ["-b", f"{below}.qcow2", "-F", "qcow2"] if below else []
        path = str(w / f"{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, path, size],
                       check=True, cwd=w)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {0xa0 + i} {i}M 1M", path],
                       check=True, capture_output=True)
        below = name


def reopen_during_jobs_seq(w):
    """Reopening a chain a job holds: the links a stream or commit job froze cannot change
    (QEMU's frozen links), the options of a child the node did not open (a job's filter)
    stay with the node, others may change; and drivers that cannot reopen say so."""
    top = chain_opts(w, ["top", "mid", "base"])
    mid_only = {**top, "backing": {**top["backing"], "backing": None}}
    bd = {"driver": "blkdebug", "node-name": "bd", "config": "/dev/null"}
    return [
        ("blockdev-add", top),
        ("block-stream", {"job-id": "s0", "device": "top", "base-node": "base",
                          "auto-finalize": False, "speed": 1}),
        # The job holds the links down to the node above the base: that one's base may go.
        ("blockdev-reopen", {"options": [{**top, "backing": None}]}),
        ("blockdev-reopen", {"options": [mid_only]}),
        ("query-named-block-nodes", {"flat": True}),
        ("block-job-cancel", {"device": "s0", "force": True}),
        ("blockdev-del", {"node-name": "top"}),
        # An intermediate commit puts its filter between the top and the image it commits.
        ("blockdev-add", top),
        ("block-commit", {"job-id": "c0", "device": "top", "top-node": "mid",
                          "auto-finalize": False, "speed": 1}),
        ("blockdev-reopen", {"options": [mid_only]}),
        ("blockdev-reopen", {"options": [{**top, "backing": None}]}),
        ("block-job-cancel", {"device": "c0", "force": True}),
        # A commit of the active layer holds the whole chain.
        ("block-commit", {"job-id": "c1", "device": "top", "speed": 1}),
        ("blockdev-reopen", {"options": [mid_only]}),
        ("blockdev-reopen", {"options": [{**top, "backing": None}]}),
        ("blockdev-reopen", {"options": [{**top, "read-only": True}]}),
        ("block-job-cancel", {"device": "c1", "force": True}),
        ("blockdev-reopen", {"options": [{**top, "force-share": True}]}),
        ("blockdev-add", {"driver": "quorum", "node-name": "q0", "vote-threshold": 1,
                          "children": ["base"]}),
        ("blockdev-reopen", {"options": [{"driver": "quorum", "node-name": "q0",
                                          "vote-threshold": 1, "children": ["base"]}]}),
        ("blockdev-reopen", {"options": [{**top, "l2-cache-entry-size": 1000}]}),
        ("blockdev-reopen", {"options": [{**top, "l2-cache-entry-size": 131072}]}),
        ("blockdev-reopen", {"options": [{**top, "l2-cache-entry-size": 4096}]}),
        ("blockdev-add", {**bd, "image": "base"}),
        ("blockdev-reopen", {"options": [{**bd, "image": "base"}]}),
        ("blockdev-reopen", {"options": [{**bd, "image": "mid"}]}),
        ("blockdev-reopen", {"options": [{**bd, "image": "base", "align": 4096}]}),
        ("blockdev-reopen", {"options": [{"driver": "blkdebug", "node-name": "bd",
                                          "image": "base"}]}),
    ]


def test_reopen_during_jobs_matches_qsd(both):
    qsd, ferrite = both()
    out = []
    for d in (qsd, ferrite):
        make_chain(d.workdir, ["top", "mid", "base"])
        c = d.connect()
        got = []
        for n, a in reopen_during_jobs_seq(d.workdir):
            rsp = c.cmd(n, a)
            if n == "block-job-cancel":
                c.wait_event("BLOCK_JOB_CANCELLED")
            got.append(canon(modes_only(n, rsp), d.workdir))
        out.append(got)
    for i, (want, got) in enumerate(zip(*out)):
        assert got == want, (i, reopen_during_jobs_seq("W")[i][0])


def test_reopen_swaps_files_of_two_images_as_qsd(both, tmp_path):
    """Two images swap their files in one reopen (alone, each swap is a permission
    conflict); what one wrote before the swap stays in its own file, metadata included."""
    qsd, ferrite = both()
    for d in (qsd, ferrite):
        w = d.workdir
        for i in (0, 2):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / f"hd{i}.qcow2"),
                            "3M"], check=True)
        c = d.connect()
        opts = {i: {"driver": "qcow2", "node-name": f"hd{i}",
                    "file": {"driver": "file", "node-name": f"hd{i}-file",
                             "filename": str(w / f"hd{i}.qcow2")}} for i in (0, 2)}
        for i in (0, 2):
            assert c.cmd("blockdev-add", opts[i]) == {"return": {}}
        sock = str(w / "nbd.sock")
        assert "return" in c.cmd("nbd-server-start",
                                 {"addr": {"type": "unix", "data": {"path": sock}}})
        for i in (0, 2):
            assert "return" in c.cmd("block-export-add", {"type": "nbd", "id": f"e{i}",
                                                          "node-name": f"hd{i}",
                                                          "writable": True})
            subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {0xa0 + i} {i}M 64k",
                            f"nbd+unix:///hd{i}?socket={sock}"], check=True,
                           capture_output=True)
        one = c.cmd("blockdev-reopen", {"options": [{**opts[0], "file": "hd2-file"}]})
        assert "Permission conflict on node 'hd2-file'" in one["error"]["desc"], one
        swapped = [{**opts[0], "file": "hd2-file"}, {**opts[2], "file": "hd0-file"}]
        assert c.cmd("blockdev-reopen", {"options": swapped}) == {"return": {}}
        # Each node reads the other's image now.
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0xa2 2M 64k",
                            f"nbd+unix:///hd0?socket={sock}"], capture_output=True, text=True)
        assert "Pattern verification failed" not in r.stdout, (d.binary, r.stdout)
        c.cmd("quit")
        d.proc.wait(timeout=10)
        for i in (0, 2):
            img = str(w / f"hd{i}.qcow2")
            check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
            assert check.returncode == 0, (d.binary, check.stdout)
            r = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                f"read -P {0xa0 + i} {i}M 64k", img],
                               capture_output=True, text=True)
            assert "Pattern verification failed" not in r.stdout, (d.binary, i, r.stdout)


NO_CLIENT = [
    ("blockdev-add", {"driver": "blkreplay", "node-name": "#bad", "image": "n0"}),
    ("blockdev-add", {"driver": "rbd", "node-name": "#bad", "pool": "p", "image": "i"}),
    ("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p", "image": "i",
                      "conf": "/nonexistent/ceph.conf"}),
    ("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p", "image": "i",
                      "key-secret": "nope"}),
    ("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p", "image": "i",
                      "encrypt": {"format": "luks2"}}),
    ("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p", "image": "i"}),
    ("blockdev-add", {"driver": "gluster", "node-name": "g", "volume": "v", "path": "p",
                      "server": []}),
    ("blockdev-add", {"driver": "gluster", "node-name": "g", "volume": "v", "path": "p",
                      "server": [{"type": "fd", "str": "3"}]}),
    ("blockdev-add", {"driver": "gluster", "node-name": "g", "volume": "v", "path": "p",
                      "server": [{"type": "unix", "path": "/nonexistent"}]}),
    ("blockdev-add", {"driver": "nvme", "node-name": "#bad", "device": "x", "namespace": 1}),
    ("blockdev-add", {"driver": "nvme", "node-name": "n0", "device": "x", "namespace": 1}),
    ("blockdev-add", {"driver": "nvme", "node-name": "v", "device": "0000:00:04.0",
                      "namespace": 1}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "nvme", "size": 1}}),
    ("blockdev-create", {"job-id": "j", "options": {"driver": "rbd", "size": 1,
                                                    "location": {"pool": "p"}}}),
    ("query-named-block-nodes", {"flat": True}),
]


def test_drivers_of_services_without_a_client_are_refused_after_qsds_checks(both):
    """`rbd`, `gluster` and `nvme` are QEMU's; ferrite has no client for the services behind
    them. Every check QEMU makes before it reaches the service answers as in qsd; where qsd
    then reports the service's failure, ferrite says it has no client (and both refuse).
    `blkreplay` is unknown to both."""
    qsd, ferrite = both(["--blockdev", "null-co,node-name=n0"])
    theirs, ours = replies(qsd, NO_CLIENT), replies(ferrite, NO_CLIENT)
    refused = 0
    for (name, args), a, b in zip(NO_CLIENT, theirs, ours):
        if "ferrite has no" in b:
            assert '"error"' in a, (name, args, a)
            refused += 1
        else:
            assert b == a, (name, args)
    assert refused == 3
    assert "Unknown driver 'blkreplay'" in ours[0]


CEPH_CONFS = [
    "", "[global]\nmon host = 127.0.0.1:1\n", "# c\n\n[a] ; c\nk = \"v\" # c\n", "a = b\n",
    "foo\n", "= b\n", "\t\n", "[a]b\n", " [a]\n", "a = b\nc = d\n", "a = b\n[x]\n",
    "# x\na = b\n", "a = \"q\" x\n", "k = v\\\n", "[s]\na = b\\\n  c\n", "a = b\n\0\n",
]


def test_an_rbd_conf_file_librados_cannot_parse_is_refused_before_the_secret_as_qsd(
        both, tmp_path):
    """librados parses the `conf` file before QEMU looks the key secret up: one it cannot
    parse is "error reading conf file X: Invalid argument" (ferrite has no Ceph client,
    so its answer to a file that parses is the missing secret's, as qsd's)."""
    cmds = []
    for i, text in enumerate(CEPH_CONFS):
        conf = tmp_path / f"c{i}.conf"
        conf.write_bytes(text.encode())
        cmds.append(("blockdev-add", {"driver": "rbd", "node-name": "r", "pool": "p",
                                      "image": "i", "conf": str(conf), "key-secret": "nope"}))
    qsd, ferrite = both()
    theirs = replies(qsd, cmds)
    assert replies(ferrite, cmds) == theirs
    assert sum("Invalid argument" in a for a in theirs) == 11


def test_activating_an_image_that_is_gone_says_which_layer_as_qsd(ferrite, qsd):
    """A qcow2 node inactive while its file is made anew (nothing of the image left): its
    activation fails in QEMU's words, "Could not reopen qcow2 layer: ..."."""
    out = []
    for start in (qsd, ferrite):
        d = start()
        img = d.workdir / "img.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
        c = d.connect()
        got = [c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "f",
                                      "file": {"driver": "file", "filename": str(img)}}),
               c.cmd("blockdev-set-active", {"active": False}),
               c.cmd("blockdev-create", {"job-id": "c", "options": {
                   "driver": "file", "filename": str(img), "size": 1 << 20}})]
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        got.append(c.cmd("blockdev-set-active", {"active": True}))
        out.append(got)
    assert out[1] == out[0]
    assert "Could not reopen qcow2 layer: Image is not in qcow2 format" in str(out[1][-1])


@pytest.mark.parametrize("hint", [1 << 20, (1 << 32) - 1, 1 << 32, (1 << 63) - 1])
def test_file_creation_judges_the_extent_size_hint_first_like_qsd(both, hint):
    """An `extent-size-hint` beyond 32 bits fails the creation before the file is made;
    one within them is taken (qsd seed 1886)."""
    seen = []
    for d in both():
        q = d.connect()
        path = d.workdir / "made.raw"
        assert q.cmd("blockdev-create", {"job-id": "c", "options": {
            "driver": "file", "filename": str(path), "size": 65536,
            "extent-size-hint": hint}}) == {"return": {}}
        q.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        job = q.cmd("query-jobs")["return"][0]
        seen.append((job["status"], job.get("error"), path.exists()))
    theirs, ours = seen
    assert ours == theirs
    assert ours[1:] == ((None, True) if hint < 1 << 32 else
                        ("Extent size hint is too large", False))


@pytest.mark.parametrize("size,prealloc,error", [
    ((1 << 63) - 1, "off", "Could not resize file: File too large"),
    (1 << 63, "off", "Could not resize file: Invalid argument"),
    ((1 << 64) - 1, "falloc", "Cannot use preallocation for shrinking files"),
    ((1 << 64) - 1, "full", "Cannot use preallocation for shrinking files"),
])
def test_file_creation_beyond_what_a_file_holds_fails_after_making_it_like_qsd(
        both, size, prealloc, error):
    """A size no file can have fails once the file is made: a size beyond a signed 64-bit
    length is a negative one, which the kernel refuses or a preallocation sees as shrinking
    (qsd seed 2547, whose later commands found the file)."""
    seen = []
    for d in both():
        q = d.connect()
        path = d.workdir / "huge.raw"
        assert q.cmd("blockdev-create", {"job-id": "c", "options": {
            "driver": "file", "filename": str(path), "size": size,
            "preallocation": prealloc}}) == {"return": {}}
        q.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        job = q.cmd("query-jobs")["return"][0]
        seen.append((job.get("error"), path.exists() and path.stat().st_size))
    theirs, ours = seen
    assert ours == theirs
    assert ours == (error, 0)
