"""ferrite-system-x86_64's human monitor on a character device (`-monitor stdio`), byte for
byte against qemu-system-x86_64 10.0: the banner, the prompt, the line editor's echo, and
what `info block`, the block commands and HMP `qemu-io` print, with the images they leave.

qemu-system runs with `-accel tcg -S` (Debian's has no qtest accelerator), ferrite with
`-accel qtest`; neither has a guest running, so both only answer the monitor."""
import os
import re
import shutil
import subprocess

import pytest

from test_system import QEMU, SYSTEM

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")


def monitor_session(binary, workdir, args, commands):
    """Everything the program writes with `commands` (then `quit`) piped to its monitor,
    names that differ between the two programs and runs made alike."""
    accel = "tcg" if binary == QEMU else "qtest"
    text = "".join(c + "\n" for c in commands) + "quit\n"
    # Temporary snapshots go to the work directory (TMPDIR), where the test can look.
    env = dict(os.environ, TMPDIR=str(workdir))
    r = subprocess.run([binary, "-accel", accel, "-S", "-nodefaults", "-display", "none",
                        "-monitor", "stdio", *args],
                       input=text.encode(), capture_output=True, timeout=60, cwd=workdir,
                       env=env)
    out = (r.stdout + r.stderr).decode()
    out = out.replace(os.path.basename(binary), "PROG").replace(str(workdir), "W")
    out = re.sub(r"#block\d+", "#blockN", out)
    out = re.sub(r"vl\.[A-Za-z0-9]{6}", "vl.XXXXXX", out)
    out = re.sub(r"\d+ ops; [0-9:. ]+sec \([^)]*\)", "N ops; T", out)
    return r.returncode, out


def both(tmp_path, prepare, args, commands):
    """The session under QEMU and under ferrite, each in a directory `prepare` filled."""
    seen = []
    for binary, name in ((QEMU, "q"), (SYSTEM, "f")):
        d = tmp_path / name
        d.mkdir()
        prepare(d)
        seen.append((monitor_session(binary, d, args, commands), d))
    return seen


def img(d, name, *opts, size="4M"):
    subprocess.run(["qemu-img", "create", "-q", *opts, str(d / name), size], check=True)


def chain(d):
    img(d, "base.qcow2", "-f", "qcow2")
    img(d, "top.qcow2", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2")
    img(d, "disk.raw", "-f", "raw", size="1M")
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 1M", str(d / "base.qcow2")],
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x22 64k 64k", "-c", "write -P 0x33 1M 4k",
                    str(d / "top.qcow2")], check=True, capture_output=True)


DRIVES = [
    "-drive", "if=none,id=disk,file=top.qcow2,node-name=image,backing.node-name=backing,"
              "file.node-name=file,cache=writethrough",
    "-drive", "if=ide,index=3,media=cdrom",
    "-drive", "if=ide,index=0,file=disk.raw,format=raw,cache=none",
    "-drive", "if=floppy",
    "-blockdev", "driver=null-co,node-name=nul,read-zeroes=on",
    "-device", "virtio-blk-pci,drive=nul,id=vd,write-cache=off",
]

SESSION = [
    "info status",
    "",
    "bogus",
    "info block",
    "info block -n",
    "info block image",
    "info block ide1-cd1",
    "info block nosuch",
    "info block -x",
    "info block a b",
    "info block-jobs",
    'qemu-io disk "map"',
    'qemu-io disk "alloc 0 2M"',
    'qemu-io disk "alloc 64k"',
    'qemu-io disk "length"',
    "block_resize",
    "block_resize disk 2X",
    "drive_backup",
    "drive_backup disk",
    "drive_backup nosuch W/x.qcow2",
    "nbd_server_start -w unix:W/nbd.sock",
    "nbd_server_start unix:nbd.sock",
    "nbd_server_add -w disk",
    "nbd_server_add nul exp2",
    "nbd_server_remove exp2",
    "nbd_server_stop",
    "drive_add 0 if=none,file=disk.raw,format=raw,id=added",
    "drive_add 0 if=virtio,file=disk.raw,format=raw",
    "drive_add -n 0 driver=null-co,node-name=nn",
    "drive_add 0 if=none,id=added",
    "info block added",
    "drive_del added",
    "drive_del added",
    "drive_del nn",
    "commit nosuch",
    "commit ide0-hd0",
    "commit disk",
    'qemu-io disk "map"',
    'qemu-io disk "read -P 0x22 64k 64k"',
    "block_job_cancel nosuch",
    "eject -f ide1-cd1",
]


def test_human_monitor_session_matches_qemu_system(tmp_path):
    """The same bytes on stdout and stderr, echo included; `commit` copies the overlay's
    data into the backing file and empties the overlay, as QEMU's does."""
    (q, qdir), (f, fdir) = both(tmp_path, chain, DRIVES, SESSION)
    assert f == q
    assert "\x1b[D" in f[1], "the echo redraws the line as QEMU's does"
    for d in (qdir, fdir):
        top = subprocess.run(["qemu-img", "map", "--output=json", str(d / "top.qcow2")],
                             capture_output=True, text=True, check=True).stdout
        assert '"depth": 0' not in top, "the overlay is empty after commit"
        r = subprocess.run(["qemu-io", "-c", "read -P 0x22 64k 64k", "-c",
                            "read -P 0x33 1M 4k", "-c", "read -P 0x11 0 64k",
                            str(d / "base.qcow2")], capture_output=True, text=True)
        assert "verification failed" not in r.stdout, r.stdout


QEMU_IO_ARGUMENTS = [f'qemu-io disk "{c}"' for c in [
    "read 0 1.5k", "read .5k 0.5k", "read 1.0005k 1.k", "write -P 7 0x200 0xab",
    "read 1.5 1", "write 1G-64k 64k", "read abc 1", "read 0 0x10k", "read 0 0x",
    "write 8E 1", "read 0 16E", "read -- -1 512", "read 99999999999999999999 1",
    "read 0 1e", "write 0 3G", "write -b -z 0 512", "write -b 1 512", "read -b 0 100",
    "write -c 0 1000", "write -b -P 5 0 4k", "read -b -P 5 0 4k", "read -b -P 5 512 1k",
    "read -P 7 512 171",
]]


def test_qemu_io_arguments_as_qemu_io_takes_them(tmp_path):
    """Sizes with fractions and every suffix, hex, and qemu-io's words for what it cannot
    take (non-numeric, too large, too long for one request, not in sectors for the VM
    state or a compressed write); `-b` reads and writes the VM state area."""
    (q, _), (f, _) = both(tmp_path, chain, DRIVES, QEMU_IO_ARGUMENTS)
    assert f == q
    assert "Parsing error: argument too large -- 8E" in q[1]
    assert "read 4096/4096 bytes at offset 0" in q[1]


THROTTLE_SESSION = [
    "block_set_io_throttle",
    "block_set_io_throttle disk",
    "block_set_io_throttle disk x",
    "block_set_io_throttle disk 1 2 3 4 5 6 7",
    "block_set_io_throttle disk 99999999999999999999 0 0 0 0 0",
    "block_set_io_throttle disk (1 0 0 0 0 0",
    "block_set_io_throttle disk 1 2 3 0 0 0",
    "block_set_io_throttle disk -1 0 0 0 0 0",
    "block_set_io_throttle nosuch 0 0 0 0 0 0",
    "block_set_io_throttle disk 0x100000+1 0 0 (2*3)|8 0 0",
    "info block disk",
    "block_set_io_throttle disk 0 0 0 0 0 0",
    "info blockstats",
    "info blockstats x",
    'qemu-io disk "write -P 0x44 0 8k"',
    'qemu-io disk "read 0 4k"',
    "info blockstats",
    "commit all",
    'qemu-io disk "map"',
]


def test_throttling_statistics_and_commit_all_as_qemu_system(tmp_path):
    """`block_set_io_throttle` reads its six limits as the monitor's expressions; `info
    blockstats` prints each drive's counters (times left out: they are the machine's);
    (HMP's `qemu-io` counts in neither), a nameless device backend as ""; `commit all`
    commits every drive that has a backing file and leaves the others."""
    (q, qdir), (f, fdir) = both(tmp_path, chain, DRIVES, THROTTLE_SESSION)
    times = lambda out: re.sub(r"(time_ns)=\d+", r"\1=T", out[1])  # noqa: E731
    assert (f[0], times(f)) == (q[0], times(q))
    assert "bps=1048577 " in f[1] and "iops=14 " in f[1] and "\n: rd_bytes=0" in f[1]
    for d in (qdir, fdir):
        r = subprocess.run(["qemu-io", "-c", "read -P 0x44 0 8k", str(d / "base.qcow2")],
                           capture_output=True, text=True)
        assert "verification failed" not in r.stdout, r.stdout


def cache_lines(out):
    return [line for line in out.splitlines() if "Cache mode" in line or "PROG:" in line]


NODES = ("if=none,file=top.qcow2,backing.file.filename=base.qcow2,node-name=image,"
         "backing.node-name=backing,backing.file.node-name=backing-file,file.node-name=file")
INFO_EACH = ["info block none0", "info block image", "info block file",
             "info block backing", "info block backing-file"]


@pytest.mark.parametrize("option", [
    "cache.direct=on", "file.cache.direct=on", "backing.cache.direct=on",
    "backing.file.cache.direct=on", "cache.no-flush=on", "backing.cache.no-flush=on",
    "cache=none,backing.cache.no-flush=on", "cache=writeback,cache.writeback=off",
    "cache=unsafe,cache.no-flush=off", "file.cache.writeback=off",
    "backing.cache.writeback=off", "backing.file.cache.writeback=off",
])
def test_cache_modes_are_inherited_as_in_qemu(tmp_path, option):
    """A node's cache modes pass to its file and backing file unless they set their own;
    `cache.writeback` belongs to the drive (a node that is given one refuses it)."""
    (q, _), (f, _) = both(tmp_path, chain, ["-drive", f"{NODES},{option}"], INFO_EACH)
    assert cache_lines(f[1]) == cache_lines(q[1])
    assert f[0] == q[0]


@pytest.mark.parametrize("args", [
    ["-drive", "if=ide"],
    ["-drive", "if=virtio"],
    ["-drive", "if=ide,file=disk.raw,format=raw,readonly=on"],
    ["-drive", "if=none,id=disk,cache=bogus"],
    ["-drive", "if=scsi,index=9"],
    ["-drive", "if=none,file=disk.raw,format=raw", "-device", "virtio-blk,drive=none0,write-cache=maybe"],
    # Error actions by kind; `serial` and `addr` are the format's to refuse since QEMU 9.
    ["-drive", "if=none,file=disk.raw,format=raw,werror=ignore,rerror=enospc"],
    ["-drive", "if=none,file=disk.raw,format=raw,werror=nosuch"],
    ["-drive", "if=none,file=disk.raw,format=raw,serial=abc"],
    ["-drive", "if=virtio,file=disk.raw,format=raw,addr=3"],
    ["-drive", "if=none,file=disk.raw,format=raw,aio=nosuch"],
])
def test_start_up_errors_come_where_qemus_do(tmp_path, args):
    """A device's refusal comes after the monitor's banner (QEMU starts its monitors
    before the board's devices), a drive's before it."""
    (q, _), (f, _) = both(tmp_path, chain, args, ["info status"])
    # QEMU checks an IDE disk's permissions late, after the prompt under tcg and before it
    # under qtest (iotest 051's output); ferrite runs as under qtest.
    q = (q[0], q[1].replace("(qemu) PROG: Block node is read-only", "PROG: Block node is read-only"))
    assert f == q


def three_levels(d):
    img(d, "base.qcow2", "-f", "qcow2")
    img(d, "mid.qcow2", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2")
    img(d, "top.qcow2", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2")


def test_drive_options_reach_every_backing_level(tmp_path):
    """`backing.backing.node-name` names the backing file's backing file (each level's
    options are typed once its format is read from the image above)."""
    args = ["-drive", "if=none,id=d,file=top.qcow2,format=qcow2,node-name=top,"
                      "backing.node-name=mid,backing.backing.node-name=base,"
                      "backing.backing.cache.direct=on"]
    (q, _), (f, _) = both(tmp_path, three_levels, args, ["info block -n", "info block d"])
    assert f == q
    assert "base: base.qcow2 (qcow2, read-only)" in f[1]


def qmp_stdio(binary, workdir, args, commands):
    """Everything the program writes with `commands` (JSON, then `quit`) on `-qmp stdio`,
    standard error merged in the order it came, timestamps and the greeting left out."""
    accel = "tcg" if binary == QEMU else "qtest"
    text = "".join(c + "\n" for c in ['{"execute":"qmp_capabilities"}', *commands,
                                      '{"execute":"quit"}'])
    r = subprocess.run([binary, "-accel", accel, "-nodefaults", "-display", "none",
                        "-qmp", "stdio", *args], input=text.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
                       cwd=workdir)
    lines = r.stdout.decode().replace(str(workdir), "W").splitlines()[1:]
    return [re.sub(r'"timestamp": \{[^}]*\}, ', "", line) for line in lines]


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def corrupt_images(d):
    # A refcount table entry of zero (writing the first cluster overlaps the table), and
    # an L1 entry that is not cluster aligned.
    img(d, "rt.qcow2", "-f", "qcow2", size="64M")
    poke(d / "rt.qcow2", 0x10000, b"\0" * 8)
    img(d, "l1.qcow2", "-f", "qcow2", size="64M")
    poke(d / "l1.qcow2", 0x30000, b"\0\0\0\0\x2a\x2a\x2a\x2a")


@pytest.mark.parametrize("case", ["write", "incoming"])
def test_corruption_is_reported_as_qemu_reports_it(tmp_path, case):
    """qcow2's message on standard error before the event, the drive's name in the event,
    a finding on an inactive image (`-incoming`) not fatal and not marked on disk."""
    if case == "write":
        args = ["-drive", "if=none,node-name=drive,file=rt.qcow2,driver=qcow2"]
        cmd = 'qemu-io drive \\"write 0 512\\"'
    else:
        args = ["-blockdev", '{"node-name": "drive", "driver": "qcow2", "file": '
                             '{"driver": "file", "filename": "l1.qcow2"}}',
                "-incoming", "defer"]
        cmd = 'qemu-io drive \\"read 0 512\\"'
    hmp = '{"execute":"human-monitor-command","arguments":{"command-line":"%s"}}' % cmd
    seen = []
    for binary, name in ((QEMU, "q"), (SYSTEM, "f")):
        d = tmp_path / name
        d.mkdir()
        corrupt_images(d)
        out = qmp_stdio(binary, d, args, [hmp])
        info = subprocess.run(["qemu-img", "info", "-U", str(d / f"{'rt' if case == 'write' else 'l1'}.qcow2")],
                              capture_output=True, text=True).stdout
        seen.append((out, "corrupt: true" in info))
    assert seen[1] == seen[0]
    assert any("BLOCK_IMAGE_CORRUPTED" in line for line in seen[1][0])


def test_incoming_images_start_inactive_and_an_export_may_write_them(tmp_path):
    """With `-incoming defer` the drives' images are inactive; an IDE disk shares its image
    until the migration ends, so `nbd_server_add -w` of its drive works (iotest 192)."""
    args = ["-drive", "if=ide,id=drive0,file=top.qcow2,format=qcow2", "-incoming", "defer"]
    (q, _), (f, _) = both(tmp_path, chain, args, [
        "info status", "info block -n", "nbd_server_start unix:nbd.sock",
        "nbd_server_add -w drive0", "info block -n", "info status"])
    assert f == q
    assert "inactive" in f[1]


def test_an_export_of_a_drive_ends_with_its_medium(tmp_path):
    """`nbd-server-add` of a drive: ejecting the medium ends the export (QEMU's eject
    notifier, iotest 140); clients are then told the export is not there."""
    from test_system import Machine
    seen = []
    for binary, accel, name in ((QEMU, "tcg", "q"), (SYSTEM, "qtest", "f")):
        d = tmp_path / name
        d.mkdir()
        img(d, "cd.raw", "-f", "raw", size="1M")
        m = Machine(binary, accel, d, ["-drive", "if=none,media=cdrom,id=drv,file=cd.raw,format=raw"])
        sock = str(d / "nbd.sock")
        nbd = f"nbd+unix:///drv?socket={sock}"
        try:
            out = [m.qmp.cmd("nbd-server-start",
                             {"addr": {"type": "unix", "data": {"path": sock}}}),
                   m.qmp.cmd("nbd-server-add", {"device": "drv"})]
            r = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", nbd],
                               capture_output=True, text=True)
            out.append(r.returncode)
            out.append(m.qmp.cmd("eject", {"device": "drv"}))
            out.append(m.qmp.wait_event("BLOCK_EXPORT_DELETED")["data"])
            r = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "close", nbd],
                               capture_output=True, text=True)
            out.append(r.stderr.replace(sock, "S").splitlines())
        finally:
            m.stop()
        seen.append(out)
    assert seen[1] == seen[0]


@pytest.mark.parametrize("how", [["-snapshot"], []])
def test_snapshot_mode_writes_to_a_temporary_overlay(tmp_path, how):
    """`-snapshot` or `snapshot=on`: the image is opened read-only under a qcow2 overlay in
    the temporary directory, which takes the writes and is gone afterwards."""
    drive = "if=none,id=d,file=top.qcow2" + ("" if how else ",snapshot=on")
    seen = []
    for (code, out), d in both(tmp_path, chain, ["-drive", drive, *how],
                               ['qemu-io d "write -P 0x77 0 64k"',
                                'qemu-io d "read -P 0x77 0 64k"', "info block"]):
        r = subprocess.run(["qemu-io", "-c", "read -P 0x11 0 64k", str(d / "top.qcow2")],
                           capture_output=True, text=True)
        left = sorted(p.name for p in d.iterdir() if p.name.startswith("vl."))
        seen.append((code, out, "verification failed" in r.stdout, left))
    assert seen[1] == seen[0]
    assert seen[1][2] is False and seen[1][3] == []
    assert "vl.XXXXXX" in seen[1][1]


@pytest.mark.parametrize("option,reopen", [
    ("cache.direct=on", "-c none"),
    ("file.cache.direct=on", "-c writethrough"),
    ("backing.cache.no-flush=on", "-o cache.direct=on"),
    ("cache=none", "-o backing.cache.direct=off"),
    ("cache=none", "-o file.cache.direct=off,file.cache.no-flush=on"),
    ("cache=unsafe", "-o backing.detect-zeroes=on"),
    ("cache=none", "-r"),
    ("cache=none", "-x"),
])
def test_hmp_qemu_io_reopen_changes_what_qemus_does(tmp_path, option, reopen):
    """qemu-io's `reopen`: the options given change (a child's by its path), the others
    stay; a cache mode passes to the children that took theirs from the node."""
    cmds = [f'qemu-io none0 "reopen {reopen}"', 'qemu-io none0 "reopen -c none"', *INFO_EACH]
    (q, _), (f, _) = both(tmp_path, chain, ["-drive", f"{NODES},{option}"], cmds)
    assert cache_lines(f[1]) == cache_lines(q[1])
    assert [line for line in f[1].splitlines() if "reopen" not in line and "Cache" not in line] == \
        [line for line in q[1].splitlines() if "reopen" not in line and "Cache" not in line]


def test_hmp_qemu_io_reopen_arguments_as_qemus(tmp_path):
    """qemu-io's `reopen` takes its arguments as getopt does, with qemu-io's texts; going
    read-only it first gives up the drive's write permission (a drive with no device holds
    one, as in QEMU), and back to read-write the image's children go first; the cache mode
    of `-c` is the drive's once the reopen succeeded."""
    cmds = [f'qemu-io d "reopen {args}"' for args in [
        "-x", "foo", "-rw", "-c none -o cache.direct=on",
        "-o cache.no-flush=on -o cache.direct=off", "-c", "-c foo", "-r -w",
        "-o read-only=on -r", "-o a=1 -o b=2", "-o file.x=1", "-r"]]
    cmds += ['qemu-io d "write 0 512"', 'qemu-io d "reopen -w"', 'qemu-io d "write 0 512"',
             'qemu-io d "reopen -c writethrough"', "info block d"]
    (q, _), (f, _) = both(tmp_path, chain, ["-drive", "if=none,id=d,file=top.qcow2"], cmds)
    strip = re.compile(r"#block\d+|\d+ ops; .*|\x1b\[[KD]")
    assert strip.sub("", f[1]) == strip.sub("", q[1])
    assert "Only one -r/-w option may be given" in f[1]
    assert "Cache mode:       writethrough" in f[1]


def test_a_child_given_its_own_cache_mode_keeps_it(tmp_path):
    """A child whose options set its cache mode (here in a `json:` name) does not follow
    its parent's reopen."""
    drive = ('if=none,file=blkdebug::json:{"filename":"base.qcow2",,"cache":{"direct":false}},'
             'node-name=image,file.node-name=blkdebug,file.image.node-name=file')
    cmds = ['qemu-io none0 "reopen -o cache.direct=on,cache.no-flush=on"',
            "info block none0", "info block image", "info block blkdebug", "info block file"]
    (q, _), (f, _) = both(tmp_path, chain, ["-drive", drive], cmds)
    assert cache_lines(f[1]) == cache_lines(q[1])
    assert len(cache_lines(f[1])) == 4
