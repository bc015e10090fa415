"""The `vvfat` driver: a host directory as a FAT disk.

Read-only, against qemu-storage-daemon: the same sectors (MBR, boot sector, both FATs, every
directory with its long and 8.3 names and host times, the files' data) for every geometry
and FAT type, the same node information, the same refusals. QEMU fills the unused end of a
file's last cluster with whatever its cluster buffer held before; ferrite reads zeroes there,
so that slack is masked (after checking ferrite's is zero).

Writable (`rw`): mtools, a FAT implementation of its own, writes through a FUSE export of
the node (creating, overwriting, renaming, moving and deleting files and directories); the
host directory must end as mtools was told, and the disk must read back as written. QEMU's
own driver fails at that (it asserts on a directory rename and leaves deleted files), so
those results are checked against the expected tree, not against qsd. Sector writes that QEMU
does handle (file data in place, the boot sector's dirty byte, a protected boot sector) are
compared with qsd."""
import json
import os
import shutil
import struct
import subprocess

import pytest

from blockjobs import export, qemu_io
from conftest import assert_same_transcript, recorder, wait_for

MIB = 1 << 20


def populate(root):
    """A tree that exercises the naming rules: lossy and clashing 8.3 names, leading and
    repeated dots, spaces, non-ASCII, empty files, a file of exactly one cluster, nested and
    empty directories."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "file0.txt").write_text("Hello, world! 0\n")
    (root / "Big_File.Name.txt").write_bytes(b"x" * 9000)
    (root / "exact.bin").write_bytes(bytes(range(256)) * 32)
    (root / "empty").touch()
    (root / ".hidden").write_text("h")
    (root / "a b c.d.e").write_text("dots")
    for i in range(12):
        (root / f"longname{i}.text").write_text(str(i) * (i + 1))
    (root / "ünïcödé näme.txt").write_text("unicode")
    (root / "UPPER.TXT").write_text("U")
    deeper = root / "sub" / "deeper"
    deeper.mkdir(parents=True)
    (deeper / "inner.txt").write_bytes(bytes((i * 7) % 251 for i in range(20000)))
    (root / "sub" / "emptydir").mkdir()
    return root


def le16(b, at):
    return struct.unpack_from("<H", b, at)[0]


class FatImage:
    """A reader of the disk, written from the FAT specification: the files it holds, with
    their clusters and sizes."""

    def __init__(self, img, fat_bits):
        self.img = img
        self.bits = fat_bits
        self.start = 0 if img[:3] == b"\xeb\x3e\x90" else struct.unpack_from("<I", img, 0x1c6)[0]
        bs = img[self.start * 512:]
        self.spc, self.reserved, self.fats = bs[13], le16(bs, 14), bs[16]
        self.root_entries, self.spf = le16(bs, 17), le16(bs, 22)
        self.label = bs[43:54]
        self.fat = (self.start + self.reserved) * 512
        self.root = self.start + self.reserved + self.fats * self.spf
        self.end = {12: 0xff8, 16: 0xfff8, 32: 0x0ffffff8}[fat_bits]

    def entry(self, c):
        if self.bits == 12:
            pair = le16(self.img, self.fat + c * 3 // 2)
            return (pair >> 4) if c & 1 else pair & 0xfff
        if self.bits == 16:
            return le16(self.img, self.fat + 2 * c)
        return struct.unpack_from("<I", self.img, self.fat + 4 * c)[0]

    def chain(self, c):
        out = []
        while c < self.end and len(out) < 100000:
            out.append(c)
            c = self.entry(c)
        return out

    def cluster_at(self, c):
        return (self.root + c * self.spc) * 512

    def cluster(self, c):
        at = self.cluster_at(c)
        return self.img[at:at + self.spc * 512]

    def files(self):
        """{path: (is_dir, chain, size)} for everything under the root."""
        out = {}
        self._walk(self.img[self.root * 512:self.root * 512 + self.root_entries * 32], "", out)
        return out

    def _walk(self, data, prefix, out):
        parts = {}
        for i in range(0, len(data), 32):
            e = data[i:i + 32]
            if e[0] == 0:
                break
            if e[0] == 0xe5:
                parts = {}
                continue
            if e[11] == 0x0f:
                raw = e[1:11] + e[14:26] + e[28:32]
                parts[e[0] & 0x3f] = raw.decode("utf-16-le").split("\x00")[0].rstrip("\uffff")
                continue
            if e[11] & 0x08 or e[0:1] == b".":
                parts = {}
                continue
            if parts:
                name = "".join(parts[k] for k in sorted(parts))
            else:
                base, ext = e[:8].decode().rstrip().lower(), e[8:11].decode().rstrip().lower()
                name = base + ("." + ext if ext else "")
            parts = {}
            first = le16(e, 26) | (le16(e, 20) << 16)
            size = struct.unpack_from("<I", e, 28)[0]
            is_dir = bool(e[11] & 0x10)
            chain = self.chain(first) if (is_dir or size) else []
            out[prefix + name] = (is_dir, chain, size)
            if is_dir:
                self._walk(b"".join(self.cluster(c) for c in chain), prefix + name + "/", out)

    def read(self, path):
        _, chain, size = self.files()[path]
        return b"".join(self.cluster(c) for c in chain)[:size]

    def slack(self):
        """The byte ranges past each file's end in its last cluster."""
        cs = self.spc * 512
        out = []
        for is_dir, chain, size in self.files().values():
            if not is_dir and chain and size % cs:
                at = self.cluster_at(chain[-1])
                out.append((at + size % cs, at + cs))
        return out


def dump(c, d, node, length=4 * MIB, uri=None):
    """The first `length` bytes of node `node`, read through an NBD export (made on the
    monitor connection `c` unless `uri` names one)."""
    uri = uri or export(c, d, node, node, False)
    out = d.workdir / f"{node}.img"
    subprocess.run(["qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=1M",
                    f"count={length // MIB}", f"if={uri}", f"of={out}"], check=True)
    return out.read_bytes()


def host_tree(root):
    """{relative path: bytes, or None for a directory}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for n in dirnames:
            out[os.path.normpath(os.path.join(rel, n))] = None
        for n in filenames:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.normpath(os.path.join(rel, n))] = f.read()
    return out


LAYOUTS = {
    "default": ({}, 16),
    "fat12": ({"fat-type": 12}, 12),
    "fat32": ({"fat-type": 32}, 32),
    "floppy": ({"floppy": True}, 12),
    "floppy-fat12": ({"floppy": True, "fat-type": 12}, 12),
    "floppy-fat16": ({"floppy": True, "fat-type": 16}, 16),
    "label": ({"label": "MY DISK"}, 16),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_disk_is_qsds(both, tmp_path, layout):
    """The same sectors, node information and warnings; the files read back from the FAT
    as the host holds them."""
    opts, bits = LAYOUTS[layout]
    root = populate(tmp_path / "dir")
    images, transcripts = [], []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        cmd("blockdev-add", {"driver": "vvfat", "node-name": "v", "dir": str(root),
                             "read-only": True, **opts})
        out.append(("nodes", [{k: n[k] for k in ("ro", "drv", "image", "file")}
                              for n in c.cmd("query-named-block-nodes")["return"]]))
        images.append(dump(c, d, "v"))
        c.close()
        d.stop()
        out.append(("stderr", d.stderr_path.read_text().replace("qemu-storage-daemon: ", "")
                    .replace("ferrite-storage-daemon: ", "")))
        transcripts.append(out)
    assert_same_transcript(*transcripts)
    qemu, ours = (bytearray(i) for i in images)
    fat = FatImage(bytes(ours), bits)
    assert fat.label == (opts.get("label", "QEMU VVFAT").encode().ljust(11))
    files = fat.files()
    for rel, data in host_tree(root).items():
        assert rel in files, rel
        if data is not None:
            assert fat.read(rel) == data, rel
    assert len(files) == len(host_tree(root))
    for a, b in fat.slack():
        assert ours[a:b] == bytes(b - a)
        qemu[a:b] = bytes(b - a)
    assert qemu == ours


def test_refusals_are_qsds(both, tmp_path):
    """Bad options and directories the disk cannot hold: the same errors."""
    root = populate(tmp_path / "dir")
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "huge", "wb") as f:
        f.truncate(3 << 30)
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for i in range(300):
        (crowded / f"f{i}").touch()
    full = tmp_path / "full"
    full.mkdir()
    (full / "data").write_bytes(b"\1" * (3 * MIB))
    cases = [
        {"dir": str(root), "read-only": True, "label": "123456789012"},
        {"dir": str(root), "read-only": True, "fat-type": 13},
        {"dir": str(tmp_path / "nonexistent"), "read-only": True},
        {"dir": str(root), "read-only": True, "rw": True},
        {"dir": str(root)},
        {"dir": str(root), "auto-read-only": True},
        {"dir": str(big), "read-only": True},
        {"dir": str(crowded), "read-only": True},
        {"dir": str(full), "read-only": True, "floppy": True},
        {"dir": str(root), "read-only": True, "fat-type": 0, "floppy": False},
    ]
    results = []
    for d in both():
        c = d.connect()
        out = []
        cmd = recorder(c, out)
        for i, case in enumerate(cases):
            cmd("blockdev-add", {"driver": "vvfat", "node-name": f"n{i}", **case})
        out.append(("ro", [(n["node-name"], n["ro"])
                           for n in c.cmd("query-named-block-nodes")["return"]]))
        c.close()
        d.stop()
        err = d.stderr_path.read_text()
        out.append(("stderr", sorted(ln.split(": ", 1)[-1] for ln in err.splitlines())))
        results.append(json.loads(json.dumps(out).replace(str(tmp_path), "TMP")))
    assert_same_transcript(*results)


def test_sector_writes_are_qsds(both, tmp_path):
    """What QEMU's driver does with sector writes: file data changed in place reaches the
    host file; the boot sector takes only its dirty byte; the MBR takes nothing, nor does a
    file the host does not let anyone write."""
    trees = []
    for d in both():
        root = populate(tmp_path / f"dir-{len(trees)}")
        os.chmod(root / "file0.txt", 0o444)
        c = d.connect()
        assert c.cmd("blockdev-add", {"driver": "vvfat", "node-name": "v", "dir": str(root),
                                      "rw": True}) == {"return": {}}
        uri = export(c, d, "v", "v", True)
        fat = FatImage(dump(c, d, "v", uri=uri), 16)
        _, chain, _ = fat.files()["sub/deeper/inner.txt"]
        at = fat.cluster_at(chain[1])
        _, big, _ = fat.files()["Big_File.Name.txt"]
        # The sector the file ends in (its bytes 8704 to 9000) and the one after it.
        end = fat.cluster_at(big[1]) + 512
        qemu_io(uri, f"write -P 0x41 {at} 512", f"write -P 0x42 {at + 4096} 1024",
                f"write -P 0x44 {end} 1024")
        boot = 63 * 512
        lines = []
        _, protected, _ = fat.files()["file0.txt"]
        for op in (f"write -P 0 {boot} 512", "write -P 0 0 512",
                   f"write -P 0x43 {fat.cluster_at(protected[0])} 512"):
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", op, uri], capture_output=True,
                               text=True)
            lines.append((r.stdout + r.stderr).splitlines()[:1])
        sector = bytearray(fat.img[boot:boot + 512])
        sector[37] = 1
        (tmp_path / "boot").write_bytes(sector)
        qemu_io(uri, f"write -s {tmp_path / 'boot'} {boot} 512")
        after = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", f"read -v {boot + 32} 16",
                                uri], capture_output=True, text=True).stdout.splitlines()[0]
        c.close()
        d.stop()
        trees.append((host_tree(root), lines, after, sorted(
            ln.replace(str(root), "DIR") for ln in d.stderr_path.read_text().splitlines()
            if "protected" in ln)))
    assert trees[0] == trees[1]
    assert trees[1][1] == [["write failed: Operation not permitted"]] * 3
    assert trees[1][3] == ["Tried to write to protected bootsector",
                           "Tried to write to write-protected file DIR/file0.txt"]
    assert trees[1][0]["file0.txt"] == b"Hello, world! 0\n"
    assert trees[1][0]["Big_File.Name.txt"] == b"x" * 8704 + b"D" * 296
    inner = trees[1][0]["sub/deeper/inner.txt"]
    assert inner[8192:8704] == b"A" * 512 and inner[12288:13312] == b"B" * 1024


def mtools(img, *args):
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="0")
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse here")
@pytest.mark.skipif(shutil.which("mcopy") is None, reason="mtools is not installed")
@pytest.mark.parametrize("fat_type", [16, 12])
def test_mtools_changes_reach_the_directory(ferrite, tmp_path, fat_type):
    """A FAT implementation of its own (mtools) creates, overwrites, grows, truncates,
    renames, moves and deletes files and directories on the disk, through a FUSE export of
    the node: the host directory ends as it was told, and the disk reads back the same."""
    root = populate(tmp_path / "dir")
    mnt = tmp_path / "mnt"
    mnt.touch()
    d = ferrite(["--blockdev", f"driver=vvfat,node-name=v,dir={root},rw=on,fat-type={fat_type}",
                 "--export", f"fuse,id=e,node-name=v,mountpoint={mnt},writable=on"])
    wait_for(lambda: os.stat(mnt).st_size > 0, what="FUSE mount")
    img = f"{mnt}@@{63 * 512}"
    expected = host_tree(root)
    src = tmp_path / "src"
    src.mkdir()

    def put(name, data, target):
        (src / name).write_bytes(data)
        mtools(img, "mcopy", "-o", "-i", img, str(src / name), f"::/{target}")
        expected[target] = data

    put("n1", b"new file\n", "NEWFILE.TXT".lower())
    put("n2", os.urandom(100_000), "A Long Name With Spaces.data")
    mtools(img, "mmd", "-i", img, "::/newdir")
    mtools(img, "mmd", "-i", img, "::/newdir/nested")
    expected["newdir"] = expected["newdir/nested"] = None
    put("n3", b"inside\n", "newdir/nested/inside.txt")
    put("n4", b"grown " * 5000, "file0.txt")
    put("n5", b"cut", "Big_File.Name.txt")
    mtools(img, "mdel", "-i", img, "::/exact.bin")
    del expected["exact.bin"]
    mtools(img, "mdeltree", "-i", img, "::/sub/deeper")
    del expected["sub/deeper"], expected["sub/deeper/inner.txt"]
    mtools(img, "mren", "-i", img, "::/UPPER.TXT", "::/renamed.txt")
    expected["renamed.txt"] = expected.pop("UPPER.TXT")
    mtools(img, "mren", "-i", img, "::/sub", "::/moved")
    expected["moved"] = expected.pop("sub")
    expected["moved/emptydir"] = expected.pop("sub/emptydir")
    mtools(img, "mmove", "-i", img, "::/longname3.text", "::/newdir/longname3.text")
    expected["newdir/longname3.text"] = expected.pop("longname3.text")
    assert host_tree(root) == expected
    assert mtools(img, "mtype", "-i", img, "::/file0.txt").encode() == b"grown " * 5000
    listing = mtools(img, "mdir", "-i", img, "-b", "::/newdir/nested")
    assert listing.split() == ["::/newdir/nested/inside.txt"]
    d.stop()
    assert host_tree(root) == expected


def test_a_guest_scribbling_over_the_metadata_harms_nothing_outside(ferrite, tmp_path):
    """Garbage over the FAT and the root directory: the daemon serves on, nothing outside
    the directory changes, and entries that would name a path outside it are not
    followed."""
    root = populate(tmp_path / "dir")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    d = ferrite()
    c = d.connect()
    assert c.cmd("blockdev-add", {"driver": "vvfat", "node-name": "v", "dir": str(root),
                                  "rw": True}) == {"return": {}}
    uri = export(c, d, "v", "v", True)
    fat = FatImage(dump(c, d, "v", uri=uri), 16)
    root_dir = fat.root * 512
    # An entry named ".." with a long name "../outside.txt" and a cluster chain of its own.
    long = bytearray(32)
    name = "../outside.txt".encode("utf-16-le") + b"\0\0"
    long[0], long[11] = 0x41, 0x0f
    long[1:11], long[14:26], long[28:32] = name[:10], name[10:22], name[22:26]
    short = bytearray(b"OUTSIDE TXT" + bytes(21))
    short[11] = 0x20
    struct.pack_into("<HI", short, 26, 2, 4)
    s = 0
    for b in short[:11]:
        s = (((s & 1) << 7) | (s >> 1)) + b & 0xff
    long[13] = s
    (tmp_path / "entries").write_bytes(bytes(long + short) * 8)
    qemu_io(uri, f"write -s {tmp_path / 'entries'} {root_dir + 64 * 32} 512")
    qemu_io(uri, f"write -P 0xa5 {fat.fat} 4096", f"write -P 0x5a {root_dir} 8192")
    assert outside.read_text() == "keep"
    assert c.cmd("query-block-exports")["return"]
    c.close()
    d.stop()
    assert d.proc.returncode == 0
    assert outside.read_text() == "keep"
