"""Chardev commands and backends, compared with qemu-storage-daemon where it has an answer."""
import base64
import json
import os
import socket
import subprocess
import time

import pytest

from conftest import FERRITE, RawQmp, chardev_transcript, connect_unix, normalize, wait_for

SEQUENCE = [
    ("chardev-add", {"id": "r0", "backend": {"type": "ringbuf", "data": {"size": 8}}}),
    ("chardev-add", {"id": "r0", "backend": {"type": "null", "data": {}}}),
    ("chardev-add", {"id": "1x", "backend": {"type": "null", "data": {}}}),
    ("chardev-add", {"id": "r1", "backend": {"type": "ringbuf", "data": {"size": 7}}}),
    ("chardev-add", {"id": "m0", "backend": {"type": "memory", "data": {}}}),
    ("ringbuf-write", {"device": "r0", "data": "hello world"}),
    ("ringbuf-read", {"device": "r0", "size": 100}),
    ("ringbuf-write", {"device": "r0", "data": "aGk=", "format": "base64"}),
    ("ringbuf-read", {"device": "r0", "size": 1, "format": "base64"}),
    ("ringbuf-read", {"device": "r0", "size": 100, "format": "utf8"}),
    ("ringbuf-write", {"device": "r0", "data": "%%", "format": "base64"}),
    # GLib's lenient decoding after QEMU's character check: short groups, inner `=` and
    # line breaks.
    ("ringbuf-write", {"device": "r0", "data": "/", "format": "base64"}),
    ("ringbuf-write", {"device": "r0", "data": "Y=Q=YWJjZ", "format": "base64"}),
    ("ringbuf-write", {"device": "r0", "data": "QU\nJD\n", "format": "base64"}),
    ("ringbuf-write", {"device": "r0", "data": "QUJD\r\n", "format": "base64"}),
    ("ringbuf-read", {"device": "r0", "size": 100, "format": "base64"}),
    ("chardev-add", {"id": "type", "backend": {"type": "null", "data": {}}}),
    ("ringbuf-write", {"device": "r0", "data": "w4k=", "format": "base64"}),
    ("ringbuf-read", {"device": "r0", "size": 1}),
    ("ringbuf-read", {"device": "r0", "size": 1}),
    ("ringbuf-write", {"device": "r0", "data": "4pyTAGFi", "format": "base64"}),
    ("ringbuf-read", {"device": "r0", "size": 8}),
    ("ringbuf-write", {"device": "1x", "data": "x"}),
    ("ringbuf-write", {"device": "nope", "data": "x"}),
    ("ringbuf-read", {"device": "r0", "size": -1}),
    ("ringbuf-read", {"device": "r0", "size": 0}),
    ("ringbuf-write", {"device": "m0", "data": "ab"}),
    ("ringbuf-read", {"device": "m0", "size": 5}),
    ("chardev-add", {"id": "f0", "backend": {"type": "file", "data": {"out": "/nonexistent/x"}}}),
    ("chardev-add", {"id": "p0", "backend": {"type": "pipe", "data": {"device": "/nonexistent/x"}}}),
    ("chardev-add", {"id": "s0", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "99"}}, "server": True}}}),
    ("chardev-remove", {"id": "qmp0"}),
    ("chardev-remove", {"id": "nope"}),
    ("chardev-remove", {"id": "1x"}),
    ("chardev-remove", {"id": "1x"}),
    ("chardev-send-break", {"id": "nope"}),
    ("chardev-send-break", {"id": "r0"}),
    ("chardev-change", {"id": "qmp0", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "nope", "backend": {"type": "null", "data": {}}}),
    ("chardev-change", {"id": "m0", "backend": {"type": "ringbuf", "data": {}}}),
    ("query-chardev", None),
]


def test_sequence_matches_qsd(both):
    qsd, ferrite = both()
    assert chardev_transcript(ferrite, SEQUENCE) == chardev_transcript(qsd, SEQUENCE)


def test_socket_filenames_match_qsd(both, tmp_path):
    qsd, ferrite = both()
    for d in (qsd, ferrite):
        sock = str(d.workdir / "extra.sock")
        c = d.connect()
        rsp = c.cmd("chardev-add", {"id": "s1", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": sock}}, "server": True, "wait": False}}})
        assert rsp == {"return": {}}
        d.files = [x for x in c.cmd("query-chardev")["return"] if x["label"] == "s1"]
        d.files[0]["filename"] = d.files[0]["filename"].replace(str(d.workdir), "W")
    assert ferrite.files == qsd.files


def test_file_chardev_logs_writes(ferrite, tmp_path):
    d = ferrite()
    c = d.connect()
    out = tmp_path / "out.txt"
    log = tmp_path / "log.txt"
    rsp = c.cmd("chardev-add", {"id": "f0", "backend": {"type": "file", "data": {
        "out": str(out), "logfile": str(log)}}})
    assert rsp == {"return": {}}
    assert out.exists() and log.exists()


def test_monitor_on_client_socket(tmp_path):
    """The harness style: the test listens, the daemon connects as a client."""
    path = str(tmp_path / "harness.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    proc = subprocess.Popen([FERRITE, "--chardev", f"socket,id=qmp-sock,path={path}",
                             "--monitor", "qmp-sock"], stderr=subprocess.PIPE)
    try:
        srv.settimeout(10)
        conn, _ = srv.accept()
        f = conn.makefile("rwb")
        greeting = json.loads(f.readline())
        assert greeting["QMP"]["capabilities"] == ["oob"]
        f.write(b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n')
        f.flush()
        assert json.loads(f.readline()) == {"return": {}}
        assert json.loads(f.readline()) == {"return": {}}
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_monitor_on_inherited_listening_fd(tmp_path):
    path = str(tmp_path / "fd.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    fd = srv.fileno()
    proc = subprocess.Popen([FERRITE, "--chardev", f"socket,id=m,fd={fd},server=on,wait=off",
                             "--monitor", "m"], pass_fds=[fd])
    srv.close()
    try:
        c = RawQmp(path)
        c.send(b'{"execute":"qmp_capabilities"}')
        assert c.recv_msgs(1) == [{"return": {}}]
        chardevs = c.cmd("query-chardev")["return"]
        assert chardevs[0]["frontend-open"] is True
        c.cmd("quit")
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tcp_monitor_and_filename(ferrite):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    d = ferrite(["--chardev", f"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off",
                 "--monitor", "t"])
    c = d.connect()
    files = {x["label"]: x["filename"] for x in c.cmd("query-chardev")["return"]}
    assert files["t"] == f"disconnected:tcp:127.0.0.1:{port},server=on"
    t = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = t.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    f.write(b'{"execute":"qmp_capabilities"}{"execute":"query-chardev"}')
    f.flush()
    assert json.loads(f.readline()) == {"return": {}}
    files = {x["label"]: x["filename"] for x in json.loads(f.readline())["return"]}
    local = t.getsockname()[1]
    assert files["t"] == f"tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:{local}"


def test_stdio_monitor(tmp_path):
    proc = subprocess.run(
        [FERRITE, "--chardev", "stdio,id=s", "--monitor", "s"],
        input=b'{"execute":"qmp_capabilities"}\n{"execute":"query-version","id":1}\n{"execute":"quit"}\n',
        capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split(b"\r\n")
    assert json.loads(lines[0])["QMP"]["version"]["qemu"] == {"major": 10, "minor": 0, "micro": 2}
    assert json.loads(lines[1]) == {"return": {}}
    assert json.loads(lines[2])["id"] == 1
    assert json.loads(lines[3]) == {"return": {}}


def test_listening_socket_is_removed_at_exit(ferrite):
    d = ferrite()
    d.connect().cmd("quit")
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.sock)


def test_second_client_waits_for_the_first(ferrite):
    """A socket chardev serves one client at a time; the next gets its greeting later."""
    d = ferrite()
    first = d.connect()
    second = connect_unix(d.sock)
    second.settimeout(0.5)
    with pytest.raises(socket.timeout):
        second.recv(100)
    first.close()
    second.settimeout(10)
    assert b'"QMP"' in second.recv(1000)
