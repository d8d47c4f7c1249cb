"""A process that forks all the time, for tests/test_trees.py: a child every
millisecond or so, each living 0-8 ms and exiting with a code the parent
remembers; the parent reaps them as they end and checks each status. On
"check" it prints "STATE <forked> <reaped> <bad> <running>"."""

import os
import select
import sys
import time

expected: dict[int, int] = {}
forked = reaped = bad = 0


def reap() -> None:
    global reaped, bad
    while expected:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reaped += 1
        if os.waitstatus_to_exitcode(status) != expected.pop(pid, None):
            bad += 1


print("READY", flush=True)
while True:
    pid = os.fork()
    if pid == 0:
        time.sleep(0.002 * (forked % 5))
        os._exit(forked % 200)
    expected[pid] = forked % 200
    forked += 1
    reap()
    r, _, _ = select.select([0], [], [], 0.001)
    if r:
        line = sys.stdin.readline()
        if not line:
            break
        if line.startswith("check"):
            print(f"STATE {forked} {reaped} {bad} {len(expected)}", flush=True)
