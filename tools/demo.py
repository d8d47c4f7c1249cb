"""The README's main job, as far as the engine goes today.

1. `checkpoint check`: what this kernel offers.
2. Start a real multi-threaded Python program that counts and checks itself.
3. Freeze it 20 times, inject syscalls into every thread, thaw it; print the
   freezing time, the frozen window and the cost of one injected syscall.
4. Show the program continuing, its self-checks intact.

(Dump, kill and restore join this demo when the dumper and restorer land.)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoint.freezer import freeze  # noqa: E402
from checkpoint.inject import Injector  # noqa: E402

WORKLOAD = textwrap.dedent("""
    import threading, time, sys
    n = 0
    errors = 0
    def ticker():
        global n, errors
        while True:
            t0 = time.monotonic(); time.sleep(0.05)
            if time.monotonic() - t0 < 0.05: errors += 1
            n += 1
    for _ in range(3): threading.Thread(target=ticker, daemon=True).start()
    while True:
        print(f"tick {n} errors {errors}", flush=True)
        time.sleep(0.25)
""")


def main() -> int:
    print("== checkpoint check")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "checkpoint"), "check"],
                   check=True)
    print("\n== a real program: 4 threads ticking, checking their sleeps")
    prog = subprocess.Popen([sys.executable, "-c", WORKLOAD], stdout=subprocess.PIPE, text=True)
    try:
        print("  ", prog.stdout.readline().strip())
        freezing, frozen, per_call = [], [], []
        for _ in range(20):
            t0 = time.perf_counter()
            with freeze(prog.pid) as proc:
                freezing.append(proc.freezing_ms)
                nthreads = len(proc.tids)
                for tid in proc.tids:
                    with Injector(proc, tid) as r:
                        c0 = time.perf_counter()
                        assert r.call("gettid") == tid
                        per_call.append((time.perf_counter() - c0) * 1e6)
                        r.write(r.scratch, b"hello from the engine")
            frozen.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.05)
        print(f"\n== 20 freezes of {nthreads} threads, a syscall injected into each")
        print(f"  freezing time   median {statistics.median(freezing):7.2f} ms")
        print(f"  frozen window   median {statistics.median(frozen):7.2f} ms"
              " (freeze + inject into every thread + thaw)")
        print(f"  injected call   median {statistics.median(per_call):7.1f} us")
        print("\n== the program goes on")
        last = ""
        for _ in range(3):
            last = prog.stdout.readline().strip()
            print("  ", last)
        errors = int(last.split()[-1])
        print("  self-checks:", "intact" if errors == 0 else f"{errors} ERRORS")
        return 0 if errors == 0 else 1
    finally:
        prog.kill()
        prog.wait()


if __name__ == "__main__":
    sys.exit(main())
