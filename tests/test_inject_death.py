"""An engine killed while it runs syscalls inside a thread: the thread must
come back by itself to exactly the state it was frozen in (registers, AVX
state, signal mask, an interrupted syscall restarted) and nothing the
engine mapped may stay behind (inject.py, "A dying engine").

The engine is a real subprocess killed with SIGKILL at every step of an
injection session in turn (CHECKPOINT_FAULT, checkpoint/faults.py), into
threads caught in different states of the self-checking busy_threads target:
the main thread blocked in read(), a thread in nanosleep (the kernel's
restart-block case) and a thread spinning in user space with live ymm
registers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoint.kernel import procfs
from conftest import build_target, proc_state, tracer_of

ROOT = Path(__file__).resolve().parent.parent

ENGINE = """
import sys
sys.path.insert(0, {root!r})
from checkpoint.freezer import freeze
from checkpoint.inject import Injector
with freeze({pid}) as proc:
    with Injector(proc, {tid}) as r:
        print("SAFE" if r.safe else "PLAIN", flush=True)
        r.write(r.scratch, b"x" * 64)
        r.call("sigaltstack", 0, r.scratch)            # the kernel writes into scratch
        r.call("rt_sigaction", 10, 0, r.scratch, 8)
        for _ in range(2):
            r.call("getpid")
print("DONE", flush=True)
"""


def status(t) -> dict[str, int]:
    t.send("status\n")
    line = t.expect("STATUS")
    return {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}


def wait_more(t, before: dict, keys, timeout=5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        now = status(t)
        if all(now[k] > before[k] for k in keys):
            return now
        assert time.monotonic() < deadline, f"no progress in {keys}: {before} -> {now}"
        time.sleep(0.05)


def thread_in(pid: int, want: str) -> int:
    """A thread of busy_threads by what it does: its syscall (from
    /proc/TID/syscall) or 'user' for a spinner."""
    nr = {"read": 0, "nanosleep": 35, "clock_nanosleep": 230}
    for tid in procfs.list_tasks(pid):
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            first = f.read().split()[0]
        if want == "user" and first == "running":
            return tid
        if want == "main-read" and tid == pid and first == str(nr["read"]):
            return tid
        if want == "nanosleep" and first in (str(nr["nanosleep"]), str(nr["clock_nanosleep"])):
            return tid
    pytest.skip(f"no thread of busy_threads found doing {want}")


def engine_points(pid: int, tid: int, tmp_path) -> list[str]:
    """The fault points one whole injection session goes through."""
    log = tmp_path / "points"
    env = dict(os.environ, CHECKPOINT_FAULT_LOG=str(log))
    out = subprocess.run([sys.executable, "-c", ENGINE.format(root=str(ROOT), pid=pid, tid=tid)],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "SAFE", "the injector fell back to plain mode"
    return [p for p in log.read_text().split() if p.startswith("inject.")]


@pytest.mark.parametrize("where", ["main-read", "nanosleep", "user"])
def test_engine_killed_at_every_injection_step(spawn, tmp_path, where):
    t = spawn([build_target("busy_threads")])
    t.expect("READY")
    time.sleep(0.2)
    pid = t.pid
    maps_before = set(open(f"/proc/{pid}/maps").read().splitlines())
    tid = thread_in(pid, where)
    points = engine_points(pid, tid, tmp_path)
    assert points.count("inject.entry") == 4 and points[-1] == "inject.restore", points
    for k in range(1, len(points) + 1):
        before = status(t)
        env = dict(os.environ, CHECKPOINT_FAULT=f"*@{k}:kill")
        eng = subprocess.run([sys.executable, "-c",
                              ENGINE.format(root=str(ROOT), pid=pid, tid=tid)],
                             env=env, capture_output=True, text=True, timeout=30)
        assert eng.returncode == -signal.SIGKILL, (k, points[k - 1], eng.stdout, eng.stderr)
        for task in procfs.list_tasks(pid):
            assert proc_state(task) not in ("t", "T"), (k, points[k - 1], task)
            assert tracer_of(task) == 0
        # a real-time signal only main takes: its mask must be back
        os.kill(pid, signal.SIGRTMIN)
        after = wait_more(t, before, ("sleeps", "reads", "avx", "fpu", "poll", "sigs"))
        assert after["errors"] == 0, (k, points[k - 1], t.lines[-10:])
        # nothing the engine made stayed behind (no scratch mapping, no fd)
        left = set(open(f"/proc/{pid}/maps").read().splitlines()) - maps_before
        assert not left, (k, points[k - 1], left)
    assert proc_state(pid) != ""


def test_frame_claims_the_xsave_size_the_kernel_takes(spawn):
    """The injector's hand-built frame says as much XSAVE state as the
    kernel's own frames for that thread: a larger size (the regset's, on a
    CPU with AMX) makes rt_sigreturn restore the legacy area only, and the
    upper YMM halves of a thread returning through it become zero."""
    from checkpoint.freezer import freeze
    from checkpoint.kernel import ptrace as pt
    from checkpoint.kernel import sigframe

    t = spawn([build_target("frame_size", "-mavx")])
    line = t.expect("FRAME")
    kernel = {k: int(v) for k, v in (f.split("=") for f in line.split()[1:])}
    assert kernel["magic1"] == sigframe.FP_XSTATE_MAGIC1, line
    with freeze(t.pid):
        xstate = pt.getregset(t.pid, pt.NT_X86_XSTATE)
    size, xfeatures = sigframe.frame_size(xstate)
    assert (size, xfeatures) == (kernel["size"], kernel["xfeatures"]), (len(xstate), line)
    fp = sigframe.fpstate(xstate)
    assert len(fp) == kernel["extended"]
