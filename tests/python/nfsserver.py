"""An NFSv3 server for the nfs driver's tests: nfs-ganesha (user-space, its VFS back end)
exporting a directory, registered with rpcbind, which QEMU's driver (libnfs) and ferrite's
ask for the MOUNT and NFS ports as real clients do. Both listen on the machine's well-known
ports (rpcbind on 111, NFS on 2049), so one server serves the whole test session; tests
work in their own directories of the export. Attribute caching is off, so files changed
beside the server are seen at once."""
import os
import shutil
import socket
import subprocess
import time

from sshserver import stop_process

GANESHA = "/usr/bin/ganesha.nfsd"
RPCBIND = "/usr/sbin/rpcbind"
VFS_FSAL = "/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so"
NFS_PORT = 2049
MOUNT_PORT = 20048

CONFIG = """
NFS_CORE_PARAM {{
    Protocols = 3;
    NFS_Port = {nfs};
    MNT_Port = {mnt};
    Enable_NLM = false;
    Enable_RQUOTA = false;
}}
NFSV4 {{ Graceless = true; }}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = {export};
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3;
    Transports = TCP;
    SecType = sys;
    FSAL {{ Name = VFS; }}
    Attr_Expiration_Time = 0;
}}
MDCACHE {{ Dir_Chunk = 0; }}
LOG {{ Default_Log_Level = WARN; }}
"""


def listening(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def missing():
    """Why the server cannot run here, or None."""
    for path in (GANESHA, RPCBIND, VFS_FSAL):
        if not os.path.exists(path):
            return f"{path} is not installed (scripts/setup.sh installs nfs-ganesha and rpcbind)"
    return None


class Server:
    """rpcbind (unless one runs already) and ganesha exporting `workdir/export`."""

    def __init__(self, workdir):
        self.dir = workdir
        self.export = workdir / "export"
        self.export.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "ganesha.conf"
        self.conf.write_text(CONFIG.format(nfs=NFS_PORT, mnt=MOUNT_PORT, export=self.export))
        self.rpcbind = None
        if not listening(111):
            self.rpcbind = subprocess.Popen([RPCBIND, "-f", "-w"], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL)
            self._wait(lambda: listening(111), "rpcbind")
        if listening(NFS_PORT):
            raise RuntimeError(f"something else serves port {NFS_PORT}")
        self.proc = None
        self.start()

    def _wait(self, cond, what, timeout=30):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                log = (self.dir / "ganesha.log")
                raise RuntimeError(f"{what} did not start: "
                                   f"{log.read_text() if log.exists() else ''}")
            time.sleep(0.05)

    def registered(self):
        r = subprocess.run(["rpcinfo", "-p", "127.0.0.1"], capture_output=True, text=True)
        return " 100003 " in f" {r.stdout}" and "mountd" in r.stdout

    def start(self):
        self.proc = subprocess.Popen(
            [GANESHA, "-F", "-f", str(self.conf), "-L", str(self.dir / "ganesha.log"),
             "-p", str(self.dir / "ganesha.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: listening(NFS_PORT) and listening(MOUNT_PORT)
                   and self.registered(), "ganesha")

    def kill(self):
        """Kills the server at once (SIGKILL), leaving its registration with rpcbind."""
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        stop_process(self.proc)
        if self.rpcbind is not None:
            stop_process(self.rpcbind)

    def dir_for(self, name):
        """A fresh directory `name` in the export: its local path and its path on the
        server (the same: ganesha exports the directory under its own path)."""
        d = self.export / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        return d
