"""The `parallels` driver against qemu-storage-daemon: images qemu-img made (new and old
format, small and large clusters) opened with the same node information, written and read
through an NBD export to the same bytes on disk (new clusters are placed in the same order,
the file grown past them and cut back at close); `inuse` set while open; images QEMU would
not trust repaired on a writable open in the same words and to the same bytes;
`blockdev-create`; damaged headers refused in the same words; overlays over a backing file;
durable flushes and FUA writes (BAT included) across SIGKILL; and what ferrite does better:
no second new cluster placed over the disk's first after repairing an image not closed
cleanly (QEMU's used-cluster map is left empty there)."""
import hashlib
import json
import shutil
import signal
import struct
import subprocess

import pytest

import image_formats
from blockjobs import export
from conftest import assert_same_transcript, recorder
from image_formats import assert_same_use, opened_read_only, qemu_img, qemu_io_lines

MiB = 1 << 20
INUSE_AT, DATA_OFF, NB_SECTORS, TRACKS, BAT_ENTRIES, EXT_OFF = 44, 48, 36, 28, 32, 56
INUSE = 0x746F6E59

# qemu-io commands through the export: unaligned writes across clusters, zeroes over whole
# clusters (dropped) and parts of them (data), discards of whole and partial clusters,
# reads of clusters never written.
IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 6M 1M",
      "write -z 7340000 2000", "write -P 0x55 6M 4k", "discard 3M 1M", "discard 1M 4k",
      "write -P 0x44 8M 2M", "write -P 0x66 13M 64k", "write -z 8M 1M",
      "read -P 0x11 1M 64k", "read -P 0x33 1047000 3000", "read -P 0 9437184 1000",
      "read -P 0x44 9M 1M", "read -P 0x55 6M 4k", "read -P 0 6M+4k 1020k",
      "read -P 0 4M 1M", "read -P 0x66 13M 64k", "read -P 0 8M 1M"]

KINDS = {
    "default": ["-o", "cluster_size=1M"],
    "64k-clusters": ["-o", "cluster_size=64k"],
    "4k-clusters": ["-o", "cluster_size=4k"],
}


def field(img, at, fmt="<I"):
    return struct.unpack_from(fmt, img.read_bytes(), at)[0]


def poke(img, at, value, fmt="<I"):
    data = bytearray(img.read_bytes())
    struct.pack_into(fmt, data, at, value)
    img.write_bytes(bytes(data))


@pytest.fixture(scope="module", params=list(KINDS))
def image(tmp_path_factory, request):
    """A 16 MiB image qemu-img made, with a pattern at 1 MiB."""
    img = tmp_path_factory.mktemp("prl") / "v.prl"
    qemu_img("create", "-q", "-f", "parallels", *KINDS[request.param], str(img), "16M")
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x11 1M 64k", str(img)],
                   check=True, capture_output=True)
    return img


def test_parallels_image_matches_qsd(both, image):
    assert_same_use(both, image, "parallels", IO, 32 * MiB)


def old_format(tmp_path):
    """An image of the old format ("WithoutFreeSpace": entries count sectors, data_off 0
    meaning just after the BAT), 64 KiB clusters, two of them placed."""
    img = tmp_path / "old.prl"
    clusters, entries = 128, 32
    head = struct.pack("<16sIIIIIQIIIQ", b"WithoutFreeSpace", 2, 16, 8, clusters, entries,
                       entries * clusters, 0, 0, 0, 0)
    bat = [0] * entries
    bat[1], bat[5] = 1 * clusters, 2 * clusters  # sectors: 64 KiB and 128 KiB in
    body = bytearray(head + struct.pack(f"<{entries}I", *bat))
    body += bytes(64 * 1024 - len(body))
    body += b"\x21" * 65536 + b"\x25" * 65536
    img.write_bytes(bytes(body))
    return img


def test_old_format_images_match_qsd(both, tmp_path):
    img = old_format(tmp_path)
    assert_same_use(both, img, "parallels",
                    ["read -P 0x21 64k 64k", "read -P 0x25 320k 64k", "read -P 0 0 64k",
                     "write -P 0x31 100k 8k", "write -P 0x32 1M 70k", "read -P 0x31 100k 8k",
                     "read -P 0x32 1M 70k"], 4 * MiB)


def writable(d, img):
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "parallels", "node-name": "v",
                                  "file": {"driver": "file", "filename": str(img)}}) \
        == {"return": {}}
    return c


def test_inuse_is_set_while_open_and_the_file_cut_back_at_close(both, tmp_path):
    """Writable and open: `inuse` set at once; the first new cluster grows the file by 128
    MiB more, which later clusters fill; at close `inuse` is cleared and the file cut back
    to its last cluster. Read-only: nothing changes."""
    base = tmp_path / "i.prl"
    qemu_img("create", "-q", "-f", "parallels", str(base), "64M")
    seen = []
    for d in both():
        img = d.workdir / "i.prl"
        shutil.copy(base, img)
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        out = [field(img, INUSE_AT), img.stat().st_size]
        qemu_io_lines("-f", "raw", "-c", "write -P 1 5M 4k", uri)
        out.append(img.stat().st_size)
        qemu_io_lines("-f", "raw", "-c", "write -P 2 0 1M", "-c", "write -P 3 40M 2M", uri)
        out.append(img.stat().st_size)
        c.close()
        d.stop()
        out += [field(img, INUSE_AT), img.stat().st_size, img.read_bytes()]
        seen.append(out)
    assert seen[0][:6] == [INUSE, MiB, 130 * MiB, 130 * MiB, 0, 5 * MiB]
    assert seen[1] == seen[0]


def damaged(tmp_path, name, damage, extra=0):
    """An 8 MiB image with three clusters written (at 0, 2 MiB and 5 MiB), then `damage`
    done to it: (offset, struct format, value), and `extra` bytes added at its end."""
    img = tmp_path / f"{name}.prl"
    qemu_img("create", "-q", "-f", "parallels", str(img), "8M")
    for w in ("write -P 0x11 0 1M", "write -P 0x22 2M 1M", "write -P 0x33 5M 64k"):
        subprocess.run(["qemu-io", "-f", "parallels", "-c", w, str(img)], check=True,
                       capture_output=True)
    data = bytearray(img.read_bytes())
    for at, fmt, value in damage:
        struct.pack_into(fmt, data, at, value)
    img.write_bytes(bytes(data) + bytes(extra))
    return img


UNCLEAN = (INUSE_AT, "<I", INUSE)
DAMAGE = {
    "clean": ([], 0),
    "unclean": ([UNCLEAN], 0),
    "unclean-leak": ([UNCLEAN], 3000000),
    "outside": ([(64 + 4 * 2, "<I", 50)], 0),
    "shared": ([(64 + 4 * 5, "<I", 1)], 0),
    "shared-unclean": ([(64 + 4 * 5, "<I", 1), UNCLEAN], 0),
    "data-off-low": ([(DATA_OFF, "<I", 1)], 0),
    "data-off-past-file": ([(DATA_OFF, "<I", 100000)], 0),
    "past-file-unclean": ([(64 + 4 * 7, "<I", 9), UNCLEAN], 0),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_images_needing_repair_are_repaired_as_qemu_repairs_them(both, tmp_path, name):
    """Opened read-only: untouched. Opened writable: repaired, each finding said on
    standard error as QEMU says it, then closed: the same bytes, the same reads."""
    src = damaged(tmp_path, name, *DAMAGE[name])
    results, files = [], []
    for d in both():
        img = d.workdir / "u.prl"
        shutil.copy(src, img)
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "parallels", "node-name": "r", "read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "read-only": True}})
        out.append(("untouched", img.read_bytes() == src.read_bytes()))
        cmd("blockdev-del", {"node-name": "r"})
        cmd("blockdev-add", {"driver": "parallels", "node-name": "v",
                             "file": {"driver": "file", "filename": str(img)}})
        uri = export(c, d, "v", "v", False)
        out.append(("io", qemu_io_lines("-r", "-f", "raw", "-c", "read -P 0x11 0 1M",
                                        "-c", "read -P 0x22 2M 1M", "-c", "read -P 0x33 5M 64k",
                                        "-c", "read -P 0 7M 1M", uri)))
        c.close()
        d.stop()
        out.append(("stderr", [ln for ln in d.stderr_path.read_text().splitlines()
                               if "Repairing" in ln]))
        results.append(out)
        files.append(img.read_bytes())
    assert_same_transcript(*results)
    assert files[1] == files[0]


def test_no_new_cluster_lands_on_the_first_after_repairing_an_unclean_image(both, tmp_path):
    """After QEMU repairs an image not closed cleanly its map of used clusters is empty:
    the first new cluster goes past the last, the second over the disk's first cluster
    (two BAT entries then share it, and the disk's first megabyte reads what was written
    at 6 MiB). ferrite reads the map from the repaired BAT."""
    src = damaged(tmp_path, "u", [UNCLEAN])
    seen = []
    for d in both():
        img = d.workdir / "u.prl"
        shutil.copy(src, img)
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        lines = qemu_io_lines("-f", "raw", "-c", "write -P 0x77 7M 64k",
                              "-c", "write -P 0x66 6M 64k", "-c", "read -P 0x11 0 64k",
                              "-c", "read -P 0x77 7M 64k", "-c", "read -P 0x66 6M 64k", uri)
        c.close()
        d.stop()
        seen.append([ln for ln in lines if "failed" in ln])
    assert seen[0] == ["Pattern verification failed at offset 0, 65536 bytes"]
    assert seen[1] == []
    check = subprocess.run(["qemu-img", "check", "-f", "parallels", str(img)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def created(d, **options):
    return image_formats.created(d, "parallels", **options)


@pytest.mark.parametrize("options", [
    {"size": 10 * MiB}, {"size": 0}, {"size": 1000}, {"size": 3 * MiB + 512},
    {"size": 100 * MiB, "cluster-size": 4096}, {"size": 100 * MiB, "cluster-size": 512},
    {"size": MiB, "cluster-size": 3000}, {"size": MiB, "cluster-size": 0},
    {"size": 1 << 50, "cluster-size": 65536}, {"size": 1 << 40},
    {"size": MiB, "cluster-size": 1 << 31}, {"size": MiB, "cluster-size": (1 << 31) - 512}],
    ids=["10M", "empty", "odd", "3M+512", "4k-clusters", "512-clusters", "cluster-3000",
         "cluster-0", "too-large", "1T", "cluster-too-large", "cluster-largest"])
def test_blockdev_create_makes_what_qemu_makes(both, options):
    q, f = both()
    assert created(f, **options) == created(q, **options)


HEADER_DAMAGE = [
    ("magic", 0, 0x12345678, "<I"), ("version", 16, 3, "<I"), ("tracks-0", TRACKS, 0, "<I"),
    ("tracks-huge", TRACKS, 1 << 30, "<I"), ("catalog-huge", BAT_ENTRIES, 1 << 30, "<I"),
    ("ext-off-huge", EXT_OFF, 1 << 62, "<Q"), ("bigger-disk", NB_SECTORS, 1 << 20, "<Q"),
    ("size-high-bits", NB_SECTORS + 4, 1, "<I"), ("data-off-low", DATA_OFF, 3, "<I"),
    ("small-bat", BAT_ENTRIES, 2, "<I"),
]


@pytest.mark.parametrize("name,at,value,fmt", HEADER_DAMAGE, ids=[d[0] for d in HEADER_DAMAGE])
def test_damaged_headers_are_refused_as_qemu_refuses_them(both, tmp_path, name, at, value,
                                                          fmt):
    img = damaged(tmp_path, "h", [(at, fmt, value)])
    opened_read_only(both, img, "parallels", ["read -P 0x11 0 4k", "read -P 0x33 5M 4k",
                                              "read -P 0 7M 4k"])


def test_the_node_answers_as_qemus(both, tmp_path):
    """Resizes refused, persistent bitmaps refused, options of other formats refused, the
    overlay by name refused (no backing file in the format), a backup to a new image by
    name made as QEMU makes it."""
    src = tmp_path / "n.prl"
    qemu_img("create", "-q", "-f", "parallels", str(src), "4M")
    results, files = [], []
    for d in both():
        img = d.workdir / "n.prl"
        shutil.copy(src, img)
        c = writable(d, img)
        out = []
        cmd = recorder(c, out)
        cmd("block_resize", {"node-name": "v", "size": 8 * MiB})
        cmd("block-dirty-bitmap-add", {"node": "v", "name": "b", "persistent": True})
        cmd("blockdev-add", {"driver": "parallels", "node-name": "w", "prealloc-size": 4096,
                             "file": {"driver": "file", "filename": str(img)}})
        cmd("blockdev-snapshot-sync", {"node-name": "v", "format": "parallels",
                                       "snapshot-file": str(d.workdir / "o.prl"),
                                       "snapshot-node-name": "o"})
        cmd("drive-backup", {"device": "v", "job-id": "j", "sync": "full",
                             "format": "parallels", "target": str(d.workdir / "t.prl")})
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "null")
        c.close()
        d.stop()
        results.append(json.loads(json.dumps(out).replace(str(d.workdir), "DIR")))
        files.append((d.workdir / "t.prl").read_bytes())
    assert_same_transcript(*results)
    assert files[1] == files[0]


def test_an_overlay_over_a_backing_file_reads_through_and_copies_up(both, tmp_path):
    """A parallels overlay put over a qcow2 image (blockdev-snapshot): unwritten clusters
    read the backing file, a partial write places a cluster holding the backing file's
    bytes around the new ones, and discards and zeroes over whole clusters cannot drop
    clusters (zeroes are written)."""
    src = tmp_path / "s"
    src.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(src / "b.qcow2"), "8M")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M",
                    str(src / "b.qcow2")], check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(src / "o.prl"),
             "8M")
    results = []
    for d in both():
        for f in src.iterdir():
            shutil.copy(f, d.workdir / f.name)
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "qcow2", "node-name": "b",
                             "file": {"driver": "file", "filename": str(d.workdir / "b.qcow2")}})
        cmd("blockdev-add", {"driver": "file", "node-name": "of",
                             "filename": str(d.workdir / "o.prl")})
        c.cmd("blockdev-add", {"driver": "parallels", "node-name": "o", "file": "of"})
        cmd("blockdev-snapshot", {"node": "b", "overlay": "o"})
        uri = export(c, d, "o", "o", True)
        out.append(("io", qemu_io_lines(
            "-f", "raw", "-c", "read -P 0x11 0 64k", "-c", "write -P 0x22 70k 4k",
            "-c", "read -P 0x11 64k 6k", "-c", "read -P 0x22 70k 4k",
            "-c", "read -P 0x11 74k 54k", "-c", "write -z 1M 64k", "-c", "read -P 0 1M 64k",
            "-c", "discard 2M 64k", "-c", "read -P 0x11 2M 64k", uri)))
        r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                           capture_output=True, text=True)
        out.append(("map", r.stdout))
        c.close()
        d.stop()
        results.append(out)
    assert_same_transcript(*results)


@pytest.mark.parametrize("how", ["flush", "fua"])
def test_acknowledged_writes_survive_sigkill(ferrite, tmp_path, how):
    """A flush (or a write with FUA) makes the data and the BAT entries pointing to it
    durable: after SIGKILL, the image (repaired on the next writable open) reads it."""
    img = tmp_path / "k.prl"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(img), "16M")
    d = ferrite()
    c = writable(d, img)
    uri = export(c, d, "v", "v", True)
    if how == "flush":
        ops = ["-c", "write -P 0x5a 1M 128k", "-c", "flush"]
    else:
        ops = ["-c", "write -f -P 0x5a 1M 128k"]
    lines = qemu_io_lines("-f", "raw", *ops, uri)
    assert not [ln for ln in lines if "fail" in ln], lines
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    c.close()
    assert field(img, INUSE_AT) == INUSE
    r = subprocess.run(["qemu-io", "-r", "-f", "parallels", "-c", "read -P 0x5a 1M 128k",
                        str(img)], capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    d = ferrite()
    c = writable(d, img)
    c.close()
    d.stop()
    assert "Repairing image was not closed correctly" in d.stderr_path.read_text()
    assert field(img, INUSE_AT) == 0
    check = subprocess.run(["qemu-img", "check", "-f", "parallels", str(img)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_concurrent_writes_into_new_clusters_place_each_once(ferrite, tmp_path):
    """Writes in flight together into clusters not yet placed: each placed once, every
    write lands, qemu-img finds the image sound."""
    img = tmp_path / "c.prl"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(img), "8M")
    d = ferrite()
    c = writable(d, img)
    uri = export(c, d, "v", "v", True)
    ops = []
    for cluster in (2, 0, 5, 6):
        for k in range(8):
            ops += ["-c", f"aio_write -P {0x40 + cluster * 8 + k} "
                          f"{cluster * 65536 + k * 8192} 8k"]
    ops += ["-c", "aio_flush"]
    r = subprocess.run(["qemu-io", "-f", "raw", *ops, uri], capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    c.close()
    d.stop()
    check = subprocess.run(["qemu-img", "check", "-f", "parallels", str(img)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    assert "4/128 = 3.12% allocated" in check.stdout, check.stdout
    reads = []
    for cluster in (2, 0, 5, 6):
        for k in range(8):
            reads += ["-c", f"read -P {0x40 + cluster * 8 + k} {cluster * 65536 + k * 8192} 8k"]
    r = subprocess.run(["qemu-io", "-f", "parallels", *reads, str(img)], capture_output=True,
                       text=True)
    assert "failed" not in r.stdout + r.stderr and "differ" not in r.stdout, r.stdout


EXT_MAGIC, BITMAP_FEATURE = 0xAB234CEF23DCEA87, 0x20385FAE252CB34A
UUID = bytes(range(0xa0, 0xb0))
UUID_TEXT = "a0a1a2a3-a4a5-a6a7-a8a9-aaabacadaeaf"


def with_extension(tmp_path, name, damage=None):
    """A 4 MiB image of 64 KiB clusters with a format extension holding one dirty bitmap
    (64 KiB granularity; granules 5, 6, 10-12 and 30 set) in a cluster of its own, then
    `damage` (field: value) done to the extension."""
    damage = damage or {}
    img = tmp_path / f"{name}.prl"
    qemu_img("create", "-q", "-f", "parallels", "-o", "cluster_size=64k", str(img), "4M")
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x11 0 64k", str(img)],
                   check=True, capture_output=True)
    data = bytearray(img.read_bytes())
    c = 65536
    ext_at, bits_at = len(data), len(data) + c
    l1 = damage.get("l1", [bits_at // 512])
    feature = struct.pack("<Q16sII", damage.get("size", 8192), damage.get("uuid", UUID),
                          damage.get("granularity", 128), damage.get("l1_size", len(l1)))
    feature += struct.pack(f"<{len(l1)}Q", *l1)
    features = struct.pack("<QQII", damage.get("feature", BITMAP_FEATURE),
                           damage.get("flags", 0), len(feature), 0) + feature
    features += bytes(-len(features) % 8)
    if damage.get("twice"):
        features *= 2
    features += bytes(24)  # end of features
    body = features + bytes(c - 24 - len(features))
    digest = hashlib.md5(body).digest()
    if damage.get("checksum"):
        digest = bytes(16)
    ext = struct.pack("<Q", damage.get("magic", EXT_MAGIC)) + digest + body
    bits = 0
    for g in (5, 6, 10, 11, 12, 30):
        bits |= 1 << g
    data += ext + struct.pack("<Q", bits) + bytes(c - 8)
    struct.pack_into("<Q", data, EXT_OFF, ext_at // 512)
    img.write_bytes(bytes(data))
    return img


EXT_DAMAGE = {
    "good": {}, "magic": {"magic": 1}, "checksum": {"checksum": True},
    "flags": {"flags": 1}, "unknown-feature": {"feature": 7},
    "size": {"size": 4096}, "l1-size": {"l1_size": 2}, "l1-past-feature": {"l1_size": 9000},
    "all-set": {"l1": [1]}, "all-clear": {"l1": [0]}, "twice": {"twice": True},
}


@pytest.mark.parametrize("name", list(EXT_DAMAGE))
def test_format_extension_bitmaps_are_read_only_and_exported_as_qemus(both, tmp_path, name):
    """Opened read-only, the extension's bitmap becomes a read-only bitmap of the node
    named by its UUID, exported over NBD with the same dirty areas; a damaged extension
    is refused in QEMU's words. Opened writable, the extension is ignored with QEMU's
    warning."""
    img = with_extension(tmp_path, name, EXT_DAMAGE[name])
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "parallels", "node-name": "v", "read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "read-only": True}})
        if "error" not in out[-1][1]:
            out.append(("bitmaps", [n.get("dirty-bitmaps") for n in
                                    c.cmd("query-named-block-nodes", {"flat": True})["return"]
                                    if n["node-name"] == "v"]))
            cmd("block-dirty-bitmap-clear", {"node": "v", "name": UUID_TEXT})
            sock = str(d.workdir / "nbd.sock")
            cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
            cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "v",
                                     "bitmaps": [UUID_TEXT]})
            r = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                                f"driver=nbd,export=v,server.type=unix,server.path={sock},"
                                f"x-dirty-bitmap=qemu:dirty-bitmap:{UUID_TEXT}"],
                               capture_output=True, text=True)
            out.append(("map", r.stdout, r.stderr))
            # qemu-img has gone, but its connection's end may not have been seen yet: a
            # safe-mode delete would then be refused as still in use.
            cmd("block-export-del", {"id": "e", "mode": "hard"})
            c.wait_event("BLOCK_EXPORT_DELETED")
            cmd("blockdev-del", {"node-name": "v"})
        copy = d.workdir / "w.prl"
        shutil.copy(img, copy)
        cmd("blockdev-add", {"driver": "parallels", "node-name": "w",
                             "file": {"driver": "file", "filename": str(copy)}})
        c.close()
        d.stop()
        out.append(("stderr", [ln.split(": ", 1)[-1]
                               for ln in d.stderr_path.read_text().splitlines()]))
        results.append(out)
    assert_same_transcript(*results)


def test_a_bitmap_granularity_qemu_aborts_on_is_refused(ferrite, tmp_path):
    """A granularity that is not a power of two: qemu-storage-daemon aborts on an
    assertion; ferrite refuses the image."""
    img = with_extension(tmp_path, "g", {"granularity": 3})
    d = ferrite()
    c = d.connect()
    r = c.cmd("blockdev-add", {"driver": "parallels", "node-name": "v", "read-only": True,
                               "file": {"driver": "file", "filename": str(img),
                                        "read-only": True}})
    assert "not a power of 2" in r["error"]["desc"], r
    assert "return" in c.cmd("query-version")
    c.close()
    d.stop()
