"""Migration between two ferrite-system-x86_64 processes against the same between two
qemu-system-x86_64 10.0 processes: capabilities, MIGRATION events on both sides, run states
and query-migrate after, the images given up by the source and taken over by the
destination (inactive, then active), and `cont` on the source taking them back.

QEMU runs with `-accel tcg -S`, ferrite with `-accel qtest -S`, as in test_system.py."""
import json
import os
import re
import subprocess
import time

import pytest

from conftest import FERRITE, QSD, Daemon, wait_for
from test_system import QEMU, SYSTEM, Machine, compare_with_qemu, hide

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")


def quit_all(*machines):
    """Quits each machine and waits for it to end."""
    for m in machines:
        m.qmp.cmd("quit")
        m.proc.wait(10)


def active(m):
    return [(n["node-name"], n["active"])
            for n in m.qmp.cmd("query-named-block-nodes", {"flat": True})["return"]
            if not n["node-name"].startswith("#")]


def statuses(m, until):
    """The MIGRATION statuses `m` announces up to `until` (or `failed`)."""
    seen = []
    while not seen or seen[-1] not in (until, "failed"):
        seen.append(m.qmp.wait_event("MIGRATION", timeout=60)["data"]["status"])
    return seen


BLOCKDEV = ["-blockdev", "driver=file,node-name=disk-file,filename={img}",
            "-blockdev", "driver=qcow2,node-name=disk,file=disk-file"]
DRIVE = ["-drive", "if=none,id=d0,node-name=disk,file={img},format=qcow2"]


def migration_transcript(binary, accel, workdir, uri_of, drive_args):
    img = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 5 0 64k", str(img)],
                   check=True, capture_output=True)
    drive = [a.format(img=img) for a in drive_args]
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    uri, src_uri = uri_of(workdir)
    b = Machine(binary, accel, workdir / "b", [*drive, "-incoming", uri])
    a = Machine(binary, accel, workdir / "a", drive)
    out = []
    try:
        caps = [{"capability": "events", "state": True}]
        for m in (a, b):
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}))
        out.append(("caps", [c for c in a.qmp.cmd("query-migrate-capabilities")["return"]
                             if c["state"]]))
        out.append(("b before", b.qmp.cmd("query-status"), active(b)))
        out.append(a.qmp.cmd("migrate-incoming", {"uri": uri}))
        out.append(b.qmp.cmd("migrate-incoming", {"uri": uri}))
        out.append(b.qmp.cmd("migrate", {"uri": uri}))
        out.append(a.qmp.cmd("migrate", {"uri": src_uri}))
        out.append(("a", statuses(a, "completed")))
        out.append(("b", statuses(b, "completed")))
        wait_for(lambda: b.qmp.cmd("query-status")["return"]["status"] != "inmigrate",
                 what="the destination to leave inmigrate")
        for name, m in (("a", a), ("b", b)):
            out.append((name, settled_status(m),
                        m.qmp.cmd("query-migrate")["return"]["status"], active(m)))
        out.append(a.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}))
        # As iotest 196: autoclear bits nobody knows appear while no process owns the image;
        # the destination taking it over drops them, writing its header as it activates.
        with open(img, "r+b") as f:
            f.seek(88)
            f.write(b"\x7f")
        out.append(b.qmp.cmd("cont"))
        out.append(("b after cont", b.qmp.cmd("query-status"), active(b),
                    img.read_bytes()[88:96].hex()))
        b.qmp.cmd("quit")
        b.proc.wait(10)
        out.append(a.qmp.cmd("cont"))
        out.append(("a after cont", a.qmp.cmd("query-status"), active(a)))
        a.qmp.cmd("quit")
        a.proc.wait(10)
    finally:
        a.stop()
        b.stop()
    out.append(("check", subprocess.run(["qemu-img", "check", str(img)],
                                        capture_output=True).returncode))
    return hide(out)


def unix_channel(w):
    return f"unix:{w}/mig.sock", f"unix:{w}/mig.sock"


def exec_channel(w):
    os.mkfifo(w / "fifo")
    return f"exec:cat '{w}/fifo'", f"exec:cat >'{w}/fifo'"


@pytest.mark.parametrize("uri_of,drive_args", [(unix_channel, BLOCKDEV), (exec_channel, BLOCKDEV),
                                               (unix_channel, DRIVE)],
                         ids=["unix", "exec", "unix-drive"])
def test_migration_matches_qemu_system(tmp_path, uri_of, drive_args):
    compare_with_qemu(tmp_path,
                      lambda b, a, w: migration_transcript(b, a, w, uri_of, drive_args))


def run_state_events(m, until):
    """The MIGRATION statuses and STOP/RESUME events `m` sends, in order, up to the
    MIGRATION status `until` (or `failed`)."""
    seen = []
    while not seen or seen[-1] not in (until, "failed"):
        ev = m.qmp.wait_event(("MIGRATION", "STOP", "RESUME"), timeout=60)
        seen.append(ev["data"]["status"] if ev["event"] == "MIGRATION" else ev["event"])
    return seen


def settled_status(m):
    """query-status once the machine has left `finish-migrate`: QEMU sends a migration's
    last status before its main loop moves the machine on."""
    wait_for(lambda: m.qmp.cmd("query-status")["return"]["status"] != "finish-migrate",
             what="the machine to leave finish-migrate")
    return m.qmp.cmd("query-status")


def switchover_transcript(binary, accel, w):
    """Channels that cannot be opened; pause-before-switchover: migrate-continue and
    migrate_cancel in pre-switchover; a
    backup job writing its target keeps the images, so the switch-over fails (iotest
    migrate-during-backup) and the machine runs on; a continued migration completes."""
    img, target = w / "a.qcow2", w / "t.qcow2"
    for f in (img, target):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(f), "1M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 1M", str(img)],
                   check=True, capture_output=True)
    m = Machine(binary, accel, w, ["-drive", f"if=none,id=drive0,file={img},format=qcow2"])
    q = m.qmp
    caps = [{"capability": "events", "state": True},
            {"capability": "pause-before-switchover", "state": True}]
    out = []
    try:
        out.append(q.cmd("cont"))
        out.append(q.cmd("migrate-continue", {"state": "pre-switchover"}))
        out.append(q.cmd("migrate-set-capabilities", {"capabilities": caps}))
        # Channels that cannot be opened: a socket fails once the command returned, a file
        # at once; the machine never stops.
        out.append(q.cmd("migrate", {"uri": f"unix:{w}/nobody.sock"}))
        out.append(("refused", run_state_events(m, "failed"), q.cmd("query-migrate")))
        out.append(q.cmd("migrate", {"uri": f"file:{w}/no/such/dir"}))
        out.append(("no file", run_state_events(m, "failed"), q.cmd("query-migrate")))
        # Cancelled while paused before the switch-over.
        out.append(q.cmd("migrate", {"uri": f"exec:cat > '{w}/m1'"}))
        out.append(("paused", run_state_events(m, "pre-switchover"), q.cmd("query-status"),
                    active(m)))
        out.append(q.cmd("migrate-continue", {"state": "device"}))
        out.append(q.cmd("migrate-set-capabilities", {"capabilities": caps}))
        out.append(q.cmd("migrate", {"uri": f"exec:cat > '{w}/m1'"}))
        out.append(q.cmd("migrate_cancel"))
        out.append(("cancelled", run_state_events(m, "cancelled"), q.cmd("query-migrate"),
                    q.cmd("query-status"), active(m)))
        # A backup writing its target: the images cannot be given up.
        out.append(q.cmd("blockdev-add", {"node-name": "target", "driver": "qcow2",
                                          "file": {"driver": "file",
                                                   "filename": str(target)}}))
        out.append(q.cmd("blockdev-backup", {"job-id": "j", "device": "drive0",
                                             "target": "target", "sync": "full",
                                             "speed": 1,
                                             "x-perf": {"max-workers": 1,
                                                        "max-chunk": 65536}}))
        out.append(q.cmd("job-pause", {"id": "j"}))
        out.append(q.cmd("migrate", {"uri": f"exec:cat > '{w}/m2'"}))
        out.append(("paused", run_state_events(m, "pre-switchover")))
        out.append(q.cmd("migrate-continue", {"state": "pre-switchover"}))
        # QEMU sends `failed` before it restarts the machine: the RESUME follows.
        out.append(("failed", run_state_events(m, "failed"), q.wait_event("RESUME")["event"],
                    q.cmd("query-migrate"), q.cmd("query-status"), active(m)))
        out.append(q.cmd("block-job-set-speed", {"device": "j", "speed": 0}))
        out.append(q.cmd("job-resume", {"id": "j"}))
        done = q.wait_event("BLOCK_JOB_COMPLETED")["data"]
        out.append(("backup", done.get("error"), done["offset"] == done["len"]))
        # Continued: the migration completes.
        out.append(q.cmd("migrate", {"uri": f"exec:cat > '{w}/m3'"}))
        out.append(("paused", run_state_events(m, "pre-switchover")))
        out.append(q.cmd("migrate-continue", {"state": "pre-switchover"}))
        out.append(("completed", run_state_events(m, "completed"),
                    q.cmd("query-migrate")["return"]["status"], settled_status(m),
                    active(m)))
        # The target stayed with the source (QEMU's walk misses it): `quit` writes it back.
        q.cmd("quit")
        m.proc.wait(10)
    finally:
        m.stop()
    out.append(subprocess.run(["qemu-img", "compare", str(img), str(target)],
                              capture_output=True, text=True).stdout)
    return hide(out)


def test_switchover_pause_cancel_and_failure_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, switchover_transcript)


def bitmaps_of(m):
    """Each named bitmap: where, what, and its bits' hash."""
    out = []
    for n in m.qmp.cmd("query-named-block-nodes", {"flat": True})["return"]:
        for b in n.get("dirty-bitmaps", []):
            sha = m.qmp.cmd("x-debug-block-dirty-bitmap-sha256",
                            {"node": n["node-name"], "name": b["name"]})
            out.append((n["node-name"], b["name"], b["granularity"], b["count"],
                        b["recording"], b["persistent"], b["busy"], sha))
    return sorted(out, key=lambda b: (b[0].startswith("#"), b[1]))


def bitmap_migration_transcript(binary, accel, w):
    """The dirty-bitmaps capability: a drive's bitmaps (persistent or not, recording or
    not) and a node's go to the destination, which stores the persistent ones in its own
    images; the source keeps them (not stored there); a bitmap on a node with a generated
    name cannot migrate."""
    (w / "a").mkdir()
    (w / "b").mkdir()
    imgs = {}
    for side in ("a", "b"):
        for name in ("d", "n"):
            imgs[side, name] = w / side / f"{name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            str(imgs[side, name]), "1M"], check=True)

    def args(side):
        return ["-drive", f"if=none,id=drive0,file={imgs[side, 'd']},format=qcow2",
                "-blockdev", f"driver=file,node-name=nf,filename={imgs[side, 'n']}",
                "-blockdev", "driver=qcow2,node-name=n1,file=nf"]
    uri = f"unix:{w}/mig.sock"
    b = Machine(binary, accel, w / "b", [*args("b"), "-incoming", uri])
    a = Machine(binary, accel, w / "a", args("a"))
    caps = [{"capability": "events", "state": True},
            {"capability": "dirty-bitmaps", "state": True}]
    hmp = lambda m, line: m.qmp.cmd("human-monitor-command", {"command-line": line})
    out = []
    try:
        for m in (a, b):
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}))
        out.append(a.qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "r",
                                              "file": {"driver": "null-co",
                                                       "size": 1048576}}))
        gen = [n["node-name"] for n in a.qmp.cmd("query-named-block-nodes")["return"]
               if n["drv"] == "null-co"][0]
        out.append(a.qmp.cmd("block-dirty-bitmap-add", {"node": gen, "name": "g"}))
        out.append(a.qmp.cmd("migrate", {"uri": f"exec:cat > '{w}/refused'"}))
        out.append(("refused", statuses(a, "failed"), a.qmp.cmd("query-migrate")))
        out.append(a.qmp.cmd("block-dirty-bitmap-remove", {"node": gen, "name": "g"}))
        for node, name, extra in [("drive0", "p", {"persistent": True, "granularity": 512}),
                                  ("drive0", "t", {"granularity": 65536}),
                                  ("drive0", "off", {"disabled": True}),
                                  ("n1", "q", {"persistent": True})]:
            out.append(a.qmp.cmd("block-dirty-bitmap-add", {"node": node, "name": name,
                                                            **extra}))
        for line in ['qemu-io drive0 "write 0 64k"', 'qemu-io drive0 "write 960k 4k"',
                     'qemu-io drive0 "write 655873 4096"', 'qemu-io n1 "write 128k 192k"']:
            out.append(hmp(a, line))
        out.append(("source before", bitmaps_of(a)))
        out.append(a.qmp.cmd("migrate", {"uri": uri}))
        out.append(("a", statuses(a, "completed")))
        out.append(("b", statuses(b, "completed")))
        wait_for(lambda: b.qmp.cmd("query-status")["return"]["status"] != "inmigrate",
                 what="the destination to leave inmigrate")
        out.append(("destination", bitmaps_of(b)))
        out.append(("source after", bitmaps_of(a)))
        out.append(b.qmp.cmd("cont"))
        out.append(hmp(b, 'qemu-io drive0 "write 512k 64k"'))
        out.append(("destination running", bitmaps_of(b)))
        quit_all(a, b)
    finally:
        a.stop()
        b.stop()
    for key in sorted(imgs):
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(imgs[key])],
                                         capture_output=True, text=True).stdout)
        out.append((key, info["format-specific"]["data"].get("bitmaps")))
    return hide(out)


def test_dirty_bitmap_migration_matches_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, bitmap_migration_transcript)


def handover_transcript(binary, accel, w):
    """As iotest qsd-migrate: each side's image is an NBD export of a storage daemon (the
    destination's inactive). While the source waits in pre-switchover, its daemon's node
    goes inactive (it refuses writes and flushes from then on) and the destination's active;
    the source must not need its server to take a flush after that. qemu-system runs with
    qemu-storage-daemon, ferrite-system with ferrite-storage-daemon."""
    daemon = QSD if binary == QEMU else FERRITE
    img = w / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "10M"], check=True)

    def serve(side, active):
        off = "" if active else ",active=off"
        return Daemon(daemon, w / f"d{side}", [
            "--blockdev", f"file,node-name=disk-file,filename={img}{off}",
            "--blockdev", f"qcow2,file=disk-file,node-name=disk-fmt{off}",
            "--nbd-server", f"addr.type=unix,addr.path={w}/{side}.nbd",
            "--export", "nbd,id=exp0,node-name=disk-fmt,writable=true,allow-inactive=true"])

    def vm(side, extra=()):
        (w / side).mkdir()
        return Machine(binary, accel, w / side, [
            "-blockdev", f"nbd,node-name=disk,server.type=unix,server.path={w}/{side}.nbd,"
                         "export=disk-fmt",
            "-device", "virtio-blk,drive=disk,id=virtio0", *extra])

    def io(m, cmd):
        return m.qmp.cmd("human-monitor-command", {
            "command-line": f'qemu-io -d virtio0/virtio-backend "{cmd}"'})

    uri = f"unix:{w}/mig.sock"
    da, db = serve("a", True), serve("b", False)
    a = b = None
    out = []
    try:
        qa, qb = da.connect(), db.connect()
        a, b = vm("a"), vm("b", ["-incoming", uri])
        out.append(("a wrote", io(a, "write -P 0x11 0 4k")))
        caps = [{"capability": "events", "state": True},
                {"capability": "pause-before-switchover", "state": True}]
        for m in (a, b):
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}))
        out.append(a.qmp.cmd("migrate", {"uri": uri}))
        out.append(("a", statuses(a, "pre-switchover")))
        out.append(("da inactive", qa.cmd("blockdev-set-active", {"active": False})))
        out.append(("a reads", io(a, "read -P 0x11 0 4k")))
        out.append(("db active", qb.cmd("blockdev-set-active", {"active": True})))
        out.append(a.qmp.cmd("migrate-continue", {"state": "pre-switchover"}))
        out.append(("a", statuses(a, "completed")))
        out.append(("b", statuses(b, "completed")))
        wait_for(lambda: b.qmp.cmd("query-status")["return"]["status"] != "inmigrate",
                 what="the destination to leave inmigrate")
        out.append(("a after", a.qmp.cmd("query-migrate")["return"].get("error-desc"),
                    settled_status(a), active(a)))
        out.append(("b reads", io(b, "read -P 0x11 0 4k")))
        # A destination that is not to run leaves its images inactive until `cont`.
        out.append(("b cont", b.qmp.cmd("cont"), active(b)))
        out.append(("b writes", io(b, "write -P 0x22 4k 4k")))
        quit_all(a, b)
    finally:
        for m in (a, b):
            if m is not None:
                m.stop()
        da.stop()
        db.stop()
    out.append(("a log", a.stderr.read_text(), "b log", b.stderr.read_text()))
    out.append(("image", subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 4k", "-c", "read -P 0x22 4k 4k",
         str(img)], capture_output=True, text=True).stdout.count("read 4096/4096")))
    return hide(out)


def test_images_behind_storage_daemons_change_hands_like_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, handover_transcript)


def mapping_section(hmp_text):
    """The block-bitmap-mapping part of `info migrate_parameters`."""
    m = re.search(r"^block-bitmap-mapping:\r?(\n  .*)*\n", hmp_text, flags=re.MULTILINE)
    return m.group(0).replace("\r", "") if m else None


def bitmap_mapping_transcript(binary, accel, w):
    """block-bitmap-mapping: QEMU's checks of a mapping, how queries show it, and a
    migration where the source and the destination each map names to shared aliases (one
    bitmap's persistence changed by a transform, one left unmapped at the source); a
    bitmap the destination does not map is reported there and the migration completes."""
    (w / "a").mkdir()
    (w / "b").mkdir()
    uri = f"unix:{w}/mig.sock"
    for side in ("a", "b"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / side / "d.qcow2"),
                        "4M"], check=True)
    node = lambda side, name: ["-blockdev", f"driver=qcow2,node-name={name},file.driver=file,"
                                            f"file.filename={w / side / 'd.qcow2'}"]
    b = Machine(binary, accel, w / "b", [*node("b", "dst"), "-incoming", uri])
    a = Machine(binary, accel, w / "a", node("a", "src"))
    caps = [{"capability": "events", "state": True},
            {"capability": "dirty-bitmaps", "state": True}]
    hmp = lambda m, line: m.qmp.cmd("human-monitor-command", {"command-line": line})

    def mapping(node, alias, *bitmaps):
        return [{"node-name": node, "alias": alias,
                 "bitmaps": [{"name": n, "alias": al, **extra} for n, al, extra in bitmaps]}]
    out = []
    try:
        for bad in [mapping("src", "1x"), mapping("src", "a" * 256),
                    mapping("s" * 40, "x"),
                    mapping("src", "x", ("b", "a" * 256, {})),
                    mapping("src", "x", ("b", "y", {}), ("b", "z", {})),
                    mapping("src", "x", ("b", "y", {}), ("c", "y", {})),
                    mapping("src", "x") + mapping("src", "y"),
                    mapping("src", "x") + mapping("other", "x")]:
            out.append(a.qmp.cmd("migrate-set-parameters", {"block-bitmap-mapping": bad}))
        src_map = mapping("src", "shared", ("b0", "one", {}),
                          ("b1", "two", {"transform": {"persistent": False}}))
        dst_map = mapping("dst", "shared", ("c0", "one", {}))
        for m, mp in ((a, src_map), (b, dst_map)):
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}))
            out.append(m.qmp.cmd("migrate-set-parameters", {"block-bitmap-mapping": mp}))
            out.append(m.qmp.cmd("query-migrate-parameters")["return"]
                       .get("block-bitmap-mapping"))
            out.append(mapping_section(hmp(m, "info migrate_parameters")["return"]))
        for name in ("b0", "b1", "left"):
            out.append(a.qmp.cmd("block-dirty-bitmap-add", {"node": "src", "name": name,
                                                            "granularity": 65536,
                                                            "persistent": True}))
        for line in ['qemu-io src "write 0 1M"', 'qemu-io src "write 3M 64k"']:
            out.append(hmp(a, line))
        out.append(a.qmp.cmd("migrate", {"uri": uri}))
        out.append(("a", statuses(a, "completed")))
        out.append(("b", statuses(b, "completed")))
        out.append(("destination", bitmaps_of(b)))
        out.append(("source", bitmaps_of(a)))
    finally:
        a.stop()
        b.stop()
    out.append([line.split(": ", 1)[1] for line in
                (w / "b" / "stderr.txt").read_text().splitlines() if "alias" in line])
    return hide(out)


def test_block_bitmap_mapping_matches_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, bitmap_mapping_transcript)


def hmp_migration_transcript(binary, accel, w):
    """The migration commands of the human monitor, and postcopy requested: QEMU's checks,
    then a migration that completes (nothing is pending when postcopy is asked for)."""
    m = Machine(binary, accel, w, [])
    hmp = lambda line: m.qmp.cmd("human-monitor-command", {"command-line": line})
    out = []
    try:
        out.append(m.qmp.cmd("migrate-start-postcopy"))
        out.append(hmp("migrate_start_postcopy"))
        out.append(hmp("migrate_set_capability events on"))
        out.append(hmp("migrate_set_capability dirty-bitmaps on"))
        out.append(m.qmp.cmd("migrate-start-postcopy"))
        out.append(hmp("migrate_set_parameter max-bandwidth 1G"))
        out.append(m.qmp.cmd("query-migrate-parameters")["return"]["max-bandwidth"])
        out.append(m.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 134217728}))
        out.append([c for c in m.qmp.cmd("query-migrate-capabilities")["return"]
                    if c["state"]])
        out.append(hmp("migrate -d exec:cat>/dev/null"))
        out.append(m.qmp.cmd("migrate-start-postcopy"))
        out.append(("statuses", statuses(m, "completed")))
        # QEMU announces `completed` before its clean-up moves the machine on to
        # `postmigrate`; a `cont` in between (under load) was undone, and the next
        # migration hung.
        settled_status(m)
        out.append([line for line in hmp("info migrate")["return"].splitlines()
                    if line.startswith("Migration status")])
        out.append(hmp("migrate_continue pre-switchover"))
        out.append(hmp("migrate exec:cat>/dev/null"))
        out.append(hmp("cont"))
        # The machine runs now: a long allowed downtime lets QEMU's migration end at once
        # even on a loaded machine (under CI-like load it once did not within a minute).
        # The state goes nowhere: written to a file, it waited on the disk behind other
        # tests' writes (a minute once, with QEMU's third migration still active).
        out.append(hmp("migrate_set_parameter downtime-limit 100000"))
        out.append(hmp("migrate exec:cat>/dev/null"))
        out.append(("again", statuses(m, "completed")))
        out.append([line for line in hmp("info migrate")["return"].splitlines()
                    if line.startswith("Migration status")])
    finally:
        m.stop()
    return hide(out)


def test_hmp_migration_and_postcopy_requests_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, hmp_migration_transcript)


def test_max_bandwidth_limits_how_fast_the_state_goes(tmp_path):
    """ferrite's state is small (a few hundred bytes): at 100 bytes/s it takes seconds,
    at the default rate next to no time. (QEMU's own state is far bigger: not compared.)"""
    m = Machine(SYSTEM, "qtest", tmp_path, [])
    try:
        caps = [{"capability": "events", "state": True}]
        assert m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
        took = []
        for rate in (100, 134217728):
            assert m.qmp.cmd("migrate-set-parameters", {"max-bandwidth": rate}) \
                == {"return": {}}
            start = time.monotonic()
            assert m.qmp.cmd("migrate", {"uri": f"exec:cat > '{tmp_path}/s{rate}'"}) \
                == {"return": {}}
            assert statuses(m, "completed")[-1] == "completed"
            took.append(time.monotonic() - start)
            size = (tmp_path / f"s{rate}").stat().st_size
            assert m.qmp.cmd("cont") == {"return": {}}
        assert took[0] >= (size // 10 // 10) * 0.1 and took[0] > 1.0, (took, size)
        assert took[1] < 0.5, took
    finally:
        m.stop()


def test_a_damaged_incoming_state_is_refused_without_a_crash(tmp_path):
    """A migration stream is input from another process: cut or damaged anywhere (the
    dirty-bitmap section included), the destination refuses it (QEMU's 'load of migration
    failed', exit status 1) or, where the damage is harmless, runs; it never panics."""
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    drive = ["-drive", f"if=none,id=drive0,file={img},format=qcow2"]
    m = Machine(SYSTEM, "qtest", tmp_path, drive)
    stream = tmp_path / "state"
    try:
        caps = [{"capability": "dirty-bitmaps", "state": True},
                {"capability": "events", "state": True}]
        assert m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
        for name in ("b0", "b1"):
            assert m.qmp.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": name,
                                                        "granularity": 512}) == {"return": {}}
        m.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io drive0 "write 0 300k"'})
        assert m.qmp.cmd("migrate", {"uri": f"file:{stream}"}) == {"return": {}}
        assert statuses(m, "completed")[-1] == "completed"
    finally:
        m.stop()
    good = stream.read_bytes()
    assert b"dirty-bitmap" in good
    step = max(1, len(good) // 12)
    damaged = [good[:n] for n in range(0, len(good), step)]
    for i in range(8, len(good), step):
        d = bytearray(good)
        d[i] ^= 0xff
        damaged.append(bytes(d))
    for n, d in enumerate(damaged):
        path = tmp_path / f"damaged{n}"
        path.write_bytes(d)
        p = subprocess.Popen([SYSTEM, "-nodefaults", "-display", "none", "-accel", "qtest",
                              *drive, "-incoming", f"file:{path}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            err = p.communicate(timeout=1)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1]
            continue
        assert "panicked" not in err and p.returncode == 1, (n, p.returncode, err)
        assert "load of migration failed" in err, (n, err)


def empty_exec_transcript(binary, accel, w):
    m = Machine(binary, accel, w, ["-incoming", "exec:cat /dev/null"])
    try:
        time.sleep(0.5)
        return [m.qmp.cmd("query-status"), m.qmp.cmd("query-migrate")]
    finally:
        m.stop()


def test_a_command_that_sends_nothing_leaves_the_migration_in_setup_like_qemu(tmp_path):
    """QEMU never sees `exec:cat /dev/null` become readable: no failure, no exit (iotest
    060 relies on it)."""
    compare_with_qemu(tmp_path, empty_exec_transcript)


def snapshot_incoming_transcript(binary, accel, w):
    img = w / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1M"], check=True)
    m = Machine(binary, accel, w, ["-drive", f"if=none,id=d0,file={img},driver=qcow2",
                                   "-snapshot", "-incoming", "defer"])
    try:
        nodes = m.qmp.cmd("query-named-block-nodes", {"flat": True})["return"]
        return [m.qmp.cmd("query-status"),
                [(n["drv"], n["active"], n["ro"]) for n in nodes]]
    finally:
        m.stop()


def test_snapshot_overlay_is_made_while_an_incoming_migration_is_awaited(tmp_path):
    """`-snapshot` makes its temporary overlay even while every image opens inactive: the
    file is created active, as QEMU's `bdrv_create` does, and the overlay then opens
    inactive with the rest (iotest 145)."""
    compare_with_qemu(tmp_path, snapshot_incoming_transcript)


def locked(img):
    """Whether another process holds `img` so that qemu-io cannot write it."""
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "quit", str(img)],
                       capture_output=True, text=True)
    return r.returncode != 0 and "Is another process using the image" in r.stdout + r.stderr


def device_permissions_transcript(binary, accel, w, dest_runs):
    img = w / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "1M"], check=True)
    disk = ["-blockdev", f"file,node-name=prot,filename={img}",
            "-blockdev", "raw,node-name=fmt,file=prot", "-device", "virtio-blk,drive=fmt"]
    (w / "a").mkdir()
    (w / "b").mkdir()
    uri = f"unix:{w}/mig.sock"
    b = Machine(binary, accel, w / "b", [*disk, "-incoming", uri], paused=not dest_runs)
    a = Machine(binary, accel, w / "a", disk)
    try:
        caps = [{"capability": "events", "state": True}]
        for m in (a, b):
            m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
        a.qmp.cmd("cont")
        out = [("before", locked(img))]
        out.append(a.qmp.cmd("migrate", {"uri": uri}))
        out.append(("a", statuses(a, "completed")))
        out.append(("b", statuses(b, "completed")))
        wait_for(lambda: b.qmp.cmd("query-status")["return"]["status"] != "inmigrate",
                 what="the destination to leave inmigrate")
        out.append(("after", b.qmp.cmd("query-status"), active(b), locked(img)))
        out.append(b.qmp.cmd("cont"))
        out.append(("running", b.qmp.cmd("query-status"), active(b), locked(img)))
        return hide(out)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("dest_runs", [True, False], ids=["runs", "paused"])
def test_a_device_unshares_writing_again_once_migrated_in(tmp_path, dest_runs):
    """A device on the destination shares writing only while the migration lasts; once
    the machine runs (at once, or after `cont`), another program cannot write its image
    (iotest migration-permissions)."""
    compare_with_qemu(tmp_path, lambda b, a, w: device_permissions_transcript(b, a, w,
                                                                              dest_runs))


def postcopy_pair(tmp_path, size="64G"):
    """A source with three 512-byte-granularity bitmaps on a large image (their bits are
    more than QEMU's default limits let go within the downtime limit) and a destination
    waiting for it, over an `exec:` pipe; both running."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for n in "ab":
        (tmp_path / n).mkdir()
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"{n}.qcow2"),
                        size], check=True)
    drive = "if=none,id=drive0,file={},format=qcow2,discard=unmap"
    b = Machine(SYSTEM, "qtest", tmp_path / "b",
                ["-drive", drive.format(tmp_path / "b.qcow2"), "-incoming", f"exec:cat '{fifo}'"],
                paused=False)
    a = Machine(SYSTEM, "qtest", tmp_path / "a", ["-drive", drive.format(tmp_path / "a.qcow2")],
                paused=False)
    for i in range(3):
        a.qmp.cmd("block-dirty-bitmap-add", {"node": "drive0", "name": f"b{i}",
                                             "granularity": 512, "persistent": True})
    a.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io drive0 "discard 0 1G"'})
    a.qmp.cmd("block-dirty-bitmap-disable", {"node": "drive0", "name": "b1"})
    caps = [{"capability": "dirty-bitmaps", "state": True}, {"capability": "events", "state": True}]
    for m in (a, b):
        m.qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
    # A tenth of the bits a second: the postcopy phase lasts long enough to be seen.
    a.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 4 << 20})
    return a, b, f"exec:cat>'{fifo}'"


def bitmap_counts(m):
    info = m.qmp.cmd("query-block")["return"][0]["inserted"]
    return {b["name"]: b["count"] for b in info.get("dirty-bitmaps", [])}


def stored_bitmaps(img):
    r = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                       capture_output=True, text=True, check=True)
    data = json.loads(r.stdout).get("format-specific", {}).get("data", {})
    return sorted(b["name"] for b in data.get("bitmaps", []))


def test_postcopy_bitmaps_come_after_the_destination_runs(tmp_path):
    """ferrite alone (QEMU's own scenario is iotest migrate-bitmaps-postcopy-test): bitmaps
    too big for the downtime limit keep the migration active until migrate-start-postcopy;
    then the destination runs at once, its bitmaps in use and recording its writes while
    their bits come, and complete with the source's bits and its own; the source stores
    none of them."""
    a, b, uri = postcopy_pair(tmp_path)
    try:
        assert a.qmp.cmd("migrate", {"uri": uri}) == {"return": {}}
        time.sleep(0.5)
        # Nothing converges without postcopy: the machine still runs at the source.
        assert a.qmp.cmd("query-migrate")["return"]["status"] == "active"
        assert a.qmp.cmd("query-status")["return"]["running"]
        assert a.qmp.cmd("migrate-start-postcopy") == {"return": {}}
        assert b.qmp.wait_event("RESUME", timeout=30)
        assert statuses(a, "postcopy-active")[-1] == "postcopy-active"
        assert a.qmp.cmd("query-migrate")["return"]["status"] == "postcopy-active"
        for m in (a, b):
            r = m.qmp.cmd("block-dirty-bitmap-remove", {"node": "drive0", "name": "b0"})
            assert r["error"]["desc"] == ("Bitmap 'b0' is currently in use by another "
                                          "operation and cannot be used")
        # Written at the destination while the bits are on their way.
        b.qmp.cmd("human-monitor-command", {"command-line": 'qemu-io drive0 "discard 2G 1G"'})
        statuses(b, "completed")
        assert statuses(a, "completed")[-1] == "completed"
        assert bitmap_counts(b) == {"b0": 2 << 30, "b1": 1 << 30, "b2": 2 << 30}
        quit_all(a, b)
    finally:
        a.stop()
        b.stop()
    assert stored_bitmaps(tmp_path / "a.qcow2") == []
    assert stored_bitmaps(tmp_path / "b.qcow2") == ["b0", "b1", "b2"]


def test_postcopy_bitmaps_are_dropped_when_the_destination_goes_first(tmp_path):
    """A destination that quits before the bits came keeps none of the bitmaps; the source
    waits stopped (QEMU's postcopy-paused) with its images given up, and stores none."""
    a, b, uri = postcopy_pair(tmp_path)
    try:
        a.qmp.cmd("migrate-set-parameters", {"max-bandwidth": 64 << 10})
        a.qmp.cmd("migrate", {"uri": uri})
        a.qmp.cmd("migrate-start-postcopy")
        assert b.qmp.wait_event("RESUME", timeout=30)
        b.qmp.cmd("quit")
        b.proc.wait(10)
        wait_for(lambda: a.qmp.cmd("query-migrate")["return"]["status"] == "postcopy-paused",
                 timeout=30, what="the source to pause")
        assert not a.qmp.cmd("query-status")["return"]["running"]
        a.qmp.cmd("quit")
        a.proc.wait(10)
    finally:
        a.stop()
        b.stop()
    assert stored_bitmaps(tmp_path / "a.qcow2") == []
    assert stored_bitmaps(tmp_path / "b.qcow2") == []


def blocker_transcript(binary, accel, w):
    """A machine with VDI, VHD, Parallels and VHDX images: query-migrate lists their blockers,
    `migrate` and `savevm` refuse with the newest; the blockers go with their nodes."""
    vdi, vpc, qcow, prl = w / "d.vdi", w / "d.vpc", w / "d.qcow2", w / "d.prl"
    vhdx = w / "d.vhdx"
    for img, fmt in ((vdi, "vdi"), (vpc, "vpc"), (qcow, "qcow2"), (prl, "parallels"),
                     (vhdx, "vhdx")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "4M"], check=True)
    m = Machine(binary, accel, w, [
        "-blockdev", f"driver=file,node-name=qf,filename={qcow}",
        "-blockdev", "driver=qcow2,node-name=q,file=qf",
        "-blockdev", f"driver=vdi,node-name=v0,file.driver=file,file.filename={vdi}"])
    try:
        out = [m.qmp.cmd("query-migrate")]
        out.append(m.qmp.cmd("blockdev-add", {"driver": "vpc", "node-name": "p0", "file": {
            "driver": "file", "filename": str(vpc)}}))
        out.append(m.qmp.cmd("query-migrate"))
        out.append(m.qmp.cmd("migrate", {"uri": "exec:cat > /dev/null"}))
        out.append(m.qmp.cmd("human-monitor-command", {"command-line": "savevm s1"}))
        out.append(m.qmp.cmd("blockdev-add", {"driver": "parallels", "node-name": "r0",
                                              "file": {"driver": "file",
                                                       "filename": str(prl)}}))
        out.append(m.qmp.cmd("migrate", {"uri": "exec:cat > /dev/null"}))
        out.append(m.qmp.cmd("blockdev-add", {"driver": "vhdx", "node-name": "x0",
                                              "file": {"driver": "file",
                                                       "filename": str(vhdx)}}))
        out.append(m.qmp.cmd("query-migrate"))
        out.append(m.qmp.cmd("blockdev-del", {"node-name": "x0"}))
        out.append(m.qmp.cmd("blockdev-del", {"node-name": "r0"}))
        out.append(m.qmp.cmd("blockdev-del", {"node-name": "p0"}))
        out.append(m.qmp.cmd("migrate", {"uri": "exec:cat > /dev/null"}))
        out.append(m.qmp.cmd("blockdev-del", {"node-name": "v0"}))
        out.append(m.qmp.cmd("query-migrate"))
        return hide(out)
    finally:
        m.stop()


def test_formats_that_cannot_migrate_block_it_as_in_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, blocker_transcript)


# HMP `migrate_set_parameter` texts: each parameter's type as the monitor reads it (C
# integers, sizes in bytes, rates in MiB, on/off, enum members), and QEMU's checks.
PARAMETER_LINES = [
    "cpu-throttle-initial x", "cpu-throttle-initial 300", "cpu-throttle-initial -1",
    "cpu-throttle-initial 0", "cpu-throttle-initial 0x1e", "cpu-throttle-tailslow maybe",
    "cpu-throttle-tailslow on", "x-checkpoint-delay 5000000000", "x-checkpoint-delay 1k",
    "max-bandwidth 1x", "max-bandwidth 10", "max-bandwidth 1.5G",
    "multifd-compression lz4", "multifd-compression zstd", "mode cpr-reboot",
    "zero-page-detection foo", "xbzrle-cache-size 1000", "xbzrle-cache-size 1M",
    "block-bitmap-mapping x", "tls-creds abc", "max-cpu-throttle 10", "vcpu-dirty-limit 0",
    "announce-step 0", "multifd-channels 0", "direct-io yes", "downtime-limit 1.5k",
    "downtime-limit 2000001", "downtime-limit x", "multifd-zstd-level 21",
    "avail-switchover-bandwidth 5", "throttle-trigger-threshold 0", "nosuch 1", "", "tls-creds",
]

# QMP `migrate-set-parameters`: the types (null for the TLS names), each check, and
# several values at once (the first refused one is reported and none is set).
PARAMETER_ARGS = [
    {"multifd-compression": "zlib"}, {"tls-creds": None}, {"tls-hostname": "h", "tls-authz": ""},
    {"cpu-throttle-initial": 0}, {"cpu-throttle-initial": 256}, {"max-cpu-throttle": 5},
    {"x-checkpoint-delay": 1}, {"xbzrle-cache-size": 4097},
    {"announce-max": 100001, "announce-initial": 100001},
    {"announce-rounds": 7, "announce-step": 10001}, {"mode": "cpr-transfer"},
    {"vcpu-dirty-limit": 0}, {"x-vcpu-dirty-limit-period": 0}, {"multifd-qatzip-level": 0},
    {"multifd-zlib-level": 10}, {"max-bandwidth": 1 << 63}, {"downtime-limit": 2000000},
    {"direct-io": True}, {"downtime-limit": -1}, {"multifd-compression": "lz4"},
    {"block-bitmap-mapping": [{"node-name": "x", "alias": "", "bitmaps": []}]},
]


def parameters_transcript(binary, accel, w):
    """Every migration parameter set, refused and reported through QMP and HMP; then the
    TLS and compression checks that depend on the zero-copy-send and mapped-ram
    capabilities."""
    m = Machine(binary, accel, w, [])
    hmp = lambda line: m.qmp.cmd("human-monitor-command", {"command-line": line})
    out = []
    try:
        out.append(m.qmp.cmd("query-migrate-parameters"))
        out.append(hmp("info migrate_parameters"))
        out += [hmp(f"migrate_set_parameter {line}") for line in PARAMETER_LINES]
        out.append(hmp("info migrate_parameters"))
        out += [m.qmp.cmd("migrate-set-parameters", a) for a in PARAMETER_ARGS]
        out.append(m.qmp.cmd("query-migrate-parameters"))
        out.append(hmp("info migrate_parameters"))
        for cap, args in (("zero-copy-send", {"tls-creds": "t"}),
                          ("mapped-ram", {"multifd-compression": "zstd"})):
            out.append(m.qmp.cmd("migrate-set-parameters", {"multifd-compression": "none",
                                                            "tls-creds": ""}))
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": "multifd", "state": True},
                {"capability": cap, "state": True}]}))
            out.append(m.qmp.cmd("migrate-set-parameters", args))
            out.append(m.qmp.cmd("migrate-set-parameters", args))
            out.append(m.qmp.cmd("migrate-set-capabilities", {"capabilities": [
                {"capability": cap, "state": False}]}))
        out.append(m.qmp.cmd("query-migrate-parameters"))
    finally:
        m.stop()
    return out


def test_migration_parameters_match_qemu_system(tmp_path):
    compare_with_qemu(tmp_path, parameters_transcript)


def test_downtime_limit_decides_whether_bitmaps_wait_for_postcopy(tmp_path):
    """Dirty bitmaps too big to go within `downtime-limit` at `max-bandwidth` wait for
    postcopy; with a longer limit the same migration completes at once (max-bandwidth 0
    is no limit, as in QEMU)."""
    for args in ({"downtime-limit": 2000000}, {"max-bandwidth": 0}):
        w = tmp_path / next(iter(args))
        w.mkdir()
        a, b, uri = postcopy_pair(w)
        try:
            assert a.qmp.cmd("migrate-set-parameters", args) == {"return": {}}
            assert a.qmp.cmd("migrate", {"uri": uri}) == {"return": {}}
            seen = statuses(a, "completed")
            assert seen[-1] == "completed" and "postcopy-active" not in seen, (args, seen)
            statuses(b, "completed")
            assert bitmap_counts(b) == {"b0": 1 << 30, "b1": 1 << 30, "b2": 1 << 30}, args
            quit_all(a, b)
        finally:
            a.stop()
            b.stop()
