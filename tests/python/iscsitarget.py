"""tgt's user-space iSCSI target (tgtd) for the iscsi driver's tests: its own portal port and
control socket, logical units over files, a CHAP account, started in the foreground and
stopped (or killed and started again) by the test."""
import itertools
import os
import socket
import subprocess
import time

from sshserver import free_port, stop_process

TGTD = "/usr/sbin/tgtd"
_control = itertools.count(os.getpid() % 500 + 100)


class Target:
    """tgtd listening on 127.0.0.1; `add` makes a target with one LUN over a file."""

    def __init__(self, workdir):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.control = next(_control)
        self.targets = []
        self.accounts = []
        self.proc = None
        self.start()

    def adm(self, *args):
        subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
                       check=True, capture_output=True)

    def start(self):
        self.proc = subprocess.Popen(
            [TGTD, "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "tgtd.log", "ab"))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                self.adm("--op", "show", "--mode", "target")
                break
            except (OSError, subprocess.CalledProcessError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError((self.dir / "tgtd.log").read_text())
                time.sleep(0.05)
        # After a restart the targets come back as they were.
        for spec in self.targets:
            self._make(*spec)
        for user, password, tid in self.accounts:
            self._account(user, password, tid)

    def _make(self, tid, name, path, params, settings, initiator):
        self.adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", name)
        for key, value in settings.items():
            self.adm("--op", "update", "--mode", "target", "--tid", str(tid), "--name", key,
                     "--value", value)
        self.adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1",
                 "-b", str(path))
        if params:
            self.adm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun",
                     "1", "--params", params)
        allowed = ["--initiator-name", initiator] if initiator else ["-I", "ALL"]
        self.adm("--op", "bind", "--mode", "target", "--tid", str(tid), *allowed)

    def _account(self, user, password, tid):
        self.adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
        self.adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user)

    def add(self, name, path, params="", initiator=None, iqn=None, **settings):
        """A target `iqn.2026-12.org.ferrite:NAME` (or `iqn`) with LUN 1 over `path` (tgt's
        `params`, e.g. `thin_provisioning=1`, `readonly=1`; the target's `settings`, e.g.
        `HeaderDigest="CRC32C,None"`), open to every initiator or to the one named
        `initiator`; returns its IQN."""
        iqn = iqn or f"iqn.2026-12.org.ferrite:{name}"
        spec = (len(self.targets) + 1, iqn, path, params, settings, initiator)
        self.targets.append(spec)
        self._make(*spec)
        return iqn

    def chap(self, iqn, user, password):
        """Lets only `user` with `password` (CHAP) log in to `iqn`."""
        tid = next(t[0] for t in self.targets if t[1] == iqn)
        self.accounts.append((user, password, tid))
        self._account(user, password, tid)

    @property
    def portal(self):
        return f"127.0.0.1:{self.port}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        stop_process(self.proc, 5)
