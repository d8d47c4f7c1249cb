#!/usr/bin/env python3
"""What signing costs: a chain written and read with and without a key.

    .venv/bin/python tools/bench/bench_signing.py [--size 512M] [--layers 4]
        [--dirty 0.1] [--threads 1] [--runs 3]

Builds SIZE bytes of realistic memory (bench_images' mix: Python heap, zero
and random regions), then a chain: a base layer holding all of it and
LAYERS-1 incremental layers each rewriting a DIRTY fraction of the regions.
For the unsigned and the signed chain, alternating in every run (so both
see the same machine load), medians over RUNS of:

  write    every layer through LayerWriter -> LocalSink (fsync, link)
  open     open_chain(verify_frames="crc"), the restore's up-front check;
           with the key it is the MAC pass over every byte
  verify   open_chain + Chain.verify(), what `checkpoint verify` does
  read     open_chain + iter_runs over every page (the restore's read)

and prints each as MB/s of raw pages and as the ratio signed/unsigned
time (1.00 = free). The signed read includes its MAC pass.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_images import PS, build_memory, parse_size  # noqa: E402
from checkpoint.images import open_chain  # noqa: E402
from checkpoint.images.writer import LayerWriter, LocalSink  # noqa: E402

BASE = 0x7F0000000000
KEY = os.urandom(32)


def layer_plan(regions, layers: int, dirty: float) -> list[list[tuple[int, int, str]]]:
    rnd = random.Random(3)
    plan = [regions]
    for _ in range(layers - 1):
        plan.append(sorted(rnd.sample(regions, max(1, int(len(regions) * dirty)))))
    return plan


def write_chain(buf, plan, d, level, threads, key) -> tuple[float, int]:
    if os.path.exists(d):
        shutil.rmtree(d)
    mv = memoryview(buf)
    t = time.perf_counter()
    parent = None
    raw = 0
    for i, regions in enumerate(plan):
        w = LayerWriter(LocalSink(d, i), index=i, parent=parent, level=level,
                        threads=threads, sign_key=key)
        for off, n, kind in regions:
            if kind == "zero":
                w.add_zero(1, BASE + off, n // PS)
            else:
                w.add_pages(1, BASE + off, mv[off:off + n])
                raw += n
        parent = w.close().parent_ref
    return time.perf_counter() - t, raw


def open_crc(d, threads, key) -> float:
    t = time.perf_counter()
    with open_chain(d, verify_frames="crc", threads=threads, sign_key=key):
        pass
    return time.perf_counter() - t


def verify(d, threads, key) -> float:
    t = time.perf_counter()
    with open_chain(d, threads=threads, sign_key=key) as c:
        c.verify()
    return time.perf_counter() - t


def read(d, threads, key) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    with open_chain(d, verify_frames="crc", threads=threads, sign_key=key) as c:
        for pid in c.pids():
            for run in c.iter_runs(pid, zero_data=False):
                if not run.zero:
                    n += len(run.data)
    return time.perf_counter() - t, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dirty", type=float, default=0.1)
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = parse_size(args.size) // PS * PS
    buf, regions = build_memory(size)
    plan = layer_plan(regions, args.layers, args.dirty)
    scratch = tempfile.mkdtemp(prefix="bench-signing-", dir=args.dir)
    res: dict[str, dict[str, list[float]]] = {m: {k: [] for k in ("write", "open", "verify",
                                                                  "read")}
                                               for m in ("unsigned", "signed")}
    try:
        raw = chain_bytes = 0
        for r in range(args.runs):
            order = ("unsigned", "signed") if r % 2 == 0 else ("signed", "unsigned")
            for mode in order:
                key = KEY if mode == "signed" else None
                d = os.path.join(scratch, mode)
                t, raw = write_chain(buf, plan, d, args.level, args.threads, key)
                res[mode]["write"].append(t)
                chain_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
                res[mode]["open"].append(open_crc(d, args.threads, key))
                res[mode]["verify"].append(verify(d, args.threads, key))
                t, n = read(d, args.threads, key)
                res[mode]["read"].append(t)
        print(f"chain: {args.layers} layers, {raw / 2**20:.0f} MiB of data pages "
              f"({size / 2**20:.0f} MiB memory, {args.dirty:.0%} of regions rewritten per "
              f"incremental layer), {chain_bytes / 2**20:.0f} MiB of files; level {args.level}, "
              f"threads {args.threads}, medians of {args.runs} runs")
        print(f"{'':8s} {'unsigned':>16s} {'signed':>16s} {'signed/unsigned time':>22s}")
        for k in ("write", "open", "verify", "read"):
            u = statistics.median(res["unsigned"][k])
            s = statistics.median(res["signed"][k])
            print(f"{k:8s} {u:7.3f} s {raw / u / 1e6:5.0f} MB/s {s:7.3f} s "
                  f"{raw / s / 1e6:5.0f} MB/s {s / u:10.3f}")
        print("runs (s): " + "; ".join(
            f"{m} {k} " + " ".join(f"{x:.3f}" for x in v)
            for m, ks in res.items() for k, v in ks.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
