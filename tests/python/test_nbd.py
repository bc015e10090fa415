"""The NBD server with real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) and protocol
edge cases, against qemu-storage-daemon where it has an answer."""
import json
import os
import shutil
import signal
import struct
import subprocess

import pytest

import nbdclient as nc
from conftest import Daemon, FERRITE, QSD, connect_unix, normalize, wait_for


def mkimg(path, size="64M"):
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True)
    return str(path)


def serve(start, tmp, writable=True, extra_export="", size="64M", blockdev=None):
    img = mkimg(tmp / "disk.raw", size)
    sock = str(tmp / "nbd.sock")
    bd = blockdev or [f"driver=file,node-name=f0,filename={img}", "raw,node-name=d0,file=f0"]
    args = []
    for b in bd:
        args += ["--blockdev", b]
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", f"nbd,id=e0,node-name=d0,writable={'on' if writable else 'off'}{extra_export}"]
    d = start(args)
    wait_for(lambda: os.path.exists(sock), what="NBD socket")
    return d, img, sock


def each_program(tmp_path, file_opts="", export_opts=",writable=on", size="1M", prepare=None,
                 node="d0", raw_opts=""):
    """Runs qemu-storage-daemon, then ferrite, each exporting a raw node `d0` over a fresh
    image; yields (program, socket) while the daemon runs."""
    for binary in (QSD, FERRITE):
        sub = tmp_path / os.path.basename(binary)
        sub.mkdir()
        img = mkimg(sub / "disk.raw", size)
        if prepare:
            prepare(img)
        sock = str(sub / "nbd.sock")
        d = Daemon(binary, sub / "d", ["--blockdev", f"driver=file,node-name=f0,filename={img}{file_opts}",
                                       "--blockdev", f"raw,node-name=d0,file=f0{raw_opts}",
                                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                       "--export", f"nbd,id=e0,node-name={node}{export_opts}"])
        try:
            # The monitor socket comes first on the command line; wait for the NBD one too.
            wait_for(lambda: os.path.exists(sock), what="NBD socket")
            yield binary, sock
        finally:
            d.stop()


def uri(sock, name="d0"):
    return f"nbd+unix:///{name}?socket={sock}"


def run(*cmd, check=True):
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def test_qemu_io_patterns_read_back(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path)
    run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1M 4k",
        "-c", "write -z 2M 1M", "-c", "discard 4M 1M", "-c", "write -P 0x11 70001 3",
        "-c", "flush", uri(sock))
    r = run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 64k", "-c", "read -P 0xcd 1M 4k",
            "-c", "read -P 0 2M 1M", "-c", "read -P 0x11 70001 3", uri(sock))
    assert "Pattern verification failed" not in r.stdout + r.stderr
    run("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 64k", "-c", "read -P 0x11 70001 3", img)
    # qemu-img compare over NBD against the file itself.
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri(sock), img)


def test_map_and_info_match_qsd(tmp_path):
    def prepare(img):
        run("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "write -P 1 8M 1M", img)
    seen = []
    for _, sock in each_program(tmp_path, export_opts=",description=the disk", size="64M",
                                prepare=prepare):
        m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri(sock)).stdout)
        info = run("nbdinfo", "--json", uri(sock)).stdout
        lst = run("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={sock}").stdout
        nmap = run("nbdinfo", "--map", uri(sock)).stdout
        seen.append((m, json.loads(info), json.loads(lst), nmap))
    (qm, qi, ql, qn), (fm, fi, fl, fn) = seen
    assert fm == qm
    assert fn == qn
    # Transmission flags: ferrite also advertises multi-conn on writable exports and the
    # same flags otherwise; compare the export descriptions field by field.
    for key in ("export-size", "export-name", "description", "is_read_only", "can_flush",
                "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache",
                "block_size_minimum", "block_size_preferred", "block_size_maximum", "contexts"):
        assert fi["exports"][0].get(key) == qi["exports"][0].get(key), key
    assert [e["export-name"] for e in fl["exports"]] == [e["export-name"] for e in ql["exports"]]
    assert [e.get("description") for e in fl["exports"]] == [e.get("description") for e in ql["exports"]]


def test_nbdcopy_round_trip(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path, size="32M")
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.truncate(32 << 20)
    run("nbdcopy", str(src), uri(sock))
    out = tmp_path / "out.raw"
    run("nbdcopy", uri(sock), str(out))
    assert open(src, "rb").read() == open(out, "rb").read()


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_verify(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path, size="64M")
    r = run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri(sock)}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1",
            "--verify_state_save=0", "--output-format=json", check=False)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0


def test_read_only_export_refuses_writes(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path, writable=False)
    r = run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri(sock), check=False)
    assert "Operation not permitted" in r.stdout + r.stderr or r.returncode != 0
    c = nc.Nbd(sock)
    c.structured()
    c.go("d0")
    c.request(nc.CMD_WRITE, 0, 4, payload=b"abcd")
    chunk = c.chunks()
    # EINVAL, as qemu-storage-daemon answers (test_read_only_export_refuses_like_qsd).
    assert chunk[0][0] == 32769 and struct.unpack(">I", chunk[0][1][:4])[0] == 22


class _Out(list):
    """A transcript that can echo its steps while being debugged."""
    verbose = False

    def append(self, item):
        if self.verbose:
            print(item, flush=True)
        super().append(item)


def edge_transcript(sock):
    """Protocol edge cases; the answers are compared with qemu-storage-daemon's."""
    out = _Out()
    c = nc.Nbd(sock)
    out.append(("hflags", c.hflags))
    c.option(99, b"junk")
    out.append(("unknown option", c.replies(99)))
    c.option(nc.OPT_LIST, b"x")
    out.append(("list with payload", c.replies(nc.OPT_LIST)))
    c.option(nc.OPT_STRUCTURED_REPLY, b"xy")
    out.append(("structured with payload", c.replies(nc.OPT_STRUCTURED_REPLY)))
    c.option(5, b"tls")
    out.append(("starttls with payload", c.replies(5)))
    c.option(5)
    out.append(("starttls", c.replies(5)))
    c.option(99, b"z" * (100 << 10))
    out.append(("unknown option, 100 KiB", c.replies(99)))
    out.append(("go unknown", [t for t, _ in c.go("nope")]))
    out.append(("info", [(t, d[:2]) for t, d in c.go("d0", nc.OPT_INFO, (1, 2, 3))]))
    out.append(("meta before structured",
                [t for t, _ in c.meta(nc.OPT_SET_META_CONTEXT, "d0", ["base:allocation"])]))
    out.append(("structured", [t for t, _ in c.structured()]))
    out.append(("list meta", sorted(d[4:] for t, d in c.meta(nc.OPT_LIST_META_CONTEXT, "d0", []) if t == 4)))
    out.append(("set meta", [(t, d[4:]) for t, d in c.meta(nc.OPT_SET_META_CONTEXT, "d0",
                                                          ["base:allocation", "nope:x"])]))
    out.append(("go", [t for t, _ in c.go("d0")]))
    size = c.size
    def err_of(chunks):
        t, p = chunks[-1]
        if t == "simple":
            return ("simple", p)
        if t == 32769:
            err, mlen = struct.unpack(">IH", p[:6])
            return (err, p[6:6 + mlen].decode())
        return 0
    c.request(nc.CMD_READ, size - 512, 1024)
    out.append(("read past end", err_of(c.chunks())))
    c.request(nc.CMD_WRITE, size - 2, 4, payload=b"wxyz")
    out.append(("write past end", err_of(c.chunks())))
    c.request(nc.CMD_READ, 0, 64 << 20)
    out.append(("read too big", err_of(c.chunks())))
    c.request(nc.CMD_READ, 0, 16, flags=0x80)
    out.append(("unknown flag", err_of(c.chunks())))
    c.request(nc.CMD_WRITE, 3, 5, payload=b"12345")
    out.append(("unaligned write", err_of(c.chunks())))
    c.request(nc.CMD_READ, 3, 5, flags=nc.FLAG_DF)
    out.append(("unaligned read", c.chunks()))
    c.request(nc.CMD_WRITE_ZEROES, 4096, 8192, flags=nc.FLAG_FAST_ZERO)
    out.append(("fast zero", err_of(c.chunks())))
    c.request(nc.CMD_BLOCK_STATUS, 0, 1 << 20, flags=nc.FLAG_REQ_ONE)
    out.append(("block status", c.chunks()))
    c.request(nc.CMD_TRIM, 0, 4096, flags=nc.FLAG_FUA)
    out.append(("trim", err_of(c.chunks())))
    c.request(nc.CMD_FLUSH)
    out.append(("flush", err_of(c.chunks())))
    c.request(nc.CMD_CACHE, 0, 4096)
    out.append(("cache", err_of(c.chunks())))
    c.request(99, 0, 0)
    out.append(("unknown command", err_of(c.chunks())))
    # QEMU's order of checks: buffer length, read-only, bounds, flags, then the command's own.
    for name, ty, off, ln, fl in [
            ("flush past end", nc.CMD_FLUSH, 2 * size, 0, 0),
            ("flush fua", nc.CMD_FLUSH, 0, 0, nc.FLAG_FUA),
            ("cache fua", nc.CMD_CACHE, 0, 4096, nc.FLAG_FUA),
            ("cache too big", nc.CMD_CACHE, 0, 33 << 20, 0),
            ("block status fua", nc.CMD_BLOCK_STATUS, 0, 4096, nc.FLAG_FUA),
            ("block status of nothing", nc.CMD_BLOCK_STATUS, 0, 0, 0),
            ("fast zero of nothing", nc.CMD_WRITE_ZEROES, 0, 0, nc.FLAG_FAST_ZERO),
            ("bad flag past end", nc.CMD_READ, size, 512, nc.FLAG_NO_HOLE),
            ("unknown command past end", 99, size, 512, 0),
            ("read of nothing", nc.CMD_READ, 0, 0, 0)]:
        c.request(ty, off, ln, flags=fl)
        got = c.chunks()
        out.append((name, err_of(got) if got[-1][0] in ("simple", 32769) else got))
    # A write too big for a buffer: refused, and the connection closes (its payload cannot
    # be skipped safely).
    c.request(nc.CMD_WRITE, 0, 33 << 20)
    out.append(("write too big", err_of(c.chunks())))
    try:
        c.recv(1)
        out.append(("after write too big", "answered"))
    except (EOFError, ConnectionResetError):
        out.append(("after write too big", "closed"))
    c.close()
    # EXPORT_NAME on an unknown export: the server hangs up.
    c = nc.Nbd(sock)
    c.option(nc.OPT_EXPORT_NAME, b"nope")
    try:
        c.recv(1)
        out.append(("export-name unknown", "answered"))
    except (EOFError, ConnectionResetError):
        out.append(("export-name unknown", "closed"))
    return out


def test_protocol_edge_cases_match_qsd(tmp_path):
    seen = [edge_transcript(sock) for _, sock in each_program(tmp_path)]
    for want, got in zip(*seen):
        assert got == want


def handshake_transcript(sock):
    """Handshake corners: clients without fixed newstyle, meta contexts before structured
    replies, NULs in export names."""
    out = []
    c = nc.Nbd.__new__(nc.Nbd)
    c.s = connect_unix(sock)
    c.s.settimeout(10)
    c.recv(18)
    c.s.sendall(struct.pack(">I", 2))  # no zeroes, but not fixed newstyle
    c.option(nc.OPT_LIST)
    try:
        out.append(("not fixed newstyle", [t for t, _ in c.replies(nc.OPT_LIST)]))
    except (EOFError, ConnectionResetError):
        out.append(("not fixed newstyle", "closed"))
    c = nc.Nbd(sock)
    out.append(("list meta before structured",
                [(t, d[4:]) for t, d in c.meta(nc.OPT_LIST_META_CONTEXT, "d0", [])]))
    out.append(("set meta before structured",
                [(t, d) for t, d in c.meta(nc.OPT_SET_META_CONTEXT, "d0", ["base:allocation"])]))
    name = b"d0\0"
    c.option(nc.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    out.append(("go with a NUL", c.replies(nc.OPT_GO)))
    c = nc.Nbd(sock)
    c.option(nc.OPT_EXPORT_NAME, name)
    out.append(("export-name with a NUL", struct.unpack(">QH", c.recv(10))))
    return out


def test_handshake_corners_match_qsd(tmp_path):
    seen = [handshake_transcript(sock) for _, sock in each_program(tmp_path)]
    for want, got in zip(*seen):
        assert got == want


def extended_transcript(sock):
    """Extended headers (64-bit requests and replies): the option's corners, every command
    framed the new way, block status with 64-bit extents and with a payload choosing
    contexts. The answers are compared with qemu-storage-daemon's."""
    out = _Out()

    def reply(c):
        got = c.chunks()
        return [(t, p.hex() if len(p) < 64 else len(p)) for t, p in got], list(c.offsets)

    def closed(c):
        try:
            c.recv(1)
            return "answered"
        except (EOFError, ConnectionResetError):
            return "closed"

    c = nc.Nbd(sock)
    c.option(nc.OPT_EXTENDED_HEADERS, b"x")
    out.append(("with payload", c.replies(nc.OPT_EXTENDED_HEADERS)))
    out.append(("extended", c.extended()))
    out.append(("twice", c.extended()))
    out.append(("structured after", c.structured()))
    out.append(("info", [(t, d) for t, d in c.go("d0", nc.OPT_INFO, (1, 3))]))
    out.append(("go", [(t, d) for t, d in c.go("d0")]))
    for name, ty, off, ln, fl, payload in [
            ("write announced", nc.CMD_WRITE, 0, 4096, nc.FLAG_PAYLOAD_LEN, b"a" * 4096),
            ("write plain", nc.CMD_WRITE, 8192, 4096, 0, b"b" * 4096),
            ("write fua", nc.CMD_WRITE, 1 << 20, 512, nc.FLAG_FUA, b"c" * 512),
            ("sparse read", nc.CMD_READ, 0, 16384, 0, b""),
            ("read df", nc.CMD_READ, 4096, 8192, nc.FLAG_DF, b""),
            ("read fua", nc.CMD_READ, 0, 512, nc.FLAG_FUA, b""),
            ("read of nothing", nc.CMD_READ, 0, 0, 0, b""),
            ("flush", nc.CMD_FLUSH, 0, 0, 0, b""),
            ("trim", nc.CMD_TRIM, 0, 4096, nc.FLAG_FUA, b""),
            # Over 4 GiB, as holes (discard=unmap): nothing is written.
            ("zeroes", nc.CMD_WRITE_ZEROES, 4096, (1 << 33) - 8192, 0, b""),
            ("zeroes past end", nc.CMD_WRITE_ZEROES, 4096, 1 << 40, 0, b""),
            ("block status unnegotiated", nc.CMD_BLOCK_STATUS, 0, 4096, 0, b""),
            ("read with a payload", nc.CMD_READ, 0, 8, nc.FLAG_PAYLOAD_LEN, b"12345678"),
            ("flush with a payload", nc.CMD_FLUSH, 0, 4, nc.FLAG_PAYLOAD_LEN, b"1234"),
            ("read too big", nc.CMD_READ, 0, 33 << 20, 0, b""),
            ("read past end", nc.CMD_READ, 1 << 40, 1 << 41, 0, b""),
            ("cache", nc.CMD_CACHE, 0, 1 << 20, 0, b""),
            ("unknown command", 99, 0, 0, 0, b"")]:
        c.request(ty, off, ln, flags=fl, payload=payload)
        out.append((name, reply(c)))
    c.request(nc.CMD_TRIM, 0, 33 << 20, flags=nc.FLAG_PAYLOAD_LEN)
    out.append(("trim with a huge payload", reply(c), closed(c)))
    c.close()

    c = nc.Nbd(sock)
    c.extended()
    out.append(("meta", c.meta(nc.OPT_SET_META_CONTEXT, "d0",
                               ["base:allocation", "qemu:allocation-depth"])))
    out.append(("go with contexts", [(t, d) for t, d in c.go("d0")]))
    size = c.size
    c.request(nc.CMD_WRITE, 3 << 20, 65536, payload=b"d" * 65536)
    c.chunks()
    for name, off, ln, fl, payload in [
            ("whole disk", 0, size, 0, b""),
            ("one", 0, size, nc.FLAG_REQ_ONE, b""),
            ("past end", 0, size + 1, 0, b""),
            ("depth only", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QI", size, 1)),
            ("both, reversed", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QII", 1 << 22, 1, 0)),
            ("payload past end", 1 << 20, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QI", size, 0)),
            ("payload length 0", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QI", 0, 0)),
            ("duplicate id", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QII", 4096, 0, 0)),
            ("unknown id", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QI", 4096, 77)),
            ("no ids", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">Q", 4096)),
            ("ragged", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QH", 4096, 0)),
            ("too many ids", 0, 0, nc.FLAG_PAYLOAD_LEN, struct.pack(">QIII", 4096, 0, 1, 0))]:
        c.request(nc.CMD_BLOCK_STATUS, off, ln or len(payload), flags=fl, payload=payload)
        out.append((name, reply(c)))
    c.request(nc.CMD_BLOCK_STATUS, 0, 33 << 20, flags=nc.FLAG_PAYLOAD_LEN)
    out.append(("huge payload", reply(c), closed(c)))
    c.close()

    c = nc.Nbd(sock)
    c.extended()
    c.option(nc.OPT_EXPORT_NAME, b"d0")
    out.append(("export-name after extended", closed(c)))
    return out


def test_extended_headers_match_qsd(tmp_path):
    seen = [extended_transcript(sock)
            for _, sock in each_program(tmp_path, size="8G", file_opts=",discard=unmap",
                                        raw_opts=",discard=unmap",
                                        export_opts=",writable=on,allocation-depth=on")]
    assert len(seen[0]) == len(seen[1])
    for want, got in zip(*seen):
        assert got == want


def read_only_transcript(sock):
    out = []
    for structured in (False, True):
        c = nc.Nbd(sock)
        if structured:
            c.structured()
        c.go("d0")
        for name, ty, off, ln, fl, payload in [
                ("write", nc.CMD_WRITE, 0, 512, 0, b"x" * 512),
                ("write past end", nc.CMD_WRITE, 1 << 20, 512, 0, b"x" * 512),
                ("write bad flag", nc.CMD_WRITE, 0, 512, nc.FLAG_DF, b"x" * 512),
                ("trim fua", nc.CMD_TRIM, 0, 4096, nc.FLAG_FUA, b""),
                ("zeroes", nc.CMD_WRITE_ZEROES, 0, 0, nc.FLAG_FAST_ZERO, b""),
                ("flush", nc.CMD_FLUSH, 0, 0, 0, b"")]:
            c.request(ty, off, ln, flags=fl, payload=payload)
            if structured:
                got = c.chunks()
                out.append((name, [(t, p[:4].hex() + p[6:].decode(errors="replace"))
                                   if t == 32769 else (t, p) for t, p in got]))
            else:
                out.append((name, c.simple_reply()[0]))
        c.close()
    return out


def test_read_only_export_refuses_like_qsd(tmp_path):
    seen = [read_only_transcript(sock)
            for _, sock in each_program(tmp_path, export_opts=",writable=off")]
    for want, got in zip(*seen):
        assert got == want


def test_client_vanishing_mid_write_does_not_hurt(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path)
    for _ in range(10):
        c = nc.Nbd(sock)
        c.go("d0")
        c.s.sendall(struct.pack(">IHHQQI", nc.REQUEST_MAGIC, 0, nc.CMD_WRITE, 1, 0, 65536) + b"x" * 100)
        c.close()
    run("qemu-io", "-f", "raw", "-c", "read 0 4k", uri(sock))
    assert d.proc.poll() is None


def test_flushed_and_fua_writes_survive_sigkill(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path)
    c = nc.Nbd(sock)
    c.structured()
    c.go("d0")
    c.request(nc.CMD_WRITE, 0, 4096, flags=nc.FLAG_FUA, payload=b"\x5a" * 4096)
    assert c.chunks() == [("simple", 0)]
    c.request(nc.CMD_WRITE, 8192, 4096, payload=b"\xa5" * 4096)
    c.chunks()
    c.request(nc.CMD_FLUSH)
    c.chunks()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    data = open(img, "rb").read(12288)
    assert data[:4096] == b"\x5a" * 4096
    assert data[8192:] == b"\xa5" * 4096


def test_max_connections(ferrite, tmp_path):
    img = mkimg(tmp_path / "disk.raw", "1M")
    sock = str(tmp_path / "nbd.sock")
    d = ferrite(["--blockdev", f"driver=file,node-name=d0,filename={img}",
                 "--nbd-server", f"addr.type=unix,addr.path={sock},max-connections=1",
                 "--export", "nbd,id=e0,node-name=d0"])
    first = nc.Nbd(sock)
    second_sock = connect_unix(sock)
    second_sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        second_sock.recv(1)
    first.close()
    second_sock.settimeout(10)
    assert len(second_sock.recv(18)) > 0


EXPORT_SEQ = [
    ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}),
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "unix", "path": "SOCK"}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "SOCK"}}}),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "SOCK"}}}),
    ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0", "writable": True}),
    ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "d0"}),
    ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "d0", "name": "d0"}),
    ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "ro", "writable": True}),
    ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "ro", "name": "ro"}),
    ("query-block-exports", None),
    ("x-debug-query-block-graph", None),
    ("blockdev-del", {"node-name": "d0"}),
    ("block_resize", {"node-name": "d0", "size": 1 << 21}),
    ("nbd-server-add", {"device": "f0", "name": "old"}),
    ("nbd-server-remove", {"name": "old"}),
    ("nbd-server-remove", {"name": "old"}),
    ("block-export-del", {"id": "e3"}),
    ("block-export-del", {"id": "e3"}),
    ("query-block-exports", None),
    ("nbd-server-stop", None),
    ("nbd-server-stop", None),
    ("query-block-exports", None),
]


def test_export_commands_and_events_match_qsd(both, tmp_path):
    qsd, ferrite = both()
    transcripts = []
    for d in (qsd, ferrite):
        img = mkimg(d.workdir / "disk.raw", "1M")
        sock = str(d.workdir / "nbd.sock")
        c = d.connect()
        for name, args in [("blockdev-add", {"driver": "file", "node-name": "f0", "filename": img}),
                           ("blockdev-add", {"driver": "raw", "node-name": "d0", "file": "f0"}),
                           ("blockdev-add", {"driver": "null-co", "node-name": "ro", "read-only": True})]:
            assert c.cmd(name, args) == {"return": {}}
        lines = []
        for name, args in EXPORT_SEQ:
            req = {"execute": name}
            if args is not None:
                req["arguments"] = json.loads(json.dumps(args).replace("SOCK", sock))
            c.send(json.dumps(req).encode())
            while True:
                msg = json.loads(c.recv_raw())
                msg.pop("timestamp", None)
                lines.append(json.dumps(msg, sort_keys=True))
                if "event" not in msg:
                    break
        transcripts.append(lines)
    assert transcripts[1] == transcripts[0]


def test_quit_announces_exports_first(ferrite, tmp_path):
    d, img, sock = serve(ferrite, tmp_path)
    c = d.connect()
    c.send(b'{"execute":"quit"}')
    first = json.loads(c.recv_line())
    assert first["event"] == "BLOCK_EXPORT_DELETED" and first["data"] == {"id": "e0"}
    assert json.loads(c.recv_line()) == {"return": {}}
    assert d.proc.wait(10) == 0


def io_uring_available():
    try:
        return open("/proc/sys/kernel/io_uring_disabled").read().strip() == "0"
    except OSError:
        return True


@pytest.mark.skipif(not io_uring_available(), reason="io_uring is disabled on this machine")
@pytest.mark.parametrize("opts", ["aio=io_uring", "aio=threads", "cache.direct=on",
                                  "cache.direct=on,aio=io_uring", "cache.direct=on,aio=native"])
def test_backends_give_the_same_data(ferrite, tmp_path, opts):
    d, img, sock = serve(ferrite, tmp_path, blockdev=[
        f"driver=file,node-name=f0,filename={tmp_path / 'disk.raw'},{opts}",
        "raw,node-name=d0,file=f0"])
    run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 4095 70000", "-c", "write -z 1M 64k",
        "-c", "flush", uri(sock))
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 4095 70000", "-c", "read -P 0 1M 64k",
        "-c", "read -P 0 67108352 512", uri(sock))
    run("qemu-io", "-f", "raw", "-c", "read -P 0x3c 4095 70000", img)


def test_locks_interoperate_with_qemu(ferrite, tmp_path):
    """ferrite's OFD locks are QEMU's: each side sees the other's permissions."""
    d, img, sock = serve(ferrite, tmp_path)
    r = run("qemu-img", "resize", "-f", "raw", img, "128M", check=False)
    assert r.returncode != 0
    assert 'Failed to get "resize" lock' in r.stderr
    d.stop()
    # The other way round: qemu-storage-daemon holds the image, ferrite asks for resize.
    qsock = str(tmp_path / "q.sock")
    q = Daemon(QSD, tmp_path / "q", ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                                     "--nbd-server", f"addr.type=unix,addr.path={qsock}",
                                     "--export", "nbd,id=e0,node-name=f0,writable=on"])
    try:
        f = ferrite()
        c = f.connect()
        assert c.cmd("blockdev-add", {"driver": "file", "node-name": "x", "filename": img}) == {"return": {}}
        rsp = c.cmd("block_resize", {"node-name": "x", "size": 1 << 27})
        assert rsp["error"]["desc"] == 'Failed to get "resize" lock'
    finally:
        q.stop()


def test_stalled_handshake_is_dropped(ferrite, tmp_path):
    img = mkimg(tmp_path / "disk.raw", "1M")
    sock = str(tmp_path / "nbd.sock")
    d = ferrite(["--blockdev", f"driver=file,node-name=d0,filename={img}",
                 "--nbd-server", f"addr.type=unix,addr.path={sock},handshake-max-seconds=1"])
    s = connect_unix(sock)
    s.settimeout(5)
    assert len(s.recv(18)) == 18  # the greeting; then the client says nothing
    assert s.recv(1) == b""       # and is hung up on after a second


@pytest.mark.parametrize("node", ["d0", "f0"])
def test_direct_io_advertises_qemus_block_size(tmp_path, node):
    """A raw node hides the file's O_DIRECT alignment; the file node itself shows it."""
    sizes = []
    for _, sock in each_program(tmp_path, file_opts=",cache.direct=on", export_opts="", node=node):
        info = json.loads(run("nbdinfo", "--json", uri(sock, node)).stdout)["exports"][0]
        sizes.append((info["block_size_minimum"], info["block_size_maximum"]))
    assert sizes[1] == sizes[0]



def test_discard_unmap_and_detect_zeroes_make_holes(ferrite, tmp_path):
    img = mkimg(tmp_path / "disk.raw", "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 8M", img)
    sock = str(tmp_path / "nbd.sock")
    ferrite(["--blockdev", f"driver=file,node-name=f0,filename={img},discard=unmap,detect-zeroes=unmap",
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "nbd,id=e0,node-name=f0,writable=on"])
    u = uri(sock, "f0")
    run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", "-c", "write -P 0 4M 1M", u)
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", u).stdout)
    holes = [(e["start"], e["length"]) for e in m if not e["data"]]
    assert (1 << 20, 1 << 20) in holes and (4 << 20, 1 << 20) in holes, m
    run("qemu-io", "-f", "raw", "-c", "read -P 0 1M 1M", "-c", "read -P 0x55 0 1M", u)
    # Without discard=unmap, a discard leaves the data allocated.
    img2 = mkimg(tmp_path / "disk2.raw", "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 8M", img2)
    sock2 = str(tmp_path / "nbd2.sock")
    ferrite(["--blockdev", f"driver=file,node-name=f0,filename={img2}",
             "--nbd-server", f"addr.type=unix,addr.path={sock2}",
             "--export", "nbd,id=e0,node-name=f0,writable=on"])
    run("qemu-io", "-f", "raw", "-c", "discard 1M 1M", uri(sock2, "f0"))
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri(sock2, "f0")).stdout)
    assert all(e["data"] for e in m), m


def test_tcp_listener(ferrite, tmp_path):
    import socket as so
    probe = so.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    img = mkimg(tmp_path / "disk.raw", "4M")
    d = ferrite(["--blockdev", f"driver=file,node-name=d0,filename={img}",
                 "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
                 "--export", "nbd,id=e0,node-name=d0,writable=on"])
    u = f"nbd://127.0.0.1:{port}/d0"
    wait_for(lambda: run("nbdinfo", "--size", u, check=False).returncode == 0, what="NBD over TCP")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "read -P 0x42 0 1M", u)
    assert run("nbdinfo", "--size", u).stdout.strip() == str(4 << 20)
    c = d.connect()
    # QMP can start a second server only after stopping the first.
    rsp = c.cmd("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
    assert rsp["error"]["desc"] == "NBD server already running"


def test_zero_length_requests_on_qcow2_match_qsd(tmp_path):
    """Requests of length 0 (at offset 0, where a cluster range has no last byte, and inside
    the image) are answered as qemu-storage-daemon answers them, and the daemon keeps
    serving: the write at offset 0 used to make ferrite spin on the main thread."""
    requests = [(nc.CMD_WRITE, 0), (nc.CMD_WRITE, 4096), (nc.CMD_WRITE_ZEROES, 0),
                (nc.CMD_WRITE_ZEROES, 65536), (nc.CMD_TRIM, 0), (nc.CMD_READ, 0),
                (nc.CMD_CACHE, 0), (nc.CMD_WRITE, 1 << 20)]
    seen = {}
    for binary in (QSD, FERRITE):
        sub = tmp_path / os.path.basename(binary)
        sub.mkdir()
        img = str(sub / "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"], check=True)
        sock = str(sub / "nbd.sock")
        d = Daemon(binary, sub / "d", ["--blockdev", f"driver=file,node-name=f0,filename={img}",
                                       "--blockdev", "qcow2,node-name=d0,file=f0",
                                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                                       "--export", "nbd,id=e0,node-name=d0,writable=on"])
        try:
            wait_for(lambda: os.path.exists(sock), what="NBD socket")
            c = nc.Nbd(sock)
            c.go("d0")
            answers = []
            for ty, offset in requests:
                c.request(ty, offset, 0)
                answers.append(c.simple_reply()[0])
            c.request(nc.CMD_READ, 0, 4096)
            answers.append(c.simple_reply(4096))
            c.close()
            q = d.connect()
            stats = q.cmd("query-blockstats", {"query-nodes": True})["return"]
            answers.append(sorted((s["node-name"], s["stats"]["wr_highest_offset"])
                                  for s in stats))
            # A new client is served too.
            c = nc.Nbd(sock)
            c.go("d0")
            c.request(nc.CMD_FLUSH)
            answers.append(c.simple_reply()[0])
            c.close()
            q.close()
        finally:
            rc = d.stop()
        assert rc == 0
        check = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
        seen[binary] = answers
    assert seen[FERRITE] == seen[QSD]


EXPORT_CHECKS = [
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "1bad", "node-name": "nope"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0"}),
    ("nbd-server-add", {"device": "nope"}),
    ("nbd-server-add", {"device": "n0"}),
    ("nbd-server-remove", {"name": "nope"}),
    ("nbd-server-stop", None),
    ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "SOCK"}}, "tls-authz": "a"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n0"}),
    ("block-export-add", {"type": "nbd", "id": "e", "node-name": "nope"}),
    ("nbd-server-add", {"device": "n0", "name": "n1"}),
    ("nbd-server-remove", {"name": "nope"}),
    ("nbd-server-remove", {"name": "n1"}),
    ("query-block-exports", None),
]


def test_export_command_checks_match_qsd(both):
    """Which check answers first: the export's id and node before the NBD server's state;
    an unknown export name is "not found" whether or not a server runs."""
    seen = []
    for d in both(["--blockdev", "null-co,node-name=n0"]):
        q = d.connect()
        sock = str(d.workdir / "nbd.sock")
        out = []
        for name, args in EXPORT_CHECKS:
            if args and "addr" in args:
                args = dict(args, addr={"type": "unix", "data": {"path": sock}})
            r = q.cmd(name, args)
            out.append((name, r.get("error", {}).get("desc") if "error" in r else
                        normalize(json.dumps(r["return"], sort_keys=True)).replace(sock, "S")))
        seen.append(out)
    theirs, ours = seen
    assert ours == theirs


def test_unknown_export_names_are_quoted_as_qsd_quotes_them(tmp_path):
    """The server's reply to an unknown name quotes it, cut at 80 bytes (a name may be
    4 KiB long)."""
    seen = []
    for _, sock in each_program(tmp_path):
        said = []
        for name in ("no_such_export", "a" * 4095 + "1", "b" * 79, "c" * 80):
            r = run("qemu-io", "-f", "raw", "-c", "read 0 512", uri(sock, name), check=False)
            said.append([line.replace(sock, "S") for line in r.stderr.splitlines()
                         if "server reported" in line])
        seen.append(said)
    assert seen[1] == seen[0]
    assert seen[1][1] == ["server reported: export '" + "a" * 80 + "...' not present"]


def test_export_bitmap_checks_match_qsd(both):
    """Bitmaps an export names: alone (looked up down the chain; an enabled one on a
    writable node is refused for a read-only export) or with their node (not checked so)."""
    seen = []
    for d in both():
        c = d.connect()
        sock = str(d.workdir / "nbd.sock")
        out = [c.cmd(n, a) for n, a in [
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "other"}),
            ("block-dirty-bitmap-add", {"node": "other", "name": "b3"}),
            ("block-dirty-bitmap-add", {"node": "n", "name": "b"}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                  "bitmaps": [{"node": "other", "name": "zz"}]}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                  "bitmaps": [{"node": "nonode", "name": "zz"}]}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                  "bitmaps": ["b"]}),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "n",
                                  "bitmaps": [{"node": "other", "name": "b3"}]}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "n",
                                  "bitmaps": [{"node": "other", "name": "b3"}]}),
            ("query-block-exports", None),
        ]]
        seen.append(out)
    assert seen[1] == seen[0]


def test_server_socket_outlives_the_process_but_not_nbd_server_stop(tmp_path, qsd, ferrite):
    """`nbd-server-stop` removes the unix socket's file; `quit` leaves it, as QEMU's programs
    do (iotest 205 removes it itself after shutting the VM down)."""
    seen = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        kept = str(tmp_path / f"{name}-kept.sock")
        stopped = str(tmp_path / f"{name}-stopped.sock")
        d = start(["--nbd-server", f"addr.type=unix,addr.path={kept}"])
        c = d.connect()
        assert os.path.exists(kept)
        c.cmd("nbd-server-stop")
        assert not os.path.exists(kept)
        c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": stopped}}})
        c.cmd("quit")
        assert d.proc.wait(10) == 0
        seen[name] = (os.path.exists(kept), os.path.exists(stopped))
    assert seen["ferrite"] == seen["qsd"] == (False, True)


def test_export_iothreads_match_qsd(both):
    """`iothread` of an export: the object must exist; the node moves there unless an export
    fixed in another iothread holds it, which refuses a fixed export and lets an unfixed one
    run where the node is; exports of every type follow the same rule."""
    seen = []
    for d in both():
        c = d.connect()
        sock = str(d.workdir / "nbd.sock")
        vsock = str(d.workdir / "vhost.sock")
        out = [c.cmd(n, a) for n, a in [
            ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
            ("object-add", {"qom-type": "iothread", "id": "io0"}),
            ("object-add", {"qom-type": "iothread", "id": "io1"}),
            ("object-add", {"qom-type": "main-loop", "id": "ml"}),
            ("blockdev-add", {"driver": "null-co", "node-name": "n"}),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n"}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n",
                                  "iothread": "nope"}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n",
                                  "iothread": "ml"}),
            ("block-export-add", {"type": "nbd", "id": "e0", "node-name": "n",
                                  "iothread": "io0", "fixed-iothread": True}),
            # `r` is connected to `n`: the same iothread.
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r",
                                  "iothread": "io1", "fixed-iothread": True}),
            ("block-export-add", {"type": "nbd", "id": "e1", "node-name": "r",
                                  "iothread": "io1"}),
            ("block-export-add", {"type": "vhost-user-blk", "id": "v", "node-name": "r",
                                  "addr": {"type": "unix", "path": vsock},
                                  "iothread": "io1", "fixed-iothread": True}),
            ("block-export-add", {"type": "nbd", "id": "e2", "node-name": "r", "name": "e2",
                                  "iothread": "io0", "fixed-iothread": True}),
            ("block-export-del", {"id": "e0"}),
            ("block-export-del", {"id": "e2"}),
            # Only unfixed exports are left: the node may move again.
            ("block-export-add", {"type": "nbd", "id": "e3", "node-name": "n", "name": "e3",
                                  "iothread": "io1", "fixed-iothread": True}),
            # x-blockdev-set-iothread asks the same users, `force` or not.
            ("x-blockdev-set-iothread", {"node-name": "r", "iothread": "io0", "force": True}),
            ("x-blockdev-set-iothread", {"node-name": "r", "iothread": "io1", "force": True}),
            ("block-export-del", {"id": "e3"}),
            ("x-blockdev-set-iothread", {"node-name": "r", "iothread": None, "force": True}),
            ("query-block-exports", None),
        ]]
        seen.append(out)
    assert seen[1] == seen[0]
    assert "Cannot change iothread of active block backend" in json.dumps(seen[0])
