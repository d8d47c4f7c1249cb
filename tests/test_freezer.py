"""The freezer and syscall injection against real multi-threaded targets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from checkpoint.errors import (FreezeError, InjectionError, NoSuchProcess, TargetError,
                               TargetExited)
from checkpoint.freezer import freeze, freeze_process
from checkpoint.inject import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, Injector
from checkpoint.kernel import procfs
from checkpoint.kernel import ptrace as pt
from conftest import build_target, proc_state, tracer_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_status(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}


def status(t) -> dict[str, int]:
    t.send("status\n")
    return parse_status(t.expect("STATUS"))


def assert_released(pid: int) -> None:
    for tid in procfs.list_tasks(pid):
        assert proc_state(tid) not in ("t", "T"), f"thread {tid} left stopped"
        assert tracer_of(tid) == 0, f"thread {tid} still traced"


@pytest.fixture
def busy(spawn):
    t = spawn([build_target("busy_threads")])
    t.expect("READY")
    time.sleep(0.1)  # let every thread reach its blocking call
    return t


def wait_progress(t, before: dict[str, int], keys, timeout=5.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = status(t)
        if all(now[k] > before[k] for k in keys):
            return now
        assert time.monotonic() < deadline, f"no progress in {keys}: {before} -> {now}"
        time.sleep(0.05)


KEYS = ("sleeps", "reads", "futex", "epoll", "poll", "avx", "fpu")


def test_freeze_stops_every_thread_and_thaw_releases(busy):
    tasks = procfs.list_tasks(busy.pid)
    assert len(tasks) >= 10
    with freeze(busy.pid) as proc:
        assert proc.tids == tasks
        for tid in tasks:
            assert proc_state(tid) == "t"
            assert tracer_of(tid) == os.getpid()
        # nothing moves while frozen
        regs = {tid: pt.getregs(tid).rip for tid in tasks}
        time.sleep(0.05)
        assert regs == {tid: pt.getregs(tid).rip for tid in tasks}
    assert_released(busy.pid)
    before = status(busy)
    wait_progress(busy, before, KEYS)


def test_threads_in_syscalls_show_restart_state(busy):
    with freeze(busy.pid) as proc:
        in_syscall = [pt.getregs(t) for t in proc.tids]
    # a thread caught inside a blocking call shows orig_rax = the syscall and
    # rax = -ERESTART*; at least the blocked ones (read, futex, poll...) must
    restarting = [r for r in in_syscall
                  if (r.rax - (1 << 64)) in (-512, -513, -514, -516) and r.orig_rax < 512]
    assert len(restarting) >= 4


def test_inject_into_every_thread_then_all_self_checks_pass(busy):
    before = status(busy)
    maps_before = procfs.read_maps(busy.pid)
    for cycle in range(15):
        with freeze(busy.pid) as proc:
            for tid in proc.tids:
                with Injector(proc, tid) as r:
                    assert r.call("getpid") == busy.pid
                    assert r.call("gettid") == tid
                    page = r.call("mmap", 0, 4096, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                    assert page % 4096 == 0
                    r.write(page, b"x" * 64)
                    assert r.read(page, 64) == b"x" * 64
                    assert r.call("munmap", page, 4096) == 0
                    # an injected failure comes back as -errno, not an exception
                    assert r.syscall("close", 987654) == -9  # EBADF
        # signals sent while the target runs and while frozen must all arrive
        os.kill(busy.pid, signal.SIGRTMIN)
    with freeze(busy.pid):
        for _ in range(5):
            os.kill(busy.pid, signal.SIGRTMIN)  # queued while frozen
    assert procfs.read_maps(busy.pid) == maps_before
    after = wait_progress(busy, before, KEYS)
    deadline = time.monotonic() + 5
    while after["sigs"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = status(busy)
    assert after["sigs"] == 20, after
    busy.send("quit\n")
    final = parse_status(busy.expect("FINAL"))
    assert final["errors"] == 0, [l for l in busy.lines if l.startswith("ERR")][:10]
    assert busy.proc.wait(5) == 0


def test_injection_preserves_avx_and_fpu_state(busy):
    """Clobber ymm8 and MXCSR from the injector's side is impossible, so
    instead restore xstate after every injection and let the spinner check."""
    before = status(busy)
    for _ in range(30):
        with freeze(busy.pid) as proc:
            for tid in proc.tids:
                with Injector(proc, tid) as r:
                    r.call("getppid")
    after = wait_progress(busy, before, ("avx", "fpu"))
    assert after["errors"] == 0


def test_failed_injection_puts_registers_back(busy):
    with freeze(busy.pid) as proc:
        tid = proc.tids[-1]
        regs_before = bytes(pt.getregs(tid))
        mask_before = pt.getsigmask(tid)
        with pytest.raises(InjectionError, match="munmap.*Invalid argument"):
            with Injector(proc, tid) as r:
                r.call("munmap", 1, 4096)  # unaligned: EINVAL
        assert bytes(pt.getregs(tid)) == regs_before
        assert pt.getsigmask(tid) == mask_before
    assert status(busy)["errors"] == 0


def test_python_target_survives_freeze_and_injection(spawn, python_exe):
    t = spawn([python_exe, os.path.join(ROOT, "tests/targets/py_threads.py")])
    t.expect("READY")
    time.sleep(0.2)
    before = parse_status((t.send("status\n"), t.expect("STATUS"))[1])
    for _ in range(10):
        with freeze(t.pid) as proc:
            assert len(proc.tids) >= 6
            for tid in proc.tids:
                with Injector(proc, tid) as r:
                    assert r.call("gettid") == tid
        time.sleep(0.02)
    time.sleep(0.2)
    t.send("quit\n")
    final = t.expect("FINAL")
    after = parse_status(final)
    assert after["errors"] == 0, final
    for k in ("sleep", "queue", "select", "compute"):
        assert after[k] > before[k], (before, after)


def test_freeze_while_threads_are_born_and_die(spawn):
    t = spawn([build_target("thread_spawner")])
    t.expect("READY")
    for _ in range(40):
        with freeze(t.pid) as proc:
            # every live thread is frozen: the task list cannot change now
            live = [x for x in procfs.list_tasks(t.pid) if proc_state(x) not in ("Z", "X", "")]
            assert sorted(live) == proc.tids
            for tid in live:
                assert proc_state(tid) == "t"
        assert_released(t.pid)
    t.send("status\n")
    line = t.expect("STATUS")
    joined = parse_status(line)["joined"]
    time.sleep(0.1)
    t.send("status\n")
    st = parse_status(t.expect("STATUS"))
    assert st["joined"] > joined and st["errors"] == 0


def test_target_killed_while_frozen(busy):
    proc = freeze_process(busy.pid)
    os.kill(busy.pid, signal.SIGKILL)
    with pytest.raises(TargetExited):
        with Injector(proc, proc.tids[0]) as r:
            for _ in range(10):
                r.call("getpid")
    proc.thaw()  # must not raise nor hang for dead threads
    # (the test is both parent and tracer: the engine's waitpid may have
    # reaped the leader, so Popen may not see the status; the process is gone)
    busy.proc.wait(5)
    assert proc_state(busy.pid) == ""


def test_target_exiting_during_freeze(spawn, python_exe):
    """Freeze repeatedly a target that exits by itself: every attempt either
    freezes it or reports that it exited; nothing hangs or stays traced."""
    t = spawn([python_exe, "-c", textwrap.dedent("""
        import threading, time, sys
        for _ in range(4): threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
        print("READY", flush=True)
        time.sleep(0.3)
        sys.exit(0)
    """)])
    t.expect("READY")
    outcomes = set()
    deadline = time.monotonic() + 5
    while t.proc.poll() is None and time.monotonic() < deadline:
        try:
            with freeze(t.pid):
                outcomes.add("frozen")
        except (TargetExited, NoSuchProcess, TargetError):
            outcomes.add("exited")
    assert "frozen" in outcomes
    assert t.proc.wait(5) == 0


@pytest.mark.parametrize("case", ["missing", "zombie", "kthread", "traced", "self", "thread"])
def test_unfreezable_targets_give_clear_errors(case, spawn, python_exe, busy):
    if case == "missing":
        pid = 4_000_000  # above pid_max
        with pytest.raises(NoSuchProcess, match="no such process"):
            freeze_process(pid)
        return
    if case == "zombie":
        child = subprocess.Popen(["true"])
        while proc_state(child.pid) != "Z":
            time.sleep(0.01)
        try:
            with pytest.raises(TargetError, match="zombie"):
                freeze_process(child.pid)
        finally:
            child.wait()
        return
    if case == "kthread":
        with pytest.raises(TargetError, match="kernel thread"):
            freeze_process(2)
        return
    if case == "self":
        with pytest.raises(TargetError, match="engine itself"):
            freeze_process(os.getpid())
        return
    if case == "thread":
        tid = procfs.list_tasks(busy.pid)[1]
        with pytest.raises(TargetError, match=f"thread of process {busy.pid}"):
            freeze_process(tid)
        return
    # traced by another engine
    other = spawn([python_exe, "-c", ENGINE_SCRIPT.format(root=ROOT, pid=busy.pid, mode="hold")])
    other.expect("FROZEN")
    with pytest.raises(FreezeError, match=f"already traced by PID {other.pid}"):
        freeze_process(busy.pid)
    other.stop()
    time.sleep(0.05)
    assert_released(busy.pid)


ENGINE_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from checkpoint.freezer import freeze
from checkpoint.inject import Injector
with freeze({pid}) as proc:
    if "{mode}" == "inject":
        with Injector(proc, proc.tids[-1]) as r:
            r.call("getpid")
            print("FROZEN", flush=True)
            while True:
                r.call("getpid")
    print("FROZEN", flush=True)
    time.sleep(60)
"""


# An engine killed while a thread runs injected syscalls: the kernel detaches
# the thread with the engine's registers, and the thread returns by itself to
# its frozen state through the signal frame the injector left (inject.py).
@pytest.mark.parametrize("mode,sig", [("hold", signal.SIGKILL), ("hold", signal.SIGTERM),
                                      ("hold", signal.SIGINT), ("inject", signal.SIGKILL),
                                      ("inject", signal.SIGTERM), ("inject", signal.SIGINT)])
def test_engine_killed_mid_freeze_leaves_target_running(busy, spawn, python_exe, mode, sig):
    before = status(busy)
    eng = spawn([python_exe, "-c", ENGINE_SCRIPT.format(root=ROOT, pid=busy.pid, mode=mode)])
    eng.expect("FROZEN")
    tids = procfs.list_tasks(busy.pid)
    # (in inject mode the last thread runs injected getpids between stops)
    assert all(proc_state(t) == "t" for t in (tids if mode == "hold" else tids[:-1]))
    os.kill(eng.pid, sig)
    eng.proc.wait(10)
    assert_released(busy.pid)
    after = wait_progress(busy, before, KEYS)
    assert after["errors"] == 0


def test_uninterruptible_thread_is_refused_untouched(spawn):
    t = spawn([build_target("vforker"), "1.5"])
    t.expect("READY")
    time.sleep(0.1)
    assert proc_state(t.pid) == "D"
    t0 = time.monotonic()
    with pytest.raises(FreezeError, match="uninterruptible sleep"):
        freeze_process(t.pid, timeout=0.3)
    assert time.monotonic() - t0 < 1.0
    assert tracer_of(t.pid) == 0
    assert t.expect("DONE", timeout=5) == "DONE"  # it went on, never stopped
