"""The "hash" tracker: a digest of every page with content, kept from one
round to the next; a page whose digest changed is dirty.

Works on any kernel with PAGEMAP_SCAN (to find the pages with content) and
needs nothing inside the target, at the price of reading all of its memory
every round. Digests are 8 bytes a page: xxh3-64 when the ``xxhash`` package
is installed (~0.65 µs a 4 KiB page from Python), else blake2b with
``digest_size=8`` from hashlib (~6.7 µs a page): measured here, see
tools/bench/bench_scan.py.

State: one ``array('Q')`` of 512 digests per 2 MiB-aligned chunk of address
space holding a page with content (``0`` = no content); so a sparse 1 TiB
reservation costs nothing. Serialisable with :meth:`state_bytes`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from collections.abc import Iterable, Iterator

from ..errors import CheckpointError, ImageError
from ..kernel.procfs import PAGE_SIZE, Vma, open_proc_fd
from .base import REGION_ZERO, DirtyBatch, Tracker, content_scan_kw, register, trackable
from .scan import PAGE_SHIFT, PagemapScanner, make_batch

try:  # optional, much faster (pip install xxhash)
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

CHUNK_PAGES = 512
CHUNK_SHIFT = PAGE_SHIFT + 9
ABSENT = 0
POISON = 1  # matches no page: a digest of exactly 1 has odds 2**-64, like a collision
_ZERO_PAGE = bytes(PAGE_SIZE)


def _blake2b64(page) -> int:
    return int.from_bytes(hashlib.blake2b(page, digest_size=8).digest(), "little")


ALGORITHMS = {"blake2b-64": _blake2b64}
if _xxhash is not None:
    ALGORITHMS["xxh3-64"] = _xxhash.xxh3_64_intdigest
DEFAULT_ALGORITHM = "xxh3-64" if _xxhash is not None else "blake2b-64"

_MAGIC = b"CKPTHSH1"


@register
class HashTracker(Tracker):
    name = "hash"

    def __init__(self, *, algorithm: str | None = None, read_size: int = 1 << 20,
                 vec_len: int = 1024):
        super().__init__(vec_len=vec_len)
        self.algorithm = algorithm or DEFAULT_ALGORITHM
        if self.algorithm not in ALGORITHMS:
            raise ImageError(f"page digest {self.algorithm!r} is not available here "
                             f"(have: {', '.join(ALGORITHMS)}; xxh3-64 needs 'pip install xxhash')")
        h = ALGORITHMS[self.algorithm]
        # a digest of 0 would read as "no content" (ABSENT): odds 2**-64 a page,
        # the same order as a collision, so no wrapper is paid per page for it
        self._hash = h
        self._zero = h(_ZERO_PAGE)
        self._buf = bytearray(max(PAGE_SIZE, read_size - read_size % PAGE_SIZE))
        self._chunks: dict[int, array] = {}
        self._pending: dict[int, array] | None = None
        self.pages_hashed = 0  # in the last collect

    # ---- collect
    def collect(self, pid: int, vmas: Iterable[Vma]) -> Iterator[DirtyBatch]:
        vmas = [v for v in vmas if trackable(v)]
        full = self.full_reason(pid) is not None
        old = {} if full else self._chunks
        new: dict[int, array] = {}
        self.pages_hashed = 0
        memfd = open_proc_fd(pid, "mem")
        try:
            with PagemapScanner(pid, self.vec_len, max_pages=self.max_pages) as scanner:
                for vma in vmas:
                    self._digest_vma(scanner, memfd, vma, new)
        finally:
            os.close(memfd)
        self._pending = new
        # No "new VMA -> whole" rule here: content decides. A VMA split by
        # mprotect or replaced by a MAP_FIXED mapping is compared page by page
        # with what was at the same addresses (a page never seen compares
        # with "no content", so all of a really new VMA is reported).
        for vma in vmas:
            yield from self._diff(vma, old, new, full)

    def _digest_vma(self, scanner: PagemapScanner, memfd: int, vma: Vma,
                    new: dict[int, array]) -> None:
        h, zero, buf = self._hash, self._zero, self._buf
        mv = memoryview(buf)
        bufsize = len(buf)
        for batch in scanner.scan(vma.start, vma.end, **content_scan_kw(vma)):
            for start, end, flags in batch.tolist():
                if flags & REGION_ZERO:
                    self._fill(new, start, end, zero)
                    continue
                addr = start
                while addr < end:
                    n = min(bufsize, end - addr)
                    try:
                        got = os.preadv(memfd, [mv[:n]], addr)
                    except OSError as exc:
                        raise CheckpointError(
                            f"reading {n} bytes at {addr:#x} of process {scanner.pid} "
                            f"through /proc/{scanner.pid}/mem: {exc.strerror}") from None
                    if got != n:
                        raise CheckpointError(f"short read at {addr:#x} of process "
                                              f"{scanner.pid}: {got} of {n} bytes")
                    digests = [h(mv[o:o + PAGE_SIZE]) for o in range(0, n, PAGE_SIZE)]
                    self.pages_hashed += len(digests)
                    self._store(new, addr, digests)
                    addr += n

    @staticmethod
    def _store(new: dict[int, array], addr: int, digests: list[int]) -> None:
        i = 0
        page = addr >> PAGE_SHIFT
        while i < len(digests):
            key, off = divmod(page + i, CHUNK_PAGES)
            ch = new.get(key)
            if ch is None:
                ch = new[key] = array("Q", bytes(8 * CHUNK_PAGES))
            k = min(CHUNK_PAGES - off, len(digests) - i)
            ch[off:off + k] = array("Q", digests[i:i + k])
            i += k

    @staticmethod
    def _fill(new: dict[int, array], start: int, end: int, value: int) -> None:
        page, last = start >> PAGE_SHIFT, end >> PAGE_SHIFT
        while page < last:
            key, off = divmod(page, CHUNK_PAGES)
            ch = new.get(key)
            if ch is None:
                ch = new[key] = array("Q", bytes(8 * CHUNK_PAGES))
            k = min(CHUNK_PAGES - off, last - page)
            ch[off:off + k] = array("Q", [value]) * k
            page += k

    def _diff(self, vma: Vma, old: dict[int, array], new: dict[int, array],
              whole: bool) -> Iterator[DirtyBatch]:
        """Compare the chunks covering the VMA; yield runs of changed pages
        (flush every ``vec_len`` rows so memory stays bounded)."""
        zero, empty = self._zero, None
        # in anonymous memory "no content" and "the zero page" read the same
        anon = vma.inode == 0 and not vma.shared
        rows = array("Q")
        run_s = run_e = run_f = -1
        first, last = vma.start >> PAGE_SHIFT, vma.end >> PAGE_SHIFT
        for key in range(first // CHUNK_PAGES, (last - 1) // CHUNK_PAGES + 1):
            n_ch, o_ch = new.get(key), old.get(key)
            if n_ch is None and o_ch is None:
                continue
            lo = max(first, key * CHUNK_PAGES) - key * CHUNK_PAGES
            hi = min(last, (key + 1) * CHUNK_PAGES) - key * CHUNK_PAGES
            if empty is None:
                empty = array("Q", bytes(8 * CHUNK_PAGES))
            n_ch = n_ch if n_ch is not None else empty
            o_ch = empty if (whole or o_ch is None) else o_ch
            if n_ch[lo:hi] == o_ch[lo:hi]:
                continue
            base = key * CHUNK_PAGES
            for i in range(lo, hi):
                d, o = n_ch[i], o_ch[i]
                if d == o or (anon and (d == ABSENT or d == zero) and (o == ABSENT or o == zero)):
                    continue
                f = REGION_ZERO if d == ABSENT or d == zero else 0
                p = (base + i) << PAGE_SHIFT
                if p == run_e and f == run_f:
                    run_e = p + PAGE_SIZE
                    continue
                if run_s >= 0:
                    rows.extend((run_s, run_e, run_f))
                    if len(rows) >= 3 * self.vec_len:
                        yield DirtyBatch(vma, make_batch(rows.tobytes()))
                        rows = array("Q")
                run_s, run_e, run_f = p, p + PAGE_SIZE, f
        if run_s >= 0:
            rows.extend((run_s, run_e, run_f))
        if rows:
            yield DirtyBatch(vma, make_batch(rows.tobytes()))

    # ---- round protocol
    def arm(self, pid: int, vmas: Iterable[Vma]) -> None:
        vmas = list(vmas)
        if self._pending is None:
            raise CheckpointError("hash tracker armed without a collect in this freeze")
        self._chunks, self._pending = self._pending, None
        super().arm(pid, vmas)

    def lost(self, ranges) -> None:
        """Pages reported but not read: poison their digests, so that the
        next round finds them changed whatever they then hold."""
        super().lost(ranges)
        for s, e in ranges:
            self._fill(self._chunks, s, e, POISON)

    def reset(self, reason: str) -> None:
        super().reset(reason)
        self._chunks, self._pending = {}, None

    # ---- state
    def state_bytes(self) -> bytes:
        """Magic, algorithm, mm identity, VMA keys count, then per chunk its
        index and its 512 digests (little-endian u64)."""
        algo = self.algorithm.encode()
        mm = self._mm or b""
        head = _MAGIC + struct.pack("<B", len(algo)) + algo + struct.pack("<B", len(mm)) + mm
        vk = sorted(self._vmas)
        vkb = b"".join(struct.pack("<QQQQB", s, e, ino, off, 1 if sh == "s" else 0)
                       for s, e, ino, off, sh in vk)
        parts = [head, struct.pack("<BQ", self._reason is None, len(vk)), vkb,
                 struct.pack("<Q", len(self._chunks))]
        for key in sorted(self._chunks):
            parts.append(struct.pack("<Q", key))
            parts.append(self._chunks[key].tobytes())
        return b"".join(parts)

    @classmethod
    def from_state(cls, data: bytes, **kw) -> "HashTracker":
        mv = memoryview(data)
        if bytes(mv[:8]) != _MAGIC:
            raise ImageError("not a hash-tracker state (bad magic)")
        o = 8
        n = mv[o]; algo = bytes(mv[o + 1:o + 1 + n]).decode(); o += 1 + n
        n = mv[o]; mm = bytes(mv[o + 1:o + 1 + n]); o += 1 + n
        armed, nvk = struct.unpack_from("<BQ", mv, o); o += 9
        vmas = set()
        for _ in range(nvk):
            s, e, ino, off, sh = struct.unpack_from("<QQQQB", mv, o); o += 33
            vmas.add((s, e, ino, off, "s" if sh else "p"))
        (nch,) = struct.unpack_from("<Q", mv, o); o += 8
        self = cls(algorithm=algo, **kw)
        step = 8 * CHUNK_PAGES
        for _ in range(nch):
            (key,) = struct.unpack_from("<Q", mv, o); o += 8
            ch = array("Q")
            ch.frombytes(mv[o:o + step])
            if len(ch) != CHUNK_PAGES:
                raise ImageError("hash-tracker state is truncated")
            o += step
            self._chunks[key] = ch
        self._mm = mm or None
        self._vmas = vmas
        self._reason = None if armed else "first round"
        return self
