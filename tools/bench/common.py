"""Helpers shared by the benchmarks: build and start the workload target."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)


def build(name: str = "workload") -> str:
    src = os.path.join(HERE, f"{name}.c")
    out_dir = os.path.join(HERE, ".bin")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        subprocess.run(["cc", "-O2", "-pthread", "-o", out, src], check=True)
    return out


class Workload:
    """A running workload process; killed and reaped on exit."""

    def __init__(self, mib: int, percent: float, threads: int = 0):
        self.proc = subprocess.Popen([build(), str(mib), str(percent), str(threads)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"workload did not start: {line!r}")
        self.pid = self.proc.pid

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def median(xs) -> float:
    return statistics.median(xs)
