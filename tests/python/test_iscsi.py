"""The iscsi driver against qemu-storage-daemon's (libiscsi), both logging in to tgt's
user-space target (tgtd): the same replies and errors at open (unknown targets and units,
CHAP, write-protected units, header digests), the same bytes read and written through an
NBD export, the same block status of a thin-provisioned unit, URL names in backing files;
and ferrite logging in again when the target restarts."""
import os
import re
import subprocess
import threading
import time

import pytest

import nbdclient as nc
from conftest import replies, serve_each, wait_for
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
    nc.overlapping_rounds(f"{d.workdir}/nbd.sock", expect)
    d.stop()
    assert path.read_bytes() == bytes(expect)


def writes_across_a_restart(d, path, kill, start):
    """Through `d`'s export `e` of the file `path` on a server: 1 MiB written, the server
    killed (`kill`), a writer started, which must wait; the server started again
    (`start`): the writes complete, nothing acknowledged is lost, the export serves on."""
    out = qemu_io(nbd_uri(d), "write -P 0x21 0 1M", "flush")
    assert "wrote" in out, out
    kill()
    result = {}
    writer = threading.Thread(target=lambda: result.update(
        out=qemu_io(nbd_uri(d), "write -P 0x22 1M 1M", "flush", "read -P 0x21 0 1M")))
    writer.start()
    time.sleep(2)
    assert writer.is_alive(), result
    start()
    writer.join(60)
    assert not writer.is_alive()
    assert "failed" not in result["out"] and "wrote 1048576" in result["out"], result["out"]
    data = path.read_bytes()
    assert data[:1 << 20] == b"\x21" * (1 << 20)
    assert data[1 << 20:2 << 20] == b"\x22" * (1 << 20)
    assert d.connect().cmd("query-block-exports")["return"][0]["id"] == "e"


def test_a_restarted_target_is_logged_into_again(ferrite, tgt, tmp_path):
    """tgtd killed while a client writes: the writes wait, and once the target is back
    ferrite logs in again and they complete; nothing acknowledged is lost, and the export
    serves on."""
    path = unit(tmp_path / "u.img")
    iqn = tgt.add("u", path)
    d = ferrite()
    export(d, iscsi(tgt, iqn))
    writes_across_a_restart(d, path, tgt.kill, tgt.start)
    d.stop()


def test_ferrite_system_opens_iscsi_names(tgt, tmp_path):
    """`-drive file=iscsi://...` in ferrite-system, as in qemu-system: the same block
    device description, and CHAP credentials in the URL taken with QEMU's warning."""
    from test_system import QEMU, SYSTEM
    iqn = tgt.add("sys", unit(tmp_path / "sys.img", fill=lambda i: 0x30))
    chap = tgt.add("syschap", unit(tmp_path / "chap.img", 1 << 20))
    tgt.chap(chap, "bob", "pass-word-1234")
    args = ["-drive", f"file=iscsi://{tgt.portal}/{iqn}/1,format=raw,if=none,id=d0",
            "-drive", f"file=iscsi://bob%pass-word-1234@{tgt.portal}/{chap}/1,format=raw,"
                      "if=none,id=d1"]
    got = {name: run_system(binary, args, tgt)
           for name, binary in (("qemu", QEMU), ("ferrite", SYSTEM))}
    assert "iscsi" in got["ferrite"][0]
    assert "'password' option is deprecated" in got["ferrite"][1]
    assert got["ferrite"] == got["qemu"]


def run_system(binary, args, tgt, commands=("query-block",)):
    """`binary` (qemu-system or ferrite-system) with `args` and a QMP monitor on stdin:
    the replies to `commands`, standard error and exit status, ports and node names made
    alike."""
    qmp = "".join(f'{{"execute":"{c}"}}\n' for c in ("qmp_capabilities", *commands, "quit"))
    r = subprocess.run([binary, "-machine", "none", "-nodefaults", "-display", "none",
                        "-qmp", "stdio", *args], input=qmp, capture_output=True, text=True,
                       timeout=60)
    lines = [line for line in r.stdout.splitlines() if '"return"' in line]
    text = re.sub(r"#block\d+", "#block", "\n".join(lines))
    stderr = r.stderr.replace(os.path.basename(binary), "PROG")
    return hide(text, tgt), hide(stderr, tgt), r.returncode


def test_ferrite_system_takes_iscsi_groups_and_the_machine_name(tgt, tmp_path):
    """qemu-system's `-iscsi` option groups (defaults for `iscsi://` names: one for a
    target by its `id`, else the first) and the initiator name it makes of `-uuid` or
    `-name`: ferrite-system logs in as qemu-system does, to targets that let only that
    initiator in, and checks the options with qemu-system's texts."""
    from test_system import QEMU, SYSTEM
    uuid = "12345678-ABCD-4321-8765-0123456789EF"
    by_name = tgt.add("byname", unit(tmp_path / "n.img"),
                      initiator="iqn.2008-11.org.linux-kvm:vm1")
    by_uuid = tgt.add("byuuid", unit(tmp_path / "u.img"),
                      initiator=f"iqn.2008-11.org.linux-kvm:{uuid.lower()}")
    custom = tgt.add("custom", unit(tmp_path / "c.img"), initiator="iqn.2026-12.org.test:me",
                     HeaderDigest="CRC32C")
    chap = tgt.add("chap", unit(tmp_path / "chap.img"), iqn="iqn.2026-12.org.ferrite.chap")
    tgt.chap(chap, "bob", "pass-word-1234")
    drive = lambda iqn, url_user="": (  # noqa: E731
        "-drive", f"file=iscsi://{url_user}{tgt.portal}/{iqn}/1,format=raw,if=none,id=d0")
    cases = [
        # The initiator is named after the machine, its UUID first.
        ["-name", "vm1", *drive(by_name)],
        ["-name", "vm1", "-uuid", uuid, *drive(by_uuid)],
        ["-name", "vm2", *drive(by_name)],
        ["-uuid", uuid, *drive(by_name)],
        # A group's initiator name and header digest (in upper case, as -iscsi takes it).
        ["-iscsi", "initiator-name=iqn.2026-12.org.test:me,header-digest=CRC32C",
         *drive(custom)],
        # CHAP credentials: from the group with the target's id, else from the first group,
        # before those in the URL.
        ["-iscsi", "user=bob,password=wrong", "-iscsi",
         f"id={chap},user=bob,password=pass-word-1234", *drive(chap)],
        ["-iscsi", "user=bob,password=pass-word-1234", *drive(chap, "eve%nope@")],
        ["-iscsi", "user=eve,password=nope", *drive(chap, "bob%pass-word-1234@")],
        ["-iscsi", "id=x", "-set", "iscsi.x.user=bob", "-set",
         "iscsi.x.password=pass-word-1234", *drive(chap)],
        # The password from a secret object, right, wrong and missing.
        *(["-object", f"secret,id=s0,data={password}", "-iscsi",
           "user=bob,password-secret=s0", *drive(chap)]
          for password in ("pass-word-1234", "wrong")),
        ["-iscsi", "user=bob,password-secret=nosuch", *drive(chap)],
        # What qemu-system refuses or warns about as it reads the options.
        ["-iscsi", "foo=1"],
        ["-iscsi", "timeout=abc"],
        ["-iscsi", f"id={by_name}"],
        ["-iscsi", "id=a", "-iscsi", "id=a"],
        ["-iscsi", "user", "-iscsi", "nopassword"],
        ["-uuid", "12345678-1234-1234-1234-12345678"],
        ["-uuid", uuid],
    ]
    for args in cases:
        got = {name: run_system(binary, args, tgt, ("query-uuid", "query-block"))
               for name, binary in (("qemu", QEMU), ("ferrite", SYSTEM))}
        assert got["ferrite"] == got["qemu"], args
    # The cases above open and fail as intended (not all alike for a common reason).
    opened = run_system(SYSTEM, ["-name", "vm1", *drive(by_name)], tgt)
    assert "iscsi" in opened[0] and opened[2] == 0
    refused = run_system(SYSTEM, ["-name", "vm2", *drive(by_name)], tgt)
    assert "Failed to log in" in refused[1] and refused[2] == 1


class GarbageTarget(threading.Thread):
    """A target that logs initiators in properly, then answers their commands with a
    mix, drawn from `seed`, of sane answers with odd values (block sizes, capacities,
    limits), random headers, impossible offsets and lengths, bad sense data, dropped
    connections and silence."""

    def __init__(self, seed):
        super().__init__(daemon=True)
        import random
        import socket
        self.rng = random.Random(seed)
        self.sane = self.rng.choice([0.5, 0.8, 0.95])
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(8)
        self.srv.settimeout(0.2)
        self.port = self.srv.getsockname()[1]
        self.stopped = False

    def run(self):
        while not self.stopped:
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            try:
                c.settimeout(5)
                self.serve(c)
            except (OSError, ValueError):
                pass
            finally:
                c.close()
        self.srv.close()

    @staticmethod
    def recv(c, n):
        out = b""
        while len(out) < n:
            chunk = c.recv(n - len(out))
            if not chunk:
                raise OSError("closed")
            out += chunk
        return out

    def pdu(self, c):
        h = self.recv(c, 48)
        n = int.from_bytes(h[5:8], "big")
        data = self.recv(c, n + (-n % 4))[:n]
        return h, data

    @staticmethod
    def header(opcode, flags=0, itt=b"\0" * 4, sn=0, data=b"", **fields):
        h = bytearray(48)
        h[0], h[1] = opcode, flags
        h[5:8] = len(data).to_bytes(3, "big")
        h[16:20] = itt
        h[24:28] = sn.to_bytes(4, "big")
        h[28:32] = (0).to_bytes(4, "big")
        h[32:36] = (0x7fffffff).to_bytes(4, "big")
        for at, value in fields.items():
            off = int(at[1:])
            h[off:off + len(value)] = value
        return bytes(h) + data + b"\0" * (-len(data) % 4)

    def serve(self, c):
        r = self.rng
        sn = 0
        while True:
            h, _ = self.pdu(c)
            csg, nsg, transit = (h[1] >> 2) & 3, h[1] & 3, h[1] & 0x80
            keys = (b"HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=8192\0"
                    b"ImmediateData=Yes\0InitialR2T=Yes\0FirstBurstLength=65536\0"
                    if csg == 1 else b"AuthMethod=None\0")
            c.sendall(self.header(0x23, h[1] & 0xcf | (0x80 if transit else 0),
                                  h[16:20], sn, keys, b24=sn.to_bytes(4, "big"),
                                  b28=h[24:28]))
            sn += 1
            if transit and nsg == 3:
                break
        while True:
            h, _ = self.pdu(c)
            if h[0] & 0x3f != 0x01:
                continue
            itt, cdb = h[16:20], h[32:48]
            want = int.from_bytes(h[20:24], "big")
            sn += 1
            if r.random() < self.sane:
                c.sendall(self.answer(cdb, itt, want, sn))
                continue
            act = r.randrange(7)
            if act == 0:
                return
            if act == 1:
                time.sleep(r.choice([0, 0.1, 1.5]))
            elif act == 2:
                c.sendall(bytes(r.randrange(256) for _ in range(48)))
            elif act == 3:
                data = bytes(r.randrange(256) for _ in range(r.randrange(64)))
                c.sendall(self.header(0x25, 0x81, itt, sn, data, b3=bytes([r.choice([0, 2])]),
                                      b40=r.randrange(1 << 32).to_bytes(4, "big")))
            elif act == 4:
                sense = bytes(r.randrange(256) for _ in range(r.randrange(40)))
                data = len(sense).to_bytes(2, "big") + sense
                c.sendall(self.header(0x21, 0x80, itt, sn, data,
                                      b3=bytes([r.choice([2, 8, 0x28, 0x18, 0x40])])))
            elif act == 5:
                c.sendall(self.header(r.choice([0x20, 0x31, 0x32, 0x3f, 0x26]), 0x80, itt, sn,
                                      bytes(r.randrange(256) for _ in range(r.randrange(60))),
                                      b20=r.randrange(1 << 32).to_bytes(4, "big"),
                                      b36=r.randrange(1 << 32).to_bytes(4, "big"),
                                      b40=r.randrange(1 << 32).to_bytes(4, "big"),
                                      b44=r.randrange(1 << 32).to_bytes(4, "big")))
            else:
                c.sendall(self.header(0x21, 0x80, itt, sn))

    def answer(self, cdb, itt, want, sn):
        """A well-formed answer whose values may be odd."""
        r = self.rng
        op = cdb[0]

        def data_in(data):
            data = data[:want] if want else data
            return self.header(0x25, 0x81, itt, sn, data)
        if op == 0x12 and cdb[1] & 1:
            page = cdb[2]
            body = {0x00: bytes([0xb0, 0xb2]), 0xb0: bytes(r.randrange(256) for _ in range(60)),
                    0xb2: bytes(r.randrange(256) for _ in range(4))}.get(page, b"")
            return data_in(bytes([0, page]) + len(body).to_bytes(2, "big") + body)
        if op == 0x12:
            return data_in(bytes([r.choice([0, 0, 5, 0x0c]), 0, 5, 2, 31]) + b"\0" * 31)
        if op == 0x1a:
            return data_in(bytes([3, 0, r.choice([0, 0x10, 0x80]), 0]))
        if op == 0x9e and cdb[1] & 0x1f == 0x10:
            lba = r.choice([0, 15, 2047, 1 << 40, (1 << 64) - 1])
            bs = r.choice([512, 512, 4096, 0, 513, 1 << 30])
            return data_in(lba.to_bytes(8, "big") + bs.to_bytes(4, "big")
                           + bytes([0, 0, r.choice([0, 0xc0]), 0]) + b"\0" * 16)
        if op == 0x9e:
            lba = int.from_bytes(cdb[2:10], "big")
            desc = r.choice([lba, lba + 1]).to_bytes(8, "big") + \
                r.randrange(1 << 32).to_bytes(4, "big") + bytes([r.randrange(4), 0, 0, 0])
            return data_in((20).to_bytes(4, "big") + b"\0" * 4 + desc)
        if op == 0x25:
            return data_in(r.randrange(1 << 32).to_bytes(4, "big") + (512).to_bytes(4, "big"))
        if op in (0x28, 0x88):
            return data_in(bytes([0x5a]) * want)
        if op in (0x2a, 0x8a, 0x41, 0x93, 0x42) and r.random() < 0.3:
            return self.header(0x31, 0x80, itt, sn, b20=b"\0\0\0\1",
                               b40=r.randrange(1 << 20).to_bytes(4, "big"),
                               b44=r.randrange(1 << 20).to_bytes(4, "big")) + \
                self.header(0x21, 0x80, itt, sn)
        return self.header(0x21, 0x80, itt, sn)


def test_a_target_answering_garbage_does_not_bring_the_daemon_down(ferrite, tmp_path):
    """Twenty-four targets answering with odd values and garbage: every open either works or
    fails with an error, requests through an export answer (data or an error), deleting
    the node ends its session, and the daemon serves on throughout."""
    d = ferrite()
    c = d.connect()
    c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": f"{d.workdir}/nbd.sock"}}})
    opened = 0
    for seed in range(24):
        t = GarbageTarget(seed)
        t.start()
        try:
            r = c.cmd("blockdev-add", {"node-name": "g", "driver": "iscsi", "transport": "tcp",
                                       "portal": f"127.0.0.1:{t.port}", "target": "iqn.x:g",
                                       "lun": 0, "timeout": 1})
            if "return" in r:
                opened += 1
                c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "g",
                                           "name": "e", "writable": True})
                subprocess.run(
                    ["qemu-io", "-f", "raw", "-c", "read 0 64k", "-c", "write -P 1 512 4k",
                     "-c", "write -z 0 1M", "-c", "discard 0 64k", "-c", "flush",
                     "-c", "read 1 3", nbd_uri(d)], capture_output=True, timeout=120)
                c.cmd("block-export-del", {"id": "e", "mode": "hard"})
                wait_for(lambda: c.cmd("query-block-exports")["return"] == [], timeout=60,
                         what="export gone")
                assert c.cmd("blockdev-del", {"node-name": "g"}) == {"return": {}}
            else:
                assert r["error"]["class"] == "GenericError", r
        finally:
            t.stopped = True
            t.join(10)
        assert d.proc.poll() is None, d.stderr_path.read_text()[-3000:]
        assert "return" in c.cmd("query-version")
    assert opened > 2, opened
    assert "panicked" not in d.stderr_path.read_text()


def hang_up_portal(after):
    """A TCP portal that reads `after` bytes of each login (0: none) and hangs up."""
    import socket as so
    srv = so.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def hang_up(c):
        if after:
            c.recv(after)
        c.close()
    return serve_each(srv, hang_up)


def test_a_portal_that_hangs_up_during_login_as_in_qsd(qsd, ferrite):
    """A portal that takes the connection and closes it, at once or once the login request
    is in: libiscsi's words for a session lost before it logged in."""
    portals = [hang_up_portal(0), hang_up_portal(48)]
    try:
        seq = [("blockdev-add", {"node-name": f"h{i}", "driver": "iscsi", "transport": "tcp",
                                 "portal": f"127.0.0.1:{p.getsockname()[1]}",
                                 "target": "iqn.x:h", "lun": 0})
               for i, p in enumerate(portals)]
        theirs, ours = replies(qsd(), seq), replies(ferrite(), seq)
        assert ours == theirs
        assert "Can not reconnect right now" in ours[0]
    finally:
        for p in portals:
            p.close()
