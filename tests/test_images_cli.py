"""The show / verify / squash verbs, through checkpoint.cli.main."""

from __future__ import annotations

import json

import pytest

from checkpoint import cli
from images_helpers import ZERO, as_content, chain_pages, expected, write_chain

LAYERS = [
    {(1, p): p for p in range(30)} | {(1, 40): ZERO},
    {(1, p): 500 + p for p in range(3)},
    {(2, 7): 9},
]


@pytest.fixture
def run(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["checkpoint.commands.images"])
    return cli.main


def test_show_json(tmp_path, run, capsys):
    d = tmp_path / "img"
    write_chain(d, LAYERS)
    assert run(["show", "-D", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    layers = info["layers"]
    assert [L["index"] for L in layers] == [0, 1, 2]
    assert [L["parent"] for L in layers] == [None, 0, 1]
    assert [L["kind"] for L in layers] == ["pre-dump", "pre-dump", "dump"]
    assert [L["pages_written"] for L in layers] == [30, 3, 1]
    assert layers[0]["pages_zero"] == 1 and layers[0]["tracker"] == "full"
    assert layers[0]["bytes_raw"] == 30 * 4096 and 0 < layers[0]["bytes_stored"] < 30 * 4096
    # the tree's order (pstree records) first: here only 2 has records in the top layer
    assert [p["pid"] for p in info["processes"]] == [2, 1]
    assert info["processes"][0]["vmas"][0]["end"] == 1 << 20


def test_show_text_verify_and_squash(tmp_path, run, capsys):
    d = tmp_path / "img"
    write_chain(d, LAYERS)
    want = as_content(expected(LAYERS))
    assert run(["show", "-D", str(d)]) == 0
    out = capsys.readouterr().out
    assert "3 layer(s)" in out and "tracker full" in out
    assert run(["verify", "-D", str(d)]) == 0
    assert run(["squash", "-D", str(d), "--into", "2"]) == 0
    assert chain_pages(d) == want
    assert sorted(p.name for p in d.iterdir()) == ["layer-0001.img", "layer-0002.img"]
    capsys.readouterr()
    assert run(["show", "-D", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"][0]["squashed_from"] == 0 and info["layers"][1]["parent"] == 1
    assert run(["squash", "-D", str(d)]) == 0
    assert chain_pages(d) == want
    assert run(["verify", "-D", str(d), "--json"]) == 0
    assert run(["squash", "-D", str(d)]) == 0
    assert "nothing to squash" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, run, capsys):
    assert run(["verify", "-D", str(tmp_path / "missing")]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
