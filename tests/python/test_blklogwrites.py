"""The `blklogwrites` filter against qemu-storage-daemon: its option checks and node queries,
and the log it writes (dm-log-writes format) for writes, zeroings, discards, flushes and FUA
through an NBD export, byte for byte, with other sector sizes and superblock intervals, when
appending to a log, and when the node is deleted. Beyond QEMU: a discard of partial sectors,
which aborts qemu-storage-daemon, and a superblock claiming more entries than the log can
hold, which QEMU would count one read at a time."""
import hashlib
import json
import re
import struct
import subprocess

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder
from nbdclient import CMD_WRITE, Nbd

MiB = 1 << 20
MAGIC = 0x6a736677736872


def parse_log(data):
    """(superblock fields, entries as (sector, sectors, flags, data digest)) of a log."""
    magic, version, count, sector = struct.unpack_from("<QQQI", data, 0)
    entries, at = [], 1
    for _ in range(count):
        s, n, flags, _ = struct.unpack_from("<QQQQ", data, at * sector)
        body = 0 if flags & 4 else n
        digest = hashlib.md5(data[(at + 1) * sector:(at + 1 + body) * sector]).hexdigest()
        entries.append((s, n, flags, digest if body else None))
        at += 1 + body
    return (magic, version, count, sector), entries


def superblock(count, sector=512, magic=MAGIC, version=1):
    return struct.pack("<QQQI", magic, version, count, sector)


def entry(sector, sectors, flags):
    return struct.pack("<QQQQ", sector, sectors, flags, 0)


def qemu_io(uri, ops, cache="writethrough"):
    args = ["qemu-io", "-f", "raw", "-t", cache]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run([*args, uri], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln] + r.stderr.splitlines()


def logged(d, ops, options=None, cache="writethrough", seed_log=b""):
    """`ops` (qemu-io commands) through an export of a blklogwrites node over a 4 MiB
    image, the node deleted at the end: qemu-io's output, the image and the log."""
    w = d.workdir
    (w / "img").write_bytes(b"\x11" * (4 * MiB))
    (w / "log").write_bytes(seed_log)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "img",
                         "discard": "unmap"})
    cmd("blockdev-add", {"driver": "file", "node-name": "l", "filename": "log"})
    cmd("blockdev-add", {"driver": "blklogwrites", "node-name": "x", "file": "f",
                         "log": "l", "discard": "unmap", **(options or {})})
    uri = export(c, d, "x", "x", True)
    out.append(("io", qemu_io(uri, ops, cache)))
    # qemu-io has gone, but its connection's end may not have been seen yet: a safe-mode
    # delete would then be refused as still in use.
    cmd("block-export-del", {"id": "x", "mode": "hard"})
    c.wait_event("BLOCK_EXPORT_DELETED")
    # Deleting the node flushes it: a write since the last flush logs one more entry.
    cmd("blockdev-del", {"node-name": "x"})
    out.append(("img", hashlib.md5((w / "img").read_bytes()).hexdigest()))
    log = (w / "log").read_bytes()
    c.close()
    d.stop()
    return out, log


SEQUENCE = [
    "write -P 0x22 0 64k",
    "write -P 0x33 1000 3000",
    "write -z 8192 4096",
    "write -z 12300 5000",
    "write -z 20000 100",
    "write -z 1100 1200",
    "discard 65536 65536",
    "flush",
    "write -f -P 0x44 300000 512",
    "write -f -P 0x45 400000 1024",
    "write -P 0x46 500000 4096",
    "write -z -f 600000 8192",
    "write -P 0x47 2M 1M",
    "flush",
    "read -P 0x22 0 1000",
    "read -P 0x33 1000 3000",
    "read -P 0 8192 4096",
    "read -P 0x47 2M 1M",
]


def assert_logged_alike(both, ops, **kw):
    q, f = both()
    expected, expected_log = logged(q, ops, **kw)
    got, got_log = logged(f, ops, **kw)
    assert_same_transcript(expected, got)
    assert parse_log(got_log) == parse_log(expected_log)
    assert got_log == expected_log
    return got_log


def test_writes_are_logged_as_qsd_logs_them(both):
    log = assert_logged_alike(both, SEQUENCE)
    (_, _, count, sector), entries = parse_log(log)
    assert sector == 512 and count == len(entries) > len(SEQUENCE)


def test_writeback_client_with_4k_log_sectors_and_frequent_superblocks(both):
    log = assert_logged_alike(both, SEQUENCE, cache="writeback",
                              options={"log-sector-size": 4096,
                                       "log-super-update-interval": 3})
    assert parse_log(log)[0][3] == 4096


def test_appending_to_a_log_qsd_wrote(both, qsd):
    first, seed = logged(qsd(), SEQUENCE[:6])
    assert first[-2][0] == "blockdev-del"
    assert_logged_alike(both, SEQUENCE[6:], options={"log-append": True}, seed_log=seed)


def opened(d, logs):
    """blockdev-add of a blklogwrites node with each option set (and log contents), the node
    queries, a resize through the filter."""
    w = d.workdir
    with open(w / "img", "wb") as img:
        img.truncate(MiB)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "img"})
    for i, (content, options) in enumerate(logs):
        path = w / f"log{i}"
        if content is not None:
            path.write_bytes(content)
        log = {"driver": "file", "filename": path.name}
        cmd("blockdev-add", {"driver": "blklogwrites", "node-name": f"x{i}",
                             "file": {"driver": "file", "filename": "img", "locking": "off"},
                             "log": log, **options})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = re.sub(r"#block\d+", "#block", normalize(json.dumps(nodes))).replace(str(w), "W")
    out.append(("nodes", json.loads(text)))
    cmd("block_resize", {"node-name": "x0", "size": 2 * MiB})
    cmd("query-block-exports", {})
    c.close()
    d.stop()
    out.append(("img size", (w / "img").stat().st_size))
    return out


LOGS = [
    (b"", {}),
    (b"", {"log-append": True}),
    (superblock(2) + b"\0" * 484 + entry(0, 1, 0) + b"\0" * 480 + b"\x5a" * 512
     + entry(0, 0, 1), {"log-append": False, "log-super-update-interval": 7}),
    (superblock(2) + b"\0" * 484 + entry(0, 1, 0) + b"\0" * 480 + b"\x5a" * 512
     + entry(0, 0, 1), {"log-append": True}),
    (None, {}),
    (b"", {"log-sector-size": 4096}),
    (b"", {"log-sector-size": 100}),
    (b"", {"log-sector-size": 16}),
    (b"", {"log-sector-size": 1 << 24}),
    (b"", {"log-super-update-interval": 0}),
    (b"", {"log-append": True, "log-sector-size": 512}),
    (b"not a log", {"log-append": True}),
    (b"short", {"log-append": True}),
    (superblock(0, version=2), {"log-append": True}),
    (superblock(0, sector=100), {"log-append": True}),
    (superblock(0, sector=0), {"log-append": True}),
    (superblock(3) + b"\0" * 484 + entry(0, 1, 0x10), {"log-append": True}),
    (superblock(3) + b"\0" * 484 + entry(0, 1, 8) + b"\0" * 992 + entry(0, 2, 4),
     {"log-append": True}),
    (superblock(5), {"log-append": True}),
]


def test_options_and_queries_as_qsd(both):
    q, f = both()
    assert_same_transcript(opened(q, LOGS), opened(f, LOGS))


def test_a_superblock_counting_more_entries_than_a_log_can_hold(ferrite):
    """QEMU reads such entries one by one (past the log's end they read as zeroes, a sector
    each) until an offset passes the largest a request may reach: 2^54 reads. ferrite
    counts them, and fails where QEMU would, at once."""
    d = ferrite()
    (d.workdir / "img").write_bytes(b"\0" * MiB)
    (d.workdir / "log").write_bytes(superblock(1 << 62))
    c = d.connect()
    r = c.cmd("blockdev-add", {"driver": "blklogwrites", "node-name": "x", "log-append": True,
                               "file": {"driver": "file", "filename": "img"},
                               "log": {"driver": "file", "filename": "log"}})
    # The last readable entry sector is (2^63 - 2^30 - 32) >> 9; entry i is at sector i + 1.
    last = ((2**63 - 2**30) - 32) >> 9
    assert r["error"]["desc"] == f"Failed to read log entry {last}: Input/output error"
    (d.workdir / "log").write_bytes(superblock(last))
    r = c.cmd("blockdev-add", {"driver": "blklogwrites", "node-name": "x", "log-append": True,
                               "file": {"driver": "file", "filename": "img"},
                               "log": {"driver": "file", "filename": "log"}})
    assert r == {"return": {}}


def test_a_discard_of_partial_sectors_logs_the_whole_ones(ferrite):
    """qemu-storage-daemon aborts on such a discard (its driver asserts the request is
    aligned, and its block layer hands it the partial sectors); ferrite discards and logs
    the whole sectors inside the range and leaves the rest."""
    d = ferrite()
    out, log = logged(d, ["discard 1000 2000", "discard 200000 100", "discard 4000 100000",
                          "write -P 0x66 8192 512", "read -P 0x66 8192 512"], cache="writeback")
    assert [ln for ln in out if ln[0] == "io"][0][1] == [
        "discard 2000/2000 bytes at offset 1000",
        "discard 100/100 bytes at offset 200000",
        "discard 100000/100000 bytes at offset 4000",
        "wrote 512/512 bytes at offset 8192",
        "read 512/512 bytes at offset 8192",
    ]
    _, entries = parse_log(log)
    assert entries[:3] == [(2, 3, 4, None), (8, 195, 4, None),
                           (16, 1, 0, hashlib.md5(b"\x66" * 512).hexdigest())]
    assert entries[3][2] == 1  # the node deleted after a write: a flush


def test_concurrent_writes_each_get_their_own_place(ferrite):
    """Sixteen writes in flight at once: each entry has its own sectors, holding its data."""
    d = ferrite()
    ops = [f"aio_write -P {0x30 + i} {i * 128}k 64k" for i in range(16)] + ["aio_flush"]
    _, log = logged(d, ops, cache="writeback")
    (_, _, count, _), entries = parse_log(log)
    writes = sorted(e for e in entries if e[2] == 0)
    assert writes == [(i * 256, 128, 0, hashlib.md5(bytes([0x30 + i]) * 65536).hexdigest())
                      for i in range(16)]
    assert count == len(entries) == 17


def test_a_log_ferrite_wrote_is_appended_to_by_qsd(ferrite, qsd):
    _, seed = logged(ferrite(), SEQUENCE[:8])
    _, log = logged(qsd(), SEQUENCE[8:], options={"log-append": True}, seed_log=seed)
    (_, _, count, _), entries = parse_log(log)
    assert entries[:parse_log(seed)[0][2]] == parse_log(seed)[1]
    assert count == len(entries)


def test_concurrent_writes_sharing_sectors_lose_nothing(ferrite):
    """Sixteen 100-byte writes sent at once by a client that does not pad them (qemu-io
    pads to the export's 512-byte blocks itself), neighbours sharing sectors: each is
    padded to whole sectors by reading around it, and none may undo another."""
    d = ferrite()
    w = d.workdir
    (w / "img").write_bytes(b"\x11" * MiB)
    (w / "log").write_bytes(b"")
    c = d.connect()
    assert c.cmd("blockdev-add", {
        "driver": "blklogwrites", "node-name": "x",
        "file": {"driver": "file", "filename": "img"},
        "log": {"driver": "file", "filename": "log"}}) == {"return": {}}
    export(c, d, "x", "x", True)
    nbd = Nbd(str(w / "nbd.sock"))
    nbd.go("x")
    for i in range(16):
        nbd.request(CMD_WRITE, i * 100, 100, payload=bytes([0x40 + i]) * 100)
    assert [nbd.simple_reply()[0] for _ in range(16)] == [0] * 16
    nbd.close()
    c.close()
    d.stop()
    img = (w / "img").read_bytes()
    assert img[:1600] == b"".join(bytes([0x40 + i]) * 100 for i in range(16))
    assert img[1600:2048] == b"\x11" * 448
    (_, _, count, _), entries = parse_log((w / "log").read_bytes())
    assert count == 17 and sum(1 for e in entries if e[2] == 0) == 16


def test_concurrent_fua_writes_log_the_flushes_qsd_logs(both):
    """Two FUA writes in flight: their flushes go one after the other, and the second finds
    its writes covered by the first (QEMU's flush generations), so one flush fewer is
    logged than flushes were asked. The writes' order may differ; the entries may not."""
    ops = ["write -P 0x22 0 64k", "aio_write -P 0x55 1M 64k", "aio_write -P 0x56 2M 64k",
           "aio_flush"]
    q, f = both()
    logs = [parse_log(logged(d, ops)[1]) for d in (q, f)]
    assert sorted(logs[1][1]) == sorted(logs[0][1])
