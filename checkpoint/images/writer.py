"""The layer writer: a sink for pages and metadata records.

One pass, never seeking back, so the same encoder writes a local file
(:class:`LocalSink`, published atomically) or a stream/socket
(:class:`StreamSink`). Pages are copied (or, for whole frames, borrowed) into
frames of ``frame_size`` raw bytes, each compressed by one ``zstandard`` call;
with ``threads > 1`` frames are compressed in parallel and written in order.
The sink's writes (and the frames' CRCs, and the MAC of a signed layer) run
on one background thread, in order, so the disk I/O overlaps compression;
its errors surface from the next add_pages/add_zero/add_record call or from
close(). ``abort()`` never waits indefinitely and is safe to call again, or
after a close() that raised.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import fcntl
import os
import queue
import secrets
import socket
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from ..errors import ImageError
from . import format as F
from . import fsutil
from . import signing as S
from .fsutil import make_images_dir

__all__ = ["LayerStats", "LayerWriter", "LocalSink", "ParentRef", "StreamSink", "fsync_dir",
           "make_images_dir", "open_layer_for_write"]


@dataclass(frozen=True)
class ParentRef:
    """What a child layer records about its parent. ``mac``: the parent's
    MAC (Trailer.mac), needed to sign a child; b"" for an unsigned parent."""

    layer_id: str
    header_digest: bytes
    index: int
    mac: bytes = b""


@dataclass(frozen=True)
class LayerStats:
    layer_id: str
    index: int
    header_digest: bytes
    pages: int           # pages with data
    pages_zero: int
    bytes_raw: int
    bytes_stored: int    # compressed frame payloads
    file_bytes: int      # whole layer, framing included
    frames: int
    path: str | None     # where a LocalSink published it
    mac: bytes = b""     # the layer's MAC when signed

    @property
    def parent_ref(self) -> ParentRef:
        """How a child of this layer names it (MAC included)."""
        return ParentRef(self.layer_id, self.header_digest, self.index, self.mac)


# --------------------------------------------------------------------- sinks

class LocalSink:
    """Writes ``DIR/.layer-NNNN.img.tmp-XXXXXXXX`` (0600, flock-ed for its
    whole life) and, on commit, fsyncs it, links it to ``DIR/layer-NNNN.img``
    (or renames it over that name with ``replace``), unlinks the temp name
    and fsyncs DIR. Until then nothing is visible as a layer; abort() removes
    the temp file (and a layer this sink linked but whose writer did not see
    the commit complete). DIR and missing parents are created 0700.

    Creating a sink first removes the temp files of dead writers (their
    lock is free): see checkpoint/images/fsutil.py."""

    def __init__(self, images_dir: str | os.PathLike, index: int, *, replace: bool = False):
        self.dir = os.fspath(images_dir)
        self.fd = -1
        self.dir_fd = -1
        self.path: str | None = None
        self.replace = replace
        self.committed = False
        self._linked = False        # the final name is ours (a link, not yet a success)
        make_images_dir(self.dir)
        self.dir_fd = fsutil.open_dir(self.dir)
        try:
            self.name = F.layer_name(index)
            self.final = os.path.join(self.dir, self.name)
            self.removed_temps = fsutil.remove_dead_temps(self.dir_fd, self.dir)
            if not replace and _exists(self.name, self.dir_fd):
                raise ImageError("layer already exists; refusing to overwrite it",
                                 path=self.final)
            temp_name = f"{F.TEMP_PREFIX}{index:04d}.img.tmp-{secrets.token_hex(4)}"
            self.temp = os.path.join(self.dir, temp_name)
            # Created and locked under the directory's shared lock: a cleaner
            # (exclusive lock) never sees this file unlocked.
            fsutil.lock_dir_shared(self.dir_fd, self.dir)
            try:
                self.fd = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.dir_fd)
                self.temp_name = temp_name      # ours: abort may remove it
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                fsutil.unlock(self.dir_fd)
            os.fchmod(self.fd, 0o600)   # whatever the umask took away
        except BaseException:
            self.abort()
            raise
        self._written = 0       # bytes written so far
        self._synced = 0        # bytes whose writeback has been started

    def write(self, buffers) -> None:
        bufs = [memoryview(b).cast("B") for b in buffers]
        self._written += sum(len(b) for b in bufs)
        while bufs:
            n = os.writev(self.fd, bufs[:1024])
            while n and bufs:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0
        if self._written - self._synced >= WRITEBACK_CHUNK:
            # Start writeback of what is written so far, so that the fsync
            # at commit finds little left to write instead of the whole file.
            _start_writeback(self.fd, self._synced, self._written - self._synced)
            self._synced = self._written

    def commit(self) -> str:
        os.fsync(self.fd)
        d = self.dir_fd
        if self.replace:
            os.rename(self.temp_name, self.name, src_dir_fd=d, dst_dir_fd=d)
        else:
            try:    # fails instead of replacing a racing layer
                os.link(self.temp_name, self.name, src_dir_fd=d, dst_dir_fd=d,
                        follow_symlinks=False)
            except FileExistsError:
                raise ImageError("layer appeared while writing it; not replaced",
                                 path=self.final) from None
            self._linked = True
            os.unlink(self.temp_name, dir_fd=d)
        os.fsync(d)
        self._release()         # the temp name is gone before its lock goes
        self.path = self.final
        self.committed = True
        return self.final

    def interrupt(self) -> None:
        """Called from another thread while a write may be blocked: make sure
        nothing gets published (the fd is left to the writing thread)."""
        if self.dir_fd >= 0 and not self.committed:
            try:
                os.unlink(self.temp_name, dir_fd=self.dir_fd)
            except OSError:
                pass

    def abort(self) -> None:
        """Remove everything of this sink; idempotent. A layer that was linked
        is unlinked again unless replace (a squash's rename is final)."""
        d = self.dir_fd
        if d >= 0 and hasattr(self, "temp_name"):
            try:
                os.unlink(self.temp_name, dir_fd=d)
            except OSError:
                pass
        if self._linked and not self.replace:
            # commit linked the layer (and maybe closed its fds) but the writer
            # did not see it complete: take the layer back
            own = d < 0
            try:
                if own:
                    d = fsutil.open_dir(self.dir)
                os.unlink(self.name, dir_fd=d)
                os.fsync(d)
            except (OSError, ImageError):
                pass
            finally:
                if own and d >= 0:
                    os.close(d)
            self._linked = False
            self.committed = False
            self.path = None
        self._release()

    def _release(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        d, self.dir_fd = self.dir_fd, -1
        if d >= 0:
            os.close(d)


def _exists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


class StreamSink:
    """Writes to a socket or a binary file object (live migration). The
    receiver must treat the layer as absent until it has read the trailer."""

    def __init__(self, stream):
        self.stream = stream
        self.path = None

    def write(self, buffers) -> None:
        if isinstance(self.stream, socket.socket):
            for b in buffers:
                self.stream.sendall(b)
        else:
            for b in buffers:
                self.stream.write(b)

    def commit(self) -> None:
        if hasattr(self.stream, "flush"):
            self.stream.flush()

    def interrupt(self) -> None:
        """Unblock a write stuck on a peer that stopped reading: the layer is
        cut short (no trailer), which a receiver treats as absent."""
        if isinstance(self.stream, socket.socket):
            try:
                self.stream.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def abort(self) -> None:
        pass


WRITEBACK_CHUNK = 16 << 20
_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing the dirty pages of
    the range back without waiting for them (Linux). Only a hint: durability
    still comes from the fsync at commit; failures are ignored here (the
    fsync reports them)."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            f = libc.sync_file_range
            f.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
            f.restype = ctypes.c_int
            _sync_file_range = f
        except (OSError, AttributeError):
            _sync_file_range = False
    if _sync_file_range:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _boottime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


_FRAME = object()   # a queued frame: (_FRAME, data, raw, offset, seed, more buffers)
_TRAILER = object()  # the trailer: (_TRAILER, payload without MAC, offset, seed)
_FLUSH = object()    # (_FLUSH, reply queue): answered once everything before it is written
_STOP = object()     # end of the stream
POLL = 0.25          # seconds between checks of a waiting caller (never a busy loop)
ABORT_WAIT = 2.0     # seconds abort() waits for the I/O thread before interrupting the sink


class _Writeback:
    """One background thread that does the sink's writes, in queue order, so
    that write syscalls (and the frames' CRC-32, and the MAC of a signed
    layer) overlap the caller's compression. They release the GIL. At most
    ``depth`` items (each about one compressed frame) wait, which bounds
    memory and makes a slow sink slow the writer down.

    Only ``queue.SimpleQueue`` (whose put never blocks and whose state lives
    in C) passes things between the threads, and the caller only ever waits
    with a timeout, re-checking the thread's state: an exception landing in
    the caller (SIGINT) cannot leave a lock held or a wait that never ends.

    The first error is kept; later items are dropped (the thread keeps
    consuming, so nobody waits on it), and ``put``/``flush``/``finish`` raise
    that same exception object (an ENOSPC stays an OSError with errno
    ENOSPC). After ``cancel`` the thread drops everything and ends; with
    ``abort_on_exit`` set it then aborts the sink itself (the caller may have
    stopped waiting for it). The thread holds no reference to the
    LayerWriter."""

    def __init__(self, sink, depth: int, mac=None):
        self.sink = sink
        self.mac = mac              # hmac object fed every byte written, or None
        self.trailer_mac = b""
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.room: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(depth):
            self.room.put(None)
        self.error: BaseException | None = None
        self.discard = False
        self.stopped = False
        self.exited = False
        self.abort_on_exit = False
        self._exit_q: queue.SimpleQueue = queue.SimpleQueue()
        self._abort_token: queue.SimpleQueue = queue.SimpleQueue()
        self._abort_token.put(None)
        self.thread = threading.Thread(target=self._run, name="layer-io", daemon=True)
        self.thread.start()

    def _raise_if_stopped(self) -> None:
        if self.error is not None:
            raise self.error
        if self.discard:
            raise ValueError("layer writer was aborted")

    def put(self, item) -> None:
        self._raise_if_stopped()
        while True:
            try:
                self.room.get(timeout=POLL)
                break
            except queue.Empty:
                self._raise_if_stopped()
        self.q.put(item)

    def flush(self) -> None:
        """Wait until everything queued so far is written; raise the first error."""
        self._raise_if_stopped()
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self.q.put((_FLUSH, reply))
        while True:
            try:
                reply.get(timeout=POLL)
                break
            except queue.Empty:
                if self.exited:
                    break
        self._raise_if_stopped()

    def finish(self) -> None:
        """Write everything queued and end the thread; raise the first error."""
        if not self.stopped:
            self.stopped = True
            self.q.put(_STOP)
        while not self.wait_exit(POLL):
            pass
        self._raise_if_stopped()

    def cancel(self) -> None:
        """Drop what is still queued and make the thread end after the write
        in progress, if any. Never blocks."""
        self.discard = True
        self.stopped = True
        self.q.put(_STOP)

    def wait_exit(self, timeout: float) -> bool:
        """True once the thread has ended (within ``timeout`` seconds)."""
        if not self.exited:
            try:
                self._exit_q.get(timeout=timeout)
                self._exit_q.put(True)          # for the next waiter
            except queue.Empty:
                return False
        self.thread.join(1.0)   # it ends right after telling us
        return True

    def abort_sink_once(self) -> None:
        """sink.abort(), by whichever of the caller and the thread comes first."""
        try:
            self._abort_token.get_nowait()
        except queue.Empty:
            return
        self.sink.abort()

    def disarm(self) -> None:
        """After a successful commit: sink.abort() must never run."""
        try:
            self._abort_token.get_nowait()
        except queue.Empty:
            pass

    def drop(self) -> None:
        """For a writer dropped without close/abort (its finalizer)."""
        self.abort_on_exit = True
        self.cancel()
        if self.exited:
            try:
                self.abort_sink_once()
            except OSError:
                pass

    def _run(self) -> None:
        q, sink = self.q, self.sink
        try:
            while True:
                item = q.get()
                if item is _STOP:
                    return
                if type(item) is tuple and item and item[0] is _FLUSH:
                    item[1].put(None)
                    continue
                try:
                    if not (self.discard or self.error is not None):
                        self._write(sink, item)
                except BaseException as exc:    # handed to the caller's thread
                    self.error = exc
                finally:
                    self.room.put(None)
        finally:
            try:
                if self.abort_on_exit:
                    self.abort_sink_once()
            except BaseException:
                pass
            finally:
                self.exited = True
                self._exit_q.put(True)

    def _write(self, sink, item) -> None:
        mac = self.mac
        tag = item[0]
        if tag is _FRAME:
            _, data, raw, pos, seed, tail = item
            head = F.pack_block_header(F.BT_FRAME, len(data), raw, zlib.crc32(data), pos, seed)
            bufs = (head, data) + tail
        elif tag is _TRAILER:
            _, payload, pos, seed = item
            if mac is not None:
                mac.update(payload)
                self.trailer_mac = mac.digest()
                payload = payload + S.MAC_FIELD_PREFIX + self.trailer_mac
                mac = None      # the trailer's block header is not covered
            head = F.pack_block_header(F.BT_TRAILER, len(payload), 0, zlib.crc32(payload),
                                       pos, seed)
            bufs = (head, payload)
        else:
            bufs = item
        sink.write(bufs)
        if mac is not None:
            for b in bufs:
                mac.update(b)


# -------------------------------------------------------------------- writer

class LayerWriter:
    """Encode one layer into ``sink``.

    ``add_pages``/``add_zero`` must come in increasing address order for each
    pid (the order a scan of the address space yields them); pids may
    interleave. Use as a context manager: an exception aborts the sink.

    ``sign_key`` (bytes, at least 32): sign the layer (docs/security.md); a
    signed child needs its parent's MAC in ``parent`` (``LayerStats.parent_ref``
    or :attr:`parent_ref` after close give it), and a signed squash result
    the replaced layer's in ``replaces``.
    """

    def __init__(self, sink, *, index: int = 0, kind: str = F.KIND_DUMP,
                 parent: ParentRef | None = None, tracker: str = "full",
                 kernel_release: str | None = None, level: int = 1, threads: int = 1,
                 frame_size: int = F.DEFAULT_FRAME_SIZE, page_size: int = F.PAGE_SIZE,
                 layer_id: str | None = None, squashed_first: int | None = None,
                 replaces: ParentRef | None = None, sign_key: bytes | None = None):
        if kind not in F.KINDS:
            raise ValueError(f"kind must be one of {F.KINDS}, not {kind!r}")
        if frame_size % page_size or not F.MIN_FRAME_SIZE <= frame_size <= F.MAX_FRAME_SIZE:
            raise ValueError(f"frame_size must be a multiple of {page_size} "
                             f"in [{F.MIN_FRAME_SIZE}, {F.MAX_FRAME_SIZE}]")
        if (index == 0) != (parent is None) and squashed_first is None:
            raise ValueError("layer 0 has no parent and every later layer has one")
        if not isinstance(level, int) or not -(1 << 17) <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ValueError(f"zstd level must be an integer in "
                             f"[-131072, {zstandard.MAX_COMPRESSION_LEVEL}], not {level!r}")
        if sign_key is not None:
            sign_key = S.check_key(sign_key)
            if parent is not None and len(parent.mac) != S.MAC_LEN:
                raise ValueError("signing a layer whose parent is unsigned, or whose ParentRef "
                                 "lacks the parent's MAC (use LayerStats.parent_ref)")
            if replaces is not None and len(replaces.mac) != S.MAC_LEN:
                raise ValueError("signing a squash whose replaced layer's ParentRef lacks "
                                 "its MAC")
        self.sink = sink
        self.page_size = page_size
        self.frame_size = frame_size
        self.level = level
        self.threads = max(1, int(threads))
        self.layer_id = layer_id or secrets.token_hex(16)
        self.index = index
        inv = F.Inventory(
            format_version=F.FORMAT_VERSION, layer_id=self.layer_id, index=index, kind=kind,
            kernel_release=kernel_release if kernel_release is not None else os.uname().release,
            tracker=tracker, created_unix_ns=time.time_ns(), created_boottime_ns=_boottime_ns(),
            page_size=page_size, frame_size=frame_size, compression="zstd",
            compression_level=level, hostname=os.uname().nodename,
            engine_version=_engine_version())
        if parent is not None:
            inv.parent_id = parent.layer_id
            inv.parent_digest = parent.header_digest
            inv.parent_mac = parent.mac
        if squashed_first is not None:
            inv.squashed = True
            inv.squashed_first = squashed_first
            if replaces is not None:
                inv.replaces_id = replaces.layer_id
                inv.replaces_digest = replaces.header_digest
                inv.replaces_mac = replaces.mac
        if sign_key is not None:
            inv.mac_alg = S.MAC_ALG
            inv.mac_key_id = S.key_id(sign_key)
        self.inventory = inv
        self.signed = sign_key is not None
        self.mac = b""
        self._pos = 0
        self._seed = 0
        self._closed = False        # no more pages or records
        self._state = "open"        # open -> closed (published) | aborted
        self._abort_done = False
        self._frames: list[int] = []
        self._pagemaps: list[int] = []
        self._records: list[int] = []
        self._n_entries = 0
        self._pages = self._pages_zero = self._bytes_stored = 0
        self._next_addr: dict[int, int] = {}
        self._buf = bytearray(frame_size)
        self._free: list[bytearray] = []
        self._fill = 0
        self._entries: list[list[int]] = []       # [pid, addr, npages] of the current buffer
        self._zeros: list[list[int]] = []         # pending zero entries
        self._jobs: collections.deque = collections.deque()
        self._t0: float | None = None
        self._busy = 0.0
        self._local = threading.local()
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zstd-w") \
            if self.threads > 1 else None
        self._io = _Writeback(sink, depth=16 + 4 * self.threads,
                              mac=S.new_mac(sign_key) if sign_key is not None else None)
        weakref.finalize(self, self._io.drop)   # dropped without close/abort: drop the sink
        try:
            self._write(F.PREAMBLE.pack(F.MAGIC, F.FORMAT_VERSION, 0))
            payload = inv.SerializeToString()
            self.header_digest = F.digest(payload)
            self._block(F.BT_HEADER, payload)
            self._seed = F.layer_seed(self.layer_id)
        except BaseException:
            self.abort()
            raise

    # ---------------------------------------------------------- public API
    def add_pages(self, pid: int, addr: int, data) -> None:
        """Add len(data)//page_size pages of ``pid`` starting at ``addr``.
        ``data`` is any buffer (bytes, bytearray, mmap, memoryview); it may be
        reused as soon as the call returns."""
        t = time.perf_counter()
        mv = memoryview(data).cast("B")
        n = len(mv)
        if n % self.page_size:
            raise ValueError(f"data length {n} is not a multiple of the page size")
        npages = n // self.page_size
        self._check(pid, addr, npages)
        fs, ps = self.frame_size, self.page_size
        off = 0
        borrowed = False
        while off < n:
            rem = n - off
            # Single-threaded, whole frames are compressed straight from the
            # caller's buffer. With a pool, pages are copied (~10 GB/s) so the
            # call can return without waiting and the workers stay busy.
            if self._pool is None and self._fill == 0 and rem >= fs:
                self._submit(mv[off:off + fs], [[pid, addr + off, fs // ps]], None)
                borrowed = True
                off += fs
                continue
            take = min(rem, fs - self._fill)
            self._buf[self._fill:self._fill + take] = mv[off:off + take]
            self._fill += take
            self._entry(self._entries, pid, addr + off, take // ps)
            off += take
            if self._fill == fs:
                self._emit_buffer()
        self._pages += npages
        if borrowed:
            self._drain(0)          # the caller may reuse `data` once we return
        self._busy += time.perf_counter() - t

    def frame_space(self) -> memoryview:
        """The free part of the current frame buffer: a reader may fill it
        directly (a scatter read) and then call :meth:`commit_runs`, saving
        the copy :meth:`add_pages` makes. Valid until the next call."""
        if self._closed:
            raise ValueError("layer writer is closed")
        return memoryview(self._buf)[self._fill:]

    def commit_runs(self, pid: int, runs, nbytes: int) -> None:
        """Account for ``nbytes`` just written at the start of
        :meth:`frame_space`: the pages of ``runs`` ((addr, npages), increasing
        addresses), in that order."""
        t = time.perf_counter()
        ps = self.page_size
        if nbytes > self.frame_size - self._fill or nbytes % ps:
            raise ValueError(f"commit of {nbytes} bytes does not fit the frame space")
        if self._t0 is None:
            self._t0 = time.perf_counter()
        prev_end = self._next_addr.get(pid, 0)
        total = 0
        entries = self._entries
        for addr, npages in runs:
            if addr % ps or npages <= 0 or addr < prev_end:
                raise ValueError(f"pid {pid}: bad or unordered page run {addr:#x} "
                                 f"({npages} pages) after {prev_end:#x}")
            if entries and entries[-1][0] == pid and entries[-1][1] + entries[-1][2] * ps == addr:
                entries[-1][2] += npages
            else:
                entries.append([pid, addr, npages])
            prev_end = addr + npages * ps
            total += npages * ps
        if total != nbytes:
            raise ValueError(f"runs hold {total} bytes, the commit says {nbytes}")
        self._next_addr[pid] = prev_end
        self._fill += nbytes
        self._pages += nbytes // ps
        if self._fill == self.frame_size:
            self._emit_buffer()
        self._busy += time.perf_counter() - t

    def add_zero(self, pid: int, addr: int, npages: int) -> None:
        """Record ``npages`` zero pages; no data is stored for them."""
        self._check(pid, addr, npages)
        self._entry(self._zeros, pid, addr, npages)
        self._pages_zero += npages
        if len(self._zeros) >= 65536:
            self._write_pagemap(None, [])

    def add_record(self, kind: str, message) -> None:
        """Add one metadata record: a protobuf message (or its serialized bytes)."""
        if self._closed:
            raise ValueError("layer writer is closed")
        payload = message if isinstance(message, (bytes, bytearray, memoryview)) \
            else message.SerializeToString()
        rec = F.Record(kind=kind, payload=bytes(payload)).SerializeToString()
        if len(rec) > F.MAX_METADATA_BLOCK:
            raise ValueError(f"{kind} record of {len(rec)} bytes exceeds the "
                             f"{F.MAX_METADATA_BLOCK}-byte bound readers apply")
        self._records.append(self._pos)
        self._block(F.BT_RECORD, rec)

    def close(self, **round_stats) -> LayerStats:
        """Flush everything, write the trailer and publish the layer.
        ``round_stats`` are RoundStats fields (freezing_ms, frozen_ms,
        memdump_ms, memwrite_ms, pages_scanned, pages_skipped_parent); the
        page and byte counts are the writer's own. If anything raises in
        here (an I/O error, a KeyboardInterrupt at any point) the layer is
        aborted: nothing is published and no thread is left running."""
        if self._closed:
            raise ValueError("layer writer is closed")
        self._closed = True
        try:
            t = time.perf_counter()
            if self._fill:
                self._emit_buffer()
            self._drain(0)
            if self._zeros:
                self._write_pagemap(None, [])
            self._io.flush()        # the page data is written: memwrite_ms includes that
            self._busy += time.perf_counter() - t
            stats = F.RoundStats(**round_stats)
            stats.pages_written = self._pages
            stats.pages_zero = self._pages_zero
            stats.bytes_raw = self._pages * self.page_size
            stats.bytes_stored = self._bytes_stored
            if "memwrite_ms" not in round_stats:
                stats.memwrite_ms = self._busy * 1000.0
            if "pages_scanned" not in round_stats:
                stats.pages_scanned = self._pages + self._pages_zero
            tr = F.Trailer(stats=stats, frames=len(self._frames), pagemaps=len(self._pagemaps),
                           records=len(self._records), frame_offsets=self._frames,
                           pagemap_offsets=self._pagemaps, record_offsets=self._records,
                           header_digest=self.header_digest, pages_zero=self._pages_zero,
                           pids=len(self._next_addr))
            payload = tr.SerializeToString()    # the MAC, if any, is appended by the I/O thread
            pos = self._pos
            self._pos += F.BLOCK_HEADER_SIZE + len(payload) + (S.MAC_SUFFIX_LEN if self.signed
                                                               else 0)
            self._io.put((_TRAILER, payload, pos, self._seed))
            self._io.finish()
            self._shutdown()
            mac = self._io.trailer_mac
            path = self.sink.commit()
            self._io.disarm()           # nobody aborts the published sink any more
            self._state = "closed"      # from here on abort() is a no-op
        except BaseException:
            self.abort()
            raise
        self.mac = mac
        return LayerStats(self.layer_id, self.index, self.header_digest, self._pages,
                          self._pages_zero, self._pages * self.page_size, self._bytes_stored,
                          self._pos, len(self._frames), path, mac)

    def abort(self) -> None:
        """Drop the layer: nothing of it becomes visible and the writer's
        threads end. Safe to call again (a second call finishes what an
        interrupted one left), after a close() that raised, and after a
        successful close() (then it does nothing). Never waits on a full
        queue; waits at most ABORT_WAIT seconds for a write in progress,
        then interrupts the sink (LocalSink: unlinks the temp file;
        StreamSink on a socket: shuts it down) and leaves the rest to the
        I/O thread, which aborts the sink when it returns."""
        if self._state == "closed" or self._abort_done:
            return
        self._state = "aborted"
        self._closed = True
        io = self._io
        io.abort_on_exit = True     # if we stop waiting, the I/O thread aborts the sink
        io.cancel()                 # never blocks
        self._jobs.clear()
        self._shutdown()
        if not io.wait_exit(ABORT_WAIT):
            interrupt = getattr(self.sink, "interrupt", None)
            if interrupt is not None:
                interrupt()
            if not io.wait_exit(ABORT_WAIT):
                self._abort_done = True
                return              # still in a write: the thread aborts the sink after it
        io.abort_sink_once()
        self._abort_done = True

    @property
    def parent_ref(self) -> ParentRef:
        """How a child of this layer names it (with its MAC once closed)."""
        return ParentRef(self.layer_id, self.header_digest, self.index, self.mac)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()
        return False

    # ------------------------------------------------------------- internals
    def _check(self, pid: int, addr: int, npages: int) -> None:
        if self._closed:
            raise ValueError("layer writer is closed")
        if addr % self.page_size or npages <= 0 or addr < 0 \
                or addr + npages * self.page_size > F.USER_ADDR_LIMIT:
            raise ValueError(f"bad page run: addr {addr:#x}, {npages} pages (page-aligned, "
                             f"below {F.USER_ADDR_LIMIT:#x})")
        if not 0 < pid <= F.MAX_PID:
            raise ValueError(f"bad pid {pid}")
        if pid not in self._next_addr and len(self._next_addr) >= F.MAX_LAYER_PIDS:
            raise ValueError(f"more than {F.MAX_LAYER_PIDS} pids in one layer")
        if addr < self._next_addr.get(pid, 0):
            raise ValueError(f"pid {pid}: page {addr:#x} is below {self._next_addr[pid]:#x}; "
                             f"add pages of a pid in increasing address order")
        self._next_addr[pid] = addr + npages * self.page_size
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def _entry(self, entries: list, pid: int, addr: int, npages: int) -> None:
        if entries:
            last = entries[-1]
            if last[0] == pid and last[1] + last[2] * self.page_size == addr \
                    and last[2] + npages <= F.MAX_ENTRY_PAGES:
                last[2] += npages
                return
        while npages > F.MAX_ENTRY_PAGES:   # npages is a uint32
            entries.append([pid, addr, F.MAX_ENTRY_PAGES])
            addr += F.MAX_ENTRY_PAGES * self.page_size
            npages -= F.MAX_ENTRY_PAGES
        entries.append([pid, addr, npages])

    def _emit_buffer(self) -> None:
        buf, fill, entries = self._buf, self._fill, self._entries
        self._entries = []
        self._fill = 0
        if self._pool is None:
            self._submit(memoryview(buf)[:fill], entries, None)   # synchronous: buffer reused
        else:
            self._buf = self._free.pop() if self._free else bytearray(self.frame_size)
            self._submit(memoryview(buf)[:fill], entries, buf)

    def _compress(self, src):
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        out = cctx.compress(src)
        return out, zlib.crc32(out)

    def _submit(self, src: memoryview, entries: list, owned: bytearray | None) -> None:
        if self._pool is None:
            # Compressed here and now, so `src` (maybe the caller's buffer) is
            # free again on return; the CRC is left to the I/O thread.
            self._write_frame(len(src), (self._cctx.compress(src), None), entries)
            return
        self._jobs.append((self._pool.submit(self._compress, src), len(src), entries, owned))
        self._drain(2 * self.threads)

    def _drain(self, keep: int) -> None:
        while len(self._jobs) > keep:
            fut, raw, entries, owned = self._jobs.popleft()
            self._write_frame(raw, fut.result(), entries)
            if owned is not None:
                self._free.append(owned)

    def _write_frame(self, raw: int, compressed, entries: list) -> None:
        """Queue a FRAME block and its PAGEMAP as one write."""
        data, crc = compressed
        pos = self._pos
        self._frames.append(pos)
        self._pos += F.BLOCK_HEADER_SIZE + len(data)
        self._bytes_stored += len(data)
        pagemap = self._pagemap_block(len(self._frames) - 1, entries)
        if crc is None:     # the I/O thread computes the CRC and the block header
            self._io.put((_FRAME, data, raw, pos, self._seed, pagemap))
        else:
            head = F.pack_block_header(F.BT_FRAME, len(data), raw, crc, pos, self._seed)
            self._io.put((head, data) + pagemap)

    def _write_pagemap(self, frame_no: int | None, entries: list) -> None:
        self._io.put(self._pagemap_block(frame_no, entries))

    def _pagemap_block(self, frame_no: int | None, entries: list) -> tuple[bytes, bytes]:
        """The PAGEMAP block (with the pending zero entries) at the current
        position, as (header, payload); the position advances past it."""
        zeros, self._zeros = self._zeros, []
        self._n_entries += len(entries) + len(zeros)
        if self._n_entries > F.MAX_LAYER_ENTRIES:
            raise ImageError(f"the layer would hold more than {F.MAX_LAYER_ENTRIES} page map "
                             f"entries (the bound readers apply): memory too fragmented for "
                             f"one layer")
        pm = F.PagemapBlock()
        if frame_no is not None:
            pm.frame = frame_no
        for flag, lst in ((F.PE_DATA, entries), (F.PE_ZERO, zeros)):
            if lst:  # columns in one extend each, not four appends an entry
                pids, addrs, counts = zip(*lst)
                pm.pid.extend(pids)
                pm.vaddr.extend(addrs)
                pm.npages.extend(counts)
                pm.flags.extend([flag] * len(lst))
        self._pagemaps.append(self._pos)
        return self._block_bytes(F.BT_PAGEMAP, pm.SerializeToString())

    def _block_bytes(self, btype: int, payload: bytes, aux: int = 0) -> tuple[bytes, bytes]:
        head = F.pack_block_header(btype, len(payload), aux, zlib.crc32(payload),
                                   self._pos, self._seed)
        self._pos += len(head) + len(payload)
        return head, payload

    def _block(self, btype: int, payload: bytes, aux: int = 0) -> None:
        self._io.put(self._block_bytes(btype, payload, aux))

    def _write(self, *buffers) -> None:
        self._io.put(buffers)
        self._pos += sum(len(b) for b in buffers)

    def _shutdown(self) -> None:
        pool = self._pool
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)   # no new work, whatever follows
            self._pool = None
            pool.shutdown(wait=True)    # workers end after the frame they compress


def _engine_version() -> str:
    from .. import __version__
    return __version__


def open_layer_for_write(images_dir: str | os.PathLike, *, kind: str = F.KIND_DUMP,
                         tracker: str = "full", sign_key: bytes | None = None,
                         **options) -> LayerWriter:
    """A writer for the next layer of the chain in ``images_dir`` (created 0700,
    parents too, if missing): index and parent come from the validated chain,
    if any. ``options``: level, threads, frame_size, kernel_release,
    page_size. ``sign_key``: sign the layer. A chain is never mixed: a
    signed chain takes only layers signed with the same key, an unsigned one
    only unsigned layers (ImageError otherwise). The parent's MAC is not
    checked here (a reader with the key checks every link)."""
    from .reader import open_chain, list_layers

    images_dir = os.fspath(images_dir)
    kid = S.key_id(S.check_key(sign_key)) if sign_key is not None else None
    parent = None
    index = 0
    if os.path.isdir(images_dir) and list_layers(images_dir):
        with open_chain(images_dir) as chain:
            top = chain.top
            if top.key_id != kid:
                if top.key_id is None:
                    why = "the chain is unsigned; a signed layer cannot extend it"
                elif kid is None:
                    why = (f"the chain is signed with key {top.key_id}; give the key to "
                           f"extend it")
                else:
                    why = f"the chain is signed with key {top.key_id}, not with key {kid}"
                raise ImageError(why, path=top.path)
            parent = ParentRef(top.layer_id, top.header_digest, top.index, top.mac)
            index = top.index + 1
    sink = LocalSink(images_dir, index)
    try:
        return LayerWriter(sink, index=index, kind=kind, parent=parent, tracker=tracker,
                           sign_key=sign_key, **options)
    except BaseException:
        sink.abort()
        raise
