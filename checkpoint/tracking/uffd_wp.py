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
import secrets
from collections.abc import Iterable, Iterator

from ..errors import CheckpointError, ImageError, InjectionError
from ..kernel import uffd as U
from ..kernel.pagemap import PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN
from ..kernel.procfs import Vma
from ..kernel.syscalls import pidfd_getfd, pidfd_open
from .base import (REGION_ZERO, DirtyBatch, Tracker, register,
                   trackable, vma_key)
from .scan import PagemapScanner, make_batch

TAG_NAME = "checkpoint-track"
F_DUPFD_CLOEXEC = 1030
MFD_CLOEXEC = 1
O_RDWR = 2


def _tag_link() -> str:
    return f"/memfd:{TAG_NAME} (deleted)"


@register
class UffdWpTracker(Tracker):
    name = "uffd-wp"

    def __init__(self, *, vec_len: int = 1024):
        super().__init__(vec_len=vec_len)
        self.proc = None  # FrozenProcess, set by bind() for each freeze
        self.token = secrets.token_hex(8)
        self.round = 0
        self.uffd_fd = -1  # parked fd numbers in the target
        self.tag_fd = -1
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
        tag = self._read_tag(pid, self.tag_fd)
        if tag is None:
            return "tracking state lost: the target no longer holds the parked uffd/tag fds"
        if tag.get("token") != self.token:
            return "tracking taken over by another engine or chain (token differs)"
        if tag.get("round") != self.round:
            return (f"tracking state is at round {tag.get('round')}, this chain at {self.round}"
                    " (another engine ran a round)")
        if _fd_link(pid, self.uffd_fd) != "anon_inode:[userfaultfd]" or \
                tag.get("uffd") != self.uffd_fd:
            return "tracking state lost: the parked uffd was closed or replaced"
        return None

    @staticmethod
    def _read_tag(pid: int, fd: int) -> dict | None:
        if fd < 0 or _fd_link(pid, fd) != _tag_link():
            return None
        try:
            with open(f"/proc/{pid}/fd/{fd}", "rb") as f:
                return json.loads(f.read(4096) or b"{}")
        except (OSError, ValueError):
            return None

    def _write_tag(self, pid: int) -> None:
        data = json.dumps({"token": self.token, "round": self.round,
                           "uffd": self.uffd_fd}).encode()
        try:
            fd = os.open(f"/proc/{pid}/fd/{self.tag_fd}", os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise CheckpointError(f"cannot update the tracking tag of process {pid}: "
                                  f"{exc.strerror}") from None
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

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
        VMAs (everything on a full round), park the state, bump the round.
        Same freeze as the layer it belongs to."""
        if self.proc is None or self.proc.pid != pid:
            raise CheckpointError("uffd-wp tracker: bind(frozen_process) before arm()")
        vmas = [v for v in vmas if trackable(v)]
        full = self._reason is not None
        from ..inject import Injector
        with Injector(self.proc, _injectable_tid(self.proc)) as remote:
            if full or self._check_parked(pid) is not None:
                self._create(remote)
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
            self.round += 1
            self._write_tag(pid)
        super().arm(pid, vmas)

    def _create(self, remote) -> None:
        """Take over the uffd parked by an earlier engine if the target holds
        one (a VMA can be registered with one uffd only), else park a fresh
        uffd and tag memfd at high fds of the target. Either way the tag gets
        our token: any other engine's next round will be full."""
        pid = self.proc.pid
        self._close_engine_copy()
        self._unregisterable = {}
        self.round = 0
        found = _find_parked(pid)
        if found is not None:
            self.uffd_fd, self.tag_fd = found
            self._take_engine_copy(pid)
            return
        # (an fd we parked before whose tag is gone is left alone: we cannot
        # prove it is still ours, and the target's fds are not ours to close)
        ufd = remote.call("userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK | U.UFFD_USER_MODE_ONLY)
        try:
            api = U.uffdio_api(U.UFFD_API, U.UFFD_FEATURE_WP_ASYNC | U.UFFD_FEATURE_WP_UNPOPULATED, 0)
            remote.write(remote.scratch, bytes(api))
            remote.call("ioctl", ufd, U.UFFDIO_API, remote.scratch)
            base = _high_fd_base(pid)
            self.uffd_fd = remote.call("fcntl", ufd, F_DUPFD_CLOEXEC, base)
        finally:
            remote.syscall("close", ufd)
        remote.write(remote.scratch, TAG_NAME.encode() + b"\0")
        mfd = remote.call("memfd_create", remote.scratch, MFD_CLOEXEC)
        try:
            self.tag_fd = remote.call("fcntl", mfd, F_DUPFD_CLOEXEC, self.uffd_fd + 1)
        finally:
            remote.syscall("close", mfd)
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
            "tracker": self.name, "token": self.token, "round": self.round,
            "uffd_fd": self.uffd_fd, "tag_fd": self.tag_fd,
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
            t.token, t.round = d["token"], d["round"]
            t.uffd_fd, t.tag_fd = d["uffd_fd"], d["tag_fd"]
            t._mm = bytes.fromhex(d["mm"]) or None
            t._vmas = {tuple(k) for k in d["vmas"]}
            t._unregisterable = {tuple(k): w for k, w in d["unregisterable"]}
            t._reason = None if d["armed"] else "first round"
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"corrupt uffd-wp tracker state: {exc}") from None
        return t


def _fd_link(pid: int, fd: int) -> str | None:
    if fd < 0:
        return None
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None


def _find_parked(pid: int) -> tuple[int, int] | None:
    """(uffd fd, tag fd) parked in ``pid`` by any engine, if both are intact."""
    try:
        fds = [int(x) for x in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return None
    for fd in fds:
        if _fd_link(pid, fd) == _tag_link():
            tag = UffdWpTracker._read_tag(pid, fd)
            ufd = tag.get("uffd", -1) if tag else -1
            if isinstance(ufd, int) and _fd_link(pid, ufd) == "anon_inode:[userfaultfd]":
                return ufd, fd
    return None


def _high_fd_base(pid: int) -> int:
    """Park near the top of the target's RLIMIT_NOFILE, out of its way."""
    soft = 1024
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    soft = int(v) if v.isdigit() else 1 << 20
    except OSError:
        pass
    return max(3, min(soft, 1 << 20) - 64)


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
