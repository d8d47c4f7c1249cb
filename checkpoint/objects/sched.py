"""Scheduling attributes: each thread's policy, real-time priority, nice
value and CPU affinity; the process's oom_score_adj.

All are per thread in Linux except oom_score_adj (per process). They are
read from outside at the dump (the sched_get* calls take a TID) and set at
the restore by syscalls the new thread makes on itself while it still has
the restorer's credentials, so the kernel lets it have no more than the
caller could give (a real-time policy or a negative nice needs
CAP_SYS_NICE or a matching RLIMIT_RTPRIO/RLIMIT_NICE, which were restored
before). oom_score_adj is written by the engine into /proc/PID, with the
caller's privilege (lowering it needs CAP_SYS_RESOURCE).

An affinity mask that held every CPU of the dumping host is recorded as
"every CPU" (an empty list), so a process migrated to a larger host is not
confined to the CPUs the smaller one had. SCHED_DEADLINE (its runtime,
deadline and period need sched_getattr) is refused by name.
"""

from __future__ import annotations

import errno
import os
import struct

from ..errors import RestoreError, UnsupportedObject

SCHED_OTHER, SCHED_FIFO, SCHED_RR, SCHED_BATCH, SCHED_IDLE, SCHED_DEADLINE = 0, 1, 2, 3, 5, 6
SCHED_RESET_ON_FORK = 0x40000000
POLICY_NAME = {SCHED_OTHER: "SCHED_OTHER", SCHED_FIFO: "SCHED_FIFO", SCHED_RR: "SCHED_RR",
               SCHED_BATCH: "SCHED_BATCH", SCHED_IDLE: "SCHED_IDLE"}
PRIO_PROCESS = 0
MAX_CPUS = 8192


def _online() -> set[int]:
    """The CPUs of this host (/sys/devices/system/cpu/online: "0-3,6")."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return set(range(os.cpu_count() or 1))
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def dump_sched(core, tid: int) -> None:
    """Fill the scheduling fields of a thread's CoreEntry."""
    policy = os.sched_getscheduler(tid)
    if policy & ~SCHED_RESET_ON_FORK == SCHED_DEADLINE:
        raise UnsupportedObject(f"thread {tid} runs under SCHED_DEADLINE, which is not "
                                "restored; give it another policy (chrt) before the dump")
    core.sched_policy = policy
    core.sched_priority = os.sched_getparam(tid).sched_priority
    core.sched_nice = os.getpriority(os.PRIO_PROCESS, tid)
    cpus = os.sched_getaffinity(tid)
    if cpus != _online():
        core.cpus_allowed.extend(sorted(cpus))
    core.has_sched = True


def validate(core) -> None:
    """Refuse values no kernel would have given (an edited image)."""
    if not core.has_sched:
        return
    policy = core.sched_policy & ~SCHED_RESET_ON_FORK
    bad = None
    if policy not in POLICY_NAME or core.sched_policy & ~(SCHED_RESET_ON_FORK | 0xF):
        bad = f"scheduling policy {core.sched_policy}"
    elif (policy in (SCHED_FIFO, SCHED_RR)) != (1 <= core.sched_priority <= 99):
        bad = f"real-time priority {core.sched_priority} for {POLICY_NAME[policy]}"
    elif not -20 <= core.sched_nice <= 19:
        bad = f"nice value {core.sched_nice}"
    elif any(c >= MAX_CPUS for c in core.cpus_allowed):
        bad = f"CPU number {max(core.cpus_allowed)} in its affinity"
    if bad:
        raise RestoreError(f"image: thread {core.tid} has an impossible {bad}")


def restore_sched(r, core) -> None:
    """Set the thread's own policy, priority, nice and affinity (``r`` is an
    Injector in that thread, still holding the restorer's credentials)."""
    if not core.has_sched:
        return
    tid = core.tid
    policy = core.sched_policy
    name = POLICY_NAME[policy & ~SCHED_RESET_ON_FORK]
    r.write(r.scratch, struct.pack("<i", core.sched_priority))
    res = r.syscall("sched_setscheduler", 0, policy, r.scratch)
    if res < 0:
        raise RestoreError(f"thread {tid}: cannot set its scheduling policy {name} "
                           f"(priority {core.sched_priority}): {os.strerror(-res)}"
                           + (" (needs CAP_SYS_NICE or RLIMIT_RTPRIO)"
                              if res == -errno.EPERM else ""))
    if policy & ~SCHED_RESET_ON_FORK not in (SCHED_FIFO, SCHED_RR):
        res = r.syscall("setpriority", PRIO_PROCESS, 0, core.sched_nice)
        if res < 0:
            raise RestoreError(f"thread {tid}: cannot set its nice value {core.sched_nice}: "
                               f"{os.strerror(-res)}")
    if core.cpus_allowed:
        here = _online()
        cpus = [c for c in core.cpus_allowed if c in here]
        if not cpus:
            raise RestoreError(f"thread {tid} may run only on CPUs "
                               f"{list(core.cpus_allowed)}, none of which this host has")
        mask = bytearray(max(cpus) // 64 * 8 + 8)
        for c in cpus:
            mask[c // 8] |= 1 << (c % 8)
        r.write(r.scratch, bytes(mask))
        res = r.syscall("sched_setaffinity", 0, len(mask), r.scratch)
        if res < 0:
            raise RestoreError(f"thread {tid}: cannot set its CPU affinity {cpus}: "
                               f"{os.strerror(-res)}")


def dump_oom(p, pid: int) -> None:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        p.oom_score_adj = int(f.read().strip())
    p.has_oom_score_adj = True


def restore_oom(p, engine_pid: int) -> None:
    if not p.has_oom_score_adj:
        return
    if not -1000 <= p.oom_score_adj <= 1000:
        raise RestoreError(f"image: impossible oom_score_adj {p.oom_score_adj}")
    try:
        with open(f"/proc/{engine_pid}/oom_score_adj", "w") as f:
            f.write(str(p.oom_score_adj))
    except OSError as exc:
        raise RestoreError(f"cannot set oom_score_adj {p.oom_score_adj}: {exc.strerror}"
                           + (" (lowering it needs CAP_SYS_RESOURCE)"
                              if exc.errno in (errno.EACCES, errno.EPERM) else "")) from None
