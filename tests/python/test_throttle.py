"""The `throttle` filter and throttle groups against qemu-storage-daemon: the node and its
refusals, a group in use refusing `object-del`; and the rates a client sees through an NBD
export of a throttled node (bytes and operations per second within 10% of the limit,
bursts, two nodes sharing one group, limits changed live with `qom-set`), measured on both
daemons in the same run."""
import json
import threading
import time

import nbdclient as nc
from conftest import assert_same_transcript, normalize, recorder

MiB = 1 << 20


def transcript(d):
    c = d.connect()
    out = []
    cmd = recorder(c, out)
    cmd("object-add", {"qom-type": "throttle-group", "id": "tg0",
                       "limits": {"bps-total": 4 * MiB, "iops-total": 100}})
    cmd("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": 64 * MiB})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0"})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0",
                         "throttle-group": "nope"})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t0", "file": "n0",
                         "throttle-group": "tg0"})
    cmd("blockdev-add", {"driver": "throttle", "node-name": "t1", "throttle-group": "tg0",
                         "file": {"driver": "null-co", "node-name": "n1"}})
    nodes = c.cmd("query-named-block-nodes", {"flat": True})["return"]
    out.append(("nodes", json.loads(normalize(json.dumps(nodes, sort_keys=True)))))
    # Not flat: a filter's child shows as its backing image and counts in the depth.
    nodes = c.cmd("query-named-block-nodes")["return"]
    out.append(("chain", json.loads(normalize(json.dumps(nodes, sort_keys=True)))))
    cmd("x-debug-query-block-graph", {})
    cmd("object-del", {"id": "tg0"})
    cmd("qom-set", {"path": "/objects/tg0", "property": "limits",
                    "value": {"bps-total": 8 * MiB}})
    cmd("qom-get", {"path": "/objects/tg0", "property": "limits"})
    cmd("blockdev-reopen", {"options": [{"driver": "throttle", "node-name": "t1",
                                         "throttle-group": "nope", "file": "n1"}]})
    cmd("blockdev-del", {"node-name": "t0"})
    cmd("blockdev-del", {"node-name": "t1"})
    cmd("object-del", {"id": "tg0"})
    c.close()
    return out


def test_throttle_nodes_match_qsd(both):
    q, f = both()
    assert_same_transcript(transcript(q), transcript(f))


class Stream:
    """An NBD client keeping `depth` reads (or writes) of `bs` in flight on one export and
    noting when each completed."""

    def __init__(self, sock, name, bs, depth, write=False):
        self.n = nc.Nbd(sock)
        self.n.go(name)
        self.bs, self.depth, self.write = bs, depth, write
        self.done = []
        self.stop = False

    def run(self, seconds):
        ty = nc.CMD_WRITE if self.write else nc.CMD_READ
        payload = b"\x5a" * self.bs if self.write else b""
        size = self.n.size
        at = 0
        deadline = time.monotonic() + seconds
        for _ in range(self.depth):
            self.n.request(ty, at % size, self.bs, payload=payload)
            at += self.bs
        while time.monotonic() < deadline:
            err, _ = self.n.simple_reply(0 if self.write else self.bs)
            assert err == 0
            self.done.append(time.monotonic())
            self.n.request(ty, at % size, self.bs, payload=payload)
            at += self.bs
        self.n.close()
        return self

    def rate(self, start, end):
        """Completions per second between `start` and `end` seconds after the first."""
        t0 = self.done[0]
        n = sum(1 for t in self.done if start <= t - t0 < end)
        return n / (end - start)


def throttled_export(d, limits, nodes=("t0",)):
    c = d.connect()
    assert c.cmd("object-add", {"qom-type": "throttle-group", "id": "tg",
                                "limits": limits}) == {"return": {}}
    sock = str(d.workdir / "nbd.sock")
    assert c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
        == {"return": {}}
    for name in nodes:
        r = c.cmd("blockdev-add", {"driver": "throttle", "node-name": name,
                                   "throttle-group": "tg",
                                   "file": {"driver": "null-co", "size": 1 << 30}})
        assert r == {"return": {}}, r
        assert c.cmd("block-export-add", {"type": "nbd", "id": name, "node-name": name,
                                          "writable": True}) == {"return": {}}
    return c, sock


def measure(both_daemons, limits, run):
    """`run(conn, sock)` on each daemon: (qsd's result, ferrite's)."""
    return tuple(run(*throttled_export(d, limits)) for d in both_daemons)


def within(value, target, tolerance=0.10):
    return abs(value - target) <= tolerance * target


def test_bytes_per_second_are_held_to_the_limit(both):
    # 8 MiB/s of 64 KiB reads: 128 per second.
    rates = measure(both(), {"bps-total": 8 * MiB},
                    lambda c, s: Stream(s, "t0", 64 << 10, 4).run(3).rate(1, 3))
    for who, r in zip(("qsd", "ferrite"), rates):
        assert within(r, 128), f"{who}: {r:.1f} reads/s for 128"


def test_operations_per_second_are_held_to_the_limit(both):
    rates = measure(both(), {"iops-write": 200},
                    lambda c, s: Stream(s, "t0", 4096, 8, write=True).run(3).rate(1, 3))
    for who, r in zip(("qsd", "ferrite"), rates):
        assert within(r, 200), f"{who}: {r:.1f} writes/s for 200"


def test_bursts_go_at_the_burst_rate_then_at_the_average(both):
    q, f = both()
    limits = {"bps-total": 2 * MiB, "bps-total-max": 16 * MiB, "bps-total-max-length": 2}
    results = measure((q, f), limits,
                      lambda c, s: Stream(s, "t0", 64 << 10, 4).run(5))
    for who, r in zip(("qsd", "ferrite"), results):
        # 16 MiB/s of 64 KiB reads while the burst lasts, 2 MiB/s after it.
        burst, after = r.rate(0, 1) * 64 / 1024, r.rate(3.5, 5) * 64 / 1024
        assert within(burst, 16, 0.15), f"{who}: burst {burst:.1f} MiB/s"
        assert within(after, 2, 0.15), f"{who}: after {after:.1f} MiB/s"


def test_two_nodes_share_one_group_and_limits_change_live(both):
    for d in both():
        c, sock = throttled_export(d, {"bps-total": 8 * MiB}, nodes=("t0", "t1"))
        streams = [Stream(sock, name, 64 << 10, 4) for name in ("t0", "t1")]
        threads = [threading.Thread(target=s.run, args=(3,)) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shares = [s.rate(1, 3) for s in streams]
        assert within(sum(shares), 128), f"{d.binary}: {shares}"
        assert min(shares) > 0.35 * sum(shares), f"{d.binary}: {shares}"
        # Raised live: the next requests run at the new rate.
        assert c.cmd("qom-set", {"path": "/objects/tg", "property": "limits",
                                 "value": {"bps-total": 16 * MiB}}) == {"return": {}}
        r = Stream(sock, "t0", 64 << 10, 4).run(3).rate(1, 3)
        assert within(r, 256), f"{d.binary}: {r:.1f} reads/s for 256"
