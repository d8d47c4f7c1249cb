"""Freeze cost for 1, 10 and 100 threads.

For each thread count: the engine's freeze (SEIZE + INTERRUPT of every
thread, re-listing until stable), the thaw, and one injected syscall per
thread; as a baseline measured in the same run, the kernel's own group stop:
SIGSTOP to the target until waitpid(WUNTRACED) reports the whole group
stopped, then SIGCONT. Medians of --runs.

    .venv/bin/python tools/bench/bench_freeze.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import time

from common import Workload, median

from checkpoint.freezer import freeze_process
from checkpoint.inject import Injector


def group_stop_ms(pid: int) -> float:
    t = time.perf_counter()
    os.kill(pid, signal.SIGSTOP)
    os.waitpid(pid, os.WUNTRACED)
    ms = (time.perf_counter() - t) * 1e3
    os.kill(pid, signal.SIGCONT)
    os.waitpid(pid, os.WCONTINUED)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    print(f"{'threads':>7} {'freeze ms':>10} {'thaw ms':>8} {'inject/thr us':>14} "
          f"{'SIGSTOP ms':>11} {'freeze/SIGSTOP':>15}")
    for n in (1, 10, 100):
        with Workload(16, 0.0, threads=n - 1) as w:
            time.sleep(0.2)
            fz, th, inj, base = [], [], [], []
            for i in range(args.runs):
                if i % 2:
                    base.append(group_stop_ms(w.pid))
                t = time.perf_counter()
                proc = freeze_process(w.pid)
                fz.append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                for tid in proc.tids:
                    with Injector(proc, tid) as r:
                        r.call("getpid")
                inj.append((time.perf_counter() - t) * 1e6 / len(proc.tids))
                t = time.perf_counter()
                proc.thaw()
                th.append((time.perf_counter() - t) * 1e3)
                if not i % 2:
                    base.append(group_stop_ms(w.pid))
            print(f"{n:>7} {median(fz):>10.2f} {median(th):>8.2f} {median(inj):>14.0f} "
                  f"{median(base):>11.2f} {median(fz) / median(base):>15.2f}")


if __name__ == "__main__":
    main()
