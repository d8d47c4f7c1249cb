"""The source side: connect to a page server and stream layers to it.

:class:`RemoteChain` is the layer store a :class:`~checkpoint.Checkpointer`
writes to instead of an images directory: each layer is announced (LAYER),
its bytes stream as DATA messages from the writer's I/O thread while the
next frames are compressed, and END carries the SHA-256 of every byte; the
page server answers ACK once the layer is checked and published (and
applied to the process it stages), or RUNNING for the final layer.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time

from ..errors import TransportError
from ..images import LayerWriter, ParentRef
from .wire import MAX_DATA, T, Conn, client_handshake, is_loopback

CHUNK = 1 << 20


def connect(to: str, *, key: bytes | None = None, tls: ssl.SSLContext | None = None,
            timeout: float = 60.0, facts: dict | None = None) -> tuple[Conn, dict]:
    """Connect to HOST:PORT, authenticate, exchange host facts; returns the
    connection and the destination's facts."""
    host, sep, port = to.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise TransportError(f"--to {to!r}: expected HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    if not (key or tls or is_loopback(host)):
        raise TransportError(f"migrating to {host} needs authentication: --auth-key FILE or "
                             "the TLS options (only loopback may go without)")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        raise TransportError(f"cannot connect to {to}: {exc.strerror or exc}") from None
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        conn = Conn(sock, client=True, timeout=timeout)
        from . import host_facts
        dest = client_handshake(conn, None if tls is not None else key,
                                facts if facts is not None else host_facts())
    except ssl.SSLError as exc:
        sock.close()
        raise TransportError(f"TLS with {to} failed: {exc.reason or exc}") from None
    except BaseException:
        sock.close()
        raise
    return conn, dest


class StreamLayerSink:
    """A LayerWriter sink that sends the layer's bytes as DATA messages."""

    path = None

    def __init__(self, chain: "RemoteChain"):
        self.chain = chain
        self.conn = chain.conn
        self.parts: list = []
        self.pending = 0
        self.total = 0
        # an authenticated stream carries its own integrity; a plain one
        # (loopback without a key) gets a digest of the layer at its END
        self.sha = None if self.conn.protected else hashlib.sha256()
        self.closed = False

    def write(self, buffers) -> None:
        for b in buffers:
            mv = memoryview(b).cast("B")
            if not len(mv):
                continue
            if self.sha is not None:
                self.sha.update(mv)
            self.total += len(mv)
            while len(mv) > MAX_DATA:     # never one message over the limit
                self._flush()
                self.parts.append(mv[:MAX_DATA])
                self.pending = MAX_DATA
                self._flush()
                mv = mv[MAX_DATA:]
            if self.pending + len(mv) > MAX_DATA:
                self._flush()
            self.parts.append(mv)
            self.pending += len(mv)
        if self.pending >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        self.chain.throttle(self.pending)
        self.conn.send_parts(T.DATA, self.parts)
        self.parts, self.pending = [], 0

    def commit(self) -> None:
        self._flush()
        end = {"bytes": self.total}
        if self.sha is not None:
            end["sha256"] = self.sha.hexdigest()
        self.conn.send(T.END, end)
        self.closed = True

    def abort(self) -> None:
        self.parts, self.closed = [], True


class RemoteChain:
    """Where a Checkpointer's layers go during a migration."""

    def __init__(self, conn: Conn, *, bandwidth: float | None = None):
        self.conn = conn
        self.index = 0
        self.parent: ParentRef | None = None
        self.bandwidth = bandwidth          # bytes/s cap, or None
        self._t = time.monotonic()
        self._sent = 0.0
        self.last_ack: dict = {}
        self.applied = -1            # the newest layer the destination has applied
        self.apply_ms: dict[int, float] = {}

    def throttle(self, nbytes: int) -> None:
        """Keep the average send rate under ``bandwidth`` (a token bucket)."""
        if not self.bandwidth:
            return
        now = time.monotonic()
        self._sent = max(0.0, self._sent - (now - self._t) * self.bandwidth) + nbytes
        self._t = now
        wait = self._sent / self.bandwidth - 0.005
        if wait > 0:
            time.sleep(wait)

    def _read(self, *want: T) -> tuple[T, dict]:
        """The next answer of one of ``want``; APPLIED answers on the way are
        noted (they come whenever the destination is done with a layer)."""
        while True:
            mtype, msg = self.conn.recv_json(*want, T.APPLIED)
            if mtype != T.APPLIED:
                return mtype, msg
            i = msg.get("index")
            if not isinstance(i, int) or i != self.applied + 1:
                raise TransportError(f"the page server applied layer {i} out of order")
            self.applied = i
            self.apply_ms[i] = float(msg.get("apply_ms", 0.0))
            if not want:
                return mtype, msg

    def wait_applied(self, index: int) -> None:
        """Until the destination has applied layer ``index`` (and all before)."""
        while self.applied < index:
            self._read()

    def open_writer(self, kind: str, tracker: str, level: int, threads: int) -> LayerWriter:
        # one layer in flight at most: while this one streams, the previous
        # is being applied; the one before that must be done
        self.wait_applied(self.index - 2)
        self.conn.send(T.LAYER, {"index": self.index, "kind": kind})
        sink = StreamLayerSink(self)
        return LayerWriter(sink, index=self.index, kind=kind, parent=self.parent,
                           tracker=tracker, level=level, threads=threads)

    def published(self, st, final: bool) -> None:
        """The layer's END was sent: wait until the page server has it (the
        final layer's answer, RUNNING, is awaited by the migration itself)."""
        self.parent = ParentRef(st.layer_id, st.header_digest, st.index)
        self.index += 1
        if not final:
            _, self.last_ack = self._read(T.ACK)
            if self.last_ack.get("index") != st.index:
                raise TransportError(f"the page server acknowledged layer "
                                     f"{self.last_ack.get('index')}, not {st.index}")

    def wait_final(self, restoring: bool) -> dict:
        """The destination's answer to the final layer: RUNNING (it runs the
        copy) or, when it only stores the chain, ACK."""
        _, msg = self._read(T.RUNNING if restoring else T.ACK)
        return msg
