"""Jobs held back by limits, against qemu-storage-daemon: a slow stream waits after its
first chunk (the chunk just moved counts against the speed), and `quit` ends a mirror that
reads through a throttled node at once (the daemon drains before it cancels jobs)."""
import subprocess
import time

from conftest import normalize


def test_slow_stream_stops_after_its_first_chunk(both):
    def scenario(d):
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "base.img"), "1M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", str(w / "base.img")],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(w / "base.img"),
                        "-F", "qcow2", str(w / "top.img")], check=True)
        c = d.connect()
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "drv0",
                               "file": {"driver": "file", "filename": str(w / "top.img")}})
        r = [c.cmd("block-stream", {"device": "drv0", "job-id": "job0", "speed": 1})]
        time.sleep(0.3)
        r.append(c.cmd("blockdev-del", {"node-name": "drv0"}))
        r.append(c.cmd("block-job-cancel", {"device": "job0"}))
        ev = c.wait_event("BLOCK_JOB_CANCELLED")
        r.append({k: v for k, v in ev.items() if k != "timestamp"})
        c.close()
        return [normalize(str(x)) for x in r]

    q, f = both()
    expected = scenario(q)
    assert "'offset': 524288" in expected[-1]
    assert scenario(f) == expected


def test_quit_ends_a_mirror_reading_through_a_throttled_node(both):
    def scenario(d):
        w = d.workdir
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(w / "src.img"), "64M"],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 42 0 64M",
                        str(w / "src.img")], check=True, capture_output=True)
        c = d.connect()
        c.cmd("object-add", {"qom-type": "throttle-group", "id": "tg",
                             "limits": {"bps-read": 4096}})
        c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "source",
                               "file": {"driver": "file", "filename": str(w / "src.img")}})
        c.cmd("blockdev-add", {"driver": "throttle", "node-name": "throttled-source",
                               "throttle-group": "tg", "file": "source"})
        c.cmd("blockdev-add", {"driver": "null-co", "node-name": "target",
                               "size": 64 << 20})
        c.cmd("blockdev-mirror", {"job-id": "mirror", "device": "throttled-source",
                                  "target": "target", "sync": "full"})
        started = time.monotonic()
        r = c.cmd("quit")
        d.proc.wait(10)
        return r, d.proc.returncode, time.monotonic() - started < 5

    q, f = both()
    expected = scenario(q)
    assert expected == ({"return": {}}, 0, True)
    assert scenario(f) == expected
