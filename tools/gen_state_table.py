#!/usr/bin/env python3
"""Regenerate docs/restore.md's state table from checkpoint/state.py.

    .venv/bin/python tools/gen_state_table.py        # rewrites docs/restore.md in place
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from checkpoint import state  # noqa: E402

doc = ROOT / "docs" / "restore.md"
doc.write_text(state.splice(doc.read_text()))
print(f"{doc}: {len(state.KINDS)} kinds")
