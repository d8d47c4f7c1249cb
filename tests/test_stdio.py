"""The restore's stdio contract (docs/restore.md, "Standard streams"):
attached, the restored program shares the command's streams; detached (-d),
nothing is shared unless asked (--stdio or --inherit-fd), so a caller that
captures `checkpoint restore -d --json` gets its JSON and returns; a dumped
pipe end whose other end is gone is refused, never restored to die of
SIGPIPE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from checkpoint import Checkpointer

CLI = [sys.executable, "-m", "checkpoint"]
PROG = ("import sys, time\nn = 0\nwhile True:\n    print('tick', n, flush=True)\n"
        "    n += 1\n    time.sleep(0.05)\n")


def _dumped_ticker(tmp_path) -> tuple[str, int]:
    """A program printing ticks into a pipe (the pipe's reader is this test),
    dumped and killed."""
    r, w = os.pipe()
    p = subprocess.Popen([sys.executable, "-c", PROG], stdout=w, stdin=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    os.close(w)
    assert os.read(r, 100).startswith(b"tick")
    images = str(tmp_path / "img")
    with Checkpointer(p.pid, images, progress=False) as ck:
        ck.dump()
    p.wait(10)
    os.close(r)
    return images, p.pid


def test_detached_restore_shares_nothing_unless_asked(tmp_path):
    images, pid = _dumped_ticker(tmp_path)
    # no choice given: refused, naming fd 1 and the ways out; nothing started
    r = subprocess.run([*CLI, "restore", "-D", images, "-d", "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 7, r.stderr
    err = json.loads(r.stdout)["error"]
    assert "fd 1" in err and "--stdio" in err and "--inherit-fd" in err
    assert not os.path.exists(f"/proc/{pid}")
    # --stdio FILE: the program writes there; the caller's capture returns at once
    out = tmp_path / "out.log"
    t0 = time.monotonic()
    r = subprocess.run([*CLI, "restore", "-D", images, "-d", "--json", "--stdio", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30
    info = json.loads(r.stdout)        # only the JSON on stdout
    try:
        time.sleep(0.3)
        ticks = out.read_text().split("\n")
        assert ticks[0].startswith("tick") and len(ticks) > 2, ticks
        assert (os.stat(out).st_mode & 0o777) == 0o600
    finally:
        os.kill(info["pid"], 9)


def test_no_inherit_stdio_refuses_a_pipe_that_would_break(tmp_path):
    images, _ = _dumped_ticker(tmp_path)
    r = subprocess.run([*CLI, "restore", "-D", images, "--no-inherit-stdio"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 7 and "SIGPIPE" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
