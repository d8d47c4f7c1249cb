"""CLI contract: one error line and a non-zero exit code for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "checkpoint"]


def run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True)


def test_no_verb_is_a_usage_error():
    res = run()
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("checkpoint: error: ") and "--help" in res.stderr


@pytest.mark.parametrize("args,what", [
    (["pre-dump", "-t", "1", "-D", "/nonexistent", "--compress-level", "-3"], "out of range"),
    (["pre-dump", "-t", "1", "-D", "/nonexistent", "--compress-level", "23"], "out of range"),
    (["dump", "-t", "1", "-D", "/nonexistent", "--max-pages", "-1"], "out of range"),
    (["dump", "-t", "1", "-D", "/nonexistent", "--threads", "-2"], "out of range"),
    (["dump", "-t", "0", "-D", "/nonexistent"], "out of range"),
    (["dump", "-t", "abc", "-D", "/nonexistent"], "not an integer"),
    (["dump", "-D", "/nonexistent"], "required"),
    (["frob"], "invalid choice"),
])
def test_bad_options_are_one_line(args, what):
    res = run(*args)
    assert res.returncode == 2, res
    assert res.stderr.count("\n") == 1 and what in res.stderr, res.stderr
    assert not os.path.exists("/nonexistent")


def test_library_refuses_bad_numbers(tmp_path):
    import checkpoint
    from checkpoint.errors import UsageError
    for kw in ({"compress_level": -1}, {"threads": -1}, {"max_pages": -5}, {"compress_level": 99}):
        with pytest.raises(UsageError):
            checkpoint.Checkpointer(os.getpid(), tmp_path / "x", **kw)


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


def test_help_loads_no_engine():
    """`checkpoint --help` (and each verb's parser) loads none of the engine:
    no protobuf, zstandard, dumper or restorer (start-up time, issue 14:
    tools/bench/bench_startup.py measures it)."""
    import subprocess
    import sys
    for argv in (["--help"], ["dump", "--help"], ["restore", "--help"]):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "checkpoint", *argv],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-500:]
        loaded = {line.split("|")[-1].strip() for line in out.stderr.splitlines()
                  if line.startswith("import time:")}
        heavy = {m for m in loaded if m.split(".")[0] in ("zstandard", "google", "ptrace")
                 or m in ("checkpoint.dumper", "checkpoint.restorer", "checkpoint.kerndat")}
        assert not heavy, (argv, sorted(heavy))
