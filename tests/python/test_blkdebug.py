"""The `blkdebug` driver against qemu-storage-daemon: options, a config file, errors armed
by the events qcow2 and raw raise (`read_aio`, `write_aio`) with `sector`, `iotype`, `once`
and `errno`, and `set-state` rules moving the state machine that gates them; seen by NBD
clients through an export of the format node above. (Breakpoints need qemu-io in the human
monitor: test_system.py compares them with qemu-system.)"""
import json

import pytest
import subprocess

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder


def io(uri, *ops):
    # A json: name carries its own driver; an NBD export is raw.
    args = ["qemu-io"] + ([] if uri.startswith("json:") else ["-f", "raw"])
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [uri], capture_output=True, text=True)
    # qemu-io's own flush when it closes an image whose writes fail is not the node's doing
    # (through NBD the server flushes, unseen).
    return [ln for ln in (r.stdout + r.stderr).splitlines()
            if " ops; " not in ln and not ln.startswith("qemu-io: Failed to flush")]


CONFIG = """# armed by the first write, fails reads of sector 8 in state 2 only
[set-state]
state = "1"
event = "write_aio"
new_state = "2"

[inject-error]
event = "read_aio"
state = "2"
sector = "8"
errno = "28"
"""


def stack(top, debug):
    return {"driver": top, "node-name": "top",
            "file": {"driver": "blkdebug", "node-name": "dbg", **debug,
                     "image": {"driver": "file", "filename": "disk.img"}}}


def transcript(d):
    """Refusals and what the queries say of a blkdebug node."""
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "disk.img"), "4M"],
                   check=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", stack("qcow2", {"align": 3}))
    cmd("blockdev-add", stack("qcow2", {"config": "nosuch.cfg"}))
    cmd("blockdev-add", stack("qcow2", {"inject-error": [{"event": "nosuch"}]}))
    cmd("blockdev-add", stack("qcow2", {"set-state": [{"event": "read_aio"}]}))
    cmd("blockdev-add", stack("qcow2", RULES))
    # Permissions taken and kept from others on the image: a second user that needs what
    # is not shared is refused.
    cmd("blockdev-add", {"driver": "blkdebug", "node-name": "unshare", "image": "top",
                         "unshare-child-perms": ["consistent-read", "write"]})
    cmd("blockdev-add", {"driver": "raw", "node-name": "reader", "file": "top"})
    cmd("blockdev-del", {"node-name": "unshare"})
    cmd("blockdev-add", {"driver": "blkdebug", "node-name": "taker", "image": "top",
                         "take-child-perms": ["write", "resize"]})
    cmd("blockdev-add", {"driver": "raw", "node-name": "ro-user", "file": "top",
                         "read-only": True})
    cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "ro-user"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(w), "W")
    # json: file names compared as objects: QEMU's member order for the flattened rule
    # options is its hash table's, not reproduced here.
    out.append(("nodes", sorted((n["node-name"], n["drv"],
                                 json.loads(n["file"][5:]) if n["file"].startswith("json:")
                                 else n["file"])
                                for n in json.loads(text)
                                if not n["node-name"].startswith("#"))))
    c.close()
    d.stop()
    return out


def test_blkdebug_options_and_queries_match_qsd(both):
    q, f = both()
    assert_same_transcript(transcript(q), transcript(f))


# Reads fail once with ENOSPC after a read armed the rule; writes fail with EIO where they
# touch sector 16.
RULES = {"inject-error": [
    {"event": "read_aio", "iotype": "read", "errno": 28, "once": True},
    {"event": "write_aio", "iotype": "write", "sector": 16, "errno": 5},
]}
OPS = ["write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 12k 8k", "read -P 1 0 4k",
       "read -P 1 0 4k", "read -P 2 8k 4k", "read 64k 4k", "write -P 4 6k 4k",
       "read -P 4 6k 4k"]
CONFIG_OPS = ["read 4k 4k", "read 0 512", "write -P 7 0 512", "read 4k 512", "read 4k 4k",
              "read 3k 2k", "write -P 7 0 512", "read -P 7 0 512"]


def semantics(ferrite, tmp_path, top, debug, ops):
    """The same operations through QEMU's blkdebug (qemu-io on a json: file name) and through
    ferrite's (an NBD export of the same stack): the same answers. (qemu-storage-daemon's NBD
    server drops the client when a read fails, so it cannot be the other side here.)"""
    results = []
    for side in ("qemu", "ferrite"):
        w = tmp_path / side
        w.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "disk.img"), "4M"],
                       check=True)
        (w / "rules.cfg").write_text(CONFIG)
        opts = stack(top, debug)
        opts["file"]["image"]["filename"] = str(w / "disk.img")
        if "config" in debug:
            opts["file"]["config"] = str(w / "rules.cfg")
        if side == "qemu":
            del opts["node-name"], opts["file"]["node-name"]
            results.append(io("json:" + json.dumps(opts), *ops))
        else:
            d = ferrite()
            c = d.connect()
            assert c.cmd("blockdev-add", opts) == {"return": {}}
            results.append(io(export(c, d, "top", "top", True), *ops))
            c.close()
    assert results[1] == results[0]
    return results[0]


def test_injected_errors_as_qemus_blkdebug(ferrite, tmp_path):
    # Under raw, guest offsets are the blkdebug node's: the write at 8k meets sector 16.
    got = semantics(ferrite, tmp_path, "raw", RULES, OPS)
    assert got.count("read failed: No space left on device") == 1
    assert got.count("write failed: Input/output error") == 2


def test_rules_of_event_none_apply_from_the_start_as_qemus(ferrite, tmp_path):
    """QEMU's blkdebug raises `none` when it opens: such errors fail every request of their
    kind at once (iotest file-io-error writes through a FUSE export of such a node)."""
    rules = {"inject-error": [{"event": "none", "iotype": "write"}]}
    got = semantics(ferrite, tmp_path, "raw", rules, ["write -P 1 0 4k", "read 0 4k"])
    assert got[0] == "write failed: Input/output error", got
    assert got[1].startswith("read 4096/4096"), got


def test_events_raised_by_qcow2_as_qemus(ferrite, tmp_path):
    # Armed by qcow2's first data write, which it then fails, as every later write; reads
    # of what was never written read no data, so raise no read_aio.
    rules = {"inject-error": [RULES["inject-error"][0],
                              {"event": "write_aio", "iotype": "write", "errno": 5}]}
    got = semantics(ferrite, tmp_path, "qcow2", rules, ["write -P 1 0 4k"] + OPS)
    assert got.count("write failed: Input/output error") == 5


def test_state_machine_from_a_config_file_as_qemus(ferrite, tmp_path):
    got = semantics(ferrite, tmp_path, "raw", {"config": "rules.cfg"}, CONFIG_OPS)
    assert got.count("read failed: No space left on device") == 3


def hmp_and_qemu_io(tmp_path, debug, ops):
    """What qemu-io prints for `ops` on qcow2 over blkdebug (`debug`) over a 64k-written
    image, and what ferrite-system-x86_64's HMP `qemu-io` prints for them on the same stack
    (through an NBD export the server's own requests, block status or flushes, would raise
    events first)."""
    import os
    from test_system import SYSTEM
    results = []
    for side in ("qemu", "ferrite"):
        w = tmp_path / side
        w.mkdir()
        img = w / "disk.img"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 0 64k", str(img)],
                       check=True, capture_output=True)
        opts = stack("qcow2", debug)
        opts["file"]["image"]["filename"] = str(img)
        if side == "qemu":
            del opts["node-name"], opts["file"]["node-name"]
            results.append(io("json:" + json.dumps(opts), *ops))
            continue
        script = "".join(f'qemu-io top "{op}"\n' for op in ops) + "quit\n"
        r = subprocess.run([SYSTEM, "-accel", "qtest", "-nodefaults", "-display", "none",
                            "-monitor", "stdio", "-blockdev", json.dumps(opts)],
                           input=script, capture_output=True, text=True, timeout=30)
        assert os.path.basename(SYSTEM) not in r.stderr, r.stderr
        results.append([ln for ln in r.stdout.splitlines()
                        if ln.split(" ")[0] in ("read", "wrote", "write", "flush")
                        and " ops; " not in ln])
    return results


def test_l2_loads_raise_their_event_as_qemus(tmp_path):
    """`l2_load`: raised as qcow2 reads an L2 table it does not hold; the error injected
    then fails that table's read (once), and the next read loads it again."""
    ops = ["read -P 9 0 4k", "read -P 9 0 4k"]
    debug = {"inject-error": [{"event": "l2_load", "errno": 5, "once": True}]}
    qemu, ferrite = hmp_and_qemu_io(tmp_path, debug, ops)
    assert ferrite == qemu
    assert qemu[0] == "read failed: Input/output error"


@pytest.mark.parametrize("event,ops,fails", [
    # A flush after a write reaches the disk: both events.
    ("flush_to_disk", ["write -P 1 0 4k", "flush", "read -P 1 0 4k", "read -P 1 0 4k"], True),
    # Nothing written since the image was opened: nothing to make durable, no flush_to_disk.
    ("flush_to_disk", ["flush", "read -P 9 0 4k"], False),
    # But a flush always writes the format's caches back to the OS.
    ("flush_to_os", ["flush", "read -P 9 0 4k", "read -P 9 0 4k"], True),
    # Raised by the generic write path on the node written (iotest stream-error-on-reset).
    ("pwritev", ["write -P 1 0 4k", "read -P 1 0 4k", "read -P 1 0 4k"], True),
    ("pwritev_done", ["read -P 9 0 4k", "write -P 1 0 4k", "read -P 1 0 4k"], True),
])
def test_flushes_and_writes_raise_their_events_as_qemus(tmp_path, event, ops, fails):
    """`flush_to_os` and `flush_to_disk`, raised on the flushed node's primary child (iotests
    124 and 257 arm their read errors with them): a rule set off by the event fails the
    next read once."""
    debug = {"set-state": [{"event": event, "state": 1, "new_state": 2}],
             "inject-error": [{"event": "read_aio", "errno": 5, "state": 2, "once": True}]}
    qemu, ferrite = hmp_and_qemu_io(tmp_path, debug, ops)
    assert ferrite == qemu
    assert ("read failed: Input/output error" in qemu) == fails, qemu


def close_transcript(d, rules, ops):
    """A qcow2 image over blkdebug with `rules`, NBD clients running `ops`, then quit: what
    the clients saw and what the daemon said on its standard error as it closed the image
    (its own name left out)."""
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "disk.img"), "4M"],
                   check=True)
    c = d.connect()
    assert c.cmd("blockdev-add", stack("qcow2", rules)) == {"return": {}}
    uri = export(c, d, "top", "top", True)
    seen = [io(uri, op) for op in ops]
    c.cmd("quit")
    d.proc.wait(10)
    said = [ln.split(": ", 1)[1] for ln in d.stderr_path.read_text().splitlines()]
    return seen, said


@pytest.mark.parametrize("rules,ops", [
    # A write arms an error for flushes that stays armed (not `once`): the client's flush
    # fails, and so does the one at close, which both caches report.
    ({"inject-error": [{"event": "write_aio", "iotype": "flush"}]},
     ["read 0 512", "write 0 512"]),
    # Nothing written since the last flush: an error armed for every request (by the L2
    # table's load) never meets a flush.
    ({"inject-error": [{"event": "l2_load"}]}, ["read 0 512"]),
], ids=["written", "only-read"])
def test_caches_that_cannot_be_written_back_at_close_are_reported_as_qsd(both, rules, ops):
    q, f = both()
    expected = close_transcript(q, rules, ops)
    assert close_transcript(f, rules, ops) == expected


def names_transcript(d):
    """The file names query-named-block-nodes shows for blkdebug nodes: `blkdebug:CONFIG:IMAGE`
    where the image has a plain name and nothing but a config file is set, `json:`
    otherwise; formats above take the plain name."""
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "t.qcow2"), "1M"],
                   check=True)
    (w / "rules.conf").write_text("")
    (w / "other.raw").write_bytes(bytes(65536))
    img = {"driver": "file", "filename": str(w / "t.qcow2")}
    c = d.connect()
    for name, o in [
        ("a", {"driver": "qcow2", "file": {"driver": "blkdebug", "image": img}}),
        ("b", {"driver": "qcow2", "file": {"driver": "blkdebug", "image": img,
                                           "config": str(w / "rules.conf")}}),
        ("c", {"driver": "qcow2", "file": {"driver": "blkdebug", "align": 4096,
                                           "image": img}}),
        ("d", {"driver": "blkdebug", "image": {"driver": "qcow2", "file": img}}),
        ("e", {"driver": "raw", "file": {"driver": "blkdebug",
                                         "image": {"driver": "blkdebug", "image": img}}}),
        ("f", {"driver": "blkdebug", "image": {"driver": "null-co"}}),
        ("g", {"driver": "blkdebug", "take-child-perms": ["resize"],
               "image": {"driver": "file", "filename": str(w / "other.raw")}}),
    ]:
        assert c.cmd("blockdev-add", dict(o, **{"node-name": name, "read-only": True})) \
            == {"return": {}}
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    c.close()
    return sorted((n["node-name"] if not n["node-name"].startswith("#") else "#", n["drv"],
                   n["file"].replace(str(w), "W")) for n in nodes)


def test_blkdebug_nodes_are_named_as_qsd_names_them(both):
    q, f = both()
    expected = names_transcript(q)
    assert ("a", "qcow2", "blkdebug::W/t.qcow2") in expected
    assert names_transcript(f) == expected
