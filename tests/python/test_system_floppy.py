"""The board's default drives, floppy drives and `info qtree`, compared with
qemu-system-x86_64: without `-nodefaults` a PC gets an empty CD-ROM drive and an empty floppy
drive unless the command line gives its own; floppy drives take units, drive types and block
sizes as QEMU's controller decides them, with its refusals; `-global floppy.drive=...`; and
the floppy controller's part of `info qtree` and `info block` read the same (iotest 172)."""
import os
import re
import subprocess

import pytest

from test_system import QEMU, SYSTEM

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")


def monitor(binary, accel, workdir, args, commands):
    """What the human monitor on stdio prints for `commands`, and the program's errors."""
    r = subprocess.run([binary, "-accel", accel, "-nographic", "-monitor", "stdio",
                        "-serial", "none", "-vga", "none", "-nic", "none", *args],
                       input="".join(c + "\n" for c in commands) + "quit\n", cwd=workdir,
                       capture_output=True, text=True, timeout=60)
    out = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", r.stdout)
    out = re.sub(r"#block\d+", "#blockN", out)
    out = re.sub(r"^\(qemu\) .*$", "(qemu)", out, flags=re.M)
    err = r.stderr.replace(os.path.basename(binary), "PROG").replace(str(workdir), "W")
    return out.replace(str(workdir), "W"), err, r.returncode


def floppy_section(qtree):
    """The floppy controller's part of `info qtree` (as iotest 172 cuts it out)."""
    lines = qtree.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("          dev: isa-fdc")),
                 None)
    if start is None:
        return []
    out = [lines[start]]
    for ln in lines[start + 1:]:
        if ln.startswith("          dev:") or not ln.startswith("           "):
            break
        out.append(ln)
    return out


def images(workdir):
    for name, size in (("a.qcow2", "720k"), ("b.qcow2", "1440k"), ("c.raw", "1200k")):
        fmt = "raw" if name.endswith(".raw") else "qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(workdir / name), size],
                       check=True)


CASES = [
    [],
    ["-nodefaults"],
    ["-fda", "a.qcow2"],
    ["-fdb", "b.qcow2"],
    ["-fda", "a.qcow2", "-fdb", "c.raw"],
    ["-M", "q35", "-fda", "a.qcow2"],
    ["-M", "q35"],
    ["-drive", "if=floppy,file=a.qcow2,index=1"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,unit=1"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,drive-type=120"],
    ["-drive", "if=none,file=c.raw,format=raw", "-device", "floppy,drive=none0"],
    ["-device", "floppy,drive-type=144,write-cache=off,share-rw=on"],
    ["-drive", "if=none,file=a.qcow2", "-global", "floppy.drive=none0",
     "-device", "floppy,unit=0"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,physical_block_size=4k",
     "-device", "floppy"],
    ["-cdrom", "a.qcow2", "-drive", "if=none,file=b.qcow2", "-device", "ide-hd,drive=none0"],
    # Refusals
    ["-fda", "a.qcow2", "-drive", "if=none,file=b.qcow2", "-device", "floppy,drive=none0,unit=0"],
    ["-fda", "a.qcow2", "-drive", "if=none,file=b.qcow2", "-global", "floppy.drive=none0"],
    ["-drive", "if=none,file=a.qcow2", "-drive", "if=none,file=b.qcow2",
     "-global", "floppy.drive=none0", "-device", "floppy,drive=none1,unit=0"],
    ["-drive", "if=none", "-global", "floppy.drive=none0", "-device", "floppy",
     "-device", "floppy"],
    ["-fda", "", "-device", "floppy,drive=floppy0"],
    ["-device", "floppy,drive=floppy0"],
    ["-fda", "a.qcow2", "-drive", "if=none,file=b.qcow2", "-drive", "if=none,file=c.raw",
     "-device", "floppy,drive=none0", "-device", "floppy,drive=none1"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,logical_block_size=4096"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,physical_block_size=1024"],
    ["-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0,drive-type=35"],
    ["-M", "none", "-device", "floppy"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) or "default" for c in CASES])
def test_floppy_drives_and_default_devices_match_qemu_system(tmp_path, args):
    seen = []
    for binary, accel, d in ((QEMU, "tcg", "q"), (SYSTEM, "qtest", "f")):
        w = tmp_path / d
        w.mkdir()
        images(w)
        out, err, rc = monitor(binary, accel, w, args, ["info qtree", "info block"])
        parts = out.split("(qemu)\n")
        block = parts[2] if len(parts) > 2 else ""
        seen.append((floppy_section(out), block, err, rc))
    theirs, ours = seen
    assert ours == theirs


def test_a_floppy_drive_can_be_made_write_through_as_in_qemu(tmp_path):
    seen = []
    for binary, accel, d in ((QEMU, "tcg", "q"), (SYSTEM, "qtest", "f")):
        w = tmp_path / d
        w.mkdir()
        images(w)
        modes = []
        for wc in ("", ",write-cache=on", ",write-cache=off"):
            out, err, rc = monitor(binary, accel, w, [
                "-drive", "if=none,file=a.qcow2", "-device", "floppy,drive=none0" + wc],
                ["info block none0"])
            modes.append([ln for ln in out.splitlines() if "Cache mode" in ln])
        seen.append(modes)
    theirs, ours = seen
    assert ours == theirs
    assert ours[2] == ["    Cache mode:       writethrough"]
