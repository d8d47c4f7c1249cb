"""Process trees: a parent and 8 forked workers sharing MiB of private memory
copy-on-write (tests/targets/cow_tree.c) dumped and restored, against the
same memory in a single process (the parent alone, no workers) in the same
run: dump time, frozen time, restore time, image size and the memory the
processes use (proportional set sizes summed) before the dump and after the
restore. The goal: the tree costs about what the single process costs, and
its memory stays shared (after/before within 1.1x, not 9x).

    .venv/bin/python tools/bench/bench_tree.py [--mib 1024] [--workers 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, median

from checkpoint.dumper import Checkpointer
from checkpoint.restorer import restore

sys.path.insert(0, os.path.join(ROOT, "tests"))
from conftest import build_target  # noqa: E402


def pss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with open(f"/proc/{p}/task/{p}/children") as f:
            todo.extend(int(x) for x in f.read().split())
    return out


def one_run(mib: int, workers: int, d: str) -> dict:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    proc = subprocess.Popen([str(build_target("cow_tree")), str(mib), str(workers)],
                            stdin=r_in, stdout=w_out, stderr=subprocess.DEVNULL)
    out = os.fdopen(r_out)
    line = out.readline()
    if not line.startswith("READY"):
        raise SystemExit(f"cow_tree did not start: {line!r}")
    pids = tree(proc.pid)
    before = pss_kib(pids)
    t0 = time.perf_counter()
    with Checkpointer(proc.pid, d, progress=False) as ck:
        st = ck.dump()
    dump_s = time.perf_counter() - t0
    proc.wait()
    # the killed workers are reaped by init (whenever it gets to it): the
    # restore needs their PIDs free, and that wait is not the restore's
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.005)
    t0 = time.perf_counter()
    r = restore(d, inherit={os.readlink(f"/proc/self/fd/{r_in}"): r_in,
                            os.readlink(f"/proc/self/fd/{w_out}"): w_out},
                inherit_stdio=False)
    restore_s = time.perf_counter() - t0
    after = pss_kib(tree(r.pid))
    os.write(w_in, b"check\n")
    with out as f:
        answer = f.readline()
        ok = answer.startswith("CHECK good")
        if not ok:
            print(f"  {workers} workers: {answer.strip()!r}", file=sys.stderr)
        os.write(w_in, b"quit\n")
        r.wait(60)
    for fd in (r_in, w_in, w_out):
        os.close(fd)
    return {"dump_s": dump_s, "frozen_ms": st.frozen_ms, "restore_s": restore_s,
            "stored_mib": st.bytes_stored / 2**20, "raw_mib": st.bytes_raw / 2**20,
            "pss_before_mib": before / 1024, "pss_after_mib": after / 1024, "ok": ok,
            "processes": len(st.processes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    res = {}
    for name, n in (("single", 0), ("tree", args.workers)):
        runs = []
        for _ in range(args.runs):
            d = tempfile.mkdtemp(prefix="bench-tree-")
            try:
                runs.append(one_run(args.mib, n, os.path.join(d, "img")))
            finally:
                shutil.rmtree(d, ignore_errors=True)
        res[name] = {k: median([r[k] for r in runs]) if k != "ok" else all(r[k] for r in runs)
                     for k in runs[0]}
    s, t = res["single"], res["tree"]
    print(f"{args.mib} MiB, 1 + {args.workers} processes vs 1, medians of {args.runs}:")
    for k, unit in (("dump_s", "s"), ("frozen_ms", "ms"), ("restore_s", "s"),
                    ("raw_mib", "MiB"), ("stored_mib", "MiB"), ("pss_before_mib", "MiB"),
                    ("pss_after_mib", "MiB")):
        print(f"  {k:15s} single {s[k]:9.2f} {unit:3s}  tree {t[k]:9.2f} {unit:3s}  "
              f"tree/single {t[k] / s[k] if s[k] else 0:5.2f}x")
    print(f"  tree memory after/before restore: {t['pss_after_mib'] / t['pss_before_mib']:.2f}x"
          f" (goal <= 1.1x); every process checked its memory: {s['ok'] and t['ok']}")


if __name__ == "__main__":
    main()
