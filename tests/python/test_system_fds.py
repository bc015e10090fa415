"""File descriptors handed to ferrite-system-x86_64 by a management process, against
qemu-system-x86_64 10.0 (`-accel tcg -S`): `-add-fd`, `add-fd` with a descriptor passed by
SCM_RIGHTS, `query-fdsets`, `remove-fd`, `getfd`/`closefd`, and images opened as
`/dev/fdset/N` by `-drive` and `blockdev-add` (the access mode picks the descriptor)."""
import os
import socket
import subprocess

import pytest

from conftest import RawQmp, wait_for
from test_system import QEMU, SYSTEM, Machine, compare_with_qemu

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")


def fd_numbers_hidden(value, seen):
    """Descriptor numbers differ between programs: each becomes its order of appearance."""
    if isinstance(value, dict):
        return {k: (f"fd#{seen.setdefault(v, len(seen))}" if k == "fd" else
                    fd_numbers_hidden(v, seen)) for k, v in value.items()}
    if isinstance(value, list):
        return [fd_numbers_hidden(v, seen) for v in value]
    return value


def fdset_transcript(binary, accel, workdir):
    disk = workdir / "disk.raw"
    other = workdir / "other.raw"
    for p in (disk, other):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(p), "1M"], check=True)
    ro = os.open(disk, os.O_RDONLY)
    rw = os.open(disk, os.O_RDWR)
    sock = str(workdir / "qmp.sock")
    args = [binary, "-nodefaults", "-display", "none", "-accel", accel, "-S",
            "-chardev", f"socket,id=mon,path={sock},server=on,wait=off",
            "-mon", "chardev=mon,mode=control",
            "-add-fd", f"fd={ro},set=2,opaque=disk:r",
            "-add-fd", f"fd={rw},set=2,opaque=disk:rw",
            "-drive", "if=none,id=d0,file=/dev/fdset/2,format=raw"]
    proc = subprocess.Popen(args, cwd=workdir, stdin=subprocess.DEVNULL,
                            stderr=open(workdir / "stderr.txt", "wb"),
                            stdout=subprocess.DEVNULL, pass_fds=(ro, rw))
    os.close(ro)
    os.close(rw)
    out = []
    seen = {}
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, what="QMP socket")
        assert proc.poll() is None, (workdir / "stderr.txt").read_text()
        qmp = RawQmp(sock)
        qmp.cmd("qmp_capabilities")

        def cmd(name, args=None, passing=None):
            if passing is not None:
                with open(passing, "rb") as f:
                    socket.send_fds(qmp.s, [b" "], [f.fileno()])
            r = qmp.cmd(name, args)
            out.append((name, fd_numbers_hidden(args, seen), fd_numbers_hidden(r, seen)))
            return r

        cmd("query-fdsets")
        cmd("add-fd", {"fdset-id": 2})
        cmd("add-fd", {"fdset-id": 5, "opaque": "other"}, passing=other)
        cmd("add-fd", {}, passing=other)
        cmd("add-fd", {"fdset-id": -1}, passing=other)
        cmd("query-fdsets")
        cmd("human-monitor-command",
            {"command-line": 'qemu-io d0 "write -P 0x5a 0 64k"'})
        for name, flags in [("missing", "/dev/fdset/9"), ("garbled", "/dev/fdset/x"),
                            ("rw-only-ro", "/dev/fdset/5")]:
            cmd("blockdev-add", {"driver": "file", "node-name": name, "filename": flags})
        cmd("blockdev-add", {"driver": "file", "node-name": "ro5", "read-only": True,
                             "filename": "/dev/fdset/5"})
        r = cmd("query-fdsets")
        five = [s for s in r["return"] if s["fdset-id"] == 5][0]["fds"][0]["fd"]
        cmd("remove-fd", {"fdset-id": 5, "fd": 999})
        cmd("remove-fd", {"fdset-id": 7})
        cmd("remove-fd", {"fdset-id": 5, "fd": five})
        # The set stays while the node holds a duplicate; it goes with the node.
        cmd("query-fdsets")
        cmd("blockdev-del", {"node-name": "ro5"})
        cmd("remove-fd", {"fdset-id": 2})
        cmd("query-fdsets")
        cmd("getfd", {"fdname": "lonely"})
        cmd("getfd", {"fdname": "0digit"}, passing=other)
        cmd("getfd", {"fdname": "kept"}, passing=other)
        cmd("getfd", {"fdname": "kept"}, passing=other)
        cmd("closefd", {"fdname": "kept"})
        cmd("closefd", {"fdname": "kept"})
        qmp.cmd("quit")
        proc.wait(10)
        out.append(("exit", proc.returncode))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    data = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", str(disk)],
                          capture_output=True, text=True).stdout
    out.append(("data", "read 65536/65536" in data and "failed" not in data))
    return out


def test_descriptor_sets_and_named_descriptors_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, fdset_transcript)


@pytest.mark.parametrize("spec, error", [
    ("fd=1,set=1", "fd cannot be a standard I/O stream"),
    ("set=1", "fd option is required and must be non-negative"),
    ("fd=77,set=1", "fd is not valid or already in use"),
    ("fd=FD,set=-1", "set option is required and must be non-negative"),
])
def test_add_fd_option_errors_read_as_qemus(tmp_path, spec, error):
    f = os.open(os.devnull, os.O_RDONLY)
    try:
        spec = spec.replace("FD", str(f))
        results = []
        for binary in (QEMU, SYSTEM):
            r = subprocess.run([binary, "-nodefaults", "-display", "none", "-S",
                                "-add-fd", spec], capture_output=True, text=True,
                               timeout=30, stdin=subprocess.DEVNULL, pass_fds=(f,))
            prog = os.path.basename(binary)
            results.append((r.returncode, r.stderr.replace(prog, "PROG")))
        assert results[0] == (1, f"PROG: -add-fd {spec}: {error}\n")
        assert results[1] == results[0]
    finally:
        os.close(f)


def socket_fd_transcript(binary, accel, workdir):
    """Listening sockets handed over by `getfd` serve an NBD server and a chardev."""
    disk = workdir / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", str(disk)],
                   check=True, capture_output=True)
    m = Machine(binary, accel, workdir, ["-drive", f"if=none,id=d0,file={disk},format=raw"])
    listeners = []

    def listening(name):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(workdir / name))
        s.listen()
        listeners.append(s)
        return s

    def cmd(name, args=None, passing=None):
        if passing is not None:
            socket.send_fds(m.qmp.s, [b" "], [passing.fileno()])
        r = m.qmp.cmd(name, args)
        out.append((name, args, r))
        return r

    out = []
    try:
        nbd, chr_ = listening("nbd.sock"), listening("chr.sock")
        with open(disk, "rb") as f:
            cmd("getfd", {"fdname": "plain"}, passing=f)
        cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nosuch"}}})
        cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "plain"}}})
        cmd("getfd", {"fdname": "nbd"}, passing=nbd)
        cmd("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nbd"}}})
        # The name is used up: the server owns the socket now.
        cmd("closefd", {"fdname": "nbd"})
        cmd("nbd-server-add", {"device": "d0"})
        info = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x3c 0 64k",
                               f"nbd+unix:///d0?socket={workdir / 'nbd.sock'}"],
                              capture_output=True, text=True, timeout=30).stdout
        out.append(("nbd read", "read 65536/65536" in info))
        cmd("chardev-add", {"id": "c0", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "nosuch"}}, "server": True, "wait": False}}})
        cmd("getfd", {"fdname": "chr"}, passing=chr_)
        cmd("chardev-add", {"id": "c0", "backend": {"type": "socket", "data": {
            "addr": {"type": "fd", "data": {"str": "chr"}}, "server": True, "wait": False}}})
        # The chardev listens on the socket it was given. (What query-chardev says once a
        # client is there differs: ferrite accepts a client only for a frontend.)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(workdir / "chr.sock"))
        client.close()
        cmd("chardev-remove", {"id": "c0"})
        cmd("quit")
    finally:
        for s in listeners:
            s.close()
        m.stop()
    return out


def test_sockets_passed_by_getfd_serve_nbd_and_chardevs_as_qemus(tmp_path):
    compare_with_qemu(tmp_path, socket_fd_transcript)
