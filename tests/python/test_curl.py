"""The http, https, ftp and ftps drivers against qemu-storage-daemon's (libcurl): the same
replies and errors at open, the same requests and commands on the wire, the same bytes
read, the same failures reported; with the servers of `webserver.py` and `ftpserver.py`,
plain and with TLS."""
import json
import os
import re
import shutil
import socket
import subprocess
import struct
import threading
import time

import pytest

import nbdclient as nc
from blockjobs import export_del
from conftest import assert_same_image, replies, wait_for
from test_nbd_tls import certtool, make_ca, make_cert
from ftpserver import FtpServer
from webserver import Proxy, WebServer

# qemu-storage-daemon's curl drivers are a module of Debian's qemu-block-extra.
CURL_MODULE = "/usr/lib/x86_64-linux-gnu/qemu/block-curl.so"
pytestmark = pytest.mark.skipif(not os.path.exists(CURL_MODULE),
                                reason="qemu-block-extra (qsd's curl module) is not installed")

SIZE = 4 << 20


def _image(d):
    """A 4 MiB image of distinct bytes, and a copy of it under another name."""
    data = bytes((i * 7 + (i >> 12)) & 0xff for i in range(SIZE))
    (d / "d.raw").write_bytes(data)
    return d / "d.raw"


@pytest.fixture
def site(tmp_path):
    """Starts web servers over `tmp_path/www` (one per program, so each has its own
    request log); stops them when the test ends."""
    root = tmp_path / "www"
    root.mkdir()
    _image(root)
    servers = []

    def start(tls=None):
        s = WebServer(root, tls)
        servers.append(s)
        return s
    start.root = root
    yield start
    for s in servers:
        s.stop()


def hide_times(text):
    """libcurl's elapsed times, which differ from run to run."""
    text = re.sub(r"after \d+ ms", "after N ms", text)
    return re.sub(r"after \d+ milliseconds", "after N milliseconds", text)


def hider(ports):
    """A function that replaces each port of `ports` (port: name) in a text by its name."""
    def hide(text):
        for port, name in ports.items():
            text = text.replace(str(port), name)
        return text
    return hide


def open_sequence(url, dead_port):
    """Opens as qemu-storage-daemon's users make them, good and bad."""
    add = lambda **a: ("blockdev-add", {"read-only": True, **a})  # noqa: E731
    http = lambda name, path, **a: add(driver="http", **{"node-name": name},  # noqa: E731
                                       url=url(path), **a)
    return [
        ("blockdev-add", {"driver": "http", "node-name": "w", "url": url("d.raw")}),
        ("blockdev-add", {"driver": "http", "node-name": "a", "url": url("d.raw"),
                          "auto-read-only": True}),
        http("b", "d.raw", readahead=1000),
        http("b", "d.raw", readahead=-512),
        http("b", "d.raw", timeout=10001),
        http("b", "d.raw", timeout=-1),
        http("b", "d.raw", cookie="a=b", **{"cookie-secret": "pw"}),
        http("b", "d.raw", **{"cookie-secret": "nope"}),
        http("b", "d.raw", **{"password-secret": "nope"}),
        http("b", "d.raw", **{"proxy-password-secret": "nope"}),
        http("b", "nothere.raw"),
        http("b", "norange/d.raw"),
        http("b", "auth/d.raw"),
        http("b", "cookie/d.raw"),
        add(driver="https", **{"node-name": "b"}, url=url("d.raw")),
        add(driver="http", **{"node-name": "b"}, url="HTTP://127.0.0.1/d.raw"),
        add(driver="http", **{"node-name": "b"}, url=f"http://127.0.0.1:{dead_port}/d.raw"),
        add(driver="http", **{"node-name": "b"}, url="http://nosuchhost.invalid/d.raw"),
        add(driver="http", **{"node-name": "b"}),
        add(driver="http", **{"node-name": "b"}, url=url("d.raw"), sslverify=False),
        http("r", "redir/d.raw"),
        http("u", "auth/d.raw", username="user", **{"password-secret": "pw"}),
        add(driver="http", **{"node-name": "v"},
            url=url("auth/d.raw").replace("http://", "http://user:pass@")),
        http("c", "cookie/d.raw", **{"cookie-secret": "cookie"}),
        http("k", "chunked/d.raw", readahead=0, timeout=0),
        http("z", "http10/d.raw#fragment", readahead=1 << 20),
        ("query-named-block-nodes", {"flat": True}),
        ("query-block", {}),
        ("blockdev-del", {"node-name": "a"}),
        ("blockdev-del", {"node-name": "u"}),
    ]


def dead_port():
    """A port nothing listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


SECRETS = ["--object", "secret,id=pw,data=pass", "--object", "secret,id=cookie,data=k=v"]


def test_opening_matches_qsd(qsd, ferrite, site):
    """Replies, errors and queries as qsd gives them, and the same requests to the server
    (methods, paths, credentials, cookies), command by command."""
    port = dead_port()
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        web, other = site(), site()
        d = start(SECRETS)
        # A redirection to another server: the cookie follows, the credentials do not.
        away = ("blockdev-add", {"driver": "http", "node-name": "y", "read-only": True,
                                 "url": web.url(f"away/{other.port}/d.raw"), "cookie": "k=v",
                                 "username": "u", "password-secret": "pw"})
        seq = open_sequence(web.url, port) + [away]
        text = [hide_times(r) for r in replies(d, seq)]
        hide = hider({str(web.port): "PORT", str(other.port): "OTHER"})
        got[name] = ([hide(t) for t in text],
                     [tuple(hide(str(f)) for f in e) for e in web.log + other.log])
    assert got["ferrite"][0] == got["qsd"][0]
    assert got["ferrite"][1] == got["qsd"][1]


def nbd_uri(d):
    return f"nbd+unix:///e?socket={d.workdir}/nbd.sock"


def serve(d, node, c=None):
    """Exports `node` of daemon `d` over NBD as `e` (through the monitor connection `c`, or
    a new one)."""
    c = c or d.connect()
    c.cmd("nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": f"{d.workdir}/nbd.sock"}}})
    assert c.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": node,
                                      "name": "e"}) == {"return": {}}
    return c


def export(d, node_args):
    """A read-only node `h` of `node_args`, exported over NBD."""
    r = d.connect().cmd("blockdev-add", {"read-only": True, "node-name": "h", **node_args})
    assert r == {"return": {}}, r
    return serve(d, "h")


def copied_whole(name, run, path):
    """What `run` (which starts a daemon, exports a node and returns the daemon and what it
    saw) saw, once the export, copied whole, held the bytes of `path`. qsd's curl driver
    now and then never finishes a reply it has all of (about one run in 30 here, a chunked
    reply or a TLS session): its side runs again after 60 s, up to three times; ferrite's
    gets no second chance."""
    for attempt in range(1, 4):
        d, seen = run()
        try:
            assert_copy_is(d, path, timeout=60)
            return seen
        except subprocess.TimeoutExpired:
            if name != "qsd" or attempt == 3:
                raise
            print(f"qemu-storage-daemon hung copying {path}; its side runs again")
            d.stop()


def assert_copy_is(d, path, timeout=None):
    """The NBD export of `d`, copied whole by qemu-img, holds the bytes of the file `path`."""
    copy = d.workdir / "copy.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(d), copy],
                   check=True, timeout=timeout)
    assert_same_image(path, copy)


READS = ["read 0 4k", "read 4k 4k", "read 300k 64k", "read 1M 1M", "read 4190208 4096",
         "read 1M 4k", "read 2M 1536k"]


def qemu_io(uri, *cmds):
    args = ["qemu-io", "-r", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [uri], capture_output=True, text=True)
    return re.sub(r"\d+ ops; .*", "", r.stdout + r.stderr)


@pytest.mark.parametrize("path,opts", [
    ("d.raw", {}),
    ("d.raw", {"readahead": 0}),
    ("redir/d.raw", {"readahead": 1 << 20}),
    ("chunked/d.raw", {}),
    ("http10/d.raw", {}),
    ("auth/d.raw", {"username": "user", "password-secret": "pw"}),
])
def test_reads_match_qsd(qsd, ferrite, site, path, opts):
    """Reads through an NBD export of the node: the same bytes, and ranged requests as
    qsd makes them (the read and what is read ahead)."""
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        def run():
            web = site()
            d = start(SECRETS)
            export(d, {"driver": "http", "url": web.url(path), **opts})
            return d, (qemu_io(nbd_uri(d), *READS), web)
        out, web = copied_whole(name, run, site.root / "d.raw")
        got[name] = (out, [(m, p, r) for m, p, r, *_ in web.log])
    assert "failed" not in got["ferrite"][0]
    assert got["ferrite"][0] == got["qsd"][0]
    # Each of ferrite's requests is one qsd makes too (the read and its read-ahead), and
    # there are no more of them: ferrite keeps eight windows received where QEMU reuses
    # one buffer per transfer slot, so it sometimes asks for less.
    ours, theirs = got["ferrite"][1], got["qsd"][1]
    assert [r for r in ours if r not in theirs] == []
    assert len(ours) <= len(theirs)


def test_a_lost_server_fails_reads_as_in_qsd(qsd, ferrite, site):
    """A read the server no longer answers fails with EIO, reported on standard error in
    libcurl's words; what was received before is still served."""
    out = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        web = site()
        d = start()
        export(d, {"driver": "http", "url": web.url("d.raw")})
        first = qemu_io(nbd_uri(d), "read 0 4k")
        web.stop()
        later = qemu_io(nbd_uri(d), "read 8k 4k", "read 3M 4k")
        d.stop()
        err = d.stderr_path.read_text()
        curl = [line.split(": ", 1)[1] for line in err.splitlines() if ": curl: " in line]
        out[name] = (first, later, hide_times(curl[0]).replace(str(web.port), "PORT"))
    assert "read 4096/4096 bytes at offset 8192" in out["ferrite"][1]
    assert "read failed: Input/output error" in out["ferrite"][1]
    assert out["ferrite"] == out["qsd"]


def test_a_reply_cut_short_fails_the_read(qsd, ferrite, site):
    """A ranged reply that ends before the bytes a read needs fails the read (EIO), as in
    qsd. (A read whose bytes did arrive succeeds in ferrite: it does not wait for the rest
    of the transfer, as QEMU does.)"""
    out = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        web = site()
        d = start()
        export(d, {"driver": "http", "url": web.url("short/d.raw")})
        out[name] = qemu_io(nbd_uri(d), "read 0 1M")
        d.stop()
        err = d.stderr_path.read_text()
        assert "curl: transfer closed with 655360 bytes remaining to read" in err, err
    assert "Input/output error" in out["ferrite"]
    assert out["ferrite"] == out["qsd"]


class Silent:
    """A server that takes connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_timeouts_and_redirect_loops(qsd, ferrite, site):
    """`timeout` bounds each whole transfer, in libcurl's words. A redirection loop ends
    after 30 redirections (libcurl 7.88 under qsd counts until the heads it collected
    exceed 300 KiB)."""
    silent = Silent()
    web = site()
    try:
        seq = [("blockdev-add", {"driver": "http", "node-name": "t", "read-only": True,
                                 "url": f"http://127.0.0.1:{silent.port}/d.raw",
                                 "timeout": 1})]
        a = [hide_times(r) for r in replies(qsd(), seq)]
        b = [hide_times(r) for r in replies(ferrite(), seq)]
        assert b == a
        assert "Operation timed out after N milliseconds with 0 bytes received" in b[0]
        loop = ferrite().connect().cmd("blockdev-add", {
            "driver": "http", "node-name": "l", "read-only": True, "url": web.url("loop/x")})
        assert loop["error"]["desc"] == \
            "CURL: Error opening file: Maximum (30) redirects followed"
    finally:
        silent.close()


@pytest.fixture(scope="module")
def web_pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and localhost, and one for another name."""
    if shutil.which("certtool") is None:
        pytest.skip("certtool (gnutls-bin) makes the test certificates")
    d = tmp_path_factory.mktemp("webpki")
    key = d / "key.pem"
    certtool("--generate-privkey", "--key-type=rsa", "--bits=2048", "--outfile", key)
    ca = make_ca(d, key, "webca")
    make_cert(d, key, ca, d / "server.pem",
              "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\n"
              "tls_www_server\nencryption_key\nsigning_key\n")
    make_cert(d, key, ca, d / "other.pem",
              "cn = other.example\ndns_name = other.example\n"
              "tls_www_server\nencryption_key\nsigning_key\n")
    return {"ca": ca, "key": key, "server": d / "server.pem", "other": d / "other.pem"}


def test_https_matches_qsd(qsd, ferrite, site, web_pki):
    """An untrusted certificate is refused in the same words; with `sslverify=off` the
    same bytes are read; a plain server refuses the handshake in the same words."""
    plain = site()
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        web = site((web_pki["server"], web_pki["key"]))
        seq = [
            ("blockdev-add", {"driver": "https", "node-name": "s", "read-only": True,
                              "url": web.url("d.raw")}),
            ("blockdev-add", {"driver": "https", "node-name": "p", "read-only": True,
                              "url": plain.url("d.raw").replace("http:", "https:"),
                              "sslverify": False}),
            ("blockdev-add", {"driver": "https", "node-name": "o", "read-only": True,
                              "url": web.url("d.raw"), "sslverify": False}),
            ("query-named-block-nodes", {"flat": True}),
        ]
        def run():
            d = start()
            text = [r.replace(str(web.port), "PORT") for r in replies(d, seq)]
            serve(d, "o")
            return d, text
        got[name] = copied_whole(name, run, site.root / "d.raw")
    assert got["ferrite"] == got["qsd"]
    assert "server certificate verification failed" in got["ferrite"][0]


def test_https_checks_the_certificate_against_the_trusted_cas(ferrite, site, web_pki):
    """ferrite alone (qsd's GnuTLS reads the system's store only): with the CA trusted
    through SSL_CERT_FILE, a server that proves its name opens and one with another
    name is refused in libcurl's words."""
    good = site((web_pki["server"], web_pki["key"]))
    other = site((web_pki["other"], web_pki["key"]))
    os.environ["SSL_CERT_FILE"] = str(web_pki["ca"])
    try:
        d = ferrite()
    finally:
        del os.environ["SSL_CERT_FILE"]
    c = d.connect()
    add = lambda n, u: c.cmd("blockdev-add", {"driver": "https", "node-name": n,  # noqa
                                              "read-only": True, "url": u})
    assert add("ip", good.url("d.raw")) == {"return": {}}
    assert add("name", good.url("d.raw").replace("127.0.0.1", "localhost")) == {"return": {}}
    refused = add("other", other.url("d.raw").replace("127.0.0.1", "localhost"))
    assert refused["error"]["desc"] == (
        "CURL: Error opening file: SSL: certificate subject name (other.example) does not "
        "match target host name 'localhost'")
    info = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    assert {n["node-name"]: n["image"]["virtual-size"] for n in info} == \
        {"ip": SIZE, "name": SIZE}


def test_concurrent_readers_get_their_bytes(ferrite, site):
    """Sixty-four reads sent at once, overlapping and not, through eight transfers at most:
    every reader gets its own bytes (checked against the file), whatever order the
    replies come in."""
    web = site()
    d = ferrite()
    export(d, {"driver": "http", "url": web.url("d.raw"), "readahead": 65536})
    data = (site.root / "d.raw").read_bytes()
    c = nc.Nbd(f"{d.workdir}/nbd.sock")
    c.go("e")
    length = 100000
    asked = {}
    for i in range(64):
        off = (i * 389 * 1024) % (SIZE - length)
        asked[c.request(nc.CMD_READ, off, length)] = off
    for _ in asked:
        magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
        assert (magic, err) == (nc.SIMPLE_MAGIC, 0)
        off = asked[cookie]
        assert c.recv(length) == data[off:off + length], off
    c.close()
    assert [m for m, *_ in web.log].count("GET") <= 64


def test_ferrite_system_opens_web_names(site):
    """`-drive file=http://...` opens the web node by its URL, as qemu-system does."""
    from test_system import SYSTEM as system
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")
    web = site()
    out = {}
    for prog in ("qemu-system-x86_64", system):
        r = subprocess.run(
            [prog, "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-machine",
             "none", "-drive", f"file={web.url('d.raw')},format=raw,if=none,id=d,"
             "readonly=on", "-qmp", "stdio"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n'
                  '{"execute":"quit"}\n',
            capture_output=True, text=True, timeout=60)
        lines = r.stdout.splitlines()
        info = json.loads(lines[2])["return"][0]
        out[prog] = (info["inserted"]["drv"], info["inserted"]["image"]["filename"],
                     info["inserted"]["image"]["virtual-size"], info["inserted"]["ro"])
    assert out[system] == out["qemu-system-x86_64"]
    assert out[system][0] == "raw"


def proxied_replies(start, site, web_pki):
    """Three daemons of `start` behind the proxies the environment names (an open one, one
    that wants credentials, none): the daemon whose node `f` (https through the second
    proxy's tunnel) is exported, and its replies with the sites and proxies."""
    web = site()
    tls = site((web_pki["server"], web_pki["key"]))
    open_proxy, closed_proxy = Proxy(), Proxy(auth="pu:pp")
    add = lambda n, u, **a: ("blockdev-add", {  # noqa: E731
        "driver": u.split(":")[0], "node-name": n, "read-only": True, "url": u, **a})
    seq = [
        add("a", web.url("d.raw")),
        add("b", tls.url("d.raw"), sslverify=False),
        ("query-named-block-nodes", {"flat": True}),
    ]
    seq_closed = [
        add("c", web.url("d.raw")),
        add("d", tls.url("d.raw"), sslverify=False),
        add("e", web.url("d.raw"), **{"proxy-username": "pu",
                                      "proxy-password-secret": "ppw"}),
        add("f", tls.url("d.raw"), sslverify=False,
            **{"proxy-username": "pu", "proxy-password-secret": "ppw"}),
        add("g", web.url("auth/d.raw"), username="user",
            **{"password-secret": "pw", "proxy-username": "pu",
               "proxy-password-secret": "ppw"}),
    ]
    secrets = SECRETS + ["--object", "secret,id=ppw,data=pp"]
    saved = dict(os.environ)
    try:
        os.environ["http_proxy"] = f"http://127.0.0.1:{open_proxy.port}"
        os.environ["https_proxy"] = f"127.0.0.1:{open_proxy.port}"
        d1 = start(secrets)
        os.environ["http_proxy"] = f"http://127.0.0.1:{closed_proxy.port}"
        os.environ["HTTPS_PROXY"] = f"http://127.0.0.1:{closed_proxy.port}"
        os.environ.pop("https_proxy")
        d2 = start(secrets)
        os.environ["no_proxy"] = "localhost,127.0.0.1"
        d3 = start(secrets)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = replies(d1, seq) + replies(d2, seq_closed)
    text += replies(d3, [add("h", web.url("d.raw"))])
    serve(d2, "f")
    return d2, (text, web, tls, open_proxy, closed_proxy)


def test_proxies_as_qsd_uses_them(qsd, ferrite, site, web_pki):
    """`http_proxy`/`https_proxy` as libcurl reads them: an `http` URL asked of the proxy
    whole, an `https` one through a `CONNECT` tunnel; `proxy-username` and
    `proxy-password-secret` for a proxy that wants credentials, in the same words when it
    refuses; `no_proxy` goes around it. The same replies, the same requests to the proxy,
    the same bytes read."""
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        text, web, tls, open_proxy, closed_proxy = copied_whole(
            name, lambda: proxied_replies(start, site, web_pki), site.root / "d.raw")
        hide = hider({str(web.port): "WEB", str(tls.port): "TLS"})
        got[name] = ([hide(t) for t in text],
                     [tuple(hide(str(f)) for f in e) for e in open_proxy.log],
                     [tuple(hide(str(f)) for f in e) for e in closed_proxy.log])
        open_proxy.stop()
        closed_proxy.stop()
    assert got["ferrite"][0] == got["qsd"][0]
    assert got["ferrite"][1] == got["qsd"][1]
    # The GETs of qemu-img's reads run side by side: compare them as a set.
    assert sorted(set(got["ferrite"][2])) == sorted(set(got["qsd"][2]))
    assert "The requested URL returned error: 407" in got["ferrite"][0][4]


def test_ftp_matches_qsd(qsd, ferrite, site, web_pki):
    """`ftp` (through PASV where a server has no EPSV) and `ftps` (implicit TLS): the same
    replies and errors (login refused, no such file or directory, an untrusted
    certificate), the same commands in the same order on the server, the same bytes read
    through NBD."""
    got = {}
    for name, start in (("qsd", qsd), ("ferrite", ferrite)):
        anon = FtpServer(site.root, epsv=False)
        private = FtpServer(site.root, user="user:pass")
        tls = FtpServer(site.root, tls=(web_pki["server"], web_pki["key"]))
        add = lambda n, u, **a: ("blockdev-add", {  # noqa: E731
            "driver": u.split(":")[0], "node-name": n, "read-only": True, "url": u, **a})
        seq = [
            add("a", anon.url("d.raw")),
            add("b", private.url("d.raw")),
            add("b", private.url("d.raw"), username="user", **{"password-secret": "nope"}),
            add("b", private.url("d.raw"), username="user", **{"password-secret": "cookie"}),
            add("b", private.url("nothere.raw").replace("//", "//user:pass@")),
            add("b", private.url("sub/d.raw").replace("//", "//user:pass@")),
            add("p", private.url("d.raw"), username="user", **{"password-secret": "pw"}),
            add("t", tls.url("d.raw")),
            add("t", tls.url("d.raw"), sslverify=False),
            add("b", tls.url("d.raw").replace("ftps:", "ftp:"), timeout=1),
            ("query-named-block-nodes", {"flat": True}),
        ]
        d = start(SECRETS)
        text = replies(d, seq)
        c = serve(d, "t")
        io = qemu_io(nbd_uri(d), "read 0 4k", "read 1M 64k", "read 4190208 4096")
        # ferrite answers a read once its bytes are in, and ends the session after.
        time.sleep(1)
        sequential = len(tls.log)
        try:
            assert_copy_is(d, site.root / "d.raw")
        except subprocess.CalledProcessError:
            # Under load, qsd's libcurl has been seen to stall for good on one session
            # of this Python server after EPSV (its read timed out with 0 bytes): the
            # oracle's copy goes once more. ferrite's does not.
            if name != "qsd":
                raise
            assert_copy_is(d, site.root / "d.raw")
        # Through PASV: the server without EPSV.
        export_del(c.cmd, "e")
        wait_for(lambda: c.cmd("query-block-exports")["return"] == [], what="export gone")
        c.cmd("nbd-server-stop")
        serve(d, "a", c)
        io += qemu_io(nbd_uri(d), "read 2M 64k")
        time.sleep(1)
        anon_sequential = len(anon.log)
        assert_copy_is(d, site.root / "d.raw")
        hide = hider({str(anon.port): "ANON", str(private.port): "PRIV", str(tls.port): "TLS"})
        got[name] = ([hide(hide_times(t)) for t in text], io,
                     sorted(anon.log[:anon_sequential]), private.log,
                     tls.log[:sequential])
        for s in (anon, private, tls):
            s.stop()
    for i, what in enumerate(("replies", "reads", "anonymous log", "private log")):
        assert got["ferrite"][i] == got["qsd"][i], what
    # Up to the end of qemu-io's reads (one after the other; a session's last commands
    # may come after the next one's first).
    assert sorted(got["ferrite"][4]) == sorted(got["qsd"][4])
    assert "read 4096/4096 bytes at offset 4190208" in got["ferrite"][1]


def test_a_kept_connection_the_server_closed_is_made_again(ferrite, site):
    """A server that closes each connection after its reply without saying so: the next
    request on the kept connection finds it closed, and goes again on a new one; no read
    fails and nothing is reported. (ferrite alone: qsd 10.0.2 hung for good in the http
    bench once nginx had closed kept-alive connections.)"""
    web = site()
    d = ferrite()
    export(d, {"driver": "http", "url": web.url("drop/d.raw"), "readahead": 0})
    out = qemu_io(nbd_uri(d), "read 0 4k", "read 2M 4k", "read 3M 64k")
    assert "failed" not in out, out
    assert out.count("read ") == 3
    assert_copy_is(d, site.root / "d.raw")
    gets = [r for m, p, r, *_ in web.log if m == "GET"]
    assert {"bytes=0-4095", "bytes=2097152-2101247", "bytes=3145728-3211263"} <= set(gets)
    d.stop()
    assert "curl:" not in d.stderr_path.read_text()
