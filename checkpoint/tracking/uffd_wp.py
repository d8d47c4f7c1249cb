"""The "uffd-wp" tracker: userfaultfd write-protect in WP_ASYNC mode, read and
cleared atomically with PAGEMAP_SCAN + PM_SCAN_WP_MATCHING.

Works without soft-dirty (this kernel, every arm64 kernel). The uffd must
live in the target's mm, so it is created by syscalls injected into the
frozen target (shared/KERNEL.md, "Dirty tracking with uffd-wp async"):

    userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)
    ioctl(uffd, UFFDIO_API, {WP_ASYNC|WP_UNPOPULATED})
    ioctl(uffd, UFFDIO_REGISTER, {vma, MODE_WP})       one per VMA

**Persistence between engine runs** (``pre-dump`` now, ``dump`` later, each a
separate process): the registration lives as long as any copy of the uffd is
open, so the uffd is *parked in the target* at a high fd (close-on-exec),
next to a small memfd named ``checkpoint-track`` holding the owner's token,
the round number and the uffd's fd number. The engine's state (kept beside
the layer) holds the same token and round. A round may be incremental only
when the target still holds both fds and the memfd says exactly what the
engine expects; otherwise — the target closed its fds, exec'd, a second
engine (another chain) took the tracking over, an older engine came back —
the round is full, with the reason recorded. The engine also keeps its own
copy of the uffd (``pidfd_getfd``) while it runs.

Per round and per VMA:
- a VMA new since the last round, or not (any more) WP-registered: every
  page with content, then it is registered for the next round;
- a VMA that cannot be registered ([vdso] & co. are not tracked at all;
  shared read-only file mappings give EPERM, other refusals EINVAL/EBUSY):
  every page with content, every round (the fallback of that VMA);
- otherwise: pages WRITTEN and not present (zapped by MADV_DONTNEED) as
  zero, then the atomic get-and-clear with the kernel's fast-path mask
  (``category_mask == return_mask == PAGE_IS_WRITTEN``) for the data.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator

from ..errors import CheckpointError, ImageError, InjectionError
from ..kernel import uffd as U
from ..kernel.pagemap import PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN
from ..kernel.procfs import Vma
from ..kernel.syscalls import pidfd_getfd, pidfd_open
from . import parked
from .base import (REGION_ZERO, DirtyBatch, Tracker, register,
                   trackable, vma_key)
from .scan import PagemapScanner, make_batch

TAG_NAME = parked.TAG_NAME
F_DUPFD_CLOEXEC = parked.F_DUPFD_CLOEXEC


@register
class UffdWpTracker(parked.TagState, Tracker):
    name = "uffd-wp"

    def __init__(self, *, vec_len: int = 1024):
        super().__init__(vec_len=vec_len)
        self.proc = None  # FrozenProcess, set by bind() for each freeze
        self._init_tag()
        self.uffd_fd = -1  # the parked uffd in the target
        self._engine_copy = -1  # our own copy of the uffd, while we run
        self._unregisterable: dict[tuple, str] = {}  # vma_key -> why (fallback: full content)

    @classmethod
    def probe(cls) -> str | None:
        from ..kerndat import probe_pagemap_scan, probe_uffd_wp_async
        for fn in (probe_pagemap_scan, probe_uffd_wp_async):
            ok, why = fn()
            if not ok:
                return why
        return None

    def bind(self, proc) -> None:
        """Give the tracker the frozen process of this round (for injection)."""
        self.proc = proc
        self._in_flight = False

    # -- validity of the parked state ----------------------------------------

    def full_reason(self, pid: int) -> str | None:
        reason = super().full_reason(pid)
        if reason is not None:
            return reason
        why = self._check_parked(pid)
        if why is not None:
            self.reset(why)
        return self._reason

    def _check_parked(self, pid: int) -> str | None:
        why = self._check_tag(pid)
        if why is None and (parked.fd_link(pid, self.uffd_fd) != parked.UFFD_LINK or
                            parked.read_tag(pid, self.tag_fd).get("uffd") != self.uffd_fd):
            why = "tracking state lost: the parked uffd was closed or replaced"
        return why

    def _tag(self) -> dict:
        return {**super()._tag(), "uffd": self.uffd_fd}

    # -- a round -----------------------------------------------------------

    def collect(self, pid: int, vmas: Iterable[Vma]) -> Iterator[DirtyBatch]:
        full = self.full_reason(pid) is not None
        with PagemapScanner(pid, self.vec_len, max_pages=self.max_pages) as scanner:
            for vma in vmas:
                if not trackable(vma):
                    continue
                if full or self.is_new(vma) or vma_key(vma) in self._unregisterable \
                        or not self._registered(scanner, vma):
                    yield from self._content(scanner, vma)
                    continue
                holes = [tuple(r) for b in scanner.scan(
                    vma.start, vma.end, category_mask=PAGE_IS_WRITTEN | PAGE_IS_PRESENT
                    | PAGE_IS_SWAPPED, category_inverted=PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                    return_mask=0) for r in b.tolist()]
                if holes:
                    yield DirtyBatch(vma, make_batch((s, e, REGION_ZERO) for s, e, _ in holes))
                self._advance(pid)  # in flight before anything is cleared (parked.py)
                for batch in scanner.wp_get_and_clear(vma.start, vma.end):
                    if holes:
                        batch = _subtract(batch, holes)
                        if batch is None:
                            continue
                    yield DirtyBatch(vma, batch)

    @staticmethod
    def _registered(scanner: PagemapScanner, vma: Vma) -> bool:
        """True when every page of the VMA is WP-async registered."""
        for _ in scanner.scan(vma.start, vma.end, category_mask=PAGE_IS_WPALLOWED,
                              category_inverted=PAGE_IS_WPALLOWED, return_mask=0,
                              max_pages=1):
            return False
        return True

    def arm(self, pid: int, vmas: Iterable[Vma]) -> None:
        """Register what is not yet registered, take the baseline of the new
        VMAs (everything on a full round), park the state. Same freeze as
        the layer it belongs to."""
        if self.proc is None or self.proc.pid != pid:
            raise CheckpointError("uffd-wp tracker: bind(frozen_process) before arm()")
        vmas = [v for v in vmas if trackable(v)]
        full = self._reason is not None
        from ..inject import Injector
        with Injector(self.proc, _injectable_tid(self.proc)) as remote:
            if full or self._check_parked(pid) is not None:
                self._create(remote)
            self._advance(pid)  # before the baselines clear anything
            with PagemapScanner(pid, self.vec_len, max_pages=self.max_pages) as scanner:
                todo = [v for v in vmas
                        if full or self.is_new(v) or not self._registered(scanner, v)]
                self._unregisterable = {k: w for k, w in self._unregisterable.items()
                                        if not full and any(vma_key(v) == k for v in vmas)}
                for v in todo:
                    why = self._register(remote, v)
                    if why is not None:
                        self._unregisterable[vma_key(v)] = why
                        continue
                    for _ in scanner.wp_get_and_clear(v.start, v.end):
                        pass  # baseline: the layer of this freeze holds these pages
        super().arm(pid, vmas)

    def _create(self, remote) -> None:
        """Take over the uffd parked by an earlier engine if the target holds
        one (a VMA can be registered with one uffd only), else park a fresh
        tag memfd and uffd at high fds of the target, the tag first (so a
        dying engine leaves recognisable fds: tracking/parked.py). Either way
        the tag gets our token: any other chain's next round will be full.
        The round counter only grows, so a lost round never matches."""
        pid = self.proc.pid
        self._close_engine_copy()
        self._unregisterable = {}
        self._in_flight = False
        found = parked.find_parked(pid, self.name)
        if found is not None and found.uffd_fd >= 0:
            self.tag_fd, self.uffd_fd = found.tag_fd, found.uffd_fd
            self._take_engine_copy(pid)
            return
        # (a uffd without its tag, or a tag whose uffd is gone, is left alone:
        # the target's fds are not ours to close; engine_fds() still knows them)
        self.uffd_fd = -1
        self._park_new_tag(remote)
        ufd = remote.call("userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
        try:
            api = U.uffdio_api(U.UFFD_API, U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED, 0)
            remote.write(remote.scratch, bytes(api))
            remote.call("ioctl", ufd, U.UFFDIO_API, remote.scratch)
            self.uffd_fd = remote.call("fcntl", ufd, F_DUPFD_CLOEXEC, self.tag_fd + 1)
        finally:
            remote.syscall("close", ufd)
        parked.write_tag(pid, self.tag_fd, self._tag())
        self._take_engine_copy(pid)

    def _register(self, remote, vma: Vma) -> str | None:
        reg = U.uffdio_register(U.uffdio_range(vma.start, vma.end - vma.start),
                                U.UFFDIO_REGISTER_MODE_WP, 0)
        remote.write(remote.scratch, bytes(reg))
        res = remote.syscall("ioctl", self.uffd_fd, U.UFFDIO_REGISTER, remote.scratch)
        if res == 0:
            return None
        if res == -errno.EPERM:
            return "EPERM: cannot write-protect this mapping (shared read-only file?)"
        if res == -errno.EBUSY:
            return "EBUSY: registered with another userfaultfd (the program's own?)"
        if -4096 < res < 0:
            return f"{errno.errorcode.get(-res, -res)}: {os.strerror(-res)}"
        raise InjectionError(f"UFFDIO_REGISTER returned {res}", self.proc.pid)

    def _take_engine_copy(self, pid: int) -> None:
        try:
            pidfd = pidfd_open(pid)
            try:
                self._engine_copy = pidfd_getfd(pidfd, self.uffd_fd)
            finally:
                os.close(pidfd)
        except OSError:
            self._engine_copy = -1  # the parked copy keeps the registration alive

    def _close_engine_copy(self) -> None:
        if self._engine_copy >= 0:
            os.close(self._engine_copy)
            self._engine_copy = -1

    def close(self) -> None:
        self._close_engine_copy()

    def __del__(self):
        try:
            self._close_engine_copy()
        except Exception:
            pass

    @property
    def unregisterable(self) -> dict[tuple, str]:
        """VMAs (by key) that fall back to full content each round, and why."""
        return dict(self._unregisterable)

    # -- persistence -------------------------------------------------------

    def state_bytes(self) -> bytes:
        return json.dumps({
            "tracker": self.name, **self._tag_state(), "uffd_fd": self.uffd_fd,
            "mm": (self._mm or b"").hex(), "armed": self._reason is None,
            "vmas": sorted(list(k) for k in self._vmas),
            "unregisterable": [[list(k), w] for k, w in self._unregisterable.items()],
        }).encode()

    @classmethod
    def from_state(cls, data: bytes, **kw) -> "UffdWpTracker":
        try:
            d = json.loads(data)
            if d.get("tracker") != cls.name:
                raise ValueError("not a uffd-wp state")
            t = cls(**kw)
            t._load_tag_state(d)
            t.uffd_fd = int(d["uffd_fd"])
            t._mm = bytes.fromhex(d["mm"]) or None
            t._vmas = {tuple(k) for k in d["vmas"]}
            t._unregisterable = {tuple(k): str(w) for k, w in d["unregisterable"]}
            t._reason = None if d["armed"] else "first round"
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"corrupt uffd-wp tracker state: {exc}") from None
        return t


def _injectable_tid(proc) -> int:
    return proc.pid if proc.pid in proc.threads else proc.tids[0]


def _subtract(batch: memoryview, holes: list[tuple]) -> memoryview | None:
    """Remove ``holes`` (sorted (start, end, _)) from the rows of ``batch``."""
    out = []
    for s, e, c in batch.tolist():
        for hs, he, _ in holes:
            if he <= s or hs >= e:
                continue
            if hs > s:
                out.append((s, hs, c))
            s = max(s, he)
            if s >= e:
                break
        if s < e:
            out.append((s, e, c))
    return make_batch(out) if out else None


__all__ = ["UffdWpTracker", "TAG_NAME"]
