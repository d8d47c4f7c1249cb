"""Corruption: every damage gives one ImageError naming file and offset,
never a traceback, a hang or wrong data; `verify` exits non-zero."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint import cli
from checkpoint.errors import ImageError
from checkpoint.images import open_chain
from checkpoint.images import format as F
from checkpoint.images.reader import Layer
from images_helpers import ZERO, as_content, chain_pages, expected, write_chain, write_layer

LAYERS = [
    {(1, p): p for p in range(40)} | {(2, p): ZERO for p in range(50, 60)} | {(2, 3): 9},
    {(1, p): 1000 + p for p in range(5, 25)} | {(1, 70): ZERO},
    {(2, p): 2000 + p for p in range(0, 30)} | {(1, 6): ZERO},
]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "img"
    write_chain(d, LAYERS)
    return d


def copy(good, tmp_path) -> Path:
    d = tmp_path / "img"
    shutil.copytree(good, d)
    return d


def block_offsets(path) -> list[int]:
    layer = Layer(str(path))
    try:
        offs = [F.PREAMBLE_SIZE] + layer.record_offsets + [f.offset for f in layer.frames] \
            + layer.pagemap_offsets
        offs = sorted(offs)
        return offs + [layer.size - _trailer_len(layer), layer.size]
    finally:
        layer.close()


def _trailer_len(layer) -> int:
    return F.BLOCK_HEADER_SIZE + len(layer.trailer.SerializeToString())


def run_verify(d) -> tuple[int, str]:
    old = list(cli.COMMAND_MODULES)
    cli.COMMAND_MODULES[:] = ["checkpoint.commands.images"]
    try:
        return cli.main(["verify", "-D", str(d), "--threads", "1"]), ""
    finally:
        cli.COMMAND_MODULES[:] = old


def assert_image_error(d, match: str | None = None, path_part: str | None = None):
    with pytest.raises(ImageError) as ei:
        with open_chain(d, verify_frames=True) as chain:
            for pid in chain.pids():
                for _ in chain.iter_runs(pid):
                    pass
    err = ei.value
    msg = str(err)
    assert "\n" not in msg
    assert err.path and os.path.basename(err.path).startswith("layer-"), msg
    assert err.offset is not None, msg
    if match:
        assert re.search(match, msg), msg
    if path_part:
        assert path_part in err.path, msg
    return err


def test_good_chain_verifies(good, capsys):
    assert chain_pages(good) == as_content(expected(LAYERS))
    assert run_verify(good)[0] == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("victim", ["layer-0000.img", "layer-0002.img"])
def test_truncation_at_every_boundary_and_inside_frames(good, tmp_path, victim, capsys):
    src = good / victim
    size = src.stat().st_size
    cuts = set()
    for off in block_offsets(src):
        cuts.update({off, off + 1, off + 12, off + F.BLOCK_HEADER_SIZE, off + 30})
    layer = Layer(str(src))
    for fr in layer.frames:
        cuts.add(fr.offset + F.BLOCK_HEADER_SIZE + fr.stored // 2)
        cuts.add(fr.offset + F.BLOCK_HEADER_SIZE + fr.stored - 1)
    layer.close()
    cuts = sorted(c for c in cuts if 0 <= c < size) + [0, 5]
    d = copy(good, tmp_path)
    data = src.read_bytes()
    for cut in cuts:
        (d / victim).write_bytes(data[:cut])
        err = assert_image_error(d, path_part=victim)
        assert err.offset <= cut
        assert run_verify(d)[0] == ImageError.exit_code
    assert "checkpoint: error:" in capsys.readouterr().err


def test_single_bit_flips_everywhere_detected(good, tmp_path):
    """Every bit of a small layer, one at a time (sampled for the big one)."""
    d = copy(good, tmp_path)
    for victim, step in (("layer-0001.img", 7), ("layer-0000.img", 61)):
        data = bytearray((good / victim).read_bytes())
        for pos in range(0, len(data), step):
            bad = bytearray(data)
            bad[pos] ^= 1 << (pos % 8)
            (d / victim).write_bytes(bad)
            assert_image_error(d, path_part=victim)
        (d / victim).write_bytes(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(victim=st.sampled_from(["layer-0000.img", "layer-0001.img", "layer-0002.img"]),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255),
                                st.sampled_from(["set", "insert", "delete"])),
                      min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_fuzz_mutations_never_give_wrong_data_or_traceback(good, tmp_path, victim, edits, cut):
    d = tmp_path / "fuzz"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(good, d)
    data = bytearray((good / victim).read_bytes())
    orig = bytes(data)
    for where, val, op in edits:
        pos = int(where * len(data))
        if op == "set":
            data[pos] = val
        elif op == "insert":
            data[pos:pos] = bytes([val])
        elif pos < len(data):
            del data[pos]
    if cut is not None:
        del data[int(cut * len(data)):]
    (d / victim).write_bytes(data)
    if bytes(data) == orig:
        assert chain_pages(d) == as_content(expected(LAYERS))
        return
    assert_image_error(d, path_part=victim)


def test_missing_middle_layer(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "layer-0001.img").unlink()
    assert_image_error(d, match=r"layer-0001.img is missing", path_part="layer-0002")
    assert run_verify(d)[0] == ImageError.exit_code


def test_missing_base_layer(good, tmp_path):
    d = copy(good, tmp_path)
    (d / "layer-0000.img").unlink()
    assert_image_error(d, match=r"missing", path_part="layer-0001")


def test_layer_from_another_chain(good, tmp_path):
    other = tmp_path / "other"
    write_chain(other, LAYERS)          # same shapes, other ids
    d = copy(good, tmp_path)
    shutil.copy(other / "layer-0002.img", d / "layer-0002.img")
    assert_image_error(d, match=r"another chain", path_part="layer-0002")
    d2 = tmp_path / "img2"
    shutil.copytree(good, d2)
    shutil.copy(other / "layer-0000.img", d2 / "layer-0000.img")
    assert_image_error(d2, match=r"another chain", path_part="layer-0001")
    assert run_verify(d2)[0] == ImageError.exit_code


def test_swapped_parent_same_id_other_header(good, tmp_path):
    """A parent rewritten under the same id is caught by the header digest."""
    d = copy(good, tmp_path)
    with open_chain(good) as chain:
        base_id = chain.base.layer_id
    (d / "layer-0000.img").unlink()
    write_layer(d, LAYERS[0], index=0, layer_id=base_id)
    assert_image_error(d, match=r"digest", path_part="layer-0001")


def test_renamed_layer_index_mismatch(good, tmp_path):
    d = copy(good, tmp_path)
    os.rename(d / "layer-0002.img", d / "layer-0003.img")
    assert_image_error(d, match=r"file name says layer 3", path_part="layer-0003")


def test_crash_mid_write_leaves_chain_intact(good, tmp_path, capsys):
    """A writer killed mid-layer leaves only a hidden temp file: the chain
    still opens with its published layers, and verify says so."""
    d = copy(good, tmp_path)
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from checkpoint.images import open_layer_for_write
        w = open_layer_for_write({str(d)!r}, frame_size=65536)
        w.add_pages(1, 0, os.urandom(4096 * 100))
        os._exit(9)
    """)
    rc = subprocess.run([sys.executable, "-c", code]).returncode
    assert rc == 9
    names = os.listdir(d)
    assert any(n.startswith(".layer-0003.img.tmp-") for n in names)
    assert "layer-0003.img" not in names
    assert chain_pages(d) == as_content(expected(LAYERS))
    assert run_verify(d)[0] == 0
    assert "partial layer" in capsys.readouterr().out


def test_half_written_layer_under_a_layer_name(good, tmp_path):
    """A layer copied non-atomically (e.g. by hand) and cut short."""
    d = copy(good, tmp_path)
    data = (good / "layer-0002.img").read_bytes()
    (d / "layer-0002.img").write_bytes(data[: len(data) * 2 // 3])
    assert_image_error(d, match=r"truncated", path_part="layer-0002")


def test_garbage_file_and_empty_dir(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    with pytest.raises(ImageError, match="no layers"):
        open_chain(d)
    with pytest.raises(ImageError, match="does not exist"):
        open_chain(tmp_path / "nope")
    (d / "layer-0000.img").write_bytes(b"hello world, this is not a layer")
    assert_image_error(d, match="not a checkpoint layer")


# ------------------------------------------- every byte of a small chain

KEY = bytes(range(100, 132))


def _tiny_chain(d, sign_key=None):
    """Three layers of a few hundred bytes each: compressible pages, zero
    pages, records, two pids."""
    from checkpoint.images.pb import pstree_pb2
    from checkpoint.images.writer import LayerWriter, LocalSink
    parent = None
    for i in range(3):
        w = LayerWriter(LocalSink(d, i), index=i, parent=parent, frame_size=64 << 10,
                        kind="dump" if i == 2 else "pre-dump", sign_key=sign_key)
        w.add_record("pstree", pstree_pb2.PstreeEntry(pid=1, ppid=1, comm=f"c{i}"))
        w.add_pages(1, 0x1000 * (i + 1), bytes([i + 1]) * 4096 * 2)
        w.add_zero(1, 0x100000 + i * 0x1000, 2)
        w.add_pages(2, 0x5000, bytes([0x40 + i]) * 4096)
        parent = w.close().parent_ref


def _read_all(d, key=None) -> dict:
    out = {}
    with open_chain(d, verify_frames=True, sign_key=key) as chain:
        for pid in chain.pids():
            for run in chain.iter_runs(pid):
                out[(pid, run.addr)] = bytes(run.data)
        chain.records()
    return out


@pytest.mark.parametrize("signed", [False, True])
def test_every_byte_flipped_and_every_truncation_of_a_small_chain(tmp_path, signed):
    """Every byte of every layer inverted, one at a time, and every layer cut
    at every length: open_chain(verify_frames=True) refuses each one with an
    ImageError naming the damaged file (with a key too)."""
    d = tmp_path / "img"
    key = KEY if signed else None
    _tiny_chain(d, key)
    good = _read_all(d, key)
    total = 0
    for victim in sorted(os.listdir(d)):
        path = d / victim
        data = path.read_bytes()
        assert len(data) < 2048, len(data)
        for pos in range(len(data)):
            bad = bytearray(data)
            bad[pos] ^= 0xFF
            path.write_bytes(bad)
            with pytest.raises(ImageError) as ei:
                _read_all(d, key)
            msg = str(ei.value)
            assert "\n" not in msg and victim in msg, (pos, msg)
            total += 1
        for cut in range(len(data)):
            path.write_bytes(data[:cut])
            with pytest.raises(ImageError) as ei:
                _read_all(d, key)
            assert victim in str(ei.value), (cut, str(ei.value))
        path.write_bytes(data)
    assert total > 1000
    assert _read_all(d, key) == good


def test_layers_deleted_swapped_replaced_via_the_cli(good, tmp_path):
    """verify in a subprocess with a timeout: one line, exit 5, no hang."""
    cases = {}
    d = copy(good, tmp_path)
    (d / "layer-0001.img").unlink()
    cases["deleted"] = (d, "missing")
    d = tmp_path / "swapped"
    shutil.copytree(good, d)
    os.rename(d / "layer-0001.img", d / "x")
    os.rename(d / "layer-0002.img", d / "layer-0001.img")
    os.rename(d / "x", d / "layer-0002.img")
    cases["swapped"] = (d, "file name says layer")
    d = tmp_path / "replaced"
    other = tmp_path / "other"
    write_chain(other, LAYERS)
    shutil.copytree(good, d)
    shutil.copy(other / "layer-0001.img", d / "layer-0001.img")
    cases["replaced"] = (d, "another chain")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for tag, (d, words) in cases.items():
        res = subprocess.run([sys.executable, "-m", "checkpoint", "verify", "-D", str(d)],
                             capture_output=True, text=True, timeout=30, env=env)
        assert res.returncode == ImageError.exit_code, (tag, res.stderr)
        assert res.stderr.count("\n") == 1 and words in res.stderr, (tag, res.stderr)
