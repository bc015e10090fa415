"""Helpers shared by the benchmarks: start a daemon and read its memory use."""
import os
import subprocess
import time


def start(args, wait_for):
    """Starts a daemon with `args` and waits until the socket `wait_for` exists."""
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(500):
        if os.path.exists(wait_for):
            break
        time.sleep(0.01)
    return p


def rss_kib(pid):
    """Resident memory of process `pid`, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
