"""User objects and the QOM commands, compared with qemu-storage-daemon."""
import json

from conftest import replies

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
               "chardev-hub"]:
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
        if args.get("implements") == "chardev":
            # Every chardev type qsd has, ferrite has.
            assert got == want
