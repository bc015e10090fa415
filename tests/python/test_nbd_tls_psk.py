"""NBD and QMP over TLS with pre-shared keys (`tls-creds-psk`), against qemu-storage-daemon.
ferrite speaks TLS 1.3 with an external PSK itself (rustls has none); every peer here is
GnuTLS's: QEMU's own programs, libnbd's nbdinfo, gnutls-cli, and qemu-nbd as a server."""
import json
import shutil
import socket
import subprocess
import time

import pytest

from blockjobs import add, qcow2, run
from conftest import assert_same_transcript, recorder, wait_for
from test_nbd_tls import dropped

pytestmark = pytest.mark.skipif(shutil.which("psktool") is None,
                                reason="psktool (gnutls-bin) makes the key files")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key directories: `good` (alice, bob), `wrong` (the same names, other keys), `carol`
    (a user no server knows), `empty` (no key file)."""
    base = tmp_path_factory.mktemp("psk")
    dirs = {name: base / name for name in ("good", "wrong", "carol", "empty")}
    for d in dirs.values():
        d.mkdir()
    for d, users in ((dirs["good"], ["alice", "bob"]), (dirs["wrong"], ["alice", "bob"]),
                     (dirs["carol"], ["carol"])):
        for u in users:
            subprocess.run(["psktool", "-u", u, "-p", str(d / "keys.psk")], check=True,
                           capture_output=True)
    return dirs


def psk(endpoint, d, id="tls0", **extra):
    return {"qom-type": "tls-creds-psk", "id": id, "dir": str(d), "endpoint": endpoint,
            **extra}


def objects_transcript(d, keys):
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("object-add", psk("server", keys["good"], "srv"))
    cmd("object-add", psk("server", keys["good"], "u", username="alice"))
    cmd("object-add", psk("server", keys["empty"], "e"))
    cmd("object-add", psk("client", keys["good"], "dflt"))
    cmd("object-add", psk("client", keys["good"], "cli", username="alice"))
    cmd("object-add", psk("client", keys["good"], "c2", username="carol"))
    cmd("object-add", psk("client", keys["empty"], "c3", username="alice"))
    cmd("object-add", {"qom-type": "tls-creds-psk", "id": "nodir", "endpoint": "client"})
    cmd("qom-list", {"path": "/objects/cli"})
    for p in ("endpoint", "dir", "verify-peer", "priority", "username"):
        cmd("qom-get", {"path": "/objects/cli", "property": p})
        cmd("qom-get", {"path": "/objects/srv", "property": p})
    cmd("qom-set", {"path": "/objects/cli", "property": "username", "value": "zed"})
    cmd("qom-get", {"path": "/objects/cli", "property": "username"})
    cmd("qom-list-properties", {"typename": "tls-creds-psk"})
    types = c.cmd("qom-list-types", {"implements": "tls-creds"})["return"]
    out.append(sorted(t["name"] for t in types if t["name"] != "tls-creds-anon"))
    sock = d.workdir / "x.sock"
    cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                             "tls-creds": "cli"})
    cmd("object-del", {"id": "srv"})
    cmd("object-del", {"id": "cli"})
    c.close()
    return out


def test_psk_objects_and_refusals_match_qsd(both, keys):
    q, f = both()
    assert_same_transcript(objects_transcript(q, keys), objects_transcript(f, keys))


def test_what_ferrite_cannot_take_is_refused_clearly(ferrite, keys):
    """Anonymous credentials need TLS 1.2's anonymous Diffie-Hellman, and a GnuTLS priority
    string means nothing to ferrite: each is refused by name, never ignored."""
    c = ferrite().connect()
    for obj in [{"qom-type": "tls-creds-anon", "id": "a", "endpoint": "server"},
                psk("server", keys["good"], "prio", priority="NORMAL")]:
        r = c.cmd("object-add", obj)
        assert r["error"]["class"] == "GenericError", r
        desc = r["error"]["desc"]
        assert "ferrite" in desc and ("tls-creds-psk" in desc or "priority" in desc), desc


def serve(d, keys, authz=None):
    """Serves a fresh 16 MiB qcow2 image over TLS-PSK as export `d`: (monitor, socket)."""
    c = d.connect()
    img = d.workdir / "d.qcow2"
    qcow2(img, "16M")
    run("qemu-io", "-c", "write -P 7 0 1M", "-c", "write -P 3 15M 1M", img)
    assert c.cmd("object-add", psk("server", keys["good"])) == {"return": {}}
    add(c, "d", img)
    args = {"addr": {"type": "unix", "data": {"path": str(d.workdir / "nbd.sock")}},
            "tls-creds": "tls0"}
    if authz:
        assert c.cmd("object-add", {"id": "authz0", **authz}) == {"return": {}}
        args["tls-authz"] = "authz0"
    assert c.cmd("nbd-server-start", args) == {"return": {}}
    r = c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "name": "d",
                                   "writable": True})
    assert r == {"return": {}}, r
    return c, d.workdir / "nbd.sock"


def qemu_client(tool, sock, cred, *ops):
    """A QEMU tool as a PSK client of export `d` (`cred`: key directory and user name, or
    None for no TLS): (exit status, output lines without timings)."""
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=d"
    obj = []
    if cred is not None:
        obj = ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={cred[0]},"
                           f"username={cred[1]}"]
        opts += ",tls-creds=tls0"
    head, ops = ([ops[0]], ops[1:]) if tool == "qemu-img" else ([], ops)
    r = subprocess.run([tool, *head, *obj, "--image-opts", opts, *ops], capture_output=True,
                       text=True, timeout=60)
    return r.returncode, [dropped(ln.replace(str(sock), "SOCK"))
                          for ln in (r.stdout + r.stderr).splitlines() if "ops/sec" not in ln]


def clients_transcript(d, keys, authz=None):
    c, sock = serve(d, keys, authz)
    out = []
    io = lambda cred, *ops: out.append(qemu_client("qemu-io", sock, cred, *ops))
    io((keys["good"], "alice"), "-c", "read -P 7 0 1M", "-c", "write -P 9 1M 4M",
       "-c", "read -P 9 1M 4M", "-c", "read -P 3 15M 1M", "-c", "flush")
    io((keys["good"], "bob"), "-c", "read -P 9 1M 64k", "-c", "aio_write -P 5 8M 64k",
       "-c", "aio_write -P 6 9M 64k", "-c", "aio_flush", "-c", "read -P 6 9M 64k")
    io((keys["wrong"], "alice"), "-c", "read 0 4k")
    io((keys["carol"], "carol"), "-c", "read 0 4k")
    io(None, "-c", "read 0 4k")
    out.append(qemu_client("qemu-img", sock, (keys["good"], "alice"), "info", "--output=json"))
    r = subprocess.run(["nbdinfo", "--json", f"nbds+unix://alice@/d?socket={sock}"
                        f"&tls-psk-file={keys['good']}/keys.psk"], capture_output=True,
                       text=True)
    info = json.loads(r.stdout)["exports"][0] if r.returncode == 0 else r.stderr
    out.append(("nbdinfo", {k: info[k] for k in ("export-size", "is_read_only")}
                if isinstance(info, dict) else info))
    c.cmd("quit")
    d.proc.wait(10)
    out.append(("daemon said", [ln.split(": ", 1)[1] for ln in
                                d.stderr_path.read_text().splitlines()]))
    out.append(("image", subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 9 1M 4M", "-c", "read -P 5 8M 64k",
         str(d.workdir / "d.qcow2")], capture_output=True, text=True).stdout.count("read ")))
    return out


@pytest.mark.parametrize("authz", [
    None,
    # QEMU judges nothing of a PSK client after the handshake: an authorization object
    # that would refuse everyone lets every key holder in.
    {"qom-type": "authz-simple", "identity": "nobody"},
], ids=["no-authz", "authz-ignored"])
def test_qemu_clients_see_the_same_psk_server(both, keys, authz):
    q, f = both()
    expected = clients_transcript(q, keys, authz)
    got = clients_transcript(f, keys, authz)
    assert_same_transcript(expected, got)
    assert got[0][0] == 0 and got[1][0] == 0, got


@pytest.fixture
def qemu_nbd_psk(keys, tmp_path):
    """qemu-nbd serving a 16 MiB raw image over TLS-PSK on a unix socket, for any number
    of clients."""
    img = tmp_path / "served.raw"
    run("qemu-img", "create", "-f", "raw", img, "16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 2M", img)
    sock = tmp_path / "qemu-nbd.sock"
    p = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-x", "s", "-k", str(sock),
                          "--object", f"tls-creds-psk,id=t,endpoint=server,dir={keys['good']}",
                          "--tls-creds", "t", str(img)], stderr=subprocess.PIPE)
    wait_for(sock.exists, what="qemu-nbd's socket")
    yield sock, img
    p.terminate()
    p.wait(10)


def driver_transcript(d, keys, sock):
    """The `nbd` driver as a PSK client of qemu-nbd: good and bad keys, then reads and
    writes through the node (exported again, in the clear, for qemu-io)."""
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    for id, (kd, user) in {"good": (keys["good"], "alice"), "wrong": (keys["wrong"], "alice"),
                           "carol": (keys["carol"], "carol")}.items():
        cmd("object-add", psk("client", kd, id, username=user))
    for id in ("wrong", "carol", "good"):
        cmd("blockdev-add", {"driver": "nbd", "node-name": f"n-{id}", "export": "s",
                             "server": {"type": "unix", "path": str(sock)}, "tls-creds": id})
    plain = d.workdir / "plain.sock"
    cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(plain)}}})
    cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "n-good", "name": "x",
                             "writable": True})
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 2M",
                        "-c", "write -P 0x11 4M 3M", "-c", "read -P 0x11 4M 3M",
                        "-c", "flush", f"nbd+unix:///x?socket={plain}"],
                       capture_output=True, text=True)
    out.append([ln for ln in r.stdout.splitlines() if "ops/sec" not in ln])
    cmd("block-export-del", {"id": "e"})
    wait_for(lambda: c.cmd("query-block-exports")["return"] == [], what="the export to go")
    cmd("blockdev-del", {"node-name": "n-good"})
    c.close()
    return out


def test_nbd_driver_over_psk_matches_qsd(both, keys, qemu_nbd_psk):
    sock, img = qemu_nbd_psk
    q, f = both()
    expected = driver_transcript(q, keys, sock)
    run("qemu-io", "-f", "raw", "-c", "write -P 0 4M 3M", img)
    got = driver_transcript(f, keys, sock)
    assert_same_transcript(expected, got)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 4M 3M", str(img)],
                       capture_output=True, text=True)
    assert "read 3145728/3145728" in r.stdout, r.stdout + r.stderr


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gnutls_session(port, key_dir, user, lines):
    """gnutls-cli with a PSK sends `lines` to a TLS monitor and returns what came back."""
    key = [ln.split(":", 1)[1] for ln in (key_dir / "keys.psk").read_text().splitlines()
           if ln.startswith(user + ":")][0]
    p = subprocess.Popen(["gnutls-cli", "--logfile=/dev/null", "--pskusername", user,
                          "--pskkey", key, "--priority", "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK",
                          "-p", str(port), "127.0.0.1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    received = []
    # One line at a time, each after the answer to the one before.
    p.stdin.write(lines[0] + "\n")
    p.stdin.flush()
    for line in lines[1:]:
        time.sleep(0.3)
        p.stdin.write(line + "\n")
        p.stdin.flush()
    time.sleep(0.3)
    p.stdin.close()
    out = p.stdout.read()
    p.wait(10)
    for ln in out.splitlines():
        if ln.startswith("{"):
            msg = json.loads(ln)
            msg.pop("timestamp", None)
            if "QMP" in msg:
                msg = "greeting"
            received.append(msg)
    return received


def test_a_qmp_monitor_over_psk_matches_qsd(qsd, ferrite, keys):
    got = []
    for start in (qsd, ferrite):
        port = free_port()
        start(["--object", f"tls-creds-psk,id=tls0,dir={keys['good']},endpoint=server",
               "--chardev", f"socket,id=tm,host=127.0.0.1,port={port},server=on,wait=off,"
                            "tls-creds=tls0",
               "--monitor", "chardev=tm"])
        wait_for(lambda: subprocess.run(["ss", "-ltnH", f"sport = :{port}"],
                                        capture_output=True, text=True).stdout.strip() != "",
                 what="the monitor's port")
        got.append(gnutls_session(port, keys["good"], "bob", [
            '{"execute": "qmp_capabilities"}',
            '{"execute": "query-status"}',
            '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s", '
            '"data": "x"}}']))
        got.append(gnutls_session(port, keys["wrong"], "bob", ['{"execute": "quit"}']))
    assert got[0][:2] == ["greeting", {"return": {}}], got
    assert got[2:] == got[:2]
