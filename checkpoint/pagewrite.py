"""Pages written into a process being built, many ranges a syscall.

    w = PageWriter(pid, mem_fd)          # mem_fd: its /proc/PID/mem, opened for writing
    for addr, n, frame, off in chain.iter_data(pid, within=spans):
        w.add(frame, off, addr, n)
    w.flush()
    w.release()

One ``process_vm_writev`` for up to IOV_MAX ranges of one frame: a process's
pages are often single pages scattered over its address space (30,000
one-page mappings, a final layer's dirty pages), and one ``pwrite`` of
``/proc/PID/mem`` a page cost a syscall and a Python step each.
``process_vm_writev`` does not force like ``/proc/PID/mem`` does: a range in
a mapping without PROT_WRITE (or anything else it refuses) is written
through ``/proc/PID/mem``, that range alone, and the ranges after it go on
by ``process_vm_writev``.
"""

from __future__ import annotations

import ctypes
import os
from array import array

from .errors import RestoreError
from .kernel.syscalls import IOV_MAX, NR, Py_buffer, _GetBuffer, _ReleaseBuffer, raw_syscall

_NR_WRITEV = NR["process_vm_writev"]


class PageWriter:
    def __init__(self, pid: int, fd: int):
        self.pid, self.fd = pid, fd
        self.frame = None            # the frame (a buffer) the pending ranges come from
        self.view = None             # its pinned buffer
        self.local = array("Q")      # iovec pairs into the frame
        self.remote = array("Q")     # iovec pairs in the target

    def add(self, frame, off: int, addr: int, n: int) -> None:
        """``n`` bytes of ``frame`` from ``off`` to ``addr`` in the target
        (written by :meth:`flush` at the latest; the frame stays pinned
        until then, so the caller may drop it)."""
        if frame is not self.frame:
            self.flush()
            self._pin(frame)
        rem = self.remote
        if rem and rem[-2] + rem[-1] == addr and self.local[-2] + self.local[-1] == \
                self.view.buf + off:
            rem[-1] += n             # contiguous on both sides: one range
            self.local[-1] += n
        else:
            if len(rem) >= 2 * IOV_MAX:
                self.flush()
            rem.extend((addr, n))
            self.local.extend((self.view.buf + off, n))

    def _pin(self, frame) -> None:
        self.release()
        obj = frame.obj if isinstance(frame, memoryview) and frame.obj is not None else frame
        view = Py_buffer()
        _GetBuffer(obj, ctypes.byref(view), 0)
        self.view, self.frame = view, frame

    def flush(self) -> None:
        """Write every pending range."""
        if not self.remote:
            return
        la, _ = self.local.buffer_info()
        ra, _ = self.remote.buffer_info()
        rem, loc = self.remote, self.local
        n = len(rem) // 2
        k = 0                        # the first range not written yet
        while k < n:
            try:
                got = raw_syscall(_NR_WRITEV, self.pid, la + 16 * k, n - k, ra + 16 * k,
                                  n - k, 0)
            except OSError:
                got = 0              # e.g. EFAULT at range k: that one the sure way
            while k < n and got >= rem[2 * k + 1]:
                got -= rem[2 * k + 1]
                k += 1
            if k == n:
                break
            # range k stopped after ``got`` bytes: the rest of it through /proc/PID/mem
            addr, size = rem[2 * k] + got, rem[2 * k + 1] - got
            src = (ctypes.c_char * size).from_address(loc[2 * k] + got)
            if os.pwrite(self.fd, src, addr) != size:
                raise RestoreError(f"short write of pages at {addr:#x}")
            k += 1
        del self.local[:], self.remote[:]

    def release(self) -> None:
        """Unpin the frame (after :meth:`flush`; pending ranges are dropped)."""
        if self.view is not None:
            _ReleaseBuffer(ctypes.byref(self.view))
            self.view = self.frame = None
        del self.local[:], self.remote[:]
