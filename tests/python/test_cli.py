"""The command line: errors, help, pid file, daemonize and signals, against qemu-storage-daemon."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import FERRITE, QSD, RawQmp, wait_for

# Option sets that make both programs exit at once; stderr and status must match.
FAILING = [
    ["--bogus"],
    ["--pidfile"],
    ["stray"],
    ["-x"],
    ["--chardev", "nope,id=c"],
    ["--chardev", "null"],
    ["--chardev", "null,id=c,bogus=1"],
    ["--chardev", "null,id=a", "--chardev", "null,id=a"],
    ["--chardev", "stdio,id=a", "--chardev", "stdio,id=b"],
    ["--chardev", "ringbuf,id=c,size=3"],
    ["--chardev", "socket,id=c"],
    ["--chardev", "socket,id=c,path=/nonexistent/x.sock"],
    ["--chardev", "socket,id=c,server=maybe,path=/tmp/x"],
    ["--chardev", "file,id=f,path=/nonexistent/x"],
    ["--monitor", "nope"],
    ["--monitor", "chardev=x,id=y", "--chardev", "null,id=x"],
    ["--chardev", "null,id=x", "--monitor", "x,mode=readline"],
    ["--chardev", "null,id=x", "--monitor", "x", "--monitor", "x"],
    ["--chardev", "null,id=x", "--monitor", "x,pretty=maybe"],
    ["--chardev", "null,id=x", "--monitor", "x,bogus=1"],
    ["--object", "iothread"],
    ["--object", "iothread,id=i,poll-max-ns=abc"],
    ["--object", "iothread,id=i,poll-max-ns=0x10,bogus=1"],
    ["--object", "iothread,id=i,poll-max-ns.a=1"],
    ["--object", "throttle-group,id=t,limits.iops-total=abc"],
    ["--object", "throttle-group,id=t,limits.iops-total=10,limits.iops-read=1"],
    ["--object", "nope,id=x"],
    ["--object", "secret,id=s"],
    ["--object", "secret,id=s,data=x,format=hex"],
    ["--object", '{"qom-type":"iothread"'],
    ["--object", '{"qom-type":"iothread","id":"x","poll-max-ns":"1"}'],
    ["--object", "[1]"],
    ["--object", "iothread,id=i", "--object", "iothread,id=i"],
    ["--object", "iothread,id=1i"],
    ["--object", "iothread,id=i,b"],
    # Socket options that do not go together, checked after the credentials are found.
    ["--chardev", "socket,id=c,path=x.sock,server=on,wait=off,reconnect=1"],
    ["--chardev", "socket,id=c,path=x.sock,reconnect=1,reconnect-ms=1000"],
    ["--chardev", "socket,id=c,path=x.sock,wait=off"],
    ["--chardev", "socket,id=c,path=x.sock,websocket=on"],
    ["--chardev", "socket,id=c,fd=3,reconnect=1"],
    ["--chardev", "socket,id=c,path=x.sock,tls-creds=nosuch"],
    ["--chardev", "socket,id=c,host=localhost,port=1,tls-authz=a"],
    ["--chardev", "socket,id=c,cid=3,port=1,tls-creds=nosuch"],
    ["--blockdev", "driver=raw,node-name=r,file.driver=null-co,offset=1,size=1000"],
    ["--pidfile", "/nonexistent/x.pid"],
    ["--nbd-server", "addr.type=fd,addr.str=nosuch"],
    ["--blockdev", "null-co,node-name=a",
     "--export", "vhost-user-blk,id=e,node-name=a,addr.type=fd,addr.str=nosuch"],
]

# Failing options over a qcow2 image `img.qcow2` (no encryption, no data file).
FAILING_ON_AN_IMAGE = [
    "encrypt.format=luks",
    "encrypt.format=aes,encrypt.key-secret=s",
    "data-file=nosuch",
    "data-file.driver=file,data-file.filename=nosuch",
    "data-file.driver=null-co",
]


def run(binary, args, **kw):
    p = subprocess.run([binary, *args], capture_output=True, timeout=10,
                       stdin=subprocess.DEVNULL, **kw)
    prog = os.path.basename(binary)
    return p.returncode, p.stderr.decode().replace(binary, "PROG").replace(prog, "PROG")


@pytest.mark.parametrize("args", FAILING, ids=[" ".join(a)[:50] for a in FAILING])
def test_startup_errors_match_qsd(args, tmp_path):
    assert run(FERRITE, args, cwd=tmp_path) == run(QSD, args, cwd=tmp_path)


@pytest.mark.parametrize("opts", FAILING_ON_AN_IMAGE)
def test_image_option_errors_match_qsd(opts, tmp_path):
    """Encryption options against the header's, and a data file for an image that has
    none, which QEMU opens (or fails to find) before it refuses."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "img.qcow2"),
                    "1M"], check=True)
    args = ["--blockdev", f"qcow2,node-name=q,file.driver=file,file.filename=img.qcow2,{opts}"]
    assert run(FERRITE, args, cwd=tmp_path) == run(QSD, args, cwd=tmp_path)


@pytest.mark.parametrize("args", [["--object", "help"], ["--object", "nope,help"],
                                  ["--object", "iothread,help"],
                                  ["--object", "throttle-group,help"],
                                  ["--object", "secret,help"]])
def test_object_help(args):
    p = subprocess.run([FERRITE, *args], capture_output=True, timeout=10)
    q = subprocess.run([QSD, *args], capture_output=True, timeout=10)
    assert p.returncode == q.returncode == 0
    ours = p.stdout.decode().splitlines()
    theirs = q.stdout.decode().splitlines()
    assert ours[0] == theirs[0]
    # QSD lists more types than ferrite implements; every line ferrite prints is QSD's too.
    assert set(ours) <= set(theirs)


def test_version_and_help():
    p = subprocess.run([FERRITE, "-V"], capture_output=True, timeout=10)
    assert p.returncode == 0
    assert p.stdout.decode().startswith("ferrite-storage-daemon version 10.0.2 (ferrite ")
    h = subprocess.run([FERRITE, "--help"], capture_output=True, timeout=10)
    assert h.returncode == 0 and b"--blockdev" in h.stdout and b"--nbd-server" in h.stdout


def test_pidfile_written_locked_and_removed(tmp_path):
    pid = tmp_path / "pid"
    sock = str(tmp_path / "q.sock")
    p = subprocess.Popen([FERRITE, "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                          "--monitor", "c", "--pidfile", str(pid)])
    try:
        wait_for(lambda: pid.exists() and pid.read_text().endswith("\n"), what="pid file")
        assert int(pid.read_text()) == p.pid
        # A second daemon cannot take the same pid file.
        second = subprocess.run([FERRITE, "--pidfile", str(pid)], capture_output=True, timeout=10)
        assert second.returncode == 1
        assert b"cannot create PID file: Cannot lock pid file: Resource temporarily unavailable" \
            in second.stderr
        # The socket exists before the pid file: clients may connect once it is there.
        c = RawQmp(sock)
        c.send(b'{"execute":"qmp_capabilities"}')
        c.recv_msgs(1)
        assert c.cmd("quit") == {"return": {}}
        assert p.wait(10) == 0
        assert not pid.exists()
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_shut_down_cleanly(ferrite, sig):
    d = ferrite()
    d.connect()
    d.proc.send_signal(sig)
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.sock)


def ready_mirror_and_export(q, workdir):
    """A mirror job in the ready state (between two null-co nodes) and a writable NBD
    export of a third node."""
    for name in ("src", "tgt", "other"):
        assert q.cmd("blockdev-add", {"driver": "null-co", "node-name": name,
                                      "size": 1 << 20}) == {"return": {}}
    assert q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {
        "path": str(workdir / "nbd.sock")}}}) == {"return": {}}
    assert q.cmd("block-export-add", {"type": "nbd", "id": "e1", "node-name": "other",
                                      "writable": True}) == {"return": {}}
    assert q.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                     "sync": "full"}) == {"return": {}}
    q.wait_event("BLOCK_JOB_READY")
    q.events.clear()


def events_until_hang_up(q):
    """(event, status or id) of every event up to the end of the connection."""
    seen = []
    while True:
        try:
            m = json.loads(q.recv_raw())
        except EOFError:
            return seen
        if "event" in m:
            seen.append((m["event"], m["data"].get("status", m["data"].get("id"))))


def test_a_signal_shuts_down_as_quit_does_like_qsd(both):
    """SIGTERM ends the exports, then cancels running jobs (they pause and resume around
    each graph change first), with the events qemu-storage-daemon sends."""
    seen = []
    for d in both():
        q = d.connect()
        ready_mirror_and_export(q, d.workdir)
        d.proc.send_signal(signal.SIGTERM)
        seen.append(events_until_hang_up(q))
        assert d.proc.wait(10) == 0
    theirs, ours = seen
    assert ours == theirs
    assert ("BLOCK_JOB_CANCELLED", None) in ours


def test_export_deletion_pauses_running_jobs_like_qsd(both):
    """Removing an export changes the graph, which drains every node: a running job
    pauses and resumes before BLOCK_EXPORT_DELETED, as in qemu-storage-daemon."""
    seen = []
    for d in both():
        q = d.connect()
        ready_mirror_and_export(q, d.workdir)
        assert q.cmd("block-export-del", {"id": "e1"}) == {"return": {}}
        before = list(q.events)
        q.wait_event("BLOCK_EXPORT_DELETED")
        seen.append([(m["event"], m["data"].get("status", m["data"].get("id")))
                     for m in before])
    theirs, ours = seen
    assert ours == theirs
    assert ours[:2] == [("JOB_STATUS_CHANGE", "standby"), ("JOB_STATUS_CHANGE", "ready")]


def test_a_stdio_monitor_sends_events_after_its_input_ends_like_qsd(tmp_path):
    """A stdio monitor whose input has ended still receives events on its output (QEMU's
    fd chardevs keep their output): here those of the shutdown a signal starts."""
    cmds = [{"execute": "qmp_capabilities"},
            {"execute": "blockdev-add", "arguments": {"driver": "null-co",
                                                      "node-name": "src", "size": 1 << 20}},
            {"execute": "blockdev-add", "arguments": {"driver": "null-co",
                                                      "node-name": "tgt", "size": 1 << 20}},
            {"execute": "blockdev-mirror", "arguments": {"job-id": "m", "device": "src",
                                                         "target": "tgt", "sync": "full"}}]
    outputs = []
    for prog in (QSD, FERRITE):
        p = subprocess.Popen([prog, "--chardev", "stdio,id=m", "--monitor", "m"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            p.stdin.write("".join(json.dumps(c) + "\n" for c in cmds).encode())
            p.stdin.close()
            lines = []
            while not any(b"BLOCK_JOB_READY" in line for line in lines):
                lines.append(p.stdout.readline())
                assert lines[-1], lines
            p.send_signal(signal.SIGTERM)
            out = p.stdout.read()
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0
        lines += out.splitlines()
        outputs.append([(m["event"], m["data"].get("status"))
                        for m in map(json.loads, lines[1:]) if "event" in m])
    theirs, ours = outputs
    assert ours == theirs
    assert ours[-3:] == [("BLOCK_JOB_CANCELLED", None), ("JOB_STATUS_CHANGE", "concluded"),
                         ("JOB_STATUS_CHANGE", "null")]


def test_quit_ends_every_job_newest_first_like_qsd(both):
    """At exit every job ends in `null`: running ones are force-cancelled newest first, and
    concluded ones left for the user to dismiss are dismissed (QEMU's
    job_cancel_sync_all)."""
    seen = []
    for d in both():
        q = d.connect()
        for name in ("a", "b", "c", "e"):
            assert q.cmd("blockdev-add", {"driver": "null-co", "node-name": name,
                                          "size": 1 << 20}) == {"return": {}}
        assert q.cmd("blockdev-mirror", {"job-id": "older", "device": "a", "target": "b",
                                         "sync": "full"}) == {"return": {}}
        q.wait_event("BLOCK_JOB_READY")
        assert q.cmd("blockdev-mirror", {"job-id": "newer", "device": "c", "target": "e",
                                         "sync": "full", "auto-dismiss": False}) \
            == {"return": {}}
        q.wait_event("BLOCK_JOB_READY")
        assert q.cmd("blockdev-create", {"job-id": "made", "options": {
            "driver": "file", "filename": str(d.workdir / "new.raw"), "size": 0}}) \
            == {"return": {}}
        q.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"] == {"status": "concluded",
                                                                  "id": "made"})
        q.events.clear()
        q.send(b'{"execute": "quit"}')
        seen.append(events_until_hang_up(q))
    theirs, ours = seen
    assert ours == theirs
    ends = [e for e in ours if e[0] == "JOB_STATUS_CHANGE" and e[1] == "null"]
    assert len(ends) == 3


def test_daemonize_reports_startup(tmp_path):
    pid = tmp_path / "pid"
    sock = tmp_path / "q.sock"
    # A failing start-up: the parent exits 1.
    bad = subprocess.run([FERRITE, "--daemonize", "--chardev", "nope,id=x"],
                         capture_output=True, timeout=10)
    assert bad.returncode == 1
    assert b"'nope' is not a valid char driver name" in bad.stderr
    # A good one: the parent exits 0 once the pid file and socket exist.
    ok = subprocess.run([FERRITE, "--daemonize", "--pidfile", str(pid),
                         "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                         "--monitor", "c"], capture_output=True, timeout=10)
    assert ok.returncode == 0, ok.stderr
    assert pid.exists() and sock.exists()
    child = int(pid.read_text())
    c = RawQmp(str(sock))
    c.send(b'{"execute":"qmp_capabilities"}')
    c.recv_msgs(1)
    c.cmd("quit")
    wait_for(lambda: not pid.exists(), what="pid file removal")
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(child, 0)
            time.sleep(0.05)


def test_wait_on_blocks_startup_until_a_client_connects(tmp_path):
    sock = str(tmp_path / "w.sock")
    pid = tmp_path / "pid"
    p = subprocess.Popen([FERRITE, "--chardev", f"socket,id=c,path={sock},server=on",
                          "--monitor", "c", "--pidfile", str(pid)], stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.exists(sock), what="socket")
        time.sleep(0.3)
        assert not pid.exists()
        c = RawQmp(sock)
        wait_for(pid.exists, what="pid file after the first client")
        c.send(b'{"execute":"qmp_capabilities"}')
        assert c.recv_msgs(1) == [{"return": {}}]
        c.cmd("quit")
        assert p.wait(10) == 0
        assert b"waiting for connection on: disconnected:unix:" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_trace_output_goes_to_stderr_only(tmp_path):
    p = subprocess.run([FERRITE, "-T", "*", "--chardev", "stdio,id=s", "--monitor", "s"],
                       input=b'{"execute":"qmp_capabilities"}{"execute":"quit"}',
                       capture_output=True, timeout=20)
    assert p.returncode == 0
    for line in p.stdout.split(b"\r\n"):
        if line:
            assert line.startswith(b"{")


@pytest.mark.parametrize("binary", [QSD, FERRITE])
def test_commands_wait_until_the_command_line_is_acted_on(binary, tmp_path):
    # Start-up held by a later chardev waiting for its client: commands sent meanwhile are
    # answered once the options after it are acted on. ferrite answered at once, from the
    # half-made state (a slow --blockdev showed only the image's file node).
    mon, held = str(tmp_path / "m.sock"), str(tmp_path / "w.sock")
    p = subprocess.Popen([binary, "--chardev", f"socket,id=m,path={mon},server=on,wait=off",
                          "--monitor", "m",
                          "--chardev", f"socket,id=w,path={held},server=on,wait=on",
                          "--blockdev", "null-co,node-name=l"], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(held), what="socket")
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(10)
        c.connect(mon)
        c.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-named-block-nodes"}\n')
        time.sleep(0.3)
        w = socket.socket(socket.AF_UNIX)
        w.connect(held)
        f = c.makefile("rb")
        greeting, caps, nodes = (json.loads(f.readline()) for _ in range(3))
        assert "QMP" in greeting and caps == {"return": {}}
        assert "l" in {n["node-name"] for n in nodes["return"]}
        w.close()
        c.close()
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("binary", [QSD, FERRITE], ids=["qsd", "ferrite"])
def test_a_reconnecting_client_monitor_waits_for_its_server(binary, tmp_path):
    """`reconnect-ms` on a client socket: no server yet is no error (QEMU connects in the
    background), and the monitor greets the server that appears later."""
    path = tmp_path / "m.sock"
    p = subprocess.Popen([binary, "--chardev", f"socket,id=c,path={path},reconnect-ms=100",
                          "--monitor", "c"], stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        assert p.poll() is None, p.stderr.read()
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            server.listen(1)
            server.settimeout(10)
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                greeting = json.loads(conn.makefile("rb").readline())
        assert "QMP" in greeting
    finally:
        p.kill()
        p.wait()
