"""qcow2: images QEMU writes read correctly in ferrite; random request sequences give the same
image content as qemu-storage-daemon gives its twin, and `qemu-img check` finds ferrite's
images clean; blockdev-create behaves as QEMU's; crashes leave at most leaks."""
import hashlib
import json
import re
import os
import random
import shutil
import signal
import subprocess
import time

import pytest

from conftest import FERRITE, QSD, Daemon, wait_for


def run(*cmd, check=True):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=check,
                          timeout=300)


def check_clean(img):
    r = run("qemu-img", "check", "--output=json", img, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def uri(sock, name="q"):
    return f"nbd+unix:///{name}?socket={sock}"


def export(binary, workdir, img, node_opts="", fmt="qcow2"):
    """A daemon exporting `img` (qcow2 over file) writable as NBD export `q`."""
    sock = str(workdir / "nbd.sock")
    d = Daemon(binary, workdir / "d", [
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--blockdev", f"driver={fmt},node-name=q,file=f0,discard=unmap{node_opts}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=q,writable=on"])
    wait_for(lambda: os.path.exists(sock), what="NBD socket")
    return d, sock


def random_ops(rng, size, n):
    ops = []
    for _ in range(n):
        kind = rng.choice(["write", "write", "write", "zero", "zero-unmap", "discard"])
        length = rng.choice([512, 4096, 65536, 3 * 65536 + 512, 1 << 20])
        off = rng.randrange(0, size - length, 512)
        if kind == "write":
            ops.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
        elif kind == "zero":
            ops.append(f"write -z {off} {length}")
        elif kind == "zero-unmap":
            ops.append(f"write -z -u {off} {length}")
        else:
            ops.append(f"discard {off} {length}")
    return ops


def qemu_io_nbd(sock, ops):
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    args.append(uri(sock))
    r = run(*args)
    assert "error" not in r.stdout.lower() + r.stderr.lower(), r.stdout + r.stderr


CONFIGS = [
    ("64k-v3", "cluster_size=65536"),
    ("512-v3", "cluster_size=512"),
    ("4k-v2", "cluster_size=4096,compat=0.10"),
    ("2M-v3", "cluster_size=2097152"),
    ("64k-ext-l2", "cluster_size=65536,extended_l2=on"),
    ("4k-refcount1", "cluster_size=4096,refcount_bits=1"),
    ("64k-refcount64", "refcount_bits=64"),
    ("64k-zstd", "compression_type=zstd"),
]


@pytest.mark.parametrize("name,opts", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("backing", [False, True], ids=["alone", "backed"])
def test_random_requests_match_qemu(tmp_path, name, opts, backing):
    size = 16 << 20
    rng = random.Random(f"{name}-{backing}")
    imgs = []
    for prog in ("qsd", "ferrite"):
        sub = tmp_path / prog
        sub.mkdir()
        img = sub / "top.qcow2"
        extra = []
        if backing:
            base = sub / "base.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, base, size)
            run("qemu-io", "-c", "write -P 0x5a 0 3M", "-c", "write -c -P 0x6b 4M 2M",
                "-c", "write -z 8M 1M", base)
            extra = ["-b", base.name, "-F", "qcow2"]
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, *extra, img, size)
        run("qemu-io", "-c", "write -P 0x33 1M 256k", "-c", "write -c -P 0x44 6M 2M", img)
        imgs.append((prog, sub, img))
    ops = random_ops(rng, size, 60)
    for prog, sub, img in imgs:
        d, sock = export(QSD if prog == "qsd" else FERRITE, sub, img)
        try:
            qemu_io_nbd(sock, ops)
        finally:
            d.stop()
    (_, _, theirs), (_, _, ours) = imgs
    r = run("qemu-img", "compare", theirs, ours, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    # Where ferrite allocates less than QEMU, on purpose, the maps differ: zeroes on a v2
    # image over a backing file that already reads as zeroes there (QEMU writes them as
    # data), and a zero request that starts or ends in part of a compressed cluster with
    # extended L2 (QEMU then writes the whole request as data).
    if not (backing and name in ("4k-v2", "64k-ext-l2")):
        assert guest_map(ours) == guest_map(theirs)
    check_clean(ours)


def test_images_qemu_writes_open_and_read_in_ferrite(tmp_path, ferrite):
    src = tmp_path / "src.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 64k",
        "-c", "write -P 0x33 7M 1M", src)
    made = {
        "compressed-zlib": ["convert", "-q", "-c", "-O", "qcow2", src],
        "compressed-zstd": ["convert", "-q", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src],
        "plain-512": ["convert", "-q", "-O", "qcow2", "-o", "cluster_size=512", src],
        "ext-l2": ["convert", "-q", "-O", "qcow2", "-o", "extended_l2=on", src],
        "v2": ["convert", "-q", "-O", "qcow2", "-o", "compat=0.10", src],
    }
    for name, cmd in made.items():
        img = tmp_path / f"{name}.qcow2"
        run("qemu-img", *cmd, img)
        if name == "v2":
            run("qemu-img", "snapshot", "-c", "snap1", img)
            run("qemu-io", "-c", "write -P 0x44 0 64k", img)
        sub = tmp_path / name
        sub.mkdir()
        d, sock = export(FERRITE, sub, img)
        try:
            r = run("qemu-img", "compare", "-U", "-F", "raw", img, uri(sock), check=False)
            assert r.returncode == 0, (name, r.stdout, r.stderr)
        finally:
            d.stop()


def test_writes_keep_snapshots_and_bitmaps(tmp_path):
    img = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-io", "-c", "write -P 0x11 0 1M", img)
    run("qemu-img", "snapshot", "-c", "before", img)
    run("qemu-img", "bitmap", "--add", img, "b0")
    run("qemu-img", "bitmap", "--add", "--disable", img, "b1")
    d, sock = export(FERRITE, tmp_path, img)
    try:
        qemu_io_nbd(sock, ["write -P 0x22 0 64k", "write -P 0x23 2M 64k", "discard 512k 64k"])
    finally:
        d.stop()
    check_clean(img)
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    bitmaps = {b["name"]: b["flags"] for b in info["format-specific"]["data"]["bitmaps"]}
    # Both were loaded, kept (the enabled one recording the writes) and stored back clean.
    assert bitmaps == {"b0": ["auto"], "b1": []}
    run("qemu-io", "-c", "read -P 0x22 0 64k", "-c", "read -P 0x23 2M 64k", img)
    # QEMU refuses to revert an image that has bitmaps.
    run("qemu-img", "bitmap", "--remove", img, "b0")
    run("qemu-img", "bitmap", "--remove", img, "b1")
    run("qemu-img", "snapshot", "-a", "before", img)
    r = run("qemu-io", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 2M 64k", img)
    assert "Pattern verification failed" not in r.stdout
    check_clean(img)


def test_resize_grows_and_shrinks(tmp_path, ferrite):
    img = tmp_path / "r.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
    run("qemu-io", "-c", "write -P 0x11 0 1M", img)
    d = ferrite(["--blockdev", f"driver=file,node-name=f0,filename={img}",
                 "--blockdev", "driver=qcow2,node-name=q,file=f0"])
    q = d.connect()
    for size in (64 << 20, 512 << 10, 2 << 20):
        r = q.cmd("block_resize", {"node-name": "q", "size": size})
        assert r == {"return": {}}, r
    nodes = q.cmd("query-named-block-nodes")["return"]
    assert [n["image"]["virtual-size"] for n in nodes if n["node-name"] == "q"] == [2 << 20]
    d.stop()
    check_clean(img)
    r = run("qemu-io", "-c", "read -P 0x11 0 512k", "-c", "read -P 0 512k 1536k", img)
    assert "Pattern verification failed" not in r.stdout


def test_bad_images_are_refused_with_qemus_text(tmp_path, ferrite):
    img = tmp_path / "bad.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    with open(img, "r+b") as f:
        f.seek(4)
        f.write((4).to_bytes(4, "big"))
    d = ferrite()
    q = d.connect()
    r = q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q",
                               "file": {"driver": "file", "filename": str(img)}})
    assert r["error"]["desc"] == "Unsupported qcow2 version 4"
    assert q.cmd("query-named-block-nodes")["return"] == []


def test_corruption_is_signalled_and_stops_writes(tmp_path, ferrite):
    img = tmp_path / "c.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
    run("qemu-io", "-c", "write -P 1 0 64k", img)
    # Point the first L2 entry at the refcount table.
    info = open(img, "rb").read()
    l1 = int.from_bytes(info[40:48], "big")
    l2 = int.from_bytes(info[l1:l1 + 8], "big") & 0x00fffffffffffe00
    with open(img, "r+b") as f:
        f.seek(l2)
        f.write((0x8000000000010000).to_bytes(8, "big"))
    d = ferrite(["--blockdev", f"driver=file,node-name=f0,filename={img}",
                 "--blockdev", "driver=qcow2,node-name=q,file=f0"])
    sock = str(tmp_path / "nbd.sock")
    q = d.connect()
    q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q", "writable": True})
    r = run("qemu-io", "-f", "raw", "-c", "write -P 2 0 4k", uri(sock), check=False)
    assert "error" in (r.stdout + r.stderr).lower()
    ev = q.wait_event("BLOCK_IMAGE_CORRUPTED")
    assert ev["data"] == {"device": "", "node-name": "q", "fatal": True, "offset": 65536,
                          "size": 4096,
                          "msg": "Preventing invalid write on metadata (overlaps with refcount table)"}
    d.stop()
    info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
    assert info["format-specific"]["data"]["corrupt"] is True


CREATE_CASES = [
    {"size": 64 << 20},
    {"size": 64 << 20, "version": "v2"},
    {"size": 1 << 30, "cluster-size": 512, "refcount-bits": 1},
    {"size": 64 << 20, "lazy-refcounts": True, "refcount-bits": 64},
    {"size": 64 << 20, "extended-l2": True, "compression-type": "zstd"},
    {"size": 64 << 20, "backing-file": "base.qcow2", "backing-fmt": "qcow2"},
    {"size": 4 << 20, "preallocation": "metadata"},
    {"size": 1000},
    {"size": 65536, "cluster-size": 1000},
    {"size": 65536, "version": "v2", "lazy-refcounts": True},
    {"size": 65536, "backing-fmt": "raw"},
    {"size": 4 << 20, "preallocation": "falloc"},
    {"size": 4 << 20, "preallocation": "full", "cluster-size": 4096},
    {"size": 4 << 20, "data-file": "DATA"},
    {"size": 4 << 20, "data-file": "DATA", "data-file-raw": True},
    {"size": 4 << 20, "data-file": "DATA", "preallocation": "full"},
    {"size": 65536, "data-file-raw": True},
    {"size": 65536, "data-file": "DATA", "version": "v2"},
]


def test_blockdev_create_matches_qemu(tmp_path):
    results = {}
    for prog, binary in (("qsd", QSD), ("ferrite", FERRITE)):
        sub = tmp_path / prog
        sub.mkdir()
        d = Daemon(binary, sub / "d")
        q = d.connect()
        out = []
        for i, case in enumerate(CREATE_CASES):
            img = sub / f"img{i}.qcow2"
            r = q.cmd("blockdev-create", {"job-id": f"f{i}", "options": {
                "driver": "file", "filename": str(img), "size": 0}})
            assert r == {"return": {}}, r
            q.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
            q.cmd("job-dismiss", {"id": f"f{i}"})
            q.cmd("blockdev-add", {"driver": "file", "node-name": f"n{i}",
                                   "filename": str(img)})
            if case.get("data-file") == "DATA":
                (sub / f"data{i}.raw").touch()
                q.cmd("blockdev-add", {"driver": "file", "node-name": f"d{i}",
                                       "filename": str(sub / f"data{i}.raw")})
                case = dict(case, **{"data-file": f"d{i}"})
            r = q.cmd("blockdev-create", {"job-id": f"j{i}", "options": {
                "driver": "qcow2", "file": f"n{i}", **case}})
            events = [r]
            while True:
                ev = q.wait_event("JOB_STATUS_CHANGE")
                events.append(ev["data"])
                if ev["data"]["status"] == "concluded":
                    break
            jobs = q.cmd("query-jobs")["return"]
            events.append(q.cmd("job-dismiss", {"id": f"j{i}"}))
            q.cmd("blockdev-del", {"node-name": f"n{i}"})
            q.cmd("blockdev-del", {"node-name": f"d{i}"})
            info = None
            if not any(j.get("error") for j in jobs):
                info = json.loads(run("qemu-img", "info", "-U", "--output=json", img).stdout
                                  .replace(str(sub), "DIR"))
                # Preallocated storage under the data, or not.
                data = sub / f"data{i}.raw"
                stored = os.stat(data if data.exists() else img).st_blocks * 512
                info["stored"] = stored >= case["size"]
                # The file ends where QEMU's does (its L1 table's last byte, say), and
                # holds the same bytes (but the data file's name, which has the directory).
                info["length"] = os.stat(img).st_size
                if "data-file" not in case:
                    info["bytes"] = hashlib.sha256(img.read_bytes()).hexdigest()
                if "backing-file" not in case:
                    info["map"] = json.loads(run("qemu-img", "map", "-U", "--output=json",
                                                 img).stdout)
                for k in ("filename", "actual-size", "dirty-flag", "children",
                          "full-backing-filename"):
                    info.pop(k, None)
                if "backing-file" not in case:
                    check_clean(img)
            out.append((events, jobs, info))
        d.stop()
        results[prog] = out
    for i, (theirs, ours) in enumerate(zip(results["qsd"], results["ferrite"])):
        assert ours == theirs, CREATE_CASES[i]


@pytest.mark.parametrize("data_file", [False, True], ids=["image", "data-file"])
def test_crash_leaves_at_most_leaks_and_flushed_data(tmp_path, data_file):
    img = tmp_path / "k.qcow2"
    opts = "cluster_size=4096" + (f",data_file={tmp_path / 'k.raw'}" if data_file else "")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, img, "64M")
    d, sock = export(FERRITE, tmp_path, img)
    # A flushed write that must survive.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "flush", uri(sock))
    ops = [f"write -P {i % 250 + 1} {(2 << 20) + (i * 7919 * 4096) % (60 << 20)} 12k"
           for i in range(3000)]
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    writer = subprocess.Popen(args + [uri(sock)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    writer.wait(timeout=60)
    r = run("qemu-img", "check", "--output=json", img, check=False)
    assert r.returncode in (0, 3), r.stdout + r.stderr
    assert "corruptions" not in json.loads(r.stdout) or json.loads(r.stdout)["corruptions"] == 0
    r = run("qemu-io", "-r", "-c", "read -P 0x77 0 1M", img)
    assert "Pattern verification failed" not in r.stdout


def test_block_status_over_a_chain_matches_qemu(tmp_path):
    """base:allocation and qemu:allocation-depth of a qcow2 over a qcow2 backing file, as
    nbdinfo sees them, are the same from both daemons."""
    maps = {}
    for prog, binary in (("qsd", QSD), ("ferrite", FERRITE)):
        sub = tmp_path / prog
        sub.mkdir()
        base, top = sub / "base.qcow2", sub / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
        run("qemu-io", "-c", "write -P 1 0 2M", "-c", "write -z 4M 1M", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
        run("qemu-io", "-c", "write -P 2 1M 2M", "-c", "write -z 6M 64k", top)
        d = Daemon(binary, sub / "d", [
            "--blockdev", f"driver=file,node-name=f0,filename={top}",
            "--blockdev", "driver=qcow2,node-name=q,file=f0",
            "--nbd-server", f"addr.type=unix,addr.path={sub / 'nbd.sock'}",
            "--export", "nbd,id=e0,node-name=q,allocation-depth=on"])
        try:
            wait_for(lambda: os.path.exists(sub / "nbd.sock"), what="NBD socket")
            maps[prog] = [run("nbdinfo", f"--map={ctx}", "--json", uri(sub / "nbd.sock")).stdout
                          for ctx in ("base:allocation", "qemu:allocation-depth")]
        finally:
            d.stop()
    assert maps["ferrite"] == maps["qsd"]


def test_external_data_file_reads_like_qemu(both, tmp_path):
    img, data = tmp_path / "df.qcow2", tmp_path / "df.raw"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},data_file_raw=on",
        img, "4M")
    run("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x11 2M 64k",
        "-c", "write -z 2560k 64k", img)
    node = {"driver": "qcow2", "node-name": "q", "read-only": True,
            "file": {"driver": "file", "filename": str(img)}}
    results = []
    for d in both():
        q = d.connect()
        assert q.cmd("blockdev-add", node) == {"return": {}}
        nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
        q_info = next(n for n in nodes if n["node-name"] == "q")
        sock = str(d.workdir / "nbd.sock")
        q.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        assert q.cmd("block-export-add", {"type": "nbd", "id": "e", "node-name": "q"}) \
            == {"return": {}}
        r = run("qemu-img", "compare", "-U", "-F", "raw", img, uri(sock), check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        # A data file given for an image without one.
        plain = tmp_path / "plain.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", plain, "4M")
        err = (q.cmd("blockdev-add", {
            "driver": "qcow2", "node-name": "q3", "read-only": True,
            "file": {"driver": "file", "filename": str(plain)},
            "data-file": {"driver": "file", "filename": str(data)}}))
        results.append((q_info["image"]["format-specific"],
                        sorted(n["image"]["filename"] for n in nodes), err))
    theirs, ours = results
    assert ours == theirs


def guest_map(img):
    """`qemu-img map` as the guest sees it: runs of (allocated, zero, data, offset), the
    offset only where the layout is fixed (an external data file maps each cluster to its
    own offset; in the image file, where clusters land is each program's choice)."""
    runs = []
    for e in json.loads(run("qemu-img", "map", "--output=json", img).stdout):
        fixed = e.get("filename", str(img)) != str(img)
        key = (e["depth"], e["present"], e["zero"], e["data"])
        offset = e.get("offset") if fixed else None
        if runs and runs[-1][1] == key and (offset is None) == (runs[-1][2] is None) \
                and (offset is None or runs[-1][2] + runs[-1][3] == offset):
            runs[-1][3] += e["length"]
            continue
        runs.append([e["start"], key, offset, e["length"]])
    return runs


DATA_FILE_CONFIGS = [
    ("plain", "data_file_raw=off", False),
    ("raw", "data_file_raw=on", False),
    ("ext-l2-16k", "extended_l2=on,cluster_size=16384", False),
    ("backed", "data_file_raw=off,cluster_size=4096", True),
]


@pytest.mark.parametrize("name,opts,backing", DATA_FILE_CONFIGS,
                         ids=[c[0] for c in DATA_FILE_CONFIGS])
def test_external_data_file_writes_match_qemu(tmp_path, name, opts, backing):
    """Writes, zeroes, discards and a resize through an NBD export of an image with an
    external data file: the same image, the same map and (data-file-raw) the same raw file as
    qemu-storage-daemon leaves; the metadata stays clean."""
    size = 8 << 20
    rng = random.Random(f"data-file-{name}")
    ops = random_ops(rng, size, 50)
    # Guest cluster 0 lives at offset 0 of the data file: written, zeroed and rewritten.
    ops += ["write -P 0x77 0 4096", "write -z -u 0 1M", "write -P 0x78 512 512"]
    imgs = []
    for prog in ("qsd", "ferrite"):
        sub = tmp_path / prog
        sub.mkdir()
        img, data = sub / "top.qcow2", sub / "top.raw"
        extra = []
        if backing:
            base = sub / "base.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", base, size)
            run("qemu-io", "-c", "write -P 0x5a 0 3M", base)
            extra = ["-b", base.name, "-F", "qcow2"]
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={data},{opts}",
            *extra, img, size)
        run("qemu-io", "-c", "write -P 0x33 1M 256k", img)
        sock = str(sub / "nbd.sock")
        d = Daemon(QSD if prog == "qsd" else FERRITE, sub / "d", [
            "--blockdev", f"driver=file,node-name=f0,filename={img}",
            "--blockdev", "driver=qcow2,node-name=q,file=f0,discard=unmap",
            "--nbd-server", f"addr.type=unix,addr.path={sock}"])
        try:
            q = d.connect()
            assert q.cmd("block_resize", {"node-name": "q", "size": size + (1 << 20)}) \
                == {"return": {}}
            assert q.cmd("block-export-add", {"type": "nbd", "id": "e0", "node-name": "q",
                                              "writable": True}) == {"return": {}}
            qemu_io_nbd(sock, ops + [f"write -P 0x99 {size + 4096} 8192"])
            q.close()
        finally:
            d.stop()
        imgs.append((img, data))
    (theirs, their_data), (ours, our_data) = imgs
    r = run("qemu-img", "compare", theirs, ours, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert guest_map(ours) == guest_map(theirs)
    assert os.path.getsize(our_data) == os.path.getsize(their_data)
    check_clean(ours)
    if "data_file_raw=on" in opts:
        # The raw file is the guest's disk as it is.
        r = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", our_data, ours, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


def test_node_queries_over_a_chain_match_qemu(both, tmp_path):
    """File names (plain, or json: when the user chose the backing), backing names, chain
    depth, backing-image and creation order, as query-named-block-nodes shows them."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "1M")
    run("qemu-io", "-c", "write -P 1 0 64k", top)

    def qcow2(name, path, **extra):
        return dict({"driver": "qcow2", "node-name": name, "read-only": True,
                     "file": {"driver": "file", "filename": str(path)}}, **extra)
    adds = [qcow2("t", top), qcow2("t2", top, backing=None), qcow2("b", base),
            qcow2("t3", top, backing="b")]
    seen = []
    for d in both():
        q = d.connect()
        for a in adds:
            assert q.cmd("blockdev-add", a) == {"return": {}}
        replies = [q.cmd("query-named-block-nodes", args)
                   for args in (None, {"flat": True}, {"flat": False})]
        seen.append(re.sub(r"#block\d+", "#block", json.dumps(replies)))
    theirs, ours = seen

    assert json.loads(ours) == json.loads(theirs)


def test_reopen_and_resize_over_a_longer_backing_file_match_qemu(both, tmp_path):
    """Reopened read-write, the image is prepared before the first change (bitmaps marked
    in use, the dirty bit of lazy refcounts); reopened read-only, it is clean again; growing
    over a longer backing file makes the new area read as zeroes."""
    infos = []
    for d in both():
        sub = d.workdir
        base, top = sub / "base.qcow2", sub / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
        run("qemu-io", "-c", "write -P 0x11 0 4M", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on",
            "-b", base.name, "-F", "qcow2", top, "1M")
        run("qemu-img", "bitmap", "--add", top, "b0")
        q = d.connect()
        assert q.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                      "filename": str(top)}) == {"return": {}}
        assert q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "b", "file": {
            "driver": "file", "filename": str(base)}}) == {"return": {}}
        node = {"driver": "qcow2", "node-name": "t", "file": "f", "backing": "b"}
        assert q.cmd("blockdev-add", dict(node, **{"read-only": True})) == {"return": {}}

        def info():
            return json.loads(run("qemu-img", "info", "-U", "--output=json", top).stdout)
        stages = [info()]
        assert q.cmd("blockdev-reopen", {"options": [dict(node, **{"read-only": False})]}) \
            == {"return": {}}
        stages.append(info())
        assert q.cmd("block_resize", {"node-name": "t", "size": 2 << 20}) == {"return": {}}
        stages.append(info())
        assert q.cmd("blockdev-reopen", {"options": [dict(node, **{"read-only": True})]}) \
            == {"return": {}}
        stages.append(info())
        d.stop()
        check_clean(top)
        r = run("qemu-io", "-c", "read -P 0x11 0 1M", "-c", "read -P 0 1M 1M", top)
        assert "Pattern verification failed" not in r.stdout, r.stdout
        for s in stages:
            s.pop("filename")
            s.pop("actual-size")
            s.pop("full-backing-filename")
            s.pop("children")
        infos.append(stages)
    theirs, ours = infos
    assert ours == theirs


def crashed_lazy_refcounts_image(path):
    """A lazy-refcounts image whose writer died after allocating: dirty bit set, a data
    cluster that no refcount counts."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "1M")
    r = run("qemu-io", "-c", "write -P 0x5a 0 64k", "-c", "abort", path, check=False)
    assert r.returncode != 0
    assert json.loads(run("qemu-img", "info", "--output=json", path).stdout)["dirty-flag"]


def test_a_crashed_image_opened_read_only_shows_its_dirty_flag_as_qsd(both):
    """Opened read-only, a dirty image is not repaired and says so (`dirty-flag: true`),
    as in qemu-storage-daemon."""
    seen = []
    for d in both():
        img = d.workdir / "crashed.qcow2"
        crashed_lazy_refcounts_image(img)
        q = d.connect()
        assert q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "n", "read-only": True,
                                      "file": {"driver": "file", "filename": str(img)}}) \
            == {"return": {}}
        nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
        seen.append([(n["drv"], n["image"]["dirty-flag"]) for n in nodes])
    theirs, ours = seen
    assert ours == theirs == [("qcow2", True), ("file", False)]


def test_a_crashed_image_reopened_read_write_is_repaired(ferrite, tmp_path):
    """Reopened read-write, the dirty image opened read-only is repaired before its first
    write, as an image opened read-write is. (qemu-storage-daemon 10.0.2 keeps the dirty bit
    instead and clears it at exit without repairing, leaving refcount errors behind.)"""
    img = tmp_path / "crashed.qcow2"
    crashed_lazy_refcounts_image(img)
    d = ferrite()
    q = d.connect()
    assert q.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                  "filename": str(img)}) == {"return": {}}
    node = {"driver": "qcow2", "node-name": "n", "file": "f"}
    assert q.cmd("blockdev-add", dict(node, **{"read-only": True})) == {"return": {}}
    assert q.cmd("blockdev-reopen", {"options": [dict(node, **{"read-only": False})]}) \
        == {"return": {}}
    nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
    assert nodes[0]["image"]["dirty-flag"] is False
    d.stop()
    check_clean(img)
    r = run("qemu-io", "-r", "-c", "read -P 0x5a 0 64k", img)
    assert "Pattern verification failed" not in r.stdout


def test_amend_matches_qemu(both, tmp_path):
    """x-blockdev-amend runs as an `amend` job; qcow2 amends only encryption, which a
    plain image refuses."""
    def script(img):
        return [
            ("blockdev-add", {"node-name": "q", "driver": "qcow2",
                              "file": {"driver": "file", "filename": str(img)}}),
            ("blockdev-add", {"node-name": "n", "driver": "null-co"}),
            ("x-blockdev-amend", {"job-id": "a1", "node-name": "q", "options": {"driver": "qcow2"}}),
            ("x-blockdev-amend", {"job-id": "a2", "node-name": "q", "options": {
                "driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                               "new-secret": "s"}}}),
            ("x-blockdev-amend", {"job-id": "a3", "node-name": "nope",
                                  "options": {"driver": "qcow2"}}),
            ("x-blockdev-amend", {"job-id": "a4", "node-name": "q", "options": {"driver": "raw"}}),
            ("x-blockdev-amend", {"job-id": "a5", "node-name": "n",
                                  "options": {"driver": "null-co"}}),
            ("x-blockdev-amend", {"job-id": "a1", "node-name": "q", "options": {"driver": "qcow2"}}),
        ]
    seen = []
    for d in both():
        img = d.workdir / "am.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        q = d.connect()
        replies = [q.cmd(name, args) for name, args in script(img)]
        wait_for(lambda: all(j["status"] == "concluded"
                             for j in q.cmd("query-jobs")["return"]), what="jobs")
        # Each job's own sequence; how two jobs interleave depends on timing.
        events = sorted((e["data"]["id"], i, e["data"]["status"])
                        for i, e in enumerate(q.events))
        events = [(job, status) for job, _, status in events]
        seen.append((replies, events, q.cmd("query-jobs")))
    theirs, ours = seen
    assert ours == theirs


CACHE_OPTIONS = [
    {"cache-clean-interval": -1},
    {"cache-clean-interval": 1 << 32},
    {"cache-clean-interval": (1 << 32) - 1},
    {"cache-clean-interval": 0},
    {"l2-cache-size": -5},
    {"cache-size": 1 << 20, "l2-cache-size": 2 << 20},
    {"cache-size": 1 << 20, "refcount-cache-size": 2 << 20},
    {"cache-size": 1 << 20, "l2-cache-size": 1 << 19, "refcount-cache-size": 1 << 19},
    {"cache-size": 1 << 20},
    {"lazy-refcounts": True},
]


def test_cache_options_match_qemu(both):
    seen = []
    for d in both():
        img = d.workdir / "c.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "1M")
        q = d.connect()
        replies = []
        for opts in CACHE_OPTIONS:
            r = q.cmd("blockdev-add", dict(opts, **{
                "driver": "qcow2", "node-name": "q",
                "file": {"driver": "file", "filename": str(img)}}))
            replies.append(r)
            if "return" in r:
                assert q.cmd("blockdev-del", {"node-name": "q"}) == {"return": {}}
        seen.append(replies)
    theirs, ours = seen
    assert ours == theirs


def _be64(d, at):
    return int.from_bytes(d[at:at + 8], "big")


def _refcount_order_zero(d):
    # Every refcount now reads as one bit of the old 16-bit values: used clusters, the
    # header's among them, look free.
    d[96:100] = (0).to_bytes(4, "big")


def _l2_entry_onto_other_l2(d):
    # The entry mapping guest cluster 1 points at the L2 table of the second gigabyte.
    l1 = _be64(d, 40)
    first, second = (_be64(d, l1) & 0x00fffffffffffe00, _be64(d, l1 + 8) & 0x00fffffffffffe00)
    d[first + 8:first + 16] = (second | (1 << 63)).to_bytes(8, "big")


OVERLAPS = [
    ("refcount_order 0", _refcount_order_zero, ""),
    ("L2 entry onto an L2 table", _l2_entry_onto_other_l2, ""),
    ("L2 entry onto an L2 table, overlap-check=constant", _l2_entry_onto_other_l2,
     ",overlap-check=constant"),
    ("L2 entry onto an L2 table, active-l2 off", _l2_entry_onto_other_l2,
     ",overlap-check.template=all,overlap-check.active-l2=off"),
]


@pytest.mark.parametrize("name,damage,opts", OVERLAPS, ids=[o[0] for o in OVERLAPS])
def test_writes_onto_metadata_are_refused_like_qemu(tmp_path, name, damage, opts):
    """No write, of data or metadata, lands on metadata that `overlap-check` watches: it is
    refused, the image marked corrupt (BLOCK_IMAGE_CORRUPTED, fatal) and left as QEMU
    leaves it; what the option does not watch goes through in both."""
    seen = []
    for binary in (QSD, FERRITE):
        sub = tmp_path / os.path.basename(binary)
        sub.mkdir()
        img = sub / "d.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "2G")
        run("qemu-io", "-c", "write -P 1 0 128k", "-c", "write -P 3 1G 64k", img)
        data = bytearray(img.read_bytes())
        damage(data)
        img.write_bytes(bytes(data))
        d, sock = export(binary, sub, img, opts)
        q = d.connect()
        w = run("qemu-io", "-f", "raw", "-c", "write -P 2 64k 4k", "-c", "write -P 2 1M 4k",
                uri(sock), check=False)
        r = run("qemu-io", "-f", "raw", "-c", "read -P 1 0 4k", uri(sock), check=False)
        q.cmd("query-status")
        events = [e["data"] for e in q.events if e["event"] == "BLOCK_IMAGE_CORRUPTED"]
        d.stop()
        info = json.loads(run("qemu-img", "info", "--output=json", img).stdout)
        seen.append({
            "write": [line for line in (w.stdout + w.stderr).splitlines() if "write" in line],
            "read": [line for line in (r.stdout + r.stderr).splitlines() if "read" in line],
            "events": events,
            "corrupt": info["format-specific"]["data"].get("corrupt"),
            "header": _be64(img.read_bytes(), 0) == _be64(data, 0),
        })
    theirs, ours = seen
    # The timing figures qemu-io prints differ; the verdicts do not.
    strip = lambda lines: [re.sub(r"\(.*\)|[\d.]+ \w+/sec.*", "", x).strip() for x in lines]  # noqa: E731
    for k in ("write", "read"):
        theirs[k], ours[k] = strip(theirs[k]), strip(ours[k])
    assert ours["events"] == theirs["events"]
    assert ours == theirs


def test_blockdev_create_over_a_file_that_keeps_its_size_like_qsd(both):
    """qcow2's blockdev-create writes over what its file holds, without cutting it first
    (a raw window, a device or a fixed FUSE export cannot be cut: iotest 108)."""
    seen = []
    for d in both():
        big = d.workdir / "big"
        subprocess.run(["truncate", "-s", "8M", str(big)], check=True)
        q = d.connect()
        out = [q.cmd("blockdev-add", {"driver": "raw", "node-name": "w", "size": 4 << 20,
                                      "file": {"driver": "file", "filename": str(big)}}),
               q.cmd("blockdev-create", {"job-id": "c", "options": {
                   "driver": "qcow2", "file": "w", "size": 1 << 20}})]
        q.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        out.append([j.get("error") for j in q.cmd("query-jobs")["return"]])
        d.stop()
        out.append(os.path.getsize(big))
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(big)],
                               capture_output=True, text=True)
        out.append((check.returncode, check.stdout.splitlines()[-1]))
        seen.append(out)
    assert seen[1] == seen[0]
    assert seen[0][2] == [None]


def test_blockdev_create_sizes_are_refused_as_qsd_refuses_them(both):
    """blockdev-create's sizes are QAPI `size`: lengths past INT64_MAX and past the block
    layer's maximum are refused by the job in QEMU's words, as is an L1 table that cannot
    grow; a file preallocated with falloc at size 0 is made (iotest 206)."""
    seen = []
    for d in both():
        q = d.connect()
        img = str(d.workdir / "t.qcow2")
        out = []

        def create(job, options):
            out.append(q.cmd("blockdev-create", {"job-id": job, "options": options}))
            if "error" not in out[-1]:
                q.wait_event("JOB_STATUS_CHANGE",
                             lambda e: e["data"]["status"] == "concluded"
                             and e["data"]["id"] == job)
                out.append([j.get("error") for j in q.cmd("query-jobs")["return"]
                            if j["id"] == job])
                q.cmd("job-dismiss", {"id": job})
        create("f", {"driver": "file", "filename": img, "size": 0, "preallocation": "falloc"})
        out.append(q.cmd("blockdev-add", {"driver": "file", "node-name": "n", "filename": img}))
        for i, (size, cluster) in enumerate([(18446744073709551104, None),
                                             (9223372036854775808, None),
                                             (9223372036854775296, None),
                                             (9223372035781033984, None),
                                             (281474976710656, 512)]):
            opts = {"driver": "qcow2", "file": "n", "size": size}
            if cluster:
                opts["cluster-size"] = cluster
            create(f"q{i}", opts)
        seen.append(out)
    assert seen[1] == seen[0]
    assert seen[0][1] == [None]


def test_a_backing_file_named_by_a_json_name_with_its_format_opens_as_qsd(both):
    """A backing file string `json:{"driver": "qcow2", "file": {...}}` with backing format
    qcow2 names the image node itself (iotest backing-file-invalidation's chain), not a
    qcow2 node over another."""
    seen = []
    for d in both():
        w = d.workdir
        imgs = [w / f"{i}.qcow2" for i in range(3)]
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(imgs[0]), "1M"],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -P 9 0 64k", str(imgs[0])], check=True,
                       capture_output=True)
        for i in (1, 2):
            backing = {"driver": "qcow2", "file": {"driver": "file", "filename": str(imgs[i - 1])}}
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            "json:" + json.dumps(backing), str(imgs[i]), "1M"], check=True)
        q = d.connect()
        out = [q.cmd("blockdev-add", {"node-name": "top", "driver": "qcow2",
                                      "file": {"driver": "file", "filename": str(imgs[2])}})]
        nodes = q.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append(sorted((n["drv"], n["backing_file_depth"], n["file"].replace(str(w), "W"))
                          for n in nodes))
        q.cmd("quit")
        d.proc.wait(10)
        seen.append(out)
    assert seen[1] == seen[0]


@pytest.mark.parametrize("opts", ["cluster_size=65536", "cluster_size=2097152", "cluster_size=1024",
                                  "extended_l2=on", "compat=0.10",
                                  "cluster_size=4096,refcount_bits=1"])
def test_tables_and_data_land_where_qemu_puts_them(tmp_path, opts):
    """One writer, one request at a time: ferrite places L2 tables and data in the order
    QEMU does (a table before the data it maps, one table's worth of clusters per
    allocation), so `qemu-img map` gives the same host offsets and the file ends at the
    same place; refcount blocks too, made as QEMU makes them (at the next free cluster, the
    search for the run starting again). (Not yet once the refcount table grows, which with
    512-byte clusters these writes make it do.)"""
    from test_blkdebug import qemu_io_sessions
    from test_system import QEMU, SYSTEM
    ops = ["write 0 64k", "write 1000M 64k", "write 512k 1k", "write -P 7 3M 5M",
           "write -b 0 1M", "write -c 2M 64k", "write 600M 1M", "write 129k 300k",
           "write -z 20M 1M", "write -P 9 8M 130k", "discard 3M 1M", "write -P 4 700M 512k",
           "write -P 5 3M 64k"]
    layouts = []
    for side, binary in (("qemu", QEMU), ("ferrite", SYSTEM)):
        w = tmp_path / side
        w.mkdir()
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, w / "t.qcow2", "1G")
        out, err = qemu_io_sessions(binary, w, [ops], debug=False)
        assert not err and len(out) == len(ops), (out, err)
        layouts.append((run("qemu-img", "map", "--output=json", w / "t.qcow2").stdout,
                        os.path.getsize(w / "t.qcow2")))
    assert layouts[1] == layouts[0]
