"""The `qed` driver against qemu-storage-daemon: images qemu-img made (with and without a
backing file, small and large clusters) opened with the same node information, written and
read through an NBD export to the same bytes on disk (clusters and L2 tables are placed in
the order they are first written, so the files must be identical); the need-check flag set
by the first new cluster and cleared five seconds later, or at once on a drain; images not
closed cleanly checked and repaired on a writable open as QEMU repairs them; images
`blockdev-create` makes; damaged headers refused in the same words; resizes; backing file
changes by a stream job; overlays made by file name."""
import json
import re
import shutil
import struct
import subprocess
import time

import pytest

import image_formats
from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder
from image_formats import opened_read_only, qemu_img, qemu_io_lines, used_through_nbd

MiB = 1 << 20
K64 = 65536

# Header fields (byte offsets, little-endian).
CLUSTER, TABLE, HEADER_SIZE, FEATURES = 4, 8, 12, 16
COMPAT, AUTOCLEAR, L1, IMAGE_SIZE, BACKING_AT, BACKING_LEN = 24, 32, 40, 48, 56, 60
NEED_CHECK = 2

# qemu-io commands through the export: unaligned writes and writes across clusters and L2
# tables, zeroes over whole clusters (zero clusters) and over parts (data), writes into
# zero clusters, discards (ignored), reads of clusters never written.
IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 6M 1M",
      "write -z 7340000 2000", "write -z 9M 200k", "write -P 0x55 6M 4k",
      "discard 1M 4k", "write -P 0x44 8M 2M", "write -P 0x66 20M 64k",
      "read -P 0x11 1M 64k", "read -P 0x33 1047000 3000", "read -P 0 9437184 1000",
      "read -P 0x44 8M 1M", "read -P 0x55 6M 4k", "read -P 0 6M+4k 1020k",
      "read -P 0 4M 1M", "read -P 0x66 20M 64k"]

KINDS = {
    "plain": ([], None),
    "small-clusters": (["-o", "cluster_size=4096,table_size=16"], None),
    "qed-backing": ([], "qed"),
    "raw-backing": ([], "raw"),
}


def header(img):
    return struct.unpack_from("<IIIIQQQQQII", img.read_bytes())


def features(img):
    return struct.unpack_from("<Q", img.read_bytes(), FEATURES)[0]


def poke(img, field, value, fmt="<Q"):
    data = bytearray(img.read_bytes())
    struct.pack_into(fmt, data, field, value)
    img.write_bytes(bytes(data))


@pytest.fixture(scope="module", params=list(KINDS))
def image(tmp_path_factory, request):
    """A 16 MiB image qemu-img made, in a directory of its own, with a pattern at 1 MiB
    (in its backing file when it has one, whose bytes then show through)."""
    opts, backing = KINDS[request.param]
    d = tmp_path_factory.mktemp("qed")
    img = d / "v.qed"
    if backing:
        base = d / f"base.{backing}"
        qemu_img("create", "-q", "-f", backing, str(base), "16M")
        subprocess.run(["qemu-io", "-f", backing, "-c", "write -P 0x11 0 4M", str(base)],
                       check=True, capture_output=True)
        qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", backing, str(img))
    else:
        qemu_img("create", "-q", "-f", "qed", *opts, str(img), "16M")
        subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 1M 64k", str(img)],
                       check=True, capture_output=True)
    return img


def test_qed_image_matches_qsd(both, image):
    results, files = [], []
    for d in both():
        for f in image.parent.iterdir():
            shutil.copy(f, d.workdir / f.name)
        img = d.workdir / image.name
        out = used_through_nbd(d, img, "qed", IO, 32 * MiB)
        text = json.dumps(out).replace(str(d.workdir), "DIR")
        results.append(json.loads(re.sub(r"#block[0-9]+", "#block", text)))
        files.append({p.name: p.read_bytes() for p in d.workdir.iterdir()
                      if p.suffix in (".qed", ".raw")})
    assert_same_transcript(*results)
    assert files[1] == files[0]


def writable(d, img, backing=True):
    c = d.connect()
    opts = {"driver": "qed", "node-name": "v",
            "file": {"driver": "file", "filename": str(img)}}
    if not backing:
        opts["backing"] = None
    assert c.cmd("blockdev-add", opts) == {"return": {}}
    return c


def dirty_flag(c):
    return [n["image"]["dirty-flag"] for n in
            c.cmd("query-named-block-nodes", {"flat": True})["return"]
            if n["node-name"] == "v"]


def test_need_check_flag_is_set_then_cleared_after_five_seconds(both, tmp_path):
    """Without a backing file the first new cluster sets the flag. QEMU's timer clears it
    five seconds after the last allocating write, on the virtual clock, which never runs in
    qemu-storage-daemon (no guest): there it stays set until a drain or the close. ferrite's
    runs on the host's clock there, so an image left by a crash needs no check unless
    clusters were placed in its last five seconds."""
    base = tmp_path / "n.qed"
    qemu_img("create", "-q", "-f", "qed", str(base), "8M")
    seen = []
    for d in both():
        img = d.workdir / "n.qed"
        shutil.copy(base, img)
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        out = [dirty_flag(c), features(img)]
        qemu_io_lines("-f", "raw", "-c", "write -P 1 0 64k", uri)
        out += [dirty_flag(c), features(img)]
        time.sleep(6)
        out += [dirty_flag(c), features(img)]
        qemu_io_lines("-f", "raw", "-c", "write -P 2 0 4k", uri)
        out += [dirty_flag(c), features(img)]
        c.close()
        d.stop()
        out.append(features(img))
        seen.append(out)
    assert seen[0] == [[False], 0, [True], NEED_CHECK, [True], NEED_CHECK, [True], NEED_CHECK,
                       0]
    assert seen[1] == [[False], 0, [True], NEED_CHECK, [False], 0, [False], 0, 0]


def test_a_drain_clears_the_need_check_flag_at_once(both, tmp_path):
    """A drained section (here, a snapshot's) fires the timer at once (QEMU's
    `bdrv_qed_drain_begin`): the flag is clear on disk when the command returns."""
    base = tmp_path / "n.qed"
    qemu_img("create", "-q", "-f", "qed", str(base), "8M")
    seen = []
    for d in both():
        img = d.workdir / "n.qed"
        shutil.copy(base, img)
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        qemu_io_lines("-f", "raw", "-c", "write -P 1 0 64k", uri)
        before = features(img)
        r = c.cmd("blockdev-snapshot-sync", {"node-name": "v", "format": "qcow2",
                                              "snapshot-file": str(d.workdir / "o.qcow2"),
                                              "snapshot-node-name": "o"})
        seen.append((before, r, features(img)))
        c.close()
        d.stop()
    assert seen[0] == (NEED_CHECK, {"return": {}}, 0)
    assert seen[1] == seen[0]


def l2_offset(img):
    data = img.read_bytes()
    l1 = struct.unpack_from("<Q", data, L1)[0]
    return struct.unpack_from("<Q", data, l1)[0]


def unclean(tmp_path, damage):
    """An image with clusters written, the need-check flag set and `damage` done to its
    first L2 table (entry index, value)."""
    img = tmp_path / "u.qed"
    qemu_img("create", "-q", "-f", "qed", str(img), "8M")
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 192k", str(img)],
                   check=True, capture_output=True)
    poke(img, FEATURES, features(img) | NEED_CHECK)
    l2 = l2_offset(img)
    for index, value in damage:
        poke(img, l2 + 8 * index, value)
    return img


@pytest.mark.parametrize("damage", [
    [], [(1, 1 << 40)], [(2, 65536 + 512)], [(1, 65536 * 2)], [(5, 65536)]],
    ids=["clean", "past-the-file", "unaligned", "claimed-twice", "inside-header-cluster"])
def test_an_image_not_closed_cleanly_is_repaired_as_qemu_repairs_it(both, tmp_path, damage):
    """Opened writable: entries outside the file cleared, the flag cleared unless a cluster
    is claimed twice (left as it is); the same bytes afterwards. Opened read-only: nothing
    changes."""
    src = unclean(tmp_path, damage)
    results, files = [], []
    for d in both():
        img = d.workdir / "u.qed"
        shutil.copy(src, img)
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "qed", "node-name": "r", "read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "read-only": True}})
        out.append(("untouched", img.read_bytes() == src.read_bytes()))
        cmd("blockdev-del", {"node-name": "r"})
        cmd("blockdev-add", {"driver": "qed", "node-name": "v",
                             "file": {"driver": "file", "filename": str(img)}})
        out.append(("dirty", dirty_flag(c), features(img)))
        uri = export(c, d, "v", "v", False)
        out.append(("io", qemu_io_lines("-r", "-f", "raw", "-c", "read -P 0x11 0 64k",
                                        "-c", "read -P 0x11 128k 64k", uri)))
        c.close()
        d.stop()
        results.append(out)
        files.append(img.read_bytes())
    assert_same_transcript(*results)
    assert files[1] == files[0]


def created(d, **options):
    return image_formats.created(d, "qed", **options)


@pytest.mark.parametrize("options", [
    {"size": 10 * MiB}, {"size": 0}, {"size": 1000}, {"size": 3 * MiB + 512},
    {"size": MiB, "cluster-size": 4096, "table-size": 16},
    {"size": MiB, "cluster-size": 1 << 26, "table-size": 1},
    {"size": MiB, "backing-file": "base.qcow2"},
    {"size": MiB, "backing-file": "base.raw", "backing-fmt": "raw"},
    {"size": MiB, "backing-file": "base.img", "backing-fmt": "qcow2"},
    {"size": MiB, "backing-fmt": "raw"},
    {"size": MiB, "cluster-size": 3000}, {"size": MiB, "cluster-size": 2048},
    {"size": MiB, "table-size": 3}, {"size": MiB, "table-size": 32},
    {"size": MiB, "table-size": 0}, {"size": 1 << 62},
    {"size": MiB, "cluster-size": 1 << 26, "table-size": 16}],
    ids=["10M", "empty", "odd", "3M+512", "small-clusters", "64M-clusters", "backing",
         "raw-backing", "qcow2-backing", "format-alone", "cluster-3000", "cluster-2k",
         "table-3", "table-32", "table-0", "too-large", "wrapping-maximum"])
def test_blockdev_create_makes_what_qemu_makes(both, options):
    q, f = both()
    assert created(f, **options) == created(q, **options)


DAMAGE = [
    ("magic", 0, 0x12345678, "<I"), ("features", FEATURES, 0x10, "<Q"),
    ("cluster-size", CLUSTER, 3000, "<I"), ("cluster-too-small", CLUSTER, 2048, "<I"),
    ("table-size", TABLE, 3, "<I"), ("table-too-large", TABLE, 32, "<I"),
    ("image-size-odd", IMAGE_SIZE, 12 * MiB + 1, "<Q"),
    ("image-too-large", IMAGE_SIZE, 1 << 62, "<Q"),
    ("l1-unaligned", L1, K64 + 512, "<Q"), ("l1-past-the-file", L1, 1 << 30, "<Q"),
    ("l1-in-header", L1, 0, "<Q"), ("header-too-large", HEADER_SIZE, 1 << 20, "<I"),
    ("backing-past-header", BACKING_AT, K64 - 4, "<I"),
    ("backing-too-long", BACKING_LEN, 4096, "<I"), ("backing-long", BACKING_LEN, 4095, "<I"),
    ("compat-features", COMPAT, 1, "<Q"), ("autoclear-features", AUTOCLEAR, 4, "<Q"),
    ("bigger-disk", IMAGE_SIZE, 64 * MiB, "<Q"),
]


@pytest.mark.parametrize("name,field,value,fmt", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_headers_are_refused_as_qemu_refuses_them(both, tmp_path, name, field, value,
                                                          fmt):
    base = tmp_path / "base.qed"
    (tmp_path / "b.raw").write_bytes(b"")
    qemu_img("create", "-q", "-f", "qed", "-b", "b.raw", "-F", "raw", str(base), "12M")
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 4k", str(base)],
                   check=True, capture_output=True)
    poke(base, field, value, fmt)
    opened_read_only(both, base, "qed", ["read -P 0x11 0 4k", "read -P 0 5M 4k"])


def test_unknown_autoclear_features_are_dropped_by_a_writable_open(both, tmp_path):
    src = tmp_path / "a.qed"
    qemu_img("create", "-q", "-f", "qed", str(src), "4M")
    poke(src, AUTOCLEAR, 0x30)
    seen = []
    for d in both():
        img = d.workdir / "a.qed"
        shutil.copy(src, img)
        c = writable(d, img)
        seen.append(header(img))
        c.close()
        d.stop()
    assert seen[0][6] == 0
    assert seen[1] == seen[0]
    assert struct.unpack_from("<Q", (tmp_path / "a.qed").read_bytes(), AUTOCLEAR)[0] == 0x30


def test_resizes_grow_only_as_in_qemu(both, tmp_path):
    src = tmp_path / "g.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", str(src),
             "4M")
    results, files = [], []
    for d in both():
        img = d.workdir / "g.qed"
        shutil.copy(src, img)
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
        # Opening an image of one-cluster tables: QEMU refuses, ferrite opens it.
        r = c.cmd("blockdev-add", {"driver": "qed", "node-name": "v", "file": "f"})
        out.append(("one-cluster-tables", "error" in r))
        results.append(out)
        c.close()
        d.stop()
    assert results[0][-1] == ("one-cluster-tables", True)
    assert results[1][-1] == ("one-cluster-tables", False)

    src = tmp_path / "h.qed"
    qemu_img("create", "-q", "-f", "qed", str(src), "4M")
    results, files = [], []
    for d in both():
        img = d.workdir / "h.qed"
        shutil.copy(src, img)
        c = writable(d, img)
        out = []
        cmd = recorder(c, out)
        for size in (8 * MiB, 8 * MiB + 512, 2 * MiB, 8 * MiB + 100, 1 << 50,
                     32768 * 32768 * K64):
            cmd("block_resize", {"node-name": "v", "size": size})
        out.append(("size", [n["image"]["virtual-size"] for n in
                             c.cmd("query-named-block-nodes", {"flat": True})["return"]
                             if n["node-name"] == "v"]))
        c.close()
        d.stop()
        results.append(out)
        files.append(img.read_bytes())
    assert_same_transcript(*results)
    assert files[1] == files[0]


def test_one_cluster_tables_work_in_ferrite(ferrite, tmp_path):
    """QEMU cannot open any image of `table_size=1` (its table offset check wraps); ferrite
    writes and reads one, across L2 tables, and opens it again."""
    img = tmp_path / "t.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", str(img),
             "8M")
    for ops in (["write -P 0x31 0 8k", "write -P 0x32 2M 12k", "write -z 4M 8k",
                 "read -P 0x31 0 8k", "read -P 0x32 2M 12k"],
                ["read -P 0x31 0 8k", "read -P 0x32 2M 12k", "read -P 0 4M 8k",
                 "read -P 0 1M 4k"]):
        d = ferrite()
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        lines = qemu_io_lines("-f", "raw", *[a for op in ops for a in ("-c", op)], uri)
        assert not [ln for ln in lines if "fail" in ln or "differ" in ln], lines
        c.close()
        d.stop()
    assert features(img) & NEED_CHECK == 0


def test_a_stream_job_drops_the_backing_file_as_qemu(both, tmp_path):
    """block-stream into a QED overlay: its data copied up, then its header rewritten with
    no backing file."""
    src = tmp_path / "src"
    src.mkdir()
    qemu_img("create", "-q", "-f", "qed", str(src / "base.qed"), "4M")
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 0 4M", str(src / "base.qed")],
                   check=True, capture_output=True)
    qemu_img("create", "-q", "-f", "qed", "-b", "base.qed", "-F", "qed",
             str(src / "top.qed"))
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x22 1M 64k", str(src / "top.qed")],
                   check=True, capture_output=True)
    infos, data = [], []
    for d in both():
        for f in src.iterdir():
            shutil.copy(f, d.workdir / f.name)
        c = writable(d, d.workdir / "top.qed")
        assert c.cmd("block-stream", {"job-id": "s", "device": "v"}) == {"return": {}}
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        c.close()
        d.stop()
        info = json.loads(qemu_img("info", "--output=json", str(d.workdir / "top.qed")).stdout)
        info.pop("filename")
        info.pop("actual-size", None)
        info.pop("children", None)
        infos.append(info)
        data.append(d.workdir / "top.qed")
        assert header(d.workdir / "top.qed")[4] == 0
    assert infos[1] == infos[0]
    r = subprocess.run(["qemu-img", "compare", str(data[0]), str(data[1])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_an_overlay_made_by_name_is_qemus(both, tmp_path):
    """blockdev-snapshot-sync with format qed under an export: the overlay file QEMU makes,
    naming the image below, then written through the export."""
    src = tmp_path / "b.qed"
    qemu_img("create", "-q", "-f", "qed", str(src), "4M")
    results, files = [], []
    for d in both():
        img = d.workdir / "b.qed"
        shutil.copy(src, img)
        c = writable(d, img)
        uri = export(c, d, "v", "v", True)
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-snapshot-sync", {"node-name": "v", "format": "qed",
                                       "snapshot-file": str(d.workdir / "o.qed"),
                                       "snapshot-node-name": "o"})
        out.append(("io", qemu_io_lines("-f", "raw", "-c", "write -P 0x44 64k 4k",
                                        "-c", "read -P 0x44 64k 4k", uri)))
        c.close()
        d.stop()
        results.append(json.loads(normalize(json.dumps(out)).replace(str(d.workdir), "DIR")))
        data = (d.workdir / "o.qed").read_bytes()
        # The backing file's name and its length differ with the daemon's directory.
        name = data[64:K64].rstrip(b"\0").replace(str(d.workdir).encode(), b"DIR")
        files.append((data[:BACKING_LEN], name, data[K64:]))
    assert_same_transcript(*results)
    assert files[1] == files[0]


def test_concurrent_writes_into_new_clusters_place_each_once(ferrite, tmp_path):
    """Writes in flight together into clusters not yet placed (qemu-io's aio_write): each
    cluster is placed once, and every write lands."""
    img = tmp_path / "c.qed"
    qemu_img("create", "-q", "-f", "qed", str(img), "8M")
    d = ferrite()
    c = writable(d, img)
    uri = export(c, d, "v", "v", True)
    ops = []
    for cluster in (2, 0, 5):
        for k in range(8):
            ops += ["-c", f"aio_write -P {0x40 + cluster * 8 + k} "
                          f"{cluster * K64 + k * 8192} 8k"]
    ops += ["-c", "aio_flush"]
    r = subprocess.run(["qemu-io", "-f", "raw", *ops, uri], capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    c.close()
    d.stop()
    check = qemu_img("check", "--output=json", "-f", "qed", str(img)).stdout
    assert json.loads(check)["allocated-clusters"] == 3, check
    assert "leaks" not in json.loads(check), check
    reads = []
    for cluster in (2, 0, 5):
        for k in range(8):
            reads += ["-c", f"read -P {0x40 + cluster * 8 + k} {cluster * K64 + k * 8192} 8k"]
    r = subprocess.run(["qemu-io", "-f", "qed", *reads, str(img)], capture_output=True,
                       text=True)
    assert "failed" not in r.stdout + r.stderr and "differ" not in r.stdout, r.stdout


def test_concurrent_placements_across_tables_all_land(ferrite, tmp_path):
    """Many writes in flight together, placing clusters in three L2 tables (two of them
    new): each lands, every table update keeps the others' entries, and qemu-img finds
    the image sound with nothing leaked."""
    img = tmp_path / "p.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", str(img),
             "16M")
    subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x10 0 4k", str(img)],
                   check=True, capture_output=True)
    d = ferrite()
    c = writable(d, img)
    uri = export(c, d, "v", "v", True)
    # An L2 table spans 4 MiB: clusters in the first (existing) and two new ones.
    places = [(t * 4 * MiB + k * 12288 + 4096, 0x20 + t * 40 + k)
              for k in range(40) for t in range(3)]
    ops = []
    for at, pattern in places:
        ops += ["-c", f"aio_write -P {pattern} {at} 4k"]
    ops += ["-c", "aio_flush"]
    r = subprocess.run(["qemu-io", "-f", "raw", *ops, uri], capture_output=True, text=True)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    c.close()
    d.stop()
    check = json.loads(qemu_img("check", "--output=json", "-f", "qed", str(img)).stdout)
    assert check["allocated-clusters"] == len(places) + 1, check
    assert "leaks" not in check and "corruptions" not in check, check
    reads = ["-c", "read -P 0x10 0 4k"]
    for at, pattern in places:
        reads += ["-c", f"read -P {pattern} {at} 4k"]
    r = subprocess.run(["qemu-io", "-f", "qed", *reads, str(img)], capture_output=True,
                       text=True)
    assert "failed" not in r.stdout + r.stderr and "differ" not in r.stdout, r.stdout
