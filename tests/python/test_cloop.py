"""The `cloop` driver against qemu-storage-daemon: compressed loop images (written here as
`create_compressed_fs` lays them out: the shell script header, block size and count, the
offset table, zlib-compressed blocks) opened read-only with the same node information and
read through an NBD export to the same bytes; a writable open refused, or made read-only by
`auto-read-only`; damaged headers and blocks refused in the same words; the format probed."""
import struct
import zlib

import pytest

from image_formats import (assert_writable_opens_refused_or_made_read_only, opened_read_only,
                           read_through_export)

MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
         b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
BLOCK = 64 * 1024


def block_bytes(i, size=BLOCK):
    """Block `i`: half its number, then a counting pattern."""
    return bytes([i % 250 + 1]) * (size // 2) + bytes(range(256)) * (size // 512)


def cloop_image(path, blocks=12, block_size=BLOCK, count=None, packed=None, offsets=None,
                magic=MAGIC):
    """A cloop image of `blocks` blocks; `count`, `packed` (the compressed blocks) and
    `offsets` override what the header and table say."""
    head = magic + bytes(128 - len(magic))
    head += struct.pack(">II", block_size, blocks if count is None else count)
    if packed is None:
        packed = [zlib.compress(block_bytes(i, block_size)) for i in range(blocks)]
    if offsets is None:
        at = len(head) + 8 * (len(packed) + 1)
        offsets = []
        for p in packed:
            offsets.append(at)
            at += len(p)
        offsets.append(at)
    path.write_bytes(head + struct.pack(f">{len(offsets)}Q", *offsets) + b"".join(packed))
    return path


READS = ["read -v 32k 512", "read -v 190k 4k", "read -v 700k 8k", "read -v 0 1k",
         "read -v 767k 1k", "read 100k 300k"]
# Of 64 KiB blocks.
PATTERNS = ["read -P 1 0 32k", "read -P 3 128k 32k", "read -P 12 704k 32k"]


@pytest.mark.parametrize("block_size", [BLOCK, 512, 256 * 1024])
def test_cloop_image_reads_as_under_qsd(both, tmp_path, block_size):
    img = cloop_image(tmp_path / "c.cloop", block_size=block_size,
                      blocks=12 * BLOCK // block_size)
    ours = read_through_export(both, img, "cloop",
                               READS + (PATTERNS if block_size == BLOCK else []))
    assert not [ln for ln in ours[-1][1] if "fail" in ln or "error" in ln]


def test_the_format_is_probed_as_qsd_probes_it(both, tmp_path):
    """Opened as `raw` (QEMU names no format for a probe); the export reads the file."""
    img = cloop_image(tmp_path / "c.cloop")
    read_through_export(both, img, "raw", ["read -v 0 256"])


def test_writable_opens_are_refused_or_made_read_only(both, tmp_path):
    assert_writable_opens_refused_or_made_read_only(both, cloop_image(tmp_path / "c.cloop"), "cloop")


def bad_packed():
    """Block 2 inflating short, block 4 long, block 6 not zlib at all."""
    packed = [zlib.compress(block_bytes(i)) for i in range(12)]
    packed[2] = zlib.compress(block_bytes(2)[:BLOCK - 512])
    packed[4] = zlib.compress(block_bytes(4) + b"x")
    packed[6] = b"not zlib" * 10
    return packed


DAMAGE = {
    "block-size-odd": {"block_size": 1000},
    "block-size-zero": {"block_size": 0, "blocks": 0},
    "block-size-huge": {"block_size": 128 << 20, "blocks": 0},
    "count-huge": {"count": 0x20000000},
    "offsets-too-many": {"count": 0x4000000},
    "offsets-decrease": {"offsets": [200, 300, 250] + [400] * 10},
    "compressed-huge": {"offsets": [200, 200 + (128 << 20) + 1] + [(129 << 20)] * 11},
    # 32769 blocks of 2^17 sectors: 2^17 sectors once counted in 32 bits.
    "sectors-wrap": {"block_size": 64 << 20, "count": 32769, "packed": [],
                     "offsets": [0] * 32770},
    "truncated": {"offsets": [200, 300, 400] + [1 << 30] * 10},
    "bad-blocks": {"packed": bad_packed()},
    "empty": {"blocks": 0},
    "magic-short": {"magic": MAGIC[:20]},
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_images_are_refused_as_qemu_refuses_them(both, tmp_path, name):
    img = cloop_image(tmp_path / "d.cloop", **DAMAGE[name])
    # One read per block: QEMU's NBD server drops the connection when a read fails.
    for at in ("0", "64k", "128k", "256k", "384k", "448k"):
        opened_read_only(both, img, "cloop", [f"read -v {at} 16"])
