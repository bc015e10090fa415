"""A small NBD client for protocol edge cases (fixed newstyle, structured replies, extended
headers)."""
import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 9, 10, 11
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


class Nbd:
    def __init__(self, path):
        from conftest import connect_unix
        self.s = connect_unix(path)
        self.s.settimeout(10)
        magic, opt, self.hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT
        self.s.sendall(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        self.cookie = 0
        self.ext = False
        # Offsets of the chunks of the last extended reply.
        self.offsets = []

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.s.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def option(self, opt, data=b""):
        self.s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def replies(self, opt):
        """Option replies until a final one: [(type, data)]."""
        out = []
        while True:
            magic, o, ty, ln = struct.unpack(">QIII", self.recv(20))
            assert magic == REPLY_MAGIC and o == opt
            data = self.recv(ln)
            out.append((ty, data))
            if ty != 3 and ty != 2 and ty != 4:  # INFO, SERVER, META_CONTEXT are not final
                return out

    def structured(self):
        self.option(OPT_STRUCTURED_REPLY)
        return self.replies(OPT_STRUCTURED_REPLY)

    def extended(self):
        """Asks for extended headers; requests use them once the server acks."""
        self.option(OPT_EXTENDED_HEADERS)
        r = self.replies(OPT_EXTENDED_HEADERS)
        if r[-1][0] == 1:
            self.ext = True
        return r

    def go(self, name, opt=OPT_GO, infos=()):
        n = name.encode()
        self.option(opt, struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos))
                    + b"".join(struct.pack(">H", i) for i in infos))
        r = self.replies(opt)
        for ty, data in r:
            if ty == 3 and struct.unpack(">H", data[:2])[0] == 0:
                self.size, self.tflags = struct.unpack(">QH", data[2:12])
        return r

    def meta(self, opt, name, queries):
        n = name.encode()
        data = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        self.option(opt, data)
        return self.replies(opt)

    def request(self, ty, offset=0, length=0, flags=0, payload=b""):
        self.cookie += 1
        if self.ext:
            head = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, ty, self.cookie, offset,
                               length)
        else:
            head = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, ty, self.cookie, offset, length)
        self.s.sendall(head + payload)
        return self.cookie

    def simple_reply(self, read_len=0):
        magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
        assert magic == SIMPLE_MAGIC
        return err, self.recv(read_len) if err == 0 else b""

    def chunks(self):
        """A reply in structured mode: chunks until DONE as [(type, payload)], or
        [("simple", error)] when the server answers with a simple reply (allowed for
        everything but reads)."""
        out = []
        self.offsets = []
        while True:
            (magic,) = struct.unpack(">I", self.recv(4))
            if magic == SIMPLE_MAGIC:
                err, _cookie = struct.unpack(">IQ", self.recv(12))
                return [("simple", err)]
            if magic == EXTENDED_MAGIC:
                flags, ty, cookie, offset, ln = struct.unpack(">HHQQQ", self.recv(28))
                self.offsets.append(offset)
            else:
                assert magic == STRUCTURED_MAGIC
                flags, ty, cookie, ln = struct.unpack(">HHQI", self.recv(16))
            out.append((ty, self.recv(ln)))
            if flags & 1:
                return out

    def close(self):
        self.s.close()


def overlapping_rounds(sock, expect, length=200001, count=32, rounds=3):
    """Over one connection to the export `e` at `sock`: `count` writes of `length` bytes
    sent at once, none in whole sectors (each shares its first and last sector with its
    neighbours), then as many reads at once, `rounds` times; each read must find what the
    writes left, tracked in `expect` (the image's bytes, updated)."""
    c = Nbd(sock)
    c.go("e")
    for rnd in range(rounds):
        spans = [(rnd * 1000 + 3 + i * length, bytes([(i * 7 + rnd) & 0xff]) * length)
                 for i in range(count)]
        sent = [c.request(CMD_WRITE, off, length, payload=data) for off, data in spans]
        for _ in sent:
            magic, err, _cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err) == (SIMPLE_MAGIC, 0)
        for off, data in spans:
            expect[off:off + length] = data
        asked = {c.request(CMD_READ, off, length): off for off, _ in spans}
        for _ in asked:
            magic, err, cookie = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err) == (SIMPLE_MAGIC, 0)
            off = asked[cookie]
            assert c.recv(length) == bytes(expect[off:off + length]), off
    c.close()
