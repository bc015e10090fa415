"""QMP over TLS: a socket chardev with `tls-creds` (and `tls-authz`) under a monitor, and the
checks of those options, against qemu-storage-daemon. The client is Python's own TLS
(OpenSSL), so neither side's library checks itself."""
import json
import socket
import ssl

import pytest

from conftest import assert_same_transcript, wait_for
from test_nbd_tls import creds, pki  # noqa: F401 (pki is a fixture)

pytestmark = pytest.mark.skipif(
    __import__("shutil").which("certtool") is None,
    reason="certtool (gnutls-bin) makes the test certificates")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_monitor_args(pki, port, authz=None):
    args = ["--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"]
    opts = f"socket,id=tm,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0"
    if authz:
        args += ["--object", authz]
        opts += ",tls-authz=authz0"
    return args + ["--chardev", opts, "--monitor", "chardev=tm"]


def tls_client(pki, port, cred="client1", timeout=10):
    """A QMP session over TLS as `cred`; returns (socket, greeting) or the failure's kind."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["server"] / "ca-cert.pem")
    d = pki[cred]
    if (d / "client-cert.pem").exists():
        ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        greeting = read_msg(s)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        raw.close()
        return None, type(e).__name__ if not isinstance(e, ssl.SSLError) else "SSLError"
    return s, greeting


def read_msg(s):
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def command(s, name, args=None):
    msg = {"execute": name}
    if args is not None:
        msg["arguments"] = args
    s.sendall(json.dumps(msg).encode() + b"\n")
    while True:
        m = read_msg(s)
        if "event" not in m:
            return m


def session_transcript(pki, port):
    """A full session, a client without a certificate, one of a foreign CA's server
    (untrusted: the handshake is refused), then a good client again."""
    out = []
    s, greeting = tls_client(pki, port)
    out.append(sorted(greeting["QMP"]))
    out.append(command(s, "qmp_capabilities"))
    out.append(command(s, "query-version")["return"]["qemu"]["major"])
    r = command(s, "query-chardev")["return"]
    out.append([c["label"] for c in r])
    s.close()
    for cred in ("anonymous",):
        s, what = tls_client(pki, port, cred)
        if s is not None:
            # The refusal may come only once the server has judged the client.
            try:
                command(s, "qmp_capabilities")
                what = "served"
            except (ssl.SSLError, ConnectionError, OSError):
                what = "dropped"
            s.close()
        out.append((cred, "refused" if what != "served" else what))
    s, greeting = tls_client(pki, port)
    out.append(command(s, "qmp_capabilities"))
    s.close()
    return out


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def started(start, pki, authz=None):
    """A daemon with a TLS monitor on a free TCP port; returns the port."""
    port = free_port()
    start(tls_monitor_args(pki, port, authz))
    wait_for(lambda: _listening(port), what="TLS monitor")
    return port


def test_qmp_monitor_over_tls_matches_qsd(qsd, ferrite, pki):
    results = [session_transcript(pki, started(start, pki)) for start in (qsd, ferrite)]
    assert_same_transcript(*results)
    assert results[1][1] == {"return": {}}


@pytest.mark.parametrize("who,served", [("client1", False), ("client2", True)])
def test_tls_authz_on_a_monitor_matches_qsd(qsd, ferrite, pki, who, served):
    """authz-list denying client 1 by its name: its session is cut off, client 2's runs."""
    authz = ("authz-list,id=authz0,policy=allow,"
             "rules.0.match=*Test client 1*,rules.0.policy=deny,rules.0.format=glob")
    results = []
    for start in (qsd, ferrite):
        s, _ = tls_client(pki, started(start, pki, authz), who)
        if s is None:
            results.append("refused")
            continue
        try:
            results.append(command(s, "qmp_capabilities"))
        except (ssl.SSLError, ConnectionError, OSError):
            results.append("refused")
        s.close()
    assert results[0] == results[1]
    assert (results[1] == {"return": {}}) == served, results


def option_transcript(d, pki, tmp):
    c = d.connect()
    out = []
    c.cmd("object-add", creds("server", pki["server"], "srv"))
    c.cmd("object-add", creds("client", pki["client1"], "cli"))
    c.cmd("object-add", {"qom-type": "secret", "id": "sec", "data": "x"})
    unix = {"type": "unix", "data": {"path": str(d.workdir / "c.sock")}}
    inet = {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}}
    for i, (addr, extra) in enumerate([
            (unix, {"tls-creds": "srv"}),
            (inet, {"tls-authz": "az"}),
            (inet, {"tls-creds": "nosuch"}),
            (inet, {"tls-creds": "sec"}),
            (inet, {"tls-creds": "cli"}),
            (inet, {"tls-creds": "srv", "server": False}),
            (inet, {"tls-creds": "srv", "wait": False})]):
        r = c.cmd("chardev-add", {"id": f"c{i}", "backend": {
            "type": "socket", "data": {"addr": addr, **extra}}})
        if "return" in r:
            r = {"return": "ok"}
        out.append(json.loads(json.dumps(r).replace(str(tmp), "TMP")))
    c.close()
    return out


def test_tls_socket_options_are_checked_as_qsd_checks_them(both, pki, tmp_path):
    q, f = both()
    expected = option_transcript(q, pki, tmp_path)
    got = option_transcript(f, pki, tmp_path)
    assert_same_transcript(expected, got)


def test_a_monitor_connecting_out_over_tls_matches_qsd(qsd, ferrite, pki):
    """A client chardev (`server=off`) with client credentials: the daemon connects to a TLS
    server, checks its certificate names the host it dialled, and serves QMP over it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server"] / "server-cert.pem", pki["server"] / "server-key.pem")
    ctx.load_verify_locations(pki["server"] / "ca-cert.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    results = []
    for start in (qsd, ferrite):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(10)
            port = listener.getsockname()[1]
            start(["--object", f"tls-creds-x509,id=cli,dir={pki['client1']},endpoint=client",
                   "--chardev",
                   f"socket,id=out,host=127.0.0.1,port={port},server=off,tls-creds=cli",
                   "--monitor", "chardev=out"])
            raw, _ = listener.accept()
            with ctx.wrap_socket(raw, server_side=True) as s:
                s.settimeout(10)
                peer = dict(x[0] for x in s.getpeercert()["subject"])
                greeting = read_msg(s)
                results.append([peer["organizationName"], sorted(greeting["QMP"]),
                                command(s, "qmp_capabilities"),
                                [c["label"] for c in command(s, "query-chardev")["return"]]])
    assert_same_transcript(*results)
    assert results[1][2] == {"return": {}}
