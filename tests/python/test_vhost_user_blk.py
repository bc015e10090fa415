"""vhost-user-blk exports against qemu-storage-daemon, driven by the suite's own front end
(`tools/vhost-user-blk-client`, on rust-vmm's `vhost` crate): the same refusals, config space
and queues, the same answer to every kind of request, the same image afterwards; a front end
that leaves mid-I/O and comes back loses no acknowledged write; `vduse-blk`'s checks and its
refusal where the kernel has no VDUSE."""
import os
import subprocess

from conftest import ROOT, assert_same_image, assert_same_transcript, recorder, wait_for

CLIENT = os.environ.get("VHOST_CLIENT",
                        str(ROOT / "target" / "debug" / "vhost-user-blk-client"))

# Features qemu-storage-daemon's libvhost-user adds that ferrite does not offer:
# VIRTIO_F_NOTIFY_ON_EMPTY (24) and VHOST_F_LOG_ALL (26, dirty logging for migration).
LIBVHOST_USER_ONLY = (1 << 24) | (1 << 26)

REQUESTS = """\
get-id 0 20
get-id 0 8
write 8 4096 90
read 8 4096
read 0 512
read 131071 512
read 131072 512
read 131071 1024
read 8 100
write 7 512 1
write 131071 1024 3
flush
discard 16 8
discard-unmap 16 8
zeroes 8 8
zeroes-unmap 8 8
read 8 4096
zeroes 131000 100
zeroes 0 40000
discard 0 40000
type:99
type:2147483649
write 2048 65536 7
read 2048 65536
write 8 2048 5
write 12 2048 6
write 0 65536 9
read-scattered 8 4096
read-scattered 2047 65536
read-scattered 131070 1024
read-scattered 131071 1024
read 0 1048576
read-scattered 0 1048576
read-scattered 1 3
"""

def client(sock, *args, stdin=None, check=True):
    r = subprocess.run([CLIENT, str(sock), *args], input=stdin, capture_output=True,
                       text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r

def info(sock):
    out = {}
    for line in client(sock, "info").stdout.splitlines():
        k, v = line.split(" ", 1)
        out[k] = v
    out["features"] = hex(int(out["features"], 16) & ~LIBVHOST_USER_ONLY)
    # Protocol features differ by what each library implements (ferrite: CONFIG, MQ,
    # REPLY_ACK, CONFIGURE_MEM_SLOTS); checked separately.
    out.pop("protocol-features")
    return out

def transcript(d):
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "disk.raw"), "64M"],
                   check=True)
    c = d.connect()
    out = []

    cmd = recorder(c, out)

    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "disk.raw"})
    sock = str(w / "vu.sock")
    unix = {"type": "unix", "path": "vu.sock"}

    def export(**kw):
        return cmd("block-export-add", {"type": "vhost-user-blk", "node-name": "f", **kw})

    export(id="v", addr=unix, **{"num-queues": 0})
    export(id="v", addr=unix, **{"logical-block-size": 1000})
    export(id="v", addr=unix, **{"logical-block-size": 256})
    export(id="v", addr={"type": "inet", "host": "127.0.0.1", "port": "0"})
    export(id="v", addr={"type": "unix", "path": "no/such.sock"})
    for vd in ({"name": "v0", "num-queues": 0}, {"name": "v0", "queue-size": 3},
               {"name": "v0", "queue-size": 2048}, {"name": "v0", "logical-block-size": 100},
               {"name": "v0"}):
        cmd("block-export-add", {"type": "vduse-blk", "id": "d", "node-name": "f", **vd})
    export(id="v", addr=unix, writable=True, **{"num-queues": 2})
    cmd("query-block-exports", {})
    out.append(("info", info(sock)))
    out.append(("requests", client(sock, "run", stdin=REQUESTS).stdout.splitlines()))
    # The export outlives its front end: a second one connects and sees the data; it is
    # still connected when the export is removed in safe mode (QEMU allows that).
    fe = subprocess.Popen([CLIENT, sock, "run"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    fe.stdin.write("read 8 4096\n")
    fe.stdin.flush()
    out.append(("again", fe.stdout.readline()))
    cmd("block-export-del", {"id": "v"})
    fe.kill()
    fe.wait()
    out.append(("event", c.wait_event("BLOCK_EXPORT_DELETED")["data"]))
    out.append(("socket-after-del", os.path.exists(sock)))
    out.append(("connect-after-del", client(sock, "info", check=False).returncode != 0))

    export(id="r", addr=unix, **{"logical-block-size": 4096})
    out.append(("info-ro", info(sock)))
    out.append(("requests-ro", client(sock, "run", stdin="write 8 4096 1\nread 8 4096\n"
                                      "read 1 512\nzeroes 8 8\ndiscard 8 8\nflush\n")
                .stdout.splitlines()))
    c.close()
    d.stop()
    return out

def test_vhost_user_blk_matches_qsd(both):
    q, f = both()
    expected = transcript(q)
    got = transcript(f)
    assert_same_transcript(expected, got)
    assert_same_image(q.workdir / "disk.raw", f.workdir / "disk.raw")

def test_protocol_features_are_what_ferrite_implements(ferrite, tmp_path):
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    sock = tmp_path / "vu.sock"
    ferrite(["--blockdev", f"file,node-name=f,filename={img}",
             "--export", f"vhost-user-blk,id=v,node-name=f,addr.type=unix,addr.path={sock}"])
    wait_for(lambda: sock.exists(), what="socket")
    out = dict(line.split(" ", 1) for line in client(sock, "info").stdout.splitlines())
    # MQ, REPLY_ACK, CONFIG, CONFIGURE_MEM_SLOTS
    assert int(out["protocol-features"], 16) == (1 << 0) | (1 << 3) | (1 << 9) | (1 << 15)

def test_a_front_end_leaving_mid_io_loses_no_acknowledged_write(ferrite, tmp_path):
    """Writes acknowledged before the front end drops the connection (with more in flight)
    are there when the next front end reads; so is every write it did not wait for, once
    the daemon has answered it."""
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    sock = tmp_path / "vu.sock"
    d = ferrite(["--blockdev", f"file,node-name=f,filename={img}",
                 "--blockdev", "qcow2,node-name=q,file=f",
                 "--export", f"vhost-user-blk,id=v,node-name=q,writable=on,"
                             f"addr.type=unix,addr.path={sock}"])
    wait_for(lambda: sock.exists(), what="socket")
    for round_ in range(3):
        acked = "".join(f"write {round_ * 4096 + i * 128} 65536 {i + 1}\n" for i in range(16))
        inflight = "".join(f"submit-write {40000 + i * 128} 65536 {200 + i}\n"
                           for i in range(12))
        r = client(sock, "run", stdin=acked + inflight + "exit\n")
        assert r.stdout.count("status 0") == 16, r.stdout
        reads = "".join(f"read {round_ * 4096 + i * 128} 65536\n" for i in range(16))
        got = client(sock, "run", stdin=reads).stdout.splitlines()
        for i, line in enumerate(got):
            want = subprocess.run(
                ["python3", "-c", f"import hashlib;print(hashlib.sha256(bytes([{i + 1}])*65536)"
                                  ".hexdigest())"], capture_output=True, text=True).stdout.strip()
            assert line.endswith(f"status 0 used 65537 sha256 {want}"), line
    c = d.connect()
    assert c.cmd("query-block-exports")["return"][0]["id"] == "v"
    c.close()
    d.stop()
    r = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr

RESTART = """\
write 8 4096 1
stop
submit-write 16 4096 2
sleep 200
answered
start 1
wait
read 16 4096
read 8 4096
"""

def restart_transcript(d):
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(w / "disk.raw"), "64M"],
                   check=True)
    c = d.connect()
    c.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "disk.raw"})
    c.cmd("block-export-add", {"type": "vhost-user-blk", "id": "v", "node-name": "f",
                               "writable": True, "addr": {"type": "unix", "path": "vu.sock"}})
    out = client(w / "vu.sock", "run", stdin=RESTART).stdout.splitlines()
    c.close()
    d.stop()
    return out

def test_a_stopped_queue_starts_again_where_it_stopped_like_qsd(both):
    """A driver's reset: `GET_VRING_BASE` stops the queue (a request made meanwhile waits),
    and the queue set up again from that index, with a new kick eventfd, answers it."""
    q, f = both()
    expected = restart_transcript(q)
    assert "answered: 0" in expected
    assert_same_transcript(expected, restart_transcript(f))
    assert_same_image(q.workdir / "disk.raw", f.workdir / "disk.raw")

def test_a_disabled_queue_waits_until_enabled(ferrite, tmp_path):
    """vhost-user: a back end must not process a ring while it is disabled
    (`SET_VRING_ENABLE` 0). qemu-storage-daemon's libvhost-user serves it anyway; ferrite
    follows the specification."""
    img = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    sock = tmp_path / "vu.sock"
    ferrite(["--blockdev", f"file,node-name=f,filename={img}",
             "--export", f"vhost-user-blk,id=v,node-name=f,writable=on,"
                         f"addr.type=unix,addr.path={sock}"])
    wait_for(lambda: sock.exists(), what="socket")
    got = client(sock, "run", stdin="disable\nsubmit-write 8 4096 3\nsleep 300\nanswered\n"
                                    "enable\nwait\nread 8 4096\n").stdout.splitlines()
    assert got[2:5] == ["answered: 0", "enable: done", "wait: slot 1 status 0 used 1"], got
    assert got[5].startswith("read 8 4096: status 0 used 4097"), got
