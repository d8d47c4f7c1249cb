"""Real servers with clients connected while they are dumped, restored on
the same host (--tcp-established): redis-server with a SUBSCRIBEd client,
a client in the middle of a pipeline and an idle one; Python's http.server
with a keep-alive client. Each client keeps its connection: no error, no
reset, no byte lost or repeated, and the server's data intact."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.restorer import restore
from tcp_helpers import our_tables
from test_dump_restore import Channel, reaper  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="TCP_REPAIR needs CAP_NET_ADMIN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Resp:
    """A minimal RESP client over one connection."""

    def __init__(self, port: int):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buf = b""

    def send(self, *cmds: tuple) -> None:
        out = b""
        for cmd in cmds:
            out += f"*{len(cmd)}\r\n".encode()
            for a in cmd:
                a = a if isinstance(a, bytes) else str(a).encode()
                out += f"${len(a)}\r\n".encode() + a + b"\r\n"
        self.s.sendall(out)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise EOFError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"-"):
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.s.recv(1 << 16)
                if not chunk:
                    raise EOFError("redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise AssertionError(f"unexpected reply {line!r}")

    def call(self, *cmd):
        self.send(cmd)
        return self.reply()


@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="redis-server is not installed (tools/setup installs it)")
def test_redis_with_a_subscriber_and_a_pipeline(tmp_path, reaper):
    port = _free_port()
    log = open(tmp_path / "redis.log", "w")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
                          "--daemonize", "no"],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    reaper.append(p.pid)
    deadline = time.monotonic() + 10
    while True:
        try:
            idle = Resp(port)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
    assert idle.call("PING") == "PONG"
    for i in range(500):
        idle.send(("SET", f"key:{i}", f"value {i}"))
    assert all(idle.reply() == "OK" for _ in range(500))
    sub = Resp(port)
    assert sub.call("SUBSCRIBE", "news") == [b"subscribe", b"news", 1]
    piped = Resp(port)
    n = 20_000
    sender = threading.Thread(target=piped.send, args=[("INCR", "counter")] * n)
    sender.start()
    time.sleep(0.05)   # mid-pipeline: part sent, part answered, part still on the way
    with Checkpointer(p.pid, tmp_path / "img", tcp="established") as ck:
        ck.dump()
    p.wait(10)
    r = restore(tmp_path / "img")
    reaper.append(r.pid)
    assert our_tables() == []
    sender.join(60)
    assert [piped.reply() for _ in range(n)] == list(range(1, n + 1))
    assert idle.call("GET", "key:123") == b"value 123"
    assert idle.call("DBSIZE") == 501
    assert idle.call("GET", "counter") == str(n).encode()
    pub = Resp(port)
    assert pub.call("PUBLISH", "news", "restored") == 1
    assert sub.reply() == [b"message", b"news", b"restored"]
    for c in (idle, sub, piped, pub):
        c.s.close()
    log.close()


HTTP_SERVER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
served = 0
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"      # keep-alive
    def do_GET(self):
        global served
        served += 1
        body = f"{self.path} {served} {self.client_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
print("READY", srv.server_address[1], flush=True)
srv.serve_forever()
"""


def test_http_server_with_a_keep_alive_client(tmp_path, reaper):
    """Python's http.server (HTTP/1.1, a thread per connection): a client
    keeps one connection across the dump and the restore (it never
    reconnects: auto_open is off) and the server's counter goes on."""
    ch = Channel()
    p = ch.popen([sys.executable, "-c", HTTP_SERVER])
    reaper.append(p.pid)
    port = int(ch.expect("READY").split()[1])
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.connect()
    c.auto_open = 0          # a reconnect would raise instead of hiding
    me = c.sock.getsockname()[1]
    for i in range(1, 4):
        c.request("GET", f"/before/{i}")
        assert c.getresponse().read().decode() == f"/before/{i} {i} {me}"
    stdio = ch.inherit(p.pid)
    with Checkpointer(p.pid, tmp_path / "img", tcp="established") as ck:
        ck.dump()
    p.wait(10)
    r = restore(tmp_path / "img", inherit=stdio, inherit_stdio=False)
    reaper.append(r.pid)
    for i in range(4, 7):
        c.request("GET", f"/after/{i}")
        assert c.getresponse().read().decode() == f"/after/{i} {i} {me}"
    c.close()
    ch.close()
