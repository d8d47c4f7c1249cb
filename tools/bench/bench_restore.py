"""Restore speed: images of N MiB (1 base + 3 incremental layers of a
workload with 1% of its pages rewritten every 100 ms) restored into a live
process, versus the limit measured in the same run: the same newest pages
decompressed from the same chain and written with process_vm_writev into a
plain anonymous mapping of a fresh process. Goal: within 1.5x.

    .venv/bin/python tools/bench/bench_restore.py [--sizes 256,1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import Workload, median

from checkpoint.dumper import Checkpointer
from checkpoint.images import open_chain
from checkpoint.kernel.syscalls import process_vm_writev
from checkpoint.restorer import restore

HOLDER = ("import mmap, sys, time\n"
          "m = mmap.mmap(-1, int(sys.argv[1]), mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
          "import ctypes\n"
          "print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)\n"
          "time.sleep(600)\n")


def make_images(mib: int, d: str) -> int:
    with Workload(mib, 1.0) as w:
        time.sleep(0.3)
        with Checkpointer(w.pid, d) as ck:
            for _ in range(3):
                ck.pre_dump()
            ck.dump()
        return w.pid


def limit(images: str, pid: int, mib: int) -> tuple[float, int]:
    """Decompress the newest pages and process_vm_writev them into a fresh
    process's anonymous mapping."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str((mib + 64) << 20)],
                              stdout=subprocess.PIPE, text=True)
    try:
        base = int(holder.stdout.readline())
        t = time.perf_counter()
        n = 0
        with open_chain(images) as chain:
            off = 0
            for run in chain.iter_runs(pid, zero_data=False):
                if run.zero:
                    continue
                process_vm_writev(holder.pid, run.data, base + off)
                off += len(run.data)
                n += run.npages
        return time.perf_counter() - t, n
    finally:
        holder.kill()
        holder.wait()


def ours(images: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = restore(images, inherit_stdio=False)
    elapsed = time.perf_counter() - t
    r.kill(signal.SIGKILL)
    r.wait()
    return elapsed, r.pages_restored


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-restore-")
    try:
        print(f"{'MiB':>6} {'pages':>8} {'restore s':>10} {'limit s':>8} {'ratio':>6}  (goal <= 1.5)")
        for mib in (int(x) for x in args.sizes.split(",")):
            d = os.path.join(work, f"img{mib}")
            pid = make_images(mib, d)
            a, b = [], []
            pages = 0
            for i in range(args.runs):
                for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                    if which == 0:
                        s, pages = ours(d)
                        a.append(s)
                    else:
                        s, _ = limit(d, pid, mib)
                        b.append(s)
            print(f"{mib:>6} {pages:>8} {median(a):>10.3f} {median(b):>8.3f} "
                  f"{median(a) / median(b):>6.2f}")
            shutil.rmtree(d)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
