"""NBD and QMP over TLS with pre-shared keys (`tls-creds-psk`) and without credentials
(`tls-creds-anon`), against qemu-storage-daemon. ferrite speaks TLS 1.3 with an external PSK
and TLS 1.2 with anonymous Diffie-Hellman itself (rustls has neither); every peer here is
GnuTLS's: QEMU's own programs, libnbd's nbdinfo, gnutls-cli, and qemu-nbd as a server."""
import json
import shutil
import socket
import subprocess
import time

import pytest

from blockjobs import add, export_del, qcow2, run
from conftest import assert_same_transcript, recorder, wait_for, wait_for_port
from test_nbd_tls import CANNOT, dropped, priority_server_transcript, with_priority

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


# Priority strings: QEMU adds "+ECDHE-PSK:+DHE-PSK:+PSK" (PSK) or "+ANON-DH" (anonymous) to
# the object's own, and reads the property at each session, so `qom-set` counts from the
# next one. The last string of each list leaves GnuTLS a version ferrite does not speak
# for these credentials (TLS 1.2 for a PSK, whose session is TLS 1.3's in ferrite; TLS 1.0
# and 1.1 for anonymous ones): ferrite refuses that one, saying why.
PSK_PRIORITIES = [None, "BOGUS", "NORMAL:-CHACHA20-POLY1305", "NORMAL:-AES-128-GCM",
                  "NORMAL:-VERS-ALL", "NORMAL:-VERS-TLS1.3"]
ANON_PRIORITIES = [None, "BOGUS", "NORMAL:-AES-128-GCM", "NORMAL:-AES-256-GCM",
                   "NORMAL:-CIPHER-ALL", "NORMAL:-VERS-TLS1.2"]


@pytest.mark.parametrize("kind", ["psk", "anon"])
def test_priority_strings_of_psk_and_anonymous_servers_match_qsd(both, keys, kind):
    if kind == "psk":
        priorities, cred = PSK_PRIORITIES, (keys["good"], "alice")
        make = lambda id, p: psk("server", keys["good"], id, **with_priority(p))
    else:
        priorities, cred = ANON_PRIORITIES, "anon"
        make = lambda id, p: anon("server", id, **with_priority(p))
    q, f = both()
    client = lambda sock: qemu_client("qemu-io", sock, cred, "-r", "-c", "read -P 7 0 64k")
    expected = priority_server_transcript(q, priorities, make, client)
    got = priority_server_transcript(f, priorities, make, client)
    assert expected[-1][1][0] == 0 and CANNOT in got[-1][2], (expected[-1], got[-1])
    expected, got = expected[:-1], got[:-1]
    assert_same_transcript(expected, got)
    assert [e[1][0] for e in expected].count(0) >= 3, expected


def test_a_new_priority_counts_from_the_next_session(both, keys):
    """`qom-set` of a PSK server's `priority`: the next client meets the new one."""
    def transcript(d):
        c, sock = serve(d, keys)
        out = []
        io = lambda: out.append(qemu_client("qemu-io", sock, (keys["good"], "alice"), "-r",
                                            "-c", "read -P 7 0 64k"))
        io()
        cmd = recorder(c, out)
        cmd("qom-set", {"path": "/objects/tls0", "property": "priority", "value": "BOGUS"})
        cmd("qom-get", {"path": "/objects/tls0", "property": "priority"})
        io()
        cmd("qom-set", {"path": "/objects/tls0", "property": "priority",
                        "value": "NORMAL:-AES-128-GCM"})
        io()
        return out + after_quit(d, c)
    q, f = both()
    expected = transcript(q)
    assert_same_transcript(expected, transcript(f))
    assert [e[0] for e in expected if isinstance(e[0], int)] == [0, 1, 0], expected


def serve(d, keys, authz=None, creds=None):
    """Serves a fresh 16 MiB qcow2 image over TLS (PSK unless `creds` says otherwise) as
    export `d`: (monitor, socket)."""
    c = d.connect()
    img = d.workdir / "d.qcow2"
    qcow2(img, "16M")
    run("qemu-io", "-c", "write -P 7 0 1M", "-c", "write -P 3 15M 1M", img)
    assert c.cmd("object-add", creds or psk("server", keys["good"])) == {"return": {}}
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


def after_quit(d, c):
    """Quits the daemon `serve` started: what it printed, and how many of the clients'
    writes its image has."""
    c.cmd("quit")
    d.proc.wait(10)
    said = [ln.split(": ", 1)[1] for ln in d.stderr_path.read_text().splitlines()]
    kept = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 9 1M 4M", "-c", "read -P 5 8M 64k",
         str(d.workdir / "d.qcow2")], capture_output=True, text=True).stdout.count("read ")
    return [("daemon said", said), ("image", kept)]


def qemu_client(tool, sock, cred, *ops):
    """A QEMU tool as a TLS client of export `d` (`cred`: key directory and user name,
    "anon", or None for no TLS): (exit status, output lines without timings)."""
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=d"
    obj = []
    if cred == "anon":
        obj = ["--object", "tls-creds-anon,id=tls0,endpoint=client"]
        opts += ",tls-creds=tls0"
    elif cred is not None:
        obj = ["--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={cred[0]},"
                           f"username={cred[1]}"]
        opts += ",tls-creds=tls0"
    head, ops = ([ops[0]], ops[1:]) if tool == "qemu-img" else ([], ops)
    r = subprocess.run([tool, *head, *obj, "--image-opts", opts, *ops], capture_output=True,
                       text=True, timeout=60)
    lines = [dropped(ln.replace(str(sock), "SOCK"))
             for ln in (r.stdout + r.stderr).splitlines() if "ops/sec" not in ln]
    # Requests in flight together complete in either order.
    return r.returncode, sorted(lines) if any("aio_" in op for op in ops) else lines


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
    io("anon", "-c", "read 0 4k")
    io(None, "-c", "read 0 4k")
    out.append(qemu_client("qemu-img", sock, (keys["good"], "alice"), "info", "--output=json"))
    r = subprocess.run(["nbdinfo", "--json", f"nbds+unix://alice@/d?socket={sock}"
                        f"&tls-psk-file={keys['good']}/keys.psk"], capture_output=True,
                       text=True)
    info = json.loads(r.stdout)["exports"][0] if r.returncode == 0 else r.stderr
    out.append(("nbdinfo", {k: info[k] for k in ("export-size", "is_read_only")}
                if isinstance(info, dict) else info))
    return out + after_quit(d, c)


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


def through_plain_export(c, cmd, d, node, pattern):
    """qemu-io reads node `node` (written 0x5a over its first 2 MiB), then writes `pattern`
    and reads it back, through an export in the clear; the export goes again. Its output
    lines, without timings."""
    plain = d.workdir / "plain.sock"
    cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(plain)}}})
    cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": node, "name": "x",
                             "writable": True})
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 2M",
                        "-c", f"write -P {pattern} 4M 3M", "-c", f"read -P {pattern} 4M 3M",
                        "-c", "flush", f"nbd+unix:///x?socket={plain}"],
                       capture_output=True, text=True)
    export_del(cmd, "e")
    wait_for(lambda: c.cmd("query-block-exports")["return"] == [], what="the export to go")
    return [ln for ln in r.stdout.splitlines() if "ops/sec" not in ln]


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
    out.append(through_plain_export(c, cmd, d, "n-good", "0x11"))
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


# gnutls-cli's priorities: QEMU's for PSK, PSK without key agreement (TLS 1.3's psk_ke),
# and anonymous Diffie-Hellman alone.
PRIORITY = {"psk": "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", "psk_ke": "NORMAL:-KX-ALL:+PSK",
            "anon": "NORMAL:-KX-ALL:+ANON-DH:-VERS-TLS1.3"}


def gnutls_session(port, key_dir, user, lines, priority="psk"):
    """gnutls-cli with a PSK (or anonymous, without `key_dir`) sends `lines` to a TLS
    monitor and returns what came back."""
    if key_dir is None:
        creds = ["--priority", PRIORITY["anon"]]
    else:
        key = [ln.split(":", 1)[1] for ln in (key_dir / "keys.psk").read_text().splitlines()
               if ln.startswith(user + ":")][0]
        creds = ["--pskusername", user, "--pskkey", key, "--priority", PRIORITY[priority]]
    p = subprocess.Popen(["gnutls-cli", "--logfile=/dev/null", *creds,
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


@pytest.mark.parametrize("kind", ["psk", "psk_ke", "anon"])
def test_a_qmp_monitor_over_psk_or_anonymous_tls_matches_qsd(qsd, ferrite, keys, kind):
    got = []
    creds = (f"tls-creds-psk,id=tls0,dir={keys['good']},endpoint=server" if kind != "anon"
             else "tls-creds-anon,id=tls0,endpoint=server")
    for start in (qsd, ferrite):
        port = free_port()
        start(["--object", creds,
               "--chardev", f"socket,id=tm,host=127.0.0.1,port={port},server=on,wait=off,"
                            "tls-creds=tls0",
               "--monitor", "chardev=tm"])
        wait_for_port(port)
        key_dir = keys["good"] if kind != "anon" else None
        got.append(gnutls_session(port, key_dir, "bob", [
            '{"execute": "qmp_capabilities"}',
            '{"execute": "query-status"}',
            '{"execute": "object-add", "arguments": {"qom-type": "secret", "id": "s", '
            '"data": "x"}}'], priority=kind))
        # The other kind of client gets nothing.
        other = None if kind != "anon" else keys["good"]
        got.append(gnutls_session(port, other, "bob", ['{"execute": "quit"}']))
    assert got[0][:2] == ["greeting", {"return": {}}], got
    assert got[2:] == got[:2]


# Anonymous credentials: TLS 1.2 with anonymous Diffie-Hellman.

@pytest.fixture(scope="module")
def dh_dirs(tmp_path_factory):
    """Directories for an anonymous server: `params` with certtool's DH parameters, `junk`
    with a file that is none, `none` without one."""
    base = tmp_path_factory.mktemp("anon")
    dirs = {name: base / name for name in ("params", "junk", "none")}
    for d in dirs.values():
        d.mkdir()
    subprocess.run(["certtool", "--generate-dh-params", "--bits", "2048", "--outfile",
                    str(dirs["params"] / "dh-params.pem")], check=True, capture_output=True)
    (dirs["junk"] / "dh-params.pem").write_text("junk\n")
    return dirs


def anon(endpoint, id="tls0", **extra):
    return {"qom-type": "tls-creds-anon", "id": id, "endpoint": endpoint, **extra}


def anon_objects_transcript(d, dh_dirs):
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("object-add", anon("server", "srv"))
    cmd("object-add", anon("server", "p", dir=str(dh_dirs["params"])))
    cmd("object-add", anon("server", "n", dir=str(dh_dirs["none"])))
    cmd("object-add", anon("server", "j", dir=str(dh_dirs["junk"])))
    cmd("object-add", anon("client", "cli", dir=str(dh_dirs["junk"])))
    cmd("qom-list", {"path": "/objects/p"})
    for p in ("endpoint", "dir", "verify-peer", "priority"):
        cmd("qom-get", {"path": "/objects/p", "property": p})
    cmd("qom-list-properties", {"typename": "tls-creds-anon"})
    sock = d.workdir / "x.sock"
    cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                             "tls-creds": "cli"})
    cmd("object-del", {"id": "cli"})
    c.close()
    return out


def test_anon_objects_and_refusals_match_qsd(both, dh_dirs):
    q, f = both()
    assert_same_transcript(anon_objects_transcript(q, dh_dirs),
                           anon_objects_transcript(f, dh_dirs))


def anon_clients_transcript(d, keys, dh_dirs, params):
    creds = anon("server", **({"dir": str(dh_dirs["params"])} if params else {}))
    c, sock = serve(d, keys, creds=creds)
    out = []
    io = lambda cred, *ops: out.append(qemu_client("qemu-io", sock, cred, *ops))
    io("anon", "-c", "read -P 7 0 1M", "-c", "write -P 9 1M 4M", "-c", "read -P 9 1M 4M",
       "-c", "read -P 3 15M 1M", "-c", "flush")
    io("anon", "-c", "aio_write -P 5 8M 64k", "-c", "aio_write -P 6 9M 64k",
       "-c", "aio_flush", "-c", "read -P 6 9M 64k")
    io((keys["good"], "alice"), "-c", "read 0 4k")
    io(None, "-c", "read 0 4k")
    out.append(qemu_client("qemu-img", sock, "anon", "info", "--output=json"))
    r = subprocess.run(["nbdinfo", f"nbds+unix:///d?socket={sock}"], capture_output=True,
                       text=True)
    out.append(("nbdinfo", r.returncode))
    return out + after_quit(d, c)


@pytest.mark.parametrize("params", [False, True], ids=["ffdhe2048", "dh-params.pem"])
def test_qemu_clients_see_the_same_anonymous_server(both, keys, dh_dirs, params):
    q, f = both()
    expected = anon_clients_transcript(q, keys, dh_dirs, params)
    got = anon_clients_transcript(f, keys, dh_dirs, params)
    assert_same_transcript(expected, got)
    assert got[0][0] == 0 and got[1][0] == 0, got


@pytest.fixture
def qemu_nbd_anon(tmp_path):
    """qemu-nbd serving a 16 MiB raw image over anonymous TLS on a unix socket."""
    img = tmp_path / "served.raw"
    run("qemu-img", "create", "-f", "raw", img, "16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 2M", img)
    sock = tmp_path / "qemu-nbd.sock"
    p = subprocess.Popen(["qemu-nbd", "-t", "-f", "raw", "-x", "s", "-k", str(sock),
                          "--object", "tls-creds-anon,id=t,endpoint=server",
                          "--tls-creds", "t", str(img)], stderr=subprocess.PIPE)
    wait_for(sock.exists, what="qemu-nbd's socket")
    yield sock, img
    p.terminate()
    p.wait(10)


def anon_driver_transcript(d, sock):
    """The `nbd` driver as an anonymous client of qemu-nbd: reads and writes through the
    node (exported again, in the clear, for qemu-io)."""
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("object-add", anon("client", "a"))
    cmd("object-add", anon("server", "wrong-end"))
    cmd("blockdev-add", {"driver": "nbd", "node-name": "n-wrong", "export": "s",
                         "server": {"type": "unix", "path": str(sock)},
                         "tls-creds": "wrong-end"})
    cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "export": "s",
                         "server": {"type": "unix", "path": str(sock)}, "tls-creds": "a"})
    out.append(through_plain_export(c, cmd, d, "n", "0x22"))
    cmd("blockdev-del", {"node-name": "n"})
    c.close()
    return out


def test_nbd_driver_over_anonymous_tls_matches_qsd(both, qemu_nbd_anon):
    sock, img = qemu_nbd_anon
    q, f = both()
    expected = anon_driver_transcript(q, sock)
    run("qemu-io", "-f", "raw", "-c", "write -P 0 4M 3M", img)
    got = anon_driver_transcript(f, sock)
    assert_same_transcript(expected, got)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 4M 3M", str(img)],
                       capture_output=True, text=True)
    assert "read 3145728/3145728" in r.stdout, r.stdout + r.stderr
