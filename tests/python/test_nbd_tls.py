"""NBD over TLS (`tls-creds-x509`, `nbd-server-start tls-creds`, `tls-authz`, the `nbd`
driver's `tls-creds` and `tls-hostname`) against qemu-storage-daemon: the same objects and
refusals, the same answers to QEMU's own clients (qemu-io, qemu-img) and to libnbd's
`nbdinfo`, the same bytes on the wire before STARTTLS, and ferrite's client against
qemu-nbd's and its own TLS servers. Certificates are made with GnuTLS's certtool, as QEMU's
iotests make theirs."""
import json
import shutil
import socket
import struct
import subprocess

import pytest

from blockjobs import add, qcow2, run
from conftest import (assert_same_image, assert_same_transcript, connect_unix, wait_for,
                      wait_for_port)

MiB = 1 << 20

pytestmark = pytest.mark.skipif(shutil.which("certtool") is None,
                                reason="certtool (gnutls-bin) makes the test certificates")


def certtool(*args):
    subprocess.run(["certtool", *args], check=True, capture_output=True)


def make_ca(d, key, name):
    (d / "ca.info").write_text(f"cn = {name}\nca\ncert_signing_key\n")
    certtool("--generate-self-signed", "--load-privkey", key, "--template", d / "ca.info",
             "--outfile", d / f"{name}.pem")
    return d / f"{name}.pem"


def make_cert(d, key, ca, out, template):
    (d / "cert.info").write_text(template)
    certtool("--generate-certificate", "--load-ca-privkey", key, "--load-ca-certificate", ca,
             "--load-privkey", key, "--template", d / "cert.info", "--outfile", out)


def cred_dir(d, ca, files):
    d.mkdir()
    shutil.copy(ca, d / "ca-cert.pem")
    for name, src in files.items():
        shutil.copy(src, d / name)
    return d


SERVER = ("organization = Test server\ncn = iotests.qemu.org\nip_address = 127.0.0.1\n"
          "ip_address = ::1\ntls_www_server\nencryption_key\nsigning_key\n")
CLIENT = ("country = South Pacific\nlocality =  R'lyeh\norganization = Test client {n}\n"
          "cn = localhost\ntls_www_client\nencryption_key\nsigning_key\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Credential directories: a server's and two clients' of one CA, a client with no
    certificate, a server of another CA, and sets QEMU's sanity check refuses."""
    d = tmp_path_factory.mktemp("pki")
    key = d / "key.pem"
    certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", key)
    ca = make_ca(d, key, "ca1")
    other_ca = make_ca(d, key, "ca2")
    make_cert(d, key, ca, d / "server.pem", SERVER)
    make_cert(d, key, other_ca, d / "server2.pem", SERVER)
    make_cert(d, key, ca, d / "client1.pem", CLIENT.format(n=1))
    make_cert(d, key, ca, d / "client2.pem", CLIENT.format(n=2))
    dirs = {
        "server": cred_dir(d / "server", ca, {"server-cert.pem": d / "server.pem",
                                              "server-key.pem": key}),
        "server-ca2": cred_dir(d / "server-ca2", other_ca, {"server-cert.pem": d / "server2.pem",
                                                            "server-key.pem": key}),
        "client1": cred_dir(d / "client1", ca, {"client-cert.pem": d / "client1.pem",
                                                "client-key.pem": key}),
        "client2": cred_dir(d / "client2", ca, {"client-cert.pem": d / "client2.pem",
                                                "client-key.pem": key}),
        "anonymous": cred_dir(d / "anonymous", ca, {}),
        # The CA's own certificate offered as the server's.
        "ca-as-server": cred_dir(d / "ca-as-server", ca, {"server-cert.pem": ca,
                                                          "server-key.pem": key}),
        # A server certificate signed by a CA the directory does not trust.
        "foreign-server": cred_dir(d / "foreign-server", ca,
                                   {"server-cert.pem": d / "server2.pem",
                                    "server-key.pem": key}),
        "no-key": cred_dir(d / "no-key", ca, {"server-cert.pem": d / "server.pem"}),
    }
    return dirs


def creds(kind, d, id="tls0", **extra):
    return {"qom-type": "tls-creds-x509", "id": id, "dir": str(d),
            "endpoint": kind, **extra}


def objects_transcript(d, pki, tmp):
    """object-add and the commands that take credentials by id."""
    c = d.connect()
    out = []

    def cmd(name, args):
        r = c.cmd(name, args)
        out.append((name, json.loads(json.dumps(r).replace(str(tmp), "TMP"))))
        return r
    cmd("object-add", creds("server", pki["server"], "srv"))
    cmd("object-add", creds("client", pki["client1"], "cli"))
    cmd("object-add", creds("client", pki["anonymous"], "anon"))
    cmd("object-add", {"qom-type": "tls-creds-x509", "id": "nodir"})
    cmd("object-add", {"qom-type": "tls-creds-x509", "id": "nodir2", "endpoint": "server"})
    cmd("object-add", creds("client", tmp / "nonexistent", "missing"))
    cmd("object-add", creds("server", pki["client1"], "wrongend"))
    cmd("object-add", creds("server", pki["no-key"], "nokey"))
    cmd("object-add", creds("server", pki["ca-as-server"], "caserver"))
    cmd("object-add", creds("server", pki["ca-as-server"], "caserver-unchecked",
                            **{"sanity-check": False}))
    cmd("object-add", creds("server", pki["foreign-server"], "foreign"))
    cmd("object-add", creds("server", pki["server"], "unverified", **{"verify-peer": False}))
    cmd("object-add", {"qom-type": "tls-creds-x509", "id": "bad", "endpoint": "middle"})
    cmd("object-add", {"qom-type": "authz-simple", "id": "az"})
    cmd("object-add", {"qom-type": "authz-simple", "id": "az1", "identity": "CN=x"})
    cmd("object-add", {"qom-type": "authz-list", "id": "al", "policy": "allow",
                       "rules": [{"match": "CN=*", "policy": "deny", "format": "glob"}]})
    cmd("object-add", {"qom-type": "authz-list", "id": "al2",
                       "rules": [{"match": "CN=*", "policy": "maybe"}]})
    cmd("object-add", {"qom-type": "authz-listfile", "id": "alf", "filename": "/x"})
    cmd("object-add", {"qom-type": "secret", "id": "sec", "data": "x"})
    for obj, prop in [("srv", "endpoint"), ("srv", "verify-peer"), ("srv", "sanity-check"),
                      ("cli", "endpoint"), ("unverified", "verify-peer"), ("az1", "identity"),
                      ("al", "policy")]:
        cmd("qom-get", {"path": f"/objects/{obj}", "property": prop})
    for t in ("tls-creds-x509", "authz-simple", "authz-list"):
        cmd("qom-list-properties", {"typename": t})
    addr = {"type": "unix", "data": {"path": str(d.workdir / "nbd.sock")}}
    for ident in ("nosuch", "sec", "cli", "az1"):
        cmd("nbd-server-start", {"addr": addr, "tls-creds": ident})
    cmd("nbd-server-start", {"addr": addr, "tls-creds": "srv", "tls-authz": "nosuch"})
    cmd("nbd-server-stop", {})
    srv = {"type": "unix", "path": str(d.workdir / "nbd.sock")}
    for ident in ("nosuch", "sec", "srv"):
        cmd("blockdev-add", {"driver": "nbd", "node-name": "n", "server": srv,
                             "tls-creds": ident})
    cmd("object-del", {"id": "srv"})
    cmd("object-del", {"id": "az1"})
    c.close()
    return out


def test_tls_objects_and_refusals_match_qsd(both, pki, tmp_path):
    q, f = both()
    expected = objects_transcript(q, pki, tmp_path)
    got = objects_transcript(f, pki, tmp_path)
    assert_same_transcript(expected, got)


def serve(d, pki, *, authz=None, verify=True, writable=True):
    """Serves a fresh 16 MiB qcow2 image over TLS as export `d`; returns its socket."""
    c = d.connect()
    img = d.workdir / "d.qcow2"
    qcow2(img, "16M")
    run("qemu-io", "-c", "write -P 7 0 1M", "-c", "write -P 3 15M 1M", img)
    r = c.cmd("object-add", creds("server", pki["server"], **{"verify-peer": verify}))
    assert r == {"return": {}}, r
    if authz:
        assert c.cmd("object-add", {"id": "authz0", **authz}) == {"return": {}}
    add(c, "d", img)
    sock = d.workdir / "nbd.sock"
    args = {"addr": {"type": "unix", "data": {"path": str(sock)}}, "tls-creds": "tls0"}
    if authz:
        args["tls-authz"] = "authz0"
    assert c.cmd("nbd-server-start", args) == {"return": {}}
    r = c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "d", "name": "d",
                                   "writable": writable})
    assert r == {"return": {}}, r
    return c, sock


def qemu_client(tool, sock, cred, *ops, hostname="127.0.0.1"):
    """Runs a QEMU tool as a TLS client of export `d`: (exit status, output lines without
    timings)."""
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=d"
    obj = []
    if cred is not None:
        obj = ["--object", f"tls-creds-x509,id=tls0,dir={cred},endpoint=client"]
        opts += ",tls-creds=tls0"
        if hostname:
            opts += f",tls-hostname={hostname}"
    # qemu-img takes its options after the subcommand.
    head, ops = ([ops[0]], ops[1:]) if tool == "qemu-img" else ([], ops)
    r = subprocess.run([tool, *head, *obj, "--image-opts", opts, *ops], capture_output=True,
                       text=True, timeout=60)
    lines = [dropped(ln.replace(str(sock), "SOCK")) for ln in (r.stdout + r.stderr).splitlines()
             if "ops/sec" not in ln]
    return r.returncode, lines


def dropped(line):
    """A connection the server cut off: whether the client saw it as a reset, a broken pipe
    or an end of stream depends on timing, in QEMU's programs as in ferrite's."""
    for sign in ("Connection reset by peer", "Broken pipe", "non-properly terminated",
                 "Error in the push function"):
        if sign in line:
            return "<the server dropped the connection>"
    return line


def clients_transcript(d, pki, authz=None, verify=True):
    c, sock = serve(d, pki, authz=authz, verify=verify)
    out = []
    io = lambda cred, *ops, **kw: out.append(qemu_client("qemu-io", sock, cred, *ops, **kw))
    io(pki["client1"], "-c", "read -P 7 0 1M", "-c", "write -P 9 1M 64k",
       "-c", "read -P 9 1M 64k", "-c", "read -P 3 15M 1M")
    io(pki["client2"], "-c", "read -P 7 0 64k")
    io(pki["anonymous"], "-c", "read 0 4k")
    io(pki["client1"], "-c", "read 0 4k", hostname="localhost")
    io(pki["client1"], "-c", "read 0 4k", hostname="IOTESTS.qemu.org")
    io(pki["client1"], "-c", "read 0 4k", hostname=None)
    io(None, "-c", "read 0 4k")
    out.append(qemu_client("qemu-img", sock, pki["client1"], "info", "--output=json"))
    r = subprocess.run(["nbdinfo", "--json", f"nbds+unix:///d?socket={sock}"
                        f"&tls-certificates={pki['client1']}"], capture_output=True, text=True)
    info = json.loads(r.stdout)["exports"][0] if r.returncode == 0 else r.returncode
    out.append(("nbdinfo", {k: info[k] for k in ("export-size", "is_read_only",
                                                 "contexts")} if isinstance(info, dict)
                else info))
    c.close()
    return out


@pytest.mark.parametrize("authz", [
    None,
    {"qom-type": "authz-simple",
     "identity": "C=South Pacific,L=R'lyeh,O=Test client 1,CN=localhost"},
    {"qom-type": "authz-list", "policy": "deny",
     "rules": [{"match": "C=South Pacific,*,O=Test client 2,*", "policy": "allow",
                "format": "glob"}]},
    {"qom-type": "authz-list", "policy": "allow",
     "rules": [{"match": "C=South Pacific,L=R'lyeh,O=Test client 2,CN=localhost",
                "policy": "deny"}]},
], ids=["no-authz", "simple", "list-glob", "list-exact"])
def test_qemu_clients_see_the_same_tls_server(both, pki, authz):
    q, f = both()
    expected = clients_transcript(q, pki, authz)
    got = clients_transcript(f, pki, authz)
    assert_same_transcript(expected, got)
    # Some client got in, one way or another.
    assert any(e[0] == 0 for e in got if isinstance(e[0], int)), got


def test_a_server_that_does_not_verify_takes_any_client(both, pki):
    q, f = both()
    assert_same_transcript(clients_transcript(q, pki, verify=False),
                           clients_transcript(f, pki, verify=False))


def option(opt, data=b""):
    return struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data


def read_reply(s):
    """One option reply, or None once the server has closed (or reset) the connection."""
    head = b""
    while len(head) < 20:
        try:
            chunk = s.recv(20 - len(head))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        head += chunk
    _, opt, ty, length = struct.unpack(">QIII", head)
    body = b""
    while len(body) < length:
        body += s.recv(length - len(body))
    return opt, ty, body.decode()


def wire_transcript(d, pki):
    """Options before STARTTLS, byte for byte."""
    c, sock = serve(d, pki)
    out = []

    def session(*opts, flags=3):
        s = connect_unix(str(sock))
        s.settimeout(10)
        hello = s.recv(18)
        s.sendall(struct.pack(">I", flags))
        replies = []
        for o in opts:
            try:
                s.sendall(o)
            except BrokenPipeError:
                replies.append("closed")
                break
            r = read_reply(s)
            replies.append(r if r is not None else "closed")
            if r is None:
                break
        s.close()
        out.append((hello.hex(), replies))
    # LIST, INFO, STRUCTURED_REPLY, an unknown option, then STARTTLS acknowledged.
    session(option(3), option(6, b"\0\0\0\1d\0\0"), option(8), option(99, b"xyz"), option(5))
    session(option(5, b"x"))           # STARTTLS with a payload: refused, dropped
    session(option(1, b"d"))           # EXPORT_NAME: dropped unanswered
    session(option(2), option(3))      # ABORT: TLS_REQD, then dropped
    session(option(3), flags=2)        # without fixed newstyle: dropped
    c.close()
    return out


def test_options_before_starttls_are_answered_as_qsd(both, pki):
    q, f = both()
    assert_same_transcript(wire_transcript(q, pki), wire_transcript(f, pki))


@pytest.fixture
def qemu_nbd_tls(tmp_path, pki):
    procs = []

    def start(image, cred="server", *extra):
        sock = tmp_path / f"qemu-nbd{len(procs)}.sock"
        p = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-f", "qcow2", "-x", "d",
                              "--shared=8", "--object",
                              f"tls-creds-x509,id=tls0,dir={pki[cred]},endpoint=server",
                              "--tls-creds", "tls0", *extra, str(image)],
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        wait_for(lambda: sock.exists(), what="qemu-nbd socket")
        return sock
    yield start
    for p in procs:
        p.kill()
        p.wait()


def driver_transcript(d, pki, tls_sock, plain_sock, foreign_sock):
    """The `nbd` driver with TLS: the node, and why connections are refused."""
    c = d.connect()
    out = []

    def cmd(name, args):
        r = c.cmd(name, args)
        text = json.dumps(r)
        for s, name_ in ((tls_sock, "TLS"), (plain_sock, "PLAIN"), (foreign_sock, "FOREIGN")):
            text = text.replace(str(s), name_)
        r = json.loads(text)
        if "error" in r:
            r["error"]["desc"] = dropped(r["error"]["desc"])
        out.append((name, r))
        return r
    cmd("object-add", creds("client", pki["client1"]))
    cmd("object-add", creds("client", pki["anonymous"], "anon"))
    cmd("object-add", creds("client", pki["client1"], "lax", **{"verify-peer": False}))

    def node(name, sock, **extra):
        return cmd("blockdev-add", {"driver": "nbd", "node-name": name, "export": "d",
                                    "server": {"type": "unix", "path": str(sock)}, **extra})
    node("n", tls_sock, **{"tls-creds": "tls0", "tls-hostname": "127.0.0.1"})
    node("n2", tls_sock, **{"tls-creds": "tls0", "tls-hostname": "localhost"})
    node("n3", tls_sock, **{"tls-creds": "tls0"})
    node("n4", tls_sock)
    node("n5", plain_sock, **{"tls-creds": "tls0", "tls-hostname": "127.0.0.1"})
    node("n6", foreign_sock, **{"tls-creds": "tls0", "tls-hostname": "127.0.0.1"})
    node("n7", foreign_sock, **{"tls-creds": "lax"})
    node("n8", tls_sock, **{"tls-creds": "anon", "tls-hostname": "iotests.qemu.org"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    out.append(sorted((n["node-name"], n["drv"], n["image"]["virtual-size"]) for n in nodes))
    c.close()
    return out


def test_nbd_driver_over_tls_matches_qsd(both, pki, qemu_nbd_tls, tmp_path):
    imgs = [tmp_path / f"src{i}.qcow2" for i in range(3)]
    for img in imgs:
        qcow2(img, "16M")
    tls_sock = qemu_nbd_tls(imgs[0], "server", "--persistent")
    foreign_sock = qemu_nbd_tls(imgs[1], "server-ca2", "--persistent")
    plain_sock = tmp_path / "plain.sock"
    p = subprocess.Popen(["qemu-nbd", "-k", str(plain_sock), "-f", "qcow2", "-x", "d",
                          "--shared=8", "--persistent", str(imgs[2])],
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: plain_sock.exists(), what="qemu-nbd socket")
        q, f = both()
        expected = driver_transcript(q, pki, tls_sock, plain_sock, foreign_sock)
        got = driver_transcript(f, pki, tls_sock, plain_sock, foreign_sock)
    finally:
        p.kill()
        p.wait()
    assert_same_transcript(expected, got)


@pytest.mark.parametrize("server", ["qemu-nbd", "ferrite", "qsd"])
def test_backup_and_mirror_into_a_tls_export(ferrite, qsd, pki, qemu_nbd_tls, tmp_path, server):
    """Storage migration over TLS (iotest nbd-tls-iothread's scenario): ferrite's client
    backs up and mirrors into an export another program serves with TLS; the data arrives."""
    src = tmp_path / "src.qcow2"
    qcow2(src, "32M")
    run("qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0xa5 9M 64k",
        "-c", "write -P 0x11 30M 2M", src)
    targets = []
    for job in ("backup", "mirror"):
        tgt = tmp_path / f"{job}.qcow2"
        qcow2(tgt, "32M")
        if server == "qemu-nbd":
            sock = qemu_nbd_tls(tgt)
        else:
            d = (ferrite if server == "ferrite" else qsd)()
            c = d.connect()
            assert c.cmd("object-add", creds("server", pki["server"])) == {"return": {}}
            add(c, "t", tgt)
            sock = d.workdir / "nbd.sock"
            assert c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                                       "data": {"path": str(sock)}},
                                              "tls-creds": "tls0"}) == {"return": {}}
            assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "t",
                                              "name": "d", "writable": True}) == {"return": {}}
        targets.append((tgt, sock))
    d = ferrite()
    c = d.connect()
    assert c.cmd("object-add", creds("client", pki["client1"])) == {"return": {}}
    add(c, "src", src)
    for (tgt, sock), job in zip(targets, ("backup", "mirror")):
        r = c.cmd("blockdev-add", {"driver": "nbd", "node-name": job, "export": "d",
                                   "tls-creds": "tls0", "tls-hostname": "127.0.0.1",
                                   "server": {"type": "unix", "path": str(sock)}})
        assert r == {"return": {}}, r
    r = c.cmd("blockdev-backup", {"job-id": "b", "device": "src", "target": "backup",
                                  "sync": "full"})
    assert r == {"return": {}}, r
    ev = c.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
    assert "error" not in ev["data"], ev
    r = c.cmd("blockdev-mirror", {"job-id": "m", "device": "src", "target": "mirror",
                                  "sync": "full"})
    assert r == {"return": {}}, r
    c.wait_event("BLOCK_JOB_READY", timeout=120)
    assert c.cmd("block-job-complete", {"device": "m"}) == {"return": {}}
    ev = c.wait_event("BLOCK_JOB_COMPLETED", timeout=120)
    assert "error" not in ev["data"], ev
    for job in ("backup", "mirror"):
        assert c.cmd("blockdev-del", {"node-name": job}) == {"return": {}}
    c.close()
    for tgt, _ in targets:
        r = run("qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", src, tgt,
                check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_large_transfers_and_many_clients_over_tls(ferrite, pki, tmp_path):
    """Whole images through ferrite's TLS server in both directions, four clients at
    once: what arrives is what was sent."""
    d = ferrite()
    c, sock = serve(d, pki)
    src = tmp_path / "data.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "16M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 5M", "-c", "write -P 0x17 7M 9M", src)
    opts = (f"driver=nbd,server.type=unix,server.path={sock},export=d,tls-creds=tls0,"
            "tls-hostname=127.0.0.1")
    obj = f"tls-creds-x509,id=tls0,dir={pki['client1']},endpoint=client"
    run("qemu-img", "convert", "-n", "-f", "raw", "--object", obj, "--target-image-opts",
        src, opts)
    procs = [subprocess.Popen(["qemu-io", "--object", obj, "--image-opts", opts,
                               "-c", f"write -P {0x60 + i} {i * 4}M 1M"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i in range(4)]
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read()
    for i in range(4):
        run("qemu-io", "-f", "raw", "-c", f"write -P {0x60 + i} {i * 4}M 1M", src)
    out = tmp_path / "back.raw"
    run("qemu-img", "convert", "-O", "raw", "--object", obj, "--image-opts", opts, out)
    assert_same_image(src, out)
    c.close()


@pytest.fixture(scope="module")
def encrypted_key_dir(pki, tmp_path_factory):
    """The server's credentials with its key PKCS #8 encrypted under the password `pw`."""
    d = tmp_path_factory.mktemp("enc") / "server"
    shutil.copytree(pki["server"], d)
    certtool("--load-privkey", pki["server"] / "server-key.pem", "--to-p8", "--password", "pw",
             "--outfile", d / "server-key.pem")
    assert "ENCRYPTED PRIVATE KEY" in (d / "server-key.pem").read_text()
    # OpenSSL writes the same structure with a NULL after the PRF's OID, and AES-256.
    o = d.parent / "openssl"
    shutil.copytree(pki["server"], o)
    subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout", "pass:pw",
                    "-in", pki["server"] / "server-key.pem", "-out", o / "server-key.pem"],
                   check=True, capture_output=True)
    return d


def password_transcript(d, server_dir, pki):
    c = d.connect()
    out = []
    for obj in [{"qom-type": "secret", "id": "pw", "data": "pw"},
                {"qom-type": "secret", "id": "wrong", "data": "nope"},
                {"qom-type": "secret", "id": "latin1", "data": "w8k=", "format": "base64"},
                creds("server", server_dir, "nopw"),
                creds("server", server_dir, "nosecret", passwordid="nosuch"),
                creds("server", server_dir, "notsecret", passwordid="nopw"),
                creds("server", server_dir, "notutf8", passwordid="latin1"),
                creds("server", server_dir, "badpw", passwordid="wrong"),
                # Looked up only when the key is read: a missing directory comes first.
                creds("server", server_dir / "nonexistent", "nodir", passwordid="nosuch"),
                creds("server", pki["server"], "plain", passwordid="pw"),
                creds("server", server_dir.parent / "openssl", "openssl", passwordid="pw"),
                creds("server", server_dir, "tls0", passwordid="pw")]:
        r = c.cmd("object-add", obj)
        out.append(json.loads(json.dumps(r).replace(str(server_dir.parent), "DIR")))
    out.append(c.cmd("qom-get", {"path": "/objects/tls0", "property": "passwordid"}))
    return c, out


def test_encrypted_private_keys_with_a_password_secret(both, encrypted_key_dir, pki, tmp_path):
    """`passwordid`: the key decrypted with a secret's text, refused as QEMU refuses it;
    and the server then serves over TLS with that key."""
    q, f = both()
    results = []
    for d in (q, f):
        c, out = password_transcript(d, encrypted_key_dir, pki)
        img = d.workdir / "d.qcow2"
        qcow2(img, "1M")
        add(c, "d", img)
        sock = d.workdir / "nbd.sock"
        assert c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                                   "data": {"path": str(sock)}},
                                          "tls-creds": "tls0"}) == {"return": {}}
        assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "d",
                                          "name": "d"}) == {"return": {}}
        out.append(qemu_client("qemu-io", sock, pki["client1"], "-r", "-c", "read -P 0 0 4k"))
        results.append(out)
    assert_same_transcript(*results)
    assert results[1][-1][0] == 0, results[1][-1]


# GnuTLS priority strings (`priority`): QEMU takes any string when the object is made and
# hands it to GnuTLS when a session starts, which refuses it then or narrows what the
# session may negotiate.

PRIORITIES = [None, "NORMAL", "normal", "BOGUS", "NONE", "NORMAL:", "@SYSTEM",
              "NORMAL:-VERS-ALL", "NORMAL:-CIPHER-ALL", "NORMAL:+FOO", "SECURE128", "PFS",
              "PERFORMANCE", "NORMAL:%COMPAT:%SERVER_PRECEDENCE",
              "NORMAL:-VERS-ALL:+VERS-TLS1.2", "NORMAL:-VERS-ALL:+VERS-TLS1.3",
              "NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305", "NORMAL:-GROUP-ALL:+GROUP-X25519",
              "SECURE256:+SECURE128:-VERS-TLS-ALL:+VERS-TLS1.2:+VERS-TLS1.3:-RSA",
              # Verification profiles: SECURE192 and up want 3072-bit RSA keys.
              "SECURE192", "SECURE256", "NORMAL:%PROFILE_HIGH", "SECURE192:%PROFILE_LOW",
              "NORMAL:%PROFILE_MEDIUM", "NORMAL:%PROFILE_ULTRA"]

# Strings GnuTLS takes that allow nothing rustls negotiates (TLS 1.0 only; no signature
# algorithm, so nothing from TLS 1.2 on; finite-field groups only; CBC suites only): QEMU's
# sessions go ahead, ferrite's are refused before the handshake, saying why.
BEYOND_FERRITE = ["NORMAL:-VERS-ALL:+VERS-TLS1.0", "NORMAL:-SIGN-ALL",
                  "NORMAL:-GROUP-ALL:+GROUP-FFDHE2048",
                  "NORMAL:-VERS-ALL:+VERS-TLS1.2:-CIPHER-ALL:+AES-128-CBC:+SHA256"]
CANNOT = "allows nothing ferrite can negotiate"


def with_priority(p):
    return {} if p is None else {"priority": p}


def priority_client_transcript(d, cred, sock, priorities):
    """The `nbd` driver as a TLS client of qemu-nbd, its credentials (the directory `cred`)
    with each priority: the node or why not, and the property read back."""
    c = d.connect()
    out = []
    for i, p in enumerate(priorities):
        r = c.cmd("object-add", creds("client", cred, f"c{i}", **with_priority(p)))
        assert r == {"return": {}}, r
        r = c.cmd("blockdev-add", {"driver": "nbd", "node-name": f"n{i}", "export": "d",
                                   "server": {"type": "unix", "path": str(sock)},
                                   "tls-creds": f"c{i}", "tls-hostname": "127.0.0.1",
                                   "read-only": True})
        if "error" in r:
            r["error"]["desc"] = dropped(r["error"]["desc"])
        else:
            # qemu-nbd serves a few clients at a time.
            assert c.cmd("blockdev-del", {"node-name": f"n{i}"}) == {"return": {}}
        got = c.cmd("qom-get", {"path": f"/objects/c{i}", "property": "priority"})
        out.append((p, r, got))
    c.close()
    return out


def test_the_nbd_drivers_priority_strings_match_qsd(both, pki, qemu_nbd_tls, tmp_path):
    img = tmp_path / "src.qcow2"
    qcow2(img, "16M")
    sock = qemu_nbd_tls(img, "server", "--persistent")
    q, f = both()
    expected = priority_client_transcript(q, pki["client1"], sock, PRIORITIES + BEYOND_FERRITE)
    got = priority_client_transcript(f, pki["client1"], sock, PRIORITIES + BEYOND_FERRITE)
    n = len(PRIORITIES)
    assert_same_transcript(expected[:n], got[:n])
    assert [e[1] for e in expected[:n]].count({"return": {}}) >= 10, expected
    for (p, e, _), (_, g, prop) in zip(expected[n:], got[n:]):
        assert e == {"return": {}}, (p, e)
        assert CANNOT in g["error"]["desc"] and prop == {"return": p}, (p, g)


@pytest.fixture(scope="module")
def pki3072(tmp_path_factory):
    """A CA and a server with 3072-bit RSA keys (what the HIGH profile wants), and a
    client directory trusting that CA."""
    d = tmp_path_factory.mktemp("pki3072")
    key = d / "key.pem"
    certtool("--generate-privkey", "--key-type=rsa", "--bits=3072", "--outfile", key)
    ca = make_ca(d, key, "ca")
    make_cert(d, key, ca, d / "server.pem", SERVER)
    return {"server": cred_dir(d / "server", ca, {"server-cert.pem": d / "server.pem",
                                                  "server-key.pem": key}),
            "client": cred_dir(d / "client", ca, {})}


def test_a_strong_servers_certificate_passes_every_profile_as_in_qsd(both, pki, pki3072,
                                                                     tmp_path):
    """3072-bit keys pass what 2048-bit ones do not (SECURE192, %PROFILE_HIGH), and fail
    %PROFILE_ULTRA (7680 bits), in ferrite as in QEMU."""
    img = tmp_path / "src.qcow2"
    qcow2(img, "16M")
    p = subprocess.Popen(["qemu-nbd", "-k", str(tmp_path / "s.sock"), "-f", "qcow2", "-x", "d",
                          "--shared=8", "--persistent", "--object",
                          f"tls-creds-x509,id=t,dir={pki3072['server']},endpoint=server,"
                          "verify-peer=off", "--tls-creds", "t", str(img)],
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "s.sock").exists(), what="qemu-nbd socket")
        priorities = [None, "SECURE192", "SECURE256", "NORMAL:%PROFILE_HIGH",
                      "NORMAL:%PROFILE_ULTRA", "SUITEB128"]
        q, f = both()
        expected = priority_client_transcript(q, pki3072["client"], tmp_path / "s.sock",
                                              priorities)
        got = priority_client_transcript(f, pki3072["client"], tmp_path / "s.sock",
                                         priorities)
    finally:
        p.kill()
        p.wait()
    assert_same_transcript(expected, got)
    assert [e[1] == {"return": {}} for e in expected] == [True] * 4 + [False] * 2, expected


def priority_server_transcript(d, priorities, make_creds, client):
    """An NBD server whose credentials (`make_creds(id, priority)`) have each priority in
    turn, and `client(socket)` (QEMU's, with GnuTLS's default priority) reading through it:
    what the client saw, and what the daemon said."""
    c = d.connect()
    img = d.workdir / "d.qcow2"
    qcow2(img, "16M")
    run("qemu-io", "-c", "write -P 7 0 1M", img)
    add(c, "d", img)
    sock = d.workdir / "nbd.sock"
    out = []
    for i, p in enumerate(priorities):
        r = c.cmd("object-add", make_creds(f"s{i}", p))
        assert r == {"return": {}}, r
        r = c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}},
                                       "tls-creds": f"s{i}"})
        assert r == {"return": {}}, r
        r = c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "d",
                                       "name": "d"})
        assert r == {"return": {}}, r
        seen = client(sock)
        assert c.cmd("nbd-server-stop", {}) == {"return": {}}
        wait_for(lambda: "e" not in [x["id"] for x in c.cmd("query-block-exports")["return"]],
                 what="the export to go")
        said = [ln.split(": ", 1)[1] for ln in d.stderr_path.read_text().splitlines()]
        out.append((p, seen, said[-1] if said and seen[0] != 0 else None))
    c.close()
    return out


def test_an_nbd_servers_priority_strings_match_qsd(both, pki):
    def transcript(d, priorities):
        return priority_server_transcript(
            d, priorities,
            lambda id, p: creds("server", pki["server"], id, **with_priority(p)),
            lambda sock: qemu_client("qemu-io", sock, pki["client1"], "-r",
                                     "-c", "read -P 7 0 64k"))
    q, f = both()
    assert_same_transcript(transcript(q, PRIORITIES), transcript(f, PRIORITIES))
    q, f = both()
    expected = transcript(q, BEYOND_FERRITE)
    got = transcript(f, BEYOND_FERRITE)
    assert all(e[1][0] == 0 for e in expected), expected
    assert all(g[1][0] != 0 and CANNOT in g[2] for g in got), got


def negotiated(port, priority):
    """What gnutls-cli (a client certificate, `priority`) and a TLS monitor on `port`
    agreed on: (version, key exchange group, cipher), or None for no session."""
    r = subprocess.run(["gnutls-cli", "--no-ca-verification", "--priority", priority,
                        "-p", str(port), "127.0.0.1"],
                       input='{"execute": "qmp_capabilities"}\n', capture_output=True,
                       text=True, timeout=30)
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("- Description: "):
            parts = line.split(": ", 1)[1].strip("()").split(")-(")
            return parts[0], parts[1], parts[3]
    return None


@pytest.mark.parametrize("server,client,agree", [
    (None, "NORMAL", True),
    ("NORMAL:-VERS-ALL:+VERS-TLS1.2", "NORMAL", True),
    ("NORMAL:-VERS-TLS1.3:-AES-256-GCM", "NORMAL", True),
    ("NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305", "NORMAL", True),
    ("NORMAL:-GROUP-ALL:+GROUP-SECP384R1", "NORMAL", True),
    ("NORMAL:-VERS-ALL:+VERS-TLS1.3", "NORMAL:-VERS-TLS1.3", False),
    ("NORMAL:-CIPHER-ALL:+AES-128-GCM", "NORMAL:-AES-128-GCM", False),
    ("BOGUS", "NORMAL", False),
])
def test_a_tls_monitor_negotiates_within_its_priority_as_qsd(qsd, ferrite, pki, server,
                                                              client, agree):
    """Versions, ciphers and groups a server's priority allows, as GnuTLS's client sees
    them (the signature algorithm is left out: rustls prefers SHA-512, GnuTLS SHA-256)."""
    got = []
    for start in (qsd, ferrite):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = "" if server is None else f",priority={server}"
        start(["--object", f"tls-creds-x509,id=t,dir={pki['server']},endpoint=server,"
                           f"verify-peer=off{extra}",
               "--chardev", f"socket,id=tm,host=127.0.0.1,port={port},server=on,wait=off,"
                            "tls-creds=t",
               "--monitor", "chardev=tm"])
        wait_for_port(port)
        got.append(negotiated(port, client))
    assert got[1] == got[0], got
    assert (got[0] is not None) == agree, got
