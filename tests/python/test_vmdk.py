"""The `vmdk` driver against qemu-storage-daemon: images of every type qemu-img makes
(monolithic sparse, with zeroed grains, flat, split, stream-optimized) opened with the same
node information, written and read through an NBD export to the same bytes on disk (grains
are placed in the order they are first written); a backing chain read and copied on write
as QEMU does, refused where the parent's content id does not match; images
`blockdev-create` makes, the same as QEMU's; damaged headers and descriptors refused in the
same words.

The descriptor's content id (`CID`) is random and changes on the first write after an image
opens, so it is masked before files are compared: the text up to its end, with the id
blanked (QEMU leaves the bytes after the text as they were; where they land depends on the
id's length)."""
import json
import re
import shutil
import struct
import subprocess

import pytest

from blockjobs import export
from conftest import assert_same_image, assert_same_transcript, content_digest
from image_formats import opened_read_only, qemu_img, qemu_io_lines, used_through_nbd

MiB = 1 << 20
DESC_AT, DESC_LEN = 0x200, 20 * 512

# qemu-io commands through the export: grain-sized and unaligned writes, writes across
# grains, zeroes (grain entries with zeroed grains, data otherwise), discards (ignored),
# reads of unwritten grains.
IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 6M 1M",
      "write -z 7340000 2000", "discard 1M 4k", "write -P 0x44 8M 2M",
      "read -P 0x11 1M 64k", "read -P 0x33 1047000 3000", "read -P 0 9437184 1000",
      "read -P 0x44 8M 1M", "read -P 0 6M 1M", "read -P 0 4M 1M"]

# Whole grains only: what a stream-optimized image takes (the rest is refused alike).
STREAM_IO = ["write -P 0x22 3M 64k", "write -P 0x22 3M 100k", "write -P 0x23 4M 128k",
             "write -z 6M 1M", "write -P 0x24 3M 64k", "read -P 0x11 1M 64k",
             "read -P 0x22 3M 64k", "read -P 0x23 4M 128k", "read -P 0 6M 1M",
             "read -P 0 5M 64k"]

SUBFORMATS = {
    "sparse": ["-o", "subformat=monolithicSparse"],
    "zeroed-grain": ["-o", "zeroed_grain=on"],
    "flat": ["-o", "subformat=monolithicFlat"],
    "split-sparse": ["-o", "subformat=twoGbMaxExtentSparse"],
    "split-flat": ["-o", "subformat=twoGbMaxExtentFlat"],
    "stream": ["-o", "subformat=streamOptimized"],
}


def masked(data):
    """`data` (a whole file) with its descriptor's content id blanked and the bytes after
    its text zeroed; of a descriptor file, just its text."""
    data = bytearray(data)
    if data[:4] == b"KDMV":
        start, end = DESC_AT, DESC_AT + DESC_LEN
    elif data[:1] == b"#":
        start, end = 0, len(data)
    else:
        return bytes(data)
    region = bytes(data[start:end])
    text = region.split(b"\0")[0]
    text = re.sub(rb"(^|\n)CID=[0-9a-f]+\n", rb"\1CID=X\n", text, count=1)
    if start == 0:
        # A descriptor file: its length follows the id's.
        return text
    data[start:end] = (text + bytes(len(region)))[:len(region)]
    return bytes(data)


def generic(out, d):
    """A transcript with the daemon's directory and generated node names made alike."""
    text = json.dumps(out).replace(str(d.workdir), "DIR")
    return json.loads(re.sub(r"#block[0-9]+", "#block", text))


def files_of(directory):
    """The VMDK files of a directory: sparse extents and descriptors masked, flat
    extents (gigabytes of holes) by their length and digest."""
    out = {}
    for p in sorted(directory.iterdir()):
        if p.suffix != ".vmdk":
            continue
        with open(p, "rb") as f:
            head = f.read(4)
        if head == b"KDMV" or head[:1] == b"#":
            out[p.name] = masked(p.read_bytes())
        else:
            out[p.name] = content_digest(p)
    return out


@pytest.fixture(scope="module", params=list(SUBFORMATS))
def image(tmp_path_factory, request):
    """A 12 MiB image qemu-img made, in a directory of its own, with a pattern at 1 MiB."""
    img = tmp_path_factory.mktemp("vmdk") / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", *SUBFORMATS[request.param], str(img), "12M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 1M 64k", str(img)],
                   check=True, capture_output=True)
    return img, request.param


def test_vmdk_image_matches_qsd(both, image):
    img, kind = image
    io = STREAM_IO if kind == "stream" else IO
    results, files = [], []
    for d in both():
        for f in img.parent.iterdir():
            shutil.copy(f, d.workdir / f.name)
        out = used_through_nbd(d, d.workdir / img.name, "vmdk", io, 32 * MiB)
        results.append(generic(out, d))
        files.append(files_of(d.workdir))
    assert_same_transcript(*results)
    assert files[1] == files[0]


def test_backing_chain_reads_and_copies_on_write_as_qemu(both, tmp_path):
    """An overlay of a VMDK parent: unwritten grains read from the parent, a part of a
    grain written takes the rest from it; after the parent's content id changes, what
    would read from it is refused."""
    src = tmp_path / "src"
    src.mkdir()
    base, top = src / "base.vmdk", src / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(base), "4M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 4M", str(base)],
                   check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", str(top), "4M")
    io = ["read -P 0x11 0 64k", "write -P 0x22 70000 1000", "read -P 0x11 65536 4464",
          "read -P 0x22 70000 1000", "read -P 0x11 71000 60072"]
    results, files = [], []
    for d, again in zip(both(), both()):
        for f in src.iterdir():
            shutil.copy(f, d.workdir / f.name)
        out = used_through_nbd(d, d.workdir / "top.vmdk", "vmdk", io, 8 * MiB)
        files.append(files_of(d.workdir))
        # The parent changes under the overlay: its content id no longer matches.
        subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x33 1M 4k",
                        str(d.workdir / "base.vmdk")], check=True, capture_output=True)
        c = again.connect()
        c.cmd("blockdev-add", {"driver": "vmdk", "node-name": "v", "read-only": True,
                               "file": {"driver": "file", "read-only": True,
                                        "filename": str(d.workdir / "top.vmdk")}})
        uri = export(c, again, "v", "v", False)
        # The read fails with EINVAL in both; QEMU's NBD server then drops the connection
        # (its client says EIO), ferrite's answers with the read's own error.
        lines = qemu_io_lines("-r", "-f", "raw", "-c", "read -P 0x22 70000 1000",
                              "-c", "read 0 4k", uri)
        out.append(("stale parent", [re.sub(r"failed: .*", "failed", ln) for ln in lines]))
        c.close()
        results.append(generic(out, d))
    assert_same_transcript(*results)
    assert files[1] == files[0]


def created(d, options, extents=0):
    """blockdev-create of a VMDK image on empty files (`n.vmdk`, then `e0.vmdk`...): the
    job's error (or None), and the files' masked bytes."""
    names = ["n.vmdk"] + [f"e{i}.vmdk" for i in range(extents)]
    c = d.connect()
    for i, name in enumerate(names):
        (d.workdir / name).write_bytes(b"")
        assert c.cmd("blockdev-add", {"driver": "file", "node-name": f"f{i}",
                                      "filename": str(d.workdir / name)}) == {"return": {}}
    opts = {"driver": "vmdk", "file": "f0", **options}
    if extents:
        opts["extents"] = [f"f{i}" for i in range(1, extents + 1)]
    r = c.cmd("blockdev-create", {"job-id": "c", "options": opts})
    if "error" in r:
        c.close()
        return r["error"], {}
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    error = c.cmd("query-jobs")["return"][0].get("error")
    c.close()
    d.stop()
    if error:
        error = error.replace(str(d.workdir), "DIR")
    return error, files_of(d.workdir)


CREATE = [
    ("sparse", {"size": 12 * MiB}, 0),
    ("sparse-odd", {"size": 12 * MiB + 512}, 0),
    ("empty", {"size": 0}, 0),
    ("large", {"size": 300 << 30}, 0),
    ("zeroed-grain", {"size": 12 * MiB, "zeroed-grain": True}, 0),
    ("stream", {"size": 12 * MiB, "subformat": "streamOptimized"}, 0),
    ("flat", {"size": 12 * MiB, "subformat": "monolithicFlat"}, 1),
    ("split-sparse", {"size": 3 << 30, "subformat": "twoGbMaxExtentSparse"}, 2),
    ("split-flat", {"size": 3 << 30, "subformat": "twoGbMaxExtentFlat"}, 2),
    ("adapter", {"size": 12 * MiB, "adapter-type": "lsilogic", "hwversion": "6",
                 "toolsversion": "1234"}, 0),
    ("unaligned", {"size": 1000}, 0),
    ("flat-backing", {"size": MiB, "subformat": "monolithicFlat", "backing-file": "b"}, 1),
    ("flat-zeroed", {"size": MiB, "subformat": "monolithicFlat", "zeroed-grain": True}, 1),
    ("missing-extent", {"size": 3 << 30, "subformat": "twoGbMaxExtentFlat"}, 1),
    ("unused-extent", {"size": 12 * MiB, "subformat": "monolithicFlat"}, 2),
    ("no-parent", {"size": MiB, "backing-file": "nothing.vmdk"}, 0),
]


@pytest.mark.parametrize("options,extents", [c[1:] for c in CREATE],
                         ids=[c[0] for c in CREATE])
def test_blockdev_create_makes_what_qemu_makes(both, options, extents):
    q, f = both()
    theirs, ours = created(q, options, extents), created(f, options, extents)
    assert ours == theirs


def test_blockdev_create_names_a_vmdk_parent(both):
    """The parent's content id goes into the new image; a parent not in VMDK format is
    refused."""
    results = []
    for d, again in zip(both(), both()):
        for w in (d.workdir, again.workdir):
            qemu_img("create", "-q", "-f", "vmdk", str(w / "p.vmdk"), "1M")
            qemu_img("create", "-q", "-f", "qcow2", str(w / "p.qcow2"), "1M")
        error, _ = created(d, {"size": MiB, "backing-file": "p.qcow2"})
        results.append(error)
        cid = re.search(rb"\nCID=([0-9a-f]+)", (again.workdir / "p.vmdk").read_bytes()).group(1)
        error, files = created(again, {"size": MiB, "backing-file": "p.vmdk"})
        text = files["n.vmdk"][DESC_AT:DESC_AT + DESC_LEN]
        assert b"parentCID=" + cid + b"\n" in text
        assert b'parentFileNameHint="p.vmdk"\n' in text
        cid_at = text.index(b"parentCID=")
        # The parent's id is printed without padding, so the zeroes after the text vary.
        results.append((error, text[:cid_at], text[text.index(b"\n", cid_at):].rstrip(b"\0")))
    assert results[2:] == results[:2]


def header_field(img, at, fmt, value):
    data = bytearray(img.read_bytes())
    struct.pack_into(fmt, data, at, value)
    img.write_bytes(bytes(data))


# (name, subformat, changes: (offset, struct format, value) or (text, replacement)).
DAMAGE = [
    ("version-4", "sparse", [(4, "<I", 4)]),
    ("gtes-too-many", "sparse", [(44, "<I", 513)]),
    ("l1-entry-zero", "sparse", [(44, "<I", 0)]),
    ("granularity-huge", "sparse", [(20, "<Q", 0x400000)]),
    ("truncated", "sparse", [(64, "<Q", 1 << 30)]),
    ("gd-past-end", "sparse", [(56, "<Q", 1 << 20)]),
    ("footer", "sparse", [(56, "<Q", (1 << 64) - 1)]),
    ("bad-magic", "sparse", [(0, ">I", 0x41414141)]),
    ("no-cid", "sparse", [(b"\nCID=", b"\nXID=")]),
    ("no-create-type", "flat", [(b"createType", b"createTyqe")]),
    ("create-type", "flat", [(b"monolithicFlat", b"monolithicXlat")]),
    ("extent-line", "flat", [(b'" 0\n', b'"\n')]),
    ("extent-missing", "flat", [(b"v-flat.vmdk", b"w-flat.vmdk")]),
    ("sparse-extent-not-vmdk", "split-sparse", [(b"SPARSE", b"SPARSE")]),
]


@pytest.mark.parametrize("name,kind,changes", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_images_are_refused_as_qemu_refuses_them(both, tmp_path, name, kind, changes):
    src = tmp_path / "src"
    src.mkdir()
    img = src / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", *SUBFORMATS[kind], str(img), "4M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 64k", str(img)],
                   check=True, capture_output=True)
    for change in changes:
        if isinstance(change[0], bytes):
            img.write_bytes(img.read_bytes().replace(*change, 1))
        else:
            header_field(img, *change)
    if name == "sparse-extent-not-vmdk":
        (src / "v-s001.vmdk").write_bytes(b"not an extent" * 100)
    opened_read_only(both, img, "vmdk", ["read -P 0x11 0 64k", "read -P 0 1M 4k"])


def test_version_3_opens_only_read_only(both, tmp_path):
    results = []
    for d in both():
        img = d.workdir / "v.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", str(img), "4M")
        header_field(img, 4, "<I", 3)
        c = d.connect()
        out = [c.cmd("blockdev-add", {"driver": "vmdk", "node-name": f"v{ro}", "read-only": ro,
                                      "file": {"driver": "file", "filename": str(img),
                                               "read-only": ro}})
               for ro in (False, True)]
        results.append(out)
        c.close()
    assert results[1] == results[0]
    assert results[0][1] == {"return": {}}


def test_images_qemu_cannot_serve_open_and_read(ferrite, tmp_path):
    """Two damaged images QEMU mishandles: a descriptor without a read-write extent (qsd
    aborts on an assertion when asked about it) opens as an empty disk; a capacity whose
    grain directory size overflows 32 bits (qsd's NBD server fails every read, its block
    status failing) opens, and what no table places reads as zeroes."""
    d = ferrite()
    flat, huge = d.workdir / "flat.vmdk", d.workdir / "huge.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", str(flat), "4M")
    flat.write_bytes(flat.read_bytes().replace(b"RW 8192", b"RO 8192", 1))
    qemu_img("create", "-q", "-f", "vmdk", str(huge), "4M")
    header_field(huge, 12, "<Q", 1 << 50)
    c = d.connect()
    for name, img in (("flat", flat), ("huge", huge)):
        assert c.cmd("blockdev-add", {"driver": "vmdk", "node-name": name, "read-only": True,
                                      "file": {"driver": "file", "filename": str(img),
                                               "read-only": True}}) == {"return": {}}
    nodes = {n["node-name"]: n for n in c.cmd("query-named-block-nodes")["return"]}
    assert nodes["flat"]["image"]["virtual-size"] == 0
    assert nodes["flat"]["image"]["format-specific"]["data"]["extents"] == []
    assert "cluster-size" not in nodes["flat"]["image"]
    assert nodes["huge"]["image"]["virtual-size"] == 1 << 59
    uri = export(c, d, "huge", "huge", False)
    assert qemu_io_lines("-r", "-f", "raw", "-c", "read -P 0 0 64k", "-c",
                         "read -P 0 1T 4k", uri) == ["read 65536/65536 bytes at offset 0",
                                                     "read 4096/4096 bytes at offset 1099511627776"]
    c.close()


def test_compressed_backup_into_a_stream_optimized_image(both):
    """A backup with `compress` into a stream-optimized image: every grain written once,
    compressed; the image holds the source's data, as qsd's does."""
    results = []
    for d in both():
        src, tgt = d.workdir / "src.raw", d.workdir / "t.vmdk"
        qemu_img("create", "-q", "-f", "raw", str(src), "4M")
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c",
                        "write -P 0x22 2M 64k", "-c", "write -P 0x33 3M 960k", str(src)],
                       check=True, capture_output=True)
        qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized", str(tgt),
                 "4M")
        c = d.connect()
        for name, driver, path in (("s", "raw", src), ("t", "vmdk", tgt)):
            assert c.cmd("blockdev-add", {"driver": driver, "node-name": name, "file": {
                "driver": "file", "filename": str(path)}}) == {"return": {}}
        assert c.cmd("blockdev-backup", {"job-id": "b", "device": "s", "target": "t",
                                         "sync": "full", "compress": True}) == {"return": {}}
        e = c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        jobs = c.cmd("query-jobs")["return"]
        c.close()
        d.stop()
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk", str(src), str(tgt)],
                       check=True, capture_output=True)
        # Every grain of data compressed: the file holds much less than the data.
        r = subprocess.run(["qemu-img", "check", "-f", "vmdk", str(tgt)], capture_output=True,
                           text=True)
        results.append((e is not None, [j.get("error") for j in jobs], r.returncode,
                        tgt.stat().st_size < 1 << 20))
    assert results[1] == results[0] == (True, [], 0, True)


def test_concurrent_writes_into_new_grains_land_whole(both):
    """Writes in flight together into the same new grains (and the grains around them),
    then into placed grains beside writes placing new ones: each grain is placed once,
    every byte written reads back, as under qsd."""
    io = [f"aio_write -P {0x40 + i} {i * 20000} 20000" for i in range(12)] + ["aio_flush"]
    io += [f"read -P {0x40 + i} {i * 20000} 20000" for i in range(12)]
    # Then writes into placed grains (which need not wait) beside writes placing new ones.
    io += [f"aio_write -P {0x60 + i} {i * 20000 + 5000} 10000" for i in range(12)]
    io += [f"aio_write -P {0x80 + i} {300000 + i * 20000} 20000" for i in range(6)]
    io += ["aio_flush"]
    io += [f"read -P {0x60 + i} {i * 20000 + 5000} 10000" for i in range(12)]
    io += [f"read -P {0x80 + i} {300000 + i * 20000} 20000" for i in range(6)]
    results, images = [], []
    for d in both():
        img = d.workdir / "v.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", str(img), "4M")
        c = d.connect()
        c.cmd("blockdev-add", {"driver": "vmdk", "node-name": "v", "file": {
            "driver": "file", "filename": str(img)}})
        uri = export(c, d, "v", "v", True)
        # The writes complete in no set order.
        results.append(sorted(qemu_io_lines("-f", "raw", *[a for op in io for a in ("-c", op)],
                                            uri)))
        c.close()
        d.stop()
        r = subprocess.run(["qemu-img", "check", "-f", "vmdk", str(img)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout
        images.append(img)
        # Seven grains written, each placed once: the file grew by exactly seven grains.
        assert img.stat().st_size == 64 * 1024 + 7 * 64 * 1024
    assert_same_transcript(*results)
    assert_same_image(images[0], images[1], "vmdk")


def se_sparse_image(directory, damage=None):
    """An ESXi seSparse extent (qemu-img cannot make one) and its descriptor, 4 MiB: grains
    0, 3 and 5 hold 0x11, 0x33 and 0x22; grain 7 is zeroed, grain 9 unmapped."""
    sector = 512
    const = bytearray(sector)
    fields = {0: 0xcafebabe, 8: 0x0000000200000001, 16: 8192, 24: 8, 32: 64,
              80: 1, 88: 1, 128: 2, 136: 1, 144: 3, 152: 64, 192: 67, 200: 24}
    for at, v in fields.items():
        struct.pack_into("<Q", const, at, v)
    volatile = bytearray(sector)
    struct.pack_into("<Q", volatile, 0, 0xcafecafe)
    directory_sector = bytearray(sector)
    struct.pack_into("<Q", directory_sector, 0, 0x1000000000000000)
    table = bytearray(64 * sector)

    def allocated(index):
        return (3 << 60) | ((index & 0xfff) << 48) | (index >> 12)
    for grain, entry in ((0, allocated(0)), (5, allocated(1)), (3, allocated(2)),
                         (7, 2 << 60), (9, 1 << 60)):
        struct.pack_into("<Q", table, grain * 8, entry)
    grains = bytes([0x11]) * 4096 + bytes([0x22]) * 4096 + bytes([0x33]) * 4096
    if damage:
        at, fmt, value, which = damage
        struct.pack_into(fmt, const if which == "const" else volatile, at, value)
    (directory / "se-sesparse.vmdk").write_bytes(
        bytes(const + volatile + directory_sector + table) + grains)
    desc = directory / "se.vmdk"
    desc.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    'createType="seSparse"\n\n# Extent description\n'
                    'RW 8192 SESPARSE "se-sesparse.vmdk"\n')
    return desc


SE_READS = ["read -P 0x11 0 4k", "read -P 0x33 12k 4k", "read -P 0x22 20k 4k",
            "read -P 0 28k 4k", "read -P 0 36k 4k", "read -P 0 4k 8k", "read -P 0 1M 1M"]


@pytest.mark.parametrize("damage", [
    None, (0, "<Q", 0xcafebab0, "const"), (8, "<Q", 3, "const"), (24, "<Q", 16, "const"),
    (40, "<Q", 1, "const"), (64, "<Q", 1, "const"), (300, "<B", 1, "const"),
    (0, "<Q", 1, "volatile"), (24, "<Q", 1, "volatile"), (100, "<B", 1, "volatile")],
    ids=["sound", "const-magic", "version", "grain-size", "flags", "reserved", "padding",
         "volatile-magic", "journal", "volatile-padding"])
def test_se_sparse_images_read_as_qemu_reads_them(both, tmp_path, damage):
    img = se_sparse_image(tmp_path, damage)
    opened_read_only(both, img, "vmdk", SE_READS)


def test_se_sparse_images_open_read_only(both):
    """No writes to seSparse: refused read-write, made read-only by `auto-read-only`."""
    results = []
    for d in both():
        img = se_sparse_image(d.workdir)
        c = d.connect()
        out = [c.cmd("blockdev-add", {"driver": "vmdk", "node-name": f"v{i}", **extra,
                                      "file": {"driver": "file", "filename": str(img)}})
               for i, extra in enumerate(({}, {"auto-read-only": True}))]
        out.append([n["ro"] for n in c.cmd("query-named-block-nodes")["return"]
                    if n["node-name"] == "v1"])
        results.append(out)
        c.close()
    assert results[1] == results[0]
    assert results[0][2] == [True], results[0]


def test_images_made_by_name_as_qemu_makes_them(both):
    """`drive-backup` to new VDI, VHD and VMDK targets and `blockdev-snapshot-sync` to a
    VMDK overlay, where QEMU makes the image by file name: its "Formatting" lines, VHD's
    size rounded to its geometry (so the backup is refused), and the overlay of an open
    VMDK image refused (its parent cannot be opened beside it), no node left behind."""
    results = []
    for d in both():
        base = d.workdir / "base.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", str(base), "4M")
        c = d.connect()
        out = []
        out.append(c.cmd("blockdev-add", {"driver": "null-co", "node-name": "n",
                                          "size": 4 * MiB, "read-zeroes": True}))
        for fmt in ("vdi", "vpc", "vmdk"):
            out.append(c.cmd("drive-backup", {"device": "n", "job-id": fmt, "sync": "full",
                                              "target": str(d.workdir / f"t.{fmt}"),
                                              "format": fmt}))
            if "return" in out[-1]:
                c.wait_event("JOB_STATUS_CHANGE",
                             lambda e, f=fmt: e["data"] == {"id": f, "status": "null"})
        out.append(c.cmd("blockdev-add", {"driver": "vmdk", "node-name": "v", "file": {
            "driver": "file", "filename": str(base)}}))
        out.append(c.cmd("blockdev-snapshot-sync", {"node-name": "v", "format": "vmdk",
                                                    "snapshot-file": str(d.workdir / "s.vmdk"),
                                                    "snapshot-node-name": "s"}))
        out.append(len(c.cmd("query-named-block-nodes")["return"]))
        c.close()
        d.stop()
        out.append((d.workdir / "stdout.txt").read_text().replace(str(d.workdir), "DIR"))
        for fmt in ("vdi", "vmdk"):
            out.append(qemu_io_lines("-f", fmt, "-c", "read -P 0 0 4M",
                                     str(d.workdir / f"t.{fmt}")))
        results.append(out)
    assert_same_transcript(*results)


def test_extents_beside_a_descriptor_under_a_filter(both, tmp_path):
    """A descriptor file reached through filters (blkdebug, throttle): its extents are
    found beside the file at the bottom, as QEMU finds them (`bdrv_dirname`)."""
    img = tmp_path / "v.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(img),
             "4M")
    subprocess.run(["qemu-io", "-f", "vmdk", "-c", "write -P 0x11 0 64k", str(img)],
                   check=True, capture_output=True)
    results = []
    for d in both():
        c = d.connect()
        out = [c.cmd("object-add", {"qom-type": "throttle-group", "id": "t"})]
        out.append(c.cmd("blockdev-add", {
            "driver": "vmdk", "node-name": "v", "read-only": True,
            "file": {"driver": "throttle", "throttle-group": "t", "file": {
                "driver": "blkdebug", "image": {"driver": "file", "read-only": True,
                                                "filename": str(img)}}}}))
        uri = export(c, d, "v", "v", False)
        out.append(qemu_io_lines("-r", "-f", "raw", "-c", "read -P 0x11 0 64k", uri))
        # Its `json:` name has the file, not the extents the descriptor names.
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append([n["file"] for n in nodes if n["node-name"] == "v"])
        c.close()
        results.append(out)
    assert_same_transcript(*results)
    assert results[0][1] == {"return": {}}
    assert '"extents' not in results[0][-1][0]
