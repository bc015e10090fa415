"""QMP commands with generated arguments, sent to qemu-storage-daemon and to ferrite in the same
state: the same errors (class and text) come back, and ferrite never dies.

Arguments are made from ferrite's `query-qmp-schema` (what ferrite says it takes), mostly
well-formed with one thing changed (a member dropped, added or of the wrong type, a value
out of range, a name that does not exist), because that is where the order of QEMU's checks
shows. Both daemons start from the same graph, objects and chardevs; a command one accepts
and the other refuses is reported, and both start again so later cases compare equal states.
Replies where both succeed are not compared (timestamps, ports and job progress differ).
"""
import json
import os
import random
import re
import subprocess

import pytest

# Commands left out: those that end the daemon or answer with the whole schema.
SKIP = {"quit", "query-qmp-schema", "qmp_capabilities", "query-commands", "qom-list-types"}

NAMES = ["file0", "fmt0", "null0", "bm0", "sec0", "io0", "job0", "exp0", "nosuch", "", "x",
         "ch0", "tgt0", "img.qcow2", "tgt.raw", "base.qcow2", "#bad", "a" * 40, "type"]
# Relative file names only (each daemon has its own directory), and absolute ones that do
# not exist: qemu-storage-daemon, running as root here, unlinks whatever a unix socket's
# path names (`/dev/null` included) and would mount a FUSE export over a directory.
STRINGS = NAMES + ["qcow2", "raw", "on", "off", "1", "-1", "\u00e9", "unix", "inet",
                   "127.0.0.1", "0", "nbd", "null-co", "file", "/nonexistent/x", "/objects",
                   "/objects/sec0", "node-name", "size", "a,b", "fmt0/file0", "YWJj", "=="]
INTS = [0, 1, -1, 2, 512, 4096, 65536, 1 << 20, 1 << 30, 1 << 31, (1 << 32) + 1, 1 << 62,
        (1 << 63) - 1, -(1 << 63), 1 << 63, (1 << 64) - 1, 1 << 64, 7, 3]

SETUP = [
    ("blockdev-add", {"driver": "file", "node-name": "file0", "filename": "img.qcow2"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "fmt0", "file": "file0"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "null0", "size": 1048576}),
    ("block-dirty-bitmap-add", {"node": "fmt0", "name": "bm0"}),
    ("object-add", {"qom-type": "secret", "id": "sec0", "data": "pw"}),
    ("object-add", {"qom-type": "iothread", "id": "io0"}),
    ("chardev-add", {"id": "ch0", "backend": {"type": "ringbuf", "data": {}}}),
]

# What a command that succeeded made and would keep listening: undone at once, so that
# the other daemon can bind the same address.
UNDO = {
    "nbd-server-start": lambda a: ("nbd-server-stop", None),
    "chardev-add": lambda a: ("chardev-remove", {"id": a["id"]}),
}

# Commands that may make a file (or a socket) at a path they are given.
MAKE_FILES = {"blockdev-create", "blockdev-snapshot-sync", "drive-backup", "drive-mirror",
              "chardev-add", "chardev-change", "nbd-server-start", "block-export-add",
              "memsave", "pmemsave", "migrate", "migrate-incoming", "dump-guest-memory",
              "screendump", "human-monitor-command", "transaction"}

# Job states in which nothing more happens until a client acts.
SETTLED = {"concluded", "null", "ready", "paused", "standby"}


class Generator:
    def __init__(self, schema, seed, strings=STRINGS, skip=SKIP):
        self.t = {e["name"]: e for e in schema}
        self.rng = random.Random(seed)
        self.strings = strings
        self.commands = sorted(n for n, e in self.t.items()
                               if e["meta-type"] == "command" and n not in skip)

    def value(self, name, depth=0):
        e, rng = self.t[name], self.rng
        kind = e["meta-type"]
        if kind == "builtin":
            return {"string": lambda: rng.choice(self.strings),
                    "int": lambda: rng.choice(INTS),
                    "number": lambda: rng.choice([0.5, 1.0, -3.0, 1e30, 0]),
                    "boolean": lambda: rng.random() < 0.5,
                    "null": lambda: None}.get(
                        e["json-type"], lambda: rng.choice([1, "x", {}, [], None, True]))()
        if kind == "enum":
            return rng.choice([m["name"] for m in e["members"]])
        if kind == "array":
            if depth > 4:
                return []
            return [self.value(e["element-type"], depth + 1)
                    for _ in range(rng.choice([0, 1, 1, 2]))]
        if kind == "alternate":
            return self.value(rng.choice(e["members"])["type"], depth + 1)
        out = {}
        for m in e["members"]:
            if "default" not in m or (depth < 3 and rng.random() < 0.35):
                out[m["name"]] = self.value(m["type"], depth + 1)
        tag = out.get(e.get("tag"))
        for v in e.get("variants", []):
            if v["case"] == tag:
                out.update(self.value(v["type"], depth + 1))
        return out

    def wrong(self):
        return self.rng.choice([1, "s", True, None, [], {}, 1.5, -1, [1], {"a": 1}])

    def mutate(self, v):
        """`v` with one thing changed somewhere inside."""
        rng = self.rng
        if isinstance(v, dict) and v and rng.random() < 0.8:
            v = dict(v)
            k = rng.choice(list(v))
            r = rng.random()
            if r < 0.15:
                del v[k]
            elif r < 0.25:
                v[rng.choice(["bogus"] + self.strings)] = self.wrong()
            elif r < 0.45:
                v[k] = self.wrong()
            else:
                v[k] = self.mutate(v[k])
            return v
        if isinstance(v, list) and v and rng.random() < 0.8:
            v = list(v)
            i = rng.randrange(len(v))
            v[i] = self.mutate(v[i])
            return v
        if isinstance(v, str) and rng.random() < 0.5:
            return rng.choice(self.strings + ["bogus-enum"])
        return self.wrong()

    def case(self):
        while True:
            name = self.rng.choice(self.commands)
            args = self.value(self.t[name]["arg-type"])
            if self.rng.random() < 0.6:
                args = self.mutate(args)
            if isinstance(args, dict):
                # Nothing made outside the daemons' directories (the root directory is
                # this machine's, and both daemons would share a file there).
                if name in MAKE_FILES and '"/' in json.dumps(args):
                    continue
                # No FUSE mounts: a daemon killed mid-test would leave one behind. No stdio
                # chardev: whether it works depends on the test's standard input.
                if args.get("type") == "fuse" or (
                        name == "chardev-add"
                        and isinstance(args.get("backend"), dict)
                        and args["backend"].get("type") == "stdio"):
                    continue
            return name, args


class Side:
    """One daemon in the shared starting state."""

    def __init__(self, start):
        self.d = start()
        for name, fmt in (("img.qcow2", "qcow2"), ("tgt.raw", "raw"), ("base.qcow2", "qcow2")):
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt,
                            str(self.d.workdir / name), "1M"], check=True)
        self.c = self.d.connect()
        for name, args in SETUP:
            assert "return" in self.c.cmd(name, args), (name, args)

    def run(self, name, args):
        try:
            reply = self.c.cmd(name, args)
        except (OSError, EOFError, ValueError) as e:
            return {"died": str(e)}
        if "return" in reply and name in UNDO:
            self.c.cmd(*UNDO[name](args))
        return reply

    def jobs(self):
        try:
            return {j["id"]: j["status"] for j in self.c.cmd("query-jobs")["return"]}
        except (OSError, EOFError, ValueError):
            return {}

    def text(self, reply):
        t = json.dumps(reply, sort_keys=True).replace(str(self.d.workdir), "W")
        # QEMU numbers the nodes it names itself with a counter of every node it made.
        t = re.sub(r"#block\d+", "#blockN", t)
        return re.sub(r'"seconds": \d+, "microseconds": \d+', "T", t)

    def kept_file(self, reply):
        """Whether `reply` is ferrite refusing to unlink a file that is not a socket to
        listen there (qemu-storage-daemon unlinks whatever the path names)."""
        m = re.fullmatch(r"(?:Failed to add chardev '.*': )?"
                         r"Failed to bind socket to (.*): Address already in use",
                         reply.get("error", {}).get("desc", ""))
        return bool(m) and (self.d.workdir / m.group(1)).is_file()

    def stop(self):
        self.d.stop()


def settle(sides, stuck, timeout=10.0):
    """Waits until no job of either daemon is still moving on its own. A job that is still
    at it after `timeout` (one crawling at `speed` 1) goes into `stuck` and is not waited
    for again: every later command would wait for it in full."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        moving = {(i, job) for i, s in enumerate(sides)
                  for job, status in s.jobs().items() if status not in SETTLED} - stuck
        if not moving:
            return
        if time.monotonic() >= deadline:
            stuck |= moving
            return
        time.sleep(0.02)




# More seeds or cases for a longer search: FERRITE_QMP_SEEDS=5-40 FERRITE_QMP_CASES=2000.
_first, _, _last = os.environ.get("FERRITE_QMP_SEEDS", "1-4").partition("-")
SEEDS = range(int(_first), int(_last or _first) + 1)
CASES = int(os.environ.get("FERRITE_QMP_CASES", "600"))


def deliberately_unlike(name, a, b):
    """Answers ferrite gives on purpose where the oracle fails otherwise: a service ferrite
    has no client for (Ceph, GlusterFS, VFIO NVMe), refused where the oracle reports the
    service's own failure; a bitmap merge of no bitmaps, which crashes QEMU 10.0.2 (or, in a
    transaction, leaves it to a later action's error and a broken bitmap)."""
    desc = b.get("error", {}).get("desc", "")
    return "error" in a and ("ferrite has no" in desc
                             or "expects a non-empty list of bitmaps to merge" in desc)


def generated_differences(new_theirs, new_ours, generator, cases, ignored=deliberately_unlike):
    """Runs `cases` commands from `generator(ours)` on two fresh sides (made by the two
    starters, and made again whenever their states part); the differences, as text.
    `ignored(name, a, b)` says which answers are not compared."""
    theirs, ours = new_theirs(), new_ours()
    stuck = set()
    gen = generator(ours)
    differences = []
    for i in range(cases):
        name, args = gen.case()
        a = theirs.run(name, args)
        b = ours.run(name, args)
        # Both still at work on it (an `nbd` node retrying for its `open-timeout`): alike.
        both_busy = a.get("died") == b.get("died") == "timed out"
        assert "died" not in b or both_busy, (i, name, json.dumps(args), b)
        if "died" in a:
            # QEMU 10.0.2 aborts on some commands ferrite answers (`blockdev-reopen` of an
            # empty list, `transaction` enabling a bitmap of a node that does not exist):
            # no oracle there.
            print(f"the oracle died at {i} {name} {json.dumps(args)}")
        elif "return" in a and "return" in b:
            settle([theirs, ours], stuck)
            continue
        elif ours.kept_file(b):
            # Deliberately unlike QEMU, which would have deleted the file (an image here).
            pass
        elif not ignored(name, a, b):
            ta, tb = theirs.text(a), ours.text(b)
            if ta != tb:
                differences.append(f"{i} {name} {json.dumps(args)}\n  qemu:    {ta}\n"
                                   f"  ferrite: {tb}")
        if "died" in a or ours.kept_file(b) or ("return" in a) != ("return" in b):
            # The states differ now: start both again.
            theirs.stop()
            ours.stop()
            theirs, ours = new_theirs(), new_ours()
            stuck = set()
    theirs.stop()
    ours.stop()
    return differences


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_commands_get_qsds_answers(qsd, ferrite, seed):
    differences = generated_differences(
        lambda: Side(qsd), lambda: Side(ferrite),
        lambda ours: Generator(ours.c.cmd("query-qmp-schema")["return"], seed), CASES)
    assert not differences, "\n".join(differences)


# To see how a seed reached a difference: FERRITE_QMP_REPLAY=SEED:STEP prints the commands
# both daemons ran since they last started (those refused marked so), then both answers at
# STEP.
@pytest.mark.skipif("FERRITE_QMP_REPLAY" not in os.environ,
                    reason="a debugging aid: set FERRITE_QMP_REPLAY=SEED:STEP")
def test_replay_a_generated_case(qsd, ferrite):
    replay(lambda: Side(qsd), lambda: Side(ferrite),
           lambda ours, seed: Generator(ours.c.cmd("query-qmp-schema")["return"], seed),
           os.environ["FERRITE_QMP_REPLAY"])


def replay(new_theirs, new_ours, generator, seed_step):
    """Prints what both sides ran of `generator(ours, seed)`'s commands since they last
    started, then both answers at the step (`seed_step` is "SEED:STEP")."""
    seed, _, step = seed_step.partition(":")
    theirs, ours = new_theirs(), new_ours()
    stuck = set()
    gen = generator(ours, int(seed))
    history = []
    for i in range(int(step) + 1):
        name, args = gen.case()
        a, b = theirs.run(name, args), ours.run(name, args)
        line = f"{i} {json.dumps([name, args])}"
        if i == int(step):
            print("\n".join(history + [line, f"  qemu:    {a}", f"  ferrite: {b}"]))
        elif "died" in a or ours.kept_file(b) or ("return" in a) != ("return" in b):
            theirs.stop()
            ours.stop()
            theirs, ours = new_theirs(), new_ours()
            stuck = set()
            history = []
        else:
            history.append(line if "return" in a else f"{line} (refused)")
            settle([theirs, ours], stuck)
    theirs.stop()
    ours.stop()


# Commands longer searches found answered differently, each in the order of checks QEMU has
# (kept here so CI's few seeds cannot lose them).
FOUND = [
    ("block_resize", {"node-name": "fmt0", "size": 1 << 62}),
    ("block_resize", {"node-name": "file0", "size": 1 << 62}),
    ("drive-backup", {"device": "null0", "sync": "full", "bitmap": "nosuch",
                      "target": "img.qcow2", "mode": "existing"}),
    ("drive-mirror", {"device": "null0", "sync": "full", "target": "img.qcow2",
                      "mode": "existing"}),
    ("drive-backup", {"device": "file0", "sync": "none", "target": "img.qcow2",
                      "format": "qcow2"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "l1", "latency-ns": -1}),
    ("blockdev-create", {"job-id": "r1", "options": {"driver": "raw", "location": {},
                                                     "size": 4096}}),
    ("query-version", {"x": 1, "y": 2, "zz": 3}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "b1", "image": "#bad",
                      "align": -1}),
    ("blockdev-add", {"driver": "vvfat", "node-name": "vv1", "dir": "/objects",
                      "fat-type": -(1 << 63)}),
    # nbd-server-remove names an export by its ID, and one of another type is refused.
    ("block-export-add", {"type": "vhost-user-blk", "id": "v1", "node-name": "null0",
                          "addr": {"type": "unix", "path": "v.sock"}}),
    ("nbd-server-remove", {"name": "v1"}),
    ("block-export-del", {"id": "v1"}),
    ("blockdev-reopen", {"options": [{"driver": "qcow", "node-name": "null0",
                                      "file": "raw"}]}),
    ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "null0",
                                      "read-only": True},
                                     {"driver": "dmg", "file": {"driver": "luks",
                                                                "file": "bm0"}}]}),
    ("blockdev-add", {"driver": "iscsi", "node-name": "i1", "transport": "iser",
                      "portal": "-1", "target": "==", "user": "=="}),
    ("blockdev-add", {"driver": "iscsi", "node-name": "i2", "transport": "iser",
                      "portal": "/objects", "target": "0"}),
    ("drive-backup", {"job-id": "j1", "device": "file0", "sync": "none", "speed": -1,
                      "target": "inet", "mode": "absolute-paths"}),
    ("drive-backup", {"job-id": "j2", "device": "fmt0", "sync": "top",
                      "bitmap-mode": "on-success", "target": "file", "format": "null-co",
                      "mode": "existing"}),
    ("object-add", {"qom-type": "main-loop", "id": "type",
                    "thread-pool-min": 4611686018427387904}),
    ("blockdev-add", {"driver": "host_cdrom", "node-name": "c1", "read-only": True,
                      "detect-zeroes": "unmap", "filename": ""}),
    ("blockdev-add", {"driver": "file", "node-name": "c2", "filename": ""}),
    ("blockdev-snapshot-sync", {"node-name": "file0", "snapshot-file": "/nonexistent/x",
                                "snapshot-node-name": "s1", "format": "a,b"}),
    ("blockdev-snapshot-sync", {"node-name": "fmt0", "snapshot-file": "tgt.raw",
                                "snapshot-node-name": "s2", "format": "raw",
                                "mode": "existing"}),
    ("blockdev-reopen", {"options": [{"driver": "dmg", "node-name": "fmt0",
                                      "detect-zeroes": "unmap",
                                      "file": {"driver": "ftps", "url": "base.qcow2"}}]}),
    ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "null0",
                                      "detect-zeroes": "unmap"}]}),
    ("blockdev-create", {"job-id": "j3", "options": {"driver": "blkreplay"}}),
    ("object-add", {"qom-type": "throttle-group", "id": "t1",
                    "limits": {"iops-read-max-length": 4294967297}, "x-iops-write-max": -1}),
    ("object-add", {"qom-type": "throttle-group", "id": "t2",
                    "limits": {"iops-total": -1}, "x-iops-write-max": -1}),
    ("blockdev-reopen", {"options": [{"driver": "ssh", "node-name": "fmt0", "path": "p",
                                      "server": {"host": "h", "port": "22"}}]}),
    ("x-blockdev-set-iothread", {"node-name": "null0", "iothread": "objects/nosuch"}),
    ("blockdev-add", {"driver": "host_cdrom", "node-name": "c3", "aio": "native",
                      "filename": "/nonexistent/x"}),
    ("x-blockdev-amend", {"job-id": "j4", "node-name": "null0",
                          "options": {"driver": "blkreplay"}}),
    ("blockdev-set-active", {"node-name": "null0", "active": False}),
    ("blockdev-add", {"driver": "vmdk", "node-name": "v1",
                      "file": {"driver": "vhdx", "file": "null0"}}),
    ("blockdev-set-active", {"node-name": "fmt0", "active": False}),
    ("drive-backup", {"device": "fmt0", "sync": "top", "target": "tgt0",
                      "mode": "absolute-paths"}),
    ("transaction", {"actions": [{"type": "drive-backup", "data": {
        "device": "fmt0", "sync": "none", "target": "tgt1"}}]}),
    ("drive-backup", {"device": "fmt0", "sync": "none", "filter-node-name": "ch0",
                      "x-perf": {"max-chunk": 1}, "target": "tgt2"}),
    ("blockdev-add", {"driver": "nfs", "node-name": "n1", "cache": {},
                      "server": {"type": "inet", "host": "h"}, "path": "p"}),
    ("blockdev-add", {"driver": "ssh", "node-name": "n2", "cache": {},
                      "server": {"host": "h", "port": "1"}, "path": "/p"}),
    # A node opened with `active` given can never be reopened.
    ("blockdev-add", {"driver": "null-co", "node-name": "n3", "active": True}),
    ("blockdev-reopen", {"options": [{"driver": "null-co", "node-name": "n3",
                                      "active": True}]}),
    # An inactive old top goes read-only too; its overlay then cannot be activated.
    ("blockdev-set-active", {"active": False}),
    ("blockdev-snapshot", {"node": "file0", "overlay": "fmt0"}),
    ("blockdev-set-active", {"active": True}),
    # A child naming the node being made: a cycle, but for a `file` found before the name.
    ("blockdev-add", {"driver": "blkverify", "node-name": "n4", "test": "null0", "raw": "n4"}),
    ("blockdev-add", {"driver": "quorum", "node-name": "n4", "children": ["n4"],
                      "vote-threshold": 1}),
    ("blockdev-add", {"driver": "raw", "node-name": "n4", "file": "n4"}),
    # libiscsi makes no context for an empty initiator name.
    ("blockdev-add", {"driver": "iscsi", "node-name": "i3", "transport": "tcp", "portal": "#bad",
                      "target": "t", "initiator-name": "", "user": "u"}),
    # A name given to the NBD driver as the format is read as that driver reads names.
    ("drive-backup", {"device": "null0", "sync": "full", "target": "tgt0", "format": "nbd"}),
    ("drive-mirror", {"device": "null0", "sync": "full", "target": "nbd:unix:x:exportname=",
                      "format": "nbd"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "nbd://a:b/",
                      "format": "nbd"}),
    # Object properties are set (and refused) in the order of QEMU's QDict.
    ("object-add", {"qom-type": "iothread", "id": "i1", "poll-max-ns": -1, "poll-grow": -1}),
    # Names of host devices go to host_device (QEMU's find_hdev_driver), made or opened.
    ("drive-backup", {"device": "fmt0", "sync": "full", "target": "/dev/null", "format": "raw"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "/dev/zero", "format": "raw",
                      "mode": "existing"}),
    ("drive-mirror", {"device": "fmt0", "sync": "full", "target": "/dev/null",
                      "format": "qcow2"}),
    # A read-only format claims its file as it attaches it, before reading it.
    ("blockdev-add", {"driver": "vmdk", "node-name": "ch0", "read-only": True,
                      "file": {"driver": "parallels", "file": "file0"}}),
    # A raw window is whole sectors; a backing file not found says it is one.
    ("blockdev-add", {"driver": "raw", "node-name": "r9", "file": "null0", "offset": 1,
                      "size": 1000}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "q9", "backing": "nosuch",
                      "file": {"driver": "null-co"}}),
    # ssh takes any C int as a port, then connects (and fails to resolve a bad one).
    ("blockdev-add", {"driver": "ssh", "node-name": "s9", "path": "/p",
                      "server": {"host": "127.0.0.1", "port": "-1", "numeric": True}}),
    # A reopen names the first option that changed, lists flattened as QEMU flattens them.
    ("blockdev-reopen", {"options": [{"driver": "gluster", "node-name": "fmt0",
                                      "volume": "qcow2", "path": "img.qcow2",
                                      "server": [{"type": "inet", "host": "inet",
                                                  "port": "file"}]}]}),
    # `sync: none` gives the target its backing file before the bitmap options are
    # judged, and a protocol node (the target of a protocol's backup) has none.
    ("drive-backup", {"device": "null0", "sync": "none", "bitmap-mode": "always",
                      "target": "img.qcow2", "mode": "existing"}),
    # A UDP chardev's remote port is checked before any name is resolved.
    ("chardev-add", {"id": "u9", "backend": {"type": "udp", "data": {
        "remote": {"type": "inet", "data": {"host": "tgt.raw", "port": ""}}}}}),
    # A job's op blocker on a mirror's target refuses a resize.
    ("blockdev-add", {"driver": "null-co", "node-name": "n9", "size": 1 << 20}),
    ("blockdev-add", {"driver": "null-co", "node-name": "m9", "size": 1 << 20}),
    ("blockdev-mirror", {"job-id": "mj9", "device": "n9", "target": "m9", "sync": "full",
                         "speed": 1}),
    ("block_resize", {"node-name": "m9", "size": 1 << 21}),
    # A listening socket chardev on an empty fd name listens on nothing, and is made
    # (qsd seed 1297); a named one needs the monitor's descriptors.
    ("chardev-add", {"id": "f9", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": ""}}}}}),
    ("chardev-add", {"id": "g9", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": ""}}, "server": False}}}),
    # A protocol given as the format reads the name as its driver reads names (qsd seed
    # 1600); a format's file is found by the name's protocol, which must be one known.
    ("drive-backup", {"device": "null0", "sync": "full", "target": "off", "format": "nbd",
                      "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "nbd:", "format": "raw",
                      "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "nbd:unix:/x",
                      "format": "ssh", "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "ssh://h",
                      "format": "raw", "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "ssh:foo",
                      "format": "ssh", "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "ssh://h:x/p",
                      "format": "ssh", "mode": "existing"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "a:b", "format": "raw",
                      "mode": "existing"}),
    ("drive-mirror", {"device": "null0", "sync": "full", "target": "a:b"}),
    ("drive-mirror", {"device": "null0", "sync": "full", "target": "a:b", "format": "ssh"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "http://h/x",
                      "format": "ssh"}),
    ("drive-backup", {"device": "null0", "sync": "full", "target": "tgt9", "format": "ssh"}),
    ("blockdev-snapshot-sync", {"node-name": "null0", "snapshot-file": "a:b",
                                "mode": "existing"}),
    # blkdebug's limits are judged once its image is open (qsd seed 1596), against the
    # alignment of the node and its image; 0 is unset.
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd1", "align": 3,
                      "image": "nosuch"}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd2", "align": 0, "image": "null0"}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd3", "align": 4096,
                      "max-transfer": 512, "image": "null0"}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd4", "opt-write-zero": 4096,
                      "max-write-zero": 6144, "image": "null0"}),
    ("blockdev-add", {"driver": "blkdebug", "node-name": "bd5", "opt-discard": 2,
                      "max-discard": 1, "image": "null0"}),
    # A persistent bitmap added to a read-only qcow2 node (an old top, now a backing file)
    # cannot be stored: the node cannot go inactive (qsd seed 1554).
    ("blockdev-snapshot-sync", {"node-name": "fmt0", "snapshot-file": "ov9",
                                "snapshot-node-name": "ov9"}),
    ("block-dirty-bitmap-add", {"node": "fmt0", "name": "p9", "persistent": True}),
    ("blockdev-set-active", {"active": False}),
    ("query-named-block-nodes", {"flat": True}),
    # An event loop's properties are set in the order of the QDict QEMU makes from the
    # QAPI object, whatever the client's order (qsd seed 1973).
    ("object-add", {"qom-type": "main-loop", "id": "ml9", "thread-pool-min": -1,
                    "thread-pool-max": -1}),
    ("object-add", {"qom-type": "iothread", "id": "io9", "thread-pool-max": -1,
                    "thread-pool-min": -2}),
    # A quorum that rewrites corrupted children writes them even while inactive, and the
    # children it opens inherit its inactivity (qsd seed 1904).
    ("blockdev-add", {"driver": "quorum", "node-name": "qu9", "active": False,
                      "children": [{"driver": "null-aio"}], "vote-threshold": 1,
                      "rewrite-corrupted": True}),
    # QEMU names a node before opening it: a copy-on-read filter whose bottom is itself
    # finds a filter (qsd seed 2432).
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor9", "file": "null0",
                      "bottom": "cor9"}),
    # QEMU keeps a burst length unsigned: a negative one in `limits` is a huge one (system
    # seeds 1274 and 1374).
    ("object-add", {"qom-type": "throttle-group", "id": "tg9",
                    "limits": {"iops-read-max-length": -1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg9",
                    "limits": {"iops-read-max-length": -4294967296, "iops-read-max": 5}}),
    # A main loop applies its thread pool's bounds as each is set: a maximum beyond
    # INT_MAX, set first, fails before the negative minimum is seen (qsd seed 3687).
    ("object-add", {"qom-type": "main-loop", "id": "ml8", "thread-pool-min": -1,
                    "thread-pool-max": 2147483648}),
    # Base64 read from a file is searched for NUL bytes first (qsd seed 3882).
    ("object-add", {"qom-type": "secret", "id": "sec8", "format": "base64",
                    "file": "img.qcow2"}),
    # Size options take no sign, whatever the driver (qsd seed 4298).
    ("blockdev-add", {"driver": "preallocate", "node-name": "pa9",
                      "file": {"driver": "null-co"}, "prealloc-align": 65536,
                      "prealloc-size": -9223372036854775808}),
    ("blockdev-add", {"driver": "preallocate", "node-name": "pa9",
                      "file": {"driver": "null-co"}, "prealloc-align": -512}),
    ("blockdev-add", {"driver": "raw", "node-name": "ra9", "file": {"driver": "null-co"},
                      "offset": -1, "size": -512}),
    # A window of a file is data no one else may resize, claimed before the window is
    # judged (qsd seed 4711); a node too long is refused before an empty option group
    # (seed 4771).
    ("blockdev-add", {"driver": "raw", "node-name": "ra9", "read-only": True,
                      "file": "file0", "offset": 9223372036854775807}),
    ("blockdev-add", {"driver": "null-aio", "node-name": "na9", "cache": {},
                      "size": 9223372036854775807}),
]

# Cases that need a state of their own: each runs on fresh daemons.
FOUND_APART = {
    # nbd-server-add exports a read-only node read-only, whatever `writable` says (seed
    # 4536).
    # A file's creation empties it before it refuses a preallocation mode files do not
    # have: the image it held is gone (seed 4890).
    "file-emptied-before-its-creation-fails": [
        ("blockdev-set-active", {"active": False}),
        ("blockdev-create", {"job-id": "c9", "options": {
            "driver": "file", "filename": "img.qcow2", "size": 1048576,
            "preallocation": "metadata"}}),
        ("query-jobs", {}),
        ("blockdev-set-active", {"active": True}),
    ],
    "nbd-server-add-read-only-node": [
        ("blockdev-snapshot-sync", {"node-name": "fmt0", "snapshot-file": "ov.qcow2",
                                    "snapshot-node-name": "ov9"}),
        ("nbd-server-add", {"device": "fmt0", "writable": True}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": "nbd9.sock"}}}),
        ("nbd-server-add", {"device": "fmt0", "writable": True}),
        ("query-block-exports", {}),
    ],
    # A reopen (here the snapshot's old top made read-only) drops the flag that said the
    # file node was opened as a protocol: a job's existing target is then probed (seed 1881).
    "reopened-protocol-node": [
        ("blockdev-set-active", {"active": False}),
        ("blockdev-snapshot", {"node": "file0", "overlay": "fmt0"}),
        ("drive-backup", {"device": "file0", "sync": "none", "target": "tgt.raw",
                          "mode": "existing"}),
    ],
    # An inactive overlay cannot take over the users of a node that write (seed 1747).
    "inactive-overlay-over-a-written-node": [
        ("blockdev-add", {"driver": "qcow2", "node-name": "ov9",
                          "file": {"driver": "file", "filename": "base.qcow2"}}),
        ("blockdev-set-active", {"node-name": "ov9", "active": False}),
        ("blockdev-snapshot", {"node": "file0", "overlay": "ov9"}),
    ],
    # The old top stays writable where a user still writes it (here the overlay, which has
    # it as its file too): QEMU's reopen fails, and the snapshot ignores that (seed 2968).
    "old-top-still-written": [
        ("blockdev-snapshot", {"node": "file0", "overlay": "fmt0"}),
        ("nbd-server-add", {"device": "file0"}),
    ],
    # A reopen judges each node whole before the next: fmt0's other driver before the
    # options file0 loses (seed 3595).
    "reopen-node-by-node": [
        ("blockdev-reopen", {"options": [
            {"driver": "http", "node-name": "fmt0", "url": "bm0"},
            {"driver": "nfs", "node-name": "file0",
             "server": {"type": "inet", "host": "#bad"}, "path": "p"}]}),
    ],
}


@pytest.mark.parametrize("case", FOUND_APART)
def test_sequences_found_before_get_qsds_answers(qsd, ferrite, case):
    theirs, ours = Side(qsd), Side(ferrite)
    for name, args in FOUND_APART[case]:
        a, b = theirs.run(name, args), ours.run(name, args)
        assert ("return" in a) == ("return" in b), (name, args, a, b)
        if "error" in a:
            assert ours.text(b) == theirs.text(a), (name, args)
        settle([theirs, ours], set())


def test_commands_found_before_get_qsds_answers(qsd, ferrite):
    theirs, ours = Side(qsd), Side(ferrite)
    for name, args in FOUND:
        a, b = theirs.run(name, args), ours.run(name, args)
        if "return" in a:
            # What qemu-storage-daemon takes, ferrite takes too: the steps that make the
            # state the next cases need, and commands ferrite once refused.
            assert "return" in b, (name, args, a, b)
            continue
        assert ours.text(b) == theirs.text(a), (name, args)
