"""A client that streams a known byte sequence through an echo server and
checks that every byte comes back once, in order (tests of TCP connections
dumped, restored and migrated under it); the echo server target; what
nftables holds."""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time

PATTERN = random.Random(1234).randbytes(65521)   # a prime length: a shift shows


def pattern(offset: int, n: int) -> bytes:
    out = bytearray()
    while n > 0:
        i = offset % len(PATTERN)
        part = PATTERN[i:i + n]
        out += part
        offset += len(part)
        n -= len(part)
    return bytes(out)


class Streamer:
    """Streams ``pattern`` through ``sock`` (paced: ``chunk`` bytes every
    ``pause`` s) and checks the echo. ``error`` is the first failure seen
    (a reset, a wrong byte, EOF before the end)."""

    def __init__(self, sock: socket.socket, chunk: int = 8192, pause: float = 0.002):
        self.sock = sock
        self.chunk, self.pause = chunk, pause
        self.sent = self.got = 0
        self.error: str | None = None
        self.max_stall = 0.0    # the longest wait for an echo while streaming (s)
        self._stop = threading.Event()
        self._tx = threading.Thread(target=self._send, daemon=True)
        self._rx = threading.Thread(target=self._recv, daemon=True)
        self._tx.start()
        self._rx.start()

    def _send(self) -> None:
        try:
            while not self._stop.is_set():
                self.sock.sendall(pattern(self.sent, self.chunk))
                self.sent += self.chunk
                time.sleep(self.pause)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"send at byte {self.sent}: {exc!r}"

    def _recv(self) -> None:
        last = time.monotonic()
        try:
            while True:
                data = self.sock.recv(1 << 20)
                now = time.monotonic()
                if not self._stop.is_set():
                    self.max_stall = max(self.max_stall, now - last)
                last = now
                if not data:
                    if not self._stop.is_set() or self.got != self.sent:
                        self.error = self.error or (f"EOF after {self.got} bytes of "
                                                    f"{self.sent} sent")
                    return
                if data != pattern(self.got, len(data)):
                    self.error = self.error or f"wrong bytes at offset {self.got}"
                    return
                self.got += len(data)
        except OSError as exc:
            self.error = self.error or f"recv at byte {self.got}: {exc!r}"

    def progress(self, more: int, timeout: float = 20.0) -> None:
        """Wait until ``more`` bytes beyond now came back."""
        want = self.got + more
        deadline = time.monotonic() + timeout
        while self.got < want and self.error is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the echo stalled at {self.got} bytes (sent "
                                     f"{self.sent})")
            time.sleep(0.01)
        assert self.error is None, self.error

    def finish(self, timeout: float = 20.0) -> int:
        """Stop sending, half-close, and wait for the whole echo and its EOF;
        returns the bytes that made the round trip."""
        self._stop.set()
        self._tx.join(timeout)
        self._rx.join(timeout)
        self.sock.close()
        assert not self._rx.is_alive(), f"no EOF after {self.got} of {self.sent} bytes"
        assert self.error is None, self.error
        assert self.got == self.sent
        return self.got


ECHO_SERVER = r"""
import socket, sys, time
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
host = sys.argv[2]
port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(4)
print("READY", srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    conn.sendall(data)
    n += len(data)
    time.sleep(0.002)   # the queues fill: the dump finds data in them
print("EOF", n, conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
"""


def our_tables(netns: str | None = None) -> list[str]:
    """The network-lock tables (checkpoint_*) nftables holds."""
    argv = ["nft", "list", "tables", "inet"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if "checkpoint_" in line]
