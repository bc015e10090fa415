"""OpenSSH's sshd for the ssh driver's tests: its own host key, port and authorized key,
started in the foreground and stopped with the test; and an ssh-agent holding the client
key, as a user of QEMU's ssh driver has one."""
import os
import shutil
import socket
import subprocess
import time

SSHD = "/usr/sbin/sshd"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop_process(proc, timeout=10):
    """Ends a test server: SIGTERM, and SIGKILL if it has not exited `timeout` seconds
    later."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def keygen(path, kind="ed25519"):
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


def fingerprint(pub, hash_name):
    """The key's hash in QEMU's form (lowercase hex, no colons)."""
    import base64
    import hashlib
    blob = base64.b64decode(pub.read_text().split()[1])
    return hashlib.new(hash_name, blob).hexdigest()


class SshServer:
    """sshd on 127.0.0.1 with an ed25519 host key (and an RSA one with `rsa=True`), letting
    in the holder of the client key `client` as root, with OpenSSH's SFTP server."""

    def __init__(self, workdir, rsa=False, extra=()):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(self.dir / "host_ed25519")
        self.host_keys = [self.host_key]
        if rsa:
            self.host_keys.append(keygen(self.dir / "host_rsa", "rsa"))
        self.client = keygen(self.dir / "client")
        shutil.copy(f"{self.client}.pub", self.dir / "authorized_keys")
        self.port = free_port()
        lines = [f"Port {self.port}", "ListenAddress 127.0.0.1",
                 *[f"HostKey {k}" for k in self.host_keys],
                 f"AuthorizedKeysFile {self.dir}/authorized_keys", "StrictModes no",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                 "UsePAM no", "PidFile none", "Subsystem sftp internal-sftp",
                 "LogLevel VERBOSE", *extra]
        (self.dir / "sshd_config").write_text("\n".join(lines) + "\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.log = self.dir / "sshd.log"
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + 10
        while "Server listening" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
            time.sleep(0.02)
        self.agent_sock = str(self.dir / "agent.sock")
        self.agent = subprocess.Popen(["ssh-agent", "-D", "-a", self.agent_sock],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.agent_sock):
            if time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.02)
        subprocess.run(["ssh-add", "-q", str(self.client)], check=True,
                       env={**os.environ, "SSH_AUTH_SOCK": self.agent_sock},
                       capture_output=True)

    def server(self):
        """`server` of `BlockdevOptionsSsh`."""
        return {"host": "127.0.0.1", "port": str(self.port)}

    def known_hosts_line(self, key=None):
        """A known_hosts line for this server's host key (or `key`)."""
        key = key or self.host_key
        kind, blob = (self.dir / f"{key.name}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}"

    def stop(self):
        for p in (self.proc, self.agent):
            stop_process(p)

    def kill_sessions(self):
        """Ends every session sshd serves (its children), leaving the listener."""
        subprocess.run(["pkill", "-TERM", "-P", str(self.proc.pid)], check=False)
