"""A CPython target that checks itself while being frozen: a thread in
time.sleep (checks it never returns early), a thread blocked in queue.get,
a thread in select() on a pipe, a compute thread with a float invariant.
stdin: "status" -> STATUS line; "quit" -> FINAL line and exit."""
import os
import queue
import select
import sys
import threading
import time

errors = []
counts = {"sleep": 0, "queue": 0, "select": 0, "compute": 0}
q = queue.Queue()
r_fd, w_fd = os.pipe()


def sleeper():
    while True:
        t0 = time.monotonic()
        time.sleep(0.02)
        dt = time.monotonic() - t0
        if dt < 0.02:
            errors.append(f"sleep returned early {dt}")
        counts["sleep"] += 1


def getter():
    expect = 0
    while True:
        v = q.get()
        if v != expect:
            errors.append(f"queue order {v} != {expect}")
        expect = v + 1
        counts["queue"] += 1


def selecter():
    while True:
        t0 = time.monotonic()
        r, _, _ = select.select([r_fd], [], [], 0.03)
        if r:
            errors.append("idle pipe readable")
        elif time.monotonic() - t0 < 0.03:
            errors.append("select returned early")
        counts["select"] += 1


def compute():
    i, d = 0, 0.0
    while True:
        for _ in range(10000):
            i += 1
            d += 1.0
        if float(i) != d:
            errors.append("float invariant")
        counts["compute"] += 1


def feeder():
    n = 0
    while True:
        q.put(n)
        n += 1
        time.sleep(0.005)


for fn in (sleeper, getter, selecter, compute, feeder):
    threading.Thread(target=fn, daemon=True).start()


def report(tag):
    print(tag, f"errors={len(errors)}", *(f"{k}={v}" for k, v in counts.items()),
          *errors[:3], flush=True)


print("READY", os.getpid(), flush=True)
for line in sys.stdin:
    if line.startswith("status"):
        report("STATUS")
    elif line.startswith("quit"):
        break
report("FINAL")
