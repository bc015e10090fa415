"""The `qcow` driver (version 1) against qemu-storage-daemon: images qemu-img made (plain,
over a backing file, compressed) opened with the same node information, written and read
through an NBD export (unaligned writes cut to sectors, writes into compressed clusters)
to the same bytes on disk; images `blockdev-create` makes; damaged headers refused in the
same words; a compressed backup into a qcow image."""
import json
import re
import shutil
import struct
import subprocess

import pytest

import image_formats
from blockjobs import export
from conftest import assert_same_transcript
from image_formats import opened_read_only, qemu_img, qemu_io_lines, used_through_nbd

MiB = 1 << 20

IO = ["write -P 0x22 3M 100k", "write -P 0x33 1047000 3000", "write -z 6M 1M",
      "write -z 7340000 2000", "discard 1M 4k", "write -P 0x44 8M 2M",
      "write -P 0x55 1M+100 10", "read -P 0x11 1M+512 3k", "read -P 0x33 1047000 3000",
      "read -P 0 9437184 1000", "read -P 0x44 8M 1M", "read -P 0 6M 1M", "read -P 0 4M 1M",
      "read -P 0x55 1M+100 10"]

KINDS = ["plain", "backing"]


@pytest.fixture(scope="module", params=KINDS)
def image(tmp_path_factory, request):
    """A 12 MiB image in a directory of its own, with a pattern at 1 MiB (in its backing
    file for that kind). (Compressed images come from a backup below: qemu-img 10.0.2's
    `convert -c -O qcow` fails.)"""
    d = tmp_path_factory.mktemp("qcow")
    img = d / "v.qcow"
    if request.param == "backing":
        base = d / "base.qcow"
        qemu_img("create", "-q", "-f", "qcow", str(base), "12M")
        subprocess.run(["qemu-io", "-f", "qcow", "-c", "write -P 0x11 0 4M", str(base)],
                       check=True, capture_output=True)
        qemu_img("create", "-q", "-f", "qcow", "-b", base.name, "-F", "qcow", str(img))
    else:
        qemu_img("create", "-q", "-f", "qcow", str(img), "12M")
        subprocess.run(["qemu-io", "-f", "qcow", "-c", "write -P 0x11 1M 64k", str(img)],
                       check=True, capture_output=True)
    return img


def test_qcow_image_matches_qsd(both, image):
    results, files = [], []
    for d in both():
        for f in image.parent.iterdir():
            shutil.copy(f, d.workdir / f.name)
        out = used_through_nbd(d, d.workdir / image.name, "qcow", IO, 16 * MiB)
        text = json.dumps(out).replace(str(d.workdir), "DIR")
        results.append(json.loads(re.sub(r"#block[0-9]+", "#block", text)))
        files.append({p.name: p.read_bytes() for p in d.workdir.iterdir()
                      if p.suffix == ".qcow"})
    assert_same_transcript(*results)
    assert files[1] == files[0]


@pytest.mark.parametrize("options", [
    {"size": 10 * MiB}, {"size": 0}, {"size": 1000}, {"size": 3 * MiB + 512},
    {"size": MiB, "backing-file": "base.qcow"}, {"size": MiB, "backing-file": "fat:"},
    {"size": 1 << 40}, {"size": MiB, "encrypt": {"format": "luks", "key-secret": "s"}}],
    ids=["10M", "empty", "odd", "3M+512", "backing", "vvfat", "1T", "luks"])
def test_blockdev_create_makes_what_qemu_makes(both, options):
    q, f = both()
    assert image_formats.created(f, "qcow", **options) == \
        image_formats.created(q, "qcow", **options)


DAMAGE = [
    ("magic", 0, 0x12345678, ">I"), ("version-2", 4, 2, ">I"), ("version-7", 4, 7, ">I"),
    ("size-1", 24, 1, ">Q"), ("cluster-bits", 32, 8, ">B"), ("cluster-bits-17", 32, 17, ">B"),
    ("l2-bits", 33, 5, ">B"), ("l2-bits-14", 33, 14, ">B"), ("crypt-method", 36, 2, ">I"),
    ("too-large", 24, (1 << 64) - 1, ">Q"), ("l1-past-the-file", 40, 1 << 30, ">Q"),
    ("backing-too-long", 16, 1024, ">I"), ("odd-size", 24, 12 * MiB - 100, ">Q"),
]


@pytest.mark.parametrize("name,field,value,fmt", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_headers_are_refused_as_qemu_refuses_them(both, tmp_path, name, field, value,
                                                          fmt):
    base = tmp_path / "base.qcow"
    (tmp_path / "b.raw").write_bytes(bytes(12 * MiB))
    qemu_img("create", "-q", "-f", "qcow", "-b", "b.raw", "-F", "raw", str(base), "12M")
    subprocess.run(["qemu-io", "-f", "qcow", "-c", "write -P 0x11 0 4k", str(base)],
                   check=True, capture_output=True)
    data = bytearray(base.read_bytes())
    struct.pack_into(fmt, data, field, value)
    base.write_bytes(bytes(data))
    opened_read_only(both, base, "qcow", ["read -P 0x11 0 4k", "read -P 0 5M 4k"])


def test_a_compressed_backup_into_qcow_works(both, tmp_path):
    """blockdev-backup with compress into a qcow target. QEMU's driver takes one cluster
    per compressed write and the job writes 64 KiB: qsd fails with EINVAL (as
    `qemu-img convert -c -O qcow` does). ferrite cuts the writes into clusters: each
    compressed where it compresses, plain where not; then read, and written in part (a
    compressed cluster inflated into a new one), through an export."""
    src = tmp_path / "s.raw"
    qemu_img("create", "-q", "-f", "raw", str(src), "1M")
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 256k",
                    "-c", "write -P 0x22 300k 8k", str(src)], check=True, capture_output=True)
    with open(src, "r+b") as f:
        f.seek(512 * 1024)
        f.write(bytes(range(256)) * 64)
    tgt = tmp_path / "t.qcow"
    qemu_img("create", "-q", "-f", "qcow", str(tgt), "1M")
    q, f = both()
    c = q.connect()
    shutil.copy(src, q.workdir / "s.raw")
    shutil.copy(tgt, q.workdir / "t.qcow")
    for args in ({"driver": "raw", "node-name": "s",
                  "file": {"driver": "file", "filename": str(q.workdir / "s.raw")}},
                 {"driver": "qcow", "node-name": "t",
                  "file": {"driver": "file", "filename": str(q.workdir / "t.qcow")}}):
        assert c.cmd("blockdev-add", args) == {"return": {}}
    assert c.cmd("blockdev-backup", {"job-id": "b", "device": "s", "target": "t",
                                     "sync": "full", "compress": True}) == {"return": {}}
    assert c.wait_event("BLOCK_JOB_COMPLETED")["data"]["error"] == "Invalid argument"
    d = f
    shutil.copy(src, d.workdir / "s.raw")
    shutil.copy(tgt, d.workdir / "t.qcow")
    c = d.connect()
    for args in ({"driver": "raw", "node-name": "s",
                  "file": {"driver": "file", "filename": str(d.workdir / "s.raw")}},
                 {"driver": "qcow", "node-name": "t",
                  "file": {"driver": "file", "filename": str(d.workdir / "t.qcow")}}):
        assert c.cmd("blockdev-add", args) == {"return": {}}
    assert c.cmd("blockdev-backup", {"job-id": "b", "device": "s", "target": "t",
                                     "sync": "full", "compress": True}) == {"return": {}}
    ev = c.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in ev["data"], ev
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow",
                        str(d.workdir / "s.raw"), str(d.workdir / "t.qcow")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # Compressed: the file is far smaller than the 160 KiB of clusters with data.
    assert (d.workdir / "t.qcow").stat().st_size < 64 * 1024
    uri = export(c, d, "t", "t", True)
    io = qemu_io_lines("-f", "raw", "-c", "read -P 0x11 4k 8k", "-c", "write -P 0x33 5k 1k",
                       "-c", "read -P 0x11 4k 1k", "-c", "read -P 0x33 5k 1k",
                       "-c", "read -P 0x11 6k 2k", "-c", "read -P 0x22 300k 8k", uri)
    assert not [ln for ln in io if "fail" in ln or "differ" in ln], io
    c.close()
    d.stop()
    # QEMU reads what ferrite wrote.
    r = subprocess.run(["qemu-io", "-f", "qcow", "-c", "read -P 0x11 0 5k",
                        "-c", "read -P 0x33 5k 1k", "-c", "read -P 0x11 6k 250k",
                        "-c", "read -P 0x22 300k 8k", str(d.workdir / "t.qcow")],
                       capture_output=True, text=True)
    assert "fail" not in r.stdout + r.stderr and "differ" not in r.stdout, r.stdout


def test_encryption_options_on_a_plain_image_are_refused_as_qemu_refuses_them(both, tmp_path):
    img = tmp_path / "p.qcow"
    qemu_img("create", "-q", "-f", "qcow", str(img), "4M")
    results = []
    for d in both():
        c = d.connect()
        results.append([c.cmd("blockdev-add", {
            "driver": "qcow", "node-name": f"n{i}", "encrypt": encrypt,
            "file": {"driver": "file", "filename": str(img)}})
            for i, encrypt in enumerate([{"format": "aes"},
                                         {"format": "aes", "key-secret": "nosuch"}])])
        c.close()
        d.stop()
    assert results[1] == results[0]
    assert "No encryption in image header" in json.dumps(results[0])
