"""The rest of qemu-storage-daemon's command set against qemu-storage-daemon itself: the
command and event lists, blockdev-set-active (inactive nodes refuse writers, filters and
resizes; exports activate them), x-blockdev-change and x-blockdev-set-iothread, and small
answers found to differ (bitmap texts, root-node checks, speed, resize, multi-conn)."""
import json
import os
import re
import subprocess

from blockjobs import export, export_del, qcow2, qemu_io, run
from conftest import replies, wait_for


def blockdev(q, w, *names):
    """A qcow2 node NAME over a file node NAMEf for each name."""
    for name in names:
        qcow2(w / f"{name}.qcow2", "4M")
        assert q.cmd("blockdev-add", {"driver": "file", "node-name": f"{name}f",
                                      "filename": str(w / f"{name}.qcow2")}) == {"return": {}}
        assert q.cmd("blockdev-add", {"driver": "qcow2", "node-name": name,
                                      "file": f"{name}f"}) == {"return": {}}


def state(q):
    return sorted((n["node-name"], n["active"], n["ro"])
                  for n in q.cmd("query-named-block-nodes", {"flat": True})["return"])


def normalized(reply):
    """Auto-generated node names differ between the daemons."""
    if "error" in reply:
        reply["error"]["desc"] = re.sub(r"#block\d+", "#block", reply["error"]["desc"])
    return reply


def test_command_and_event_lists_match_qemu(both):
    seen = []
    for d in both():
        q = d.connect()
        commands = sorted(c["name"] for c in q.cmd("query-commands")["return"])
        events = sorted(e["name"] for e in q.cmd("query-qmp-schema")["return"]
                        if e["meta-type"] == "event")
        seen.append((commands, events))
    theirs, ours = seen
    assert len(ours[0]) == 76 and len(ours[1]) == 13
    assert ours == theirs


def test_inactive_nodes_like_qemu(both):
    """Inactivation needs no active parent and no writer; an inactive node refuses new
    filters, resizes and snapshots, comes back for an export, and all nodes go and come
    back together."""
    seen = []
    for d in both():
        w = d.workdir
        q = d.connect()
        blockdev(q, w, "a", "t")
        sock = str(w / "nbd.sock")
        assert q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
            == {"return": {}}
        steps = [
            ("blockdev-set-active", {"node-name": "nope", "active": False}),
            ("blockdev-set-active", {"node-name": "af", "active": False}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "a", "writable": True}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("block-export-del", {"id": "e0"}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("blockdev-backup", {"job-id": "j", "device": "a", "target": "t", "sync": "full"}),
            ("blockdev-mirror", {"job-id": "m", "device": "a", "target": "t", "sync": "full"}),
            ("block_resize", {"node-name": "a", "size": 8 << 20}),
            ("blockdev-snapshot-internal-sync", {"device": "a", "name": "s"}),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "a"}),
            ("block-export-del", {"id": "e1"}),
            ("blockdev-set-active", {"active": False}),
            ("blockdev-set-active", {"active": True}),
        ]
        out = []
        for name, args in steps:
            out.append((name, args, normalized(q.cmd(name, args))))
            if name == "block-export-del":
                q.wait_event("BLOCK_EXPORT_DELETED")
            out.append(state(q))
        seen.append(out)
    theirs, ours = seen
    for a, b in zip(ours, theirs):
        assert a == b


def test_nodes_opened_inactive_and_exports_that_allow_it_like_qemu(both):
    """blockdev-add with active=off opens a node inactive (its image untouched); an export
    with allow-inactive leaves it so and serves only reads (EPERM for the rest) while one
    without refuses the inactivation; an active overlay over an inactive image goes
    inactive with it."""
    seen = []
    for d in both():
        w = d.workdir
        q = d.connect()
        qcow2(w / "a.qcow2", "4M")
        run("qemu-io", "-c", "write -P 7 0 64k", w / "a.qcow2")
        qcow2(w / "o.qcow2", "4M")
        before = (w / "a.qcow2").read_bytes()
        steps = [
            ("blockdev-add", {"driver": "file", "node-name": "af",
                              "filename": str(w / "a.qcow2")}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": "af",
                              "active": False}),
            ("blockdev-add", {"driver": "file", "node-name": "of",
                              "filename": str(w / "o.qcow2")}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "o", "file": "of",
                              "backing": None}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                  "writable": True, "allow-inactive": True}),
        ]
        sock = str(w / "nbd.sock")
        assert q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
            == {"return": {}}
        out = []
        for name, args in steps:
            out.append((name, normalized(q.cmd(name, args)), state(q)))
        uri = f"nbd+unix:///a?socket={sock}"
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 7 0 64k",
                            "-c", "write 0 4k", "-c", "write -z 0 4k", "-c", "discard 0 64k",
                            uri], capture_output=True, text=True)
        out.append([re.sub(r"\d+ ops; .*", "", line) for line in r.stdout.splitlines()
                    if "bytes at" not in line])
        out.append((w / "a.qcow2").read_bytes() == before)
        for name, args in [
            ("block-export-del", {"id": "e"}),
            ("blockdev-set-active", {"node-name": "a", "active": True}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "a",
                                  "writable": True}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("block-export-del", {"id": "e2"}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("blockdev-snapshot", {"node": "a", "overlay": "o"}),
        ]:
            # The client that just exited may not have been seen to go yet (a loaded
            # machine): the deletion is asked again until it has.
            reply = export_del(q.cmd, args["id"]) if name == "block-export-del" \
                else q.cmd(name, args)
            out.append((name, normalized(reply), state(q)))
            if name == "block-export-del":
                q.wait_event("BLOCK_EXPORT_DELETED")
        seen.append(out)
    theirs, ours = seen
    for a, b in zip(ours, theirs):
        assert a == b
    assert len(ours) == len(theirs)


def test_activating_an_image_writes_its_header_and_takes_its_bitmaps_like_qemu(both):
    """Activating a qcow2 node may write its header at once (unknown autoclear bits are
    dropped, persistent bitmaps are marked in use). Its persistent bitmaps go to the image
    when it goes inactive and come back from it when it is activated (a node opened
    inactive has none until then); a bitmap of this process only stays."""
    seen = []
    for d in both():
        w = d.workdir
        q = d.connect()
        img = w / "a.qcow2"
        qcow2(img, "4M")
        run("qemu-img", "bitmap", "--add", img, "b0")
        with open(img, "r+b") as f:
            f.seek(88)
            f.write(b"\x7f" + bytes(6) + b"\x01")  # autoclear: unknown bits and bitmaps

        def bitmaps():
            return sorted((b["name"], b["persistent"])
                          for n in q.cmd("query-named-block-nodes", {"flat": True})["return"]
                          for b in n.get("dirty-bitmaps", []))
        out = []
        for name, args in [
            ("blockdev-add", {"driver": "file", "node-name": "af", "filename": str(img),
                              "active": False}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": "af",
                              "active": False}),
            ("blockdev-set-active", {"node-name": "a", "active": True}),
            ("block-dirty-bitmap-add", {"node": "a", "name": "b1", "persistent": True}),
            ("block-dirty-bitmap-add", {"node": "a", "name": "t"}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("blockdev-set-active", {"active": True}),
        ]:
            out.append((name, q.cmd(name, args), state(q), img.read_bytes()[88:96].hex(),
                        bitmaps()))
        assert q.cmd("blockdev-del", {"node-name": "a"}) == {"return": {}}
        out.append(json.loads(run("qemu-img", "info", "--output=json", img).stdout)
                   ["format-specific"]["data"]["bitmaps"])
        seen.append(out)
    theirs, ours = seen
    for a, b in zip(ours, theirs):
        assert a == b
    assert len(ours) == len(theirs)


def test_an_image_handed_over_between_daemons_like_qemu(tmp_path, ferrite, qsd):
    """As iotest qsd-migrate: one daemon writes an image and gives it up, another that
    opened it inactive takes it over and must see what was written, even where the image
    grew meanwhile (ferrite used to keep the file's old length: the new clusters read as
    zeroes)."""
    seen = []
    for start in (qsd, ferrite):
        src, dst = start(), start()
        img = src.workdir / "shared.qcow2"
        qcow2(img, "10M")
        out, uris = [], []
        for d, active in ((src, True), (dst, False)):
            q = d.connect()
            for node in ({"driver": "file", "node-name": "f", "filename": str(img)},
                         {"driver": "qcow2", "node-name": "fmt", "file": "f"}):
                assert q.cmd("blockdev-add", {**node, "active": active}) == {"return": {}}
            sock = str(d.workdir / "nbd.sock")
            q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            assert q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "fmt",
                                              "writable": True, "allow-inactive": True}) \
                == {"return": {}}
            uris.append((q, f"nbd+unix:///fmt?socket={sock}"))
        (qs, src_uri), (qd, dst_uri) = uris

        def io(uri, *ops):
            r = subprocess.run(["qemu-io", "-f", "raw", *[a for op in ops for a in ("-c", op)],
                                uri], capture_output=True, text=True)
            return [line for line in r.stdout.splitlines() if "ops;" not in line]
        out.append(io(src_uri, "write -P 0x11 0 4k", "write -P 0x22 5M 64k"))
        out.append(qs.cmd("blockdev-set-active", {"active": False}))
        out.append(io(dst_uri, "read 0 4k", "write 0 4k"))
        out.append(qd.cmd("blockdev-set-active", {"active": True}))
        out.append(io(dst_uri, "read -P 0x11 0 4k", "read -P 0x22 5M 64k",
                      "write -P 0x33 0 4k"))
        out.append(qd.cmd("blockdev-set-active", {"active": False}))
        out.append(qs.cmd("blockdev-set-active", {"active": True}))
        out.append(io(src_uri, "read -P 0x33 0 4k"))
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    assert not any("Pattern verification failed" in line for step in ours
                   if isinstance(step, list) for line in step)


def test_x_blockdev_change_and_set_iothread_like_qemu(both):
    seen = []
    for d in both():
        w = d.workdir
        q = d.connect()
        blockdev(q, w, "a", "t")
        assert q.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
        sock = str(w / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        steps = [
            ("x-blockdev-change", {"parent": "a", "child": "af"}),
            ("x-blockdev-change", {"parent": "a", "child": "file"}),
            ("x-blockdev-change", {"parent": "a", "node": "t"}),
            ("x-blockdev-change", {"parent": "a", "node": "nope"}),
            ("x-blockdev-change", {"parent": "nope", "node": "t"}),
            ("x-blockdev-change", {"parent": "a"}),
            ("x-blockdev-change", {"parent": "a", "child": "af", "node": "t"}),
            ("x-blockdev-set-iothread", {"node-name": "t", "iothread": "io0"}),
            ("x-blockdev-set-iothread", {"node-name": "t", "iothread": "nope"}),
            ("x-blockdev-set-iothread", {"node-name": "t", "iothread": None}),
            ("x-blockdev-set-iothread", {"node-name": "nope", "iothread": "io0"}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "t"}),
            ("x-blockdev-set-iothread", {"node-name": "t", "iothread": "io0"}),
            ("x-blockdev-set-iothread", {"node-name": "t", "iothread": "io0", "force": True}),
        ]
        seen.append([(n, a, q.cmd(n, a)) for n, a in steps])
    theirs, ours = seen
    for a, b in zip(ours, theirs):
        assert a == b


def test_small_answers_match_qemu(both):
    """Answers once found to differ: bitmap lookups and name limits, snapshots of a node
    that is not a root, a negative backup speed (after the job is announced), resizes a
    format cannot make, the point a cancelled fleecing backup reached, and multi-conn with
    a single connection allowed."""
    seen = []
    for d in both():
        w = d.workdir
        q = d.connect()
        blockdev(q, w, "a", "t", "r")
        steps = [
            ("block-dirty-bitmap-add", {"node": "a", "name": "b0"}),
            ("block-dirty-bitmap-merge", {"node": "a", "target": "b0",
                                          "bitmaps": [{"node": "nope", "name": "x"}]}),
            ("block-dirty-bitmap-merge", {"node": "a", "target": "b0",
                                          "bitmaps": ["b0", {"node": "nope", "name": "x"}]}),
            ("block-dirty-bitmap-remove", {"node": "nope", "name": "b0"}),
            ("block-dirty-bitmap-add", {"node": "a", "name": "x" * 1024, "persistent": True}),
            ("block-dirty-bitmap-add", {"node": "a", "name": "x" * 1023, "persistent": True}),
            ("block-dirty-bitmap-add", {"node": "a", "name": "y" * 1024}),
            ("blockdev-snapshot-internal-sync", {"device": "af", "name": "s"}),
            ("blockdev-backup", {"job-id": "j", "device": "a", "target": "t", "sync": "full",
                                 "speed": -1}),
            ("block_resize", {"node-name": "r", "size": (4 << 20) + 100}),
            ("block_resize", {"node-name": "r", "size": 1000}),
            ("block_resize", {"node-name": "r", "size": 8 << 20}),
        ]
        out = []
        for name, args in steps:
            out.append(q.cmd(name, args))
            out.append([(e["event"], e["data"]) for e in q.events])
            q.events.clear()
        sock = str(w / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                   "max-connections": 1})
        q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "a",
                                   "writable": True})
        uri = f"nbd+unix:///a?socket={sock}"
        out.append(q.cmd("blockdev-backup", {"job-id": "n", "device": "a", "target": "t",
                                             "sync": "none"}))
        run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri)
        out.append(q.cmd("block-job-cancel", {"device": "n"}))
        out.append(q.wait_event("BLOCK_JOB_CANCELLED")["data"])
        info = subprocess.run(["nbdinfo", uri], capture_output=True, text=True).stdout
        out.append(re.findall(r"can_multi_conn: \w+", info))
        seen.append(out)
    theirs, ours = seen
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, i


def test_empty_bitmap_merge_is_refused(ferrite):
    """qemu-storage-daemon 10.0.2 aborts on this; ferrite refuses it and goes on."""
    d = ferrite()
    q = d.connect()
    blockdev(q, d.workdir, "a")
    assert q.cmd("block-dirty-bitmap-add", {"node": "a", "name": "b0"}) == {"return": {}}
    r = q.cmd("block-dirty-bitmap-merge", {"node": "a", "target": "b0", "bitmaps": []})
    assert r["error"]["desc"] == \
        "Parameter 'bitmaps' expects a non-empty list of bitmaps to merge", r
    assert "return" in q.cmd("query-version")


def test_force_share_like_qemu(both, tmp_path):
    """force-share: refused on a writable node, inherited by the node's file, and what lets
    a read-only node open an image a writer holds (unless its file says otherwise)."""
    def steps(img):
        file = {"driver": "file", "filename": str(img)}
        return [
            {"driver": "qcow2", "node-name": "w", "file": file},
            {"driver": "qcow2", "node-name": "bad", "force-share": True, "file": file},
            {"driver": "qcow2", "node-name": "r1", "read-only": True, "file": file},
            {"driver": "qcow2", "node-name": "r2", "read-only": True, "force-share": True,
             "file": file},
            {"driver": "qcow2", "node-name": "r3", "read-only": True, "force-share": True,
             "file": dict(file, **{"force-share": False})},
            {"driver": "raw", "node-name": "r4", "force-share": True, "read-only": True,
             "file": {"driver": "file", "filename": str(img), "read-only": False}},
        ]
    seen = []
    for i, d in enumerate(both()):
        img = tmp_path / f"shared{i}.qcow2"
        qcow2(img, "1M")
        q = d.connect()
        nodes = [(re.sub(r"#block\d+", "#block", n), a, ro) for n, a, ro in state(q)]
        seen.append([q.cmd("blockdev-add", s) for s in steps(img)] + [sorted(nodes)])
    assert seen[1] == seen[0]
    assert "error" not in seen[0][3]


def test_chain_file_names_match_qemu(both):
    """File names of a chain opened inline: a backing file the header names by the path it
    has is the image's choice (plain names); one it names by a relative path is the user's
    (json: names, as QEMU compares the header's text); a job's implicit filter takes its
    child's name."""
    seen = []
    for d in both():
        w = d.workdir
        run("qemu-img", "create", "-q", "-f", "qcow2", w / "b.qcow2", "1M")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", w / "b.qcow2", "-F", "qcow2",
            w / "abs.qcow2", "1M")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2",
            w / "rel.qcow2", "1M")
        run("qemu-img", "create", "-q", "-f", "qcow2", w / "tg.qcow2", "1M")
        q = d.connect()
        for name in ["abs", "rel"]:
            assert q.cmd("blockdev-add", {
                "node-name": name, "driver": "qcow2",
                "file": {"driver": "file", "filename": str(w / f"{name}.qcow2")},
                "backing": {"node-name": f"{name}-b", "driver": "qcow2",
                            "file": {"driver": "file", "filename": str(w / "b.qcow2"),
                                     "force-share": True, "read-only": True},
                            "force-share": True}}) == {"return": {}}
        assert q.cmd("blockdev-add", {"node-name": "tg", "driver": "qcow2",
                                      "file": {"driver": "file",
                                               "filename": str(w / "tg.qcow2")}}) \
            == {"return": {}}
        out = [q.cmd("blockdev-mirror", {"job-id": "m", "device": "abs", "target": "tg",
                                         "sync": "top", "speed": 1})]
        out.append(sorted((re.sub(r"#block\d+", "#", n["node-name"]),
                           n["file"].replace(str(w), "W"), n["image"]["filename"].replace(
                               str(w), "W"))
                          for n in q.cmd("query-named-block-nodes", {"flat": True})["return"]))
        q.cmd("block-job-cancel", {"device": "m", "force": True})
        wait_for(lambda: not q.cmd("query-block-jobs")["return"], what="job gone")
        # A backing file opened from the header alone ("file:" prefix and all) is the
        # image's; once the header says something else, the header's text is compared.
        run("qemu-img", "create", "-q", "-f", "qcow2", w / "b2.qcow2", "1M")
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", f"file:{w / 'b2.qcow2'}",
            "-F", "qcow2", w / "imp.qcow2", "1M")
        assert q.cmd("blockdev-add", {"node-name": "imp", "driver": "qcow2",
                                      "file": {"driver": "file",
                                               "filename": str(w / "imp.qcow2")}}) \
            == {"return": {}}

        def names():
            info = next(n for n in q.cmd("query-named-block-nodes")["return"]
                        if n["node-name"] == "imp")
            return (info["file"].replace(str(w), "W"),
                    info["image"].get("backing-filename", "").replace(str(w), "W"))
        out.append(names())
        for name in ["null-co://", str(w / "b2.qcow2"), f"file:{w / 'b2.qcow2'}"]:
            out.append(q.cmd("change-backing-file", {"device": "imp", "image-node-name": "imp",
                                                     "backing-file": name}))
            out.append(names())
        seen.append(out)
    assert seen[1] == seen[0]


def test_blockdev_del_writes_back_an_image_opened_inline_below_it(both):
    """`blockdev-del` of a filter over a qcow2 image opened inline (no node name of its own):
    the image goes with it, and its metadata is written back first, as QEMU's close does.
    The writes here are a copy-on-read filter's, made while a read-only client reads, so no
    client's flush writes the metadata back. (ferrite used to drop the inline image unclosed:
    the copied clusters were leaked and unreachable.)"""
    def transcript(d):
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "b.qcow2"), "4M"],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 7 0 2M", str(w / "b.qcow2")], check=True,
                       capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F",
                        "qcow2", str(w / "x.qcow2")], check=True, cwd=w)
        c = d.connect()
        c.cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "top", "file": {
            "driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}}})
        uri = export(c, d, "top", "top", False)
        qemu_io(uri, "read -P 7 0 2M", read_only=True)
        c.cmd("block-export-del", {"id": "top"})
        c.wait_event("BLOCK_EXPORT_DELETED")
        out = [c.cmd("blockdev-del", {"node-name": "top"})]
        c.close()
        r = subprocess.run(["qemu-img", "check", str(w / "x.qcow2")], capture_output=True,
                           text=True)
        out.append((r.returncode, r.stdout.count("leaked")))
        r = subprocess.run(["qemu-img", "map", "--output=json", str(w / "x.qcow2")],
                           capture_output=True, text=True)
        out.append([(e["start"], e["length"], e["depth"]) for e in json.loads(r.stdout)])
        return out

    q, f = both()
    expected = transcript(q)
    assert expected[1] == (0, 0) and expected[2][0] == (0, 2 << 20, 0), expected
    assert transcript(f) == expected


def iothread_paths(workdir):
    return [
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": ""}),
        ("query-named-block-nodes", {"flat": True}),
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": "/objects/io0"}),
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": "objects/io0"}),
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": "/io0"}),
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": "/objects/s0"}),
        ("object-add", {"qom-type": "iothread", "id": "io1"}),
        ("x-blockdev-set-iothread", {"node-name": "n", "iothread": ""}),
        ("nbd-server-start", {"addr": {"type": "unix",
                                       "data": {"path": f"{workdir}/nbd.sock"}}}),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                              "iothread": "objects/io1"}),
        ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "m", "iothread": ""}),
    ]


def test_iothreads_are_found_by_qom_path_as_in_qsd(both):
    """An iothread is named as QEMU's `iothread_by_id` finds it: by id, by absolute or
    partial QOM path, or (the empty path) the only one there is."""
    extra = ["--object", "iothread,id=io0", "--object", "secret,id=s0,data=x",
             "--blockdev", "null-co,node-name=n", "--blockdev", "null-co,node-name=m"]
    qsd, ferrite = both(extra)
    theirs = replies(qsd, iothread_paths(qsd.workdir))
    ours = replies(ferrite, iothread_paths(ferrite.workdir))
    assert ours == [t.replace(str(qsd.workdir), str(ferrite.workdir)) for t in theirs]


def test_backing_files_that_fail_to_open_and_the_old_empty_name_like_qemu(both):
    """A backing file named by node or given inline that cannot be found or opened fails
    with "Could not open backing file: " before the reason; `"backing": ""` is the old
    spelling of null, taken with QEMU's deprecation warning, inline too."""
    seen = []
    for d in both():
        w = d.workdir
        for name in ("a", "b", "c"):
            qcow2(w / f"{name}.qcow2", "1M")
        q = d.connect()
        f = lambda name: {"driver": "file", "filename": str(w / f"{name}.qcow2")}  # noqa: E731
        out = [normalized(q.cmd("blockdev-add", args)) for args in [
            {"driver": "qcow2", "node-name": "x1", "backing": "nosuch", "file": f("a")},
            {"driver": "qcow2", "node-name": "x2", "file": f("a"),
             "backing": {"driver": "raw", "file": {"driver": "file", "filename": "nosuch"}}},
            {"driver": "qcow2", "node-name": "x3", "backing": "", "file": f("a")},
            {"driver": "qcow2", "node-name": "x4", "file": f("b"),
             "backing": {"driver": "qcow2", "backing": "", "file": f("c")}},
            # A node naming itself is a cycle, and attaching is no opening.
            {"driver": "qcow2", "node-name": "x5", "backing": "x5", "file": f("c")},
        ]]
        out.append(sorted((n["node-name"].startswith("#"), n["file"].replace(str(w), "W"),
                           n.get("backing_file", "").replace(str(w), "W"))
                          for n in q.cmd("query-named-block-nodes", {"flat": True})["return"]))
        d.stop()
        out.append(d.stderr_path.read_text())
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    assert ours[0]["error"]["desc"].startswith("Could not open backing file: Cannot find")
    assert ours[-1].count("deprecated") == 2


def test_an_overlay_blocks_most_operations_on_its_backing_file_like_qemu(both):
    """QEMU's op blockers: an overlay refuses a resize, a mirror into its backing file and
    snapshots of it ("node is used as backing hd of"), but lets a commit, a stream and a
    backup use it. Deleting any node drains every node, so a running job pauses and
    resumes. A backup target that knows no block size and has no backing file gets QEMU's
    warning (null-co), an image or a raw file does not."""
    seen = []
    for d in both():
        w = d.workdir
        for name in ("base", "top"):
            qcow2(w / f"{name}.qcow2", "4M")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "r.raw"), "1M"],
                       check=True)
        q = d.connect()
        f = lambda name: {"driver": "file", "filename": str(w / name)}  # noqa: E731
        steps = [
            ("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": f("base.qcow2")}),
            ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": f("top.qcow2"),
                              "backing": "base"}),
            ("block_resize", {"node-name": "base", "size": 8 << 20}),
            ("block_resize", {"node-name": "base", "size": -1}),
            ("blockdev-mirror", {"device": "top", "target": "base", "sync": "full"}),
            ("blockdev-backup", {"job-id": "b0", "device": "top", "target": "base",
                                 "sync": "full"}),
            ("blockdev-snapshot-internal-sync", {"device": "top", "name": "s"}),
            ("blockdev-snapshot-delete-internal-sync", {"device": "top", "name": "s"}),
            ("change-backing-file", {"device": "top", "image-node-name": "top",
                                     "backing-file": "base.qcow2"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 4 << 20}),
            ("blockdev-backup", {"job-id": "b", "device": "top", "target": "n0",
                                 "sync": "full", "speed": 1}),
            # The backup's filter above `top` keeps it from being resized.
            ("block_resize", {"node-name": "top", "size": 8 << 20}),
            ("blockdev-add", {"driver": "null-co", "node-name": "gone", "size": 1 << 20}),
            ("blockdev-del", {"node-name": "gone"}),
            # A transaction of one action: everything drained once (the job pauses and
            # resumes), then the action finds `top` is no root any more.
            ("blockdev-snapshot-internal-sync", {"device": "top", "name": "s2"}),
            ("block-job-cancel", {"device": "b", "force": True}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n1", "size": 1 << 20}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n2", "size": 1 << 20}),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": f("r.raw")}),
            ("blockdev-backup", {"job-id": "b1", "device": "n1", "target": "n2",
                                 "sync": "full"}),
            ("blockdev-backup", {"job-id": "b2", "device": "n1", "target": "r",
                                 "sync": "full"}),
        ]
        out = []
        for c, a in steps:
            watched = c == "blockdev-del" or a.get("name") == "s2"
            if watched:
                q.events.clear()
            out.append(normalized(q.cmd(c, a)))
            if watched:
                out.append([(e["event"], e["data"]) for e in q.events])
        # The deleted snapshot's times differ.
        out[7]["return"] = sorted(out[7]["return"])
        wait_for(lambda: q.cmd("query-block-jobs")["return"] == [])
        d.stop()
        out.append(d.stderr_path.read_text())
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    assert ours[2]["error"]["desc"] == "Node 'base' is busy: node is used as backing hd of 'top'"
    assert ours[4] == ours[2] and "Permission conflict" in ours[5]["error"]["desc"]
    assert ours[6] == ours[8] == {"return": {}} and "name" in ours[7]["return"]
    assert "Permission conflict" in ours[11]["error"]["desc"]
    pause = [("JOB_STATUS_CHANGE", {"status": s, "id": "b"}) for s in ("paused", "running")]
    assert ours[14] == ours[16] == pause
    assert ours[15]["error"]["desc"] == "Need a root block node"
    assert ours[-1].count("doesn't provide information about the block size") == 2


def test_a_node_its_driver_gave_up_is_ejected_like_qemu(both):
    """A qcow2 image found fatally corrupt, or that cannot be read again when it is
    activated, loses its driver in QEMU (`bs->drv = NULL`): queries call it ejected, commands
    that want a medium say it has none, activating it again succeeds without doing
    anything, an export of it is quietly not made, and it can still be deleted."""
    seen = []
    for d in both():
        w = d.workdir
        for name in ("c", "a"):
            qcow2(w / f"{name}.qcow2", "1M")
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k",
                            str(w / f"{name}.qcow2")], check=True, capture_output=True)
        # The first L1 entry points into the middle of a cluster.
        with open(w / "c.qcow2", "r+b") as f:
            f.seek(40)
            l1 = int.from_bytes(f.read(8), "big")
            f.seek(l1)
            entry = int.from_bytes(f.read(8), "big")
            f.seek(l1)
            f.write((entry + 0x200).to_bytes(8, "big"))
        q = d.connect()
        f = lambda name: {"driver": "file", "filename": str(w / name)}  # noqa: E731
        out = []
        for c, a in [
            ("blockdev-add", {"driver": "qcow2", "node-name": "c", "file": f("c.qcow2")}),
            ("blockdev-snapshot-internal-sync", {"device": "c", "name": "s"}),
            ("query-named-block-nodes", {}),
            ("blockdev-snapshot-internal-sync", {"device": "c", "name": "s"}),
            ("blockdev-snapshot-sync", {"node-name": "c", "snapshot-file": str(w / "o.qcow2"),
                                        "snapshot-node-name": "o"}),
            ("drive-backup", {"device": "c", "target": str(w / "t.qcow2"), "sync": "full"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n", "size": 1 << 20}),
            ("blockdev-backup", {"device": "c", "target": "n", "sync": "full"}),
            ("block-dirty-bitmap-add", {"node": "c", "name": "b"}),
            ("nbd-server-start", {"addr": {"type": "unix",
                                           "data": {"path": str(w / "nbd.sock")}}}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "c"}),
            ("query-block-exports", None),
            ("blockdev-set-active", {"node-name": "c", "active": False}),
            ("blockdev-del", {"node-name": "c"}),
            # An image cut to nothing while it was inactive cannot be read again.
            ("blockdev-add", {"driver": "qcow2", "node-name": "a", "file": f("a.qcow2")}),
            ("blockdev-set-active", {"node-name": "a", "active": False}),
            ("truncate", None),
            ("blockdev-set-active", {"node-name": "a", "active": True}),
            ("blockdev-set-active", {"node-name": "a", "active": True}),
            ("blockdev-set-active", {"active": True}),
            ("query-named-block-nodes", {}),
        ]:
            if c == "truncate":
                os.truncate(w / "a.qcow2", 0)
                continue
            out.append(q.cmd(c, a))
        out.append([(e["event"], e["data"]["msg"]) for e in q.events
                    if e["event"] == "BLOCK_IMAGE_CORRUPTED"])
        d.stop()
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs
    assert ours[2]["error"]["desc"] == "Block device c is ejected"
    assert ours[3]["error"]["desc"] == "Device has no medium"
    assert ours[10] == {"return": {}} and ours[11] == {"return": []}
    assert ours[-2]["error"]["desc"] == "Block device a is ejected"
    assert ours[-1] == [("BLOCK_IMAGE_CORRUPTED", "L2 table offset 0x40200 unaligned (L1 index: 0)")]
