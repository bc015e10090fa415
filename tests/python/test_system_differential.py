"""Generated QMP commands sent to qemu-system-x86_64 and to ferrite-system-x86_64 in the same
state: the same errors (class and text) come back, and ferrite never dies.

test_qmp_differential.py does this for the storage daemon; here the machine's commands join
in (devices, drives named by their device, run states, the human monitor), as QEMU's iotests
drive them. Both machines start stopped (`-S`) with the same drives and devices; QEMU runs
with `-accel tcg` (Debian's build has no qtest), ferrite with `-accel qtest`, as in
test_system.py.
"""
import os
import re
import subprocess
import types

import pytest

from test_qmp_differential import SETUP as DAEMON_SETUP
from test_qmp_differential import (SKIP, STRINGS, Generator, Side, generated_differences,
                                   deliberately_unlike, replay)
from test_system import QEMU, SYSTEM, Machine

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 (the oracle) is missing; scripts/setup.sh installs it")

# What a machine has that a storage daemon has not: its drives, devices and buses by name.
MACHINE_STRINGS = STRINGS + ["drive0", "drive1", "vblk0", "cd0", "ide0-cd0", "ide.0", "ide.1",
                             "pci.0", "/machine/peripheral/vblk0", "virtio-blk-pci",
                             "ide-hd", "ide-cd", "scsi-hd", "floppy", "0x5", "info status"]

# Commands that end the machine (or leave it for good) are left out.
MACHINE_SKIP = SKIP | {"x-exit-preconfig"}

# What QEMU's machine has and ferrite's does not model (it has no guest to give them to):
# user objects for guest memory, entropy, crypto and network filters; chardevs for a
# display or an agent; and the machine's object tree below /machine (buses, the board's
# devices, device classes). A command that meets one of these is left out of the
# comparison, by the text ferrite refuses it with.
NOT_MODELLED = [
    r"invalid object type: (memory-backend-|rng-|cryptodev-|filter-|colo-compare|"
    r"input-|can-|vfio-|iommufd|acpi-|sev-|tdx-|igvm-|dbus-|x-remote-|remote-|"
    r"pr-manager-helper$|authz-|tls-cipher-suites|qtest$)",
    r"Failed to add chardev '.*': '(vc|qemu-vdagent|spicevmc|spiceport|dbus|msmouse|"
    r"wctablet|braille|testdev)' is not a valid char driver name",
]
# The machine's object tree: paths that name a bus or a board device, and device classes.
TREE_COMMANDS = {"qom-list", "qom-get", "qom-set", "qom-list-properties"}


def not_modelled(name, a, b):
    desc = b.get("error", {}).get("desc", "")
    if any(re.match(p, desc) for p in NOT_MODELLED) or deliberately_unlike(name, a, b):
        return True
    return name in TREE_COMMANDS and re.match(r"(Device|Class) '.*' not found", desc)


ARGS = [
    "-drive", "if=none,id=drive0,file=img.qcow2,format=qcow2",
    "-device", "virtio-blk-pci,id=vblk0,drive=drive0",
    "-drive", "if=none,id=drive1,file=tgt.raw,format=raw",
    "-drive", "if=ide,index=2,media=cdrom,id=cd0",
]

# The storage daemon test's starting state, its qcow2 node over base.qcow2 (drive0 holds
# img.qcow2).
SETUP = [(name, dict(args, filename="base.qcow2") if args.get("node-name") == "file0" else args)
         for name, args in DAEMON_SETUP]


class MachineSide(Side):
    """One machine in the shared starting state."""

    def __init__(self, start):
        self.d, self.c = start()
        for name, args in SETUP:
            assert "return" in self.c.cmd(name, args), (name, args)


def starter(binary, accel, root):
    """Starts machines of `binary`, each in a directory of its own under `root`."""
    machines = []

    def start():
        workdir = root / f"{os.path.basename(binary)}{len(machines)}"
        workdir.mkdir()
        for name, fmt in (("img.qcow2", "qcow2"), ("tgt.raw", "raw"), ("base.qcow2", "qcow2")):
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(workdir / name), "1M"],
                           check=True)
        m = Machine(binary, accel, workdir, ARGS)
        machines.append(m)
        return types.SimpleNamespace(workdir=workdir, stop=m.stop), m.qmp
    return start, machines


@pytest.fixture
def machines(tmp_path):
    theirs, qemus = starter(QEMU, "tcg", tmp_path)
    ours, ferrites = starter(SYSTEM, "qtest", tmp_path)
    try:
        yield theirs, ours
    finally:
        for m in qemus + ferrites:
            m.stop()


_first, _, _last = os.environ.get("FERRITE_SYSTEM_SEEDS", "1-4").partition("-")
SEEDS = range(int(_first), int(_last or _first) + 1)
CASES = int(os.environ.get("FERRITE_SYSTEM_CASES", "400"))


@pytest.mark.parametrize("seed", SEEDS)
def test_generated_commands_get_qemu_systems_answers(machines, seed):
    start_theirs, start_ours = machines
    differences = generated_differences(
        lambda: MachineSide(start_theirs), lambda: MachineSide(start_ours),
        lambda ours: Generator(ours.c.cmd("query-qmp-schema")["return"], seed,
                               MACHINE_STRINGS, MACHINE_SKIP),
        CASES, not_modelled)
    assert not differences, "\n".join(differences)


# FERRITE_SYSTEM_REPLAY=SEED:STEP, as FERRITE_QMP_REPLAY for the storage daemon.
@pytest.mark.skipif("FERRITE_SYSTEM_REPLAY" not in os.environ,
                    reason="a debugging aid: set FERRITE_SYSTEM_REPLAY=SEED:STEP")
def test_replay_a_generated_case(machines):
    start_theirs, start_ours = machines
    replay(lambda: MachineSide(start_theirs), lambda: MachineSide(start_ours),
           lambda ours, seed: Generator(ours.c.cmd("query-qmp-schema")["return"], seed,
                                        MACHINE_STRINGS, MACHINE_SKIP),
           os.environ["FERRITE_SYSTEM_REPLAY"])


# Commands longer searches found answered differently, in the order they run (some make
# the state later ones need). Where QEMU accepts one, ferrite must; where it refuses, the
# same error must come back.
FOUND = [
    # The channel is read before anything else; `channels` is not taken.
    ("migrate", {}),
    ("migrate", {"uri": "file", "resume": True}),
    ("migrate", {"uri": "file:x", "resume": True}),
    ("migrate-incoming", {}),
    # Capabilities are checked together, in QEMU's order.
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True},
        {"capability": "return-path", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "zero-copy-send", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "dirty-limit", "state": True},
        {"capability": "auto-converge", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "dirty-limit", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "switchover-ack", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "postcopy-preempt", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "postcopy-ram", "state": True},
        {"capability": "multifd", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-colo", "state": True}]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": "background-snapshot", "state": True}]}),
    ("migrate-set-parameters", {"max-bandwidth": (1 << 63) - 1}),
    # device_add checks nothing before its handler: then the driver, the bus, whether the
    # bus takes hot-plugged devices, the id, the properties.
    ("device_add", {"driver": 1}),
    ("device_add", {"driver": "nosuch", "id": [1]}),
    ("device_add", {"driver": "virtio-blk-pci", "bus": "ide.0", "nope": 1}),
    ("device_add", {"driver": "ide-hd"}),
    ("device_add", {"driver": "ide-cd", "bus": "ide.0"}),
    ("device_add", {"driver": "floppy", "nope": 1}),
    ("device_add", {"driver": "scsi-hd", "bus": "vblk0"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "type"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "vblk0", "nope": 1}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "#any", "bus": 1, "drive": "drive1"}),
    # A bus by path: from the system bus, through its devices.
    ("device_add", {"driver": "virtio-blk-pci", "bus": "/objects/sec0"}),
    ("device_add", {"driver": "virtio-blk-pci", "bus": "/"}),
    ("device_add", {"driver": "virtio-blk-pci", "bus": "/i440FX-pcihost/pci.0/x"}),
    ("device_add", {"driver": "virtio-blk-pci", "bus": "/i440FX-pcihost/pci.1"}),
    # Devices by QOM path, and paths that are no device; an unplug asked for before the
    # virtual clock moved cannot be asked for again.
    ("device_del", {"id": "/machine/peripheral/vblk0"}),
    ("device_del", {"id": "vblk0"}),
    ("device_del", {"id": "/objects"}),
    ("device_del", {"id": ""}),
    ("eject", {"id": "/objects/sec0"}),
    ("blockdev-remove-medium", {"id": "/machine/peripheral"}),
    # A drive without a medium, named where a node would do.
    ("change-backing-file", {"device": "cd0", "image-node-name": "x", "backing-file": "y"}),
    ("nbd-server-add", {"device": "cd0"}),
    # A node name only.
    ("block-set-write-threshold", {"node-name": "drive0", "write-threshold": 1}),
    ("human-monitor-command", {"command-line": "x", "cpu-index": 1}),
    ("human-monitor-command", {"command-line": "x", "cpu-index": 1 << 62}),
    # Descriptor names the monitor does not keep.
    ("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "nosuch"}}}),
    ("chardev-add", {"id": "c9", "backend": {"type": "socket", "data": {
        "addr": {"type": "fd", "data": {"str": "nosuch"}}}}}),
    ("block-dirty-bitmap-add", {"node": "drive1", "name": "b", "persistent": True}),
    # blkreplay: a system emulator's filter.
    ("blockdev-add", {"driver": "blkreplay", "node-name": "r0", "image": "null0"}),
    ("blockdev-create", {"job-id": "j0", "options": {"driver": "blkreplay"}}),
    ("block_resize", {"node-name": "r0", "size": 1 << 21}),
    # A drive's node is named by its drive (system seeds 237-450).
    ("x-blockdev-change", {"parent": "drive1", "node": "null0"}),
    ("x-blockdev-change", {"parent": "drive1", "child": "file"}),
    # A drive without a device reads its image as one (QEMU's blk_new_open).
    ("blockdev-snapshot", {"node": "fmt0", "overlay": "drive1"}),
    # A file that cannot grow so far says so as QEMU's file driver does.
    ("block_resize", {"device": "drive1", "size": 1 << 62}),
    # A bus path walked as QEMU's qbus_find walks it: a bus, a device on it, its bus.
    ("device_add", {"driver": "virtio-blk-pci", "id": "v9", "bus": "fmt0/file0"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "v9", "bus": "pci.0/nosuch"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "v9", "bus": "pci.0/vblk0"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "v9", "bus": "pci.0/vblk0/x"}),
    ("device_add", {"driver": "virtio-blk-pci", "id": "v9", "bus": "pci.0/vblk0/virtio-bus"}),
    # A backup's min-cluster-size: too large before the filter's name, not a power of two
    # after it (system seed 563).
    ("drive-backup", {"device": "drive1", "sync": "full", "target": "x.raw", "format": "raw",
                      "filter-node-name": "",
                      "x-perf": {"min-cluster-size": -9223372036854775808}}),
    ("drive-backup", {"device": "drive1", "sync": "full", "target": "x.raw", "format": "raw",
                      "filter-node-name": "", "x-perf": {"min-cluster-size": 3}}),
    ("drive-backup", {"device": "drive1", "sync": "full", "target": "x.raw", "format": "raw",
                      "x-perf": {"min-cluster-size": 3}}),
    # A new overlay's name may not be a drive's either (system seed 2264).
    ("blockdev-snapshot-sync", {"node-name": "null0", "snapshot-file": "s.qcow2",
                                "snapshot-node-name": "drive0"}),
]


def test_commands_found_before_get_qemu_systems_answers(machines):
    start_theirs, start_ours = machines
    theirs, ours = MachineSide(start_theirs), MachineSide(start_ours)
    for name, args in FOUND:
        a, b = theirs.run(name, args), ours.run(name, args)
        if "return" in a:
            assert "return" in b, (name, args, a, b)
        else:
            assert ours.text(b) == theirs.text(a), (name, args, a)
