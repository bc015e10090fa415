"""The Python library QEMU ships (qemu.qmp) drives ferrite unchanged."""
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from conftest import connect_unix


def run(coro):
    return asyncio.run(coro)


def test_qmpclient_session(ferrite):
    d = ferrite(["--object", "iothread,id=io0"])

    async def go():
        qmp = QMPClient("ferrite-test")
        await qmp.connect(d.sock)
        assert qmp.greeting._raw["QMP"]["version"]["qemu"] == {"major": 10, "minor": 0, "micro": 2}
        ver = await qmp.execute("query-version")
        assert ver["package"].startswith("ferrite")
        names = {c["name"] for c in await qmp.execute("query-commands")}
        assert {"qom-list", "chardev-add", "object-add", "quit"} <= names
        with pytest.raises(ExecuteError) as e:
            await qmp.execute("object-del", {"id": "nope"})
        assert e.value.error.error.class_ == "GenericError"
        assert e.value.error.error.desc == "object 'nope' not found"
        await qmp.execute("object-del", {"id": "io0"})
        schema = await qmp.execute("query-qmp-schema")
        assert any(e["name"] == "qom-get" for e in schema)
        await qmp.execute("quit")
        await qmp.disconnect()
    run(go())
    assert d.proc.wait(10) == 0


def test_qmpclient_many_sessions_in_turn(ferrite):
    d = ferrite()
    # The socket file appears at bind, a moment before listen: wait until it listens.
    connect_unix(d.sock).close()

    async def one(i):
        qmp = QMPClient(f"c{i}")
        await qmp.connect(d.sock)
        r = await qmp.execute("qom-list", {"path": "/"})
        await qmp.disconnect()
        return r

    async def go():
        for i in range(20):
            assert {p["name"] for p in await one(i)} == {"type", "objects", "chardevs", "backend"}
    run(go())


def test_qmp_shell(ferrite):
    d = ferrite()
    shell = Path(sys.executable).parent / "qmp-shell"
    p = subprocess.run([str(shell), d.sock],
                       input=b"query-version\nobject-add qom-type=iothread id=x poll-max-ns=5\n"
                             b"qom-get path=/objects/x property=poll-max-ns\n"
                             b"chardev-add id=r backend={\"type\":\"ringbuf\",\"data\":{}}\n"
                             b"ringbuf-write device=r data=hi\nringbuf-read device=r size=10\n",
                       capture_output=True, timeout=30)
    out = p.stdout.decode()
    assert '"major": 10' in out
    assert '"return": 5' in out
    assert '"return": "hi"' in out
