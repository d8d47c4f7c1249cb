"""The docs' runnable examples run as they stand."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_example_runs():
    text = open(os.path.join(ROOT, "docs/api.md")).read()
    blocks = re.findall(r"```python example\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    res = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "restored" in res.stdout and "went on from" in res.stdout


def test_readme_commands_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    cmds = re.findall(r"^(tools/\w+)", text, re.M)
    assert cmds[:2] == ["tools/demo", "tools/test"]
    for c in cmds[:2]:
        assert os.access(os.path.join(ROOT, c), os.X_OK)
    ci = open(os.path.join(ROOT, ".ci/run")).read()
    assert "tools/test" in ci
