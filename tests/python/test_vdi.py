"""The `vdi` driver against qemu-storage-daemon: images qemu-img made (dynamic and static)
opened with the same node information, written and read through an NBD export to the same
bytes on disk, block for block (blocks are placed in the order they are first written, so
the files must be identical); images `blockdev-create` makes, the same but for their random
UUIDs; damaged headers refused in the same words; and concurrent writes into one new block
placing it once."""
import struct
import subprocess

import pytest

import image_formats
from blockjobs import export
from image_formats import assert_same_use, opened_read_only, qemu_img

MiB = 1 << 20

# Header fields (byte offsets, little-endian), as the VDI format lays them out.
VERSION, OFFSET_BMAP, OFFSET_DATA = 0x44, 0x154, 0x158
SECTOR_SIZE, DISK_SIZE, BLOCK_SIZE, BLOCKS = 0x168, 0x170, 0x178, 0x180
UUID_IMAGE, UUID_LINK, UUID_PARENT = 0x188, 0x1a8, 0x1b8

# qemu-io commands through the export: unaligned writes, writes across block boundaries,
# zeroes (written as data), discards (ignored), reads of unwritten blocks.
IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 6M 1M",
      "write -z 7340000 2000", "discard 1M 4k", "write -P 0x44 8M 2M",
      "read -P 0x11 1M 4k", "read -P 0x33 1047000 3000", "read -P 0 9437184 1000",
      "read -P 0x44 8M 1M", "read -P 0 6M 1M", "read -P 0 4M 1M"]


@pytest.fixture(scope="module", params=["dynamic", "static"])
def image(tmp_path_factory, request):
    """A 12 MiB VDI image qemu-img made, with a pattern at 1 MiB."""
    img = tmp_path_factory.mktemp("vdi") / "v.vdi"
    opts = ["-o", "static=on"] if request.param == "static" else []
    qemu_img("create", "-q", "-f", "vdi", *opts, str(img), "12M")
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 1M 4k", str(img)],
                   check=True, capture_output=True)
    return img


def test_vdi_image_matches_qsd(both, image):
    assert_same_use(both, image, "vdi", IO, 16 * MiB)


def created(d, **options):
    """blockdev-create of a VDI image: the job's error (or None), and the file with its two
    random UUIDs blanked."""
    error, data = image_formats.created(d, "vdi", **options)
    if len(data) >= 512:
        uuids = data[UUID_IMAGE:UUID_LINK]
        # Random, and version 4 as QEMU writes it (the third field little-endian).
        assert uuids[7] >> 4 == 4 and uuids[16 + 7] >> 4 == 4 and uuids[:16] != uuids[16:]
        data[UUID_IMAGE:UUID_LINK] = bytes(32)
    return error, bytes(data)


@pytest.mark.parametrize("options", [
    {"size": 10 * MiB}, {"size": 1000}, {"size": 0}, {"size": 3 * MiB + 512},
    {"size": 4 * MiB, "preallocation": "metadata"}, {"size": 4 * MiB, "preallocation": "off"},
    {"size": 4 * MiB, "preallocation": "full"}, {"size": 1 << 60}],
    ids=["10M", "odd", "empty", "3M+512", "static", "off", "full", "too-large"])
def test_blockdev_create_makes_what_qemu_makes(both, options):
    q, f = both()
    theirs, ours = created(q, **options), created(f, **options)
    assert ours == theirs


def damaged(img, field, value, fmt="<I"):
    data = bytearray(img.read_bytes())
    struct.pack_into(fmt, data, field, value)
    img.write_bytes(bytes(data))


DAMAGE = [
    ("signature", 0x40, 0x12345678, "<I"), ("version", VERSION, 0x00020000, "<I"),
    ("bmap-offset", OFFSET_BMAP, 0x201, "<I"), ("data-offset", OFFSET_DATA, 0x1001, "<I"),
    ("sector-size", SECTOR_SIZE, 4096, "<I"), ("block-size", BLOCK_SIZE, 2 * MiB, "<I"),
    ("disk-past-blocks", DISK_SIZE, 13 * MiB, "<Q"), ("disk-too-large", DISK_SIZE, 1 << 60, "<Q"),
    ("odd-disk-size", DISK_SIZE, 12 * MiB - 1000, "<Q"), ("link-uuid", UUID_LINK, 1, "<I"),
    ("parent-uuid", UUID_PARENT + 12, 7, "<I"), ("too-many-blocks", BLOCKS, 1 << 30, "<I"),
    # Entries past the end of the file read as zeroes: block 0 there for every block.
    ("blocks-past-file", BLOCKS, 1 << 20, "<I"),
]


@pytest.mark.parametrize("name,field,value,fmt", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_headers_are_refused_as_qemu_refuses_them(both, tmp_path, name, field, value,
                                                          fmt):
    base = tmp_path / "base.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(base), "12M")
    subprocess.run(["qemu-io", "-f", "vdi", "-c", "write -P 0x11 0 4k", str(base)],
                   check=True, capture_output=True)
    damaged(base, field, value, fmt)
    opened_read_only(both, base, "vdi", ["read -P 0x11 0 4k", "read -P 0x11 5M 4k"])


def test_concurrent_writes_into_one_new_block_place_it_once(ferrite, tmp_path):
    """Writes in flight together into blocks not yet placed (qemu-io's aio_write): each
    block is placed once, and every write lands."""
    img = tmp_path / "c.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(img), "8M")
    d = ferrite()
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "vdi", "node-name": "v", "file": {
        "driver": "file", "filename": str(img)}}) == {"return": {}}
    uri = export(c, d, "v", "v", True)
    ops = []
    for block in (2, 0, 5):
        for k in range(8):
            ops += ["-c", f"aio_write -P {0x40 + block * 8 + k} {block * MiB + k * 65536} 64k"]
    ops += ["-c", "aio_flush"]
    r = subprocess.run(["qemu-io", "-f", "raw", *ops, uri], capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    c.close()
    d.stop()
    assert "No errors were found" in qemu_img("check", "-f", "vdi", str(img)).stdout
    reads = []
    for block in (2, 0, 5):
        for k in range(8):
            reads += ["-c", f"read -P {0x40 + block * 8 + k} {block * MiB + k * 65536} 64k"]
    r = subprocess.run(["qemu-io", "-f", "vdi", *reads, str(img)], capture_output=True,
                       text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout
    # Placed in the order the first write of each block arrived: block 2 first.
    data = img.read_bytes()
    bmap = struct.unpack_from("<8I", data, 512)
    assert sorted(e for e in bmap if e < 0xfffffffe) == [0, 1, 2]
    assert bmap[2] == 0
