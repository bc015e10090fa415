"""VM snapshots in ferrite-system-x86_64 against qemu-system-x86_64 10.0: `savevm`,
`loadvm`, `delvm` and `info snapshots` on the human monitor, the `snapshot-save`, `-load` and
`-delete` jobs, `-loadvm`, and the images they leave (contents, `qemu-img snapshot -l`,
`qemu-img check`).

QEMU runs with `-accel tcg -S` (Debian's has no qtest), ferrite with `-accel qtest`, as in
test_system.py. What legitimately differs is hidden: the VM state's size (QEMU saves RAM,
ferrite's machine has none), dates, the VM clock of a guest that ran, and generated names.
"""
import json
import re
import subprocess

import pytest

from test_system import QEMU, SYSTEM, Machine, compare_with_qemu, hide

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")

DATE = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def hide_snapshot_rows(text):
    """A snapshot table with its VM state sizes, dates, clocks and generated tags hidden."""
    text = re.sub(r" +[\d.]+ [KMGTPE]?i?B (?=" + DATE + ")", " SIZE ", text)
    text = re.sub(DATE, "DATE", text)
    text = re.sub(r"\d{4}:\d\d:\d\d\.\d{3}", "CLOCK", text)
    return re.sub(r"vm-\d{14}", "vm-AUTONAME", text)


def hmp(line):
    return ("human-monitor-command", {"command-line": line})


def transcript(m, steps):
    """Each step's reply (snapshot tables hidden) and the events it caused."""
    out = []
    for name, args in steps:
        r = m.qmp.cmd(name, args)
        if isinstance(r.get("return"), str):
            r = {"return": hide_snapshot_rows(r["return"])}
        out.append((name, args, hide(r)))
        out.append(("events", [e["event"] for e in m.qmp.events]))
        m.qmp.events.clear()
    return out


def qemu_img(*args):
    r = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    return r.returncode, hide_snapshot_rows(r.stdout), r.stderr


def qemu_io(img, *cmds):
    """Whether every `read -P` of `cmds` found its pattern in `img`."""
    args = [a for c in cmds for a in ("-c", c)]
    r = subprocess.run(["qemu-io", "-f", "qcow2", *args, str(img)], capture_output=True,
                       text=True)
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


HMP_STEPS = [
    hmp("info snapshots"),
    hmp("qemu-io d0 \"write -P 0x11 0 1M\""),
    hmp("savevm s1"),
    hmp("qemu-io d0 \"write -P 0x22 0 512k\""),
    hmp("info snapshots"),
    hmp("savevm"),
    hmp("savevm s1"),
    hmp("info snapshots"),
    hmp("loadvm s1"),
    hmp("loadvm nope"),
    hmp("info status"),
    ("query-status", None),
    hmp("loadvm"),
    hmp("delvm"),
    hmp("savevm a b"),
    hmp("delvm nope"),
    hmp("delvm s1"),
    hmp("info snapshots"),
    # Running: the machine stops for the snapshot and runs again after it.
    ("cont", None),
    hmp("savevm s2"),
    ("query-status", None),
    hmp("loadvm s2"),
    ("query-status", None),
    ("stop", None),
    hmp("info snapshots"),
]


def hmp_transcript(binary, accel, workdir):
    img = workdir / "t.qcow2"
    other = workdir / "o.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "8M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-drive", f"if=none,id=d0,file={img},format=qcow2",
        "-blockdev", f"driver=file,node-name=o-file,filename={other}",
        "-blockdev", "driver=qcow2,node-name=o,file=o-file",
    ])
    try:
        out = transcript(m, HMP_STEPS)
        m.qmp.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    out.append(("qemu-img snapshot -l", qemu_img("snapshot", "-l", img)))
    out.append(("qemu-img snapshot -l other", qemu_img("snapshot", "-l", other)))
    out.append(("qemu-img check", qemu_img("check", img)[0], qemu_img("check", other)[0]))
    # s2 was taken after the second write and loaded back: that is what the image holds.
    out.append(("data", qemu_io(img, "read -P 0x22 0 512k", "read -P 0x11 512k 512k")))
    assert out[-1] == ("data", True)
    return out


def test_hmp_vm_snapshots_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, hmp_transcript)


def test_loading_a_snapshot_reverts_the_data_and_the_tray(tmp_path):
    """ferrite alone: a snapshot taken with data and a CD-ROM's tray open brings both back
    (QEMU's guest state is not comparable here: it is RAM and CPUs)."""
    img = tmp_path / "t.qcow2"
    cd = tmp_path / "cd.qcow2"
    for f in (img, cd):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(f), "4M"], check=True)
    m = Machine(SYSTEM, "qtest", tmp_path, [
        "-drive", f"if=none,id=d0,file={img},format=qcow2",
        "-drive", f"if=none,id=cd,file={cd},format=qcow2",
        "-device", "ide-cd,drive=cd,id=cd0",
    ])
    try:
        q = m.qmp
        q.cmd("human-monitor-command", {"command-line": "qemu-io d0 \"write -P 0x5a 0 64k\""})
        assert q.cmd("blockdev-open-tray", {"id": "cd0"}) == {"return": {}}
        assert q.cmd("human-monitor-command", {"command-line": "savevm open"}) == {"return": ""}
        q.cmd("human-monitor-command", {"command-line": "qemu-io d0 \"write -P 0xa5 0 64k\""})
        assert q.cmd("blockdev-close-tray", {"id": "cd0"}) == {"return": {}}
        trays = lambda: [b.get("tray_open") for b in q.cmd("query-block")["return"]
                         if b["device"] == "cd"]
        assert trays() == [False]
        assert q.cmd("human-monitor-command", {"command-line": "loadvm open"}) == {"return": ""}
        assert trays() == [True]
        q.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    assert qemu_io(img, "read -P 0x5a 0 64k")
    assert qemu_img("check", img)[0] == 0
    assert qemu_img("check", cd)[0] == 0


JOB_STEPS = [
    ("snapshot-save", {"job-id": "s1", "tag": "t1", "vmstate": "disk", "devices": ["disk"]}),
    ("snapshot-save", {"job-id": "s2", "tag": "t1", "vmstate": "disk", "devices": ["disk"]}),
    ("snapshot-save", {"job-id": "s3", "tag": "t2", "vmstate": "nope", "devices": ["disk"]}),
    ("snapshot-save", {"job-id": "s4", "tag": "t2", "vmstate": "disk", "devices": []}),
    ("snapshot-save", {"job-id": "s5", "tag": "t2", "vmstate": "disk", "devices": ["file"]}),
    ("snapshot-save", {"job-id": "s6", "tag": "t2", "vmstate": "disk",
                       "devices": ["disk", "nope"]}),
    ("snapshot-load", {"job-id": "l1", "tag": "t1", "vmstate": "disk", "devices": ["disk"]}),
    ("snapshot-load", {"job-id": "l2", "tag": "zz", "vmstate": "disk", "devices": ["disk"]}),
    ("snapshot-delete", {"job-id": "d1", "tag": "t1", "devices": ["disk"]}),
    ("snapshot-delete", {"job-id": "d2", "tag": "t1", "devices": ["nope"]}),
]


def jobs_transcript(binary, accel, workdir):
    img = workdir / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    m = Machine(binary, accel, workdir, [
        "-blockdev", f"driver=file,node-name=file,filename={img}",
        "-blockdev", "driver=qcow2,node-name=disk,file=file",
    ])
    out = []
    try:
        q = m.qmp
        for name, args in JOB_STEPS:
            out.append((name, q.cmd(name, args)))
            job = args["job-id"]
            q.wait_event("JOB_STATUS_CHANGE",
                         lambda e: e["data"] == {"id": job, "status": "concluded"})
            out.append(("query-jobs", hide(q.cmd("query-jobs"))))
            out.append(("job-dismiss", q.cmd("job-dismiss", {"id": job})))
            out.append(("query-status", q.cmd("query-status")))
        out.append(("bad id", q.cmd("snapshot-save", {"job-id": "", "tag": "t",
                                                      "vmstate": "disk",
                                                      "devices": ["disk"]})))
        out.append(("no vmstate", q.cmd("snapshot-save", {"job-id": "x", "tag": "t",
                                                          "devices": ["disk"]})))
        out.append(transcript(m, [hmp("info snapshots")]))
        q.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    out.append(("qemu-img check", qemu_img("check", img)[0]))
    return out


def test_snapshot_jobs_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, jobs_transcript)


def save_then_load(saver, loader, tmp_path, devices):
    """`savevm a` by one program, `loadvm a` by the other, on the same image."""
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    extra = ["-drive", f"if=none,id=d0,file={img},format=qcow2", *devices]
    answers = []
    for (binary, accel), line in ((saver, "savevm a"), (loader, "loadvm a")):
        m = Machine(binary, accel, tmp_path, extra)
        try:
            answers.append(m.qmp.cmd("human-monitor-command", {"command-line": line}))
            m.qmp.cmd("quit")
            m.proc.wait(10)
        finally:
            m.stop()
    return answers[1]["return"]


@pytest.mark.parametrize("first", ["qemu", "ferrite"])
def test_each_program_refuses_the_others_machine_state_in_qemus_words(tmp_path, first):
    """The VM state is QEMU's stream layout: each program meets a section it has no device
    for in the other's and refuses it as QEMU refuses an unknown section."""
    progs = {"qemu": (QEMU, "tcg"), "ferrite": (SYSTEM, "qtest")}
    second = progs["ferrite" if first == "qemu" else "qemu"]
    said = save_then_load(progs[first], second, tmp_path,
                          ["-device", "virtio-blk-pci,drive=d0,id=vb"])
    lines = said.splitlines()
    assert re.fullmatch(r"Unknown savevm section or instance '.*' 0\. Make sure that your "
                        r"current VM setup matches your saved VM setup, including any "
                        r"hotplugged devices", lines[0]), said
    assert lines[1:] == ["Error: Error -22 while loading VM state"]


def test_qemu_loads_the_state_of_a_machine_without_devices(tmp_path):
    """With no device there is nothing but the stream's frame, which QEMU takes."""
    assert save_then_load((SYSTEM, "qtest"), (QEMU, "tcg"), tmp_path, []) == ""


def loadvm_at_start(binary, accel, workdir, name, *extra):
    img = workdir / "t.qcow2"
    if not img.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
        m = Machine(binary, accel, workdir, ["-drive", f"if=none,id=d0,file={img},format=qcow2"])
        try:
            m.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io d0 "write -P 1 0 4k"'})
            m.qmp.cmd("human-monitor-command", {"command-line": "savevm s"})
            m.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io d0 "write -P 2 0 4k"'})
            m.qmp.cmd("quit")
            m.proc.wait(10)
        finally:
            m.stop()
    r = subprocess.run([binary, "-nodefaults", "-display", "none", "-accel", accel,
                        "-drive", f"if=none,id=d0,file={img},format=qcow2",
                        "-loadvm", name, *extra, "-qmp", "stdio"],
                       input='{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n'
                             '{"execute":"quit"}\n',
                       capture_output=True, text=True, timeout=60, cwd=workdir)
    replies = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    status = [x["return"] for x in replies if "return" in x and "status" in x["return"]]
    stderr = r.stderr.replace("qemu-system-x86_64", "PROG").replace("ferrite-system-x86_64",
                                                                     "PROG")
    return r.returncode, status, stderr, qemu_io(img, "read -P 1 0 4k")


@pytest.mark.parametrize("name,extra", [
    ("s", []),
    ("s", ["-S"]),
    ("nope", []),
    ("s", ["-incoming", "defer"]),
    ("s", ["-preconfig"]),
])
def test_loadvm_on_the_command_line_matches_qemu_system(tmp_path, name, extra):
    (tmp_path / "q").mkdir()
    (tmp_path / "f").mkdir()
    expected = loadvm_at_start(QEMU, "tcg", tmp_path / "q", name, *extra)
    got = loadvm_at_start(SYSTEM, "qtest", tmp_path / "f", name, *extra)
    assert got == expected
