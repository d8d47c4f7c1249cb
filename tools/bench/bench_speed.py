"""Speed against a limit measured in the same run (issue 14).

Workload ``maps``: a process with N separate one-page mappings
(``many_maps.c``: protections alternating so none merge, a byte written in
every writable one), dumped once, then restored ``--runs`` times (the time
of ``restore()`` in a fresh Python, imports excluded). The limit is the same
program making the same mmaps natively and writing the same bytes: its wall
time from exec to exit. CRIU 4.2 on this machine: 0.27 s for ~30,000
mappings (docs/benchmarks.md).

``--before REF``: also restore the same image with the engine of git REF
(checked out in a temporary worktree, removed after), interleaved with ours.

    .venv/bin/python tools/bench/bench_speed.py [--maps 30000] [--runs 5] [--before main]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, build, median

from checkpoint.dumper import Checkpointer

RESTORE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from checkpoint.restorer import restore
t = time.perf_counter()
r = restore(sys.argv[2], inherit_stdio=False, stdio="null")
elapsed = time.perf_counter() - t
with open(f"/proc/{r.pid}/maps") as f:
    vmas = sum(1 for _ in f)
r.kill(9)
r.wait()
print(elapsed, vmas)
"""


def dump_maps(n: int, d: str) -> None:
    p = subprocess.Popen([build("many_maps"), str(n), "hold"], stdout=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"many_maps did not start: {line!r}")
        with Checkpointer(p.pid, d) as ck:
            ck.dump()
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def restore_with(tree: str, d: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", RESTORE, tree, d], check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def native_once(n: int) -> float:
    t = time.perf_counter()
    subprocess.run([build("many_maps"), str(n), "native"], check=True)
    return time.perf_counter() - t


def checkout(ref: str, work: str) -> str:
    tree = os.path.join(work, "before")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-q", "--detach", tree, ref],
                   check=True)
    return tree


def bench_maps(n: int, runs: int, work: str, before: str | None) -> None:
    d = os.path.join(work, "maps")
    dump_maps(n, d)
    times: dict[str, list[float]] = {"ours": [], "limit": [], "before": []}
    vmas = 0
    for i in range(runs):
        order = ["ours", "limit"] + (["before"] if before else [])
        for which in order if i % 2 == 0 else reversed(order):
            if which == "ours":
                s, vmas = restore_with(ROOT, d)
            elif which == "before":
                s, _ = restore_with(before, d)
            else:
                s = native_once(n)
            times[which].append(s)
    a, b = median(times["ours"]), median(times["limit"])
    print(f"{'maps':<8} {vmas:>8} {a:>10.3f} {b:>8.3f} {a / b:>6.2f}", end="")
    if before:
        c = median(times["before"])
        print(f" {c:>9.3f} {c / a:>8.1f}x", end="")
    print()
    shutil.rmtree(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--maps", type=int, default=30000, help="mappings of the maps workload")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--before", metavar="REF", help="also restore with the engine of git REF")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-speed-")
    before = None
    try:
        if args.before:
            before = checkout(args.before, work)
        print(f"{'workload':<8} {'VMAs':>8} {'restore s':>10} {'limit s':>8} {'ratio':>6}"
              + (f" {'before s':>9} {'speedup':>9}" if before else "")
              + "   (medians; limit: the same mmaps made natively; goal <= 0.3 s)")
        bench_maps(args.maps, args.runs, work, before)
    finally:
        if before:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", before],
                           check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
