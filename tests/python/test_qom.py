"""User objects and the QOM commands, compared with qemu-storage-daemon."""
import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import replies, serve_each, wait_for

OBJECTS = ["--object", "throttle-group,id=tg0,x-iops-total=100",
           "--object", "secret,id=s0,data=aGVsbG8=,format=base64",
           "--object", "iothread,id=io0,poll-max-ns=0x10"]

SEQUENCE = [
    ("qom-get", {"path": "/objects/tg0", "property": "limits"}),
    ("qom-get", {"path": "tg0", "property": "type"}),
    ("qom-get", {"path": "/objects/s0", "property": "data"}),
    ("qom-get", {"path": "/objects/s0", "property": "format"}),
    ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}),
    ("qom-get", {"path": "/objects/io0", "property": "thread-id"}),
    ("qom-get", {"path": "/nope", "property": "type"}),
    ("qom-get", {"path": "nope", "property": "type"}),
    ("qom-get", {"path": "/objects/tg0", "property": "nope"}),
    ("qom-get", {"path": "/objects", "property": "type"}),
    ("qom-get", {"path": "/", "property": "type"}),
    ("qom-get", {"path": "/chardevs/qmp0", "property": "type"}),
    ("qom-set", {"path": "/objects/tg0", "property": "limits", "value": {"bps-total": 5}}),
    ("qom-get", {"path": "/objects/tg0", "property": "limits"}),
    ("qom-set", {"path": "/objects/tg0", "property": "limits", "value": {"bps-read": 5}}),
    ("qom-set", {"path": "/objects/tg0", "property": "limits", "value": {"bps-total": "x"}}),
    ("qom-set", {"path": "/objects/tg0", "property": "limits", "value": 1}),
    ("qom-set", {"path": "/objects/tg0", "property": "x-iops-total", "value": "x"}),
    ("qom-set", {"path": "/objects/tg0", "property": "x-iops-total", "value": 5}),
    ("qom-set", {"path": "/objects/io0", "property": "poll-max-ns", "value": 5}),
    ("qom-get", {"path": "/objects/io0", "property": "poll-max-ns"}),
    ("qom-set", {"path": "/objects/io0", "property": "poll-grow", "value": "x"}),
    ("qom-set", {"path": "/objects/tg0", "property": "nope", "value": 5}),
    ("qom-list", {"path": "/nope"}),
    ("qom-list-properties", {"typename": "nope"}),
    ("object-add", {"qom-type": "secret", "id": "s0", "data": "x"}),
    ("object-add", {"qom-type": "secret", "id": "s1"}),
    ("object-add", {"qom-type": "secret", "id": "s1", "data": "x", "file": "/etc/hostname"}),
    ("object-add", {"qom-type": "secret", "id": "s2", "data": "%%%", "format": "base64"}),
    ("object-add", {"qom-type": "secret", "id": "s3", "file": "/nonexistent"}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": -1}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total-max": 10}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1",
                    "limits": {"iops-total": 10, "iops-read": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1",
                    "limits": {"iops-total": 10, "iops-total-max": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1",
                    "limits": {"iops-total": 10, "iops-total-max-length": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1",
                    "limits": {"iops-total": 10, "iops-total-max-length": 0}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1",
                    "limits": {"bps-total": 2000000000000000}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "limits": {"iops-total": 10},
                    "x-iops-total": 4}),
    # A value refused as it is set comes before a taken id; a failure to complete after.
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "x-iops-total": -1}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg1", "x-iops-total": -1,
                    "limits": {"iops-total": 5}}),
    ("object-add", {"qom-type": "throttle-group", "id": "tg2", "x-iops-total": -1}),
    ("object-add", {"qom-type": "iothread", "id": "tg1", "poll-max-ns": -1}),
    ("object-add", {"qom-type": "iothread", "id": "tg1", "thread-pool-min": 5,
                    "thread-pool-max": 2}),
    ("object-add", {"qom-type": "secret", "id": "tg1"}),
    ("object-add", {"qom-type": "secret_keyring", "id": "tg1", "serial": 0}),
    ("qom-get", {"path": "/objects/tg1", "property": "limits"}),
    ("object-add", {"qom-type": "iothread", "id": "1bad"}),
    ("object-add", {"qom-type": "nope", "id": "x"}),
    ("object-add", {"id": "x"}),
    ("object-add", {"qom-type": "iothread", "id": "io1", "bogus": 1}),
    ("object-add", {"qom-type": "main-loop", "id": "ml0", "thread-pool-max": 4}),
    ("qom-get", {"path": "/objects/ml0", "property": "thread-pool-max"}),
    # Event loop parameters: never negative, and thread pool bounds that make a pool (a
    # qom-set that breaks them fails, but QEMU keeps the value).
    *[("object-add", {"qom-type": "iothread", "id": f"p{i}", prop: v})
      for i, (prop, v) in enumerate((p, v) for p in ("poll-max-ns", "poll-grow", "poll-shrink",
                                                      "aio-max-batch", "thread-pool-min",
                                                      "thread-pool-max")
                                    for v in (-1, 0, 1 << 31))],
    ("object-add", {"qom-type": "iothread", "id": "x1", "thread-pool-min": 10,
                    "thread-pool-max": 5}),
    ("object-add", {"qom-type": "iothread", "id": "x2", "thread-pool-min": 5,
                    "thread-pool-max": 10}),
    ("qom-set", {"path": "/objects/x2", "property": "thread-pool-min", "value": 20}),
    ("qom-get", {"path": "/objects/x2", "property": "thread-pool-min"}),
    ("qom-set", {"path": "/objects/x2", "property": "poll-max-ns", "value": -5}),
    ("qom-get", {"path": "/objects/x2", "property": "poll-max-ns"}),
    ("object-add", {"qom-type": "main-loop", "id": "ml1", "thread-pool-max": 0}),
    # The main loop is always in use.
    ("object-del", {"id": "ml0"}),
    # Nodes longer than QEMU's largest (INT64_MAX rounded down to 1 GiB).
    ("blockdev-add", {"driver": "null-co", "node-name": "big", "size": (1 << 63) - 1}),
    ("blockdev-add", {"driver": "null-co", "node-name": "big", "size": (1 << 63) - (1 << 30)}),
    ("blockdev-add", {"driver": "null-co", "node-name": "big2",
                      "size": (1 << 63) - (1 << 30) + 512}),
    ("object-del", {"id": "nope"}),
    ("object-del", {"id": "io0"}),
    ("object-del", {"id": "io0"}),
]


def test_sequence_matches_qsd(both):
    qsd, ferrite = both(OBJECTS)
    assert replies(ferrite, SEQUENCE) == replies(qsd, SEQUENCE)


def as_set(rsp):
    return sorted(json.dumps(x, sort_keys=True) for x in rsp["return"])


def test_qom_list_matches_qsd_as_sets(both):
    qsd, ferrite = both(OBJECTS)
    for path in ["/", "/objects", "/objects/tg0", "/objects/s0", "/objects/io0", "/chardevs",
                 "/chardevs/qmp0", "/backend", "tg0"]:
        want = as_set(qsd.connect().cmd("qom-list", {"path": path}))
        got = as_set(ferrite.connect().cmd("qom-list", {"path": path}))
        assert got == want, path


def test_list_properties_match_qsd(both):
    qsd, ferrite = both()
    for ty in ["throttle-group", "secret", "iothread", "main-loop", "chardev-socket", "container",
               "chardev-pty", "chardev-udp", "chardev-serial", "chardev-parallel", "chardev-mux",
               "chardev-hub", "thread-context", "pr-manager", "pr-manager-helper",
               "authz-list-file"]:
        want = as_set(qsd.connect().cmd("qom-list-properties", {"typename": ty}))
        got = as_set(ferrite.connect().cmd("qom-list-properties", {"typename": ty}))
        assert got == want, ty


def test_list_types_is_the_qsd_subset_ferrite_implements(both):
    qsd, ferrite = both()
    for args in [{}, {"implements": "user-creatable"}, {"implements": "chardev", "abstract": True},
                 {"abstract": True}]:
        want = {json.dumps(x, sort_keys=True) for x in qsd.connect().cmd("qom-list-types", args)["return"]}
        got = {json.dumps(x, sort_keys=True) for x in ferrite.connect().cmd("qom-list-types", args)["return"]}
        assert got <= want, (args, got - want)
        assert got, args
        if args.get("implements") in ("chardev", "user-creatable"):
            # Every chardev type and every type a user can make that qsd has, ferrite has.
            assert got == want, args


# Every object type of QEMU's schema that a storage daemon cannot make: refused as qsd
# refuses it once the type's own members are checked.
NOT_HERE = [
    ("object-add", {"qom-type": "memory-backend-ram", "id": "#bad", "size": 1}),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "m"}),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 1,
                    "host-nodes": [-1]}),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "m", "size": 1,
                    "host-nodes": ["x"]}),
    ("object-add", {"qom-type": "memory-backend-file", "id": "m", "size": 1,
                    "mem-path": "/nonexistent", "rom": "maybe"}),
    ("object-add", {"qom-type": "memory-backend-ram", "id": "tg0", "size": 1}),
    ("object-add", {"qom-type": "rng-random", "id": "r", "bogus": 1}),
    ("object-add", {"qom-type": "rng-random", "id": "r", "opened": True}),
    ("object-add", {"qom-type": "colo-compare", "id": "c"}),
    ("object-add", {"qom-type": "filter-dump", "id": "f", "netdev": "n", "file": "x",
                    "queue": "sideways"}),
    ("object-add", {"qom-type": "can-bus", "id": "c"}),
    ("object-add", {"qom-type": "sev-guest", "id": "s", "reduced-phys-bits": 1}),
    ("object-add", {"qom-type": "x-vfio-user-server", "id": "v", "device": "d",
                    "socket": {"type": "unix", "path": "/nonexistent"}}),
    ("object-add", {"qom-type": "authz-listfile", "id": "a", "filename": "/nonexistent"}),
    ("object-add", {"qom-type": "authz-pam", "id": "a", "service": "login"}),
    ("object-add", {"qom-type": "tls-cipher-suites", "id": "t"}),
]


def test_object_types_of_other_programs_are_refused_as_in_qsd(both):
    qsd, ferrite = both(OBJECTS)
    assert replies(ferrite, NOT_HERE) == replies(qsd, NOT_HERE)


THREAD_CONTEXT = [
    ("object-add", {"qom-type": "thread-context", "id": "t1", "cpu-affinity": [1, 0, 1]}),
    ("qom-get", {"path": "/objects/t1", "property": "cpu-affinity"}),
    ("qom-get", {"path": "/objects/t1", "property": "node-affinity"}),
    ("qom-set", {"path": "/objects/t1", "property": "cpu-affinity", "value": [1]}),
    ("qom-get", {"path": "/objects/t1", "property": "cpu-affinity"}),
    ("qom-set", {"path": "/objects/t1", "property": "node-affinity", "value": [0]}),
    ("qom-get", {"path": "/objects/t1", "property": "cpu-affinity"}),
    ("qom-set", {"path": "/objects/t1", "property": "cpu-affinity", "value": [4096]}),
    ("qom-set", {"path": "/objects/t1", "property": "cpu-affinity", "value": []}),
    ("qom-set", {"path": "/objects/t1", "property": "node-affinity", "value": [9]}),
    ("qom-set", {"path": "/objects/t1", "property": "cpu-affinity", "value": [-1]}),
    ("qom-set", {"path": "/objects/t1", "property": "cpu-affinity", "value": "x"}),
    ("qom-set", {"path": "/objects/t1", "property": "thread-id", "value": 5}),
    ("qom-list", {"path": "/objects/t1"}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "cpu-affinity": [4096]}),
    ("object-add", {"qom-type": "thread-context", "id": "tg0", "cpu-affinity": [4096]}),
    ("object-add", {"qom-type": "thread-context", "id": "tg0", "node-affinity": [9]}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "cpu-affinity": []}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "node-affinity": []}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "node-affinity": [0],
                    "cpu-affinity": [0]}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "node-affinity": [],
                    "cpu-affinity": [0]}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "node-affinity": [0],
                    "cpu-affinity": []}),
    ("object-add", {"qom-type": "thread-context", "id": "t2", "node-affinity": [70000]}),
    ("object-add", {"qom-type": "thread-context", "id": "t3", "node-affinity": [0]}),
    ("qom-get", {"path": "/objects/t3", "property": "cpu-affinity"}),
    ("object-del", {"id": "t1"}),
    ("qom-list", {"path": "/objects/t1"}),
]


def test_thread_context_as_qsd_and_its_thread_real(both):
    """A `thread-context` is a thread of the daemon's with the affinity asked for: the
    replies are qsd's, and the kernel reports the affinity `qom-get` does."""
    if os.cpu_count() < 2 or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to tell affinities apart")
    qsd, ferrite = both(OBJECTS)
    assert replies(ferrite, THREAD_CONTEXT) == replies(qsd, THREAD_CONTEXT)
    c = ferrite.connect()
    assert c.cmd("object-add", {"qom-type": "thread-context", "id": "t9",
                                "cpu-affinity": [1]}) == {"return": {}}
    tid = c.cmd("qom-get", {"path": "/objects/t9", "property": "thread-id"})["return"]
    with open(f"/proc/{ferrite.proc.pid}/task/{tid}/comm") as f:
        assert f.read().strip() == "TC t9"
    assert os.sched_getaffinity(tid) == {1}
    assert c.cmd("qom-set", {"path": "/objects/t9", "property": "cpu-affinity",
                             "value": [0]}) == {"return": {}}
    assert os.sched_getaffinity(tid) == {0}
    assert c.cmd("object-del", {"id": "t9"}) == {"return": {}}
    wait_for(lambda: not os.path.exists(f"/proc/{ferrite.proc.pid}/task/{tid}"),
             what="the thread to end with its object")


def helper_stand_in(path, greeting, hear_answer=True, hang_up=True):
    """A unix socket at `path` whose every client gets `greeting` and is then hung up on
    (None: kept, silent; without `hang_up`, kept); without `hear_answer`, the client is
    kept but cannot write (an answer gets EPIPE at once)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    kept = []

    def greet(c):
        if greeting is None:
            kept.append(c)
            return
        if not hear_answer:
            c.shutdown(socket.SHUT_RD)
        c.sendall(greeting)
        if hang_up and hear_answer:
            c.close()
        else:
            kept.append(c)
    return serve_each(srv, greet)


def test_pr_manager_helper_connects_as_qsd(both, tmp_path):
    """`pr-manager-helper` against a real `qemu-pr-helper` and against stand-ins that hang
    up early or greet with odd flags; `file` and `host_device` nodes naming it."""
    helper = shutil.which("qemu-pr-helper")
    if helper is None:
        pytest.skip("qemu-pr-helper is not installed")
    sock = tmp_path / "pr.sock"
    proc = subprocess.Popen([helper, "-k", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stand_ins = [helper_stand_in(tmp_path / "eof", b""),
                 helper_stand_in(tmp_path / "short", b"\0\0"),
                 helper_stand_in(tmp_path / "odd", b"\1\2\3\4", hang_up=False),
                 helper_stand_in(tmp_path / "deaf", b"\0\0\0\0", hear_answer=False)]
    try:
        wait_for(sock.exists, what="qemu-pr-helper's socket")
        seq = [
            ("object-add", {"qom-type": "pr-manager-helper", "id": "pr", "path": str(sock)}),
            ("qom-get", {"path": "/objects/pr", "property": "path"}),
            ("qom-list", {"path": "/objects/pr"}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p1",
                            "path": str(tmp_path / "eof")}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p2",
                            "path": str(tmp_path / "short")}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p3",
                            "path": str(tmp_path / "odd")}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p4",
                            "path": str(tmp_path / "none")}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p6",
                            "path": str(tmp_path / "deaf")}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "p5", "path": ""}),
            ("object-add", {"qom-type": "pr-manager-helper", "id": "tg0",
                            "path": str(tmp_path / "none")}),
            ("blockdev-add", {"driver": "host_device", "node-name": "d1",
                              "filename": "/dev/null", "pr-manager": "pr"}),
            ("blockdev-add", {"driver": "file", "node-name": "f1",
                              "filename": str(tmp_path / "eof"), "pr-manager": "pr"}),
            ("blockdev-add", {"driver": "host_device", "node-name": "d2",
                              "filename": "/dev/null", "pr-manager": "tg0"}),
            ("blockdev-add", {"driver": "host_device", "node-name": "d3",
                              "filename": "/dev/null", "pr-manager": "nope"}),
            ("qom-set", {"path": "/objects/pr", "property": "path", "value": "elsewhere"}),
            ("qom-get", {"path": "/objects/pr", "property": "path"}),
            ("object-del", {"id": "pr"}),
        ]
        qsd, ferrite = both(OBJECTS)
        assert replies(ferrite, seq) == replies(qsd, seq)
        # Beyond QEMU: a helper that never greets stalls qsd's monitor for ever; ferrite
        # gives up after a few seconds and says so.
        silent = helper_stand_in(tmp_path / "silent", None)
        start = time.monotonic()
        r = ferrite.connect().cmd("object-add", {"qom-type": "pr-manager-helper", "id": "ps",
                                                 "path": str(tmp_path / "silent")})
        assert "sent no greeting within 5 s" in r["error"]["desc"], r
        assert time.monotonic() - start < 8
        silent.close()
    finally:
        for s in stand_ins:
            s.close()
        proc.terminate()
        proc.wait()
