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


# Config files as QEMU's line reader takes or refuses them: a line of white space, or of
# NULs (differential seed 1302: a megabyte of them was echoed back in a 6 MB reply), a key
# before any group, unquoted values (empty), a word alone, a header that does not read (its
# partial scan names the last group), ids, duplicate ids (also against the option lists'
# `inject-error.0`), types, unknown events and I/O types, errno 0, bytes that are not UTF-8,
# a line longer than QEMU's buffer, and a directory.
CONFIGS = [
    b"[inject-error]\n   \n",
    bytes(1 << 20),
    b"event = \"read_aio\"\n",
    b"[inject-error]\nevent = read_aio\n",
    b"[inject-error]\nevent\n",
    b"[inject-error]\nevent=\"read_aio\"\n",
    b"[inject-error]\r\nevent = \"read_aio\"\r\n",
    b"[inject-error]\nevent = \"read_aio\"\n\r\n",
    b"[nosuch]\nevent = \"read_aio\"\n",
    b"[inject-error]\nevent = \"read_aio\"\n[]\n",
    b"[]\n",
    b"[ inject-error ]\n",
    b"[inject-error \"r1\"]\nevent = \"read_aio\"\n[inject-error \"r1\"]\n",
    b"[inject-error \"inject-error.0\"]\nevent = \"read_aio\"\n",
    b"[inject-error \"1r\"]\nevent = \"read_aio\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nstate = \"x\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nerrno = \"99999999999999999999\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nonce = \"y\"\nimmediately = \"on\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nnew_state = \"2\"\n",
    b"[set-state]\nevent = \"nosuch\"\nnew_state = \"2\"\n",
    b"[set-state]\nevent = \"read_aio\"\n[inject-error]\nevent = \"write_aio\"\n"
    b"iotype = \"nosuch\"\n",
    b"[set-state]\nstate = \"1\"\n",
    b"[inject-error]\nevent = \"\xff\xfe\"\n",
    b"[inject-error]\nevent = \"read_aio\"\nerrno = \"0\"\nonce = \"on\"\n",
    b"[inject-error]\n" + b" " * 1100 + b"event = \"read_aio\"\n",
    b"# only a comment\n\n",
    b"",
    None,
]


def config_transcript(d):
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "disk.img"), "1M"],
                   check=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    for i, text in enumerate(CONFIGS):
        path = w / f"c{i}.cfg"
        if text is None:
            path.mkdir()
        else:
            path.write_bytes(text)
        node = {"driver": "blkdebug", "node-name": f"d{i}", "config": str(path),
                "image": {"driver": "file", "filename": str(w / "disk.img")}}
        if i % 2:
            node["inject-error"] = [{"event": "write_aio"}]
        r = cmd("blockdev-add", node)
        if "return" in r:
            cmd("blockdev-del", {"node-name": f"d{i}"})
    c.close()
    d.stop()
    return out


def test_config_files_read_as_qsd_reads_them(both):
    q, f = both()
    expected, got = config_transcript(q), config_transcript(f)
    assert_same_transcript(expected, got)
    # Not every file is refused: the reader takes what QEMU takes.
    assert sum("return" in str(r) for r in got) > 5


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


def test_a_rule_with_errno_0_fails_nothing_as_qemus(ferrite, tmp_path):
    """QEMU's blkdebug lets a request through when the rule it meets injects errno 0."""
    rules = {"inject-error": [{"event": "none", "errno": 0}]}
    got = semantics(ferrite, tmp_path, "raw", rules, ["write -P 1 0 4k", "read -P 1 0 4k"])
    assert not any("failed" in line for line in got), got


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


# --- errors injected at qcow2's metadata events, as iotest 026 injects them -----------------

def qemu_io_sessions(binary, w, sessions, debug=True):
    """Runs each session (qemu-io commands) in its own `binary` process (a system emulator's
    human monitor) on `w/t.qcow2` with cache=writethrough, over blkdebug with config
    `w/bd.conf` if `debug`, as iotest 026 runs its qemu-io calls: what qemu-io printed, and
    what the program said on standard error as it closed the image (its own name left
    out)."""
    import os
    out, err = [], []
    image = f"blkdebug:{w}/bd.conf:{w}/t.qcow2" if debug else f"{w}/t.qcow2"
    drive = f"if=none,id=d,file={image},cache=writethrough"
    accel = "qtest" if "ferrite" in os.path.basename(binary) else "tcg"
    for ops in sessions:
        script = "".join(f'qemu-io d "{op}"\n' for op in ops) + "quit\n"
        r = subprocess.run([binary, "-accel", accel, "-S", "-nodefaults", "-display", "none",
                            "-monitor", "stdio", "-drive", drive],
                           input=script, capture_output=True, text=True, timeout=120)
        out += [ln for ln in r.stdout.splitlines()
                if ln.split(" ")[0] in ("read", "wrote", "write", "discard", "Pattern")
                and " ops; " not in ln]
        err += [ln.split(": ", 1)[-1] for ln in r.stderr.splitlines()]
    return out, err


def image_state(img, leaks_matter):
    """`qemu-img check` of the image: 'clean', 'leaks' (only leaked clusters; counted as
    clean where iotest 026 ignores them) or its whole report."""
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    if r.returncode == 0:
        return "clean"
    if r.returncode == 3:
        return "leaks" if leaks_matter else "clean"
    return r.stdout + r.stderr


def metadata_error_scenario(tmp_path, event, once, sessions, errno=5, size="1G", cs=1024,
                            before=None, leaks_matter=False, snapshot=False, backing=False):
    """The same sessions on the same fresh image under qemu-system-x86_64 and under
    ferrite-system-x86_64, the error armed by `event`: (qemu's, ferrite's) outputs,
    standard errors and image states. `before` is written first by qemu-io, and `snapshot`
    then takes an internal snapshot (which shares the L2 tables); with `backing` the image
    is an overlay of a base image written all through with 0x01."""
    from test_system import QEMU, SYSTEM
    results = []
    for side, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        w = tmp_path / side
        w.mkdir()
        over = []
        if backing:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "base.qcow2"),
                            size], check=True)
            subprocess.run(["qemu-io", "-c", f"write -P 1 0 {size}", str(w / "base.qcow2")],
                           check=True, capture_output=True)
            over = ["-b", "base.qcow2", "-F", "qcow2"]
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                        f"cluster_size={cs}", *over, str(w / "t.qcow2"), size], check=True)
        if before:
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", before, str(w / "t.qcow2")],
                           check=True, capture_output=True)
        if snapshot:
            subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(w / "t.qcow2")],
                           check=True)
        (w / "bd.conf").write_text(
            f'[inject-error]\nevent = "{event}"\nerrno = "{errno}"\n'
            f'immediately = "off"\nonce = "{once}"\n')
        out, err = qemu_io_sessions(binary, w, sessions)
        results.append((out, err, image_state(w / "t.qcow2", leaks_matter)))
    return results


def assert_as_qemu(qemu, ferrite):
    """Same qemu-io output and closing words; the image as consistent, leaks allowed only
    where QEMU leaks too (ferrite gives back more of what a failed request allocated)."""
    assert ferrite[:2] == qemu[:2]
    if qemu[2] == "leaks" and ferrite[2] == "clean":
        return
    assert ferrite[2] == qemu[2]


# Iotest 026's events for a 128k write on a fresh 1G image of 1k clusters: each names the
# metadata write (or load) the error hits; `once` off fails everything after it, the
# caches' write-back at close included.
SIMPLE_EVENTS = ["l1_update", "l2_load", "l2_update", "l2_alloc_write", "write_aio",
                 "refblock_load", "refblock_update_part", "refblock_alloc", "cluster_alloc"]


@pytest.mark.parametrize("vmstate", ["", "-b "], ids=["data", "vmstate"])
@pytest.mark.parametrize("once", ["on", "off"])
@pytest.mark.parametrize("event", SIMPLE_EVENTS)
def test_qcow2_metadata_errors_as_qemus(tmp_path, event, once, vmstate):
    sessions = [[f"write {vmstate}0 128k"]]
    if event == "l2_load":
        # Loaded only by a later process: a second write, and a read.
        sessions += [[f"write {vmstate}0 128k"], [f"read {vmstate}0 128k"]]
    before = f"write {vmstate}0 512" if event == "l2_update" else None
    errno = 28 if event in ("l2_update", "refblock_alloc") else 5
    qemu, ferrite = metadata_error_scenario(tmp_path, event, once, sessions, errno=errno,
                                            before=before)
    assert_as_qemu(qemu, ferrite)


@pytest.mark.parametrize("once", ["on", "off"])
@pytest.mark.parametrize("event", ["refblock_alloc_hookup", "refblock_alloc_write",
                                   "refblock_alloc_write_blocks", "refblock_alloc_write_table",
                                   "refblock_alloc_switch_table"])
def test_qcow2_refcount_table_growth_errors_as_qemus(tmp_path, event, once):
    """A 64M write on 512-byte clusters grows the refcount table: each step can fail."""
    qemu, ferrite = metadata_error_scenario(tmp_path, event, once, [["write 0 64M"]],
                                            errno=28, cs=512)
    assert_as_qemu(qemu, ferrite)


@pytest.mark.parametrize("once", ["on", "off"])
@pytest.mark.parametrize("event", ["l1_grow_alloc_table", "l1_grow_write_table",
                                   "l1_grow_activate_table"])
def test_qcow2_l1_growth_errors_as_qemus(tmp_path, event, once):
    """The VM state area lies past the disk: writing there grows the L1 table."""
    qemu, ferrite = metadata_error_scenario(tmp_path, event, once, [["write -b 0 64k"]])
    assert_as_qemu(qemu, ferrite)


@pytest.mark.parametrize("once", ["on", "off"])
@pytest.mark.parametrize("event", ["cow_read", "cow_write", "read_backing_aio"])
def test_copy_on_write_errors_as_qemus(tmp_path, event, once):
    """Writes into part of a cluster of an overlay: the clusters are allocated before the
    backing file's data around the write is read (QEMU's order, which decides what an
    error armed by the read hits), and the write carries that data with it."""
    sessions = [["write -P 2 4k 4k", "write -P 3 70k 4k", "read -P 2 4k 4k",
                 "read -P 1 0 4k"], ["read -P 1 0 4k", "read -P 2 4k 4k"]]
    qemu, ferrite = metadata_error_scenario(tmp_path, event, once, sessions, size="4M",
                                            cs=65536, backing=True, leaks_matter=True)
    assert qemu[0][0] == "write failed: Input/output error"
    assert_as_qemu(qemu, ferrite)


def test_clusters_of_a_failed_write_are_given_back_as_qemu_gives_them(tmp_path):
    """A data write that fails once: its clusters are not leaked (the second write's
    write-back takes their refcounts to disk)."""
    qemu, ferrite = metadata_error_scenario(tmp_path, "write_aio", "on",
                                            [["write 0 1M", "write 0 1M"]], size="64M",
                                            cs=65536, leaks_matter=True)
    assert qemu[2] == "clean"
    assert ferrite == qemu


@pytest.mark.parametrize("event,vmstate", [
    (event, vmstate)
    for event in ["l1_update", "l2_update", "l2_alloc_write", "refblock_update_part",
                  "cluster_alloc", "refblock_alloc_hookup", "refblock_alloc_write_table",
                  "refblock_alloc_switch_table"]
    for vmstate in ("", "-b ")
] + [
    # Only the VM state area, past the disk, grows the L1 table.
    ("l1_grow_write_table", "-b "), ("l1_grow_activate_table", "-b "),
    # The snapshot shares the disk's L2 tables, none of the VM state area.
    ("l2_alloc_cow_read", ""),
])
def test_writes_after_a_failed_metadata_write_persist(tmp_path, event, vmstate):
    """One write fails on its metadata, the next ones succeed: what they wrote reads back in
    a new process (no table the disk does not name, no refcount lost, as before ferrite
    kept memory and disk apart when a table or header write failed), and the image is as
    consistent as QEMU leaves it."""
    b = vmstate
    sessions = [[f"write {b}0 128k", f"write -P 0x5a {b}0 8M", f"write -P 0x33 {b}100k 1k"],
                [f"read -P 0x5a {b}0 100k", f"read -P 0x33 {b}100k 1k",
                 f"read -P 0x5a {b}101k 7M"]]
    cs = 512 if event.startswith("refblock_alloc_") else 1024
    before = "write 1k 1k" if event in ("l2_update", "l2_alloc_cow_read") else None
    qemu, ferrite = metadata_error_scenario(tmp_path, event, "on", sessions, cs=cs,
                                            before=before, leaks_matter=True,
                                            snapshot=event == "l2_alloc_cow_read")
    assert any(ln.startswith("write failed") for ln in qemu[0]), qemu
    assert not any(ln.startswith("Pattern") for ln in qemu[0]), qemu
    assert_as_qemu(qemu, ferrite)


def test_writes_after_a_failed_l1_update_are_not_lost(tmp_path):
    """The first write of the L1 table (sector 6 of this image) fails once: the next writes
    succeed and read back in a new process. ferrite once kept the new entry in memory
    though the disk did not have it, and what it then mapped there read as zeroes after a
    reopen."""
    from test_system import QEMU, SYSTEM
    sessions = [["write 0 128k", "write -P 0x5a 0 8M"], ["read -P 0x5a 0 100k"]]
    seen = []
    for side, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        w = tmp_path / side
        w.mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=1024",
                        str(w / "t.qcow2"), "1G"], check=True)
        (w / "bd.conf").write_text('[inject-error]\nevent = "pwritev"\nsector = "6"\n'
                                   'errno = "5"\nonce = "on"\n')
        out, err = qemu_io_sessions(binary, w, sessions)
        seen.append((out, err, image_state(w / "t.qcow2", True)))
    qemu, ferrite = seen
    assert qemu[0][0] == "write failed: Input/output error"
    assert not any(ln.startswith("Pattern") for ln in qemu[0]), qemu
    assert ferrite == qemu
