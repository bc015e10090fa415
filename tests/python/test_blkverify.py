"""The `blkverify` test driver against qemu-storage-daemon: the node and its graph, reads and
writes that reach both children alike, and a mismatch reported with QEMU's line (QEMU then
exits; ferrite fails the request with EIO and keeps serving)."""
import subprocess

from blockjobs import export
from conftest import assert_same_transcript, recorder, wait_for


def setup(d):
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "r.img"), "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "t.qcow2"), "4M"],
                   check=True)
    for img, fmt in (("r.img", "raw"), ("t.qcow2", "qcow2")):
        subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x3c 64k 128k", str(w / img)],
                       check=True, capture_output=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "blkverify", "node-name": "b0",
                         "raw": {"driver": "file", "filename": "r.img"}})
    cmd("blockdev-add", {"driver": "blkverify", "node-name": "b",
                         "raw": {"driver": "raw", "node-name": "r",
                                 "file": {"driver": "file", "filename": "r.img"}},
                         "test": {"driver": "qcow2", "node-name": "t",
                                  "file": {"driver": "file", "filename": "t.qcow2"}}})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    # Inline files get generated names, which count differently.
    out.append(("nodes", sorted((n["node-name"], n["drv"], n["image"]["virtual-size"])
                                for n in nodes if not n["node-name"].startswith("#"))))
    graph = c.cmd("x-debug-query-block-graph")["return"]
    out.append(("edges", sorted(e["name"] for e in graph["edges"])))
    return c, out, cmd


def transcript(d):
    c, out, cmd = setup(d)
    uri = export(c, d, "b", "b", True)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 64k 128k",
                        "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k", uri],
                       capture_output=True, text=True)
    out.append(("io", [ln for ln in r.stdout.splitlines() if " ops; " not in ln]))
    c.close()
    d.stop()
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                        str(d.workdir / "r.img"), str(d.workdir / "t.qcow2")],
                       capture_output=True, text=True)
    out.append(("children agree", r.returncode))
    return out


def test_blkverify_matches_qsd(both):
    q, f = both()
    assert_same_transcript(transcript(q), transcript(f))


def test_zeroing_reaches_both_children(ferrite):
    """qemu-storage-daemon 10.0.2 aborts here (block/io.c: bdrv_co_do_pwrite_zeroes:
    Assertion `!bs->supported_zero_flags' failed); ferrite writes the zeroes to both."""
    d = ferrite()
    c, _, _ = setup(d)
    uri = export(c, d, "b", "b", True)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -z 64k 64k",
                        "-c", "read -P 0 64k 64k", "-c", "read -P 0x3c 128k 64k", uri],
                       capture_output=True, text=True)
    assert [ln for ln in r.stdout.splitlines() if " ops; " not in ln] == [
        "wrote 65536/65536 bytes at offset 65536", "read 65536/65536 bytes at offset 65536",
        "read 65536/65536 bytes at offset 131072"], r.stdout + r.stderr
    c.close()
    d.stop()


def test_a_mismatch_is_reported_as_qemu_reports_it(both):
    lines = []
    for d in both():
        c, _, cmd = setup(d)
        # The test image changes behind blkverify's back.
        t_uri = export(c, d, "t", "t", True)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x99 100k 4k", t_uri],
                       check=True, capture_output=True)
        uri = export(c, d, "b", "b", False)
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 64k 128k", uri],
                           capture_output=True, text=True)
        wait_for(lambda: "blkverify:" in d.stderr_path.read_text(), what="the report")
        lines.append([ln for ln in d.stderr_path.read_text().splitlines()
                      if ln.startswith("blkverify:")])
        if "ferrite" in d.binary:
            assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
            # Still serving.
            assert c.cmd("query-block-exports")["return"]
        else:
            d.proc.wait(10)
            assert d.proc.returncode == 1
    assert lines[0] == lines[1] == [
        "blkverify: read offset=65536 bytes=131072 contents mismatch at offset 102400"]
