"""Encrypted qcow2 (`encrypt.format=luks`) against qemu-storage-daemon: images qemu-img made
opened with the same refusals and node information, read and written through an NBD export
(whole and partial sectors, a cluster copied on write from a plain backing file), and read
back by qemu-io; `qemu-img check` clean."""
import json
import re
import shutil
import subprocess

import pytest

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder

SECRET = "secret,id=s0,data=hunter2"
SECRETS = ["--object", SECRET, "--object", "secret,id=bad,data=nope"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A plain backing image and an encrypted overlay over it, made by qemu-img."""
    d = tmp_path_factory.mktemp("enc")
    base = d / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x66 4M 128k", str(base)], check=True,
                   capture_output=True)
    top = d / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "--object", SECRET,
                    "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                    "-b", "base.qcow2", "-F", "qcow2", str(top), "16M"], check=True)
    qemu_io(top, "write -P 0x5c 1M 64k", "write -P 0x11 100k 1k")
    return base, top


def qemu_io(img, *ops):
    args = ["qemu-io", "--object", SECRET, "--image-opts"]
    for op in ops:
        args += ["-c", op]
    r = subprocess.run(args + [f"driver=qcow2,encrypt.key-secret=s0,file.filename={img}"],
                       capture_output=True, text=True)
    return [ln for ln in r.stdout.splitlines() if " ops; " not in ln] + r.stderr.splitlines()


def transcript(d):
    w = d.workdir
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "top.qcow2"})
    cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
    cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f",
                         "encrypt": {"format": "luks", "key-secret": "bad"}})
    cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f",
                         "encrypt": {"format": "luks", "key-secret": "s0"}})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    text = normalize(json.dumps(nodes, sort_keys=True)).replace(str(w), "W")
    # Generated names count attempts differently (QEMU counts the refused opens too).
    text = re.sub(r"#block[0-9]+", "#block", text)
    out.append(("nodes", json.loads(text)))
    uri = export(c, d, "q", "q", True)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5c 1M 64k",
                        "-c", "read -P 0x11 100k 1k", "-c", "read -P 0x66 4M 128k",
                        "-c", "write -P 0x77 3M 100k", "-c", "write -P 0x21 6292456 3000",
                        "-c", "read -P 0x21 6292456 3000", "-c", "write -P 0x33 101k 100",
                        "-c", "write -P 0x44 4160k 4k", "-c", "read -P 0x66 4M 64k",
                        "-c", "write -z 8M 64k", "-c", "read -P 0 8M 64k", uri],
                       capture_output=True, text=True)
    out.append(("io", [ln for ln in r.stdout.splitlines() if " ops; " not in ln]))
    c.close()
    d.stop()
    out.append(("qemu-io", qemu_io(w / "top.qcow2", "read -P 0x77 3M 100k",
                                   "read -P 0x21 6292456 3000", "read -P 0x33 101k 100",
                                   "read -P 0x11 100k 1024", "read -P 0x44 4160k 4k",
                                   "read -P 0x66 4M 64k", "read -P 0 8M 64k")))
    r = subprocess.run(["qemu-img", "check", "--object", SECRET, "--image-opts",
                        f"driver=qcow2,encrypt.key-secret=s0,file.filename={w / 'top.qcow2'}"],
                       capture_output=True, text=True)
    out.append(("check", r.returncode))
    return out


def test_encrypted_qcow2_matches_qsd(both, images):
    q, f = both(SECRETS)
    results = []
    for d in (q, f):
        for img in images:
            shutil.copy(img, d.workdir / img.name)
        results.append(transcript(d))
    assert_same_transcript(*results)


def created(d):
    """An encrypted image made by `blockdev-create`, as qemu-img and qemu-io see it."""
    img = d.workdir / "new.qcow2"
    img.write_bytes(b"")
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "file", "node-name": "f",
                                  "filename": str(img)}) == {"return": {}}
    out = []
    for job, encrypt in (("bad", {"format": "luks"}),
                         ("c", {"format": "luks", "key-secret": "s0", "iter-time": 10})):
        r = c.cmd("blockdev-create", {"job-id": job, "options": {
            "driver": "qcow2", "file": "f", "size": 8 << 20, "encrypt": encrypt}})
        assert r == {"return": {}}, r
        c.wait_event("JOB_STATUS_CHANGE", lambda e, j=job: e["data"]["id"] == j
                     and e["data"]["status"] == "concluded")
        out.append(c.cmd("query-jobs")["return"][-1].get("error"))
        c.cmd("job-dismiss", {"id": job})
    c.close()
    d.stop()
    info = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "--object", SECRET, "--image-opts",
         f"driver=qcow2,encrypt.key-secret=s0,file.filename={img}"],
        capture_output=True, text=True, check=True).stdout)
    enc = info["format-specific"]["data"]["encrypt"]
    out.append((info["virtual-size"], info.get("encrypted"), enc["format"], enc["cipher-alg"],
                enc["cipher-mode"], enc["ivgen-alg"], enc["hash-alg"],
                [(s["active"], s["key-offset"]) for s in enc["slots"]]))
    out.append(qemu_io(img, "write -P 0x42 0 64k", "read -P 0x42 0 64k"))
    r = subprocess.run(["qemu-img", "check", "--object", SECRET, "--image-opts",
                        f"driver=qcow2,encrypt.key-secret=s0,file.filename={img}"],
                       capture_output=True, text=True)
    out.append((r.returncode, r.stdout.splitlines()[:1]))
    return out


def test_blockdev_create_makes_what_qemu_makes(both):
    q, f = both(SECRETS)
    assert created(f) == created(q)
