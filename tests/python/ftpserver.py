"""A small FTP server for the ftp/ftps driver tests: the files of a directory, read-only,
passive mode (EPSV and PASV), `REST` and `RETR`; with `tls`, implicit FTPS (TLS from the
first byte, as `ftps://` URLs mean) with the data connections protected too. Every command
is logged in `log`. With `user`, only that user and password are let in; without `epsv`,
only PASV gives a data port."""
import os
import socket
import socketserver
import ssl
import threading

from webserver import Serving


class FtpServer(Serving, socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root, tls=None, user=None, epsv=True):
        super().__init__(("127.0.0.1", 0), _Session)
        self.epsv = epsv
        self.root = str(root)
        self.log = []
        self.user = user
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(*tls)
        self.port = self.server_address[1]
        self.scheme = "ftps" if tls else "ftp"
        self.conns = []
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Session(socketserver.BaseRequestHandler):
    def handle(self):
        try:
            self.session()
        except OSError:
            pass  # the client hung up (a refused certificate, an aborted transfer)

    def session(self):
        srv = self.server
        sock = self.request
        srv.conns.append(sock)
        if srv.ctx:
            try:
                sock = srv.ctx.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError):
                return
        self.sock = sock
        self.f = sock.makefile("rb")
        self.cwd = "/"
        self.rest = 0
        self.passive = None
        self.user = None
        self.logged_in = srv.user is None
        self.reply("220 ferrite test FTP server")
        while True:
            line = self.f.readline()
            if not line:
                return
            line = line.decode("latin1").rstrip("\r\n")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            srv.log.append((verb, arg if verb != "PASS" else "***"))
            if not getattr(self, "do_" + verb, None):
                self.reply("502 Command not implemented.")
                continue
            if verb not in ("USER", "PASS", "QUIT") and not self.logged_in:
                self.reply("530 Please login with USER and PASS.")
                continue
            if getattr(self, "do_" + verb)(arg) == "quit":
                return

    def reply(self, text):
        self.sock.sendall((text + "\r\n").encode("latin1"))

    def path(self, arg):
        p = os.path.normpath(os.path.join(self.cwd, arg))
        return os.path.join(self.server.root, p.lstrip("/"))

    def do_USER(self, arg):
        self.user = arg
        self.reply("331 Password required.")

    def do_PASS(self, arg):
        want = self.server.user
        if want is None or f"{self.user}:{arg}" == want:
            self.logged_in = True
            self.reply("230 Logged in.")
        else:
            self.reply("530 Login incorrect.")

    def do_PWD(self, arg):
        self.reply(f'257 "{self.cwd}" is the current directory.')

    def do_CWD(self, arg):
        target = os.path.normpath(os.path.join(self.cwd, arg))
        if os.path.isdir(os.path.join(self.server.root, target.lstrip("/"))):
            self.cwd = target
            self.reply("250 Directory changed.")
        else:
            self.reply("550 No such directory.")

    def do_TYPE(self, arg):
        self.reply(f"200 Type set to {arg}.")

    def do_PBSZ(self, arg):
        self.reply("200 PBSZ=0")

    def do_PROT(self, arg):
        self.reply("200 Protection set.")

    def _listen(self):
        """A data port; its connection is taken (and secured) as soon as it comes, as
        libcurl finishes the data connection's TLS handshake before it sends RETR."""
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        done = threading.Event()
        self.passive = (done, [])

        def take():
            try:
                data, _ = listener.accept()
                if self.server.ctx:
                    data = self.server.ctx.wrap_socket(data, server_side=True)
                self.passive[1].append(data)
            except OSError:
                pass
            finally:
                listener.close()
                done.set()
        threading.Thread(target=take, daemon=True).start()
        return listener.getsockname()[1]

    def do_EPSV(self, arg):
        if not self.server.epsv:
            self.reply("500 EPSV not understood.")
            return
        port = self._listen()
        self.reply(f"229 Entering Extended Passive Mode (|||{port}|)")

    def do_PASV(self, arg):
        port = self._listen()
        self.reply(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255}).")

    def do_SIZE(self, arg):
        p = self.path(arg)
        if os.path.isfile(p):
            self.reply(f"213 {os.path.getsize(p)}")
        else:
            self.reply("550 No such file.")

    def do_REST(self, arg):
        self.rest = int(arg)
        self.reply(f"350 Restarting at {self.rest}.")

    def do_RETR(self, arg):
        p = self.path(arg)
        if not os.path.isfile(p) or not self.passive:
            self.reply("550 No such file.")
            return
        self.reply("150 Opening BINARY mode data connection.")
        done, taken = self.passive
        done.wait(10)
        if not taken:
            self.reply("425 No data connection.")
            return
        data = taken[0]
        with open(p, "rb") as f:
            f.seek(self.rest)
            try:
                while True:
                    b = f.read(65536)
                    if not b:
                        break
                    data.sendall(b)
                self.reply("226 Transfer complete.")
            except OSError:
                self.reply("426 Connection closed; transfer aborted.")
        data.close()
        self.passive = None
        self.rest = 0

    def do_ABOR(self, arg):
        self.reply("226 Abort successful.")

    def do_QUIT(self, arg):
        self.reply("221 Goodbye.")
        return "quit"
