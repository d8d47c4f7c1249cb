"""The state table (checkpoint/state.py) and the docs generated from it agree."""

from pathlib import Path

from checkpoint import state

ROOT = Path(__file__).resolve().parent.parent


def test_restore_md_holds_the_generated_table():
    doc = (ROOT / "docs" / "restore.md").read_text()
    assert state.splice(doc) == doc, "docs/restore.md is stale: run tools/gen_state_table.py"


def test_every_kind_names_an_existing_room():
    for k in state.KINDS:
        assert (ROOT / "checkpoint" / k.room).exists(), k
