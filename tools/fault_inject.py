#!/usr/bin/env python3
"""The long mode of tests/test_faults.py: many engine rounds killed or
signalled at random points (and at every occurrence of every fault point),
each followed by a final dump and a restore compared page by page with the
frozen target.

    .venv/bin/python tools/fault_inject.py                 # 100 random runs per verb
    .venv/bin/python tools/fault_inject.py --runs 20 --verbs pre-dump --mib 256 --writers 4
    .venv/bin/python tools/fault_inject.py --every-point   # every occurrence of every point too

Prints one line per run and a summary; exits 1 at the first wrong restore
(with what differed), 0 when every run restored exactly.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fault_helpers as fh  # noqa: E402
from conftest import build_target  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="random runs per verb (default 100)")
    ap.add_argument("--verbs", nargs="+", default=["pre-dump", "dump-R", "dump"],
                    choices=["pre-dump", "dump-R", "dump"])
    ap.add_argument("--mib", type=int, default=64, help="target memory (default 64 MiB)")
    ap.add_argument("--writers", type=int, default=3, help="writer threads (default 3)")
    ap.add_argument("--churn", action="store_true", help="the target maps/unmaps buffers too")
    ap.add_argument("--max-delay", type=float, default=0.4,
                    help="random kill delay after the engine starts, at most (s)")
    ap.add_argument("--every-point", action="store_true",
                    help="also SIGKILL at every occurrence of every fault point")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    exe = str(build_target("memcheck"))
    total = bad = 0
    with tempfile.TemporaryDirectory(prefix="faults-") as work:
        for verb in args.verbs:
            runner = fh.Runner(work, exe, mib=args.mib, writers=args.writers, churn=args.churn,
                               rng=rng)
            t0 = time.monotonic()
            try:
                faults = []
                if args.every_point:
                    t = runner.target
                    d = f"{work}/points-{verb}"
                    import subprocess
                    subprocess.run(fh.engine_cmd("pre-dump", t.pid, d), check=True,
                                   capture_output=True)
                    n = len(fh.fault_points(verb, t, d))
                    faults = [f"*@{k}:kill" for k in range(1, n + 1)]
                    if verb == "dump":   # the dry run killed it: start a new lineage
                        runner.close()
                        runner = fh.Runner(work, exe, mib=args.mib, writers=args.writers,
                                           churn=args.churn, rng=rng)
                plan = [(f, None, signal.SIGKILL) for f in faults]
                sigs = [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
                plan += [(None, rng.uniform(0, args.max_delay), rng.choice(sigs))
                         for _ in range(args.runs)]
                for fault, delay, sig in plan:
                    total += 1
                    try:
                        o = runner.run(verb, fault=fault, delay=delay, sig=sig)
                    except AssertionError as exc:
                        bad += 1
                        print(f"FAIL {verb}: {exc}", flush=True)
                        return 1
                    print(f"{verb:8s} {o.fault:24s} exit {o.engine_rc:4d} "
                          f"published {int(o.published)} next {o.note or 'incremental'}; "
                          f"{o.pages_compared} pages equal", flush=True)
            finally:
                runner.close()
            print(f"{verb}: {len(plan)} runs in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"{total} runs, {bad} wrong restores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
