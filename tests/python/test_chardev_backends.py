"""The chardev backends beyond sockets and files (pty, serial, parallel, udp, mux, hub) and the
`--chardev` option syntax, against qemu-storage-daemon: same replies, same errors, same bytes
on the wire."""
import json
import os
import re
import select
import socket
import subprocess
import termios
import time
import tty

from conftest import FERRITE, QSD, chardev_transcript, normalize, wait_for

PTS = re.compile(r"/dev/pts/\d+")


def null(i):
    return ("chardev-add", {"id": i, "backend": {"type": "null", "data": {}}})


def inet(host, port):
    return {"type": "inet", "data": {"host": host, "port": port}}


def test_backends_match_qsd(both, tmp_path):
    regular = tmp_path / "regular"
    regular.write_text("")
    seq = [
        ("chardev-add", {"id": "p", "backend": {"type": "pty", "data": {"path": "PTYLINK"}}}),
        ("chardev-add", {"id": "p2", "backend": {"type": "pty", "data": {"path": "PTYLINK"}}}),
        ("chardev-add", {"id": "p3", "backend": {"type": "pty", "data": {"path": "/nonexistent/x"}}}),
        ("chardev-change", {"id": "p", "backend": {"type": "pty", "data": {}}}),
        ("chardev-add", {"id": "u", "backend": {"type": "udp", "data": {
            "remote": inet("127.0.0.1", "5555"), "local": inet("", "0")}}}),
        ("chardev-add", {"id": "u2", "backend": {"type": "udp", "data": {
            "remote": {"type": "unix", "data": {"path": "/x"}}}}}),
        ("chardev-add", {"id": "u3", "backend": {"type": "udp", "data": {
            "remote": inet("127.0.0.1", "5555"), "local": inet("192.0.2.77", "0")}}}),
        ("chardev-add", {"id": "u4", "backend": {"type": "udp", "data": {
            "remote": inet("::1", "5555")}}}),
        ("chardev-add", {"id": "s1", "backend": {"type": "serial", "data": {"device": "/nonexistent"}}}),
        ("chardev-add", {"id": "s2", "backend": {"type": "serial", "data": {"device": str(regular)}}}),
        ("chardev-add", {"id": "pa", "backend": {"type": "parallel", "data": {"device": "/dev/null"}}}),
        ("chardev-add", {"id": "pb", "backend": {"type": "parallel", "data": {"device": "/nonexistent"}}}),
        ("chardev-add", {"id": "vc", "backend": {"type": "vc", "data": {"width": 1}}}),
        ("chardev-add", {"id": "ms", "backend": {"type": "msmouse", "data": {}}}),
        ("chardev-add", {"id": "sp", "backend": {"type": "spicevmc", "data": {"type": "x"}}}),
        null("n1"), null("n2"), null("n3"), null("n4"), null("n5"),
        ("chardev-add", {"id": "m", "backend": {"type": "mux", "data": {"chardev": "nope"}}}),
        ("chardev-add", {"id": "m", "backend": {"type": "mux", "data": {"chardev": "qmp0"}}}),
        ("chardev-add", {"id": "m", "backend": {"type": "mux", "data": {"chardev": "n1"}}}),
        ("chardev-add", {"id": "m2", "backend": {"type": "mux", "data": {"chardev": "n1"}}}),
        ("chardev-add", {"id": "mm", "backend": {"type": "mux", "data": {"chardev": "m"}}}),
        ("chardev-remove", {"id": "n1"}),
        ("chardev-change", {"id": "n1", "backend": {"type": "null", "data": {}}}),
        ("chardev-change", {"id": "m", "backend": {"type": "null", "data": {}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {"chardevs": []}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {
            "chardevs": ["n2", "n3", "n4", "n5", "u"]}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {
            "chardevs": ["n2", "n3", "n2"]}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {"chardevs": ["n2", "nope"]}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {"chardevs": ["n2", "m"]}}}),
        ("chardev-add", {"id": "h", "backend": {"type": "hub", "data": {"chardevs": ["n2", "n3"]}}}),
        ("chardev-add", {"id": "h2", "backend": {"type": "hub", "data": {"chardevs": ["h"]}}}),
        ("chardev-remove", {"id": "n2"}),
        ("chardev-change", {"id": "h", "backend": {"type": "null", "data": {}}}),
        ("chardev-remove", {"id": "h"}),
        ("chardev-remove", {"id": "n2"}),
        ("chardev-remove", {"id": "mm"}),
        ("chardev-remove", {"id": "m"}),
        ("chardev-remove", {"id": "n1"}),
        null("n6"),
        ("chardev-change", {"id": "n6", "backend": {"type": "file", "data": {"out": "/nonexistent/x"}}}),
        ("query-chardev", None),
        ("query-chardev-backends", None),
    ]
    results = []
    for d in both():
        link = str(d.workdir / "pty-link")
        s = [(n, json.loads(json.dumps(a).replace("PTYLINK", link)) if a else a) for n, a in seq]
        results.append(chardev_transcript(d, s))
        assert not os.path.lexists(link) or os.path.islink(link)
    qsd_out, ferrite_out = results
    backends = [json.loads(qsd_out[-1])["return"], json.loads(ferrite_out[-1])["return"]]
    assert backends[0] == backends[1]
    for (name, _), q, f in zip(seq, qsd_out, ferrite_out):
        assert f == q, name


def test_pty_link_goes_with_the_chardev(ferrite):
    d = ferrite()
    link = str(d.workdir / "link")
    c = d.connect()
    pty = c.cmd("chardev-add", {"id": "p", "backend": {"type": "pty", "data": {"path": link}}})
    assert os.readlink(link) == pty["return"]["pty"]
    assert c.cmd("chardev-remove", {"id": "p"}) == {"return": {}}
    assert not os.path.lexists(link)


def read_for(fd, seconds):
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out += data
    return out


def open_terminal(path):
    """The terminal side of a daemon's pty, raw. Set without flushing (TCSANOW): a daemon
    that greets the moment the terminal opens (ferrite watches for it) may have written
    already, and the daemon made the pty raw itself."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd, termios.TCSANOW)
    return fd


def pty_sessions(binary, workdir):
    """A monitor on a pty: what a terminal opening it twice sees, and how long the first
    greeting took."""
    link = str(workdir / "pty")
    sock = str(workdir / "qmp.sock")
    proc = subprocess.Popen([binary, "--chardev", f"pty,id=p,path={link}", "--monitor", "p",
                             "--chardev", f"socket,id=q,path={sock},server=on,wait=off",
                             "--monitor", "q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.path.lexists(link) and os.path.exists(sock), what="pty link")
        seen = []
        t0 = time.monotonic()
        fd = open_terminal(link)
        select.select([fd], [], [], 5)
        greeted_after = time.monotonic() - t0
        seen.append(read_for(fd, 0.3))
        os.write(fd, b'{"execute":"qmp_capabilities"}\n{"execute":"query-chardev"}\n')
        seen.append(read_for(fd, 0.5))
        os.close(fd)
        time.sleep(1.5)
        fd = open_terminal(link)
        select.select([fd], [], [], 5)
        seen.append(read_for(fd, 0.3))
        os.write(fd, b'{"execute":"query-chardev"}\n')
        seen.append(read_for(fd, 0.5))
        os.close(fd)
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
    text = [PTS.sub("PTS", normalize(s)).replace(str(workdir), "W") for s in seen]
    # The replies list chardevs in hash-table order under QEMU.
    text = [re.sub(r'"return": \[.*\]', lambda m: str(sorted(json.loads(
        "{" + m.group(0) + "}")["return"], key=lambda x: x["label"])), t) for t in text]
    return text, greeted_after, PTS.sub("PTS", out.decode()), err.decode()


def test_pty_monitor_matches_qsd(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    q, _, q_out, q_err = pty_sessions(QSD, tmp_path / "q")
    f, f_greeted_after, f_out, f_err = pty_sessions(FERRITE, tmp_path / "f")
    assert q[0].startswith('{"QMP"') and q[2].startswith('{"QMP"')
    assert f == q
    assert f_out == q_out == "char device redirected to PTS (label p)\n"
    assert f_err == q_err == ""
    # QEMU looks for the terminal once a second; ferrite sees it opened at once.
    assert f_greeted_after < 0.5


def test_monitor_on_a_serial_device(both, tmp_path):
    """A serial chardev on a terminal (here a pseudo-terminal's other side): the monitor
    greets on it and answers, as under qsd."""
    seen = []
    for binary in (QSD, FERRITE):
        master, slave = os.openpty()
        tty.setraw(master)
        name = os.ttyname(slave)
        proc = subprocess.Popen([binary, "--chardev", f"serial,id=s,path={name}",
                                 "--monitor", "s"], stderr=subprocess.PIPE)
        try:
            greeting = read_for(master, 1.0)
            os.write(master, b'{"execute":"qmp_capabilities"}\n{"execute":"query-chardev"}\n')
            seen.append([normalize(greeting), read_for(master, 0.5)])
        finally:
            proc.terminate()
            proc.wait(10)
            os.close(master)
            os.close(slave)
    assert seen[0][0].startswith('{"QMP"')
    assert seen[1] == seen[0]


def test_udp_monitor_answers_without_greeting(tmp_path):
    """QEMU's udp chardev never reports itself open, so no greeting; its monitor then
    crashes on the first input (qsd 10.0.2, SIGSEGV). ferrite answers as a session that has
    not negotiated yet."""
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(0.5)
    port = peer.getsockname()[1]
    local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    local.bind(("127.0.0.1", 0))
    local_port = local.getsockname()[1]
    local.close()
    proc = subprocess.Popen([FERRITE, "--chardev",
                             f"udp,id=u,host=127.0.0.1,port={port},localaddr=127.0.0.1,"
                             f"localport={local_port}", "--monitor", "u"])
    try:
        try:
            data = peer.recv(65536)
            raise AssertionError(f"greeted: {data!r}")
        except socket.timeout:
            pass
        peer.settimeout(10)
        peer.sendto(b'{"execute":"query-version"}\n', ("127.0.0.1", local_port))
        assert b"CommandNotFound" in peer.recv(65536)
        peer.sendto(b'{"execute":"qmp_capabilities"}\n{"execute":"query-chardev"}\n',
                    ("127.0.0.1", local_port))
        assert json.loads(peer.recv(65536)) == {"return": {}}
        chardevs = json.loads(peer.recv(65536))["return"]
        assert chardevs == [{"frontend-open": True, "filename": "udp", "label": "u"}]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def run_stdio(binary, args, steps):
    """Feeds `steps` (bytes, or a pause in seconds) to a daemon's standard input; returns
    its output and exit status (None: still running after the input, then stopped)."""
    proc = subprocess.Popen([binary, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for step in steps:
        if isinstance(step, bytes):
            proc.stdin.write(step)
            proc.stdin.flush()
        else:
            time.sleep(step)
    try:
        status = proc.wait(3)
    except subprocess.TimeoutExpired:
        status = None
        proc.terminate()
        proc.wait(10)
    out = proc.stdout.read().decode("latin1")
    out = re.sub(r"\[\d\d:\d\d:\d\d\.\d\d\d\] ", "[T] ", normalize(out))
    return out, status


MUX_ARGS = ["--chardev", "stdio,id=c,mux=on", "--monitor", "c"]


def test_mux_escapes_match_qsd():
    steps = [b'{"execute":"qmp_capabilities"}\n{"execute":"query-name"}\n', 0.4,
             b"\x01h", 0.3, b"\x01c\x01\x01\x01z", 0.3,
             b'{"execute":"query-version"}\n', 0.3,
             b'\x01t{"execute":"query-version"}\n', 0.3, b"\x01x", 0.5]
    q, q_status = run_stdio(QSD, MUX_ARGS, steps)
    f, f_status = run_stdio(FERRITE, MUX_ARGS, steps)
    assert "C-a h    print this help\n\r" in q and "[T] QEMU: Terminated\n" in q
    assert f == q
    # C-a x ends ferrite at once; qsd only at its main loop's next event.
    assert f_status == 0
    assert q_status in (0, None)


def test_two_monitors_on_a_mux_match_qsd():
    steps = [0.3, b'{"execute":"qmp_capabilities"}\n', 0.3, b"\x01c", 0.2,
             b'{"execute":"query-version"}\n', 0.3, b'\x01c{"execute":"query-version"}\n', 0.3,
             b'\x01c{"execute":"qmp_capabilities"}\n', 0.3]
    args = MUX_ARGS + ["--monitor", "c"]
    q, _ = run_stdio(QSD, args, steps)
    f, _ = run_stdio(FERRITE, args, steps)
    assert q.count('{"QMP"') == 2
    assert f == q


def test_mux_takes_four_frontends(tmp_path):
    """A fifth monitor on a mux is refused with QEMU's text. (Over a null chardev, qsd 10.0.2
    may trip an assertion, `!context`, and abort instead.)"""
    got = []
    for binary in (QSD, FERRITE):
        sock = tmp_path / "mux.sock"
        r = subprocess.run([binary, "--chardev", f"socket,id=c,path={sock},server=on,wait=off,"
                            "mux=on"] + ["--monitor", "c"] * 5,
                           capture_output=True, text=True, timeout=20)
        got.append((r.returncode, r.stderr.replace(os.path.basename(binary), "P")))
    assert got[0] == (1, "P: --monitor c: too many uses of multiplexed chardev 'c' (maximum is 4)\n")
    assert got[1] == got[0]


def hub_sessions(binary, workdir):
    a, b = str(workdir / "a.sock"), str(workdir / "b.sock")
    proc = subprocess.Popen([binary, "--chardev", f"socket,id=a,path={a},server=on,wait=off",
                             "--chardev", f"socket,id=b,path={b},server=on,wait=off",
                             "--chardev", "hub,id=h,chardevs.0=a,chardevs.1=b",
                             "--monitor", "h"], stderr=subprocess.PIPE)
    seen = []

    def rd(s):
        return normalize(read_for(s.fileno(), 0.4))

    def connect(path):
        wait_for(lambda: os.path.exists(path), what=path)
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        return s
    try:
        sa = connect(a)
        # The socket exists before the monitor is set up: on a busy machine qsd greeted
        # after the 0.4 s a read waits (CI saw nothing), so the first greeting is awaited.
        greeting = rd(sa)
        for _ in range(25):
            if greeting:
                break
            greeting = rd(sa)
        seen.append(("A greeting", greeting))
        sb = connect(b)
        seen.append(("B greeting", rd(sb)))
        sb.sendall(b'{"execute":"qmp_capabilities"}\n')
        seen.append(("A", rd(sa)))
        seen.append(("B", rd(sb)))
        sa.close()
        time.sleep(0.3)
        sb.sendall(b'{"execute":"query-version"}\n')
        seen.append(("B alone", rd(sb)))
        sb.close()
        time.sleep(0.3)
        sa = connect(a)
        seen.append(("A again", rd(sa)))
        sa.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return seen


def test_hub_monitor_matches_qsd(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    q = hub_sessions(QSD, tmp_path / "q")
    f = hub_sessions(FERRITE, tmp_path / "f")
    assert q[0][1].startswith('{"QMP"') and q[1][1] == ""
    assert f == q


CLI_CASES = [
    "null,id=x,path=/foo,to=0x10,size=1k", "msmouse,id=x", "vc,id=x", "tty,id=x,path=/dev/null",
    "serial,id=x", "parallel,id=x", "parallel,id=x,path=/dev/null", "udp,id=x",
    "udp,id=x,host=127.0.0.1", "udp,id=x,port=5555,localport=x",
    "udp,id=x,port=5555,localaddr=192.0.2.77", "udp,id=u,port=5555,ipv4=on,host=::1",
    "udp,id=u,port=5555,ipv4=off,ipv6=off", "mux,id=x", "mux,id=x,chardev=y", "hub,id=x",
    "hub,id=x,chardevs.0=y", "hub,id=h,chardevs.1=a", "nope,id=c,bogus=1",
    "null,id=c,wait=maybe", "socket,id=c,path=/nonexistent/s,keep-alive=on", "null,id=c,to=abc",
    "null,id=c,size=abc", "null,bogus=1", "null,id=c,chardevs.4=x", "null,id=c,debug=x",
    "nope,wait=maybe", "pty,id=c,mux=on,mux=maybe", "null,id=c,nobogus", "null,id=c,noto",
    "null,id=c,server=", "null,id=c,to=18446744073709551616", "nope", "null", "id=x", "help",
    "?", "null,id=x,help", "pty,help", "socket,id=c,path=/nonexistent/s,server,nowait",
    "socket,id=c,host=nonexistent.invalid,port=5000,server=on,wait=off",
    "socket,id=c,host=192.0.2.77,port=5000,server=on,wait=off",
    "socket,id=c,host=127.0.0.1,port=abc,server=on,wait=off", "socket,id=c,host=127.0.0.1,port=1",
    "socket,id=c,host=nonexistent.invalid,port=1", "socket,id=c,path=/nonexistent/s",
]


def test_chardev_option_errors_and_help_match_qsd():
    for text in CLI_CASES:
        got = []
        for binary in (QSD, FERRITE):
            try:
                r = subprocess.run([binary, "--chardev", text], capture_output=True, text=True,
                                   timeout=1.5)
                got.append((r.returncode, r.stdout, r.stderr.replace(os.path.basename(binary), "PROG")))
            except subprocess.TimeoutExpired as e:
                err = (e.stderr or b"").decode().replace(os.path.basename(binary), "PROG")
                got.append(("running", (e.stdout or b"").decode(), err))
        assert got[1] == got[0], text


def test_tcp_port_in_use_matches_qsd():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    text = f"socket,id=c,host=127.0.0.1,port={taken.getsockname()[1]},server=on,wait=off"
    got = []
    for binary in (QSD, FERRITE):
        r = subprocess.run([binary, "--chardev", text], capture_output=True, text=True,
                           timeout=20)
        got.append((r.returncode, r.stderr.replace(os.path.basename(binary), "P")))
    assert got[0] == (1, f"P: --chardev {text}: Failed to find an available port: "
                         "Address already in use\n")
    assert got[1] == got[0]


def test_frontend_open_without_a_client_matches_qsd(both):
    """A monitor's chardev is open for its frontend whether or not a client is connected."""
    idle = ["--chardev", "socket,id=idle,path=idle.sock,server=on,wait=off", "--monitor", "idle"]
    out = [chardev_transcript(d, [("query-chardev", None)]) for d in both(idle)]
    assert '"frontend-open": true, "label": "idle"' in out[0][0].replace(
        '"filename": "disconnected:unix:idle.sock,server=on", ', "")
    assert out[1] == out[0]


def test_query_chardev_backends_matches_qsd(both):
    q, f = (d.connect().cmd("query-chardev-backends") for d in both())
    assert f == q
