"""The `luks` driver against qemu-storage-daemon: a volume qemu-img made opened with the same
refusals (no key-secret, an unknown secret, a wrong password, not LUKS), the same node and
format-specific information, the same data read and written through an NBD export;
volumes made by `blockdev-create` on both daemons opened by the other program's tools."""
import json
import shutil
import subprocess

import pytest

from blockjobs import export
from conftest import assert_same_transcript, normalize, recorder

MiB = 1 << 20
SECRETS = ["--object", "secret,id=s0,data=hunter2", "--object", "secret,id=bad,data=nope"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A 16 MiB LUKS volume qemu-img made (with a pattern at 1 MiB), shared read-only."""
    d = tmp_path_factory.mktemp("luks")
    img = d / "v.luks"
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object",
                    "secret,id=s0,data=hunter2", "-o", "key-secret=s0,iter-time=10",
                    str(img), "16M"], check=True)
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


@pytest.mark.parametrize("extra", [{}, {"cipher-alg": "aes-128", "hash-alg": "sha1"}])
def test_blockdev_create_makes_what_qemu_makes(both, tmp_path, extra):
    q, f = both(SECRETS)
    assert created(f, f.workdir / "n.luks", **extra) == created(q, q.workdir / "n.luks",
                                                                **extra)
