"""Target for tests/test_timers.py: interval and POSIX timers that must keep
firing after a restore.

    timers_target.py all      the three itimers, periodic, and POSIX timers
                              (SIGEV_SIGNAL on two clocks, SIGEV_THREAD_ID to a
                              helper thread, a SIGEV_NONE one-shot)
    timers_target.py oneshot  on "arm": a 0.3 s one-shot ITIMER_REAL only
    timers_target.py foreign  a timer on its parent's CPU clock (refused at dump)
    timers_target.py idle     long ITIMER_VIRTUAL and ITIMER_PROF in a process
                              that sleeps (uses no CPU); "get" prints their
                              values in microseconds

Prints READY {json}; on "check" it verifies its own timers for a second of
busy time and prints STATE OK or STATE BAD reasons. The main loop burns CPU
(ITIMER_VIRTUAL/PROF count it).
"""

import ctypes
import json
import os
import select
import signal
import struct
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
NR_TIMER_CREATE, NR_TIMER_SETTIME, NR_TIMER_GETTIME = 222, 223, 224
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID = 0, 1, 4
CLOCK_REALTIME, CLOCK_MONOTONIC = 0, 1

counts: dict[int, int] = {}


def count(sig, _frame):
    counts[sig] = counts.get(sig, 0) + 1


def timer_create(clock, notify, signo, value, tid=0) -> int:
    sev = ctypes.create_string_buffer(struct.pack("<Qiii", value, signo, notify, tid), 64)
    tid_out = ctypes.c_int(-1)
    if libc.syscall(NR_TIMER_CREATE, clock, sev, ctypes.byref(tid_out)) < 0:
        raise OSError(ctypes.get_errno(), "timer_create")
    return tid_out.value


def timer_settime(tid, value, interval) -> None:
    spec = struct.pack("<qqqq", *divmod(int(interval * 1e9), 10**9),
                       *divmod(int(value * 1e9), 10**9))
    if libc.syscall(NR_TIMER_SETTIME, tid, 0, ctypes.c_char_p(spec), None) < 0:
        raise OSError(ctypes.get_errno(), "timer_settime")


def timer_gettime(tid) -> tuple[float, float]:
    """(value, interval) in seconds."""
    buf = ctypes.create_string_buffer(32)
    if libc.syscall(NR_TIMER_GETTIME, tid, buf) < 0:
        raise OSError(ctypes.get_errno(), f"timer_gettime({tid})")
    isec, insec, vsec, vnsec = struct.unpack("<qqqq", buf.raw)
    return vsec + vnsec / 1e9, isec + insec / 1e9


def proc_timer_ids() -> list[int]:
    with open("/proc/self/timers") as f:
        return sorted(int(line.split()[1]) for line in f if line.startswith("ID:"))


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


RT = signal.SIGRTMIN
ITIMERS = {signal.ITIMER_REAL: (signal.SIGALRM, 0.05),
           signal.ITIMER_VIRTUAL: (signal.SIGVTALRM, 0.07),
           signal.ITIMER_PROF: (signal.SIGPROF, 0.11)}
# name -> (clock, notify, signal, interval); "thread" signals the helper thread
POSIX = {"mono": (CLOCK_MONOTONIC, SIGEV_SIGNAL, RT + 1, 0.03),
         "real": (CLOCK_REALTIME, SIGEV_SIGNAL, RT + 2, 0.045),
         "thread": (CLOCK_MONOTONIC, SIGEV_THREAD_ID, RT + 3, 0.04),
         "none": (CLOCK_MONOTONIC, SIGEV_NONE, 0, 0.0)}
NONE_VALUE = 100.0


def tick_padding() -> float:
    """What the kernel adds to a CPU itimer's value at setitimer (a tick)."""
    signal.setitimer(signal.ITIMER_PROF, 1000.0)
    value, _ = signal.getitimer(signal.ITIMER_PROF)
    signal.setitimer(signal.ITIMER_PROF, 0)
    return value - 1000.0 + 1e-6


def setup_all() -> dict:
    for sig, _ in ITIMERS.values():
        signal.signal(sig, count)
    for _, _, sig, _ in POSIX.values():
        if sig:
            signal.signal(sig, count)
    helper_tid = []
    started = threading.Event()

    def helper():
        helper_tid.append(threading.get_native_id())
        started.set()
        while True:
            time.sleep(1)

    threading.Thread(target=helper, daemon=True).start()
    started.wait()
    ids = {}
    spare = timer_create(CLOCK_MONOTONIC, SIGEV_NONE, 0, 0)  # leaves a gap in the ids
    for name, (clock, notify, sig, interval) in POSIX.items():
        ids[name] = timer_create(clock, notify, sig, 1000 + len(ids),
                                 helper_tid[0] if notify == SIGEV_THREAD_ID else 0)
    libc.syscall(226, spare)  # timer_delete
    for name, (_, _, _, interval) in POSIX.items():
        timer_settime(ids[name], interval or NONE_VALUE, interval)
    pad = tick_padding()  # before arming: it uses ITIMER_PROF
    for which, (_, interval) in ITIMERS.items():
        signal.setitimer(which, interval, interval)
    return {"ids": ids, "helper": helper_tid[0], "pad": pad}


def check_all(info: dict) -> list[str]:
    bad = []
    ids = info["ids"]
    if proc_timer_ids() != sorted(ids.values()):
        bad.append(f"timer ids {proc_timer_ids()}, created {sorted(ids.values())}")
    for which, (_, interval) in ITIMERS.items():
        value, got = signal.getitimer(which)
        # a CPU timer not yet expired since setitimer has a tick on top
        top = interval + (info["pad"] if which != signal.ITIMER_REAL else 1e-6)
        if abs(got - interval) > 1e-6 or not 0 < value <= top:
            bad.append(f"itimer {which}: value {value} interval {got}, set {interval}")
    for name, (_, _, _, interval) in POSIX.items():
        try:
            value, got = timer_gettime(ids[name])
        except OSError as e:
            bad.append(f"timer {name} ({ids[name]}): {e}")
            continue
        if abs(got - interval) > 1e-9:
            bad.append(f"timer {name}: interval {got}, set {interval}")
        top = interval or NONE_VALUE
        if not (top - 30 if name == "none" else 0) < value <= top:
            bad.append(f"timer {name}: value {value}")
    before = dict(counts)
    window = 1.0
    busy(window)
    # (signal, interval, at least this share of the ideal count): CPU timers
    # get what CPU the shared machine gives
    rates = [(sig, iv, 0.3) for which, (sig, iv) in ITIMERS.items()
             if which == signal.ITIMER_REAL]
    rates += [(sig, iv, 0.15) for which, (sig, iv) in ITIMERS.items()
              if which != signal.ITIMER_REAL]
    rates += [(sig, iv, 0.3) for _, _, sig, iv in POSIX.values() if sig]
    for sig, iv, share in rates:
        n = counts.get(sig, 0) - before.get(sig, 0)
        ideal = window / iv
        if not max(1, ideal * share) <= n <= ideal * 1.5 + 2:
            bad.append(f"signal {sig}: {n} in {window} s, interval {iv}")
    return bad


def main() -> None:
    mode = sys.argv[1]
    info = setup_all() if mode == "all" else {}
    if mode == "oneshot":
        signal.signal(signal.SIGALRM, count)
    if mode == "idle":
        signal.setitimer(signal.ITIMER_VIRTUAL, 500.0)
        signal.setitimer(signal.ITIMER_PROF, 600.0)
    if mode == "foreign":  # MAKE_PROCESS_CPUCLOCK(ppid, CPUCLOCK_SCHED)
        info["id"] = timer_create(~os.getppid() << 3 | 2, SIGEV_NONE, 0, 0)
    print("READY " + json.dumps(info), flush=True)
    stdin = sys.stdin.fileno()
    buf = b""
    while True:
        r, _, _ = select.select([stdin], [], [], None if mode == "idle" else 0)
        if not r:
            busy(0.01)
            continue
        try:
            chunk = os.read(stdin, 4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            cmd = line.decode().strip()
            if cmd == "arm":
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                print("ARMED", flush=True)
            elif cmd == "get":
                us = [round(signal.getitimer(w)[0] * 1e6)
                      for w in (signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)]
                print("ITIMERS " + " ".join(map(str, us)), flush=True)
            elif cmd == "count":
                print(f"COUNT {counts.get(signal.SIGALRM, 0)}", flush=True)
            elif cmd == "check" and mode == "all":
                bad = check_all(info)
                print("STATE " + ("OK" if not bad else "BAD " + "; ".join(bad)), flush=True)
            elif cmd == "check" and mode == "oneshot":
                end = time.monotonic() + 2
                while not counts.get(signal.SIGALRM) and time.monotonic() < end:
                    busy(0.01)
                n = counts.get(signal.SIGALRM, 0)
                armed = signal.getitimer(signal.ITIMER_REAL)
                ok = n == 1 and armed == (0.0, 0.0)
                print("STATE " + ("OK" if ok else f"BAD {n} SIGALRM, itimer {armed}"),
                      flush=True)


if __name__ == "__main__":
    main()
