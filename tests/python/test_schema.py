"""query-qmp-schema: ferrite's declarations agree with qemu-storage-daemon's, command by command."""
import json

from conftest import normalize


def index(schema):
    return {e["name"]: e for e in schema}


def shape(s, name, stack=()):
    """A comparable description of a type, with masked names resolved. A type met again
    inside itself (BlockdevOptions through BlockdevRef) is described as a back reference to
    the depth where it started, so recursive types compare by structure."""
    e = s.get(name)
    if e is None:
        return name
    if name in stack:
        return ["recursive", len(stack) - stack.index(name)]
    stack = stack + (name,)
    mt = e["meta-type"]
    if mt == "builtin":
        return name
    if mt == "array":
        return ["array", shape(s, e["element-type"], stack)]
    if mt == "enum":
        return ["enum", frozenset(m["name"] for m in e["members"])]
    if mt == "alternate":
        return ["alternate", [shape(s, m["type"], stack) for m in e["members"]]]
    # A dict keeps the declaration order, which decides which bad member is reported first.
    members = {m["name"]: ("default" in m, tuple(m.get("features", [])),
                           shape(s, m["type"], stack)) for m in e["members"]}
    variants = {v["case"]: shape(s, v["type"], stack) for v in e.get("variants", [])}
    return ["object", members, e.get("tag"), variants]


# What ferrite's schema leaves out of QEMU's, as a QEMU built without it would: the COLO
# `replication` driver (CONFIG_REPLICATION), which only runs between two VMs.
LEFT_OUT = {"replication"}


def compatible(ours, theirs, path):
    """ours has every enum value and union variant theirs has (but LEFT_OUT); all else must
    match, members in the same order (QEMU checks them in that order)."""
    if isinstance(ours, list) and isinstance(theirs, list) and ours and ours[0] == theirs[0]:
        kind = ours[0]
        if kind == "enum":
            assert ours[1] <= theirs[1], (path, ours[1] - theirs[1])
            assert theirs[1] - ours[1] <= LEFT_OUT, (path, theirs[1] - ours[1])
            return
        if kind == "array":
            return compatible(ours[1], theirs[1], path + "[]")
        if kind == "alternate":
            assert len(ours[1]) == len(theirs[1]), path
            for a, b in zip(ours[1], theirs[1]):
                compatible(a, b, path)
            return
        if kind == "object":
            assert set(ours[1]) == set(theirs[1]), (path, set(ours[1]) ^ set(theirs[1]))
            assert list(ours[1]) == list(theirs[1]), (path, "member order")
            for m, (opt, feats, ty) in ours[1].items():
                assert (opt, feats) == theirs[1][m][:2], (path + "." + m)
                compatible(ty, theirs[1][m][2], path + "." + m)
            assert ours[2] == theirs[2], path
            assert set(theirs[3]) - set(ours[3]) <= LEFT_OUT, (path, set(theirs[3]) - set(ours[3]))
            for case, ty in ours[3].items():
                assert case in theirs[3], (path, case)
                compatible(ty, theirs[3][case], f"{path}({case})")
            return
    assert ours == theirs, path


def test_every_command_matches_qsd(both):
    qsd, ferrite = both()
    theirs = index(qsd.connect().cmd("query-qmp-schema")["return"])
    ours = index(ferrite.connect().cmd("query-qmp-schema")["return"])
    commands = [e for e in ours.values() if e["meta-type"] == "command"]
    assert len(commands) >= 20
    for c in commands:
        t = theirs[c["name"]]
        assert t["meta-type"] == "command"
        assert c.get("features") == t.get("features"), c["name"]
        assert c.get("allow-oob") == t.get("allow-oob"), c["name"]
        compatible(shape(ours, c["arg-type"]), shape(theirs, t["arg-type"]), c["name"])
        compatible(shape(ours, c["ret-type"]), shape(theirs, t["ret-type"]), c["name"] + "->")


def test_schema_is_well_formed(ferrite):
    schema = ferrite().connect().cmd("query-qmp-schema")["return"]
    names = [e["name"] for e in schema]
    assert len(names) == len(set(names))
    known = set(names)
    for e in schema:
        for key in ("arg-type", "ret-type", "element-type"):
            if key in e:
                assert e[key] in known, (e["name"], key)
        for m in e.get("members", []):
            if "type" in m:
                assert m["type"] in known
        if e["meta-type"] not in ("command", "event", "builtin") and not e["name"].startswith("["):
            assert e["name"].isdigit(), e["name"]


def test_query_commands_lists_every_schema_command(ferrite):
    c = ferrite().connect()
    schema = c.cmd("query-qmp-schema")["return"]
    listed = {x["name"] for x in c.cmd("query-commands")["return"]}
    assert listed == {e["name"] for e in schema if e["meta-type"] == "command"}
