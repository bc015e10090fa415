"""The QMP wire protocol, byte for byte against qemu-storage-daemon (qemu-behaviour.md §1)."""
import json

import pytest

from conftest import normalize

# Each case is raw input sent on a negotiated session; the replies are compared as text.
CASES = [
    b'{"execute":"query-version"}',
    b'{"execute":"query-version","id":1e3}',
    b'{"execute":"query-version","id":18446744073709551616}',
    b'{"execute":"query-version","id":{"a":[1,"x",null,true,-0,0.1]}}',
    b"{'execute':'query-version','id':'it\\'s'}",
    b'{"execute":"query-version"}{"execute":"query-version","id":2}',
    b'{"execute":"nope","id":3}',
    b'{"execute":1}',
    b'{"execute":"query-version","arguments":[]}',
    b'{"execute":"query-version","arguments":{"x":1}}',
    b'{"execute":"query-version","bogus":1}',
    b'{"exec-oob":"query-version","id":4}',
    b'{"execute":"query-version","exec-oob":"query-version"}',
    b'{"arguments":{}}',
    b'{"id":5}',
    b'[]',
    b'"x"',
    b'1 ',
    b'null ',
    b'{"a":1,"a":2}',
    b'}',
    b']',
    b'{"a" 1}',
    b'{1:2}',
    b'[1 2]',
    b'{"a":1 "b":2}',
    b'[nul]',
    b'["\\x"]',
    b'["\\uD800"]',
    b'["\\uD800\\u0041"]',
    b'["\\u00e9\\uD83D\\uDE00\\u0000"]',
    b'["\xc3\x28"]',
    b'"\xff\xfe"',
    b'["\xed\xa0\x80"]',
    b'["\xef\xbf\xbf"]',
    b'["\xc0\x80"]',
    b'\x01{"execute":"query-version","id":6}',
    b'{"execute":"query-version","id":[1,2',
    b'{"execute":"query-version","id":\t7\r\n}',
    b'-',
    b'01',
    b'1.',
    b'1e',
    b'1e+5 ',
    b'-1.5E-3 ',
    b'{"execute":"qmp_capabilities","id":8}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}',
    b'%',
    b'{"a":%d}',
    b'tru',
    b'{"execute":"query-version", "id": "\\u0001\\t\\n/\\\\"}',
    b'{"execute":"ringbuf-read","arguments":{"device":"x","size":1.5}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"x","size":"1"}}',
    b'{"execute":"ringbuf-read","arguments":{"device":5,"size":1}}',
    b'{"execute":"ringbuf-read","arguments":{"size":1}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"x","size":1,"format":"hex"}}',
    b'{"execute":"ringbuf-read","arguments":{"device":"x","size":9223372036854775808}}',
    b'{"execute":"qom-list-types","arguments":{"abstract":"yes"}}',
    b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"nope"}}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"null"}}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"null","data":{"logappend":1}}}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"socket","data":{"addr":{"type":"inet","data":{"host":"h","port":"1","to":70000}}}}}}',
    b'{"execute":"chardev-add","arguments":{"id":"c","backend":{"type":"socket","data":{"addr":{"type":"inet","data":{"host":"h","port":"1","to":"x"}}}}}}',
    b'{"execute":"object-add","arguments":{"qom-type":"secret","id":"s","format":"hex"}}',
    b'{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"t","limits":{"iops-total":"x"}}}',
    b'{"execute":"object-add","arguments":{"qom-type":"throttle-group","id":"t","limits":[]}}',
    b'{"execute":"qom-set","arguments":{"path":"x","property":"y"}}',
    # An alternate of the wrong type is named by its member alone, or "null" in a list.
    b'{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"x","file":null}}',
    b'{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"y","file":"f",'
    b'"backing":5}}',
    b'{"execute":"block-dirty-bitmap-merge","arguments":{"node":"x","target":"b",'
    b'"bitmaps":[5]}}',
]


@pytest.mark.parametrize("data", CASES, ids=[repr(c)[:60] for c in CASES])
def test_transcript_matches_qsd(both, data):
    qsd, ferrite = both()
    want = [normalize(x) for x in qsd.connect().transcript(data)]
    got = [normalize(x) for x in ferrite.connect().transcript(data)]
    assert got == want


def test_greeting_and_negotiation_match_qsd(both):
    qsd, ferrite = both()
    seqs = [b'{"execute":"query-version"}', b'{"execute":"qom-list","arguments":{"path":"/"}}',
            b'{"execute":"qmp_capabilities","arguments":{"bogus":1}}',
            b'{"exec-oob":"qmp_capabilities"}', b'{"execute":"nope"}',
            b'{"execute":"qmp_capabilities","id":1}', b'{"execute":"qmp_capabilities"}',
            b'{"execute":"query-version"}']
    for d in (qsd, ferrite):
        d.conn = d.connect(negotiate=False)
    assert normalize(json.dumps(ferrite.conn.greeting)) == normalize(json.dumps(qsd.conn.greeting))
    for data in seqs:
        want = [normalize(x) for x in qsd.conn.transcript(data)]
        got = [normalize(x) for x in ferrite.conn.transcript(data)]
        assert got == want, data


def test_oob_rules_match_qsd(both):
    qsd, ferrite = both()
    seqs = [b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}',
            b'{"exec-oob":"query-version","id":1}',
            b'{"exec-oob":"query-version","execute":"query-version"}',
            b'{"exec-oob":1}',
            b'{"execute":"query-version","id":2}']
    for d in (qsd, ferrite):
        d.conn = d.connect(negotiate=False)
    for data in seqs:
        want = [normalize(x) for x in qsd.conn.transcript(data)]
        got = [normalize(x) for x in ferrite.conn.transcript(data)]
        assert got == want, data


def test_pretty_monitor_matches_qsd(both):
    qsd, ferrite = both(monitor_opts=",pretty=on")
    for d in (qsd, ferrite):
        d.conn = d.connect(negotiate=False)
    assert normalize(json.dumps(ferrite.conn.greeting)) == normalize(json.dumps(qsd.conn.greeting))
    for data in [b'{"execute":"qmp_capabilities"}',
                 b'{"execute":"qom-list","arguments":{"path":"/"}}',
                 b'{"execute":"query-version","id":[]}',
                 b'{"execute":"nope","id":{"a":[1,{}]}}']:
        want = [normalize(x) for x in qsd.conn.transcript(data)]
        got = [normalize(x) for x in ferrite.conn.transcript(data)]
        assert got == want, data
