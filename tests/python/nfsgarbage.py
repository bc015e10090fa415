"""An NFS server that lies, for the nfs driver's robustness test: a portmapper on port 111
and MOUNT and NFS programs on one other port, answering with a mix, drawn from a seed, of
sane replies with odd values (transfer sizes, file sizes, handles, counts, symbolic
links), wrong statuses, random bytes, replies to calls never made, records cut short or
announced too long, dropped connections, and silence (a connection quiet for a second is
closed, so nothing waits for ever).

Run as `nfsgarbage.py SEED`, alone in a network namespace (port 111 is the well-known
portmapper port clients ask)."""
import os
import random
import socket
import struct
import sys
import threading
import traceback

PORTMAP, MOUNT, NFS = 100000, 100005, 100003
ODD_SIZES = [0, 1, 511, 512, 4096, 8 << 20, (8 << 20) + 1000, 1 << 40, 2 ** 63 - 1,
             2 ** 64 - 1]
ODD_XFER = [0, 1, 4096, 8192, 65536, 1 << 20, 1 << 31, 2 ** 32 - 1]


def u32(v):
    return struct.pack(">I", v & 0xffffffff)


def u64(v):
    return struct.pack(">Q", v & 0xffffffffffffffff)


def opaque(b):
    return u32(len(b)) + b + b"\0" * (-len(b) % 4)


class Liar:
    def __init__(self, seed, port):
        self.rng = random.Random(seed)
        self.sane = self.rng.choice([0.9, 0.95, 0.98])
        # How often the call at hand gets a sane answer: mounting and opening take eight
        # calls, and more of them should get through to the node's reads and writes.
        self.honest = self.sane
        self.port = port
        self.lock = threading.Lock()

    def pick(self, seq):
        with self.lock:
            return self.rng.choice(seq)

    def chance(self, p):
        with self.lock:
            return self.rng.random() < p

    def num(self, a, b):
        with self.lock:
            return self.rng.randint(a, b)

    def noise(self, n):
        with self.lock:
            return bytes(self.rng.getrandbits(8) for _ in range(n))

    def fattr(self):
        kind = 1 if self.chance(0.8) else self.pick([2, 5, 0, 99])
        size = (8 << 20) if self.chance(self.honest) else self.pick(ODD_SIZES)
        return (u32(kind) + u32(0o644) + u32(1) + u32(0) + u32(0) + u64(size)
                + u64(self.pick(ODD_SIZES)) + b"\0" * 48)

    def post_op(self):
        return u32(1) + self.fattr() if self.chance(0.5) else u32(0)

    def fh(self):
        return opaque(self.noise(self.pick([8, 16, 32, 64])))

    def status(self):
        return 0 if self.chance(self.honest) else self.pick([1, 2, 5, 13, 28, 70, 10008, 77])

    def results(self, prog, proc, args):
        if prog == PORTMAP:
            if proc == 3:
                return u32(self.port if self.chance(self.honest) else self.pick([0, 1, 65535]))
            return b""
        if prog == MOUNT:
            if proc == 1:
                st = self.status()
                return u32(st) + (self.fh() + u32(1) + u32(1) if st == 0 else b"")
            return b""
        st = self.status()
        head = u32(st)
        if proc == 19:  # FSINFO
            sizes = [self.pick(ODD_XFER) if not self.chance(self.honest) else 65536
                     for _ in range(7)]
            return (head + self.post_op() + b"".join(u32(s) for s in sizes)
                    + u64(self.pick(ODD_SIZES)) + u32(0) + u32(1) + u32(0x1b))
        if proc == 3:  # LOOKUP
            return head + (self.fh() + self.post_op() if st == 0 else b"") + self.post_op()
        if proc == 5:  # READLINK
            target = self.pick(["/", "..", "../../x", "a/b", "x" * 3000, "/e/f.raw"])
            return head + self.post_op() + (opaque(target.encode()) if st == 0 else b"")
        if proc == 4:  # ACCESS
            asked = struct.unpack(">I", args[-4:])[0] if len(args) >= 4 else 0
            grant = asked if self.chance(self.honest) else self.num(0, 63)
            return head + self.post_op() + (u32(grant) if st == 0 else b"")
        if proc == 1:  # GETATTR
            return head + (self.fattr() if st == 0 else b"")
        if proc == 6:  # READ
            asked = struct.unpack(">I", args[-4:])[0] if len(args) >= 4 else 0
            n = min(asked, 1 << 20) if self.chance(self.sane) else self.pick(
                [0, 1, asked // 2, asked + 8, 1 << 21])
            data = self.noise(min(n, 4096)) * (n // 4096 + 1)
            count = n if self.chance(self.sane) else self.num(0, 1 << 22)
            return head + self.post_op() + (u32(count) + u32(self.pick([0, 1, 2]))
                                            + opaque(data[:n]) if st == 0 else b"")
        if proc in (7, 21, 2, 8):  # WRITE, COMMIT, SETATTR, CREATE
            wcc = u32(0) + self.post_op()
            if proc == 7 and st == 0:
                asked = struct.unpack(">I", args[-4:])[0] if len(args) >= 4 else 0
                count = asked if self.chance(self.sane) else self.pick([0, 1, asked // 2,
                                                                        asked * 2])
                return head + wcc + u32(count) + u32(2) + b"\0" * 8
            if proc == 21 and st == 0:
                return head + wcc + b"\0" * 8
            if proc == 8 and st == 0:
                return head + u32(1) + self.fh() + self.post_op() + wcc
            return head + wcc
        return head

    def serve(self, c):
        c.settimeout(1)
        buf = b""
        while True:
            while len(buf) < 4:
                chunk = c.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
            n = struct.unpack(">I", buf[:4])[0] & 0x7fffffff
            while len(buf) < 4 + n:
                chunk = c.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
            call, buf = buf[4:4 + n], buf[4 + n:]
            xid, _, _, prog, _, proc = struct.unpack(">6I", call[:24])
            at = 24
            for _ in range(2):  # credential, verifier
                length = struct.unpack(">I", call[at + 4:at + 8])[0]
                at += 8 + length + (-length % 4)
            args = call[at:at + 64] if proc != 7 else call[at:at + 24]
            opening = prog != NFS or proc in (19, 3, 4, 5)
            self.honest = 0.97 if opening else self.sane
            if self.chance(self.honest):
                body = self.results(prog, proc, args)
                reply = u32(xid) + u32(1) + u32(0) + u32(0) + u32(0) + u32(0) + body
                c.sendall(u32(0x80000000 | len(reply)) + reply)
                continue
            what = self.pick(["noise", "xid", "denied", "accept", "short", "long", "drop",
                              "silent", "fragments"])
            if what == "noise":
                junk = self.noise(self.num(0, 200))
                c.sendall(u32(0x80000000 | len(junk)) + junk)
            elif what == "xid":
                reply = u32(xid + 1) + u32(1) + u32(0) + u32(0) + u32(0) + u32(0)
                c.sendall(u32(0x80000000 | len(reply)) + reply)
            elif what == "denied":
                reply = u32(xid) + u32(1) + u32(1) + u32(self.num(0, 3)) + u32(1) + u32(5)
                c.sendall(u32(0x80000000 | len(reply)) + reply)
            elif what == "accept":
                reply = (u32(xid) + u32(1) + u32(0) + u32(0) + u32(0) + u32(self.num(1, 9))
                         + u32(2) + u32(3))
                c.sendall(u32(0x80000000 | len(reply)) + reply)
            elif what == "short":
                body = self.results(prog, proc, args)
                reply = u32(xid) + u32(1) + u32(0) + u32(0) + u32(0) + u32(0) + body
                c.sendall(u32(0x80000000 | len(reply)) + reply[:len(reply) // 2])
                return
            elif what == "long":
                c.sendall(u32(0xffffffff) + self.noise(64))
                return
            elif what == "fragments":
                body = self.results(prog, proc, args)
                reply = u32(xid) + u32(1) + u32(0) + u32(0) + u32(0) + u32(0) + body
                half = len(reply) // 2
                c.sendall(u32(half) + reply[:half] + u32(0x80000000 | (len(reply) - half))
                          + reply[half:])
            elif what == "drop":
                return
            # silent: nothing; the connection closes after a quiet second.


def main():
    seed = int(sys.argv[1])
    nfs = socket.socket()
    nfs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    nfs.bind(("127.0.0.1", 0))
    liar = Liar(seed, nfs.getsockname()[1])
    pm = socket.socket()
    pm.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    pm.bind(("127.0.0.1", 111))

    def accept(s):
        s.listen(16)
        while True:
            c, _ = s.accept()

            def one(c=c):
                try:
                    liar.serve(c)
                except (OSError, struct.error, IndexError):
                    if os.environ.get("NFSGARBAGE_DEBUG"):
                        traceback.print_exc()
                finally:
                    c.close()
            threading.Thread(target=one, daemon=True).start()

    threading.Thread(target=accept, args=(pm,), daemon=True).start()
    accept(nfs)


if __name__ == "__main__":
    main()
