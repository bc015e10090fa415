"""The `copy-on-read` filter against qemu-storage-daemon: its option checks and node, and what
a read through it leaves in the image: the backing file's data copied into the top image,
also when a raw node sits between the filter and the image (iotest 216's stack), and only
down to `bottom` when it is given."""
import json
import subprocess

from blockjobs import export, export_del, qemu_io
from conftest import assert_same_transcript, recorder

MiB = 1 << 20


def images(w, layers):
    """A chain of qcow2 images (4 MiB), the first the base; layer i writes pattern i+1 at
    i MiB. Returns their file names."""
    names = [f"l{i}.qcow2" for i in range(layers)]
    for i, name in enumerate(names):
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if i:
            args += ["-b", names[i - 1], "-F", "qcow2"]
        subprocess.run(args + [str(w / name), "4M"], check=True, cwd=w)
        subprocess.run(["qemu-io", "-c", f"write -P {i + 1} {i}M 1M", str(w / name)],
                       check=True, capture_output=True)
    return names


def image_map(path):
    """What each range of the image holds itself (depth 0) and what it shows of others."""
    r = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True,
                       capture_output=True, text=True)
    return [(e["start"], e["length"], e["depth"], e["data"], e["zero"])
            for e in json.loads(r.stdout)]


def qcow2(name, backing=None):
    node = {"driver": "qcow2", "file": {"driver": "file", "filename": name}}
    if backing is not None:
        node["backing"] = backing
    return node


def transcript(d):
    w = d.workdir
    c = d.connect()
    out = []
    cmd = recorder(c, out)

    # The checks of `bottom`.
    names = images(w, 2)
    cmd("blockdev-add", {"node-name": "base", **qcow2(names[0])})
    cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "x", "bottom": "nosuch",
                         "file": qcow2(names[1], "base")})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "g",
                         "file": "base"})
    cmd("object-add", {"qom-type": "throttle-group", "id": "g"})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t", "throttle-group": "g",
                         "file": "base"})
    cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "x", "bottom": "t",
                         "file": qcow2(names[1], "base")})
    for n in ("t", "base"):
        cmd("blockdev-del", {"node-name": n})

    # A read through the filter copies the backing file's data up: directly over the
    # image, and through a raw node (iotest 216).
    for case, wrap in (("direct", lambda n: n), ("raw", lambda n: {"driver": "raw",
                                                                 "file": n})):
        names = images(w / ".", 2)
        cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "c",
                             "file": wrap(qcow2(names[1]))})
        nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append((case, [(n["drv"], n["ro"]) for n in nodes]))
        uri = export(c, d, "c", "c", False)
        qemu_io(uri, "read 0 4M", read_only=True)
        out.append(("block-export-del", export_del(c.cmd, "c")))
        c.wait_event("BLOCK_EXPORT_DELETED")
        cmd("blockdev-del", {"node-name": "c"})
        # The base's data is in the top image now: gone from the base, still read.
        subprocess.run(["qemu-io", "-c", "discard 0 4M", str(w / names[0])], check=True,
                       capture_output=True)
        r = subprocess.run(["qemu-io", "-c", "read -P 1 0 1M", "-c", "read -P 2 1M 1M",
                            str(w / names[1])], capture_output=True, text=True)
        out.append((case, "verified", "failed" not in r.stdout + r.stderr, r.stdout if "failed" in r.stdout else ""))
        # Where the copied data went (QEMU's NBD server skips reading what the chain
        # reports as zeroes through a raw node differently, so only the data counts).
        out.append((case, [e for e in image_map(w / names[1]) if e[3]]))

    # With `bottom`, only the layers above it are copied up.
    names = images(w, 3)
    cmd("blockdev-add", {"node-name": "base", **qcow2(names[0])})
    cmd("blockdev-add", {"node-name": "mid", **qcow2(names[1], "base")})
    cmd("blockdev-add", {"driver": "copy-on-read", "node-name": "c", "bottom": "mid",
                         "file": qcow2(names[2], "mid")})
    uri = export(c, d, "c", "c", False)
    qemu_io(uri, "read 0 4M", read_only=True)
    out.append(("block-export-del", export_del(c.cmd, "c")))
    c.wait_event("BLOCK_EXPORT_DELETED")
    for n in ("c", "mid", "base"):
        cmd("blockdev-del", {"node-name": n})
    out.append(("bottom", [e for e in image_map(w / names[2]) if e[2] == 0]))
    c.close()
    return out


def test_copy_on_read_matches_qsd(both):
    q, f = both()
    assert_same_transcript(transcript(q), transcript(f))
