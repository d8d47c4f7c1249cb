"""Interval timers (setitimer) and POSIX timers (timer_create) end to end:
dump, kill, restore, and the restored target finds its timers armed with
their intervals and ids, firing at about the right rate
(tests/targets/timers_target.py). A one-shot ITIMER_REAL that expires while
the target is frozen for its dump fires after the restore; an image with
impossible timer fields is refused before anything starts."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest

from checkpoint.dumper import Checkpointer
from checkpoint.errors import RestoreError, UnsupportedObject
from checkpoint.images import open_chain
from checkpoint.objects import timers
from checkpoint.restorer import restore
from image_edit import edited_copy, one
from test_dump_restore import Channel, reaper  # noqa: F401 (fixture)

TARGET = os.path.join(os.path.dirname(__file__), "targets", "timers_target.py")


def _restore_ids_supported() -> bool:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(timers.PR_TIMER_CREATE_RESTORE_IDS, 2, 0, 0, 0) in (0, 1)


pytestmark = pytest.mark.skipif(not _restore_ids_supported(),
                                reason="no PR_TIMER_CREATE_RESTORE_IDS (Linux 6.14)")


class Run:
    def __init__(self, mode, tmp_path, reaper):
        self.ch = Channel()
        self.p = self.ch.popen([sys.executable, TARGET, mode])
        self.pid = self.p.pid
        reaper.append(self.pid)
        self.reaper = reaper
        self.info = json.loads(self.ch.expect("READY").split(" ", 1)[1])
        self.images = tmp_path / "img"

    def dump(self, **kw):
        self.stdio = self.ch.inherit(self.pid)
        with Checkpointer(self.pid, self.images, **kw) as ck:
            ck.dump()
        self.p.wait(10)

    def restore(self, images=None):
        r = restore(images or self.images, inherit=self.stdio, inherit_stdio=False)
        self.reaper.append(r.pid)
        return r

    def process(self):
        with open_chain(self.images) as chain:
            return [m for _, m in chain.records("process")][-1]

    def signals(self):
        with open_chain(self.images) as chain:
            return [m for _, m in chain.records("signals")][-1]


@pytest.fixture
def run_all(tmp_path, reaper):
    r = Run("all", tmp_path, reaper)
    yield r
    r.ch.close()


def test_timers_keep_firing_after_restore(run_all):
    run = run_all
    assert run.ch.ask("check", "STATE") == "STATE OK"
    with open(f"/proc/{run.pid}/timers") as f:
        before = sorted(timers.parse_timers(f.read()))
    run.dump()
    p = run.process()
    assert {t.which: t.interval_us for t in p.itimers} == {0: 50_000, 1: 70_000, 2: 110_000}
    # (ITIMER_REAL may show 0 left: expired, its SIGALRM pending, reloaded when taken)
    assert all(t.value_us > 0 for t in p.itimers if t.which != 0)
    ids = run.info["ids"]
    got = {t.id: t for t in p.posix_timers}
    assert sorted(got) == sorted(ids.values())
    assert got[ids["mono"]].interval_ns == 30_000_000
    assert got[ids["thread"]].notify == timers.SIGEV_THREAD_ID
    assert got[ids["thread"]].notify_tid == run.info["helper"]
    assert got[ids["none"]].notify == timers.SIGEV_NONE
    r = run.restore()
    assert r.pid == run.pid
    with open(f"/proc/{r.pid}/timers") as f:
        # ids, signals, values, tids, clocks
        after = sorted(timers.parse_timers(f.read()))
    assert after == before, (after, before)
    assert run.ch.ask("check", "STATE") == "STATE OK"


def test_oneshot_itimer_expiring_during_the_dump_fires_after_restore(tmp_path, reaper):
    run = Run("oneshot", tmp_path, reaper)
    run.ch.ask("arm", "ARMED")
    assert run.ch.ask("count", "COUNT") == "COUNT 0"
    # frozen for 0.6 s after the timers were read: the 0.3 s timer expires
    # in the frozen (then killed) process, its SIGALRM in no image
    run.dump(on_frozen=lambda proc: time.sleep(0.6))
    (it,) = run.process().itimers
    assert it.which == 0 and it.interval_us == 0 and 0 < it.value_us <= 300_000
    assert not run.signals().shared_pending_siginfo
    run.restore()
    assert run.ch.ask("check", "STATE") == "STATE OK"  # exactly one SIGALRM, disarmed


def test_cpu_itimers_are_not_delayed_by_a_checkpoint(tmp_path, reaper):
    # the kernel pads a CPU itimer set by setitimer by a tick: restored
    # without taking it off, each checkpoint would delay SIGVTALRM/SIGPROF
    # by one more tick. The target sleeps, so its CPU clocks barely move.
    run = Run("idle", tmp_path, reaper)
    before = [int(v) for v in run.ch.ask("get", "ITIMERS").split()[1:]]
    run.dump()
    run.restore()
    after = [int(v) for v in run.ch.ask("get", "ITIMERS").split()[1:]]
    pad = timers.cpu_itimer_slack_us()
    assert pad > 0  # every kernel pads by 1/HZ
    for b, a in zip(before, after):
        assert b - 200_000 < a <= b + 1, (before, after, pad)


def test_timer_on_another_process_cpu_clock_refused(tmp_path, reaper):
    run = Run("foreign", tmp_path, reaper)
    with pytest.raises(UnsupportedObject, match=rf"POSIX timer {run.info['id']} of process "
                       rf"{run.pid} runs on the CPU clock of process {os.getpid()}"):
        run.dump()
    assert run.p.poll() is None  # the failed dump let it run on
    assert not os.path.exists(run.images) or not os.listdir(run.images)
    run.ch.close()


def _signalling(p):
    return [t for t in p.posix_timers if t.notify == timers.SIGEV_SIGNAL][0]


@pytest.mark.parametrize("field, edit", [
    ("itimers.which", lambda p: p.itimers.add(which=3, value_us=1)),
    ("itimers.which", lambda p: p.itimers.add(which=p.itimers[0].which, value_us=1)),
    ("itimers", lambda p: setattr(p.itimers[0], "value_us", 1 << 63)),
    ("posix_timers (timer", lambda p: setattr(p.posix_timers[0], "notify", 2)),
    ("posix_timers (timer", lambda p: setattr(_signalling(p), "signo", 65)),
    ("posix_timers (timer", lambda p: setattr(p.posix_timers[0], "id", -1)),
    ("posix_timers (timer", lambda p: setattr(p.posix_timers[0], "clock_id", 5)),
    ("posix_timers (timer", lambda p: setattr(p.posix_timers[0], "clock_id", ~77 << 3)),
    ("posix_timers (timer", lambda p: p.posix_timers.add().CopyFrom(p.posix_timers[0])),
    ("posix_timers (timer", lambda p: setattr(
        [t for t in p.posix_timers if t.notify == timers.SIGEV_THREAD_ID][0], "notify_tid", 1)),
])
def test_impossible_timer_fields_refused(run_all, tmp_path, field, edit):
    run = run_all
    run.dump()
    bad = edited_copy(run.images, tmp_path / "bad", lambda recs: edit(one(recs, "process")))
    with pytest.raises(RestoreError, match=r"image field process\." + field.replace("(", r"\(")):
        run.restore(bad)


def test_parse_timers_reads_this_kernel():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    tid = ctypes.c_int(-1)
    sev = ctypes.create_string_buffer(bytes.fromhex("0700000000000000") +
                                      (signal.SIGRTMIN + 5).to_bytes(4, "little") +
                                      bytes(52), 64)
    assert libc.syscall(222, 1, sev, ctypes.byref(tid)) == 0
    try:
        with open("/proc/self/timers") as f:
            got = [t for t in timers.parse_timers(f.read()) if t[0] == tid.value]
        assert got == [(tid.value, signal.SIGRTMIN + 5, 7, timers.SIGEV_SIGNAL, os.getpid(), 1)]
    finally:
        libc.syscall(226, tid.value)
