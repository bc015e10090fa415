#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (fuzz/seeds/TARGET/NAME): QMP and NBD sessions,
command lines, and small qcow2 images of every kind qemu-img makes. Run again after
changing it; the seeds are committed so that a run needs neither this script nor qemu-img."""
import base64
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- command lines: NUL-separated arguments -------------------------------------------

COMMAND_LINES = {
    "full": ["--blockdev", "driver=file,node-name=f,filename=x.qcow2,cache.direct=on,aio=io_uring",
             "--blockdev", "qcow2,node-name=q,file=f,l2-cache-size=1M,overlap-check=all,discard=unmap",
             "--nbd-server", "addr.type=unix,addr.path=nbd.sock,max-connections=4",
             "--export", "nbd,id=e,node-name=q,writable=on,bitmaps.0=b,allocation-depth=on",
             "--chardev", "socket,id=c,path=qmp.sock,server=on,wait=off",
             "--monitor", "chardev=c,pretty=on", "--pidfile", "pid"],
    "json": ["--blockdev", '{"driver": "null-co", "node-name": "n", "size": 1048576}',
             "--export", '{"type": "nbd", "id": "e", "node-name": "n", "name": "x"}',
             "--nbd-server", '{"addr": {"type": "inet", "host": "::1", "port": "10809"}}',
             "--object", '{"qom-type": "iothread", "id": "io", "poll-max-ns": 0}'],
    "objects": ["--object", "iothread,id=io0,poll-max-ns=10,poll-grow=2,aio-max-batch=8",
                "--object", "secret,id=s0,data=c2VjcmV0,format=base64",
                "--object", "throttle-group,id=t,x-bps-total=1000",
                "--object", "help", "--object", "iothread,help"],
    "chardevs": ["--chardev", "file,id=f,path=log,append=on", "--chardev", "null,id=n",
                 "--chardev", "socket,id=t,host=localhost,port=4444,server=on,wait=off,nodelay=on",
                 "--chardev", "pipe,id=p,path=fifo", "--chardev", "stdio,id=s,signal=off",
                 "--chardev", "socket,id=fd,fd=3", "--monitor", "t,mode=control"],
    "keyval": ["--blockdev", "raw,node-name=r,file.driver=file,file.filename=a,,b,offset=512,size=4096",
               "--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=0,tls-creds=t,tls-authz=a",
               "--export", "type=nbd,id=e,node-name=r,bitmaps.0=a,bitmaps.1=b,description=d",
               "--blockdev", "driver=qcow2,node-name=q,file=r,backing=null,encrypt.format=luks"],
    "short": ["-h", "-V", "-T", "help", "--trace", "nbd_*", "--daemonize", "stray"],
    "errors": ["--blockdev", "driver", "--export", "nbd,id=e,node-name", "--blockdev", "{",
               "--object", "iothread,id=io,poll-max-ns=-1", "--bogus", "--pidfile"],
}


# --- QMP sessions ------------------------------------------------------------------------

def qmp(*cmds, oob=False):
    out = [json.dumps({"execute": "qmp_capabilities",
                       "arguments": {"enable": ["oob"]} if oob else {}})]
    for i, c in enumerate(cmds):
        if isinstance(c, str):
            out.append(c)
            continue
        name, args = c
        out.append(json.dumps({"execute": name, "arguments": args, "id": i}))
    return "\n".join(out) + "\n"


def job(opts, jid):
    return ("blockdev-create", {"job-id": jid, "options": opts})


QMP_SESSIONS = {
    "queries": qmp(*[(q, {}) for q in [
        "query-block", "query-named-block-nodes", "query-block-jobs", "query-jobs",
        "query-version", "query-commands", "query-block-exports", "query-blockstats",
        "x-debug-query-block-graph", "query-iothreads", "query-chardev", "query-status",
        "query-qmp-schema", "query-name"]]),
    "bitmaps": qmp(
        ("block-dirty-bitmap-add", {"node": "q0", "name": "b1", "granularity": 65536,
                                    "persistent": True}),
        ("block-dirty-bitmap-disable", {"node": "q0", "name": "b1"}),
        ("block-dirty-bitmap-merge", {"node": "q0", "target": "b1", "bitmaps": ["b0"]}),
        ("transaction", {"actions": [
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q0", "name": "b0"}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": "q0", "name": "b1"}}]}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "q0", "name": "b1"}),
        ("block-dirty-bitmap-remove", {"node": "q0", "name": "b1"})),
    "backup": qmp(
        ("blockdev-add", {"driver": "null-co", "node-name": "t", "size": 1048576}),
        ("blockdev-backup", {"job-id": "j", "device": "q0", "target": "t", "sync": "full",
                             "auto-finalize": False, "x-perf": {"max-chunk": 65536}}),
        ("query-jobs", {}), ("job-pause", {"id": "j"}), ("job-resume", {"id": "j"}),
        ("block-job-set-speed", {"device": "j", "speed": 1}), ("job-finalize", {"id": "j"}),
        ("blockdev-backup", {"job-id": "k", "device": "q0", "target": "t",
                             "sync": "incremental", "bitmap": "b0"}),
        ("job-cancel", {"id": "k"}), ("job-dismiss", {"id": "j"})),
    "mirror": qmp(
        ("blockdev-add", {"driver": "null-co", "node-name": "t", "size": 1048576}),
        ("blockdev-mirror", {"job-id": "m", "device": "q0", "target": "t", "sync": "full",
                             "granularity": 65536, "copy-mode": "write-blocking"}),
        ("block-job-complete", {"device": "m"}), ("query-block-jobs", {}),
        ("block-job-cancel", {"device": "m", "force": True})),
    "chain": qmp(
        job({"driver": "file", "filename": "top.qcow2", "size": 0}, "c1"),
        ("job-dismiss", {"id": "c1"}),
        ("blockdev-add", {"driver": "file", "node-name": "tf", "filename": "top.qcow2"}),
        job({"driver": "qcow2", "file": "tf", "size": 1048576, "backing-file": "q0.qcow2",
             "cluster-size": 65536}, "c2"),
        ("job-dismiss", {"id": "c2"}),
        ("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": "tf", "backing": None}),
        ("blockdev-snapshot", {"node": "q0", "overlay": "top"}),
        ("block-stream", {"job-id": "s", "device": "top"}),
        ("block-commit", {"job-id": "c", "device": "top", "top-node": "top", "base-node": "q0"}),
        ("blockdev-del", {"node-name": "top"})),
    "snapshots": qmp(
        ("blockdev-snapshot-internal-sync", {"device": "q0", "name": "s1"}),
        ("blockdev-snapshot-internal-sync", {"device": "q0", "name": "s1"}),
        ("snapshot-save", {"job-id": "x", "tag": "t", "vmstate": "q0", "devices": ["q0"]}),
        ("blockdev-snapshot-delete-internal-sync", {"device": "q0", "name": "s1"}),
        ("block_resize", {"node-name": "q0", "size": 2097152}),
        ("block-set-write-threshold", {"node-name": "q0", "write-threshold": 4096})),
    "exports": qmp(
        ("nbd-server-add", {"device": "n1", "name": "x", "writable": False}),
        ("block-export-add", {"type": "nbd", "id": "e9", "node-name": "q0", "name": "y",
                              "description": "d", "bitmaps": ["b0"]}),
        ("query-block-exports", {}),
        ("block-export-del", {"id": "e9", "mode": "hard"}),
        ("nbd-server-remove", {"name": "x"}), ("nbd-server-stop", {}),
        ("nbd-server-start", {"addr": {"type": "unix", "path": "b.sock"}, "max-connections": 2})),
    "objects": qmp(
        ("object-add", {"qom-type": "iothread", "id": "io0", "poll-max-ns": 1000}),
        ("qom-list", {"path": "/objects"}), ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}),
        ("qom-set", {"path": "/objects/io0", "property": "poll-grow", "value": 2}),
        ("x-blockdev-set-iothread", {"node-name": "n1", "iothread": "io0", "force": True}),
        ("object-add", {"qom-type": "secret", "id": "s", "data": "eA==", "format": "base64"}),
        ("object-del", {"id": "io0"}), ("qom-list-types", {}), ("qom-list-properties", {"typename": "iothread"})),
    "chardevs": qmp(
        ("chardev-add", {"id": "c", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": "c.sock"}}, "server": True, "wait": False}}}),
        ("chardev-add", {"id": "f", "backend": {"type": "file", "data": {"out": "log"}}}),
        ("query-chardev", {}), ("chardev-remove", {"id": "c"})),
    "nodes": qmp(
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "n1", "offset": 4096, "size": 8192}),
        ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "r"}),
        ("blockdev-reopen", {"options": [{"driver": "qcow2", "node-name": "q0",
                                          "file": "q0.qcow2", "read-only": True}]}),
        ("block-latency-histogram-set", {"id": "q0", "boundaries": [10, 100]}),
        ("blockdev-del", {"node-name": "cor"}), ("blockdev-del", {"node-name": "r"})),
    "malformed": qmp(
        '{"execute": "query-block", "arguments": {"x": 1}}',
        '{"exec-oob": "query-status", "id": 1}',
        '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[',
        '{"execute": 18446744073709551616}', '{"execute": "blockdev-add", "arguments": '
        '{"driver": "qcow2", "node-name": "\\u0000", "file": {"driver": "null-co"}}}',
        '\xff\xfe', '{"execute": "quit"}', oob=True),
}


# --- NBD sessions ------------------------------------------------------------------------

IHAVEOPT = 0x49484156454F5054


def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def go(name, o=7, infos=(3, 1)):
    n = name.encode()
    return opt(o, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
               + b"".join(struct.pack(">H", i) for i in infos))


def meta(o, name, queries):
    n = name.encode()
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q.encode()
    return opt(o, d)


def req(ty, off, ln, flags=0, cookie=1, payload=b"", ext=False):
    if ext:
        return struct.pack(">IHHQQQ", 0x21E41C71, flags, ty, cookie, off, ln) + payload
    return struct.pack(">IHHQQI", 0x25609513, flags, ty, cookie, off, ln) + payload


def requests(ext=False):
    r = b""
    r += req(1, 0, 4096, payload=b"\xab" * 4096, ext=ext)
    r += req(1, 65536, 512, flags=1, payload=b"\x01" * 512, ext=ext)
    r += req(0, 0, 8192, ext=ext) + req(0, 4096, 4096, flags=4, ext=ext)
    r += req(7, 0, 1 << 20, ext=ext) + req(7, 0, 1 << 20, flags=8, ext=ext)
    r += req(6, 8192, 8192, flags=2, ext=ext) + req(6, 0, 4096, flags=16, ext=ext)
    r += req(4, 0, 4096, ext=ext) + req(3, 0, 0, ext=ext) + req(5, 0, 65536, ext=ext)
    if ext:
        r += req(7, 0, 12, flags=32, payload=struct.pack(">QI", 1 << 20, 0), ext=True)
        r += req(0, 0, 8, flags=32, payload=b"12345678", ext=True)
    r += req(2, 0, 0, ext=ext)
    return r


HELLO = struct.pack(">I", 3)
CONTEXTS = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]
NBD_SESSIONS = {
    "structured": HELLO + opt(8) + meta(10, "q0", CONTEXTS) + go("q0") + requests(),
    "extended": HELLO + opt(11) + meta(10, "q0", CONTEXTS) + go("q0") + requests(ext=True),
    "simple": HELLO + opt(1, b"n0") + requests(),
    "options": HELLO + opt(3) + go("q0", o=6) + meta(9, "q0", ["qemu:"]) + opt(5)
    + opt(99, b"xyz") + go("nope") + opt(2),
    "read-only": HELLO + opt(8) + go("n1") + requests(),
    "oldclient": struct.pack(">I", 0) + opt(1, b"n1") + req(0, 0, 512),
}


# --- qcow2 images ------------------------------------------------------------------------

def images():
    tmp = tempfile.mkdtemp()
    try:
        made = {}

        def img(name, opts, io=(), size="1M"):
            path = os.path.join(tmp, name)
            # In the image's directory: qemu-img and qemu-io find a data file named relative
            # to theirs.
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size],
                           check=True, cwd=tmp)
            for cmd in io:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, path], check=True,
                               capture_output=True, cwd=tmp)
            made[name] = path
            return path

        for f in ("base.raw", "data.raw"):
            with open(os.path.join(tmp, f), "wb") as fh:
                fh.truncate(1 << 20)
        io = ["write -P 0x11 0 12k", "write -z 64k 8k", "write -c -P 0x22 128k 64k",
              "discard 256k 4k", "write -P 0x33 1020k 4k"]
        img("v3-4k", "cluster_size=4096", io)
        img("v2-512", "compat=0.10,cluster_size=512", io[:2])
        img("extl2-16k", "cluster_size=16384,extended_l2=on", io)
        img("refcount1", "cluster_size=4096,refcount_bits=1", io[:2])
        img("refcount64", "cluster_size=4096,refcount_bits=64", io[:2])
        img("zstd", "cluster_size=4096,compression_type=zstd", io)
        img("lazy", "cluster_size=4096,lazy_refcounts=on", io[:1])
        p = img("snapshot", "cluster_size=4096", io[:1])
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", p], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x44 0 4k", p], check=True,
                       capture_output=True)
        p = img("bitmaps", "cluster_size=4096", io[:1])
        subprocess.run(["qemu-img", "bitmap", "--add", "--granularity", "65536", p, "b0"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", "--disable", p, "b1"], check=True)
        img("backing", "cluster_size=4096,backing_file=base.raw,backing_fmt=raw", io[:1])
        img("datafile", "cluster_size=4096,data_file=data.raw,data_file_raw=on", io[:1])
        img("prealloc", "cluster_size=4096,preallocation=metadata", size="64k")
        for name, path in made.items():
            with open(path, "rb") as f:
                data = f.read()
            if name == "lazy":
                # The dirty bit (incompatible feature 0): opening it runs the repair.
                data = data[:72] + struct.pack(">Q", 1) + data[80:]
            put("qcow2_image", name, data)
        # VDI and VHD images go through the same target (it picks the driver by
        # signature): empty dynamic ones, metadata only.
        for fmt, seed in (("vdi", "vdi-empty"), ("vpc", "vpc-empty")):
            other = os.path.join(tmp, f"empty.{fmt}")
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, other, "3M"], check=True)
            with open(other, "rb") as f:
                put("qcow2_image", seed, f.read())
        # VMDK too: a monolithic sparse image, and a stream-optimized one with a
        # compressed grain.
        for seed, opts, write in (("vmdk-empty", [], None),
                                  ("vmdk-stream", ["-o", "subformat=streamOptimized"],
                                   "write -P 0x11 0 64k")):
            other = os.path.join(tmp, f"{seed}.vmdk")
            subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", *opts, other, "1M"],
                           check=True)
            if write:
                subprocess.run(["qemu-io", "-f", "vmdk", "-c", write, other], check=True,
                               capture_output=True)
            with open(other, "rb") as f:
                put("qcow2_image", seed, f.read())
        # QED: small clusters and tables, a cluster written, the need-check flag set (so
        # that opening runs the check and repair).
        other = os.path.join(tmp, "qed.qed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qed", "-o",
                        "cluster_size=4096,table_size=2", other, "1M"], check=True)
        subprocess.run(["qemu-io", "-f", "qed", "-c", "write -P 0x11 4k 8k", other],
                       check=True, capture_output=True)
        with open(other, "rb") as f:
            data = bytearray(f.read())
        data[16] |= 2
        put("qcow2_image", "qed-need-check", bytes(data))
        # qcow (version 1): a cluster written, and an L2 table.
        other = os.path.join(tmp, "v1.qcow")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow", other, "1M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow", "-c", "write -P 0x11 4k 8k", other],
                       check=True, capture_output=True)
        with open(other, "rb") as f:
            put("qcow2_image", "qcow1", f.read())
        # Parallels: 4 KiB clusters, two written, marked in use (so that opening repairs
        # it) and one entry shared (so that the repair moves a cluster).
        other = os.path.join(tmp, "p.prl")
        subprocess.run(["qemu-img", "create", "-q", "-f", "parallels", "-o",
                        "cluster_size=4k", other, "1M"], check=True)
        subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x11 4k 8k", other],
                       check=True, capture_output=True)
        with open(other, "rb") as f:
            data = bytearray(f.read())
        data[44:48] = (0x746F6E59).to_bytes(4, "little")
        data[64 + 4 * 9:64 + 4 * 10] = data[64 + 4:64 + 8]
        put("qcow2_image", "parallels-unclean", bytes(data))
        # Parallels with a format extension holding a dirty bitmap (read when opened
        # read-only): 4 KiB clusters, the extension and the bitmap's cluster at the end.
        subprocess.run(["qemu-img", "create", "-q", "-f", "parallels", "-o",
                        "cluster_size=4k", other, "1M"], check=True)
        with open(other, "rb") as f:
            data = bytearray(f.read())
        c, ext_at = 4096, len(data)
        feature = struct.pack("<Q16sIIQ", 2048, bytes(range(16)), 8, 1, (ext_at + c) // 512)
        body = struct.pack("<QQII", 0x20385FAE252CB34A, 0, len(feature), 0) + feature
        body += bytes(24)
        body += bytes(c - 24 - len(body))
        data += struct.pack("<Q", 0xAB234CEF23DCEA87) + hashlib.md5(body).digest() + body
        data += b"\x21" + bytes(c - 1)
        struct.pack_into("<Q", data, 56, ext_at // 512)
        put("qcow2_image", "parallels-bitmap", bytes(data))
        # Bochs (read-only): 4 KiB extents, two of them written, one sector each.
        head = struct.pack("<32s16s16sIIIIIIQ", b"Bochs Virtual HD Image", b"Redolog",
                           b"Growing", 0x00020000, 512, 8, 512, 4096, 0, 8 * 4096)
        head += bytes(512 - len(head))
        catalog = struct.pack("<8I", 1, *[0xFFFFFFFF] * 4, 0, 0xFFFFFFFF, 0xFFFFFFFF)
        area = bytes([0x81]) + bytes(511) + b"\x42" * 4096
        put("qcow2_image", "bochs", head + catalog + area + area)
        put("qcow2_image", "vhdx", vhdx_seed())
        # cloop: four 4 KiB blocks, each compressed on its own.
        magic = (b"#!/bin/sh\n#V2.0 Format\n"
                 b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
        packed = [zlib.compress(bytes([i + 1]) * 2048 + bytes(range(256)) * 8)
                  for i in range(4)]
        at, offsets = 128 + 8 + 8 * 5, []
        for p in packed:
            offsets.append(at)
            at += len(p)
        offsets.append(at)
        put("qcow2_image", "cloop", magic + bytes(128 - len(magic))
            + struct.pack(">II5Q", 4096, 4, *offsets) + b"".join(packed))
        put("qcow2_image", "dmg", dmg_seed())
    finally:
        shutil.rmtree(tmp)


def dmg_seed():
    """A UDIF image of 24 sectors: 8 raw, 8 zlib, 8 zeroes, in a `mish` block of a
    property list, the `koly` trailer last."""
    raw = bytes(range(256)) * 16
    packed = zlib.compress(b"\x5a" * 4096)
    entries = [(1, 0, 8, 0, len(raw)), (0x80000005, 8, 8, len(raw), len(packed)),
               (0, 16, 8, 0, 0), (0xffffffff, 24, 0, 0, 0)]
    mish = b"mish" + struct.pack(">IQQQII", 1, 0, 24, 0, 0, 0)
    mish = mish.ljust(200, b"\0") + struct.pack(">I", len(entries))
    mish += b"".join(struct.pack(">IIQQQQ", t, 0, s, c, o, n) for t, s, c, o, n in entries)
    fork = raw + packed
    plist = (b"<plist><dict><key>blkx</key><array><dict><key>Data</key><data>"
             + base64.b64encode(mish) + b"</data></dict></array></dict></plist>")
    koly = bytearray(512)
    koly[0:4] = b"koly"
    struct.pack_into(">QQ", koly, 0xd8, len(fork), len(plist))
    struct.pack_into(">Q", koly, 0x1ec, 24)
    return fork + plist + bytes(koly)


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def sealed(buf):
    """`buf` with its CRC-32C at byte 4."""
    buf = bytearray(buf)
    buf[4:8] = bytes(4)
    struct.pack_into("<I", buf, 4, crc32c(buf))
    return bytes(buf)


def vhdx_seed():
    """A compact VHDX image (qemu-img's start at 8 MiB): 2 MiB in 1 MiB blocks, the BAT
    and metadata right after the first region table, the (empty) log at 4 MiB, block 0 in
    the ZERO state and block 1 not present."""
    k, mib = 1024, 1 << 20
    data = bytearray(264 * k)
    data[0:8] = b"vhdxfile"
    for i, at in enumerate((64 * k, 128 * k)):
        head = struct.pack("<4sIQ16s16s16sHHIQ", b"head", 0, i + 1, bytes(range(16)),
                           bytes(range(16, 32)), bytes(16), 0, 1, mib, 4 * mib)
        data[at:at + 4096] = sealed(head + bytes(4096 - len(head)))
    bat_guid = bytes.fromhex("6677c22d23f600429d64115e9bfd4a08")
    meta_guid = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")
    rt = struct.pack("<4sIII", b"regi", 0, 2, 0)
    rt += struct.pack("<16sQII", bat_guid, 256 * k, 4096, 1)
    rt += struct.pack("<16sQII", meta_guid, 260 * k, 64 * k, 1)
    data[192 * k:256 * k] = sealed(rt + bytes(64 * k - len(rt)))
    struct.pack_into("<QQ", data, 256 * k, 2, 0)
    items = [("3767a1ca36fa434db3b633f0aa44e76b", 8, 4, struct.pack("<II", mib, 0)),
             ("2442a52f1bcd7648b2115dbed83bf4b8", 8, 6, struct.pack("<Q", 2 * mib)),
             ("ab12cabee6b2234593efc309e000c746", 16, 6, bytes(range(16))),
             ("1dbf41816fa90947ba47f233a8faab5f", 4, 6, struct.pack("<I", 512)),
             ("c748a3cd5d447144 9cc9e9885251c556".replace(" ", ""), 4, 6,
              struct.pack("<I", 512))]
    table = struct.pack("<8sHH20s", b"metadata", 0, len(items), bytes(20))
    at = 1024
    for guid, length, flags, value in items:
        table += struct.pack("<16sIIII", bytes.fromhex(guid), at, length, flags, 0)
        data[260 * k + at:260 * k + at + length] = value
        at += length
    data[260 * k:260 * k + len(table)] = table
    return bytes(data)


# --- nbd_client: what a server says to ferrite's nbd driver -----------------------------

REPLY_MAGIC = 0x3E889045565A9


def orep(o, ty, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, o, ty, len(data)) + data


def chunk(cookie, ty, payload=b"", done=True, ext=False, off=0):
    flags = 1 if done else 0
    if ext:
        return struct.pack(">IHHQQQ", 0x6E8A278C, flags, ty, cookie, off, len(payload)) + payload
    return struct.pack(">IHHQI", 0x668E33EF, flags, ty, cookie, len(payload)) + payload


def server(framing):
    """A server's side of a session with the driver's requests in order: read, block
    status, write, zeroes, trim, flush, a 1 MiB read."""
    size, tflags = 1 << 20, 1 | 4 | 8 | 32 | 64
    out = struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3 if framing != "unfixed" else 0)
    if framing == "unfixed":
        return out + struct.pack(">QH", size, tflags) + b"\0" * 124 + b"".join(
            struct.pack(">IIQ", 0x67446698, 0, c) + (b"\x11" * 4096 if c == 1 else b"")
            for c in range(1, 8))
    ext = framing == "extended"
    out += orep(11, 1) if ext else orep(11, (1 << 31) + 1) + orep(8, 1)
    ctx = b"base:allocation"
    out += orep(10, 4, struct.pack(">I", 1) + ctx) + orep(10, 1)
    out += orep(7, 3, struct.pack(">HQH", 0, size, tflags))
    out += orep(7, 3, struct.pack(">HIII", 3, 1, 4096, 32 << 20)) + orep(7, 1)
    out += chunk(1, 1, struct.pack(">Q", 0) + b"\x22" * 4096, ext=ext)
    if ext:
        out += chunk(2, 6, struct.pack(">IIQQ", 1, 1, size, 3), ext=True)
    else:
        out += chunk(2, 5, struct.pack(">III", 1, size, 3))
    for cookie in (3, 4, 5, 6):
        out += chunk(cookie, 0, ext=ext)
    out += chunk(7, 2, struct.pack(">QI", 0, 1 << 19), done=False, ext=ext)
    out += chunk(7, 1, struct.pack(">Q", 1 << 19) + b"\x33" * 64, done=False, ext=ext)
    out += chunk(7, 32769, struct.pack(">IH", 5, 4) + b"oops", ext=ext)
    return out


def main():
    shutil.rmtree(SEEDS, ignore_errors=True)
    for name, argv in COMMAND_LINES.items():
        put("command_line", name, "\0".join(argv))
    for name, text in QMP_SESSIONS.items():
        put("qmp_session", name, text)
    for name, data in NBD_SESSIONS.items():
        put("nbd_session", name, data)
    for framing in ("structured", "extended", "unfixed"):
        put("nbd_client", framing, server(framing))
    images()


if __name__ == "__main__":
    main()
