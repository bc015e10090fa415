"""The `bochs` driver against qemu-storage-daemon: Bochs growing images (written here as
bximage lays them out: a header, a catalog, per extent a bitmap of written sectors then the
sectors) opened read-only with the same node information and read through an NBD export to
the same bytes; a writable open refused, or made read-only by `auto-read-only`; damaged
headers refused in the same words."""
import struct

import pytest

from image_formats import (assert_writable_opens_refused_or_made_read_only, opened_read_only,
                           read_through_export)

EXTENT = 65536
SECTORS = EXTENT // 512


def bochs_image(path, version=2, disk=8 * EXTENT, catalog=None, extent=EXTENT, bitmap=512,
                magic=b"Bochs Virtual HD Image", subtype=b"Growing"):
    """Extents 0, 2 and 5 written (in areas 1, 0 and 2): in extent 0 sectors 0-9 and 100,
    in extent 2 all but sector 3, in extent 5 sector 127; each written sector holds its
    disk sector number in every byte."""
    entries = catalog if catalog is not None else disk // extent
    head = struct.pack("<32s16s16sIIIII", magic, b"Redolog", subtype,
                       0x00020000 if version == 2 else 0x00010000, 512, entries, bitmap,
                       extent)
    head += struct.pack("<IQ", 0, disk) if version == 2 else struct.pack("<Q", disk)
    head += bytes(512 - len(head))
    cat = [0xFFFFFFFF] * entries
    written = {0: (1, [*range(10), 100]), 2: (0, [s for s in range(SECTORS) if s != 3]),
               5: (2, [127])}
    areas = {}
    for e, (area, sectors) in written.items():
        if e < entries:
            cat[e] = area
        bits = bytearray(512)
        data = bytearray(EXTENT)
        for s in sectors:
            bits[s // 8] |= 1 << (s % 8)
            data[s * 512:(s + 1) * 512] = bytes([(e * SECTORS + s) & 0xff]) * 512
        areas[area] = bytes(bits) + bytes(data)
    body = head + struct.pack(f"<{entries}I", *cat)
    body += b"".join(areas[a] for a in sorted(areas))
    path.write_bytes(body)
    return path


READS = ["read -P 0 0 512", "read -P 9 4608 512", "read -P 0 5120 1k",
         "read -P 100 51200 512", "read -P 2 132096 512", "read -P 0 132608 512",
         "read -P 4 133120 512", "read -P 0 64k 64k", "read -P 0 320k 65024",
         "read -P 255 392704 512", "read -v 0 8k", "read -v 130k 1k", "read -v 1000 3000"]


@pytest.mark.parametrize("version", [2, 1])
def test_bochs_image_reads_as_under_qsd(both, tmp_path, version):
    img = bochs_image(tmp_path / "b.bochs", version=version)
    ours = read_through_export(both, img, "bochs", READS)
    assert not [ln for ln in ours[-1][1] if "fail" in ln or "error" in ln]


def test_writable_opens_are_refused_or_made_read_only(both, tmp_path):
    assert_writable_opens_refused_or_made_read_only(both, bochs_image(tmp_path / "b.bochs"), "bochs")


DAMAGE = {
    "magic": {"magic": b"Bochs Virtual HD Imagf"},
    "subtype": {"subtype": b"Undoable"},
    "catalog-too-large": {"catalog": 0x100001},
    "catalog-too-small": {"catalog": 7},
    "extent-small": {"extent": 256},
    "extent-not-power": {"extent": 3 * 512},
    "extent-too-large": {"extent": 0x1000000},
    "bitmap-zero": {"bitmap": 0},
    "odd-disk": {"disk": 8 * EXTENT - 100},
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_headers_are_refused_as_qemu_refuses_them(both, tmp_path, name):
    img = bochs_image(tmp_path / "d.bochs", **DAMAGE[name])
    opened_read_only(both, img, "bochs", ["read -v 0 1k", "read -v 128k 1k"])
