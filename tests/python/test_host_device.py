"""`host_device`: a block device (a loop device here) as a node, against qemu-storage-daemon:
what the node queries show, the refusals of the wrong kind of file by `file` and
`host_device`, a device that does not grow, and data written and read through an NBD
export, with block status and zeroes."""
import subprocess

import pytest

import nbdclient as nc
from conftest import recorder


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(backing), "16M"], check=True)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def transcript(d, dev, regular):
    """Queries and errors of one daemon, with what a client reads back through NBD."""
    c = d.connect()
    out = []

    cmd = recorder(c, out)

    cmd("blockdev-add", {"driver": "host_device", "node-name": "r", "filename": regular})
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": dev})
    cmd("blockdev-add", {"driver": "host_device", "node-name": "h", "filename": dev,
                         "discard": "unmap"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    keep = ("drv", "file", "ro", "encrypted", "detect_zeroes", "bps", "cache", "image",
            "write_threshold")
    out.append(("node", {k: v for k, v in nodes[0].items() if k in keep}))
    cmd("block_resize", {"node-name": "h", "size": 32 << 20})
    cmd("block_resize", {"node-name": "h", "size": 16 << 20})
    cmd("blockdev-create", {"job-id": "c", "options": {"driver": "host_device",
                                                       "filename": dev, "size": 0}})
    sock = str(d.workdir / "nbd.sock")
    cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "h", "writable": True})
    n = nc.Nbd(sock)
    n.structured()
    n.meta(nc.OPT_SET_META_CONTEXT, "h", ["base:allocation"])
    n.go("h")
    out.append(("size", n.size))
    for ty, off, ln, fl, payload in [
            (nc.CMD_WRITE, 4096, 8192, 0, b"\xa5" * 8192),
            (nc.CMD_READ, 0, 16384, nc.FLAG_DF, b""),
            (nc.CMD_WRITE_ZEROES, 8192, 4096, 0, b""),
            (nc.CMD_TRIM, 1 << 20, 1 << 20, 0, b""),
            (nc.CMD_READ, 0, 16384, nc.FLAG_DF, b""),
            (nc.CMD_BLOCK_STATUS, 0, 16 << 20, 0, b""),
            (nc.CMD_FLUSH, 0, 0, 0, b"")]:
        n.request(ty, off, ln, flags=fl, payload=payload)
        out.append((ty, n.chunks()))
    n.close()
    cmd("block-export-del", {"id": "e", "mode": "hard"})
    return out


def test_host_device_matches_qsd(both, loop_device, tmp_path):
    qsd, ferrite = both()
    regular = tmp_path / "regular.raw"
    regular.write_bytes(b"\0" * 65536)
    seen = []
    for d in (qsd, ferrite):
        subprocess.run(["dd", "if=/dev/zero", f"of={loop_device}", "bs=1M", "count=16",
                        "status=none"], check=True)
        seen.append(transcript(d, loop_device, str(regular)))
        d.stop()
    assert len(seen[0]) == len(seen[1])
    for want, got in zip(*seen):
        assert got == want


def test_host_cdrom_matches_qsd(both, loop_device, tmp_path):
    """`host_cdrom`: a device only, and no image information of its own."""
    regular = tmp_path / "regular.raw"
    regular.write_bytes(b"\0" * 65536)
    seen = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "host_cdrom", "node-name": "c0",
                             "filename": str(regular)})
        cmd("blockdev-add", {"driver": "host_cdrom", "node-name": "c1", "filename": "/nonexist"})
        cmd("blockdev-add", {"driver": "host_cdrom", "node-name": "c2", "filename": loop_device,
                             "read-only": True})
        cmd("query-named-block-nodes", {"flat": True})
        cmd("blockdev-del", {"node-name": "c2"})
        c.close()
        d.stop()
        seen.append(out)
    assert seen[1] == seen[0]
