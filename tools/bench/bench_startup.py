"""Start-up: `checkpoint --help` from exec to exit, against a bare
`python -c pass` of the same interpreter in the same run (the floor); and
the import of the dumper (what a dump pays before its first syscall).
Goal (issue 14): --help within 60 ms of exec.

    .venv/bin/python tools/bench/bench_startup.py [--runs 20]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import ROOT, median


def timed(argv) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    py = sys.executable
    exe = os.path.join(os.path.dirname(py), "checkpoint")
    cases = {"python -c pass": [py, "-c", "pass"],
             "checkpoint --help": [exe, "--help"],
             "import checkpoint.dumper": [py, "-c", "import checkpoint.dumper"]}
    res = {name: [] for name in cases}
    for _ in range(args.runs):   # interleaved: the machine's load hits all alike
        for name, argv in cases.items():
            res[name].append(timed(argv))
    base = median(res["python -c pass"])
    for name, xs in res.items():
        m = median(xs)
        print(f"  {name:26s} {m * 1e3:7.1f} ms  x{m / base:5.2f} the bare interpreter")
    print(f"goal: checkpoint --help <= 60 ms: {median(res['checkpoint --help']) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
