"""One interface for every dirty-page tracker, and the registry that picks one.

A tracker answers, once per round and for a *frozen* target, "which pages
must go into this layer?". The dumper drives it like this::

    tracker = choose_tracker("auto")()         # or HashTracker.from_state(saved)
    reason = tracker.full_reason(pid)          # None: this layer may be incremental
    for batch in tracker.collect(pid, vmas):   # DirtyBatch(vma, regions)
        ...write batch.regions into the layer...
    tracker.arm(pid, vmas)                     # same freeze, after the layer is safe:
                                               # the next round counts from here
    saved = tracker.state_bytes()              # keep it beside the layer (may be b"")

``regions`` is a batch as yielded by :mod:`.scan`: a ``memoryview`` ``'Q'``
of shape ``(n, 3)``: ``start, end (exclusive), flags``, valid until the
generator is resumed. In ``flags`` only :data:`REGION_ZERO` has a meaning for
the dumper: the pages have no data of their own (anonymous memory reads as
zero; a private file mapping shows its file again): record them as zero,
do not read them. Every other region holds data to read from the target.

What a round reports, per VMA:
- a full round (``full_reason`` not None: first round, exec, tracker lost,
  ``reset``) and any VMA new since the last round: every page with private
  content (present or swapped; in a private file mapping only the COW'd ones);
- otherwise the pages written since the last ``arm``, and the pages that lost
  their content (``MADV_DONTNEED``...) as zero.

Trackers register by name in :data:`TRACKERS`; ``uffd-wp``
(``checkpoint/tracking/uffd_wp.py``) registers itself when imported, and
:func:`choose_tracker` imports it on demand.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import ClassVar, NamedTuple

from ..errors import ImageError, KernelFeatureError, NoSuchProcess, UsageError
from ..kernel.pagemap import PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED
from ..kernel.procfs import Vma, parse_auxv
from .scan import PagemapScanner, scannable

REGION_ZERO = PAGE_IS_PFNZERO  # flags bit: "no data of its own", record as zero
REGION_DATA = 0


class DirtyBatch(NamedTuple):
    vma: Vma
    regions: memoryview  # 'Q' (n, 3): start, end, flags (REGION_ZERO or data)


def trackable(vma: Vma) -> bool:
    """VMAs whose pages a tracker looks at ([vsyscall], [vvar]... are not)."""
    return scannable(vma)


def content_scan_kw(vma: Vma) -> dict:
    """PAGEMAP_SCAN masks for "pages with content of this mapping's own":
    present or swapped; in a private mapping not a page-cache (file) page,
    so unwritten pages of a private file mapping are not dumped. The
    regions come back with only PAGE_IS_PFNZERO (== REGION_ZERO) kept, so
    runs merge as much as possible."""
    if vma.shared:
        return dict(category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    return_mask=PAGE_IS_PFNZERO)
    return dict(category_mask=PAGE_IS_FILE, category_inverted=PAGE_IS_FILE,
                category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask=PAGE_IS_PFNZERO)


def no_content_scan_kw(vma: Vma) -> dict:
    """Masks for the complement of :func:`content_scan_kw` in a private
    mapping: not swapped and (not present or a file page)."""
    if vma.shared:
        raise ValueError("no content-loss scan for shared mappings")
    return dict(category_inverted=PAGE_IS_SWAPPED | PAGE_IS_PRESENT,
                category_mask=PAGE_IS_SWAPPED,
                category_anyof_mask=PAGE_IS_PRESENT | PAGE_IS_FILE,
                return_mask=0)


AT_RANDOM = 25


def mm_identity(pid: int) -> bytes:
    """Changes when the process execs (a new mm): the AT_RANDOM pointer of
    the auxv and the 16 random bytes the kernel put there."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            auxv = dict(parse_auxv(f.read()))
        ptr = auxv.get(AT_RANDOM, 0)
        data = b""
        if ptr:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, 16, ptr)
            finally:
                os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            raise NoSuchProcess(f"process {pid} does not exist (reading its auxv)", pid) from None
        raise
    return ptr.to_bytes(8, "little") + data


def vma_key(vma: Vma) -> tuple:
    return (vma.start, vma.end, vma.inode, vma.offset, vma.perms[3])


class Tracker(ABC):
    """Base of every tracker; see the module docstring for the protocol."""

    name: ClassVar[str]
    #: whether each layer holds only changes (False: every layer is full)
    incremental: ClassVar[bool] = True

    def __init__(self, *, vec_len: int = 1024):
        self.vec_len = vec_len
        self.max_pages = 0  # PAGEMAP_SCAN page budget per call (--max-pages)
        self._reason: str | None = "first round"
        self._mm: bytes | None = None
        self._vmas: set[tuple] = set()  # vma_key of the VMAs seen at the last arm
        #: vma_key of the VMAs the last collect() reported whole (cleared by the caller)
        self.whole_vmas: set[tuple] = set()

    # -- availability
    @classmethod
    def probe(cls) -> str | None:
        """None when the tracker works on this kernel, else why not."""
        return None

    # -- round protocol
    def bind(self, proc) -> None:
        """Called by the dumper with the FrozenProcess of each round, before
        ``collect``; trackers that inject into the target keep it."""

    def full_reason(self, pid: int) -> str | None:
        """Why the coming round must be a full layer, or None."""
        if self._reason is None and self._mm is not None and mm_identity(pid) != self._mm:
            self._reason = "exec detected (the address space was replaced)"
        return self._reason

    def reset(self, reason: str) -> None:
        """Forget every baseline: the next round is full, for ``reason``."""
        self._reason = reason
        self._vmas = set()

    @abstractmethod
    def collect(self, pid: int, vmas: Iterable[Vma]) -> Iterator[DirtyBatch]:
        """Yield what this round's layer must hold (target frozen)."""

    def arm(self, pid: int, vmas: Iterable[Vma]) -> None:
        """Start counting from now (same freeze, after the layer was taken)."""
        self._mm = mm_identity(pid)
        self._vmas = {vma_key(v) for v in vmas}
        self._reason = None

    def lost(self, ranges: Iterable[tuple[int, int]]) -> None:
        """The layer just written lacks the pages of ``ranges`` ((start, end)
        pairs the tracker reported but that vanished before they were read,
        i.e. the program unmapped them after the thaw): the next round must
        report every VMA they touch whole. Called before ``state_bytes``."""
        ranges = list(ranges)
        self._vmas = {k for k in self._vmas
                      if not any(s < k[1] and k[0] < e for s, e in ranges)}

    def is_new(self, vma: Vma) -> bool:
        return vma_key(vma) not in self._vmas

    def state_bytes(self) -> bytes:
        """State to keep beside the layer, so that a later engine run can go
        on incrementally: the mm identity and the VMAs seen at the last arm
        (trackers with more state extend it)."""
        return json.dumps({"tracker": self.name, "mm": (self._mm or b"").hex(),
                           "armed": self._reason is None,
                           "vmas": sorted(list(k) for k in self._vmas)}).encode()

    @classmethod
    def from_state(cls, data: bytes, **kw) -> "Tracker":
        try:
            d = json.loads(data)
            if d.get("tracker") != cls.name:
                raise ValueError(f"state of tracker {d.get('tracker')!r}, not {cls.name!r}")
            t = cls(**kw)
            t._mm = bytes.fromhex(d["mm"]) or None
            t._vmas = {tuple(k) for k in d["vmas"]}
            t._reason = None if d["armed"] else "first round"
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"corrupt {cls.name} tracker state: {exc}") from None
        return t

    # -- helpers for subclasses
    def _content(self, scanner: PagemapScanner, vma: Vma) -> Iterator[DirtyBatch]:
        """Every page with content of ``vma`` (the VMA is reported whole:
        noted in :attr:`whole_vmas`, so the dumper can mark the rest of it
        as having no content and stale pages of older layers never show)."""
        self.whole_vmas.add(vma_key(vma))
        for batch in scanner.scan(vma.start, vma.end, **content_scan_kw(vma)):
            yield DirtyBatch(vma, batch)


class FullTracker(Tracker):
    """Every page with content, every round (no baseline)."""

    name = "full"
    incremental = False

    def full_reason(self, pid: int) -> str | None:
        return "full tracker: every layer is full"

    def collect(self, pid: int, vmas: Iterable[Vma]) -> Iterator[DirtyBatch]:
        with PagemapScanner(pid, self.vec_len, max_pages=self.max_pages) as scanner:
            for vma in vmas:
                if trackable(vma):
                    yield from self._content(scanner, vma)

    @classmethod
    def probe(cls) -> str | None:
        from .scan import probe_pagemap_scan
        try:
            probe_pagemap_scan()
        except KernelFeatureError as exc:
            return str(exc)
        return None


# --------------------------------------------------------------------------
# registry

TRACKERS: dict[str, type[Tracker]] = {}
AUTO_ORDER = ("uffd-wp", "soft-dirty", "hash", "full")
# modules that register a tracker when imported (name -> module)
_MODULES = {"uffd-wp": "checkpoint.tracking.uffd_wp",
            "soft-dirty": "checkpoint.tracking.softdirty",
            "hash": "checkpoint.tracking.hashing"}


def register(cls: type[Tracker]) -> type[Tracker]:
    """Class decorator: make a tracker choosable by its ``name``."""
    TRACKERS[cls.name] = cls
    return cls


register(FullTracker)


def _load(name: str) -> type[Tracker] | None:
    if name not in TRACKERS and name in _MODULES:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError:
            return None
    return TRACKERS.get(name)


def tracker_status() -> dict[str, str | None]:
    """name -> None (available) or why not; for ``checkpoint check``."""
    out: dict[str, str | None] = {}
    for name in dict.fromkeys((*AUTO_ORDER, *TRACKERS)):
        cls = _load(name)
        out[name] = "not implemented in this build" if cls is None else cls.probe()
    return out


def choose_tracker(name: str = "auto") -> type[Tracker]:
    """The tracker class for ``name``, or the best available for ``"auto"``
    (uffd-wp > soft-dirty > hash > full). Raises KernelFeatureError when the
    named one cannot work here, UsageError for an unknown name."""
    if name == "auto":
        why = {}
        for cand in AUTO_ORDER:
            cls = _load(cand)
            reason = "not implemented in this build" if cls is None else cls.probe()
            if reason is None:
                return cls
            why[cand] = reason
        raise KernelFeatureError("no dirty-page tracker works here: " +
                                 "; ".join(f"{k}: {v}" for k, v in why.items()))
    cls = _load(name)
    if cls is None:
        known = ", ".join(dict.fromkeys((*AUTO_ORDER, *TRACKERS)))
        raise UsageError(f"unknown dirty-page tracker {name!r} (known: auto, {known})")
    reason = cls.probe()
    if reason is not None:
        raise KernelFeatureError(f"tracker {name!r} cannot work on this kernel: {reason}")
    return cls
