"""The nfs driver against qemu-storage-daemon's (libnfs), both mounting an export of
nfs-ganesha's user-space NFSv3 server: the same replies and errors at open (unknown
exports and files, permissions, libnfs's options and QEMU's checks of them), the same
bytes read and written through an NBD export, URL names in backing files,
`blockdev-create`; ferrite connecting again when the server restarts, and a server that
lies bringing nothing down."""
import json
import os
import random
import re
import stat
import struct
import subprocess
import time

import pytest

import nbdclient as nc
from conftest import FERRITE, Daemon, normalize
from nfsserver import Server, missing
from test_iscsi import writes_across_a_restart
from test_ssh import export, nbd_uri, qemu_io
from blockjobs import export_del

NFS_MODULE = "/usr/lib/x86_64-linux-gnu/qemu/block-nfs.so"
pytestmark = [
    pytest.mark.skipif(not os.path.exists(NFS_MODULE),
                       reason="qemu-block-extra (qsd's nfs module) is not installed"),
    pytest.mark.skipif(missing() is not None, reason=missing() or ""),
]

SIZE = 8 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("nfs"))
    yield s
    s.stop()


def nfs(path, host="127.0.0.1", **extra):
    return {"driver": "nfs", "server": {"type": "inet", "host": host}, "path": str(path),
            **extra}


def image(path, size=SIZE, fill=None):
    """A raw file: zeroes, or `fill(i)` in each 4 KiB block."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            for i in range(0, size, 4096):
                f.seek(i)
                f.write(bytes([fill(i >> 12)]) * min(4096, size - i))
    return path


def transcript(d, seq):
    """The replies to `seq`; a `("wait-job", id)` step waits for the job to conclude and
    records its state."""
    c = d.connect()
    out = []
    for name, args in seq:
        if name == "wait-job":
            deadline = time.monotonic() + 30
            while True:
                jobs = c.cmd("query-jobs")["return"]
                if all(j["status"] == "concluded" for j in jobs) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            r = {"return": jobs}
        else:
            r = c.cmd(name, args)
        out.append(normalize(json.dumps(r, sort_keys=True)))
    return out


def test_opening_matches_qsd(qsd, ferrite, server):
    """Opens good and bad, as users make them: the same replies, errors, node queries,
    resizes, reopens, creation and standard error (libnfs's own debug lines aside)."""
    seq_for = lambda e: [  # noqa: E731
        ("blockdev-add", {"node-name": "a", **nfs(e / "a.raw")}),
        ("blockdev-add", {"node-name": "x1", **nfs(e / "nothere.raw")}),
        ("blockdev-add", {"node-name": "x2", **nfs(e.parent / "nothere" / "a.raw")}),
        ("blockdev-add", {"node-name": "x3", **nfs("a.raw")}),
        ("blockdev-add", {"node-name": "dir", **nfs(e / "sub")}),
        ("blockdev-add", {"node-name": "x4", **nfs(e / "ro.raw", user=1000, group=1000)}),
        ("blockdev-add", {"node-name": "r", **nfs(e / "ro.raw", user=1000, group=1000,
                                                  **{"read-only": True})}),
        ("blockdev-add", {"node-name": "x5", **nfs(e / "a.raw", host="nohost.invalid")}),
        ("blockdev-add", {"node-name": "x6", **nfs(e / "a.raw", host="")}),
        ("blockdev-add", {"node-name": "x7", **nfs(e / "a.raw", host="[::1]")}),
        ("blockdev-add", {"node-name": "v6", **nfs(e / "a.raw", host="::1",
                                                   **{"read-only": True})}),
        ("blockdev-add", {"node-name": "x8", "driver": "nfs",
                          "server": {"type": "unix", "host": "x"}, "path": str(e / "a.raw")}),
        ("blockdev-add", {"node-name": "b", **nfs(e / "a.raw", **{
            "readahead-size": 2 << 20, "page-cache-size": 100000, "debug": 0,
            "tcp-syn-count": 3})}),
        ("blockdev-add", {"node-name": "x9", **nfs(e / "a.raw", **{
            "readahead-size": 1024, "cache": {"direct": True}})}),
        ("blockdev-add", {"node-name": "x10", **nfs(e / "a.raw", **{
            "page-cache-size": 1024, "cache": {"direct": True}})}),
        ("blockdev-add", {"node-name": "x11", **nfs(e / "sub/../a.raw")}),
        ("blockdev-add", {"node-name": "dot", **nfs(e / "sub" / ".." / "sub" / "." / "s.raw",
                                                    **{"read-only": True})}),
        ("blockdev-add", {"node-name": "x12", **nfs(e / "a.raw", debug=7,
                                                    **{"cache": {"direct": True}})}),
        ("query-named-block-nodes", {"flat": True}),
        ("block_resize", {"node-name": "a", "size": SIZE * 2}),
        ("block_resize", {"node-name": "a", "size": SIZE // 2 + 1000}),
        ("blockdev-reopen", {"options": [{"node-name": "r", **nfs(
            e / "ro.raw", user=1000, group=1000)}]}),
        ("blockdev-reopen", {"options": [{"node-name": "b", **nfs(e / "a.raw", **{
            "readahead-size": 2 << 20, "page-cache-size": 100000, "debug": 0,
            "tcp-syn-count": 3, "cache": {"direct": True}})}]}),
        ("blockdev-reopen", {"options": [{"node-name": "a", **nfs(e / "a.raw", **{
            "read-only": True})}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-create", {"job-id": "j", "options": {
            "driver": "nfs", "location": {k: v for k, v in nfs(e / "new.raw").items()
                                          if k != "driver"}, "size": 3 << 20}}),
        ("wait-job", {}),
        ("blockdev-create", {"job-id": "k", "options": {
            "driver": "nfs", "location": {k: v for k, v in nfs(e / "nodir" / "n.raw").items()
                                          if k != "driver"}, "size": 1 << 20}}),
        ("wait-job", {}),
        ("blockdev-del", {"node-name": "a"}),
        ("blockdev-del", {"node-name": "dir"}),
    ]
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        e = server.dir_for("open")
        image(e / "a.raw")
        (e / "sub").mkdir()
        image(e / "sub" / "s.raw", 1 << 20)
        image(e / "ro.raw", 1 << 20)
        os.chmod(e / "ro.raw", 0o444)
        d = start()
        text = transcript(d, seq_for(e))
        d.stop()
        stderr = "".join(line for line in d.stderr_path.read_text().splitlines(True)
                         if not line.startswith("libnfs:"))
        new = e / "new.raw"
        got[name] = ([t.replace(str(e), "E") for t in text], stderr,
                     (e / "a.raw").stat().st_size, new.stat().st_size,
                     oct(stat.S_IMODE(new.stat().st_mode)))
    for q, f in zip(got["qsd"][0], got["ferrite"][0]):
        assert f == q
    assert got["ferrite"] == got["qsd"]
    joined = "".join(got["ferrite"][0])
    assert "NFS3ERR_NOENT(-2)" in joined
    assert "MNT3ERR_ACCES(13) Permission denied(13)" in joined
    assert "ACCESS denied. Required access rw-. Allowed access r--" in joined
    assert "Cannot open a read-only mount as read-write" in joined


def test_a_server_that_is_away_matches_qsd(qsd, ferrite, server):
    """With the NFS server stopped (rpcbind still up), the node cannot open: the same
    error as qsd's ("Program is not available")."""
    e = server.dir_for("away")
    image(e / "a.raw", 1 << 20)
    server.kill()
    try:
        got = {}
        for name, start in (("qsd", qsd), ("ferrite", ferrite)):
            d = start()
            got[name] = transcript(d, [("blockdev-add", {"node-name": "a", **nfs(e / "a.raw")})])
            d.stop()
    finally:
        server.start()
    assert got["ferrite"] == got["qsd"]


# Reads and writes of whole and partial sectors, zeroes, a discard, pieces larger than the
# server's transfer size; the file ends 1000 bytes into a sector: the tail reads as zeroes
# and a write there grows the file.
IO = ["read -v 0 32", "write -P 0x11 0 4k", "write -P 0x22 100k 3M", "read -P 0x22 100k 3M",
      "write -P 0x33 1 3", "read -v 0 8", "write -z 5M 64k", "read -P 0 5M 64k",
      "write -z -u 6M 1M", "discard 7M 64k", "flush", "write -f -P 0x66 4M 4k",
      "read -P 0x66 4M 4k", "read -v 8389600 32", "write -P 0x44 8389000 624",
      "read -v 8389600 32", "read 0 8389632", "length"]


# libnfs's page cache and readahead as QEMU's options turn them on.
CACHES = [{}, {"page-cache-size": 16}, {"readahead-size": 1 << 20, "page-cache-size": 2048}]


@pytest.mark.parametrize("cache", CACHES, ids=["uncached", "pages", "readahead"])
def test_reads_and_writes_match_qsd(qsd, ferrite, server, cache):
    """qemu-io through an NBD export of the node, without and with libnfs's page cache
    and readahead: the same output, the same file on the server afterwards."""
    out = {}
    e = server.dir_for("io")
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        path = image(e / f"{name}.raw", SIZE + 1000, fill=lambda i: (i % 7) + 1)
        d = start()
        export(d, nfs(path, **cache))
        out[name] = qemu_io(nbd_uri(d), *IO)
        d.stop()
    assert "failed" not in out["ferrite"], out["ferrite"]
    assert out["ferrite"] == out["qsd"]
    assert (e / "ferrite.raw").read_bytes() == (e / "qsd.raw").read_bytes()


@pytest.mark.parametrize("cache", [{"page-cache-size": 16}, {"readahead-size": 65536},
                                   {"readahead-size": 100000, "page-cache-size": 3}],
                         ids=["pages", "readahead", "both"])
def test_the_page_cache_keeps_what_it_read_as_in_qsd(qsd, ferrite, server, cache):
    """The file changed on the server behind the node's back: what the node read before
    (the pages asked for, and with readahead the pages after a sequential reader) still
    reads as it was, the rest reads as it is now, the node's own writes read back: the
    same pages as libnfs keeps in qsd (the same page slots, the same readahead window)."""
    reads = ["read 0 8k", "read 64k 4k", "read 131072 100", "read 500k 4k"]
    reads += [f"read {200 + 4 * i}k 4k" for i in range(8)]
    probes = [0, 4, 8, 12, 64, 68, 128, 132, 196, 300, 400, 504, 508]
    probes += list(range(200, 300, 4))
    out = {}
    e = server.dir_for("cache")
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        path = image(e / f"{name}.raw", 1 << 20, fill=lambda i: (i % 250) + 1)
        d = start()
        export(d, nfs(path, **cache))
        first = qemu_io(nbd_uri(d), *reads)
        path.write_bytes(b"\xaa" * (1 << 20))
        second = qemu_io(nbd_uri(d), "write -P 0x55 65636 200", "write -P 0x66 80k 4k",
                         *(f"read -v {k}k 16" for k in probes), "read -v 65632 8")
        out[name] = first + second
        d.stop()
    assert "failed" not in out["ferrite"], out["ferrite"]
    # Some pages were kept, some were not.
    assert re.search(r":  (?!aa|55|66)[0-9a-f]{2} ", out["ferrite"]), out["ferrite"]
    assert ":  aa aa aa" in out["ferrite"], out["ferrite"]
    assert out["ferrite"] == out["qsd"]


def test_negative_cache_sizes_open_without_a_cache(ferrite, server):
    """`readahead-size` and `page-cache-size` below 0: qsd hands them to libnfs as
    unsigned numbers and never returns from rounding them up (its `blockdev-add` hangs);
    ferrite opens the node without a cache."""
    e = server.dir_for("negative")
    path = image(e / "f.raw", 1 << 20, fill=lambda i: i % 200 + 1)
    d = ferrite()
    c = export(d, nfs(path, **{"readahead-size": -5}))
    for i, opt in enumerate(("readahead-size", "page-cache-size")):
        assert c.cmd("blockdev-add", nfs(path, **{"node-name": f"n{i}", opt: -1})) == \
            {"return": {}}
    read = qemu_io(nbd_uri(d), "read -P 3 8k 4k")
    assert "read 4096/4096" in read and "failed" not in read, read
    d.stop()


def test_a_node_reopened_read_only_reads_on(ferrite, server):
    """A node made read-only by `blockdev-reopen` (its caches written back) keeps its
    connection: a read-only export of it reads what was written before."""
    e = server.dir_for("reopen")
    path = image(e / "a.raw", 1 << 20, fill=lambda i: 0x30 + i % 16)
    d = ferrite()
    c = d.connect()
    assert c.cmd("blockdev-add", {"node-name": "s", **nfs(path)}) == {"return": {}}
    assert c.cmd("blockdev-reopen", {"options": [{"node-name": "s", **nfs(path), **{
        "read-only": True}}]}) == {"return": {}}
    c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": f"{d.workdir}/nbd.sock"}}})
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "s",
                                      "name": "e"}) == {"return": {}}
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x30 0 4k", "-c",
                        "read -P 0x3f 60k 4k", nbd_uri(d)], capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert "failed" not in out and out.count("read 4096/4096") == 2, out
    d.stop()


def test_backing_files_named_by_url(qsd, ferrite, server):
    """A qcow2 overlay on local disk whose backing file is an `nfs://` URL (with a uid):
    the chain opens and reads through, nodes reported as qsd reports them. An overlay on
    the export naming its backing file relatively: ferrite finds it beside the overlay;
    qsd looks in a directory named after the overlay's file (QEMU's `nfs_dirname` keeps
    the file in the path) and fails to mount it."""
    e = server.dir_for("backing")
    image(e / "base.raw", SIZE, fill=lambda i: 0x40 + i % 11)
    url = f"nfs://127.0.0.1{e}/base.raw?uid=0&gid=0"
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        top = e / f"{name}-top.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", url, "-F", "raw",
                        "-u", str(top), str(SIZE)], check=True)
        d = start()
        c = export(d, {"driver": "file", "filename": str(top)}, fmt="qcow2")
        io = qemu_io(nbd_uri(d), "read -P 0x40 0 4k", "write -P 0x99 4k 4k",
                     "read -P 0x42 8k 4k", "read -P 0x99 4k 4k")
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        text = re.sub(r"#block\d+", "#block", str(nodes)).replace(str(top), "TOP")
        got[name] = (io, text)
        d.stop()
    assert "failed" not in got["ferrite"][0], got["ferrite"][0]
    assert got["ferrite"] == got["qsd"]
    rel = e / "rel.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    "-u", str(rel), str(SIZE)], check=True)
    replies = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        d = start()
        replies[name] = d.connect().cmd("blockdev-add", {"node-name": "t", "driver": "qcow2",
                                                         "file": nfs(rel)})
        if "return" in replies[name]:
            d.connect().cmd("nbd-server-start", {"addr": {"type": "unix", "data": {
                "path": f"{d.workdir}/nbd.sock"}}})
            d.connect().cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "t",
                                                 "name": "e"})
            replies[name]["io"] = qemu_io(nbd_uri(d), "read -P 0x41 4k 4k")
        d.stop()
    assert replies["ferrite"]["return"] == {}
    assert "failed" not in replies["ferrite"]["io"], replies["ferrite"]["io"]
    assert "Mount failed with error MNT3ERR_ACCES" in replies["qsd"]["error"]["desc"]


@pytest.mark.parametrize("cache", CACHES, ids=["uncached", "pages", "readahead"])
def test_many_requests_at_once(ferrite, server, cache):
    """Thirty-two writes sent at once over one NBD connection, none in whole sectors (each
    shares its first and last sector with its neighbours), then thirty-two reads at once:
    every command finds its data (with a page cache too, none of it old), and the file
    ends as the writes left it."""
    e = server.dir_for("many")
    path = image(e / "u.raw", fill=lambda i: i & 0xff)
    expect = bytearray(path.read_bytes())
    d = ferrite()
    export(d, nfs(path, **cache))
    nc.overlapping_rounds(f"{d.workdir}/nbd.sock", expect)
    d.stop()
    assert path.read_bytes() == bytes(expect)


def test_a_restarted_server_is_connected_to_again(ferrite, server):
    """The NFS server killed while a client writes: the writes wait, and once the server
    is back ferrite connects again and they complete; nothing acknowledged is lost, and
    the export serves on."""
    e = server.dir_for("restart")
    path = image(e / "u.raw")
    d = ferrite()
    export(d, nfs(path))
    writes_across_a_restart(d, path, server.kill, server.start)
    d.stop()


def test_writes_a_restarted_server_lost_are_written_again(qsd, ferrite, server):
    """A write the server took into its memory (UNSTABLE), the server killed and that
    memory lost (the file's bytes put back behind it, as a crash loses what the server
    had not committed), the server started again, then a flush: ferrite sees by the
    COMMIT's verifier that the server restarted, writes again, and the data is there.
    qsd's libnfs keeps nothing: its flush succeeds and the write is gone (shown here as
    the reason)."""
    e = server.dir_for("lost")
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        path = image(e / f"{name}.raw", 1 << 20)
        d = start()
        export(d, nfs(path))
        c = nc.Nbd(f"{d.workdir}/nbd.sock")
        c.go("e")
        c.request(nc.CMD_WRITE, 4096, 65536, payload=b"\x77" * 65536)
        assert struct.unpack(">IIQ", c.recv(16))[:2] == (nc.SIMPLE_MAGIC, 0)
        server.kill()
        with open(path, "r+b") as f:
            f.seek(4096)
            f.write(bytes(65536))
        # ganesha's verifier is its start time in seconds: a restart within the second
        # keeps it (and clients cannot tell).
        time.sleep(1.1)
        server.start()
        c.request(nc.CMD_FLUSH)
        err = struct.unpack(">IIQ", c.recv(16))[1]
        c.close()
        d.stop()
        got[name] = (err, path.read_bytes()[4096:4096 + 65536] == b"\x77" * 65536)
    assert got["ferrite"] == (0, True)
    assert got["qsd"] == (0, False)


def test_ferrite_system_opens_nfs_names(server):
    """`-drive file=nfs://...` in ferrite-system, as in qemu-system: the same block device
    descriptions and warnings, URL parameters read as QEMU reads them (C numbers, a
    parameter without a value ending the list)."""
    from test_system import QEMU, SYSTEM
    e = server.dir_for("system")
    image(e / "a.raw", 1 << 20)
    got = {}
    for name, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        r = subprocess.run(
            [binary, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
             "-drive", f"file=nfs://127.0.0.1{e}/a.raw,format=raw,if=none,id=d0",
             "-drive", f"file=nfs://127.0.0.1{e}/a.raw?uid=0x0&gid=1000&debug=0,format=raw,"
                       "if=none,id=d1,read-only=on",
             "-drive", f"file=nfs://127.0.0.1{e}/a.raw?pagecache&foo=1,format=raw,if=none,"
                       "id=d2",
             "-drive", f"file=nfs://127.0.0.1{e}/a.raw?readahead=2097152,format=raw,if=none,"
                       "id=d3"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n'
                  '{"execute":"quit"}\n', capture_output=True, text=True, timeout=60)
        lines = [line for line in r.stdout.splitlines() if '"return"' in line]
        text = re.sub(r"#block\d+", "#block", "\n".join(lines)).replace(str(e), "E")
        stderr = r.stderr.replace(os.path.basename(binary), "PROG").replace(str(e), "E")
        got[name] = (text, stderr)
    assert "Truncating NFS readahead size" in got["ferrite"][1]
    assert got["ferrite"] == got["qemu"]


@pytest.mark.parametrize("url", [
    "nfs:foo", "nfs://127.0.0.1", "nfs://127.0.0.1:x/a", "nfs://h/a%zzb.raw",
    "nfs://h/a?uid=%zz", "nfs://h/a?uid=0x&foo=1", "nfs://h/a?uid=1&debug=-1",
    "nfs://h/a?foo=1", "nfs://h/a?uid=010&gid=0x10&readahead=1&pagecache=1&tcp-syncnt=1"
    "&debug=0&x", "nfs://h/noslash?pagecache", "nfs://nohost.invalid/e/a.raw",
])
def test_urls_are_read_as_qemu_reads_them(url):
    """URL names qemu-system refuses, or takes to a server it cannot reach: ferrite-system
    says the same."""
    from test_system import QEMU, SYSTEM
    got = {}
    for name, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        r = subprocess.run(
            [binary, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
             "-drive", f"file={url},format=raw,if=none,id=d0"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True, text=True, timeout=60)
        got[name] = (r.returncode, r.stderr.replace(os.path.basename(binary), "PROG"))
    assert got["ferrite"] == got["qemu"]


SEEDS = [1, 2, 3, 4]


@pytest.mark.skipif(subprocess.run(["unshare", "-n", "true"]).returncode != 0,
                    reason="network namespaces cannot be made here (the lying server must "
                           "own port 111)")
@pytest.mark.parametrize("seed", SEEDS)
def test_a_lying_server_brings_nothing_down(tmp_path, seed):
    """ferrite alone in a network namespace with a server that lies (nfsgarbage.py): each
    open works or fails with an error, I/O through an export answers, the node deletes,
    and the daemon serves on and never panics."""
    here = os.path.dirname(os.path.abspath(__file__))
    wrapper = tmp_path / "in-netns.sh"
    # The daemon starts once the server listens (on a loaded machine Python takes a while).
    inner = (f"ip link set lo up; python3 {here}/nfsgarbage.py {seed} 2>/dev/null & "
             f"while ! ss -ltnH sport = :111 | grep -q .; do sleep 0.05; done; "
             f"exec {FERRITE} \"$@\"")
    wrapper.write_text(f"#!/bin/sh\nexec unshare -n /bin/sh -c '{inner}' sh \"$@\"\n")
    wrapper.chmod(0o755)
    rng = random.Random(seed)
    d = Daemon(str(wrapper), tmp_path / "d")
    try:
        c = d.connect()
        sock = f"{d.workdir}/nbd.sock"
        assert c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
            == {"return": {}}
        opened = 0
        for i in range(12):
            ro = rng.random() < 0.3
            r = c.cmd("blockdev-add", {"node-name": f"n{i}", **nfs(f"/e{i}/f.raw", **(
                {"read-only": True} if ro else {}))})
            assert set(r) & {"return", "error"}, r
            if "error" in r:
                continue
            opened += 1
            r = c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": f"n{i}",
                                           "name": "e", "writable": not ro})
            if "return" in r:
                cmds = ["read 0 64k", "read 1M 300k"]
                if not ro:
                    cmds += ["write -P 0x5a 4k 200k", "write -f 0 512", "flush"]
                io = subprocess.run(["qemu-io", "-f", "raw", *sum((["-c", x] for x in cmds), []),
                                     nbd_uri(d)], capture_output=True, text=True, timeout=120)
                assert io.returncode in (0, 1), io.stderr
                assert export_del(c.cmd, "e") == {"return": {}}
                c.wait_event("BLOCK_EXPORT_DELETED")
            assert c.cmd("blockdev-del", {"node-name": f"n{i}"}) == {"return": {}}
        assert "return" in c.cmd("query-version")
        assert d.proc.poll() is None
    finally:
        d.stop()
        subprocess.run(["pkill", "-f", f"nfsgarbage.py {seed}"])
    stderr = d.stderr_path.read_text()
    assert "panicked" not in stderr, stderr
    print(f"seed {seed}: {opened} of 12 opened")
