"""Dump figures on a workload of N MiB with P% of its pages rewritten every
100 ms (tools/bench/workload.c):

- frozen_ms of the first pre-dump, of later pre-dumps, and of the final dump
  after 3 pre-dumps (goals at 1 GiB / 1%: later pre-dumps <= 20 ms, final
  dump <= 50 ms);
- a full dump's wall time versus reading the same memory and compressing it
  with `zstandard` (same level and threads, written and fsynced), in the same
  run (goal <= 1.2x);
- image size versus the raw memory;
- the dumper's peak RSS dumping a 4 GiB target (goal <= 256 MiB).

    .venv/bin/python tools/bench/bench_dump.py [--sizes 256,1024] [--runs 3] [--rss-gib 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import zstandard
from common import ROOT, Workload, median

from checkpoint.dumper import Checkpointer
from checkpoint.kernel import procfs


def image_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def zstd_baseline(pid: int, out: str, level: int = 1) -> float:
    """Read every private writable anonymous page of the target (what the
    dumper stores for this workload) and compress it with zstandard."""
    t = time.perf_counter()
    cctx = zstandard.ZstdCompressor(level=level)
    buf = bytearray(1 << 20)
    mv = memoryview(buf)
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem, open(out, "wb") as f:
        for v in procfs.read_maps(pid):
            if not (v.writable and not v.shared and v.inode == 0):
                continue
            a = v.start
            while a < v.end:
                n = min(len(buf), v.end - a)
                got = os.preadv(mem.fileno(), [mv[:n]], a)
                f.write(cctx.compress(mv[:got]))
                a += n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t


def rounds(mib: int, pct: float, work: str) -> dict:
    with Workload(mib, pct) as w:
        time.sleep(0.3)
        d = os.path.join(work, f"r{mib}")
        shutil.rmtree(d, ignore_errors=True)
        out = {}
        with Checkpointer(w.pid, d) as ck:  # back to back, as iterative pre-copy runs
            first = ck.pre_dump()
            out["first"] = first.frozen_ms
            later = [ck.pre_dump() for _ in range(2)]
            out["later"] = max(x.frozen_ms for x in later)
            final = ck.dump()
            out["final"] = final.frozen_ms
            out["pages"] = [first.pages_written] + [x.pages_written for x in later] + \
                [final.pages_written]
        out["image"] = image_bytes(d)
        shutil.rmtree(d)
        return out


def full_vs_zstd(mib: int, pct: float, work: str, runs: int) -> tuple[float, float, int]:
    ours, base = [], []
    size = 0
    with Workload(mib, pct) as w:
        time.sleep(0.3)
        for i in range(runs):  # same threads both sides: 1
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                d = os.path.join(work, "full")
                shutil.rmtree(d, ignore_errors=True)
                if which == 0:
                    t = time.perf_counter()
                    with Checkpointer(w.pid, d, track="full", threads=1) as ck:
                        ck.dump(leave_running=True)
                    ours.append(time.perf_counter() - t)
                    size = image_bytes(d)
                else:
                    base.append(zstd_baseline(w.pid, os.path.join(work, "zstd.out")))
    return median(ours), median(base), size


def dumper_rss(gib: int, work: str) -> float:
    with Workload(gib * 1024, 0.0) as w:
        d = os.path.join(work, "rss")
        shutil.rmtree(d, ignore_errors=True)
        p = subprocess.Popen([sys.executable, "-m", "checkpoint", "dump", "-t", str(w.pid), "-D",
                              d, "-R", "--json"], cwd=ROOT, stdout=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        if status:
            raise SystemExit("dump for the RSS figure failed")
        shutil.rmtree(d)
        return ru.ru_maxrss / 1024  # KiB -> MiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--percent", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rss-gib", type=int, default=4)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-dump-")
    try:
        print(f"workload: P={args.percent}% of pages rewritten every 100 ms")
        print(f"{'MiB':>6} {'first ms':>9} {'later ms':>9} {'final ms':>9} "
              f"{'full dump s':>12} {'zstd s':>7} {'ratio':>6} {'image/raw':>10}")
        for mib in (int(x) for x in args.sizes.split(",")):
            r = rounds(mib, args.percent, work)
            ours, base, size = full_vs_zstd(mib, args.percent, work, args.runs)
            print(f"{mib:>6} {r['first']:>9.1f} {r['later']:>9.1f} {r['final']:>9.1f} "
                  f"{ours:>12.3f} {base:>7.3f} {ours / base:>6.2f} "
                  f"{size / (mib << 20):>10.3f}   pages per round {r['pages']}")
        print("goals at 1 GiB/1%: later <= 20 ms, final <= 50 ms, full dump ratio <= 1.2")
        if args.rss_gib:
            print(f"dumper peak RSS dumping a {args.rss_gib} GiB target: "
                  f"{dumper_rss(args.rss_gib, work):.0f} MiB (goal <= 256)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
