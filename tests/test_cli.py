"""CLI contract: one error line and a non-zero exit code for bad input."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "checkpoint"]


def run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


def test_no_verb_is_a_usage_error():
    res = run()
    assert res.returncode == 2 and "usage" in res.stderr


def test_console_script_exists():
    import os
    assert os.access(os.path.join(os.path.dirname(sys.executable), "checkpoint"), os.X_OK)


def test_engine_errors_become_one_line():
    code = ("import sys; from checkpoint.cli import main, COMMAND_MODULES;"
            "from checkpoint.freezer import freeze_process;"
            "import checkpoint.commands.check as c;"
            "c.run = lambda a: freeze_process(4000000); sys.exit(main(['check']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 4
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("checkpoint: error: no such process: 4000000")
