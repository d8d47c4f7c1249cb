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


def test_no_fd_kind_is_dropped():
    """The fd room (objects/fds/, once objects/files.py) restores or refuses
    every kind it knows: none is lost silently."""
    dropped = [k.name for k in state.KINDS if k.status == state.DROPPED
               and (k.room == "objects/files.py" or k.room.startswith("objects/fds/"))]
    assert dropped == []


def test_every_fd_kind_module_is_registered():
    """A module of objects/fds/ with a KIND is in the one table."""
    import importlib
    from checkpoint.objects import fds
    mods = sorted(p.stem for p in (ROOT / "checkpoint" / "objects" / "fds").glob("*.py")
                  if p.stem not in ("__init__", "base", "fs", "tcpsk"))  # tcpsk: inetsk's connections
    table = {*fds.KINDS, fds.LOCKS}
    for name in mods:
        mod = importlib.import_module(f"checkpoint.objects.fds.{name}")
        assert getattr(mod, "KIND", None) in table, name


def test_no_kind_is_dropped():
    """Every kind the engine knows is restored, refused by name, or needs an
    option: none is lost silently (issue 10's rule)."""
    assert [k.name for k in state.by_status(state.DROPPED)] == []
