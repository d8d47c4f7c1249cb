"""Kernel capability probes, run once, by trying each feature for real (in
the spirit of CRIU's kerndat.c). ``probe_all()`` returns a :class:`KernDat`
that the rest of the engine consults and that ``checkpoint check`` prints.

Every probe works on memory or children of the engine itself and leaves
nothing behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import time
from dataclasses import dataclass, field

from .kernel import pagemap as pm
from .kernel import ptrace as pt
from .kernel import uffd
from .kernel.syscalls import NR, clone_args, libc, pidfd_getfd, pidfd_open, raw_syscall

PAGE = os.sysconf("SC_PAGE_SIZE")
MADV_GUARD_INSTALL = 102  # include/uapi/asm-generic/mman-common.h (6.13+)

_mmap = libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

FEATURES = ("pagemap_scan", "pagemap_scan_guard", "uffd_wp_async", "soft_dirty",
            "ptrace_seize", "pidfd_getfd", "clone3_set_tid")


@dataclass(frozen=True)
class KernDat:
    kernel: str
    features: dict[str, bool]
    reasons: dict[str, str] = field(default_factory=dict)  # why a feature is missing

    def __getattr__(self, name: str) -> bool:
        try:
            return self.features[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def trackers(self) -> list[str]:
        """Usable dirty-page trackers, best first."""
        out = []
        if self.features["pagemap_scan"] and self.features["uffd_wp_async"]:
            out.append("uffd-wp")
        if self.features["soft_dirty"]:
            out.append("soft-dirty")
        out += ["hash", "full"]
        return out

    def as_json(self) -> dict:
        d: dict = dict(self.features)
        d["kernel"] = self.kernel
        d["trackers"] = self.trackers
        d["reasons"] = dict(self.reasons)
        return d


class _Anon:
    """A private anonymous mapping of the engine's own, unmapped on exit."""

    def __init__(self, pages: int):
        self.size = pages * PAGE
        addr = _mmap(None, self.size, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.addr = addr

    def touch(self, page: int) -> None:
        ctypes.memset(self.addr + page * PAGE, 0x5A, 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _munmap(self.addr, self.size)


def _scan(fd: int, start: int, end: int, **kw) -> list[tuple[int, int, int]]:
    vec = (pm.page_region * 16)()
    arg = pm.new_scan_arg(start, end, vec, 16, **kw)
    n = pm.pagemap_scan(fd, arg)
    return [(vec[i].start, vec[i].end, vec[i].categories) for i in range(n)]


def probe_pagemap_scan() -> tuple[bool, str]:
    with _Anon(4) as m, open("/proc/self/pagemap", "rb", buffering=0) as f:
        m.touch(1)
        try:
            regions = _scan(f.fileno(), m.addr, m.addr + m.size,
                            category_mask=pm.PAGE_IS_PRESENT, return_mask=pm.PAGE_IS_PRESENT)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOTTY):
                return False, "PAGEMAP_SCAN ioctl not supported (needs Linux 6.7+)"
            return False, f"PAGEMAP_SCAN failed: {os.strerror(exc.errno)}"
        want = [(m.addr + PAGE, m.addr + 2 * PAGE, pm.PAGE_IS_PRESENT)]
        if regions != want:
            return False, f"PAGEMAP_SCAN answered {regions}, expected {want}"
    return True, ""


def probe_pagemap_scan_guard() -> tuple[bool, str]:
    with _Anon(4) as m, open("/proc/self/pagemap", "rb", buffering=0) as f:
        if _madvise(m.addr + 2 * PAGE, PAGE, MADV_GUARD_INSTALL) != 0:
            return False, ("MADV_GUARD_INSTALL not supported (guard regions need Linux 6.13+):"
                           f" {os.strerror(ctypes.get_errno())}")
        try:
            regions = _scan(f.fileno(), m.addr, m.addr + m.size,
                            category_mask=pm.PAGE_IS_GUARD, return_mask=pm.PAGE_IS_GUARD)
        except OSError as exc:
            return False, f"PAGEMAP_SCAN does not know PAGE_IS_GUARD: {os.strerror(exc.errno)}"
        if regions != [(m.addr + 2 * PAGE, m.addr + 3 * PAGE, pm.PAGE_IS_GUARD)]:
            return False, f"PAGE_IS_GUARD not reported for a guard page (got {regions})"
    return True, ""


def probe_uffd_wp_async() -> tuple[bool, str]:
    """Register WP_ASYNC on our own memory, write one page, get-and-clear."""
    try:
        ufd = raw_syscall(NR["userfaultfd"], os.O_CLOEXEC | os.O_NONBLOCK | uffd.UFFD_USER_MODE_ONLY)
    except OSError as exc:
        return False, f"userfaultfd() failed: {os.strerror(exc.errno)} (CONFIG_USERFAULTFD?)"
    try:
        import fcntl
        api = uffd.uffdio_api(uffd.UFFD_API,
                              uffd.UFFD_FEATURE_WP_ASYNC | uffd.UFFD_FEATURE_WP_UNPOPULATED, 0)
        try:
            fcntl.ioctl(ufd, uffd.UFFDIO_API, api, True)
        except OSError as exc:
            return False, ("UFFDIO_API refused UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED (needs Linux"
                           f" 6.7+ with CONFIG_PTE_MARKER_UFFD_WP): {os.strerror(exc.errno)}")
        with _Anon(4) as m, open("/proc/self/pagemap", "rb", buffering=0) as f:
            reg = uffd.uffdio_register(uffd.uffdio_range(m.addr, m.size),
                                       uffd.UFFDIO_REGISTER_MODE_WP, 0)
            try:
                fcntl.ioctl(ufd, uffd.UFFDIO_REGISTER, reg, True)
            except OSError as exc:
                return False, f"UFFDIO_REGISTER (WP) failed: {os.strerror(exc.errno)}"
            kw = dict(flags=pm.PM_SCAN_WP_MATCHING, category_mask=pm.PAGE_IS_WRITTEN,
                      return_mask=pm.PAGE_IS_WRITTEN)
            _scan(f.fileno(), m.addr, m.addr + m.size, **kw)  # baseline: clear
            m.touch(2)
            got = _scan(f.fileno(), m.addr, m.addr + m.size, **kw)
            want = [(m.addr + 2 * PAGE, m.addr + 3 * PAGE, pm.PAGE_IS_WRITTEN)]
            if got != want:
                return False, f"write-protect tracking reported {got}, expected {want}"
            if _scan(f.fileno(), m.addr, m.addr + m.size, **kw):
                return False, "get-and-clear did not clear the written page"
    finally:
        os.close(ufd)
    return True, ""


def probe_soft_dirty() -> tuple[bool, str]:
    """Clear soft-dirty bits of our own mm, write a page, read pagemap bit 55."""
    with _Anon(2) as m:
        m.touch(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("4")
        except OSError as exc:
            return False, f"/proc/self/clear_refs not writable: {os.strerror(exc.errno)}"
        m.touch(0)
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(m.addr // PAGE * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
        if not entry & pm.PM_PRESENT:
            return False, "probe page not present after a write"
        if not entry & pm.PM_SOFT_DIRTY:
            return False, ("kernel built without CONFIG_MEM_SOFT_DIRTY: pagemap bit 55 stays"
                           " clear after a write")
    return True, ""


def _sleeping_child(keep_fd: int | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            time.sleep(30)
        finally:
            os._exit(0)
    return pid


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def probe_ptrace_seize() -> tuple[bool, str]:
    child = _sleeping_child()
    try:
        try:
            pt.seize(child, pt.PTRACE_O_TRACESYSGOOD)
            pt.interrupt(child)
        except OSError as exc:
            return False, f"PTRACE_SEIZE/INTERRUPT refused: {os.strerror(exc.errno)}"
        st = pt.waitpid(child)
        ok = st is not None and st.is_interrupt_stop
        pt.detach(child)
        if not ok:
            return False, f"PTRACE_INTERRUPT gave {st.describe() if st else 'nothing'}"
    finally:
        _reap(child)
    return True, ""


def probe_pidfd_getfd() -> tuple[bool, str]:
    r, w = os.pipe()
    child = _sleeping_child()
    try:
        try:
            pidfd = pidfd_open(child)
        except OSError as exc:
            return False, f"pidfd_open failed: {os.strerror(exc.errno)} (needs Linux 5.3+)"
        try:
            fd = pidfd_getfd(pidfd, w)
            os.close(fd)
        except OSError as exc:
            return False, f"pidfd_getfd failed: {os.strerror(exc.errno)} (needs Linux 5.6+)"
        finally:
            os.close(pidfd)
    finally:
        _reap(child)
        os.close(r)
        os.close(w)
    return True, ""


def probe_clone3_set_tid() -> tuple[bool, str]:
    """clone3 asking for our own (taken) PID: EEXIST proves both that the
    kernel knows set_tid and that we may use it, without creating anything."""
    tid = (ctypes.c_int32 * 1)(os.getpid())
    args = clone_args(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    try:
        res = raw_syscall(NR["clone3"], ctypes.addressof(args), ctypes.sizeof(args))
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return True, ""
        if exc.errno == errno.EPERM:
            return False, ("clone3 set_tid needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN"
                           " (or a user namespace of one's own)")
        if exc.errno in (errno.ENOSYS, errno.E2BIG):
            return False, "clone3 with set_tid not supported (needs Linux 5.5+)"
        return False, f"clone3 set_tid probe failed: {os.strerror(exc.errno)}"
    if res == 0:  # pragma: no cover - cannot happen: our own PID is taken
        os._exit(0)
    os.waitpid(res, 0)
    return False, "clone3 reused a PID that is in use"


PROBES = {
    "pagemap_scan": probe_pagemap_scan,
    "pagemap_scan_guard": probe_pagemap_scan_guard,
    "uffd_wp_async": probe_uffd_wp_async,
    "soft_dirty": probe_soft_dirty,
    "ptrace_seize": probe_ptrace_seize,
    "pidfd_getfd": probe_pidfd_getfd,
    "clone3_set_tid": probe_clone3_set_tid,
}


def probe_all() -> KernDat:
    features, reasons = {}, {}
    for name, fn in PROBES.items():
        try:
            ok, why = fn()
        except OSError as exc:
            ok, why = False, f"probe failed: {exc}"
        features[name] = ok
        if not ok:
            reasons[name] = why
    return KernDat(os.uname().release, features, reasons)
