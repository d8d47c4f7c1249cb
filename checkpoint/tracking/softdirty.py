"""The "soft-dirty" tracker: the kernel's soft-dirty PTE bit
(CONFIG_MEM_SOFT_DIRTY), cleared by writing "4" to /proc/PID/clear_refs.

Read with PAGEMAP_SCAN (PAGE_IS_SOFT_DIRTY) where the ioctl exists, else
from the classic /proc/PID/pagemap entries (bit 55). No state is kept
between rounds beyond the VMA set: pages that lost their content (zapped by
MADV_DONTNEED, which also drops their soft-dirty bit) are reported as zero
every incremental round (private mappings only; a shared mapping is
reported whole, its pages can change through other mappings).

This kernel (6.18 here) has CONFIG_MEM_SOFT_DIRTY off: :meth:`probe` says so
and ``choose_tracker("auto")`` moves on.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

from ..errors import CheckpointError, KernelFeatureError, NoSuchProcess
from ..kernel.pagemap import PAGE_IS_SOFT_DIRTY, PM_SOFT_DIRTY
from ..kernel.procfs import PAGE_SIZE, Vma, open_proc_fd
from . import parked
from .base import REGION_ZERO, DirtyBatch, Tracker, content_scan_kw, no_content_scan_kw, register, trackable
from .scan import PagemapScanner, make_batch, pagemap_runs, probe_pagemap_scan, read_pagemap_entries

CLEAR_SOFT_DIRTY = b"4"


@functools.cache
def soft_dirty_probe() -> str | None:
    """None when soft-dirty works: a page written after clear_refs "4" must
    show bit 55 in /proc/self/pagemap. Otherwise the reason."""
    try:
        return _probe_self()
    except OSError as exc:
        return f"soft-dirty probe failed: {exc}"


def _probe_self(pagemap_path: str = "/proc/self/pagemap",
                clear_refs_path: str = "/proc/self/clear_refs") -> str | None:
    m = mmap.mmap(-1, PAGE_SIZE)
    try:
        c = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(c)
        del c  # release the buffer export so m can be closed
        m[0] = 1  # fault in: a new page is soft-dirty when the feature is on
        entry = _entry(pagemap_path, addr)
        if not entry & PM_SOFT_DIRTY:
            return ("CONFIG_MEM_SOFT_DIRTY is off in this kernel "
                    f"(bit 55 of {pagemap_path} never sets on a written page)")
        with open(clear_refs_path, "wb") as f:
            f.write(CLEAR_SOFT_DIRTY)
        if _entry(pagemap_path, addr) & PM_SOFT_DIRTY:
            return "clear_refs \"4\" does not clear soft-dirty bits here"
        m[0] = 2
        if not _entry(pagemap_path, addr) & PM_SOFT_DIRTY:
            return "a page written after clear_refs \"4\" did not turn soft-dirty"
        return None
    finally:
        m.close()


def _entry(path: str, addr: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("<Q", os.pread(fd, 8, (addr // PAGE_SIZE) * 8))[0]
    finally:
        os.close(fd)


@register
class SoftDirtyTracker(parked.TagState, Tracker):
    """With a frozen process bound (the dumper's rounds), a tag is parked in
    the target and advanced before each clear_refs (tracking/parked.py), so
    a round that dies after clearing and before publishing makes the next
    layer full, and a second chain clearing the bits is noticed. Unbound
    (a bare collect/arm loop in one process) it keeps no tag."""

    name = "soft-dirty"

    def __init__(self, *, vec_len: int = 1024, use_ioctl: bool | None = None,
                 pagemap_buffer: int = 512 << 10):
        super().__init__(vec_len=vec_len)
        self.proc = None
        self._init_tag()
        if use_ioctl is None:
            try:
                probe_pagemap_scan()
                use_ioctl = True
            except KernelFeatureError:
                use_ioctl = False
        self.use_ioctl = use_ioctl
        self._pmbuf = bytearray(pagemap_buffer - pagemap_buffer % 8)

    @classmethod
    def probe(cls) -> str | None:
        return soft_dirty_probe()

    def bind(self, proc) -> None:
        self.proc = proc
        self._in_flight = False

    def full_reason(self, pid: int) -> str | None:
        reason = super().full_reason(pid)
        if reason is None and self.proc is not None:
            why = self._check_tag(pid)
            if why is not None:
                self.reset(why)
        return self._reason

    def collect(self, pid: int, vmas: Iterable[Vma]) -> Iterator[DirtyBatch]:
        vmas = [v for v in vmas if trackable(v)]
        full = self.full_reason(pid) is not None
        if self.use_ioctl:
            with PagemapScanner(pid, self.vec_len, max_pages=self.max_pages) as scanner:
                for vma in vmas:
                    if full or vma.shared or self.is_new(vma):
                        yield from self._content(scanner, vma)
                        continue
                    kw = content_scan_kw(vma)
                    kw["category_mask"] |= PAGE_IS_SOFT_DIRTY
                    for batch in scanner.scan(vma.start, vma.end, **kw):
                        yield DirtyBatch(vma, batch)
                    kw = no_content_scan_kw(vma)
                    kw["return_mask"] = REGION_ZERO
                    for batch in scanner.scan(vma.start, vma.end, **kw):
                        # categories come back 0 (a hole is never PFNZERO): mark zero
                        yield DirtyBatch(vma, _mark_zero(batch))
        else:
            yield from self._collect_classic(pid, vmas, full)

    def _collect_classic(self, pid: int, vmas: list[Vma], full: bool) -> Iterator[DirtyBatch]:
        fd = open_proc_fd(pid, "pagemap")
        try:
            for vma in vmas:
                whole = full or vma.shared or self.is_new(vma)
                for base, entries in read_pagemap_entries(fd, vma.start, vma.end, self._pmbuf):
                    yield from classic_batches(vma, entries, base, whole)
        finally:
            os.close(fd)

    def arm(self, pid: int, vmas: Iterable[Vma]) -> None:
        if self.proc is not None:
            if self._reason is not None or self._check_tag(pid) is not None:
                found = parked.find_parked(pid, self.name)
                if found is not None:   # take it over: our token from now on
                    self.tag_fd = found.tag_fd
                else:
                    from ..inject import Injector
                    with Injector(self.proc, self.proc.pid if self.proc.pid in self.proc.threads
                                  else self.proc.tids[0]) as remote:
                        self._park_new_tag(remote)
            self._advance(pid)  # in flight before the bits are cleared
        try:
            with open(f"/proc/{pid}/clear_refs", "wb") as f:
                f.write(CLEAR_SOFT_DIRTY)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise NoSuchProcess(f"process {pid} does not exist", pid) from None
            raise CheckpointError(f"cannot clear soft-dirty bits of process {pid}: "
                                  f"{exc.strerror}") from None
        super().arm(pid, vmas)


    def state_bytes(self) -> bytes:
        import json
        d = json.loads(super().state_bytes())
        return json.dumps({**d, **self._tag_state()}).encode()

    @classmethod
    def from_state(cls, data: bytes, **kw) -> "SoftDirtyTracker":
        import json
        t = super().from_state(data, **kw)
        try:
            t._load_tag_state(json.loads(data))
        except (ValueError, KeyError, TypeError):
            t.reset("the chain's soft-dirty state has no tracking tag (older engine)")
        return t


def _mark_zero(batch: memoryview) -> memoryview:
    rows = batch.tolist()
    return make_batch((s, e, REGION_ZERO) for s, e, _ in rows)


def classic_batches(vma: Vma, entries, base: int, whole: bool) -> Iterator[DirtyBatch]:
    """Dirty batches from a buffer of classic pagemap entries for pages
    starting at ``base`` inside ``vma`` (pure: tested on synthetic input).

    ``whole``: every page with content. Otherwise soft-dirty pages with
    content as data, pages without content (private mappings) as zero."""
    kind = "present" if vma.shared else "private"
    data = pagemap_runs(entries, base, kind, soft_dirty=not whole)
    rows = [(s, e, 0) for s, e in data]
    if not whole and not vma.shared:
        rows += [(s, e, REGION_ZERO) for s, e in pagemap_runs(entries, base, "not-private")]
        rows.sort()
    if rows:
        yield DirtyBatch(vma, make_batch(rows))
