"""Periodic incremental checkpoints of a running process (CRIU's `dump -R
--track-mem` then `--prev-images-dir`): each `dump -R` keeps tracking, the
next checkpoint goes into a new directory that starts from the previous
one's chain (hard-linked) and adds only what changed; every directory
restores on its own, also after older ones were deleted or squashed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import checkpoint
import fault_helpers as fh
from checkpoint.images import open_chain
from checkpoint.images.squash import squash
from conftest import build_target

CLI = [sys.executable, "-m", "checkpoint"]


def test_ten_periodic_checkpoints_each_restore_on_their_own(tmp_path):
    t = fh.Mem.start(str(build_target("memcheck")), 16, 2, 200)
    dirs, sizes = [], []
    try:
        for i in range(10):
            assert t.cmd("run") == "running"
            assert t.cmd(f"w {i} 300") == "ok"       # rewrites between checkpoints
            assert t.cmd("pause") == "paused"        # a consistent point to check later
            d = tmp_path / f"snap{i}"
            args = ["dump", "-R", "-t", str(t.pid), "-D", str(d), "--json"]
            if dirs:
                args += ["--prev-images-dir", str(dirs[-1])]
            r = subprocess.run([*CLI, *args], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            import json
            st = json.loads(r.stdout)
            if i:
                assert not st["full_reason"], st["full_reason"]  # incremental
                assert st["pages_written"] < 4096 // 2, st["pages_written"]
            sizes.append(st["bytes_stored"])
            dirs.append(d)
        print("new bytes per checkpoint:", sizes)
        assert all(s < sizes[0] / 3 for s in sizes[1:])
        # drop the five oldest, squash the seventh: the others still restore
        for d in dirs[:5]:
            shutil.rmtree(d)
        squash(str(dirs[6]))
        for d in dirs[5:]:
            with open_chain(d, verify_frames=True) as chain:
                assert chain.top.kind == "dump"
            r = checkpoint.restore(d, pid_ns=True, inherit=_fresh_pipes(t), inherit_stdio=False)
            for fd in t._pass:   # the copy holds its own ends now
                os.close(fd)
            try:
                copy = fh.Mem(r.pid, t._copy_w, t._copy_r, {})
                assert copy.cmd("check", timeout=30).startswith("good"), d
            finally:
                r.kill()
                r.wait(10)
                os.close(t._copy_w)
                os.close(t._copy_r)
    finally:
        t.kill()
        fh._reap(t)


def _fresh_pipes(t) -> dict[str, int]:
    """New pipes for a restored copy (the original keeps its own)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    keys = list(t.keys)          # the dumped stdin, stdout links
    t._copy_w, t._copy_r = in_w, out_r
    t._pass = (in_r, out_w)
    return {keys[0]: in_r, keys[1]: out_w}
