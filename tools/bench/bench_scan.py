"""Benchmark of the PAGEMAP_SCAN scanner and the hash tracker over a 1 GiB
target, with baselines measured in the same run:

- get-and-clear (uffd-wp async, fast path) for 1 GiB all dirty, nothing
  dirty, 1,000 scattered dirty pages; PRESENT scan of 1 GiB;
  baseline: reading the classic /proc/PID/pagemap entries for the same range
  (and finding the present runs in them);
- hash tracker round over 1 GiB (nothing dirty / 1,000 dirty); baseline: a
  plain read of the same 1 GiB through /proc/PID/mem into a 1 MiB buffer.

    .venv/bin/python tools/bench/bench_scan.py [--gib 1] [--repeat 5]

Prints medians and ratios (the machine's 2 vCPUs are sometimes shared).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from checkpoint.kernel.procfs import PAGE_SIZE, read_maps  # noqa: E402
from checkpoint.tracking.hashing import DEFAULT_ALGORITHM, HashTracker  # noqa: E402
from checkpoint.tracking.scan import (  # noqa: E402
    PagemapScanner, batch_pages, pagemap_runs, read_pagemap_entries,
)
from conftest import build_target  # noqa: E402


class T:
    def __init__(self):
        self.p = subprocess.Popen([str(build_target("scan_target"))], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.p.stdout.readline().startswith("READY")

    def cmd(self, s: str) -> str:
        self.p.stdin.write(s + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line and not line.startswith("ERR"), (s[:50], line)
        return line

    def stop(self):
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait()


def timed(fn, repeat, setup=None):
    ts, out = [], None
    for _ in range(repeat):
        if setup:
            setup()
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--scattered", type=int, default=1000)
    ap.add_argument("--algorithm", default=DEFAULT_ALGORITHM,
                    help="hash tracker digest: xxh3-64 (needs xxhash) or blake2b-64")
    a = ap.parse_args()
    n = int(a.gib * (1 << 30)) // PAGE_SIZE
    rng = random.Random(7)
    t = T()
    try:
        _, mid, addr = t.cmd(f"map anon {n}").split()
        base, end = int(addr, 16), int(addr, 16) + n * PAGE_SIZE
        t.cmd(f"uffd {mid}")
        t.cmd(f"w {mid} 0 {n}")
        res = {}
        with PagemapScanner(t.p.pid, vec_len=1024) as s:
            gc = lambda: batch_pages_all(s.wp_get_and_clear(base, end))  # noqa: E731
            gc()
            res["gc_all_dirty"] = timed(gc, a.repeat, lambda: t.cmd(f"w {mid} 0 {n}"))
            res["gc_nothing"] = timed(gc, a.repeat)
            pick = lambda: t.cmd(f"wl {mid} " + " ".join(  # noqa: E731
                map(str, rng.sample(range(n), a.scattered))))
            res["gc_scattered"] = timed(gc, a.repeat, pick)
            res["gc_scattered_mp512"] = timed(
                lambda: batch_pages_all(s.wp_get_and_clear(base, end, max_pages=512)), a.repeat, pick)
            res["present_scan"] = timed(lambda: batch_pages_all(s.present(base, end)), a.repeat)
        fd = os.open(f"/proc/{t.p.pid}/pagemap", os.O_RDONLY)
        buf = bytearray(2 << 20)

        def classic():
            pages = 0
            for b, ent in read_pagemap_entries(fd, base, end, buf):
                pages += sum(e - s for s, e in pagemap_runs(ent, b, "present")) // PAGE_SIZE
            return pages
        res["classic_pagemap"] = timed(classic, a.repeat)

        def classic_read_only():
            for _ in read_pagemap_entries(fd, base, end, buf):
                pass
        res["classic_read_only"] = timed(classic_read_only, a.repeat)
        os.close(fd)

        mem = os.open(f"/proc/{t.p.pid}/mem", os.O_RDONLY)
        rbuf = bytearray(1 << 20)
        mv = memoryview(rbuf)

        def plain_read():
            for off in range(base, end, len(rbuf)):
                os.preadv(mem, [mv], off)
        res["plain_read"] = timed(plain_read, a.repeat)
        os.close(mem)

        vmas = [v for v in read_maps(t.p.pid) if v.start <= base < v.end]
        hr = HashTracker(algorithm=a.algorithm)

        def hash_round():
            c = sum(batch_pages(b.regions) for b in hr.collect(t.p.pid, vmas))
            hr.arm(t.p.pid, vmas)
            return c
        res["hash_first"] = timed(hash_round, 1)
        res["hash_nothing"] = timed(hash_round, max(1, a.repeat // 2))
        res["hash_scattered"] = timed(hash_round, max(1, a.repeat // 2), pick)
    finally:
        t.stop()

    gib = f"{a.gib:g} GiB"
    print(f"# bench_scan: {gib} ({n} pages), median of {a.repeat}; hash digest: {a.algorithm}")
    for k, (sec, out) in res.items():
        print(f"{k:22s} {sec * 1e3:9.2f} ms   pages={out}")
    r = lambda x, y: res[x][0] / res[y][0]  # noqa: E731
    print("# ratios (lower is better for the first)")
    print(f"get-and-clear all dirty   / classic pagemap read+parse : {r('gc_all_dirty', 'classic_pagemap'):.3f}")
    print(f"get-and-clear nothing     / classic pagemap read+parse : {r('gc_nothing', 'classic_pagemap'):.3f}")
    print(f"get-and-clear {a.scattered} scattered / classic pagemap read+parse : {r('gc_scattered', 'classic_pagemap'):.3f}")
    print(f"PRESENT scan              / classic pagemap read only  : {r('present_scan', 'classic_read_only'):.3f}")
    print(f"hash round (nothing)      / plain /proc/PID/mem read   : {r('hash_nothing', 'plain_read'):.2f}")
    print(f"hash round ({a.scattered} dirty)   / get-and-clear same          : {r('hash_scattered', 'gc_scattered'):.0f}")


def batch_pages_all(it) -> int:
    return sum(batch_pages(b) for b in it)


if __name__ == "__main__":
    main()
