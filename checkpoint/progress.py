"""A progress bar on a terminal (stderr), silent when piped or disabled."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, enabled: bool | None = None, unit: str = "pages",
                 page: int = 4096):
        self.label = label
        self.unit = unit
        self.page = page    # bytes a unit (for MiB/s and the time left)
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._total = 0
        self._done = 0
        self._last = 0.0
        self._shown = False
        self._t0 = time.monotonic()

    def total(self, n: int) -> None:
        self._total = n
        self._t0 = time.monotonic()

    def advance(self, n: int) -> None:
        self._done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self._done < self._total:
            return
        self._last = now
        frac = self._done / self._total if self._total else 1.0
        bar = "#" * int(frac * 30)
        elapsed = max(now - self._t0, 1e-6)
        rate = self._done * self.page / elapsed / 2**20     # MiB/s
        left = (self._total - self._done) * self.page / (rate * 2**20) if rate > 0 else 0.0
        sys.stderr.write(f"\r{self.label}: [{bar:<30}] {frac * 100:5.1f}% "
                         f"{self._done}/{self._total} {self.unit}, {rate:.0f} MiB/s, "
                         f"{left:.1f} s left ")
        sys.stderr.flush()
        self._shown = True

    def note(self, text: str) -> None:
        """One status line (a migration round), on a terminal only."""
        if not self.enabled:
            return
        if self._shown:
            sys.stderr.write("\n")
            self._shown = False
        sys.stderr.write(f"{self.label}: {text}\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self._shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._shown = False
