"""The destination side: ``checkpoint page-server``.

A :class:`PageServer` listens (loopback unless told otherwise), serves one
migration at a time (a second client meanwhile is refused with REFUSE
"busy") and receives its layers into a directory of its own under the
images directory, ``DIR/<pid>-<utc time>``:

- each layer is written to a hidden temporary file (0600), checked when its
  END arrives (every byte's SHA-256, the whole layer parsed and every block
  and frame checksum verified, its index and its parent link to the layer
  before), and only then published by rename (LocalSink): the directory is
  always a valid chain of whole layers;
- with ``restore`` the layers are also applied, as they arrive, to a
  stopped copy of the process (checkpoint/stager.py): the final layer only
  adds its own pages and the rest of the state, then the copy runs and the
  server answers RUNNING; it keeps it if the source confirms (DONE), or
  kills it if the migration breaks before;
- on any failure (bad input, a broken stream, a failed restore) the
  migration's directory and anything staged are removed and the server
  goes on with the next client (or exits with ``once``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from .. import faults
from ..errors import CheckpointError, ImageError, TransportError
from ..images import LocalSink
from ..images import format as F
from ..images.reader import Layer
from . import host_facts, mismatch
from .wire import PROTO_VERSION, T, Conn, is_loopback, server_handshake

log = logging.getLogger("checkpoint.page-server")
MAX_LAYERS = 100_000
WARM_MIN, WARM_MAX = 4 << 20, 32 << 20     # bytes of a layer file written ahead


def _warm_sink(images: str, index: int, last_size: int) -> LocalSink:
    """The temporary file of layer ``index``, made ahead and filled with zeros
    (twice the last layer's size, within [WARM_MIN, WARM_MAX]) that the
    layer then overwrites from its start (its end is cut at END). Pages the
    page cache has never held cost ~10 us each to get the first time on this
    kind of VM (2.8 ms a MiB written, measured, against 0.2 ms for pages it
    holds already): the final layer's bytes land in pages that exist, and
    the downtime does not pay for them."""
    sink = LocalSink(images, index)
    try:
        size = max(WARM_MIN, min(WARM_MAX, 2 * last_size))
        zero = bytes(1 << 20)
        for off in range(0, size, len(zero)):
            os.pwrite(sink.fd, zero, off)
    except BaseException:
        sink.abort()
        raise
    return sink


def _make_dir(path: str) -> None:
    try:
        from ..images.writer import make_images_dir
    except ImportError:   # pragma: no cover
        os.makedirs(path, mode=0o700, exist_ok=True)
        return
    make_images_dir(path)


@dataclass
class Migration:
    """What one served migration did (the ``--json`` of page-server)."""

    peer: str
    images: str = ""
    pid: int | None = None          # the source's PID
    layers: int = 0
    bytes_received: int = 0
    restored_pid: int | None = None
    restore_ms: float = 0.0
    ok: bool = False
    error: str = ""
    per_layer: list = field(default_factory=list)

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in ("peer", "images", "pid", "layers",
                                              "bytes_received", "restored_pid", "restore_ms",
                                              "ok", "error", "per_layer")}


class PageServer:
    def __init__(self, images_dir: str, *, address: str = "127.0.0.1", port: int = 0,
                 key: bytes | None = None, tls: ssl.SSLContext | None = None,
                 restore: bool = False, pid_ns: bool = False,
                 inherit: dict[str, int] | None = None, timeout: float = 60.0):
        self.dir = os.fspath(images_dir)
        self.address, self.port = address, port
        self.key, self.tls = key, tls
        self.restore, self.pid_ns = restore, pid_ns
        self.inherit = dict(inherit or {})
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._busy = threading.Event()
        self._stop = threading.Event()
        self.facts = host_facts()
        self.served: list[Migration] = []

    # -- listening --------------------------------------------------------------
    def bind(self) -> int:
        _make_dir(self.dir)
        fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((self.address, self.port))
        except OSError as exc:
            s.close()
            raise TransportError(f"cannot listen on {self.address}:{self.port}: "
                                 f"{exc.strerror}") from None
        s.listen(8)
        self.sock = s
        self.port = s.getsockname()[1]
        return self.port

    def close(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def serve(self, once: bool = False, on_done=None, stop=None) -> list[Migration]:
        """Serve migrations one after another (until ``close()``, ``stop()``
        returns true, or after one with ``once``). ``on_done(migration)`` is
        called after each."""
        if self.sock is None:
            self.bind()
        while not self._stop.is_set() and not (stop and stop()):
            try:
                self.sock.settimeout(0.5)
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            m = self.serve_one(client)
            self.served.append(m)
            if on_done is not None:
                on_done(m)
            if once:
                break
        return self.served

    def _refuse_while_busy(self) -> None:
        """While a migration runs, any other client gets REFUSE "busy"."""
        while self._busy.is_set() and self.sock is not None:
            try:
                self.sock.settimeout(0.2)
                other, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                Conn(other, client=False, timeout=2).send(
                    T.REFUSE, {"why": "busy: another migration is in progress"})
            except CheckpointError:
                pass
            other.close()

    # -- one migration ------------------------------------------------------------
    def serve_one(self, client: socket.socket) -> Migration:
        peer = "%s:%s" % client.getpeername()[:2]
        m = Migration(peer)
        self._busy.set()
        refuser = threading.Thread(target=self._refuse_while_busy, daemon=True,
                                   name="page-server-refuser")
        refuser.start()
        stager = None
        conn = None
        try:
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    raise TransportError(f"TLS with {peer} failed: "
                                         f"{getattr(exc, 'reason', None) or exc}") from None
            conn = Conn(client, client=False, timeout=self.timeout)
            need_auth = not is_loopback(client.getpeername()[0]) and self.tls is None
            hello = server_handshake(conn, None if self.tls is not None else self.key,
                                     need_auth and self.key is None)
            why = mismatch(hello, self.facts)
            if why:
                conn.send(T.REFUSE, {"why": why})
                raise TransportError(f"refused {peer}: {why}")
            pid = hello.get("pid")
            m.pid = pid if isinstance(pid, int) else None
            m.images = self._new_dir(m.pid)
            conn.send(T.WELCOME, {"proto": PROTO_VERSION, **self.facts, "images": m.images,
                                  "restore": self.restore})
            if self.restore:
                from ..stager import Stager
                stager = Stager(m.images, pid_ns=self.pid_ns, inherit=self.inherit)
            self._receive(conn, m, stager)
            m.ok = True
        except (CheckpointError, OSError) as exc:
            m.error = str(exc) if isinstance(exc, CheckpointError) else \
                f"{exc.strerror or exc}"
            log.info("migration from %s failed: %s", peer, m.error)
            if conn is not None:
                try:
                    conn.send(T.ERROR, {"error": m.error, "kind": type(exc).__name__})
                except CheckpointError:
                    pass
            if stager is not None and not m.ok:
                stager.abort()
            if m.images:
                shutil.rmtree(m.images, ignore_errors=True)
                m.images = ""
        finally:
            self._busy.clear()
            refuser.join()
            if stager is not None:
                stager.close()
            if conn is not None:
                conn.close()
            else:
                client.close()
        return m

    def _new_dir(self, pid) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = os.path.join(self.dir, f"{pid if pid else 'migration'}-{stamp}")
        path, n = base, 0
        while True:
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                n += 1
                path = f"{base}.{n}"

    def _receive(self, conn: Conn, m: Migration, stager) -> None:
        """Two threads: a receiver takes layers off the connection, checks
        each whole and answers ACK at once (the source goes on with its next
        round); this thread, the one that traces the staged copy, applies
        them in order, publishes them and answers APPLIED (RUNNING for the
        final layer). So a round's transfer overlaps the previous round's
        apply, and no fsync of a layer is in the source's way."""
        q: queue.Queue = queue.Queue()
        rx = threading.Thread(target=self._receiver, args=(conn, m, q), daemon=True,
                              name="page-server-rx")
        rx.start()
        try:
            self._apply_loop(conn, m, stager, q)
        finally:
            if rx.is_alive():
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            rx.join(5)
            while not q.empty():   # layers checked but never applied: drop them
                item = q.get_nowait()
                if item[0] == "layer":
                    item[1][1].abort()
                    item[1][2].close()

    def _next(self, q: queue.Queue, conn: Conn):
        try:
            return q.get(timeout=self.timeout + 5)
        except queue.Empty:
            raise TransportError(f"{conn.peer} sent nothing for {self.timeout:g} s") from None

    def _receiver(self, conn: Conn, m: Migration, q: queue.Queue) -> None:
        parent = None
        index = 0
        spare = None
        try:
            while True:
                mtype, msg = conn.recv_json(T.LAYER, T.BYE, T.PING)
                if mtype == T.PING:
                    conn.send(T.PONG, msg)
                    continue
                if mtype == T.BYE:
                    raise TransportError(f"{conn.peer} ended the migration before its final "
                                         "layer")
                if msg.get("index") != index or index >= MAX_LAYERS:
                    raise TransportError(f"{conn.peer} announced layer {msg.get('index')}, "
                                         f"expected {index}")
                t0 = time.perf_counter()
                sink, spare = spare, None
                sink, layer = self._receive_layer(conn, m.images, index, parent, sink)
                parent = (layer.layer_id, layer.header_digest)
                final = layer.kind == F.KIND_DUMP
                q.put(("layer", (index, sink, layer, t0)))
                if not final:
                    conn.send(T.ACK, {"index": index})
                    index += 1
                    # the next layer's file, its pages already in the page
                    # cache: while the source runs its round, not in the
                    # final round's downtime
                    if layer.size <= WARM_MAX:   # (a big layer is not the last)
                        spare = _warm_sink(m.images, index, layer.size)
                    continue
                break
            # after the final layer: the source's DONE (it killed its process)
            try:
                conn.recv_json(T.DONE)
                q.put(("done", None))
            except TransportError as exc:
                q.put(("no-done", exc))
        except BaseException as exc:   # handed to the applying thread
            q.put(("error", exc))
        finally:
            if spare is not None:
                spare.abort()

    def _apply_loop(self, conn: Conn, m: Migration, stager, q: queue.Queue) -> None:
        while True:
            kind, item = self._next(q, conn)
            if kind == "error":
                raise item
            if kind != "layer":
                raise TransportError(f"{conn.peer}: unexpected {kind}")
            index, sink, layer, t0 = item
            final = layer.kind == F.KIND_DUMP
            try:
                apply_ms = 0.0
                if stager is not None:
                    ta = time.perf_counter()
                    if final:
                        stager.finish(layer)
                        m.restored_pid = stager.pid
                    else:
                        stager.apply(layer)
                    apply_ms = (time.perf_counter() - ta) * 1e3
                if final:
                    # the copy runs (or, without --restore, the chain is whole):
                    # say so first, publish after (no fsync in the downtime)
                    if stager is not None:
                        conn.send(T.RUNNING, {"pid": stager.pid, "apply_ms": apply_ms})
                    else:
                        conn.send(T.ACK, {"index": index})
                sink.commit()
                faults.point("server.published")
            except BaseException:
                sink.abort()
                raise
            finally:
                layer.close()
            m.layers += 1
            m.bytes_received = conn.bytes_received
            m.per_layer.append({"index": index, "kind": layer.kind, "pages": layer.pages,
                                "bytes": layer.size, "ms": (time.perf_counter() - t0) * 1e3,
                                "apply_ms": apply_ms})
            log.info("layer %d (%s) applied and published: %d pages, %d bytes", index,
                     layer.kind, layer.pages, layer.size)
            if not final:
                conn.send(T.APPLIED, {"index": index, "apply_ms": apply_ms})
                continue
            if stager is not None:
                m.restore_ms = stager.restore_ms
                # the source kills its process once it has RUNNING; DONE says so.
                # A stream that breaks now leaves the copy running: the source
                # had RUNNING, or it keeps its own (docs/migrate.md).
                kind, item = self._next(q, conn)
                if kind != "done":
                    log.info("no DONE from %s (%s): keeping PID %s", conn.peer, item,
                             stager.pid)
                stager.release()
            else:
                self._next(q, conn)
            try:
                conn.send(T.BYE, {})
            except TransportError:
                pass
            return

    def _receive_layer(self, conn: Conn, images: str, index: int, parent, sink=None):
        """Receive one layer into a temporary file (``sink``, or a new one) and
        check it whole; returns (the sink, still to be committed, and the
        parsed layer)."""
        sink = sink if sink is not None else LocalSink(images, index)
        # a stream whose every message is authenticated needs no digest of
        # the layer (the END's byte count catches a short one); a plain one
        # must carry it
        sha = None if conn.protected else hashlib.sha256()
        try:
            while True:
                mtype, payload = conn.recv(T.DATA, T.END)
                if mtype == T.DATA:
                    faults.point("server.data")
                    if sha is not None:
                        sha.update(payload)
                    sink.write([payload])
                    continue
                from .wire import _json
                end = _json(payload, mtype)
                break
            digest_ok = sha is None or end.get("sha256") == sha.hexdigest()
            if not digest_ok or end.get("bytes") != sink._written:
                raise TransportError(f"layer {index} arrived damaged or short "
                                     f"({sink._written} bytes; digest differs)")
            os.ftruncate(sink.fd, sink._written)    # a warmed file: cut what it had beyond
            layer = Layer(sink.temp)
            try:
                layer.check_frame_crcs()
                inv = layer.inventory
                if inv.index != index:
                    raise ImageError(f"the layer says index {inv.index}, expected {index}")
                link = (inv.parent_id or None, inv.parent_digest or None)
                want = (parent[0], parent[1]) if parent else (None, None)
                if link != want:
                    raise ImageError("the layer does not chain onto the previous one")
            except BaseException:
                layer.close()
                raise
        except BaseException:
            sink.abort()
            raise
        return sink, layer
