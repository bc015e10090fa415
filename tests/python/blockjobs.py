"""What the block job tests share: images, nodes, exports and waits."""
import json
import os
import time
import subprocess

import pytest

from conftest import wait_for


def run(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check,
                          timeout=300)


def qcow2(path, size="8M", *extra):
    run("qemu-img", "create", "-q", "-f", "qcow2", *extra, path, size)


def add(q, name, path, **extra):
    r = q.cmd("blockdev-add", dict({"driver": "qcow2", "node-name": name,
                                    "file": {"driver": "file", "filename": str(path)}}, **extra))
    assert r == {"return": {}}, r


def source_and_target(d, size, data):
    """In daemon `d`'s directory: src.qcow2 of `size` with `data` written (a qemu-io write's
    arguments) and an empty tgt.qcow2 as big; a connection with src added as `src`."""
    w = d.workdir
    qcow2(w / "src.qcow2", size)
    run("qemu-io", "-c", f"write {data}", w / "src.qcow2")
    qcow2(w / "tgt.qcow2", size)
    q = d.connect()
    add(q, "src", w / "src.qcow2")
    return q


def export(q, d, node, name, writable):
    sock = str(d.workdir / "nbd.sock")
    if not os.path.exists(sock):
        assert q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
            == {"return": {}}
    r = q.cmd("block-export-add", {"type": "nbd", "id": name, "node-name": node,
                                   "name": name, "writable": writable})
    assert r == {"return": {}}, r
    return f"nbd+unix:///{name}?socket={sock}"


def qemu_io(uri, *ops, read_only=False):
    args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else [])
    for op in ops:
        args += ["-c", op]
    r = run(*args, uri)
    assert "failed" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r.stdout


def export_del(cmd, name):
    """`block-export-del` of an export whose last client has just exited: the daemon may
    not have seen the connection end yet ("still in use"), so it is asked again until it
    has (both programs; on a loaded machine either can lag)."""
    deadline = time.monotonic() + 10
    while True:
        r = cmd("block-export-del", {"id": name})
        if "still in use" not in json.dumps(r) or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def wait_job_gone(q, job):
    wait_for(lambda: all(j["device"] != job for j in q.cmd("query-block-jobs")["return"]),
             timeout=60, what=f"job {job} to end")


def small_fs(path, size):
    """A tmpfs of `size` at `path`, or a skip when this machine cannot mount one."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for ENOSPC ({r.stderr.strip()})")


def full_source_and_small_target(d, mounts):
    """A QMP connection to `d` with `src` (8 MiB written) and `tgt` (8 MiB, on a 3 MiB file
    system, added to `mounts` for the caller to unmount)."""
    src = d.workdir / "src.qcow2"
    qcow2(src, "8M")
    run("qemu-io", "-c", "write -P 0x22 0 8M", src)
    fs = d.workdir / "fs"
    small_fs(fs, "3M")
    mounts.append(fs)
    qcow2(fs / "tgt.qcow2", "8M")
    q = d.connect()
    add(q, "src", src)
    add(q, "tgt", fs / "tgt.qcow2")
    return q
