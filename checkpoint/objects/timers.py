"""Interval timers (setitimer) and POSIX timers (timer_create).

Both live in the process's signal_struct, so they are read and set by
injected calls in the leader: getitimer/setitimer for the three interval
timers; /proc/PID/timers names each POSIX timer (id, signal, notification,
clock) and timer_gettime/timer_getoverrun give its time left. A timer keeps
its remaining time, not its deadline: the time between the dump and the
restore does not count (as CRIU).

A restored POSIX timer must keep its id (the program holds it as its
timer_t): the kernel's PR_TIMER_CREATE_RESTORE_IDS (Linux 6.14) makes
timer_create take the id to allocate from the *created_timer_id argument.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import struct

from ..errors import CheckpointError, RestoreError, UnsupportedObject
from ..images.pb import process_pb2
from ..inject import Injector

ITIMER_NAMES = ("ITIMER_REAL", "ITIMER_VIRTUAL", "ITIMER_PROF")
ITIMERVAL = struct.Struct("<qqqq")   # it_interval {sec, usec}, it_value {sec, usec}
ITIMERSPEC = struct.Struct("<qqqq")  # it_interval {sec, nsec}, it_value {sec, nsec}
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
SIGEVENT_SIZE = 64
PR_TIMER_CREATE_RESTORE_IDS = 77
RESTORE_IDS_OFF, RESTORE_IDS_ON = 0, 1
NSIG = 64
# a relative time the kernel takes as a ktime (s64 nanoseconds)
MAX_NS = (1 << 63) - 1
MAX_US = MAX_NS // 1000
# clocks a timer may run on: REALTIME, MONOTONIC, PROCESS_CPUTIME, THREAD_CPUTIME,
# BOOTTIME, REALTIME_ALARM, BOOTTIME_ALARM, TAI
CLOCKS = (0, 1, 2, 3, 7, 8, 9, 11)
CLOCK_THREAD_CPUTIME_ID = 3
CPUCLOCK_PERTHREAD, CPUCLOCK_TYPE, CLOCKFD = 4, 3, 3


def _us(sec: int, usec: int) -> int:
    return sec * 1_000_000 + usec


def dump_itimers(remote: Injector) -> list[process_pb2.ItimerEntry]:
    """The armed interval timers. A periodic ITIMER_REAL whose SIGALRM is
    pending shows no time left (the kernel reloads it when the signal is
    taken): it is armed all the same."""
    out = []
    for which in range(len(ITIMER_NAMES)):
        remote.call("getitimer", which, remote.scratch)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(remote.read(remote.scratch, ITIMERVAL.size))
        value, interval = _us(vsec, vusec), _us(isec, iusec)
        if value or interval:
            out.append(process_pb2.ItimerEntry(which=which, value_us=value,
                                               interval_us=interval))
    return out


_TIMER = re.compile(r"ID: (-?\d+)\nsignal: (\d+)/([0-9a-f]+)\nnotify: (\w+)/(pid|tid)\.(\d+)\n"
                    r"ClockID: (-?\d+)\n")


def parse_timers(text: str) -> list[tuple[int, int, int, int, int, int]]:
    """/proc/PID/timers as (id, signo, sigev_value, notify, tid, clock)."""
    out = []
    pos = 0
    for m in _TIMER.finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
        tid_, signo, value, kind, who, tid, clock = m.groups()
        notify = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE}.get(kind)
        if notify is None:
            raise CheckpointError(f"/proc timers: unknown notification {kind!r}")
        if who == "tid":
            notify |= SIGEV_THREAD_ID
        out.append((int(tid_), int(signo), int(value, 16), notify, int(tid), int(clock)))
    if pos != len(text):
        raise CheckpointError(f"cannot parse /proc timers at {text[pos:pos + 60]!r}")
    return out


def clock_problem(clock: int, pid: int, tids: list[int]) -> str:
    """Why a timer on ``clock`` cannot be restored in process ``pid`` with
    threads ``tids`` ('' when it can): a CPU-time clock of another process,
    or of a thread the restore cannot tell (the creating thread's own)."""
    if clock >= 0:
        if clock not in CLOCKS:
            return f"unknown clock {clock}"
        if clock == CLOCK_THREAD_CPUTIME_ID and len(tids) > 1:
            return "the creating thread's CPU clock in a multi-threaded process"
        return ""
    if clock & 7 == CLOCKFD:
        return "a dynamic POSIX clock (a clock device's fd)"
    if clock & CPUCLOCK_TYPE == CPUCLOCK_TYPE:
        return f"invalid CPU clock {clock}"
    owner = ~(clock >> 3)
    if clock & CPUCLOCK_PERTHREAD:
        if owner == 0 and len(tids) > 1:
            return "the creating thread's CPU clock in a multi-threaded process"
        if owner and owner not in tids:
            return f"the CPU clock of thread {owner}, not one of this process"
    elif owner not in (0, pid):
        return f"the CPU clock of process {owner}"
    return ""


def dump_posix_timers(remote: Injector, tids: list[int]) -> list[process_pb2.PosixTimerEntry]:
    pid = remote.proc.pid
    try:
        with open(f"/proc/{pid}/timers") as f:
            text = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read /proc/{pid}/timers: {e.strerror}") from e
    out = []
    for tid_, signo, value, notify, tid, clock in parse_timers(text):
        why = clock_problem(clock, pid, tids)
        if why:
            raise UnsupportedObject(f"POSIX timer {tid_} of process {pid} runs on {why}: "
                                    "not supported")
        remote.call("timer_gettime", tid_, remote.scratch)
        isec, insec, vsec, vnsec = ITIMERSPEC.unpack(remote.read(remote.scratch,
                                                                 ITIMERSPEC.size))
        overrun = remote.call("timer_getoverrun", tid_)
        out.append(process_pb2.PosixTimerEntry(
            id=tid_, clock_id=clock, signo=signo, sigev_value=value, notify=notify,
            notify_tid=tid if notify & SIGEV_THREAD_ID else 0,
            value_ns=vsec * 1_000_000_000 + vnsec, interval_ns=isec * 1_000_000_000 + insec,
            overrun=overrun))
    return out


# --------------------------------------------------------------------------
# restore


def validate(p: process_pb2.ProcessEntry, tids: list[int]) -> None:
    """Every timer field, before anything starts."""
    def bad(field: str, what: str):
        raise RestoreError(f"image field process.{field}: {what}; refusing to restore")

    seen = set()
    for t in p.itimers:
        if t.which >= len(ITIMER_NAMES):
            bad("itimers.which", f"{t.which} is no ITIMER_*")
        if t.which in seen:
            bad("itimers.which", f"{ITIMER_NAMES[t.which]} given twice")
        seen.add(t.which)
        if t.value_us > MAX_US or t.interval_us > MAX_US:
            bad("itimers", f"{ITIMER_NAMES[t.which]}: time out of range")
    ids = set()
    for t in p.posix_timers:
        what = f"posix_timers (timer {t.id})"
        if t.id < 0:
            bad(what, "negative id")
        if t.id in ids:
            bad(what, "id given twice")
        ids.add(t.id)
        if t.notify not in (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID):
            bad(what, f"notify {t.notify} is not SIGEV_SIGNAL, SIGEV_NONE or SIGEV_THREAD_ID")
        if t.notify != SIGEV_NONE and not 1 <= t.signo <= NSIG:
            bad(what, f"signal {t.signo}")
        if t.notify == SIGEV_THREAD_ID and t.notify_tid not in tids:
            bad(what, f"signals thread {t.notify_tid}, not one of the image's")
        why = clock_problem(t.clock_id, p.pid, tids)
        if why:
            bad(what, why)
        if t.value_ns > MAX_NS or t.interval_ns > MAX_NS:
            bad(what, "time out of range")


_cpu_slack_us: int | None = None


def cpu_itimer_slack_us() -> int:
    """What setitimer adds to the value of a CPU-time interval timer
    (ITIMER_VIRTUAL, ITIMER_PROF): the kernel pads it by one scheduler tick
    (TICK_NSEC, 1/HZ), which userspace cannot read; measured once on the
    engine itself. Set back unpadded, every checkpoint of a program would
    delay its next SIGVTALRM/SIGPROF by one more tick."""
    global _cpu_slack_us
    if _cpu_slack_us is None:
        probe = 1000.0
        old = signal.setitimer(signal.ITIMER_PROF, probe)
        value, _ = signal.getitimer(signal.ITIMER_PROF)
        signal.setitimer(signal.ITIMER_PROF, *old)
        padded = (value - probe) * 1_000_000  # a tick less the CPU time the calls took
        # a tick is 1/HZ s: take the HZ it is nearest to
        _cpu_slack_us = 1_000_000 // round(1_000_000 / padded) if padded >= 100 else 0
    return _cpu_slack_us


def restore_itimers(r: Injector, p: process_pb2.ProcessEntry) -> None:
    for t in p.itimers:
        value = t.value_us or 1  # armed with its signal pending: fire at once
        if t.which != 0 and value > 1:  # a CPU clock: the kernel pads it by a tick
            value = max(1, value - cpu_itimer_slack_us())
        r.write(r.scratch, ITIMERVAL.pack(*divmod(t.interval_us, 1_000_000),
                                          *divmod(value, 1_000_000)))
        res = r.syscall("setitimer", t.which, r.scratch, 0)
        if res < 0:
            raise RestoreError(f"setitimer({ITIMER_NAMES[t.which]}): {os.strerror(-res)}")


def restore_posix_timers(r: Injector, p: process_pb2.ProcessEntry) -> None:
    """Each timer with its dumped id, after the threads exist (a timer may
    signal one, or run on one's CPU clock)."""
    if not p.posix_timers:
        return
    first = p.posix_timers[0].id
    res = r.syscall("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0)
    if res < 0:
        why = "this kernel has no PR_TIMER_CREATE_RESTORE_IDS (Linux 6.14)" \
            if res == -errno.EINVAL else os.strerror(-res)
        raise RestoreError(f"POSIX timer {first}: cannot create it with its id: {why}")
    sev, want, spec = r.scratch, r.scratch + 128, r.scratch + 256
    try:
        for t in p.posix_timers:
            raw = struct.pack("<Qiii", t.sigev_value, t.signo, t.notify,
                              t.notify_tid if t.notify == SIGEV_THREAD_ID else 0)
            r.write(sev, raw.ljust(SIGEVENT_SIZE, b"\0"))
            r.write(want, struct.pack("<i", t.id))
            res = r.syscall("timer_create", t.clock_id, sev, want)
            if res < 0:
                raise RestoreError(f"POSIX timer {t.id}: timer_create: {os.strerror(-res)}")
            got = struct.unpack("<i", r.read(want, 4))[0]
            if got != t.id:
                raise RestoreError(f"POSIX timer {t.id}: timer_create gave id {got}")
            if t.value_ns:
                r.write(spec, ITIMERSPEC.pack(*divmod(t.interval_ns, 1_000_000_000),
                                              *divmod(t.value_ns, 1_000_000_000)))
                res = r.syscall("timer_settime", t.id, 0, spec, 0)
                if res < 0:
                    raise RestoreError(f"POSIX timer {t.id}: timer_settime: "
                                       f"{os.strerror(-res)}")
    finally:
        r.syscall("prctl", PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0)
