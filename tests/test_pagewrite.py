"""The page writer (checkpoint/pagewrite.py) on its own, inside the
self-checking busy_threads target: ranges of one frame written many a
process_vm_writev, contiguous ones joined, more than IOV_MAX ranges, a
range that crosses into a read-only mapping (process_vm_writev stops
there; the rest goes through /proc/PID/mem) and ranges after it; the
content read back through /proc/PID/mem."""

from __future__ import annotations

import os

import pytest

from checkpoint.freezer import freeze
from checkpoint.inject import PROT_READ, PROT_WRITE, Injector
from checkpoint.kernel import procfs
from checkpoint.kernel.syscalls import IOV_MAX
from checkpoint.pagewrite import PageWriter
from test_batch import ANON, PAGE, assert_fine, busy, free, maps  # noqa: F401 (busy: fixture)


def frame_of(npages: int) -> bytes:
    """A frame whose every page says which page of it it is."""
    return b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(npages))


@pytest.mark.parametrize("layout", ["all writable", "read-only pages between"])
def test_pages_land_where_asked(busy, layout):
    n = 3 * IOV_MAX + 10          # one-page ranges: several flushes of IOV_MAX
    frame = frame_of(n)
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0], safe=False) as r:
            at = free(busy.pid, 2 * n * PAGE)
            # 2n one-page mappings; with read-only ones, mappings 3 and every
            # sixth from 4 are (a third of the scattered pages land in one)
            ro = {i for i in range(2 * n) if layout != "all writable" and (i == 3 or i % 6 == 4)}
            r.batch([("mmap", at + i * PAGE, PAGE,
                      PROT_READ if i in ro else PROT_READ | PROT_WRITE, ANON, -1, 0,
                      at + i * PAGE) for i in range(2 * n)])
            try:
                w = PageWriter(proc.pid, proc.mem.fd)
                view = memoryview(frame)
                # page k of the frame to mapping 2k (scattered), and one
                # range of two pages (joined: contiguous on both sides) to
                # mappings 2n-2, 2n-1
                for k in range(n - 2):
                    w.add(view, k * PAGE, at + 2 * k * PAGE, PAGE)
                w.add(view, (n - 2) * PAGE, at + (2 * n - 2) * PAGE, PAGE)
                w.add(view, (n - 1) * PAGE, at + (2 * n - 1) * PAGE, PAGE)
                # a range across a read-only mapping: pages 0 and 1 of the
                # frame again, to mappings 2 and 3 (3 is read-only with ro)
                w.add(memoryview(frame), 0, at + 2 * PAGE, 2 * PAGE)
                w.flush()
                w.release()
                mem = procfs.open_proc_fd(proc.pid, "mem")
                try:
                    got = os.pread(mem, 2 * n * PAGE, at)
                finally:
                    os.close(mem)
                want = bytearray(2 * n * PAGE)
                for k in range(n - 2):
                    want[2 * k * PAGE:(2 * k + 1) * PAGE] = frame[k * PAGE:(k + 1) * PAGE]
                want[(2 * n - 2) * PAGE:] = frame[(n - 2) * PAGE:]
                want[2 * PAGE:4 * PAGE] = frame[:2 * PAGE]
                assert got == bytes(want)
                # the read-only mappings kept their protection
                mine = {m[0]: m[2] for m in maps(busy.pid) if at <= m[0] < at + 2 * n * PAGE}
                assert all(mine.get(at + i * PAGE, "r--p") == "r--p" for i in ro)
            finally:
                r.call("munmap", at, 2 * n * PAGE)
    assert maps(busy.pid) == before
    assert_fine(busy)

