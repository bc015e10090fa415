"""Socket addresses as QEMU reads them (`SocketAddress`): resolving, listening and connecting
the same way for the NBD server, the `nbd` driver and socket chardevs, compared with
qemu-storage-daemon. The two programs run one after the other, so that each can have the
same ports."""
import json
import re
import socket
import subprocess

from conftest import chardev_transcript

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
