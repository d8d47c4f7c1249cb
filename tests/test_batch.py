"""The batched-syscall routine (checkpoint/batch.py) on its own, inside the
self-checking busy_threads target: the results of a table, a stop mid-table
(what ran, what did not, which entry is named), tables longer than one area
(chunks), the routine's own area left nowhere, a target killed mid-batch,
and the same table through a safe-mode injector (one call per entry)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpoint import batch
from checkpoint.batch import ANY, BatchError
from checkpoint.errors import InjectionError, TargetExited
from checkpoint.freezer import freeze, freeze_process
from checkpoint.inject import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PROT_READ,
                               PROT_WRITE, Injector)
from checkpoint.kernel import procfs
from conftest import build_target, proc_state, tracer_of

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
ANON = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE


@pytest.fixture
def busy(spawn):
    t = spawn([build_target("busy_threads")])
    t.expect("READY")
    time.sleep(0.1)
    return t


def status(t) -> dict[str, int]:
    t.send("status\n")
    line = t.expect("STATUS")
    return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}


def maps(pid: int) -> list[tuple[int, int, str]]:
    return [(v.start, v.end, v.perms) for v in procfs.read_maps(pid)]


def free(pid: int, size: int) -> int:
    """A free place in the target, well below its highest mappings."""
    spans = [(v.start, v.end) for v in procfs.read_maps(pid)]
    return batch.free_area(spans, size + (1 << 30)) & ~(PAGE - 1)


def assert_released(pid: int) -> None:
    for tid in procfs.list_tasks(pid):
        assert proc_state(tid) not in ("t", "T"), f"thread {tid} left stopped"
        assert tracer_of(tid) == 0, f"thread {tid} still traced"


def assert_fine(t) -> None:
    assert_released(t.pid)
    time.sleep(0.1)
    st = status(t)
    assert st["errors"] == 0, [line for line in t.lines if line.startswith("ERR")][:5]


def test_generated_bytes_are_fresh():
    if not all(shutil.which(x) for x in ("as", "objcopy", "nm")):
        pytest.skip("binutils (as, objcopy, nm) not installed")
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_batch.py"), "--check"])
    assert res.returncode == 0, "checkpoint/batch.py is stale: run tools/gen_batch.py"


def test_results_of_a_table(busy):
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        tid = proc.tids[0]  # the main thread, blocked in read()
        with Injector(proc, tid, safe=False) as r:
            at = free(busy.pid, 3 * PAGE)
            res = r.batch([("getpid",), ("gettid",),
                           ("mmap", at, 3 * PAGE, PROT_READ | PROT_WRITE, ANON, -1, 0, at),
                           ("mprotect", at + PAGE, PAGE, PROT_READ),
                           ("munmap", 1, PAGE, ANY),       # EINVAL, but ANY: goes on
                           ("getppid",)])
            assert res == [busy.pid, tid, at, 0, -errno.EINVAL, os.getpid()]
            mine = [m for m in maps(busy.pid) if at <= m[0] < at + 3 * PAGE]
            assert mine == [(at, at + PAGE, "rw-p"), (at + PAGE, at + 2 * PAGE, "r--p"),
                            (at + 2 * PAGE, at + 3 * PAGE, "rw-p")]
            # the routine's area is gone after each batch: only the table's own mappings
            assert sorted(set(maps(busy.pid)) - set(before)) == mine
            r.call("munmap", at, 3 * PAGE)
            assert r.batch([]) == []
    assert maps(busy.pid) == before
    assert_fine(busy)


def test_a_stop_mid_table_names_the_entry_and_runs_nothing_after(busy):
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0], safe=False) as r:
            at = free(busy.pid, 2 * PAGE)
            table = [("getpid",),
                     ("mmap", at, PAGE, PROT_READ, ANON, -1, 0, at),
                     ("munmap", 1, PAGE),                                  # EINVAL
                     ("mmap", at + PAGE, PAGE, PROT_READ, ANON, -1, 0, at + PAGE)]
            with pytest.raises(BatchError, match=r"batch entry 2 of 4, munmap\(0x1, 0x1000\), "
                               r"in process \d+ \(thread \d+\): Invalid argument") as e:
                r.batch(table)
            assert (e.value.index, e.value.errno, e.value.result) == (2, errno.EINVAL,
                                                                    -errno.EINVAL)
            assert e.value.results == [busy.pid, at]
            mine = [m for m in maps(busy.pid) if at <= m[0] < at + 2 * PAGE]
            assert mine == [(at, at + PAGE, "r--p")]  # the entry after the stop did not run
            # a result other than the expected one stops the table too
            with pytest.raises(BatchError, match=r"entry 1 of 4, getpid\(\).*returned "
                               rf"{busy.pid:#x}, not {busy.pid + 1:#x}") as e:
                r.batch([("gettid",), ("getpid", 0, 0, 0, 0, 0, 0, busy.pid + 1),
                         ("munmap", at, PAGE), ("getpid",)])
            assert e.value.index == 1 and e.value.errno is None
            assert any(m[0] == at for m in maps(busy.pid))
            r.call("munmap", at, PAGE)
    assert maps(busy.pid) == before
    assert_fine(busy)


@pytest.mark.parametrize("pages", [1, batch.DEFAULT_PAGES])
def test_a_table_longer_than_the_area_runs_in_chunks(busy, pages):
    """9000 one-page mappings, protections alternating (no two merge): a
    few chunks of the default area, 161 of a one-page one; then an error in
    the last chunk is named by its index in the whole table."""
    n = 9000
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0], safe=False) as r:
            at = free(busy.pid, n * PAGE)
            table = [("mmap", at + i * PAGE, PAGE, PROT_READ if i & 1 else PROT_READ | PROT_WRITE,
                      ANON, -1, 0, at + i * PAGE) for i in range(n)]
            assert batch.run(r, table, pages=pages) == [at + i * PAGE for i in range(n)]
            mine = [m for m in maps(busy.pid) if at <= m[0] < at + n * PAGE]
            assert len(mine) == n
            assert [m[2] for m in mine[:2]] == ["rw-p", "r--p"]
            # the last entry maps a page that is taken now (NOREPLACE: EEXIST)
            with pytest.raises(BatchError, match=f"batch entry {n - 1} of {n}, mmap.*: "
                               "File exists") as e:
                batch.run(r, [("getpid",)] * (n - 1) + [table[-1]], pages=pages)
            assert e.value.results == [busy.pid] * (n - 1)
            r.call("munmap", at, n * PAGE)
    assert maps(busy.pid) == before
    assert_fine(busy)


def test_a_packed_table_runs_like_tuples(busy):
    """The restorer's form: the table already packed in an array('Q'), 8
    words an entry, ``nr | EXPECT`` and the expected result last; a stop
    names the entry as for tuples. A malformed array is refused."""
    from array import array
    from checkpoint.kernel.syscalls import NR
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0], safe=False) as r:
            at = free(busy.pid, 8 * PAGE)
            words = array("Q")
            for i in range(8):
                a = at + i * PAGE
                words.extend((NR["mmap"] | batch.EXPECT, a, PAGE,
                              PROT_READ if i & 1 else PROT_READ | PROT_WRITE, ANON,
                              (1 << 64) - 1, 0, a))
            assert r.batch(words) == [at + i * PAGE for i in range(8)]
            assert len([m for m in maps(busy.pid) if at <= m[0] < at + 8 * PAGE]) == 8
            again = array("Q", words[:8 * 3]) + array("Q", (NR["getpid"], 0, 0, 0, 0, 0, 0, 0))
            with pytest.raises(BatchError, match=r"batch entry 0 of 4, mmap.*File exists"):
                r.batch(again)
            with pytest.raises(ValueError, match="8 words an entry"):
                r.batch(words[:7])
            r.call("munmap", at, 8 * PAGE)
    assert maps(busy.pid) == before
    assert_fine(busy)


def test_same_table_through_a_safe_injector(busy):
    """A safe-mode injector (the dump side) runs the table one call per
    entry: same results, same stop."""
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0]) as r:
            assert r.safe
            at = free(busy.pid, PAGE)
            table = [("getpid",), ("mmap", at, PAGE, PROT_READ, ANON, -1, 0, at),
                     ("munmap", at, PAGE), ("munmap", 1, PAGE), ("getpid",)]
            with pytest.raises(BatchError, match="batch entry 3 of 5, munmap") as e:
                r.batch(table)
            assert e.value.results == [busy.pid, at, 0]
    assert_fine(busy)


def test_an_entry_unmapping_the_routine_is_an_error_not_a_crash(busy):
    before = maps(busy.pid)
    with freeze(busy.pid) as proc:
        with Injector(proc, proc.tids[0], safe=False) as r:
            at = free(busy.pid, batch.area_size())
            with pytest.raises(InjectionError, match="got SIGSEGV"):
                batch.run(r, [("getpid",)] * 3 + [("munmap", at, batch.area_size())], at=at)
            assert r.call("getpid") == busy.pid  # the thread is still usable
    assert maps(busy.pid) == before
    assert_fine(busy)


def test_target_killed_mid_batch(busy):
    """SIGKILL while the routine sleeps through its table: the engine
    raises TargetExited at once, the thaw is clean, nothing is left
    stopped or traced."""
    proc = freeze_process(busy.pid)
    tids = list(proc.tids)
    killer = None
    try:
        with pytest.raises(TargetExited):
            with Injector(proc, proc.tids[0], safe=False) as r:
                ts = r.scratch
                r.write(ts, (0).to_bytes(8, "little") + (20_000_000).to_bytes(8, "little"))
                killer = threading.Timer(0.2, os.kill, (busy.pid, signal.SIGKILL))
                killer.start()
                t0 = time.monotonic()
                r.batch([("nanosleep", ts, 0)] * 200)  # 4 s unless killed
        assert time.monotonic() - t0 < 2
    finally:
        if killer is not None:
            killer.join()
        proc.thaw()
    assert busy.proc.wait(5) == -signal.SIGKILL or not os.path.exists(f"/proc/{busy.pid}")
    for tid in tids:
        assert proc_state(tid) in ("", "X"), f"thread {tid} left behind"


def test_a_batch_that_does_not_finish_in_time_is_interrupted_and_put_back(busy):
    with freeze(busy.pid) as proc:
        proc.timeout = 0.3
        with Injector(proc, proc.tids[0], safe=False) as r:
            ts = r.scratch
            r.write(ts, (0).to_bytes(8, "little") + (100_000_000).to_bytes(8, "little"))
            with pytest.raises(InjectionError, match="did not finish its batched syscalls "
                               "within 0.3s"):
                r.batch([("nanosleep", ts, 0)] * 20)  # 2 s
            assert r.call("getpid") == busy.pid
    assert_fine(busy)
