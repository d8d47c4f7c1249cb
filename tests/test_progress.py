"""The progress bar: drawn on a terminal, silent when piped."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from checkpoint.progress import Progress
from conftest import read_pty


def test_silent_when_not_a_terminal(capsys):
    p = Progress("dump")  # pytest's stderr is not a tty
    p.total(10)
    p.advance(10)
    p.close()
    assert capsys.readouterr().err == ""


def test_bar_on_a_terminal():
    code = ("from checkpoint.progress import Progress\n"
            "p = Progress('dump'); p.total(100)\n"
            "for _ in range(4): p.advance(25)\n"
            "p.close()\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    out = read_pty(master)
    proc.wait()
    os.close(master)
    text = out.decode()
    assert "dump: [" in text and "100.0%" in text and "100/100 pages" in text
