"""Shared fixtures: build C targets with the system cc, start and always reap
real target processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TARGETS = Path(__file__).parent / "targets"
BIN = TARGETS / "bin"


def build_target(name: str, *extra_flags: str) -> Path:
    """Compile tests/targets/<name>.c (once per source change) and return the binary."""
    src = TARGETS / f"{name}.c"
    BIN.mkdir(exist_ok=True)
    out = BIN / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        tmp = out.with_suffix(".tmp")
        subprocess.run(["cc", "-O1", "-g", "-Wall", "-pthread", "-o", str(tmp), str(src),
                        *extra_flags, "-lm"], check=True)
        os.replace(tmp, out)
    return out


class Target:
    """A running target with line-oriented stdout; always reaped by the fixture."""

    def __init__(self, argv: list[str], **kw):
        kw.setdefault("stderr", subprocess.PIPE)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, **kw)
        self.pid = self.proc.pid
        self._buf = b""
        self.lines: list[str] = []  # everything read so far

    def readline(self, timeout: float = 10.0) -> str:
        """Next stdout line ('' at EOF); own buffering so select() never lies."""
        import select
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            r, _, _ = select.select([fd], [], [], max(0.0, left))
            if not r:
                raise TimeoutError(f"target {self.pid} printed nothing in {timeout:.1f}s; "
                                   f"so far: {self.lines[-5:]}")
            chunk = os.read(fd, 65536)
            if not chunk:
                line, self._buf = self._buf, b""
                return line.decode()
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        text = line.decode() + "\n"
        self.lines.append(text.rstrip("\n"))
        return text

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.01, deadline - time.monotonic()))
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise EOFError(f"target {self.pid} exited before printing {prefix!r}: "
                               f"{self.lines[-5:]} {err}")
            if line.startswith(prefix):
                return line.rstrip("\n")

    def send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # still traced by a stuck engine thread: reap directly
            os.waitpid(self.pid, 0)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


@pytest.fixture
def spawn():
    """spawn(argv) -> Target; every target is killed and reaped at teardown."""
    started: list[Target] = []

    def _spawn(argv, **kw) -> Target:
        t = Target([str(a) for a in argv], **kw)
        started.append(t)
        return t

    yield _spawn
    for t in started:
        t.stop()


@pytest.fixture
def python_exe() -> str:
    return sys.executable


def read_pty(master: int) -> bytes:
    """Everything written to a pty until its last writer is gone (EIO on
    Linux) or EOF."""
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            return out
        if not chunk:
            return out
        out += chunk


def proc_state(pid: int) -> str:
    """One-letter state of a task (R, S, t, Z ...), or '' if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def tracer_of(pid: int) -> int:
    """TracerPid of a task; 0 if untraced or gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
