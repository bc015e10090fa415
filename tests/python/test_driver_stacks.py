"""Stacks of drivers a user builds, against qemu-storage-daemon: throttle over qcow2 over a
host device, and a LUKS volume read through an NBD client from a remote server; the same
graph, the same data through an NBD export, and the images equal afterwards."""
import json
import re
import subprocess

import pytest

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder, wait_for

SECRET = "secret,id=s0,data=hunter2"


@pytest.fixture
def loop_devices(tmp_path):
    """Two loop devices (one per daemon) over 32 MiB files."""
    devs = []
    for i in range(2):
        backing = tmp_path / f"disk{i}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(backing), "32M"], check=True)
        r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"no loop device here: {r.stderr.strip()}")
        devs.append(r.stdout.strip())
    yield devs
    for dev in devs:
        subprocess.run(["losetup", "-d", dev], check=False)


def graph(c):
    g = c.cmd("x-debug-query-block-graph")["return"]
    names = {n["id"]: n["name"] for n in g["nodes"]}
    return sorted((names[e["parent"]], e["name"], names[e["child"]]) for e in g["edges"])


def io(uri, *ops):
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [uri], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln] + r.stderr.splitlines()


def throttle_qcow2_host_device(d, dev):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", dev, "16M"], check=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("object-add", {"qom-type": "throttle-group", "id": "tg",
                       "limits": {"bps-total": 64 << 20}})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "tg",
                         "file": {"driver": "qcow2", "node-name": "q",
                                  "file": {"driver": "host_device", "node-name": "h",
                                           "filename": dev}}})
    out.append(("graph", graph(c)))
    uri = export(c, d, "t", "t", True)
    out.append(("io", io(uri, "write -P 0x31 1M 2M", "write -z 4M 1M", "read -P 0x31 1M 2M",
                         "read -P 0 4M 1M")))
    c.close()
    d.stop()
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", dev], capture_output=True, text=True)
    out.append(("check", r.returncode))
    return out


def test_throttle_over_qcow2_over_a_host_device(both, loop_devices):
    q, f = both()
    runs = [throttle_qcow2_host_device(d, dev) for d, dev in zip((q, f), loop_devices)]
    assert_same_transcript(*runs)
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", *loop_devices],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def luks_over_nbd(d, tmp_path, name):
    img = tmp_path / f"{name}.luks"
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object", SECRET,
                    "-o", "key-secret=s0,iter-time=10", str(img), "16M"], check=True)
    sock = tmp_path / f"{name}-remote.sock"
    server = subprocess.Popen(["qemu-nbd", "-k", str(sock), "-f", "raw", "--shared=4",
                               str(img)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sock.exists(), what="qemu-nbd socket")
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "luks", "node-name": "l", "key-secret": "s0",
                             "file": {"driver": "nbd", "node-name": "n",
                                      "server": {"type": "unix", "path": str(sock)}}})
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(sock), "SOCK")
        nodes = json.loads(text)
        out.append(("nodes", sorted((n["node-name"], n["drv"], n["image"]["virtual-size"],
                                     n["encrypted"]) for n in nodes)))
        uri = export(c, d, "l", "l", True)
        out.append(("io", io(uri, "write -P 0x52 1M 1M", "write -P 0x53 3000 5000",
                             "read -P 0x52 1M 1M", "read -P 0x53 3000 5000")))
        c.close()
        d.stop()
    finally:
        server.kill()
        server.wait()
    r = subprocess.run(["qemu-io", "--object", SECRET, "--image-opts", "-c",
                        "read -P 0x52 1M 1M", "-c", "read -P 0x53 3000 5000",
                        f"driver=luks,key-secret=s0,file.filename={img}"],
                       capture_output=True, text=True)
    out.append(("read back", [ln for ln in r.stdout.splitlines() if " ops; " not in ln]))
    return out


def test_luks_over_an_nbd_client(both, tmp_path):
    q, f = both(["--object", SECRET])
    assert_same_transcript(luks_over_nbd(q, tmp_path, "q"), luks_over_nbd(f, tmp_path, "f"))


def filters_queried(d):
    """Every filter over a qcow2 image, and the test drivers: what query-named-block-nodes
    shows of each (a filter has no cluster size, dirty flag or allocated size of its own:
    its filtered child's are shown; blkdebug and blkverify, protocols in QEMU, show none)."""
    w = d.workdir
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "t.qcow2"), "1M"],
                   check=True)
    (w / "raw").write_bytes(b"\0" * 65536)
    (w / "log").write_bytes(b"")
    c = d.connect()
    out = []
    cmd = recorder(c, out)

    def qcow2():
        return {"driver": "qcow2",
                "file": {"driver": "file", "filename": "t.qcow2", "locking": "off"}}

    cmd("object-add", {"qom-type": "throttle-group", "id": "tg"})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "thr", "throttle-group": "tg",
                         "file": qcow2()})
    cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": qcow2()})
    cmd("blockdev-add", {"driver": "compress", "node-name": "cmp", "file": qcow2()})
    cmd("blockdev-add", {"driver": "preallocate", "node-name": "pre",
                         "file": {"driver": "file", "filename": "raw"}})
    cmd("blockdev-add", {"driver": "blklogwrites", "node-name": "blw", "file": qcow2(),
                         "log": {"driver": "file", "filename": "log"}})
    cmd("blockdev-add", {"driver": "blkdebug", "node-name": "dbg", "image": qcow2()})
    cmd("blockdev-add", {"driver": "blkverify", "node-name": "ver", "test": qcow2(),
                         "raw": {"driver": "file", "filename": "raw", "locking": "off"}})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    # Generated node names count differently in the two programs.
    text = re.sub(r"#block\d+", "#block", normalize(json.dumps(nodes)))
    out.append(("nodes", json.loads(text.replace(str(w), "W"))))
    c.close()
    d.stop()
    return out


def test_filters_show_their_filtered_childs_image_info_as_qsd(both):
    q, f = both()
    assert_same_transcript(filters_queried(q), filters_queried(f))
