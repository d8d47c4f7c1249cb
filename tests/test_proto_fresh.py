"""The committed generated protobuf code must match proto/*.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PB = ROOT / "checkpoint" / "images" / "pb"


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("*_pb2.py")}
    committed = {p.name: p.read_bytes() for p in PB.glob("*_pb2.py")}
    protos = {p.stem + "_pb2.py" for p in (ROOT / "proto").glob("*.proto")}
    assert set(fresh) == protos
    stale = sorted(n for n in fresh if committed.get(n) != fresh[n])
    extra = sorted(set(committed) - set(fresh))
    assert not stale and not extra, (
        f"generated code is stale ({stale}) or orphaned ({extra}): "
        f"run .venv/bin/python tools/gen_proto.py")


def test_generated_code_imports():
    from checkpoint.images.pb import inventory_pb2, pagemap_pb2, mm_pb2  # noqa: F401

    inv = inventory_pb2.Inventory(layer_id="ab" * 16, index=3, kind="dump")
    assert inventory_pb2.Inventory.FromString(inv.SerializeToString()) == inv
