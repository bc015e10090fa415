"""A small web server for the http/https driver tests: files of a directory served with byte
ranges, and the corners the drivers must handle, each under its own path prefix:

- `/norange/NAME`: no `Accept-Ranges`, ranges ignored (the whole file, 200);
- `/redir/NAME`: a 302 to `/NAME`; `/loop/NAME`: a 302 to itself; `/away/PORT/NAME`: a
  302 to `/NAME` on the server of port PORT;
- `/auth/NAME`: Basic authentication as `user`/`pass` (else 401);
- `/cookie/NAME`: only with the cookie `k=v` (else 403);
- `/chunked/NAME`: ranged replies in chunked framing;
- `/short/NAME`: ranged replies that end early (the connection closes);
- `/http10/NAME`: HTTP/1.0 replies;
- `/drop/NAME`: the connection closed after each reply, which says nothing of it (a
  server dropping idle kept-alive connections).

Every request is logged (method, path, range, authorization, cookie, referer) in `log`.
With `tls`, the server speaks HTTPS with the given certificate and key.
"""
import base64
import http.server
import os
import re
import socket
import socketserver
import ssl
import sys
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        self.server.conns.append(self.request)
        if isinstance(self.request, ssl.SSLSocket):
            # The handshake is made here, in the connection's own thread and bounded, not in
            # accept: a client that connects and never says hello must not stop the server
            # from accepting, nor from shutting down.
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except OSError:
                self.request.close()
                raise
            self.request.settimeout(None)
        super().setup()

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _empty(self, code, extra=()):
        self.send_response(code)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _serve(self, body):
        srv = self.server
        h = self.headers
        srv.log.append((self.command, self.path, h.get("Range"), h.get("Authorization"),
                        h.get("Cookie"), h.get("Referer")))
        parts = self.path.split("?")[0].strip("/").split("/")
        prefix, name = (parts[0], parts[-1]) if len(parts) > 1 else ("", parts[0])
        if prefix == "http10":
            self.protocol_version = "HTTP/1.0"
        if prefix == "redir":
            return self._empty(302, [("Location", "/" + name)])
        if prefix == "loop":
            return self._empty(302, [("Location", self.path)])
        if prefix == "away":
            return self._empty(302, [("Location", f"http://127.0.0.1:{parts[1]}/{name}")])
        if prefix == "auth" and h.get("Authorization") != "Basic " + base64.b64encode(
                b"user:pass").decode():
            return self._empty(401, [("WWW-Authenticate", 'Basic realm="t"')])
        if prefix == "cookie" and h.get("Cookie") != "k=v":
            return self._empty(403)
        path = os.path.join(srv.root, name)
        if not name or not os.path.isfile(path):
            return self._empty(404)
        with open(path, "rb") as f:
            data = f.read()
        rng = h.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m and prefix != "norange":
            start = int(m.group(1))
            last = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            chunk = data[start:last + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{last}/{len(data)}")
        else:
            chunk = data
            self.send_response(200)
        if prefix != "norange":
            self.send_header("Accept-Ranges", "bytes")
        if prefix == "chunked" and body:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(chunk), 100000):
                piece = chunk[i:i + 100000]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if not body:
            if prefix == "drop":
                self.close_connection = True
            return
        if prefix == "short":
            self.wfile.write(chunk[:len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)
        if prefix == "drop":
            self.close_connection = True


class Serving:
    """What the test servers share: their URLs, and a stop that also cuts the connections
    they keep (`conns`), as a server that goes away does."""

    def url(self, path):
        return f"{self.scheme}://127.0.0.1:{self.port}/{path}"

    def stop(self):
        """Stops listening and cuts the connections kept open."""
        self.shutdown()
        self.server_close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class WebServer(Serving, socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], OSError):  # a client that hung up or failed TLS
            super().handle_error(request, client_address)

    def __init__(self, root, tls=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = str(root)
        self.log = []
        self.conns = []
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.socket = ctx.wrap_socket(self.socket, server_side=True,
                                          do_handshake_on_connect=False)
        self.port = self.server_address[1]
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()


class Proxy(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """An HTTP proxy: `http` requests forwarded one per connection, `https` through `CONNECT`
    tunnels. With `auth` ("user:pass"), requests without those credentials get a 407. Every
    request is logged (method, target, Proxy-Authorization)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, auth=None):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.auth = auth and "Basic " + base64.b64encode(auth.encode()).decode()
        self.log = []
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self):
        self.shutdown()
        self.server_close()


class _ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = []
        while True:
            line = self.rfile.readline()
            if line in (b"", b"\r\n", b"\n"):
                break
            head.append(line.decode("latin1").rstrip("\r\n"))
        if not head:
            return
        method, target, _ = head[0].split(" ", 2)
        headers = dict(h.split(": ", 1) for h in head[1:] if ": " in h)
        auth = headers.get("Proxy-Authorization")
        self.server.log.append((method, target, auth))
        if self.server.auth and auth != self.server.auth:
            self.wfile.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"p\"\r\n"
                             b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method == "CONNECT":
            host, port = target.rsplit(":", 1)
            up = socket.create_connection((host.strip("[]"), int(port)))
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
        else:
            rest = target.split("://", 1)[1]
            hostport, _, path = rest.partition("/")
            host, _, port = hostport.rpartition(":")
            up = socket.create_connection((host.strip("[]"), int(port or 80)))
            kept = [h for h in head[1:] if not h.lower().startswith(("proxy-", "connection"))]
            up.sendall((f"{method} /{path} HTTP/1.1\r\n" + "\r\n".join(kept)
                        + "\r\nConnection: close\r\n\r\n").encode("latin1"))
        # Clients send nothing after the head before the reply (no bodies, TLS after 200).
        _pipe(self.connection, up)


def _pipe(client, up):
    """Copies both ways until either side ends."""
    t = threading.Thread(target=_copy, args=(client, up), daemon=True)
    t.start()
    _copy(up, client)
    up.close()


def _copy(src, dst):
    """Copies `src` to `dst` until `src` ends, then ends `dst`'s writing side."""
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
