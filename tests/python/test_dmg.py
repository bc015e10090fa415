"""The `dmg` driver against qemu-storage-daemon: Apple disk images (UDIF) written here as
Apple's tools lay them out (a data fork of chunks stored raw, zlib- or bzip2-compressed,
zeroes; `mish` tables in a property list or a resource fork; the `koly` trailer), opened
read-only with the same node information and read through an NBD export to the same bytes
and the same errors; damaged trailers, tables and chunks refused or failing in the same
words; the format probed by its name, as QEMU probes it.

qemu-storage-daemon 10.0.2 as Debian ships it has no `dmg-bz2` module: it leaves bzip2
chunks out (with its warning) and fails their reads. ferrite reads them; those reads are
checked against the data the image was made from, and qsd's warning is the one line of its
standard error ferrite does not print."""
import base64
import bz2
import json
import re
import struct
import subprocess
import zlib

import pytest

from image_formats import (assert_writable_opens_refused_or_made_read_only, exported_read_only,
                           qemu_io_lines)
from blockjobs import export
from conftest import assert_same_transcript, recorder

SECTOR = 512
UDZE, UDRW, UDIG, UDCO, UDZO, UDBZ, ULFO = 0, 1, 2, 0x80000004, 0x80000005, 0x80000006, 0x80000007
UDCM, UDLE = 0x7ffffffe, 0xffffffff


def sector_bytes(n):
    """The disk's sector `n`: its number, then a counting pattern."""
    return struct.pack(">I", n) + bytes((n + i) % 251 for i in range(SECTOR - 4))


def mish(entries, first_sector, data_offset):
    """A `mish` block: its header (first sector, data offset) and chunk entries of
    (type, sector, count, offset, length), relative to those."""
    count = sum(e[2] for e in entries)
    head = b"mish" + struct.pack(">IQQQII", 1, first_sector, count, data_offset, 0, 0)
    head = head.ljust(200, b"\0") + struct.pack(">I", len(entries))
    return head + b"".join(struct.pack(">IIQQQQ", t, 0, s, c, o, l) for t, s, c, o, l in entries)


class Image:
    """A UDIF image under construction: chunks added to its data fork, grouped in `mish`
    blocks."""

    def __init__(self):
        self.fork = bytearray()
        self.blocks = []

    def block(self, first_sector, chunks):
        """A `mish` block of `chunks` (type, first sector relative to `first_sector`,
        count, and for stored types the bytes or an override of (offset, length))."""
        base = len(self.fork)
        entries = []
        for chunk in chunks:
            t, s, c = chunk[:3]
            data = chunk[3] if len(chunk) > 3 else None
            if isinstance(data, tuple):
                entries.append((t, s, c, *data))
                continue
            if data is None and t in (UDRW, UDZO, UDBZ, UDCO):
                raw = b"".join(sector_bytes(first_sector + s + i) for i in range(c))
                data = {UDRW: raw, UDZO: zlib.compress(raw), UDBZ: bz2.compress(raw),
                        UDCO: raw[:100]}[t]
            data = data or b""
            entries.append((t, s, c, len(self.fork) - base, len(data)))
            self.fork += data
        self.blocks.append(mish(entries, first_sector, base))

    def plist(self, blocks=None):
        body = "".join(f"<dict><key>Data</key><data>\n\t{base64.b64encode(b).decode()}\n"
                       "\t</data></dict>" for b in (blocks or self.blocks))
        return ("<?xml version=\"1.0\"?><plist version=\"1.0\"><dict><key>resource-fork</key>"
                f"<dict><key>blkx</key><array>{body}</array></dict></dict></plist>").encode()

    def resource_fork(self):
        data = b"".join(struct.pack(">I", len(b)) + b for b in self.blocks)
        return struct.pack(">IIII", 256, 256 + len(data), len(data), 0).ljust(256, b"\0") + data

    def write(self, path, sectors, form="plist", trailer=None, info=None, pad=0):
        """The image: data fork, property list or resource fork, trailer (fields
        overridden by `trailer`: {offset: (fmt, value)})."""
        out = bytearray(self.fork)
        info = info if info is not None else (self.plist() if form == "plist"
                                                else self.resource_fork())
        info_at = len(out)
        out += info
        out += b"\0" * pad
        koly = bytearray(512)
        koly[0:4] = b"koly"
        struct.pack_into(">III", koly, 4, 4, 512, 1)
        struct.pack_into(">QQQ", koly, 0x10, 0, 0, len(self.fork))
        if form == "plist":
            struct.pack_into(">QQ", koly, 0xd8, info_at, len(info))
        else:
            struct.pack_into(">QQ", koly, 0x28, info_at, len(info))
        struct.pack_into(">Q", koly, 0x1ec, sectors)
        for at, (fmt, value) in (trailer or {}).items():
            struct.pack_into(fmt, koly, at, value)
        path.write_bytes(bytes(out + koly))
        return path


def sample(tmp_path, form="plist"):
    """Two `mish` blocks: raw, zlib, zeroes, ignored, a comment, a long zlib chunk, bzip2,
    an ADC chunk (neither knows it), a gap no chunk covers, and the end marker."""
    img = Image()
    img.block(0, [(UDRW, 0, 64), (UDZO, 64, 128), (UDZE, 192, 256), (UDIG, 448, 64),
                  (UDCM, 512, 0), (UDZO, 512, 512), (UDLE, 1024, 0)])
    img.block(1024, [(UDBZ, 0, 128), (UDCO, 128, 8), (UDRW, 200, 56), (UDLE, 256, 0)])
    return img.write(tmp_path / f"disk-{form}.dmg", 1024 + 256 + 64, form)


# In sectors: raw 0-63, zlib 64-191, zeroes 192-447, ignored 448-511, zlib 512-1023;
# bzip2 1024-1151, ADC 1152-1159, nothing 1160-1223, raw 1224-1279, nothing to 1343.
READS = ["read -v 0 1k", "read -v 32k 1k", "read -v 98816 1k", "read -v 200k 512",
         "read -v 230k 1k", "read -v 300k 2k", "read -v 511k 1k", "read 0 512k",
         "read 576k 4k", "read 590k 4k", "read -v 612k 1k", "read 620k 20k",
         "read 640k 4k", "read -v 639k 1k"]
BZIP2_READS = ["read 512k 64k", "read 520k 4k"]


def reads(d, uri, ops):
    """Each of `ops` on a connection of its own: qemu-storage-daemon drops an NBD client
    whose read fails (its structured read gives up on the connection); ferrite replies
    with the error and serves on."""
    return [ln for op in ops for ln in qemu_io_lines("-r", "-f", "raw", "-c", op, uri)]


def stderr_lines(d):
    """The daemon's standard error without the messages only one of them prints: qsd's
    missing bzip2 module and the clients it drops."""
    return [ln.split(": ", 1)[-1] for ln in d.stderr_path.read_text().splitlines()
            if "dmg-bzip2 module is missing" not in ln and "Disconnect client" not in ln]


@pytest.mark.parametrize("form", ["plist", "resource-fork"])
def test_dmg_image_reads_as_under_qsd(both, tmp_path, form):
    img = sample(tmp_path, form)
    results = []
    for d in both():
        c = d.connect()
        out = []
        uri = exported_read_only(c, d, img, "dmg", out)
        out.append(("io", reads(d, uri, READS)))
        bzip2 = reads(d, uri, BZIP2_READS)
        c.close()
        d.stop()
        out.append(("stderr", stderr_lines(d)))
        results.append(json.loads(json.dumps(out).replace(str(img), "IMG")) + [bzip2])
    # qsd fails the bzip2 reads; ferrite reads them, as the image was made.
    assert results[0][-1] == ["read failed: Input/output error"] * 2
    assert all(ln.startswith("read ") and "failed" not in ln for ln in results[1][-1])
    assert_same_transcript(results[0][:-1], results[1][:-1])
    io = dict(results[1])["io"]
    assert "read failed: Input/output error" in io


def test_bzip2_chunks_read_their_data(ferrite, tmp_path):
    img = sample(tmp_path)
    d = ferrite()
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "dmg", "node-name": "v", "read-only": True,
                                  "file": {"driver": "file", "filename": str(img)}}) \
        == {"return": {}}
    uri = export(c, d, "v", "v", False)
    out = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -v 512k 64k", uri],
                         capture_output=True, text=True).stdout
    rows = [ln for ln in out.splitlines() if re.match(r"^[0-9a-f]{8}:  ", ln)]
    hexed = "".join(ln.split(": ", 1)[1].split("  ")[0] for ln in rows)
    assert bytes.fromhex(hexed.replace(" ", "")) == b"".join(
        sector_bytes(1024 + i) for i in range(128))


def damaged(tmp_path):
    """Images QEMU refuses, each named for what is wrong."""
    img = Image()
    img.block(0, [(UDRW, 0, 8), (UDZO, 8, 8)])
    out = {}
    p = tmp_path
    (p / "short.dmg").write_bytes(b"koly" + bytes(300))
    out["short"] = p / "short.dmg"
    out["no-trailer"] = img.write(p / "nt.dmg", 16, trailer={0: (">I", 0x12345678)})
    out["fork-past-trailer"] = img.write(p / "fp.dmg", 16, trailer={0x18: (">Q", 1 << 40)})
    out["rsrc-past-trailer"] = img.write(p / "rp.dmg", 16, form="resource-fork",
                                         trailer={0x30: (">Q", 1 << 30)})
    out["plist-past-trailer"] = img.write(p / "pp.dmg", 16, trailer={0xd8: (">Q", 1 << 30)})
    out["no-tables"] = img.write(p / "nt2.dmg", 16, trailer={0xe0: (">Q", 0)})
    out["negative-size"] = img.write(p / "ns.dmg", 16, trailer={0x1ec: (">q", -1)})
    out["plist-too-long"] = img.write(p / "pl.dmg", 16, pad=17 << 20,
                                      trailer={0xe0: (">Q", 17 << 20)})
    out["unclosed-data"] = img.write(p / "uc.dmg", 16, info=b"<plist><data>bWlzaA==</plist>")
    big = Image()
    big.block(0, [(UDZO, 0, 200000, (0, 10))])
    out["sector-count"] = big.write(p / "sc.dmg", 200000)
    long = Image()
    long.block(0, [(UDZO, 0, 8, (0, 65 << 20))])
    out["length"] = long.write(p / "ln.dmg", 8)
    zeroes = Image()
    zeroes.block(0, [(UDZE, 0, 1 << 40)])
    out["huge-zeroes"] = zeroes.write(p / "hz.dmg", 1 << 40)
    bad = Image()
    bad.block(0, [(UDZO, 0, 8, zlib.compress(b"x" * 4000)), (UDZO, 8, 8, b"not zlib")])
    out["bad-chunks"] = bad.write(p / "bc.dmg", 16)
    return out


def test_damaged_images_are_refused_as_qsd_refuses_them(both, tmp_path):
    images = damaged(tmp_path)
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        for name, img in images.items():
            cmd("blockdev-add", {"driver": "dmg", "node-name": name.replace("-", "_"),
                                 "read-only": True,
                                 "file": {"driver": "file", "filename": str(img)}})
        for name in ("huge-zeroes", "bad-chunks"):
            uri = export(c, d, name.replace("-", "_"), name, False)
            out.append((name, reads(d, uri, ["read 0 4k", "read 4k 4k", "read -v 0 512"])))
        c.close()
        d.stop()
        out.append(("stderr", stderr_lines(d)))
        results.append(json.loads(json.dumps(out).replace(str(tmp_path), "TMP")))
    assert_same_transcript(*results)


def test_writable_opens_are_refused_or_made_read_only(both, tmp_path):
    assert_writable_opens_refused_or_made_read_only(both, sample(tmp_path), "dmg")


def test_the_format_is_probed_by_name(tmp_path):
    """qemu-system and ferrite-system open a `.dmg` drive without a format as dmg, the
    same file under another name as raw."""
    img = sample(tmp_path)
    other = tmp_path / "disk.img"
    other.write_bytes(img.read_bytes())
    from test_system import QEMU, SYSTEM
    seen = []
    for binary in (QEMU, SYSTEM):
        r = subprocess.run(
            [binary, "-nodefaults", "-display", "none", "-machine", "none", "-S", "-qmp",
             "stdio", "-drive", f"file={img},if=none,id=d0,readonly=on",
             "-drive", f"file={other},if=none,id=d1,readonly=on"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n'
                  '{"execute":"quit"}\n', capture_output=True, text=True, timeout=60)
        replies = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        block = next(m["return"] for m in replies if isinstance(m.get("return"), list))
        seen.append([(b["device"], b["inserted"]["drv"]) for b in block])
    assert seen[0] == seen[1] == [("d0", "dmg"), ("d1", "raw")]
