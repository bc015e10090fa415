"""The `vhdx` driver against qemu-storage-daemon: images qemu-img made (dynamic with 8 MiB
and 1 MiB blocks, fixed, without zero blocks) opened with the same node information,
written and read through an NBD export to the same bytes on disk (new blocks at the file's
end, each BAT change through the log, which wraps around); headers updated as QEMU updates
them; a log left by a crash replayed on a writable open to the same bytes and refused on a
read-only one in the same words; `blockdev-create` and its refusals; damaged images refused
in the same words (and standard error lines). Random fields (GUIDs, the first sequence
number) and what depends on them are masked before comparing, and so is the padding after
a log entry's descriptors, where QEMU leaves whatever its heap held (guest data of earlier
requests, of any image: ferrite writes zeroes)."""
import json
import os
import shutil
import struct
import subprocess

import pytest

from blockjobs import export
from conftest import FERRITE, QSD, assert_same_transcript, recorder
from image_formats import opened_read_only, qemu_img, qemu_io_lines, used_through_nbd

MiB = 1 << 20
HEADERS = (64 << 10, 128 << 10)
LOG_AT = MiB

IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 20M 1M",
      "write -P 0x44 30M 9M", "discard 3M 1M", "write -P 0x55 63M 1M",
      "read -P 0x11 1M 64k", "read -P 0x22 3M 100k", "read -P 0x33 1047000 3000",
      "read -P 0 20M 1M", "read -P 0x44 30M 9M", "read -P 0 50M 1M", "read -P 0x55 63M 1M"]

KINDS = {
    "default": [],
    "1M-blocks": ["-o", "block_size=1M"],
    "fixed": ["-o", "subformat=fixed"],
    "no-zero-blocks": ["-o", "block_state_zero=off"],
}


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc = CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


CRC_TABLE = _table()


def sealed(buf, at=4):
    """`buf` with its CRC-32C stored at `at`."""
    buf = bytearray(buf)
    buf[at:at + 4] = bytes(4)
    struct.pack_into("<I", buf, at, crc32c(buf))
    return buf


def masked(data):
    """An image's bytes with what is random masked: header checksums, sequence numbers and
    GUIDs (a log GUID kept as set or not), log entry checksums and GUIDs, the padding after
    a log entry's descriptors, and the page 83 id."""
    b = bytearray(data)
    for at in HEADERS:
        b[at + 4:at + 32 + 16] = bytes(44)
        set_ = b[at + 48:at + 64] != bytes(16)
        b[at + 48:at + 64] = (b"G" if set_ else b"\0") * 16
    log_len = struct.unpack_from("<I", data, HEADERS[0] + 68)[0]
    for at in range(LOG_AT, LOG_AT + log_len, 4096):
        if b[at:at + 4] == b"loge":
            n = struct.unpack_from("<I", b, at + 24)[0]
            b[at + 4:at + 8] = bytes(4)
            b[at + 32:at + 48] = bytes(16)
            b[at + 64 + 32 * n:at + 4096] = bytes(max(0, 4096 - 64 - 32 * n))
    meta = metadata_at(data)
    if meta is not None:
        b[meta + (64 << 10) + 16:meta + (64 << 10) + 32] = bytes(16)
    return bytes(b)


def metadata_at(data):
    """The metadata region's offset, from the region table."""
    rt = 192 << 10
    for i in range(struct.unpack_from("<I", data, rt + 8)[0]):
        e = rt + 16 + 32 * i
        if data[e:e + 4] == bytes.fromhex("06a27c8b"):
            return struct.unpack_from("<Q", data, e + 16)[0]
    return None


def headers_of(img):
    """Both headers: (sequence, file GUID, data GUID, log GUID, checksum valid)."""
    data = img.read_bytes()
    out = []
    for at in HEADERS:
        block = data[at:at + 4096]
        seq = struct.unpack_from("<Q", block, 8)[0]
        ok = struct.unpack_from("<I", block, 4)[0] == crc32c(block[:4] + bytes(4) + block[8:])
        out.append((seq, block[16:32], block[32:48], block[48:64], ok))
    return out


@pytest.fixture(scope="module", params=list(KINDS))
def image(tmp_path_factory, request):
    """A 64 MiB image qemu-img made, with a pattern at 1 MiB."""
    img = tmp_path_factory.mktemp("vhdx") / "v.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", *KINDS[request.param], str(img), "64M")
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x11 1M 64k", str(img)],
                   check=True, capture_output=True)
    return img


def used_by_both(both, src, io):
    """`src` used by both daemons through an export: their transcripts, and the files."""
    results, files = [], []
    for d in both():
        img = d.workdir / src.name
        shutil.copy(src, img)
        results.append(used_through_nbd(d, img, "vhdx", io, 128 * MiB))
        files.append(img.read_bytes())
    return results, files


def test_vhdx_image_matches_qsd(both, image):
    results, files = used_by_both(both, image, IO)
    assert_same_transcript(*results)
    assert "No errors were found" in results[1][-1][1]
    assert masked(files[1]) == masked(files[0])


def test_the_log_wraps_around_as_qsd_writes_it(both, tmp_path):
    """140 new 1 MiB blocks: 140 log entries of two sectors, around a 1 MiB log once."""
    src = tmp_path / "w.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(src), "300M")
    io = [f"write -P {i % 250 + 1} {2 * i}M 4k" for i in range(140)]
    io += [f"read -P {i % 250 + 1} {2 * i}M 4k" for i in range(0, 140, 13)]
    results, files = used_by_both(both, src, io)
    assert_same_transcript(*results)
    assert masked(files[1]) == masked(files[0])
    assert files[1][LOG_AT + (280 % 256) * 4096:][:4] == b"loge"


def test_headers_change_as_qemu_changes_them(both, tmp_path):
    """Opening changes nothing; the first write updates both headers (new sequence numbers,
    this session's file GUID, new data GUIDs), each new block three times more (log GUID set,
    then cleared); reads and writes into present blocks change no header."""
    src = tmp_path / "h.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", str(src), "64M")
    seen = []
    for d in both():
        img = d.workdir / "h.vhdx"
        shutil.copy(src, img)
        before = headers_of(img)
        c = d.connect()
        assert c.cmd("blockdev-add", {"driver": "vhdx", "node-name": "v", "file": {
            "driver": "file", "filename": str(img)}}) == {"return": {}}
        opened = headers_of(img)
        uri = export(c, d, "v", "v", True)
        steps = [opened == before]
        for op in ("write -P 1 0 4k", "write -P 2 8k 4k", "write -P 3 9M 4k"):
            qemu_io_lines("-f", "raw", "-c", op, uri)
            h = headers_of(img)
            steps.append([(s - before[1][0], f == before[0][1], dg == before[0][2],
                           lg == bytes(16), ok) for s, f, dg, lg, ok in h])
            steps.append(h[0][1] == h[1][1])
        c.close()
        d.stop()
        seen.append(steps)
    assert seen[1] == seen[0]


def log_entry(seq, guid, descs, file_len, tail=0, last=None):
    """A log entry: `descs` are ("data", offset, 4096 bytes) or ("zero", offset, length)."""
    data = [d for d in descs if d[0] == "data"]
    desc_sectors = (len(descs) + 2 + 127) // 128
    total = (desc_sectors + len(data)) * 4096
    head = bytearray(desc_sectors * 4096)
    struct.pack_into("<4sIIIQII16sQQ", head, 0, b"loge", 0, total, tail, seq, len(descs), 0,
                     guid, file_len, file_len if last is None else last)
    body = bytearray()
    for i, (kind, at, x) in enumerate(descs):
        if kind == "data":
            struct.pack_into("<4s4sQQQ", head, 64 + 32 * i, b"desc", x[4092:], 
                             struct.unpack_from("<Q", x)[0], at, seq)
            body += struct.pack("<4sI", b"data", seq >> 32) + x[8:4092] + \
                struct.pack("<I", seq & 0xFFFFFFFF)
        else:
            struct.pack_into("<4sIQQQ", head, 64 + 32 * i, b"zero", 0, x, at, seq)
    return sealed(bytes(head) + bytes(body))


def with_pending_log(tmp_path, name="l.vhdx", grow=None):
    """An image whose log holds an entry not yet applied: block 2's BAT entry pointing at
    a block of 0x77 (appended to the file) and 64 KiB of block 0 (present) zeroed; the
    headers naming the log. An older entry of another run sits before it."""
    img = tmp_path / name
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), "16M")
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 1M", str(img)],
                   check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    bat_at = 2 * MiB
    new_block = len(data)
    data += b"\x77" * MiB
    file_len = len(data) + (3 * MiB if grow == "flushed" else 0)
    last = len(data) + 3 * MiB + 4096 if grow == "last" else None
    sector = bytearray(data[bat_at:bat_at + 4096])
    struct.pack_into("<Q", sector, 16, new_block | 6)
    block0 = struct.unpack_from("<Q", data, bat_at)[0] & ~0xFFFFF
    guid = bytes(range(16))
    old = log_entry(3, guid, [("zero", block0, 4096)], file_len)
    new = log_entry(7, guid, [("data", bat_at, bytes(sector)), ("zero", block0, 65536)],
                    file_len, tail=len(old), last=last)
    data[LOG_AT:LOG_AT + len(old)] = old
    data[LOG_AT + 8192:LOG_AT + 8192 + len(new)] = new
    for at in HEADERS:
        block = bytearray(data[at:at + 4096])
        block[48:64] = guid
        data[at:at + 4096] = sealed(block)
    img.write_bytes(bytes(data))
    return img


@pytest.mark.parametrize("grow", [None, "last", "flushed"],
                         ids=["same-size", "grows", "flushed-past-end"])
def test_a_pending_log_is_replayed_on_a_writable_open_as_qsd_replays_it(both, tmp_path, grow):
    src = with_pending_log(tmp_path, grow=grow)
    results, files = [], []
    for d in both():
        img = d.workdir / "l.vhdx"
        shutil.copy(src, img)
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "vhdx", "node-name": "r", "read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "read-only": True}})
        out.append(("untouched", img.read_bytes() == src.read_bytes()))
        cmd("blockdev-add", {"driver": "vhdx", "node-name": "v",
                             "file": {"driver": "file", "filename": str(img)}})
        if "error" not in out[-1][1]:
            uri = export(c, d, "v", "v", True)
            out.append(("io", qemu_io_lines(
                "-f", "raw", "-c", "read -P 0 0 64k", "-c", "read -P 0x11 64k 960k",
                "-c", "read -P 0x77 2M 1M", "-c", "read -P 0 3M 1M",
                "-c", "write -P 0x12 5M 4k", "-c", "read -P 0x12 5M 4k", uri)))
        out.append(("size", img.stat().st_size))
        c.close()
        d.stop()
        out.append(("headers", [(lg == bytes(16), ok) for _, _, _, lg, ok in headers_of(img)]))
        results.append(json.loads(json.dumps(out).replace(str(img), "IMG")))
        files.append(img.read_bytes())
    assert_same_transcript(*results)
    assert "opened read-only, but contains a log" in json.dumps(results[1])
    assert masked(files[1]) == masked(files[0])


def create(d, options):
    img = d.workdir / "n.vhdx"
    img.write_bytes(b"")
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                  "filename": str(img)}) == {"return": {}}
    r = c.cmd("blockdev-create", {"job-id": "c", "options": {"driver": "vhdx", "file": "f",
                                                             **options}})
    if "error" in r:
        c.close()
        d.stop()
        return r["error"], b""
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    error = c.cmd("query-jobs")["return"][0].get("error")
    c.close()
    d.stop()
    data = img.read_bytes()
    return error, masked(data) if len(data) > (256 << 10) else data


CREATE = {
    "default": {"size": 64 * MiB},
    "empty": {"size": 0},
    "large": {"size": 200 << 30},
    "huge": {"size": 40 << 40},
    "fixed": {"size": 20 * MiB, "subformat": "fixed"},
    "fixed-no-zero": {"size": 20 * MiB + 512, "subformat": "fixed", "block-state-zero": False},
    "no-zero-blocks": {"size": 3 << 30, "block-state-zero": False},
    "1M-blocks": {"size": 9 << 30, "block-size": MiB, "log-size": 2 * MiB},
    "too-large": {"size": (64 << 40) + 512},
    "log-size-odd": {"size": MiB, "log-size": 3 * MiB // 2},
    "log-size-4G": {"size": MiB, "log-size": 4 << 30},
    "block-size-odd": {"size": MiB, "block-size": 3 * MiB // 2},
    "block-size-3M": {"size": MiB, "block-size": 3 * MiB},
    "block-size-512M": {"size": MiB, "block-size": 512 * MiB},
    "subformat-bad": {"size": MiB, "subformat": "differencing"},
}


@pytest.mark.parametrize("name", list(CREATE))
def test_blockdev_create_matches_qsd(both, name):
    q, f = both()
    theirs, ours = create(q, CREATE[name]), create(f, CREATE[name])
    assert ours[0] == theirs[0]
    assert len(ours[1]) == len(theirs[1])
    assert ours[1] == theirs[1]


def test_a_created_image_opens_and_takes_data_in_both(both):
    """ferrite's new image used by qsd, and qsd's by ferrite."""
    q, f = both()
    for d in (q, f):
        create(d, {"size": 32 * MiB})
    for d, img in zip(both(), (f.workdir / "n.vhdx", q.workdir / "n.vhdx")):
        c = d.connect()
        assert c.cmd("blockdev-add", {"driver": "vhdx", "node-name": "v", "file": {
            "driver": "file", "filename": str(img)}}) == {"return": {}}
        uri = export(c, d, "v", "v", True)
        lines = qemu_io_lines("-f", "raw", "-c", "write -P 0x5a 7M 2M",
                              "-c", "read -P 0x5a 7M 2M", "-c", "read -P 0 0 7M", uri)
        assert not any("fail" in ln or "mismatch" in ln for ln in lines), lines
        c.close()
        d.stop()
        r = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(img)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def poke(data, at, fmt, value):
    struct.pack_into(fmt, data, at, value)


def damaged(tmp_path, name, change):
    img = tmp_path / f"{name}.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", str(img), "8M")
    subprocess.run(["qemu-io", "-f", "vhdx", "-c", "write -P 0x11 0 64k", str(img)],
                   check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    change(data)
    img.write_bytes(bytes(data))
    return img


def header(field_at, fmt, value, which=(0, 1)):
    def change(data):
        for i in which:
            at = HEADERS[i]
            poke(data, at + field_at, fmt, value)
            data[at:at + 4096] = sealed(data[at:at + 4096])
    return change


def region(entry, field_at, fmt, value):
    def change(data):
        for rt in (192 << 10, 256 << 10):
            poke(data, rt + 16 + 32 * entry + field_at, fmt, value)
            data[rt:rt + 65536] = sealed(data[rt:rt + 65536])
    return change


def meta(field_at, fmt, value):
    def change(data):
        poke(data, metadata_at(data) + field_at, fmt, value)
    return change


def bat(entry, value):
    def change(data):
        poke(data, 2 * MiB + 8 * entry, "<Q", value)
    return change


def seq(first, second):
    def change(data):
        header(8, "<Q", first, (0,))(data)
        header(8, "<Q", second, (1,))(data)
    return change


DAMAGE = {
    "signature": lambda d: d.__setitem__(slice(0, 8), b"vhdxfilf"),
    "headers-checksum": lambda d: [d.__setitem__(slice(a + 4, a + 8), b"XXXX") for a in HEADERS],
    "one-header-checksum": lambda d: d.__setitem__(slice(HEADERS[1] + 4, HEADERS[1] + 8), b"XX"),
    "version-2": header(66, "<H", 2),
    "same-sequence": seq(5, 5),
    "same-sequence-same-header": lambda d: (header(8, "<Q", 9)(d),
                                            d.__setitem__(slice(HEADERS[1], HEADERS[1] + 80),
                                                          d[HEADERS[0]:HEADERS[0] + 80])),
    "older-header-current": seq(9, 3),
    "log-version": header(64, "<H", 1),
    "log-offset-unaligned": header(72, "<Q", MiB + 4096),
    "log-offset-low": header(72, "<Q", 0),
    "log-length-odd": lambda d: (header(68, "<I", MiB + 4096)(d),
                                 header(48, "16s", bytes(range(1, 17)))(d)),
    "log-guid-no-entries": header(48, "16s", bytes(range(1, 17))),
    "log-offset-huge": lambda d: (header(72, "<Q", 0xFFFFFFFFFFF00000)(d),
                                  header(48, "16s", bytes(range(1, 17)))(d)),
    "region-checksum": lambda d: d.__setitem__(slice((192 << 10) + 4, (192 << 10) + 8), b"XXXX"),
    "region-count": region(-1, 8, "<I", 2048),
    "region-overlap": region(1, 16, "<Q", 2 * MiB),
    "region-overlaps-log": region(0, 16, "<Q", MiB),
    "region-unknown-required": lambda d: (region(1, 0, "16s", bytes(16))(d),
                                          region(1, 28, "<I", 1)(d)),
    "region-unknown-optional": lambda d: (region(1, 0, "16s", bytes(16))(d)),
    "bat-too-small": region(0, 24, "<I", 8),
    "metadata-signature": meta(0, "8s", b"metadatb"),
    "metadata-count": meta(10, "<H", 2048),
    "block-size-3M": meta(65536, "<I", 3 * MiB),
    "block-size-512M": meta(65536, "<I", 512 * MiB),
    "has-parent": meta(65540, "<I", 2),
    "logical-4k": meta(65536 + 32, "<I", 4096),
    "metadata-unknown-required": lambda d: (meta(32 + 64, "16s", bytes(16))(d)),
    "bat-past-end": bat(3, (1 << 40) | 6),
    "bat-end-past-end": lambda d: bat(3, ((len(d) - MiB // 2) & ~0xFFFFF) | 6)(d),
    "bat-over-metadata": bat(3, (3 * MiB) | 6),
    "bat-offset-overflow": bat(3, 0xFFFFFFFFFFF00006),
    "bat-partially-present": bat(1, 7),
    "bat-state-4": bat(1, 4),
    "bat-at-file-start": bat(1, 6),
    "disk-size-huge": meta(65544, "<Q", 1 << 62),
    "disk-size-odd": meta(65544, "<Q", 8 * MiB + 100),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_images_are_refused_as_qsd_refuses_them(both, tmp_path, name):
    img = damaged(tmp_path, name, DAMAGE[name])
    # The failing read last: QEMU's NBD server drops the connection when a read fails.
    opened_read_only(both, img, "vhdx", ["read -P 0x11 0 64k", "read 7M 1M",
                                         "read -P 0 1M 64k"], stderr_with="VHDX")


def test_node_information_and_refusals_as_qsd(both, tmp_path):
    """Cluster size is the block size, no dirty flag; resize refused; the node removed."""
    img = tmp_path / "i.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=2M", str(img), "10M")
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "vhdx", "node-name": "v", "read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "read-only": True}})
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append(("image", [{k: n["image"].get(k) for k in
                               ("virtual-size", "cluster-size", "format", "dirty-flag")}
                              for n in nodes if n["node-name"] == "v"]))
        cmd("block_resize", {"node-name": "v", "size": 20 * MiB})
        cmd("blockdev-del", {"node-name": "v"})
        c.close()
        d.stop()
        results.append(json.loads(json.dumps(out).replace(str(img), "IMG")))
    assert_same_transcript(*results)


def backup_by_name(binary, workdir, options):
    """drive-backup into a new VHDX image made by name (qemu-system's image creation from
    a format name: `Formatting ...` and the rounded options): its events, the image's
    size and `qemu-img info` fields, and its data against the source."""
    from test_system import Machine
    src = workdir / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "20000k")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 1M 1M", str(src)],
                   check=True, capture_output=True)
    m = Machine(binary, "tcg", workdir, ["-drive", f"file={src},if=none,id=disk"])
    target = workdir / "t.vhdx"
    try:
        out = [m.qmp.cmd("drive-backup", {"device": "disk", "target": str(target),
                                          "format": "vhdx", "sync": "full", **options})]
        out.append(m.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=30)["data"].get("error"))
        m.qmp.cmd("quit")
        m.proc.wait(20)
    finally:
        m.stop()
    info = json.loads(qemu_img("info", "--output=json", str(target)).stdout)
    same = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vhdx", str(src),
                           str(target)], capture_output=True, text=True).returncode
    out.append((info["virtual-size"], info.get("cluster-size"), target.stat().st_size, same))
    return out


def test_an_image_created_by_name_matches_qemu_system(tmp_path):
    from test_system import QEMU, SYSTEM
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")
    for name, options in (("plain", {}), ("mode", {"mode": "absolute-paths"})):
        (tmp_path / name / "q").mkdir(parents=True)
        (tmp_path / name / "f").mkdir(parents=True)
        expected = backup_by_name(QEMU, tmp_path / name / "q", options)
        got = backup_by_name(SYSTEM, tmp_path / name / "f", options)
        assert got == expected
        assert got[-1][-1] == 0


@pytest.mark.parametrize("name", ["bat-past-end", "region-overlap"])
def test_a_damaged_image_on_the_command_line_is_reported_as_qsd_reports_it(tmp_path, name):
    """From `--blockdev`, QEMU's messages name the program and the option first (from a
    monitor command, nothing)."""
    img = damaged(tmp_path, name, DAMAGE[name])
    seen = []
    for binary in (QSD, FERRITE):
        r = subprocess.run([binary, "--blockdev", f"file,node-name=f,filename={img}",
                            "--blockdev", "vhdx,node-name=v,file=f"],
                           capture_output=True, text=True, timeout=30)
        seen.append((r.returncode, r.stderr.replace(os.path.basename(binary), "PROG")))
    assert seen[1] == seen[0]
    assert seen[1][1].startswith("PROG: --blockdev vhdx,node-name=v,file=f: VHDX")
