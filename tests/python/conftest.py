"""Shared fixtures: start ferrite-storage-daemon or qemu-storage-daemon and talk to them.

Every daemon runs in the test's own temporary directory with a QMP monitor on a unix socket.
Differential tests run the same scenario against both programs and compare what a client sees.
"""
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FERRITE = os.environ.get(
    "FERRITE_BIN", str(ROOT / "target" / "debug" / "ferrite-storage-daemon"))
QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
SENTINEL = b'\x01{"execute": "query-version", "id": "sentinel"}\n'


# Modules with a test of a minute or more: collected first, so that when the suite runs in
# several processes (pytest-xdist, a module to a process) none of them is left running alone
# at the end.
SLOW_MODULES = ("test_soak.py", "test_qcow2_strictness.py", "test_iscsi.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in SLOW_MODULES)


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise TimeoutError(f"timed out waiting for {what}")


def connect_unix(path, timeout=10.0):
    """Connects to a unix socket, retrying while it is bound but not yet listening (a socket
    file exists between bind and listen)."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Daemon:
    """A running storage daemon with a QMP monitor on `self.sock`."""

    def __init__(self, binary, workdir, extra=(), monitor_opts=""):
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock = str(self.workdir / "qmp.sock")
        self.is_qsd = os.path.basename(binary).startswith("qemu-storage-daemon")
        self.args = [binary,
                     "--chardev", f"socket,id=qmp0,path={self.sock},server=on,wait=off",
                     "--monitor", "qmp0" + monitor_opts, *extra]
        self.stderr_path = self.workdir / "stderr.txt"
        self.stdout_path = self.workdir / "stdout.txt"
        self.proc = subprocess.Popen(self.args, cwd=self.workdir,
                                     stdin=subprocess.DEVNULL,
                                     stdout=open(self.stdout_path, "wb"),
                                     stderr=open(self.stderr_path, "wb"))
        wait_for(lambda: os.path.exists(self.sock) or self.proc.poll() is not None,
                 what="QMP socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{binary} exited: {self.stderr_path.read_text()}")

    def connect(self, negotiate=True):
        conn = self._connect_qsd_early() if self.is_qsd else RawQmp(self.sock)
        if negotiate:
            conn.send(b'{"execute":"qmp_capabilities"}')
            reply = conn.recv_msgs(1)[0]
            # qemu-storage-daemon 10.0 now and then greets a client that connected while
            # it was still starting twice (about 1 start in 150 with both cores busy):
            # the second greeting is no reply, and taking it for one puts every later
            # reply one command late (how test_ssh.py flaked in CI).
            while self.is_qsd and "QMP" in reply:
                reply = conn.recv_msgs(1)[0]
        return conn

    def _connect_qsd_early(self):
        """A connection to qemu-storage-daemon's monitor, made again if the daemon hung up
        before its greeting (it does, rarely, on a client that connected while it was
        still starting)."""
        for _ in range(3):
            try:
                return RawQmp(self.sock)
            except EOFError:
                time.sleep(0.1)
        return RawQmp(self.sock)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class RawQmp:
    """A QMP connection on a raw socket, for protocol edge cases."""

    def __init__(self, path):
        self.s = connect_unix(path)
        self.s.settimeout(10)
        self.buf = b""
        self.events = []
        self.greeting = self.recv_msgs(1)[0]

    def send(self, data):
        self.s.sendall(data)

    def recv_line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def recv_raw(self):
        """One message's bytes: a line, or a pretty-printed block from `{` to `}`."""
        line = self.recv_line()
        if line != b"{":
            return line
        lines = [line]
        while lines[-1] != b"}":
            lines.append(self.recv_line())
        return b"\r\n".join(lines)

    def recv_msgs(self, n):
        return [json.loads(self.recv_raw()) for _ in range(n)]

    def cmd(self, name, args=None, **extra):
        req = {"execute": name, **extra}
        if args is not None:
            req["arguments"] = args
        self.send(json.dumps(req).encode())
        while True:
            msg = json.loads(self.recv_raw())
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def wait_event(self, name, pred=None, timeout=30):
        """The first event `name` (or one of the names in a tuple; matching `pred`) seen
        since the last one taken."""
        names = (name,) if isinstance(name, str) else name
        self.s.settimeout(timeout)
        try:
            while True:
                for i, ev in enumerate(self.events):
                    if ev["event"] in names and (pred is None or pred(ev)):
                        del self.events[:i + 1]
                        return ev
                msg = json.loads(self.recv_raw())
                if "event" in msg:
                    self.events.append(msg)
        finally:
            self.s.settimeout(10)

    def transcript(self, data):
        """Raw reply lines to `data`, up to the sentinel's reply (which is excluded)."""
        self.send(data + SENTINEL)
        lines = []
        while True:
            line = self.recv_raw()
            if b'"sentinel"' in line:
                return lines
            lines.append(line)

    def close(self):
        self.s.close()


def normalize(text):
    """Hide what legitimately differs between the two programs."""
    if isinstance(text, bytes):
        text = text.decode("latin1")
    text = re.sub(r'"package": "[^"]*"', '"package": "P"', text)
    text = re.sub(r'"seconds": \d+, "microseconds": \d+', '"seconds": S, "microseconds": U', text)
    return text


def replies(d, seq):
    """The replies of daemon `d` to the commands `seq` ((name, arguments) pairs), each as
    normalized JSON text, for comparing two programs command by command."""
    c = d.connect()
    return [normalize(json.dumps(c.cmd(n, a), sort_keys=True)) for n, a in seq]


def chardev_transcript(d, seq):
    """Daemon `d`'s replies to `seq` for comparing chardev commands: query-chardev sorted by
    label (QEMU lists chardevs in hash-table order), the daemon's directory and
    pseudo-terminal numbers hidden."""
    c = d.connect()
    out = []
    for name, args in seq:
        rsp = c.cmd(name, args)
        if name == "query-chardev":
            rsp["return"] = sorted(rsp["return"], key=lambda x: x["label"])
        text = normalize(json.dumps(rsp, sort_keys=True)).replace(str(d.workdir), "W")
        out.append(re.sub(r"/dev/pts/\d+", "PTS", text))
    return out


def wait_for_port(port):
    """Waits until something listens on TCP `port`."""
    wait_for(lambda: subprocess.run(["ss", "-ltnH", f"sport = :{port}"],
                                    capture_output=True, text=True).stdout.strip() != "",
             what=f"a listener on port {port}")


def recorder(conn, out):
    """A `cmd(name, args)` that runs a QMP command on `conn` and appends its normalized
    reply to the transcript `out`."""
    def cmd(name, args):
        r = conn.cmd(name, args)
        out.append((name, json.loads(normalize(json.dumps(r, sort_keys=True)))))
        return r
    return cmd


def assert_same_transcript(expected, got):
    """Two daemons' transcripts agree entry by entry (the first difference is reported)."""
    for i, (e, g) in enumerate(zip(expected, got)):
        assert g == e, f"entry {i}, after {str(expected[i - 1])[:300] if i else 'none'}"
    assert len(got) == len(expected)


def content_digest(path, block=1 << 20):
    """A file's length and a digest of what it holds, read only where the file system has
    data (SEEK_DATA/SEEK_HOLE): blocks of zeroes count as holes, so a file written with
    zeroes and one left sparse or preallocated digest alike. Gigabyte images that are
    mostly holes compare in a fraction of the time reading them would take."""
    import hashlib
    digest = hashlib.sha256()
    zero = bytes(block)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(f.fileno(), data, os.SEEK_HOLE)
            at = data - data % block
            while at < hole:
                chunk = os.pread(f.fileno(), block, at)
                if chunk != zero[:len(chunk)]:
                    digest.update(at.to_bytes(8, "little") + chunk)
                at += block
            pos = at
    return size, digest.hexdigest()


def assert_same_image(a, b, fmt="raw"):
    """`qemu-img compare` finds the two images' data identical."""
    r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", fmt, str(a), str(b)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def _daemons(binary, prefix, tmp_path):
    """A starter for daemons of one program; stops them all when the test ends."""
    daemons = []

    def start(extra=(), monitor_opts=""):
        d = Daemon(binary, tmp_path / f"{prefix}{len(daemons)}", extra, monitor_opts)
        daemons.append(d)
        return d
    try:
        yield start
    finally:
        for d in daemons:
            d.stop()


@pytest.fixture
def ferrite(tmp_path):
    with _daemons(FERRITE, "ferrite", tmp_path) as start:
        yield start


@pytest.fixture
def qsd(tmp_path):
    with _daemons(QSD, "qsd", tmp_path) as start:
        yield start


def _exit_status(proc, grace=5):
    """The process's exit status, waiting up to `grace` seconds for it: a client sees the
    socket close before the kernel has finished tearing a crashed process down."""
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        return None


def qsd_reference(qsd, scenario, attempts=3):
    """`scenario(daemon)` run on a fresh qemu-storage-daemon, again if that daemon died of a
    signal (qsd 10.0.2 segfaults, in qemu_mutex_lock_impl, in about one of 40 pivots of a job
    whose node an NBD client is writing). Any other failure, and a crash on the last
    attempt, is raised as it is."""
    for attempt in range(1, attempts + 1):
        d = qsd()
        try:
            return scenario(d)
        except Exception:
            signal = -(_exit_status(d.proc) or 0)
            if signal <= 0 or attempt == attempts:
                raise
            print(f"qemu-storage-daemon died of signal {signal}; running its side again")


@pytest.fixture
def both(ferrite, qsd):
    """Starts both daemons with the same extra options: (qsd, ferrite)."""
    def start(extra=(), monitor_opts=""):
        return qsd(extra, monitor_opts), ferrite(extra, monitor_opts)
    return start


def serve_each(srv, handle):
    """Accepts on the listening socket `srv` in a thread, calling `handle(connection)` for
    each client, until `srv` is closed; returns `srv`."""
    import threading

    def loop():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            handle(conn)
    threading.Thread(target=loop, daemon=True).start()
    return srv
