"""The `compress` filter (issue 14): writes through it reach a qcow2 image compressed, made
whole clusters first; what qemu-storage-daemon makes of the same writes is the reference:
the same image content and mapping, the same refusals (a compressed cluster never overwrites
one the image holds), and the same open errors."""
import contextlib
import json
import os
import subprocess

from conftest import FERRITE, QSD, Daemon, wait_for

WRITES = ["write -P 0x11 0 64k", "write -P 0x22 131072 4k", "write -P 0x33 983040 16k",
          "write -P 0x44 196608 65536", "write -P 0x55 0 4k", "write -z 327680 65536",
          "write -P 0x66 458752 1k"]


def run(*cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def compress_export(binary, workdir, size):
    """A daemon of `binary` exporting a compress filter over a new qcow2 image (64 KiB
    clusters) of `size`: yields (image, NBD URI)."""
    workdir.mkdir()
    img = workdir / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, size)
    sock = str(workdir / "nbd.sock")
    d = Daemon(binary, workdir / "d", ["--blockdev", f"driver=file,node-name=f,filename={img}",
                                       "--blockdev", "qcow2,node-name=q,file=f",
                                       "--blockdev", "compress,node-name=c,file=q",
                                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                       "--export", "nbd,id=e,node-name=c,writable=on"])
    try:
        wait_for(lambda: os.path.exists(sock), what="NBD socket")
        yield img, f"nbd+unix:///c?socket={sock}"
    finally:
        d.stop()


def through_filter(binary, tmp):
    with compress_export(binary, tmp, "1M") as (img, uri):
        outcomes = []
        for w in WRITES:
            r = run("qemu-io", "-f", "raw", "-c", w, uri)
            outcomes.append((w, "failed" in r.stdout + r.stderr))
        info = json.loads(run("nbdinfo", "--json", uri).stdout)
        block_min = info["exports"][0]["block_size_minimum"]
    mapping = json.loads(run("qemu-img", "map", "--output=json", img).stdout)
    for m in mapping:
        m.pop("offset", None)
    check = run("qemu-img", "check", "--output=json", img)
    return img, outcomes, block_min, mapping, check.returncode


def test_compressed_writes_match_qsd(tmp_path):
    qsd = through_filter(QSD, tmp_path / "qsd")
    ferrite = through_filter(FERRITE, tmp_path / "ferrite")
    assert ferrite[1:] == qsd[1:]
    assert any(failed for _, failed in ferrite[1]), "an overwrite must be refused"
    assert all(m["compressed"] for m in ferrite[3] if m["data"])
    assert run("qemu-img", "compare", qsd[0], ferrite[0]).returncode == 0


def test_compress_needs_a_format_that_compresses(tmp_path):
    img = tmp_path / "r.raw"
    run("qemu-img", "create", "-q", "-f", "raw", img, "1M")
    texts = []
    for binary in (QSD, FERRITE):
        r = run(binary, "--blockdev", f"driver=file,node-name=f,filename={img}",
                "--blockdev", "raw,node-name=r,file=f", "--blockdev", "compress,node-name=c,file=r")
        texts.append(r.stderr.split(": ", 2)[-1])
    assert texts[1] == texts[0]
    assert "Compression is not supported for underlying format: raw" in texts[0]


def test_writer_needs_resize_when_the_size_is_not_a_multiple_of_a_cluster(tmp_path):
    img = tmp_path / "u.qcow2"
    texts = []
    for binary in (QSD, FERRITE):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", img, "1040K")
        r = run(binary, "--blockdev", f"driver=file,node-name=f,filename={img}",
                "--blockdev", "qcow2,node-name=q,file=f",
                "--blockdev", "compress,node-name=c,file=q",
                "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'u.sock'}",
                "--export", "nbd,id=e,node-name=c,writable=on")
        texts.append(r.stderr.split(": ", 2)[-1])
    assert texts[1] == texts[0]
    assert "Image size is not a multiple of request alignment" in texts[0]


def test_compressed_clusters_are_packed(tmp_path):
    """Several compressed clusters share a host cluster, as QEMU packs them: 64 clusters of
    a pattern take a few host clusters, not 64."""
    sizes = []
    for binary in (QSD, FERRITE):
        with compress_export(binary, tmp_path / os.path.basename(binary), "4M") as (img, uri):
            r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", uri)
            assert "failed" not in r.stdout + r.stderr
        check = json.loads(run("qemu-img", "check", "--output=json", img).stdout)
        assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0
        sizes.append(check["image-end-offset"])
    # Header, L1, refcounts, an L2 and the data: a handful of clusters in both.
    assert sizes[1] <= 8 * 65536, sizes
    assert sizes[1] <= 2 * sizes[0], sizes
