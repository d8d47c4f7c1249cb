"""--action-script (CRIU's) and --status-fd on real dumps and restores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import fault_helpers as fh
from conftest import build_target, proc_state, tracer_of

CLI = [sys.executable, "-m", "checkpoint"]


def _script(tmp_path, log, fail_at: str = "") -> str:
    p = tmp_path / "hook.sh"
    p.write_text("#!/bin/sh\n"
                 f'echo "$CHECKPOINT_ACTION $CRTOOLS_SCRIPT_ACTION $CHECKPOINT_PID" >> {log}\n'
                 f'[ "$CHECKPOINT_ACTION" = "{fail_at}" ] && exit 3\nexit 0\n')
    p.chmod(0o700)
    return str(p)


def test_action_scripts_run_at_every_point_and_can_abort(tmp_path):
    t = fh.Mem.start(str(build_target("memcheck")), 8, 1, 0)
    log = tmp_path / "log"
    try:
        # a failing post-dump: the target is thawed, not killed; nothing is lost
        bad = _script(tmp_path, log, fail_at="post-dump")
        r = subprocess.run([*CLI, "dump", "-t", str(t.pid), "-D", str(tmp_path / "a"),
                            "--action-script", bad], capture_output=True, text=True)
        assert r.returncode == 1 and "post-dump" in r.stderr, r.stderr
        assert proc_state(t.pid) in ("S", "R") and tracer_of(t.pid) == 0
        assert t.cmd("check").startswith("good")
        log.unlink()
        good = _script(tmp_path, log)
        r = subprocess.run([*CLI, "dump", "-t", str(t.pid), "-D", str(tmp_path / "b"),
                            "--action-script", good], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert log.read_text().split("\n")[:2] == [f"pre-dump pre-dump {t.pid}",
                                                   f"post-dump post-dump {t.pid}"]
        fh._reap(t)
        log.unlink()
        rd, wr = os.pipe()
        inherit = [f"--inherit-fd=fd[{fd}]:{k}" for k, fd in t.keys.items()]
        r = subprocess.run([*CLI, "restore", "-D", str(tmp_path / "b"), "-d", "--json",
                            "--action-script", good, "--status-fd", str(wr), *inherit,
                            "--no-inherit-stdio"], capture_output=True, text=True,
                           pass_fds=(wr, *t.keys.values()))
        os.close(wr)
        assert r.returncode == 0, r.stderr
        assert os.read(rd, 10) == b"\0"          # the ready byte, then closed
        assert os.read(rd, 10) == b""
        os.close(rd)
        actions = [line.split()[0] for line in log.read_text().splitlines()]
        assert actions == ["pre-restore", "post-restore", "pre-resume", "post-resume"]
        copy = fh.Mem(t.pid, t.to_w, t.from_r, t.keys)
        copy.buf = t.buf
        assert copy.cmd("check").startswith("good")
    finally:
        try:
            os.kill(t.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fh._reap(t)
