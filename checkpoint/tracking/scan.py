"""Scans of a target's address space with PAGEMAP_SCAN (Linux 6.7+).

A :class:`PagemapScanner` owns an open ``/proc/PID/pagemap`` and one
preallocated ctypes vector of ``page_region``. Its scans are generators that
yield *batches*: a ``memoryview`` of format ``'Q'`` and shape ``(n, 3)``
(rows of ``start, end, categories``, ``end`` exclusive) laid directly over
that vector. Memory stays bounded by ``vec_len`` whatever the size of the
target; in exchange a batch is only valid until the generator is resumed:
copy it (``bytes(batch)`` / ``batch.tolist()``) if you need to keep it.

Pagination (see shared/KERNEL.md): the scan resumes from ``walk_end`` only
when the vector came back full or the ``max_pages`` budget was reached. When
a walk ends with more than 512 regions the kernel leaves ``walk_end`` at its
last internal bounce-buffer refill, not at ``end``: resuming from there would
scan the tail twice.

Regions of adjacent VMAs with equal categories can be merged by the kernel,
so the per-VMA scans (:meth:`PagemapScanner.scan_vmas`) call the ioctl once
per VMA at least (about 1.5 µs a call): every batch belongs to one VMA.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
from collections.abc import Iterable, Iterator

from ..errors import CheckpointError, KernelFeatureError, NoSuchProcess, PermissionDenied
from ..kernel.pagemap import (
    PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SOFT_DIRTY, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, page_region, pagemap_scan, pm_scan_arg,
)
from ..kernel.procfs import PAGE_SIZE, Vma

__all__ = [
    "PagemapScanner", "probe_pagemap_scan", "batch_pages", "batch_rows", "empty_batch",
    "make_batch", "scannable", "pagemap_runs", "PM_BYTE_PRESENT", "PAGE_SHIFT",
    "DEFAULT_VEC_LEN", "PRESENT_ANY", "PRESENT_RETURN",
]

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
DEFAULT_VEC_LEN = 1024  # 24 KiB of page_region
PRESENT_ANY = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
PRESENT_RETURN = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO

# [vsyscall] sits above TASK_SIZE: PAGEMAP_SCAN rejects it (and os.pread cannot
# address it); [vvar]/[vvar_vclock] are VM_PFNMAP with nothing to report.
_UNSCANNABLE = ("[vsyscall]", "[vvar]", "[vvar_vclock]")


def scannable(vma: Vma) -> bool:
    """Whether a VMA can be given to PAGEMAP_SCAN at all."""
    return vma.path not in _UNSCANNABLE and vma.end <= 1 << 47


# --------------------------------------------------------------------------
# batches: memoryviews 'Q' of shape (n, 3)


def batch_rows(batch: memoryview) -> int:
    return batch.shape[0] if batch.ndim == 2 else len(batch) // 3


def _flat(batch: memoryview) -> memoryview:
    return batch if batch.ndim == 1 else batch.cast("B").cast("Q")


def batch_pages(batch: memoryview) -> int:
    """Number of pages in a batch: sum(end) - sum(start), no Python loop per
    region (see :func:`_rows_pages`)."""
    n = batch_rows(batch)
    return _rows_pages(_flat(batch), n) if n else 0


_U64 = (1 << 64) - 1
_FOLD_MIN_ROWS = 128  # below this, sum() over the two columns is cheaper
_FOLD_MASKS: dict[int, int] = {}


def _rows_pages(flat: memoryview, n: int) -> int:
    """Pages in the first ``n`` rows of a flat 'Q' view of (start, end, cat).

    Small batches: ``sum(ends) - sum(starts)`` (one Python int per value).
    Large ones (about 30 % faster at 1,024 rows): the two columns become two
    integers in base 2**64, ``D = ends - starts``, whose base-2**64 digits
    are exactly the region lengths (each ``end > start``: no borrow); their
    sum is ``D mod (2**64 - 1)``, found by folding ``D`` in halves on digit
    boundaries (``hi * B**h + lo == hi + lo`` mod ``B - 1``). The total is
    below ``2**64 - 1`` (disjoint ranges of a 64-bit space), so it is exact.
    """
    if n < _FOLD_MIN_ROWS:
        return (sum(flat[1:3 * n:3]) - sum(flat[0:3 * n:3])) >> PAGE_SHIFT
    d = (int.from_bytes(flat[1:3 * n:3].tobytes(), "little")
         - int.from_bytes(flat[0:3 * n:3].tobytes(), "little"))
    k = n  # d < 2**(64 * k)
    while k > 1:
        sh = (k >> 1) << 6
        m = _FOLD_MASKS.get(sh)
        if m is None:
            m = _FOLD_MASKS[sh] = (1 << sh) - 1
        d = (d >> sh) + (d & m)
        k = max(k - (k >> 1), (d.bit_length() + 63) >> 6)
    while d > _U64:
        d = (d >> 64) + (d & _U64)
    return d >> PAGE_SHIFT


def make_batch(rows: Iterable[tuple[int, int, int]] | bytes | bytearray) -> memoryview:
    """A batch (n, 3) from rows or from packed native u64 triples (tests, trackers)."""
    import array
    if isinstance(rows, (bytes, bytearray)):
        a = array.array("Q")
        a.frombytes(rows)
    else:
        a = array.array("Q", [x for row in rows for x in row])
    if len(a) % 3:
        raise ValueError("a batch holds whole (start, end, categories) triples")
    n = len(a) // 3
    if n == 0:
        return empty_batch()
    return memoryview(a).cast("B").cast("Q", (n, 3))


def empty_batch() -> memoryview:
    """An empty batch (1-D, length 0: memoryview cannot have a 0 in its shape)."""
    return memoryview(b"").cast("Q")


# --------------------------------------------------------------------------
# probe


@functools.cache
def probe_pagemap_scan() -> None:
    """Raise KernelFeatureError unless PAGEMAP_SCAN works (on our own pagemap)."""
    vec = (page_region * 1)()
    arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg), flags=0, start=0, end=PAGE_SIZE,
                      walk_end=0, vec=ctypes.addressof(vec), vec_len=1, max_pages=0,
                      category_inverted=0, category_mask=PAGE_IS_PRESENT,
                      category_anyof_mask=0, return_mask=PAGE_IS_PRESENT)
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        pagemap_scan(fd, arg)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP):
            raise KernelFeatureError(
                "PAGEMAP_SCAN not supported, kernel < 6.7 "
                f"(ioctl on /proc/self/pagemap: {os.strerror(exc.errno)})") from None
        raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# the scanner


class PagemapScanner:
    """PAGEMAP_SCAN over one process, with one reused output vector.

    ``with PagemapScanner(pid, vec_len=1024) as s: for batch in s.scan(a, b, ...)``
    """

    def __init__(self, pid: int, vec_len: int = DEFAULT_VEC_LEN, *, probe: bool = True,
                 max_pages: int = 0):
        if vec_len < 1:
            raise ValueError("vec_len must be >= 1")
        if probe:
            probe_pagemap_scan()
        self._probed = probe  # then EINVAL means bad arguments, not an old kernel
        self.pid = pid
        self.vec_len = vec_len
        self.max_pages = max_pages  # default page budget per ioctl call (0: none)
        self._vec = (page_region * vec_len)()
        self._flat = memoryview(self._vec).cast("B").cast("Q")
        self._arg = pm_scan_arg(size=ctypes.sizeof(pm_scan_arg),
                                vec=ctypes.addressof(self._vec), vec_len=vec_len)
        self.calls = 0  # ioctl calls made (for tests and benchmarks)
        path = f"/proc/{pid}/pagemap"
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error(exc, path) from None

    # -- lifetime
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PagemapScanner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _error(self, exc: OSError, what: str) -> Exception:
        e = exc.errno
        if e in (errno.ESRCH, errno.ENOENT):
            if what.startswith("range"):  # the pagemap was open: it exited since
                return NoSuchProcess(f"process {self.pid} exited during a PAGEMAP_SCAN "
                                     f"({what}): its memory is gone", self.pid)
            return NoSuchProcess(f"process {self.pid} does not exist ({what})", self.pid)
        if e in (errno.EACCES, errno.EPERM) and what.endswith("/pagemap"):
            return PermissionDenied(f"not permitted to open {what}", self.pid)
        if e == errno.EINVAL and self._probed:
            return CheckpointError(f"PAGEMAP_SCAN on process {self.pid} rejected its arguments "
                                   f"({what}: {os.strerror(e)})")
        if e in (errno.EINVAL, errno.ENOTTY):
            return KernelFeatureError(
                f"PAGEMAP_SCAN rejected by the kernel on process {self.pid} ({what}: "
                f"{os.strerror(e)}); PAGEMAP_SCAN needs Linux >= 6.7")
        return CheckpointError(f"PAGEMAP_SCAN on process {self.pid} failed ({what}): "
                               f"{os.strerror(e) if e else exc}")

    # -- the ioctl loop
    def scan(self, start: int, end: int, *, category_mask: int = 0,
             category_anyof_mask: int = 0, category_inverted: int = 0,
             return_mask: int = PRESENT_RETURN, flags: int = 0,
             max_pages: int | None = None) -> Iterator[memoryview]:
        """Yield batches over ``[start, end)`` until the range is done.

        ``max_pages`` is the per-call page budget (0: none); pagination resumes
        at ``walk_end`` only after a full vector or an exhausted budget.
        Batches are views over the scanner's vector: valid until the next one.

        ``start`` and ``end`` must be page-aligned (ValueError otherwise): the
        kernel rejects an unaligned start but silently rounds an unaligned
        end *up*, which would report, and with WP_MATCHING write-protect, a
        page outside the range asked for. ``start >= end`` yields nothing.
        """
        if (start | end) & (PAGE_SIZE - 1):
            raise ValueError(f"PAGEMAP_SCAN range {start:#x}-{end:#x} of process {self.pid} "
                             f"is not page-aligned ({PAGE_SIZE} bytes)")
        if flags & PM_SCAN_CHECK_WPASYNC:
            raise ValueError("PM_SCAN_CHECK_WPASYNC loses dirty state on EPERM: "
                             "scan uffd-wp registered ranges with WP_MATCHING alone")
        if start >= end:
            return
        if max_pages is None:
            max_pages = self.max_pages
        arg, flat, vec_len = self._arg, self._flat, self.vec_len
        arg.flags = flags
        arg.max_pages = max_pages
        arg.category_inverted = category_inverted
        arg.category_mask = category_mask
        arg.category_anyof_mask = category_anyof_mask
        arg.return_mask = return_mask
        fd = self.fd
        while start < end:
            arg.start, arg.end, arg.walk_end = start, end, 0
            try:
                n = pagemap_scan(fd, arg)
            except OSError as exc:
                raise self._error(exc, f"range {start:#x}-{end:#x}") from None
            self.calls += 1
            if n:
                yield flat[: 3 * n].cast("B").cast("Q", (n, 3))
            if n == vec_len:
                pass  # vector full: walk_end is exact
            elif max_pages and n and self._budget_reached(flat, n, max_pages):
                pass  # budget reached: walk_end is exact
            else:
                return  # the range is done (walk_end may lie here)
            walk_end = arg.walk_end
            if walk_end <= start:  # never loop in place
                raise CheckpointError(
                    f"PAGEMAP_SCAN made no progress at {start:#x} in process {self.pid}")
            start = walk_end

    @staticmethod
    def _budget_reached(flat: memoryview, n: int, max_pages: int) -> bool:
        """Whether ``n`` regions hold ``max_pages`` pages (they never hold
        more). O(1) when the answer follows from ``n`` (a region is at least
        one page) or from the span of the batch; else the exact count."""
        if n >= max_pages:
            return True
        if (flat[3 * n - 2] - flat[0]) >> PAGE_SHIFT < max_pages:
            return False
        return _rows_pages(flat, n) >= max_pages

    def scan_vmas(self, vmas: Iterable[Vma], **kw) -> Iterator[tuple[Vma, memoryview]]:
        """``scan()`` each scannable VMA in turn; yields ``(vma, batch)``."""
        for vma in vmas:
            if scannable(vma):
                for batch in self.scan(vma.start, vma.end, **kw):
                    yield vma, batch

    # -- the usual scans
    def present(self, start: int, end: int, **kw) -> Iterator[memoryview]:
        """Every page with content: present or swapped; zero-page ones carry PFNZERO."""
        return self.scan(start, end, category_anyof_mask=PRESENT_ANY,
                         return_mask=kw.pop("return_mask", PRESENT_RETURN), **kw)

    def soft_dirty(self, start: int, end: int, **kw) -> Iterator[memoryview]:
        return self.scan(start, end, category_mask=PAGE_IS_SOFT_DIRTY,
                         return_mask=kw.pop("return_mask", PRESENT_RETURN | PAGE_IS_SOFT_DIRTY),
                         **kw)

    def holes(self, start: int, end: int, **kw) -> Iterator[memoryview]:
        """Pages neither present nor swapped (never touched, or zapped)."""
        return self.scan(start, end, category_mask=PRESENT_ANY,
                         category_inverted=PRESENT_ANY, return_mask=PRESENT_ANY, **kw)

    def written(self, start: int, end: int, **kw) -> Iterator[memoryview]:
        """Pages written since the last uffd-wp get-and-clear (read only, nothing cleared)."""
        return self.scan(start, end, category_mask=PAGE_IS_WRITTEN,
                         return_mask=kw.pop("return_mask", PAGE_IS_WRITTEN), **kw)

    def wp_get_and_clear(self, start: int, end: int, *,
                         max_pages: int | None = None) -> Iterator[memoryview]:
        """Atomically report the pages written since the last call and
        write-protect them again (uffd-wp async tracking).

        Only for ranges registered with UFFDIO_REGISTER_MODE_WP on a
        WP_ASYNC uffd: call it per registered VMA (or run of them). Uses the
        kernel's fast path, ``category_mask == return_mask == PAGE_IS_WRITTEN``
        and never PM_SCAN_CHECK_WPASYNC (which fails half-way with EPERM after
        having cleared the first part). Every region's categories are
        PAGE_IS_WRITTEN: zapped (MADV_DONTNEED) pages are reported too. Tell
        them apart with a non-clearing scan *before* this one (WRITTEN and
        not PRESENT, e.g. :meth:`holes`): after the clear they carry uffd-wp
        pte markers and read as SWAPPED, not PRESENT.
        """
        return self.scan(start, end, flags=PM_SCAN_WP_MATCHING,
                         category_mask=PAGE_IS_WRITTEN, return_mask=PAGE_IS_WRITTEN,
                         max_pages=max_pages)


# --------------------------------------------------------------------------
# classic /proc/PID/pagemap entries (kernels without PAGEMAP_SCAN)

# Byte 7 of a little-endian entry holds bits 56..63, byte 6 bits 48..55.
PM_BYTE_PRESENT = 0x80  # bit 63, byte 7
PM_BYTE_SWAP = 0x40  # bit 62, byte 7
PM_BYTE_FILE = 0x20  # bit 61, byte 7
PM_BYTE_SOFT_DIRTY = 0x80  # bit 55, byte 6

_RUN = re.compile(b"\x01+")


def _table(pred) -> bytes:
    return bytes(1 if pred(b) else 0 for b in range(256))


_T_SOFT_DIRTY = _table(lambda b: b & PM_BYTE_SOFT_DIRTY)
_T_PRESENT = _table(lambda b: b & (PM_BYTE_PRESENT | PM_BYTE_SWAP))
_T_HOLE = _table(lambda b: not b & (PM_BYTE_PRESENT | PM_BYTE_SWAP))
_T_RAM = _table(lambda b: b & PM_BYTE_PRESENT)
# private content: an anonymous (COW'd) page in RAM, or swapped
_T_PRIVATE = _table(lambda b: (b & PM_BYTE_PRESENT and not b & PM_BYTE_FILE) or b & PM_BYTE_SWAP)
_T_NOT_PRIVATE = _table(lambda b: not ((b & PM_BYTE_PRESENT and not b & PM_BYTE_FILE)
                                       or b & PM_BYTE_SWAP))
_BYTE7 = {"present": _T_PRESENT, "hole": _T_HOLE, "ram": _T_RAM,
          "private": _T_PRIVATE, "not-private": _T_NOT_PRIVATE}


def pagemap_runs(entries: bytes | bytearray | memoryview, base: int, what: str,
                 soft_dirty: bool = False) -> list[tuple[int, int]]:
    """Runs ``(start, end)`` of pages in a buffer of classic pagemap entries
    (8 bytes a page, the first for address ``base``) matching ``what``:
    ``"present"`` (bit 63 or swapped, bit 62), ``"ram"`` (bit 63),
    ``"hole"`` (neither), ``"private"`` (in RAM and not a file page (bit 61),
    or swapped), ``"not-private"``; ``soft_dirty=True`` also requires bit 55.

    One C pass per byte column (``bytes[k::8]``, ``translate``, an ``&`` of
    two ints, a regex): the Python work is per run, not per page."""
    mv = memoryview(entries).cast("B")
    if len(mv) % 8:
        raise ValueError("pagemap buffer must hold whole 8-byte entries")
    flags = bytes(mv[7::8]).translate(_BYTE7[what])
    if soft_dirty:
        sd = bytes(mv[6::8]).translate(_T_SOFT_DIRTY)
        n = len(flags)
        flags = (int.from_bytes(flags, "little") & int.from_bytes(sd, "little")).to_bytes(n, "little")
    return [(base + (m.start() << PAGE_SHIFT), base + (m.end() << PAGE_SHIFT))
            for m in _RUN.finditer(flags)]


def read_pagemap_entries(fd: int, start: int, end: int, buf: bytearray) -> Iterator[tuple[int, memoryview]]:
    """Read classic entries for ``[start, end)`` in chunks of ``len(buf)``
    bytes; yields ``(chunk_start_address, entries_view)``."""
    per = len(buf) // 8
    mv = memoryview(buf)
    addr = start
    while addr < end:
        n = min(per, (end - addr) >> PAGE_SHIFT)
        got = os.preadv(fd, [mv[: n * 8]], (addr >> PAGE_SHIFT) * 8)
        if got <= 0:
            return
        got -= got % 8
        yield addr, mv[:got]
        addr += (got // 8) << PAGE_SHIFT
