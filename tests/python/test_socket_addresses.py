"""Socket addresses as QEMU reads them (`SocketAddress`): resolving, listening and connecting
the same way for the NBD server, the `nbd` driver and socket chardevs, compared with
qemu-storage-daemon. The two programs run one after the other, so that each can have the
same ports."""
import json
import re
import socket
import subprocess

import pytest

from conftest import FERRITE, QSD, chardev_transcript

LONG = "a" * 109
JUST_FITS = "b" * 108


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serially(qsd, ferrite, seq):
    """Each program's transcript of `seq`, qsd's first, with temporary socket names and
    ephemeral ports hidden."""
    out = []
    for start in (qsd, ferrite):
        d = start()
        lines = chardev_transcript(d, seq)
        d.stop()
        out.append([re.sub(r"qemu-socket-\w{6}", "qemu-socket-X", x) for x in lines])
    return out


def inet(host, port, **extra):
    return {"type": "inet", "data": {"host": host, "port": str(port), **extra}}


def unix(path, **extra):
    return {"type": "unix", "data": {"path": path, **extra}}


def listen(cid, addr):
    return ("chardev-add", {"id": cid, "backend": {"type": "socket", "data": {
        "server": True, "wait": False, "addr": addr}}})


def dial(cid, addr):
    return ("chardev-add", {"id": cid, "backend": {"type": "socket", "data": {
        "server": False, "addr": addr}}})


def test_listening_addresses_match_qsd(qsd, ferrite):
    p = free_port()
    with socket.socket() as taken:
        # A port in use: alone it fails, as the start of a range the next one is taken.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", p))
        taken.listen()
        seq = [
            listen("busy", inet("127.0.0.1", p)),
            listen("range", inet("127.0.0.1", p, to=p + 3)),
            listen("empty-range", inet("127.0.0.1", p + 5, to=p + 4)),
            listen("name", inet("localhost", p + 6)),
            listen("numeric", inet("localhost", p + 7, numeric=True)),
            listen("numeric-ok", inet("127.0.0.1", p + 7, numeric=True)),
            listen("any", inet("", p + 8)),
            listen("any6", inet("", p + 9, ipv4=False)),
            listen("v6-of-v4", inet("127.0.0.1", p + 10, ipv4=False)),
            listen("neither", inet("127.0.0.1", p + 10, ipv4=False, ipv6=False)),
            listen("both", inet("127.0.0.1", p + 11, ipv4=True, ipv6=True)),
            listen("keep-alive", inet("127.0.0.1", p + 12, **{"keep-alive": True})),
            listen("no-port", inet("", "")),
            listen("bad-service", inet("127.0.0.1", "no-such-service")),
            listen("unresolved", inet("no-such-host.invalid", p + 13)),
            listen("temp", unix("")),
            listen("abstract", unix(f"ferrite-test-{p}", abstract=True)),
            listen("padded", unix(f"ferrite-test-{p}p", abstract=True, tight=False)),
            listen("too-long", unix(LONG)),
            listen("abstract-too-long", unix(JUST_FITS, abstract=True)),
            listen("just-fits", unix(JUST_FITS)),
            listen("no-dir", unix("/nonexistent/s")),
            ("query-chardev", None),
            ("nbd-server-start", {"addr": inet("127.0.0.1", p)}),
            ("nbd-server-start", {"addr": inet("127.0.0.1", p + 20, ipv6=True, ipv4=False)}),
            ("nbd-server-start", {"addr": inet("no-such-host.invalid", p + 20)}),
            ("nbd-server-start", {"addr": unix(LONG)}),
            ("nbd-server-start", {"addr": unix("/nonexistent/s")}),
            ("nbd-server-start", {"addr": inet("127.0.0.1", p, to=p + 1)}),
            ("nbd-server-stop", None),
            ("nbd-server-start", {"addr": unix(f"ferrite-nbd-{p}", abstract=True)}),
            ("nbd-server-stop", None),
            ("nbd-server-start", {"addr": unix("")}),
            ("nbd-server-stop", None),
        ]
        theirs, ours = serially(qsd, ferrite, seq)
    for (name, args), a, b in zip(seq, theirs, ours):
        if args and args.get("id") == "empty-range":
            # QEMU reports whatever errno held (ENOTCONN here); ferrite says what is wrong.
            prefix = "Failed to add chardev 'empty-range': Failed to create a socket: "
            assert prefix in a and prefix + "the port range" in b, (a, b)
            continue
        assert b == a, (name, json.dumps(args))


def test_connecting_addresses_match_qsd(qsd, ferrite):
    p = free_port()
    nbd = [
        inet("127.0.0.1", p),
        inet("127.0.0.1", p, ipv6=True),
        inet("", p),
        inet("localhost", "no-such-service"),
        inet("no-such-host.invalid", p),
        unix("/nonexistent/s"),
        unix(LONG),
        unix(f"ferrite-nothing-{p}", abstract=True),
    ]
    seq = [("blockdev-add", {"driver": "nbd", "node-name": f"n{i}",
                             "server": {"type": a["type"], **a["data"]}})
           for i, a in enumerate(nbd)]
    seq += [dial(f"c{i}", a) for i, a in enumerate(nbd)]
    theirs, ours = serially(qsd, ferrite, seq)
    for (name, args), a, b in zip(seq, theirs, ours):
        assert b == a, (name, json.dumps(args))
        assert '"error"' in a


def qemu_io_read(spec, pattern):
    r = subprocess.run(["qemu-io", "-r", "-c", f"read -P {pattern} 0 64k",
                        "json:" + json.dumps({"driver": "raw", "file": spec})],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "read 65536/65536" in r.stdout, r.stdout + r.stderr


def test_nbd_over_a_port_range_and_an_abstract_socket(ferrite, qsd, tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "1M", str(img)], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", str(img)],
                   check=True, capture_output=True)
    d = ferrite()
    c = d.connect()
    p = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", p))
        taken.listen()
        # The first port is taken: the server listens on the next one of the range.
        assert c.cmd("nbd-server-start", {"addr": inet("127.0.0.1", p, to=p + 5)}) == {
            "return": {}}
        assert c.cmd("blockdev-add", {"driver": "file", "node-name": "disk",
                                      "filename": str(img)}) == {"return": {}}
        assert c.cmd("nbd-server-add", {"device": "disk"}) == {"return": {}}
        qemu_io_read({"driver": "nbd", "export": "disk",
                      "server": {"type": "inet", "host": "127.0.0.1", "port": str(p + 1)}},
                     "0x5a")
    assert c.cmd("nbd-server-stop") == {"return": {}}

    # An abstract name: qemu-io reads through ferrite's server...
    name = f"ferrite-test-nbd-{p}"
    assert c.cmd("nbd-server-start", {"addr": unix(name, abstract=True)}) == {"return": {}}
    assert c.cmd("nbd-server-add", {"device": "disk"}) == {"return": {}}
    qemu_io_read({"driver": "nbd", "export": "disk",
                  "server": {"type": "unix", "path": name, "abstract": True}}, "0x5a")
    assert c.cmd("nbd-server-stop") == {"return": {}}

    # ...and ferrite's `nbd` driver reads through qsd's, padded names as well as tight.
    q = qsd().connect()
    for tight in (True, False):
        qname = f"{name}-qsd-{tight}"
        assert q.cmd("nbd-server-start", {"addr": unix(qname, abstract=True, tight=tight)}) \
            == {"return": {}}
        if tight:
            assert q.cmd("blockdev-add", {"driver": "file", "node-name": "disk",
                                          "filename": str(img)}) == {"return": {}}
        assert q.cmd("nbd-server-add", {"device": "disk"}) == {"return": {}}
        node = f"remote{int(tight)}"
        assert c.cmd("blockdev-add", {"driver": "nbd", "node-name": node, "export": "disk",
                                      "read-only": True,
                                      "server": {"type": "unix", "path": qname,
                                                 "abstract": True, "tight": tight}}) == {
            "return": {}}
        assert c.cmd("nbd-server-start", {"addr": unix(str(tmp_path / "f.sock"))}) == {
            "return": {}}
        assert c.cmd("nbd-server-add", {"device": node, "name": "via"}) == {"return": {}}
        qemu_io_read({"driver": "nbd", "export": "via",
                      "server": {"type": "unix", "path": str(tmp_path / "f.sock")}}, "0x5a")
        assert c.cmd("nbd-server-stop") == {"return": {}}
        assert c.cmd("blockdev-del", {"node-name": node}) == {"return": {}}
        assert q.cmd("nbd-server-stop") == {"return": {}}


def vsock(cid, port):
    return {"type": "vsock", "data": {"cid": str(cid), "port": str(port)}}


def vsock_port_taken(port):
    """Whether something on this machine holds vsock `port` (binding it fails; `ss` needs a
    kernel module to list vsock sockets)."""
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as s:
        try:
            s.bind((socket.VMADDR_CID_ANY, port))
        except OSError:
            return True
    return False


def test_vsock_addresses_match_qsd(qsd, ferrite):
    """`vsock` addresses (a VM's sockets to its host) for the NBD server, the `nbd` driver
    and socket chardevs: CIDs and ports parsed as QEMU parses them, this machine's CID
    listened on, the host (CID 2) connected to. Without a vsock loopback nothing here can
    connect to itself, so no data crosses: the host refuses every connection."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (OSError, AttributeError) as e:
        pytest.skip(f"this kernel has no vsock sockets ({e})")
    port = 20000 + free_port() % 20000
    seq = [("nbd-server-start", {"addr": vsock(c, p)}) for c, p in [
        (4294967295, "x"), (4294967295, -1), (4294967295, 4294967296), (4294967296, 1),
        ("0x10", 1), ("", ""), (" 2", 1), (2, 1)]]
    seq += [
        ("nbd-server-start", {"addr": vsock(4294967295, port)}),
        ("nbd-server-stop", None),
        ("nbd-server-start", {"addr": {"type": "vsock", "cid": "4294967295", "port": "1"}}),
        ("block-export-add", {"type": "vhost-user-blk", "id": "v", "node-name": "n",
                              "addr": {"type": "vsock", "cid": "1", "port": "1"}}),
        ("chardev-add", {"id": "c1", "backend": {"type": "socket", "data": {
            "addr": vsock(4294967295, port + 1), "server": True, "wait": False}}}),
        ("query-chardev", None),
        ("chardev-add", {"id": "c2", "backend": {"type": "socket", "data": {
            "addr": vsock(2, port), "server": False}}}),
        ("chardev-add", {"id": "c3", "backend": {"type": "socket", "data": {
            "addr": vsock("x", port), "server": False}}}),
        ("chardev-add", {"id": "c4", "backend": {"type": "udp", "data": {
            "remote": vsock(2, port)}}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "b1",
                          "server": {"type": "vsock", "cid": "x", "port": "1"}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "b2",
                          "server": {"type": "vsock", "cid": "2", "port": str(port)}}),
    ]
    out = serially(lambda: qsd(["--blockdev", "null-co,node-name=n"]),
                   lambda: ferrite(["--blockdev", "null-co,node-name=n"]), seq)
    assert out[1] == out[0]
    assert any("disconnected:vsock:4294967295:" in line for line in out[0])
    # The listening socket is a real one.
    d = ferrite()
    c = d.connect()
    assert c.cmd("nbd-server-start", {"addr": vsock(4294967295, port + 2)}) == {"return": {}}
    assert vsock_port_taken(port + 2)
    assert c.cmd("nbd-server-stop") == {"return": {}}
    assert not vsock_port_taken(port + 2)
    d.stop()


def test_nbd_server_on_an_inherited_descriptor_as_qsd(tmp_path):
    """`--nbd-server addr.type=fd,addr.str=N` serves on listening socket N the daemon
    inherited (ferrite used to refuse it); a client reads the export through it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "d.raw"), "1M"],
                   check=True)
    for i, binary in enumerate((QSD, FERRITE)):
        path = tmp_path / f"nbd{i}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        fd = listener.fileno()
        proc = subprocess.Popen(
            [binary, "--blockdev", f"driver=file,node-name=f0,filename={tmp_path / 'd.raw'}",
             "--nbd-server", f"addr.type=fd,addr.str={fd}", "--export", "nbd,id=e0,node-name=f0"],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        listener.close()
        try:
            # The socket listens before the daemon starts: a client may connect at once.
            info = subprocess.run(["qemu-img", "info", "--output=json",
                                   f"nbd+unix:///f0?socket={path}"],
                                  capture_output=True, text=True, timeout=30)
            assert info.returncode == 0, (binary, info.stderr)
            assert json.loads(info.stdout)["virtual-size"] == 1 << 20
        finally:
            proc.kill()
            proc.wait()
