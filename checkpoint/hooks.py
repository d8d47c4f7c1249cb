"""Action scripts (CRIU's --action-script): programs the engine runs at
fixed points, with the point in the environment.

    CHECKPOINT_ACTION (and CRIU's CRTOOLS_SCRIPT_ACTION) = pre-dump, post-dump,
        pre-restore, post-restore, pre-resume, post-resume, network-unlock
        (migrate: the copy runs on the destination and the source is gone;
        its TCP connections' lock is released right after: move their
        address to the destination there)
    CHECKPOINT_PID (and CRTOOLS_INIT_PID) = the target's PID (as the engine sees it)
    CHECKPOINT_IMAGES_DIR = the images directory

A script that exits non-zero at a "pre-" point or at post-dump/post-restore
(the target is still frozen then) aborts the command, which releases the
target as on any other failure; at post-resume it is only reported. Scripts
run with the engine's credentials and environment, stdin from /dev/null,
their output on the engine's stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .errors import CheckpointError

ACTIONS = ("pre-dump", "post-dump", "pre-restore", "post-restore", "pre-resume", "post-resume",
           "network-unlock")


def run(scripts, action: str, *, pid: int | None = None, images_dir: str = "",
        fatal: bool = True) -> None:
    if not scripts:
        return
    if action not in ACTIONS:
        raise ValueError(action)
    env = dict(os.environ, CHECKPOINT_ACTION=action, CRTOOLS_SCRIPT_ACTION=action,
               CHECKPOINT_IMAGES_DIR=str(images_dir))
    if pid is not None:
        env["CHECKPOINT_PID"] = env["CRTOOLS_INIT_PID"] = str(pid)
    for script in scripts:
        try:
            r = subprocess.run([script], env=env, stdin=subprocess.DEVNULL,
                               stdout=sys.stderr, stderr=sys.stderr, timeout=600)
            code = r.returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            code, why = -1, str(exc)
        else:
            why = f"exit status {code}"
        if code != 0 and fatal:
            raise CheckpointError(f"action script {script} failed at {action} ({why}); "
                                  "stopped there, the target was released")
