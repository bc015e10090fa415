"""The `vpc` (VHD) driver against qemu-storage-daemon: images qemu-img made (dynamic, fixed,
and with `force_size`) opened with the same node information, written and read through an
NBD export to the same bytes on disk (blocks are placed in the order they are first written,
the footer moved after the last, so the files must be identical); images `blockdev-create`
makes, the same but for their random UUID, timestamp and checksum; damaged images refused in
the same words; the size taken from CHS or from `current_size` by the creator, as QEMU takes
it."""
import struct
import subprocess

import pytest

import image_formats
from image_formats import assert_same_use, opened_read_only, qemu_img

MiB = 1 << 20

# Footer fields (big-endian).
TIMESTAMP, CREATOR_APP, CURRENT_SIZE, CYLS, TYPE, CHECKSUM, UUID = 24, 28, 48, 56, 60, 64, 68
# Dynamic disk header fields (at 512 in images qemu-img makes).
DYN_TABLE_OFFSET, DYN_MAX_ENTRIES, DYN_BLOCK_SIZE = 512 + 16, 512 + 28, 512 + 32

IO = ["write -P 0x22 3M 100k", "write -P 0x33 2096000 3000", "write -z 6M 1M",
      "discard 1M 4k", "write -P 0x44 8M 2M", "read -P 0x11 1M 4k",
      "read -P 0x33 2096000 3000", "read -P 0 9437184 1000", "read -P 0x44 8M 1M",
      "read -P 0 6M 1M", "read -P 0 4M 1M", "read -P 0 12M 64k"]


def checksum(footer):
    data = bytearray(footer)
    data[CHECKSUM:CHECKSUM + 4] = bytes(4)
    return (~sum(data)) & 0xffffffff


@pytest.fixture(scope="module", params=["dynamic", "fixed", "force-size"])
def image(tmp_path_factory, request):
    """A 14 MiB VHD image qemu-img made, with a pattern at 1 MiB."""
    img = tmp_path_factory.mktemp("vpc") / "v.vpc"
    opts = {"dynamic": [], "fixed": ["-o", "subformat=fixed"],
            "force-size": ["-o", "force_size=on"]}[request.param]
    qemu_img("create", "-q", "-f", "vpc", *opts, str(img), "14M")
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x11 1M 4k", str(img)],
                   check=True, capture_output=True)
    return img


def test_vpc_image_matches_qsd(both, image):
    assert_same_use(both, image, "vpc", IO, 32 * MiB)


def created(d, **options):
    """blockdev-create of a VHD image: the job's error (or None), where footers are, and
    the file with the footers' timestamp, UUID and checksum blanked (the checksum
    checked)."""
    error, data = image_formats.created(d, "vpc", **options)
    footers = [at for at in range(0, len(data) - 511, 512) if data[at:at + 8] == b"conectix"]
    for at in footers:
        footer = data[at:at + 512]
        assert struct.unpack_from(">I", footer, CHECKSUM)[0] == checksum(footer)
        assert footer[UUID + 6] >> 4 == 4
        for field, n in ((TIMESTAMP, 4), (CHECKSUM, 4), (UUID, 16)):
            data[at + field:at + field + n] = bytes(n)
    return error, footers, bytes(data)


@pytest.mark.parametrize("options", [
    {"size": 10514432}, {"size": 10 * MiB}, {"size": 10 * MiB, "force-size": True},
    {"size": 10514432, "subformat": "fixed"}, {"size": 0}, {"size": 127 << 30},
    {"size": 3 << 40}, {"size": 3 << 40, "force-size": True},
    {"size": 100 << 30, "force-size": True}],
    ids=["chs", "not-chs", "force-size", "fixed", "empty", "127G", "too-large",
         "too-large-forced", "100G-forced"])
def test_blockdev_create_makes_what_qemu_makes(both, options):
    q, f = both()
    theirs, ours = created(q, **options), created(f, **options)
    assert ours == theirs


def damage(img, changes, fix_checksum=True, footer_at=0):
    data = bytearray(img.read_bytes())
    for field, value, fmt in changes:
        struct.pack_into(fmt, data, field, value)
    if fix_checksum:
        footer = data[footer_at:footer_at + 512]
        struct.pack_into(">I", data, footer_at + CHECKSUM, checksum(footer))
    img.write_bytes(bytes(data))


DAMAGE = [
    ("bad-checksum", [(CHECKSUM, 1, ">I")], False),
    ("not-vhd", [(0, 0x41414141, ">I")], False),
    ("dyn-magic", [(512, 0x41414141, ">I")], True),
    ("block-size", [(DYN_BLOCK_SIZE, 3000, ">I")], True),
    ("table-too-small", [(DYN_MAX_ENTRIES, 2, ">I")], True),
    ("table-too-large", [(DYN_MAX_ENTRIES, 0x40000000, ">I")], True),
    ("table-negative", [(DYN_MAX_ENTRIES, 0x80000007, ">I")], True),
    ("table-past-file", [(DYN_TABLE_OFFSET, 1 << 20, ">Q")], True),
    # Hyper-V's creator: the size is current_size, not the geometry.
    ("hyper-v", [(CREATOR_APP, 0x77696e20, ">I"), (CURRENT_SIZE, 9 * MiB, ">Q")], True),
    ("max-geometry", [(CYLS, 0xffff10ff, ">I"), (CURRENT_SIZE, 12 * MiB, ">Q")], True),
    ("too-large", [(CREATOR_APP, 0x77696e20, ">I"), (CURRENT_SIZE, 3 << 40, ">Q")], True),
    ("differencing", [(TYPE, 4, ">I")], True),
]


@pytest.mark.parametrize("name,changes,fix", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_images_are_refused_as_qemu_refuses_them(both, tmp_path, name, changes, fix):
    base = tmp_path / "base.vpc"
    qemu_img("create", "-q", "-f", "vpc", str(base), "14M")
    subprocess.run(["qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 4k", str(base)],
                   check=True, capture_output=True)
    damage(base, changes, fix)
    opened_read_only(both, base, "vpc", ["read -P 0x11 0 4k", "read -P 0 5M 4k"])


def test_a_refused_size_leaves_the_new_empty_file_empty(both):
    """iotest 266's shape: `blockdev-create` of an empty file (over an old one), then of a
    VHD image whose size CHS cannot say: nothing is written, the file stays empty."""
    sizes = []
    for d in both():
        img = d.workdir / "t.vpc"
        img.write_bytes(b"x" * 100000)
        c = d.connect()
        for opts in ({"driver": "file", "filename": str(img), "size": 0},
                     {"driver": "vpc", "file": "p", "size": MiB, "force-size": False}):
            assert c.cmd("blockdev-create", {"job-id": "j", "options": opts}) == {"return": {}}
            c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
            sizes.append((c.cmd("query-jobs")["return"][0].get("error"), img.stat().st_size))
            c.cmd("job-dismiss", {"id": "j"})
            if opts["driver"] == "file":
                assert c.cmd("blockdev-add", {"driver": "file", "filename": str(img),
                                              "node-name": "p"}) == {"return": {}}
        c.close()
    assert sizes[2:] == sizes[:2]
    assert sizes[:2] == [(None, 0), ("The requested image size cannot be represented in CHS "
                                     "geometry", 0)]
