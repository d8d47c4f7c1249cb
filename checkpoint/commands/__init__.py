"""One module per CLI verb; each exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse


def int_range(lo: int, hi: int):
    """An argparse ``type``: an integer in [lo, hi], else one clear error."""
    def parse(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is out of range [{lo}, {hi}]")
        return v
    parse.__name__ = "integer"
    return parse


MAX_THREADS = 1024
MAX_PID = 1 << 22           # /proc/sys/kernel/pid_max can be at most 2**22
ZSTD_LEVELS = (1, 22)
