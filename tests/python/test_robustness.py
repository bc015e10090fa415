"""Bad input of every kind at the QMP socket: errors come back and the daemon keeps serving."""
import json
import os
import random
import socket
import threading
import time

from conftest import RawQmp


def alive(d, *old):
    """The daemon still serves: closes the given connections (a socket chardev serves one
    client at a time) and runs a command on a fresh one."""
    for o in old:
        o.close()
    c = d.connect()
    assert c.cmd("query-version", id="ping")["return"]["qemu"]["major"] == 10
    c.close()


def test_garbage_bytes_get_errors_and_service_continues(ferrite):
    d = ferrite()
    c = d.connect()
    rng = random.Random(1234)
    for _ in range(50):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        c.transcript(junk)  # whatever the errors, the sentinel after them is answered
    alive(d, c)


def test_huge_string_is_refused_and_memory_stays_bounded(ferrite):
    d = ferrite()
    c = d.connect()
    before = d.rss_kib()
    # 80 MiB in one string: past the 64 MiB token limit.
    c.send(b'{"execute":"query-version","id":"')
    chunk = b"x" * (1 << 20)
    for _ in range(80):
        c.send(chunk)
    c.send(b'"}')
    lines = c.transcript(b"")
    assert any(b"JSON token size limit exceeded" in l for l in lines), lines[:3]
    after = d.rss_kib()
    assert after - before < 200 * 1024, (before, after)
    alive(d, c)


def test_deep_nesting_is_refused(ferrite):
    d = ferrite()
    c = d.connect()
    lines = c.transcript(b"[" * 100000)
    assert lines[0] == b'{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}'
    alive(d, c)
    c = d.connect()
    ok = b'{"execute":"query-version","id":' + b"[" * 1000 + b"]" * 1000 + b"}"
    lines = c.transcript(ok)
    assert lines[0].startswith(b'{"return"')


def test_invalid_utf8_is_an_error(ferrite):
    d = ferrite()
    c = d.connect()
    lines = c.transcript(b'{"execute":"query-version","id":"\xc3\x28"}')
    assert lines[0] == b'{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}'


def test_ten_thousand_pipelined_commands(ferrite):
    d = ferrite()
    c = d.connect()
    n = 10000
    payload = b"".join(b'{"execute":"query-version","id":%d}' % i for i in range(n))
    sender = threading.Thread(target=c.send, args=(payload,))
    sender.start()
    for i in range(n):
        msg = json.loads(c.recv_line())
        assert msg["id"] == i
    sender.join()
    alive(d, c)


def test_client_that_never_reads_does_not_block_others(ferrite, tmp_path):
    """A flood from a client that reads nothing fills its socket; other monitors serve on."""
    second = str(tmp_path / "second.sock")
    d = ferrite(["--chardev", f"socket,id=m2,path={second},server=on,wait=off",
                 "--monitor", "m2"])
    flooder = d.connect()
    flooder.s.setblocking(False)
    payload = b'{"execute":"query-qmp-schema"}' * 2000
    sent = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            sent += flooder.s.send(payload[sent % len(payload):])
        except BlockingIOError:
            break
    other = RawQmp(second)
    other.send(b'{"execute":"qmp_capabilities"}')
    assert other.recv_msgs(1) == [{"return": {}}]
    assert other.cmd("query-version")["return"]["qemu"]["minor"] == 0
    rss = d.rss_kib()
    assert rss < 300 * 1024, rss
    alive(d, flooder, other)


def test_disconnect_mid_stream_does_not_disturb(ferrite):
    d = ferrite()
    for _ in range(20):
        c = d.connect()
        c.send(b'{"execute":"query-qmp-schema"}{"execute":"query-version"}{"execu')
        c.s.shutdown(socket.SHUT_RDWR)
        c.close()
    alive(d)


def test_sessions_are_independent(ferrite, tmp_path):
    second = str(tmp_path / "second.sock")
    d = ferrite(["--chardev", f"socket,id=m2,path={second},server=on,wait=off",
                 "--monitor", "m2,pretty=on"])
    a = d.connect()
    b = RawQmp(second)
    # b is still negotiating while a is in command mode.
    assert a.cmd("query-version")["return"]["qemu"]["major"] == 10
    b.send(b'{"execute":"query-version"}')
    assert b.recv_msgs(1)[0]["error"]["class"] == "CommandNotFound"
    b.send(b'{"execute":"qmp_capabilities"}')
    assert b.recv_msgs(1) == [{"return": {}}]
    a.send(b"[[[")  # a's half-typed message is its own business
    assert b.cmd("query-version")["return"]["qemu"]["micro"] == 2
