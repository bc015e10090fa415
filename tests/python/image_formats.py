"""What the tests of the simple image formats (`vdi`, `vpc`) do alike against
qemu-storage-daemon: an image used through an NBD export and compared byte for byte,
`blockdev-create` on an empty file, and damaged images opened read-only."""
import json
import shutil
import subprocess

from blockjobs import export
from conftest import assert_same_transcript, content_digest, normalize, recorder


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def qemu_io_lines(*args):
    """qemu-io's output without its timing lines."""
    r = subprocess.run(["qemu-io", *args], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln]


def used_through_nbd(d, img, fmt, io, resize_to):
    """The node's information, a refused resize, `io` (qemu-io commands) through a writable
    export, the export's map, then `qemu-img check` of the file once the daemon stopped."""
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    cmd("blockdev-add", {"driver": fmt, "node-name": "v", "file": "f"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(img), "IMG")
    out.append(("nodes", json.loads(text)))
    cmd("block_resize", {"node-name": "v", "size": resize_to})
    uri = export(c, d, "v", "v", True)
    out.append(("io", qemu_io_lines("-f", "raw", *[a for op in io for a in ("-c", op)], uri)))
    r = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                       capture_output=True, text=True)
    out.append(("map", r.stdout))
    c.close()
    d.stop()
    out.append(("check", subprocess.run(["qemu-img", "check", "-f", fmt, str(img)],
                                        capture_output=True, text=True).stdout))
    return out


def assert_same_use(both, image, fmt, io, resize_to):
    """The same image used the same way by both daemons: same transcript, same file."""
    q, f = both()
    results, files = [], []
    for d in (q, f):
        img = d.workdir / image.name
        shutil.copy(image, img)
        results.append(used_through_nbd(d, img, fmt, io, resize_to))
        files.append(img.read_bytes())
    assert_same_transcript(*results)
    assert files[1] == files[0]


def created(d, fmt, **options):
    """blockdev-create of a `fmt` image on an empty file: the job's error (or None), and
    the file's bytes (past 64 MiB, its length and content digest)."""
    img = d.workdir / f"n.{fmt}"
    img.write_bytes(b"")
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                  "filename": str(img)}) == {"return": {}}
    r = c.cmd("blockdev-create", {"job-id": "c", "options": {"driver": fmt, "file": "f",
                                                             **options}})
    assert r == {"return": {}}, r
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    error = c.cmd("query-jobs")["return"][0].get("error")
    c.close()
    d.stop()
    if img.stat().st_size > 64 << 20:
        return error, content_digest(img)
    return error, bytearray(img.read_bytes())


def opened_read_only(both, img, fmt, reads, stderr_with=None):
    """Both daemons open a (damaged) image read-only: the replies, and if it opened, its
    size and `reads` (qemu-io commands) through a read-only export; with `stderr_with`,
    also the lines of standard error holding it."""
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img),
                             "read-only": True})
        cmd("blockdev-add", {"driver": fmt, "node-name": "v", "file": "f", "read-only": True})
        if "error" not in out[-1][1]:
            out.append(("size", [n["image"]["virtual-size"] for n in
                                 c.cmd("query-named-block-nodes", {"flat": True})["return"]
                                 if n["node-name"] == "v"]))
            uri = export(c, d, "v", "v", False)
            out.append(("io", qemu_io_lines("-r", "-f", "raw",
                                            *[a for op in reads for a in ("-c", op)], uri)))
        if stderr_with is not None:
            c.close()
            d.stop()
            out.append(("stderr", [ln for ln in d.stderr_path.read_text().splitlines()
                                   if stderr_with in ln]))
        results.append(json.loads(json.dumps(out).replace(str(img), "IMG")))
    assert_same_transcript(*results)


def assert_writable_opens_refused_or_made_read_only(both, img, fmt):
    """A format QEMU only reads: a writable open refused, one with `auto-read-only` made
    read-only, and a resize of it refused, alike in both daemons."""
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": fmt, "node-name": "w",
                             "file": {"driver": "file", "filename": str(img)}})
        cmd("blockdev-add", {"driver": fmt, "node-name": "a", "auto-read-only": True,
                             "file": {"driver": "file", "filename": str(img),
                                      "auto-read-only": True}})
        out.append(("ro", [n["ro"] for n in c.cmd("query-named-block-nodes")["return"]
                           if n["node-name"] == "a"]))
        cmd("block_resize", {"node-name": "a", "size": 1 << 20})
        c.close()
        d.stop()
        results.append(out)
    assert_same_transcript(*results)


def exported_read_only(c, d, img, fmt, out):
    """`img` opened read-only as `fmt` (node `v`) on monitor connection `c` of daemon `d`,
    the reply and the node's information recorded in `out`, and exported read-only: the
    export's URI."""
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": fmt, "node-name": "v", "read-only": True,
                         "file": {"driver": "file", "filename": str(img), "read-only": True}})
    out.append(("nodes", [{k: n[k] for k in ("ro", "drv", "image")}
                          for n in c.cmd("query-named-block-nodes", {"flat": True})["return"]
                          if n["node-name"] == "v"]))
    return export(c, d, "v", "v", False)


def read_through_export(both, img, fmt, reads):
    """Both daemons open an image read-only and read it through a read-only export: the
    same node information, the same `reads` (qemu-io commands); ferrite's transcript."""
    results = []
    for d in both():
        c = d.connect()
        out = []
        uri = exported_read_only(c, d, img, fmt, out)
        out.append(("io", qemu_io_lines("-r", "-f", "raw",
                                        *[a for r in reads for a in ("-c", r)], uri)))
        c.close()
        d.stop()
        results.append(out)
    assert_same_transcript(*results)
    return results[1]
