"""The `luks` driver against qemu-storage-daemon: a volume qemu-img made opened with the same
refusals (no key-secret, an unknown secret, a wrong password, not LUKS), the same node and
format-specific information, the same data read and written through an NBD export;
volumes made by `blockdev-create` on both daemons opened by the other program's tools."""
import json
import os
import shutil
import subprocess

import pytest

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder

MiB = 1 << 20
SECRETS = ["--object", "secret,id=s0,data=hunter2", "--object", "secret,id=bad,data=nope"]


# The cipher modes LUKS volumes name: QEMU's default (xts-plain64), cbc-plain64 with
# older algorithms, and cbc-essiv:sha256.
MODES = ["", ",cipher-mode=cbc,ivgen-alg=plain64,cipher-alg=aes-128,hash-alg=sha1",
         ",cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256"]


@pytest.fixture(scope="module", params=MODES, ids=["xts", "cbc-plain64", "cbc-essiv"])
def volume(tmp_path_factory, request):
    """A 16 MiB LUKS volume qemu-img made (with a pattern at 1 MiB), shared read-only."""
    d = tmp_path_factory.mktemp("luks")
    img = d / "v.luks"
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object",
                    "secret,id=s0,data=hunter2", "-o", "key-secret=s0,iter-time=10"
                    + request.param, str(img), "16M"], check=True)
    qemu_io(img, "write -P 0x5c 1M 64k")
    return img


def qemu_io(img, *ops):
    args = ["qemu-io", "--object", "secret,id=s0,data=hunter2", "--image-opts"]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [f"driver=luks,key-secret=s0,file.filename={img}"],
                       capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln]


def transcript(d, img):
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f"})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f", "key-secret": "nope"})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f", "key-secret": "bad"})
    cmd("blockdev-add", {"driver": "null-co", "node-name": "z", "size": MiB,
                         "read-zeroes": True})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l2", "file": "z", "key-secret": "s0"})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f", "key-secret": "s0"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(img), "IMG")
    out.append(("nodes", json.loads(text)))
    uri = export(c, d, "l", "l", True)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5c 1M 64k",
                        "-c", "write -P 0x77 3M 100k", "-c", "write -z 5M 64k",
                        "-c", "read -P 0 5M 64k", "-c", "write -P 0x21 6292456 3000",
                        "-c", "read -P 0x21 6292456 3000", "-c", "read -P 0 6291456 1000",
                        uri], capture_output=True, text=True)
    out.append(("io", [ln for ln in r.stdout.splitlines() if " ops; " not in ln]))
    c.close()
    d.stop()
    out.append(("qemu-io", qemu_io(img, "read -P 0x77 3M 100k", "read -P 0 5M 64k",
                                   "read -P 0x21 6292456 3000")))
    return out


def test_luks_volume_matches_qsd(both, volume, tmp_path):
    q, f = both(SECRETS)
    results = []
    for d in (q, f):
        img = d.workdir / "v.luks"
        shutil.copy(volume, img)
        results.append(transcript(d, img))
    assert_same_transcript(*results)


def created(d, img, **extra):
    c = d.connect()
    opts = {"driver": "luks", "file": "f", "size": 8 * MiB, "key-secret": "s0",
            "iter-time": 10, **extra}
    img.write_bytes(b"")
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                  "filename": str(img)}) == {"return": {}}
    r = c.cmd("blockdev-create", {"job-id": "c", "options": opts})
    assert r == {"return": {}}, r
    ev = c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    job = c.cmd("query-jobs")["return"][0]
    assert "error" not in job, job
    c.cmd("job-dismiss", {"id": "c"})
    without_secret = {k: v for k, v in opts.items() if k != "key-secret"}
    c.cmd("blockdev-create", {"job-id": "c2", "options": without_secret})
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    failed = c.cmd("query-jobs")["return"][0].get("error")
    c.close()
    d.stop()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "--object",
                                      "secret,id=s0,data=hunter2", "--image-opts",
                                      f"driver=luks,key-secret=s0,file.filename={img}"],
                                     capture_output=True, text=True, check=True).stdout)
    spec = info["format-specific"]["data"]
    return (ev["event"], failed, info["virtual-size"], spec["cipher-alg"], spec["cipher-mode"],
            spec["ivgen-alg"], spec["hash-alg"], spec["payload-offset"],
            [(s["active"], s["key-offset"], s.get("stripes")) for s in spec["slots"]],
            qemu_io(img, "write -P 0x42 0 64k", "read -P 0x42 0 64k"))


@pytest.mark.parametrize("extra", [
    {}, {"cipher-alg": "aes-128", "hash-alg": "sha1"},
    {"cipher-mode": "cbc", "ivgen-alg": "plain64", "cipher-alg": "aes-128"},
    {"cipher-mode": "cbc", "ivgen-alg": "essiv", "ivgen-hash-alg": "sha256"}])
def test_blockdev_create_makes_what_qemu_makes(both, tmp_path, extra):
    q, f = both(SECRETS)
    assert created(f, f.workdir / "n.luks", **extra) == created(q, q.workdir / "n.luks",
                                                                **extra)


def refusals_transcript(d):
    """blockdev-create's refusals in QEMU's order (the file before the key, the size once
    the header's is known: nothing written then), and block_resize past the longest node
    (iotest 210)."""
    img = d.workdir / "r.luks"
    img.write_bytes(b"")
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": str(img)})

    def create(job, **options):
        cmd("blockdev-create", {"job-id": job, "options": dict({"driver": "luks"}, **options)})
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        out.append((job, c.cmd("query-jobs")["return"][0].get("error")))
        c.cmd("job-dismiss", {"id": job})
    create("nofile", file="nosuch", size=MiB)
    create("nokey", file="f", size=MiB)
    create("ok", file="f", size=0, **{"key-secret": "s0", "iter-time": 10})
    for i, size in enumerate((2**64 - 512, 2**63, 2**63 - 512)):
        create(f"big{i}", file="f", size=size, **{"key-secret": "s0", "iter-time": 10})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "f", "key-secret": "s0"})
    for size in (2**63 - 512, 2**63, 2**64 - 512, -2**63, MiB):
        cmd("block_resize", {"node-name": "l", "size": size})
    out.append(c.cmd("query-named-block-nodes", {"flat": True})["return"][0]["image"]
               ["virtual-size"])
    c.close()
    d.stop()
    return out


def test_create_refusals_and_oversized_resizes_match_qsd(both):
    q, f = both(SECRETS)
    assert_same_transcript(refusals_transcript(q), refusals_transcript(f))


def detached_transcript(start):
    """A volume with a detached header (QEMU 9.0's `header`): made by blockdev-create with
    the payload preallocated, then (in a new process, as iotest luks-detached-header does)
    opened and written through an NBD export; QEMU's refusals; what qemu-io makes of the
    two files afterwards."""
    extra = SECRETS + ["--object", "secret,id=s1,data=other"]
    d = start(extra)
    w = d.workdir
    for name in ("h", "p", "h2"):
        (w / name).write_bytes(b"")
    c = d.connect()
    out = []
    cmd = recorder(c, out)

    def add_files():
        for name in ("h", "p", "h2"):
            cmd("blockdev-add", {"driver": "file", "node-name": name,
                                 "filename": str(w / name)})
    add_files()

    def create(job, **options):
        cmd("blockdev-create", {"job-id": job, "options": dict(
            {"driver": "luks", "key-secret": "s0", "iter-time": 10}, **options)})
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        out.append((job, c.cmd("query-jobs")["return"][0].get("error")))
        c.cmd("job-dismiss", {"id": job})
    create("neither", size=MiB)
    create("prealloc-alone", header="h2", size=MiB, preallocation="full")
    create("header-alone", header="h2", size=MiB)
    create("both", header="h", file="p", size=4 * MiB, preallocation="full")
    c.close()
    d.stop()
    d = start(extra)
    c = d.connect()
    cmd = recorder(c, out)
    add_files()
    cmd("blockdev-add", {"driver": "luks", "node-name": "alone", "file": "h",
                         "key-secret": "s0"})
    cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "p", "header": "h",
                         "key-secret": "s0"})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    node = next(n for n in nodes if n["node-name"] == "l")
    spec = node["image"]["format-specific"]["data"]
    out.append((node["image"]["virtual-size"], spec["detached-header"],
                spec["payload-offset"], [s["active"] for s in spec["slots"]]))
    uri = export(c, d, "l", "l", True)
    out.append(qemu_io_uri(uri, "write -P 0x3c 64k 64k", "read -P 0x3c 64k 64k"))
    c.close()
    d.stop()
    sizes = [os.path.getsize(w / n) for n in ("h", "p", "h2")]
    out.append((sizes, os.stat(w / "p").st_blocks * 512 >= 4 * MiB))
    for pw in ("hunter2", "other"):
        r = subprocess.run(["qemu-io", "--object", f"secret,id=k,data={pw}", "-c",
                            "read -P 0x3c 64k 64k", "--image-opts",
                            f"driver=luks,key-secret=k,file.filename={w / 'p'},"
                            f"header.filename={w / 'h'}"], capture_output=True, text=True)
        out.append((pw, r.returncode, r.stdout.splitlines()[:1]))
    return json.loads(json.dumps(out).replace(str(w), "W"))


def qemu_io_uri(uri, *ops):
    args = ["qemu-io", "-f", "raw"]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [uri], capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln]


def test_detached_headers_match_qsd(ferrite, qsd):
    assert_same_transcript(detached_transcript(qsd), detached_transcript(ferrite))


def test_a_new_detached_volume_opens_in_the_process_that_made_it_and_amends(ferrite):
    """ferrite alone: qemu-storage-daemon 10.0.2 keeps a block backend on the payload after
    making a detached-header volume (its `block_crypto_co_format_luks_payload` never lets it
    go), so it cannot open the volume until it restarts; and it aborts (a graph-lock
    assertion) on x-blockdev-amend of such a volume. ferrite opens it at once and adds a
    key slot, which QEMU's qemu-io then opens the volume with."""
    d = ferrite(SECRETS + ["--object", "secret,id=s1,data=other"])
    for name in ("h", "p"):
        (d.workdir / name).write_bytes(b"")
    c = d.connect()
    for name in ("h", "p"):
        assert c.cmd("blockdev-add", {"driver": "file", "node-name": name,
                                      "filename": str(d.workdir / name)}) == {"return": {}}
    c.cmd("blockdev-create", {"job-id": "j", "options": {
        "driver": "luks", "header": "h", "file": "p", "key-secret": "s0", "iter-time": 10,
        "size": MiB}})
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    assert c.cmd("query-jobs")["return"][0].get("error") is None
    assert c.cmd("blockdev-add", {"driver": "luks", "node-name": "l", "file": "p",
                                  "header": "h", "key-secret": "s0"}) == {"return": {}}
    c.cmd("x-blockdev-amend", {"job-id": "a", "node-name": "l", "options": {
        "driver": "luks", "state": "active", "new-secret": "s1", "iter-time": 10}})
    c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    assert c.cmd("query-jobs")["return"][0].get("error") is None
    c.close()
    d.stop()
    r = subprocess.run(["qemu-io", "--object", "secret,id=k,data=other", "-c", "read 0 512",
                        "--image-opts", f"driver=luks,key-secret=k,file.filename="
                        f"{d.workdir / 'p'},header.filename={d.workdir / 'h'}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


AMEND_SECRETS = SECRETS + ["--object", "secret,id=s1,data=other", "--object",
                           "secret,id=s2,data=third"]


def amend_transcript(d, fmt):
    """x-blockdev-amend of the key slots of a volume and of an encrypted qcow2 image:
    slots added and erased, QEMU's refusals in QEMU's order, the slots a query shows, and
    which passwords open the image afterwards (qemu-img)."""
    img = d.workdir / f"a.{fmt}"
    pfx, extra = ("encrypt.", ["-o", "encrypt.format=luks"]) if fmt == "qcow2" else ("", [])
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, "--object",
                    "secret,id=s0,data=hunter2", "-o", f"{pfx}key-secret=s0,{pfx}iter-time=10",
                    *extra, str(img), "1M"], check=True)
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    secret = {"key-secret": "s0"}
    node = {"driver": fmt, "node-name": "n", "file": {"driver": "file", "filename": str(img)}}
    node.update({"encrypt": {"format": "luks", **secret}} if fmt == "qcow2" else secret)
    cmd("blockdev-add", node)

    def amend(job, force=False, **luks):
        options = {"driver": fmt}
        options.update({"encrypt": {"format": "luks", **luks}} if fmt == "qcow2" else luks)
        args = {"job-id": job, "node-name": "n", "options": options}
        if force:
            args["force"] = True
        cmd("x-blockdev-amend", args)
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        job_info = c.cmd("query-jobs")["return"][0]
        out.append((job, job_info.get("error")))
        c.cmd("job-dismiss", {"id": job})
    amend("add", state="active", **{"new-secret": "s1", "iter-time": 10})
    amend("add5", state="active", keyslot=5, **{"new-secret": "s2", "iter-time": 10})
    amend("over", state="active", keyslot=5, **{"new-secret": "s1", "iter-time": 10})
    amend("nosecret", state="active", **{"new-secret": "nope", "iter-time": 10})
    amend("badslot", state="active", keyslot=9, **{"new-secret": "s1"})
    amend("with-old", state="active", **{"new-secret": "s1", "old-secret": "s0"})
    amend("erase-none", state="inactive")
    amend("erase-iter", state="inactive", keyslot=1, **{"iter-time": 10})
    amend("erase-mismatch", state="inactive", keyslot=5, **{"old-secret": "s0"})
    amend("erase-old", state="inactive", **{"old-secret": "s0"})
    amend("erase-empty", state="inactive", keyslot=0)
    amend("erase-5", state="inactive", keyslot=5)
    amend("erase-last", state="inactive", keyslot=1)
    amend("erase-unknown", state="inactive", **{"old-secret": "s2"})
    info = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    spec = next(n for n in info if n["node-name"] == "n")["image"]["format-specific"]["data"]
    spec = spec.get("encrypt", spec)
    out.append(("slots", [s["active"] for s in spec["slots"]]))
    cmd("blockdev-del", {"node-name": "n"})
    c.close()
    d.stop()
    opens = []
    for pw in ("hunter2", "other", "third"):
        r = subprocess.run(["qemu-io", "--object", f"secret,id=k,data={pw}", "-c",
                            "read 0 512", "--image-opts",
                            f"driver={fmt},{pfx}key-secret=k,file.filename={img}"],
                           capture_output=True, text=True)
        opens.append(r.returncode)
    out.append(("opens", opens))
    return out


def test_amending_key_slots_matches_qsd(both):
    """Against qemu-storage-daemon with an encrypted qcow2 image; a `luks` volume must go
    the same way (QEMU's key slot code is one for both), but qemu-storage-daemon 10.0.2
    aborts on x-blockdev-amend of a luks node (an assertion in its graph lock), so ferrite's
    luks run is held to the qcow2 transcript."""
    q, f = both(AMEND_SECRETS)
    expected = amend_transcript(q, "qcow2")
    assert ("opens", [1, 0, 1]) in expected
    assert amend_transcript(f, "qcow2") == expected
    f2 = both(AMEND_SECRETS)[1]
    assert amend_transcript(f2, "luks") == expected


def sharing_transcript(a, b, fmt):
    """Two daemons of one program open the same image; x-blockdev-amend and qemu-img amend
    try to rewrite its key slots while the other holds it (iotest 296's scenario, the
    refusals only: qemu-storage-daemon 10.0.2 aborts once a luks amendment runs). Replies,
    the job's status events, and qemu-img's answer."""
    img = a.workdir / f"shared.{fmt}"
    pfx, extra = ("encrypt.", ["-o", "encrypt.format=luks"]) if fmt == "qcow2" else ("", [])
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, "--object",
                    "secret,id=s0,data=hunter2", "-o", f"{pfx}key-secret=s0,{pfx}iter-time=10",
                    *extra, str(img), "1M"], check=True)
    ca, cb = a.connect(), b.connect()
    out = []

    def node(read_only=False):
        n = {"driver": fmt, "node-name": "n", "read-only": read_only,
             "file": {"driver": "file", "filename": str(img)}}
        n.update({"encrypt": {"format": "luks", "key-secret": "s0"}} if fmt == "qcow2"
                  else {"key-secret": "s0"})
        return n

    def amend(c, who):
        luks = {"state": "active", "new-secret": "s1", "iter-time": 10}
        options = {"driver": fmt, **({"encrypt": {"format": "luks", **luks}} if fmt == "qcow2"
                                     else luks)}
        r = c.cmd("x-blockdev-amend", {"job-id": "j", "node-name": "n", "options": options})
        statuses = [e["data"]["status"] for e in c.events if e["event"] == "JOB_STATUS_CHANGE"]
        c.events.clear()
        out.append((who, r.get("error", r.get("return")), statuses))

    def qemu_img_amend():
        r = subprocess.run(["qemu-img", "amend", "--object", "secret,id=s0,data=hunter2",
                            "--object", "secret,id=s1,data=other", "-o", f"{pfx}state=active",
                            "-o", f"{pfx}new-secret=s1", "-o", f"{pfx}iter-time=10",
                            "--image-opts", f"driver={fmt},{pfx}key-secret=s0,file.filename={img}"],
                           capture_output=True, text=True)
        out.append(("qemu-img", r.returncode, r.stderr.replace(str(img), "IMG")))

    out.append(("a add", ca.cmd("blockdev-add", node(read_only=True))))
    out.append(("b add", cb.cmd("blockdev-add", node())))
    amend(ca, "a (read-only)")
    amend(cb, "b (a holds the image)")
    qemu_img_amend()
    out.append(("a reopen", ca.cmd("blockdev-reopen", {"options": [node()]})))
    amend(ca, "a (b holds the image)")
    amend(cb, "b (a holds the image)")
    ca.close()
    cb.close()
    return out


def test_key_slots_change_only_while_nobody_else_holds_the_image_like_qsd(both):
    q1, f1 = both(AMEND_SECRETS)
    q2, f2 = both(AMEND_SECRETS)
    expected = sharing_transcript(q1, q2, "luks")
    assert ("a (b holds the image)",
            {"class": "GenericError", "desc": 'Failed to get shared "consistent read" lock'},
            ["created", "null"]) in expected
    assert sharing_transcript(f1, f2, "luks") == expected


def test_a_luks_amendment_runs_once_the_other_holder_lets_go(ferrite, tmp_path):
    """What qemu-storage-daemon 10.0.2 cannot show (it aborts): the amendment that was
    refused runs once the other daemon closes the image, takes the file to itself only
    while it runs, and the new password opens the volume."""
    img = tmp_path / "v.luks"
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object",
                    "secret,id=s0,data=hunter2", "-o", "key-secret=s0,iter-time=10",
                    str(img), "1M"], check=True)
    a, b = ferrite(AMEND_SECRETS), ferrite(AMEND_SECRETS)
    ca, cb = a.connect(), b.connect()
    node = {"driver": "luks", "node-name": "n", "key-secret": "s0",
            "file": {"driver": "file", "filename": str(img)}}
    assert ca.cmd("blockdev-add", node) == {"return": {}}
    assert cb.cmd("blockdev-add", node) == {"return": {}}
    args = {"job-id": "j", "node-name": "n",
            "options": {"driver": "luks", "state": "active", "new-secret": "s1",
                        "iter-time": 10}}
    assert "error" in ca.cmd("x-blockdev-amend", args)
    assert cb.cmd("blockdev-del", {"node-name": "n"}) == {"return": {}}
    assert ca.cmd("x-blockdev-amend", args) == {"return": {}}
    ca.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
    assert "error" not in ca.cmd("query-jobs")["return"][0]
    assert ca.cmd("job-dismiss", {"id": "j"}) == {"return": {}}
    # The amendment over, the image can be shared again.
    assert cb.cmd("blockdev-add", node) == {"return": {}}
    for c in (ca, cb):
        assert c.cmd("blockdev-del", {"node-name": "n"}) == {"return": {}}
        c.close()
    r = subprocess.run(["qemu-io", "--object", "secret,id=k,data=other", "-c", "read 0 512",
                        "--image-opts", f"driver=luks,key-secret=k,file.filename={img}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_amending_a_read_only_encrypted_qcow2_fails_in_its_job_like_qsd(both):
    q, f = both(AMEND_SECRETS)
    results = []
    for d in (q, f):
        img = d.workdir / "ro.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object",
                        "secret,id=s0,data=hunter2", "-o",
                        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                        str(img), "1M"], check=True)
        c = d.connect()
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "n", "read-only": True,
                               "encrypt": {"format": "luks", "key-secret": "s0"},
                               "file": {"driver": "file", "filename": str(img)}})
        r = c.cmd("x-blockdev-amend", {"job-id": "j", "node-name": "n", "options": {
            "driver": "qcow2", "encrypt": {"format": "luks", "state": "active",
                                           "new-secret": "s1", "iter-time": 10}}})
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        results.append((r, c.cmd("query-jobs")["return"][0].get("error")))
        c.close()
    assert results[0][1] == "Could not read encryption header: Operation not permitted"
    assert results[1] == results[0]


@pytest.mark.parametrize("fmt,extra", [
    ("luks", {"key-secret": "s", "iter-time": 10}), ("luks", {"key-secret": "nope"}),
    ("vdi", {}), ("vpc", {}), ("vmdk", {})], ids=["luks", "luks-no-secret", "vdi", "vpc",
                                                   "vmdk"])
def test_blockdev_create_lets_go_of_its_inline_file(both, fmt, extra):
    """A `file` given inline to `blockdev-create` is the job's own: no node is left once
    it ends, made or refused, as under qsd."""
    results = []
    for d in both():
        c = d.connect()
        c.cmd("object-add", {"qom-type": "secret", "id": "s", "data": "pw"})
        img = d.workdir / f"i.{fmt}"
        img.write_bytes(b"")
        assert c.cmd("blockdev-create", {"job-id": "j", "options": {
            "driver": fmt, "size": 1 << 20, **extra,
            "file": {"driver": "file", "filename": str(img)}}}) == {"return": {}}
        c.wait_event("JOB_STATUS_CHANGE", lambda e: e["data"]["status"] == "concluded")
        results.append((c.cmd("query-jobs")["return"][0].get("error"),
                        c.cmd("query-named-block-nodes")["return"]))
        c.close()
    assert results[1] == results[0]
