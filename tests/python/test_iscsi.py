"""The iscsi driver against qemu-storage-daemon's (libiscsi), both logging in to tgt's
user-space target (tgtd): the same replies and errors at open (unknown targets and units,
CHAP, write-protected units, header digests), the same bytes read and written through an
NBD export, the same block status of a thin-provisioned unit, URL names in backing files;
and ferrite logging in again when the target restarts."""
import os
import re
import struct
import subprocess
import threading
import time

import pytest

import nbdclient as nc
from conftest import replies, wait_for
from iscsitarget import TGTD, Target
from test_ssh import qemu_io

ISCSI_MODULE = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"
pytestmark = [
    pytest.mark.skipif(not os.path.exists(ISCSI_MODULE),
                       reason="qemu-block-extra (qsd's iscsi module) is not installed"),
    pytest.mark.skipif(not os.path.exists(TGTD),
                       reason="tgt is not installed (scripts/setup.sh installs it)"),
]

SIZE = 8 << 20


@pytest.fixture
def tgt(tmp_path):
    t = Target(tmp_path / "tgt")
    yield t
    t.stop()


def unit(path, size=SIZE, fill=None):
    """A file for a logical unit: zeroes, or `fill(i)` at each 4 KiB block."""
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            for i in range(0, size, 4096):
                f.seek(i)
                f.write(bytes([fill(i >> 12)]) * 4096)
    return path


def iscsi(tgt, iqn, lun=1, **extra):
    return {"driver": "iscsi", "transport": "tcp", "portal": tgt.portal, "target": iqn,
            "lun": lun, **extra}


def hide(text, tgt):
    return text.replace(str(tgt.port), "PORT")


def export(d, node_args, node="s"):
    """Node `s` of `node_args`, exported over NBD as `e`."""
    c = d.connect()
    assert c.cmd("blockdev-add", {"node-name": "s", **node_args}) == {"return": {}}
    c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": f"{d.workdir}/nbd.sock"}}})
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": node,
                                      "name": "e", "writable": True}) == {"return": {}}
    return c


def nbd_uri(d):
    return f"nbd+unix:///e?socket={d.workdir}/nbd.sock"


def test_opening_matches_qsd(qsd, ferrite, tgt, tmp_path):
    """Opens good and bad, as users make them: the same replies, errors, node queries and
    standard error."""
    from test_curl import dead_port
    plain = tgt.add("plain", unit(tmp_path / "plain.img"))
    thin = tgt.add("thin", unit(tmp_path / "thin.img"), "thin_provisioning=1")
    ro = tgt.add("ro", unit(tmp_path / "ro.img", 1 << 20), "readonly=1")
    chap = tgt.add("chap", unit(tmp_path / "chap.img", 1 << 20))
    tgt.chap(chap, "alice", "secret123456")
    port = dead_port()
    add = lambda name, **a: ("blockdev-add", {"node-name": name, **a})  # noqa: E731
    seq = [
        ("object-add", {"qom-type": "secret", "id": "pw", "data": "secret123456"}),
        ("object-add", {"qom-type": "secret", "id": "bad", "data": "nope"}),
        add("a", **iscsi(tgt, plain)),
        add("b", **iscsi(tgt, thin, **{"read-only": True, "header-digest": "crc32c"})),
        add("c", **iscsi(tgt, thin, **{"header-digest": "none"})),
        add("d", **iscsi(tgt, plain, **{"initiator-name": "iqn.2026-12.org.test:me",
                                        "timeout": 30, "header-digest": "crc32c-none"})),
        add("x", **iscsi(tgt, "iqn.2026-12.org.ferrite:nothere")),
        add("x", **iscsi(tgt, plain, lun=5)),
        add("x", **iscsi(tgt, plain, portal=f"127.0.0.1:{port}")),
        add("x", **iscsi(tgt, plain, portal="nohost.invalid:3260")),
        add("x", **iscsi(tgt, plain, transport="iser")),
        add("x", **iscsi(tgt, plain, user="alice")),
        add("x", **iscsi(tgt, plain, transport="udp")),
        add("x", **iscsi(tgt, plain, **{"header-digest": "md5"})),
        add("x", **iscsi(tgt, ro)),
        add("r1", **iscsi(tgt, ro, **{"auto-read-only": True})),
        add("r2", **iscsi(tgt, ro, **{"read-only": True})),
        add("x", **iscsi(tgt, chap)),
        add("x", **iscsi(tgt, chap, user="alice", **{"password-secret": "bad"})),
        add("x", **iscsi(tgt, chap, user="alice", **{"password-secret": "nosuch"})),
        add("ch", **iscsi(tgt, chap, user="alice", **{"password-secret": "pw"})),
        ("query-named-block-nodes", {"flat": True}),
        ("block_resize", {"node-name": "a", "size": SIZE * 2}),
        ("block_resize", {"node-name": "a", "size": SIZE // 2}),
        ("blockdev-reopen", {"options": [{"node-name": "r2", **iscsi(tgt, ro)}]}),
        ("blockdev-reopen", {"options": [{"node-name": "c", **iscsi(tgt, thin, **{
            "header-digest": "none", "read-only": True})}]}),
        ("query-named-block-nodes", {"flat": True}),
        ("blockdev-del", {"node-name": "a"}),
        ("blockdev-del", {"node-name": "ch"}),
    ]
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        d = start()
        text = [hide(line, tgt).replace(str(port), "DEAD") for line in replies(d, seq)]
        d.stop()
        got[name] = (text, hide(d.stderr_path.read_text(), tgt))
    assert got["ferrite"] == got["qsd"]
    joined = "".join(got["ferrite"][0])
    assert "Target not found(515)" in joined
    assert "Authentication failure(513)" in joined
    assert "LUN is write protected" in joined
    assert "Cannot grow iSCSI devices" in joined


# Reads and writes of whole and partial blocks, zeroes with and without unmapping, a discard.
IO = ["read -P 0x01 0 4k", "write -P 0x11 0 4k", "write -P 0x22 100k 300k",
      "read -P 0x22 100k 300k", "write -P 0x33 1 3", "read -v 0 8", "write -P 0x44 4095 2",
      "read -v 4090 10", "write -z 1M 64k", "read -P 0 1M 64k", "write -z -u 2M 1M",
      "read -P 0 2M 1M", "discard 4M 1M", "write -P 0x55 7M 1M", "flush", "write -f -P 0x66 6M 4k",
      "read -P 0x66 6M 4k", "read 0 8M", "length"]


@pytest.mark.parametrize("params,digest", [
    ("", False),
    ("thin_provisioning=1", False),
    ("thin_provisioning=1", True),
], ids=["thick", "thin", "thin-digest"])
def test_reads_and_writes_match_qsd(qsd, ferrite, tgt, tmp_path, params, digest):
    """qemu-io through an NBD export of the node: the same output, the same block status
    (`qemu-img map`) and the same unit contents afterwards; also with every header
    digested (CRC32C, which tgt takes only when its target is set to)."""
    settings = {"HeaderDigest": "CRC32C,None"} if digest else {}
    opts = {"header-digest": "crc32c"} if digest else {}
    out = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        path = unit(tmp_path / f"{name}.img", fill=lambda i: (i % 7) + 1)
        iqn = tgt.add(name, path, params, **settings)
        d = start()
        export(d, iscsi(tgt, iqn, **opts))
        io = qemu_io(nbd_uri(d), *IO)
        m = subprocess.run(["qemu-img", "map", "--output=json", nbd_uri(d)],
                           capture_output=True, text=True)
        out[name] = (io, m.stdout + m.stderr)
        d.stop()
    assert "failed" not in out["ferrite"][0], out["ferrite"][0]
    assert out["ferrite"] == out["qsd"]
    assert (tmp_path / "ferrite.img").read_bytes() == (tmp_path / "qsd.img").read_bytes()


def test_a_backing_file_named_by_url(qsd, ferrite, tgt, tmp_path):
    """A qcow2 overlay whose backing file is an `iscsi://` URL: the chain opens, reads
    through, and the nodes are reported as qsd reports them."""
    iqn = tgt.add("base", unit(tmp_path / "base.img", fill=lambda i: 0x40 + i % 11))
    url = f"iscsi://{tgt.portal}/{iqn}/1"
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        top = tmp_path / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", url, "-F", "raw",
                        "-u", str(top), str(SIZE)], check=True)
        d = start()
        c = export(d, {"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}})
        io = qemu_io(nbd_uri(d), "read -P 0x40 0 4k", "write -P 0x99 4k 4k",
                     "read -P 0x42 8k 4k", "read -P 0x99 4k 4k")
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        # Automatic node names count differently (QEMU's counter runs on).
        text = re.sub(r"#block\d+", "#block", hide(str(nodes), tgt))
        got[name] = (io, text.replace(str(top), "TOP"))
        d.stop()
    assert "failed" not in got["ferrite"][0], got["ferrite"][0]
    assert got["ferrite"] == got["qsd"]


def test_many_requests_at_once(ferrite, tgt, tmp_path):
    """Thirty-two writes sent at once over one NBD connection, none in whole blocks (each
    shares its first and last block with its neighbours), then thirty-two reads at once:
    every command finds its data, and the unit ends as the writes left it."""
    path = unit(tmp_path / "u.img", fill=lambda i: i & 0xff)
    expect = bytearray(path.read_bytes())
    iqn = tgt.add("u", path)
    d = ferrite()
    export(d, iscsi(tgt, iqn))
    c = nc.Nbd(f"{d.workdir}/nbd.sock")
    c.go("e")
    length = 200001
    for rnd in range(3):
        spans = [(rnd * 1000 + 3 + i * length, bytes([(i * 7 + rnd) & 0xff]) * length)
                 for i in range(32)]
        sent = [c.request(nc.CMD_WRITE, off, length, payload=data) for off, data in spans]
        for _ in sent:
            magic, err, _cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err) == (nc.SIMPLE_MAGIC, 0)
        for off, data in spans:
            expect[off:off + length] = data
        asked = {c.request(nc.CMD_READ, off, length): off for off, _ in spans}
        for _ in asked:
            magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err) == (nc.SIMPLE_MAGIC, 0)
            off = asked[cookie]
            assert c.recv(length) == bytes(expect[off:off + length]), off
    c.close()
    d.stop()
    assert path.read_bytes() == bytes(expect)


def test_a_restarted_target_is_logged_into_again(ferrite, tgt, tmp_path):
    """tgtd killed while a client writes: the writes wait, and once the target is back
    ferrite logs in again and they complete; nothing acknowledged is lost, and the export
    serves on."""
    path = unit(tmp_path / "u.img")
    iqn = tgt.add("u", path)
    d = ferrite()
    export(d, iscsi(tgt, iqn))
    out = qemu_io(nbd_uri(d), "write -P 0x21 0 1M")
    assert "wrote" in out
    tgt.kill()
    result = {}
    writer = threading.Thread(target=lambda: result.update(
        out=qemu_io(nbd_uri(d), "write -P 0x22 1M 1M", "read -P 0x21 0 1M")))
    writer.start()
    time.sleep(2)
    assert writer.is_alive(), result
    tgt.start()
    writer.join(60)
    assert not writer.is_alive()
    assert "failed" not in result["out"] and "wrote 1048576" in result["out"], result["out"]
    data = path.read_bytes()
    assert data[:1 << 20] == b"\x21" * (1 << 20)
    assert data[1 << 20:2 << 20] == b"\x22" * (1 << 20)
    assert d.connect().cmd("query-block-exports")["return"][0]["id"] == "e"
    d.stop()


def test_ferrite_system_opens_iscsi_names(tgt, tmp_path):
    """`-drive file=iscsi://...` in ferrite-system, as in qemu-system: the same block
    device description."""
    from test_system import QEMU, SYSTEM
    iqn = tgt.add("sys", unit(tmp_path / "sys.img", fill=lambda i: 0x30))
    url = f"iscsi://{tgt.portal}/{iqn}/1"
    got = {}
    for name, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        r = subprocess.run(
            [binary, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
             "-drive", f"file={url},format=raw,if=none,id=d0"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n'
                  '{"execute":"quit"}\n', capture_output=True, text=True, timeout=60)
        lines = [line for line in r.stdout.splitlines() if '"return"' in line]
        got[name] = hide(re.sub(r"#block\d+", "#block", "\n".join(lines)), tgt)
    assert "iscsi" in got["ferrite"]
    assert got["ferrite"] == got["qemu"]
