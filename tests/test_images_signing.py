"""Signed layers: a reader with the key refuses every edit, even one whose
CRCs were recomputed; swapped, replaced, reordered and unsigned layers too.
Real files, real CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import zstandard

from checkpoint.errors import ImageError, UsageError
from checkpoint.images import LayerWriter, LocalSink, ParentRef, open_chain, open_layer_for_write
from checkpoint.images import format as F
from checkpoint.images.pb import pstree_pb2
from checkpoint.images.signing import key_id, load_sign_key
from checkpoint.images.squash import squash
from images_helpers import PS, chain_pages, page_content, read_blocks, write_blocks

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER = bytes(range(1, 33))


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "checkpoint", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def keyfile(tmp_path, key=KEY, name="key", mode=0o600) -> Path:
    p = tmp_path / name
    p.write_bytes(key)
    os.chmod(p, mode)
    return p


def signed_chain(d, key=KEY, layers=3, pid=1, base_seed=0):
    """Layer i holds pages i*4..i*4+7 and a pstree record; returns the pages."""
    want = {}
    for i in range(layers):
        with open_layer_for_write(d, kind="dump" if i == layers - 1 else "pre-dump",
                                  frame_size=64 << 10, sign_key=key) as w:
            w.add_record("pstree", pstree_pb2.PstreeEntry(pid=pid, ppid=1, comm=f"l{i}"))
            data = b"".join(page_content(base_seed + i * 100 + k) for k in range(8))
            w.add_pages(pid, i * 4 * PS, data)
            w.add_zero(pid, 0x100000 + i * PS, 1)
            for k in range(8):
                want[(pid, i * 4 + k)] = data[k * PS:(k + 1) * PS]
            want[(pid, 0x100 + i)] = bytes(PS)
            w.close()
    return want


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("signed") / "img"
    want = signed_chain(d)
    return d, want


def copy(good, tmp_path, name="img") -> Path:
    d = tmp_path / name
    shutil.copytree(good[0], d)
    return d


def refused_with_key(d, match, key=KEY):
    with pytest.raises(ImageError, match=match) as ei:
        open_chain(d, sign_key=key).close()
    assert "\n" not in str(ei.value)
    return ei.value


# ------------------------------------------------------------------- key files

def test_key_files(tmp_path):
    assert load_sign_key(keyfile(tmp_path)) == KEY
    for p, words in ((keyfile(tmp_path, KEY[:16], "short"), "has 16 bytes"),
                     (keyfile(tmp_path, KEY, "public", 0o644), "accessible to every user"),
                     (keyfile(tmp_path, KEY, "ow", 0o602), "accessible to every user"),
                     (tmp_path / "missing", "No such file"),
                     (tmp_path, "not a regular file"),
                     (keyfile(tmp_path, os.urandom(5000), "long"), "has 5000 bytes")):
        with pytest.raises(UsageError, match=words) as ei:
            load_sign_key(p)
        assert "\n" not in str(ei.value)
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(UsageError, match="not a regular file"):
        load_sign_key(tmp_path / "fifo")         # never blocks on a FIFO
    d = tmp_path / "img"
    signed_chain(d, layers=1)
    res = cli("verify", "-D", d, "--sign-key", tmp_path / "short")
    assert res.returncode == UsageError.exit_code and res.stderr.count("\n") == 1
    assert KEY[:16].hex() not in res.stderr


def test_writer_api_refuses_bad_keys_and_unsigned_parents(tmp_path):
    for kw, words in ((dict(sign_key=b"short"), "32 to 4096 bytes"),
                      (dict(index=1, sign_key=KEY, parent=ParentRef("ab" * 16, bytes(32), 0)),
                       "lacks the parent's MAC")):
        sink = LocalSink(tmp_path / "a", kw.get("index", 0))
        with pytest.raises(ValueError, match=words):
            LayerWriter(sink, **kw)
        sink.abort()
        assert os.listdir(tmp_path / "a") == []


# ----------------------------------------------------------------- happy paths

def test_signed_chain_reads_with_and_without_the_key(good, tmp_path):
    d, want = good
    kid = key_id(KEY)
    with open_chain(d, sign_key=KEY, verify_frames="crc") as c:
        assert [layer.key_id for layer in c.layers] == [kid] * 3
        assert c.key_id == kid
        assert all(len(layer.mac) == 32 for layer in c.layers)
    assert chain_pages(d, sign_key=KEY) == want
    assert chain_pages(d) == want
    res = cli("verify", "-D", d, "--sign-key", keyfile(tmp_path))
    assert res.returncode == 0 and f"MACs verified with key {kid}" in res.stdout
    res = cli("verify", "-D", d)
    assert res.returncode == 0 and f"signed with key {kid}; MACs not checked" in res.stdout
    res = cli("show", "-D", d)
    assert res.returncode == 0 and res.stdout.count(f"signed with key {kid}") == 3
    rep = json.loads(cli("verify", "-D", d, "--json", "--sign-key", keyfile(tmp_path)).stdout)
    assert rep["ok"] and rep["signed_with"] == kid


def test_wrong_key_unsigned_chain_and_mixed_chain(good, tmp_path):
    d, _ = good
    refused_with_key(d, rf"signed with key {key_id(KEY)}, not with the key given "
                        rf"\({key_id(OTHER)}\)", key=OTHER)
    res = cli("verify", "-D", d, "--sign-key", keyfile(tmp_path, OTHER, "other"))
    assert res.returncode == 5 and res.stderr.count("\n") == 1
    u = tmp_path / "unsigned"
    with open_layer_for_write(u, frame_size=64 << 10) as w:
        w.add_pages(1, 0, page_content(1))
        w.close()
    refused_with_key(u, "not signed, and a signing key was given")
    with pytest.raises(ImageError, match="the chain is unsigned"):
        open_layer_for_write(u, sign_key=KEY)
    with pytest.raises(ImageError, match="give the key to extend it"):
        open_layer_for_write(d)
    with pytest.raises(ImageError, match="not with key"):
        open_layer_for_write(d, sign_key=OTHER)
    # an unsigned layer slipped on top of a signed chain (bypassing the checks)
    m = copy(good, tmp_path, "mixed")
    with open_chain(m) as c:
        top = c.top
        ref = ParentRef(top.layer_id, top.header_digest, top.index)
    w = LayerWriter(LocalSink(m, 3), index=3, parent=ref, frame_size=64 << 10)
    w.add_pages(1, 0, page_content(9))
    w.close()
    assert chain_pages(m)[(1, 0)] == page_content(9)     # key-less: an ordinary chain
    refused_with_key(m, "layer-0003.img.*not signed")


# ------------------------------------------------------- edits with CRCs fixed

def _record_edit(path):
    """Change the pstree record's comm (same length), fixing every CRC."""
    blocks = read_blocks(path)
    for b in blocks:
        if b[0] == F.BT_RECORD:
            rec = F.Record.FromString(b[2])
            e = pstree_pb2.PstreeEntry.FromString(rec.payload)
            e.comm = "X" * len(e.comm)
            rec.payload = e.SerializeToString()
            b[2] = rec.SerializeToString()
    write_blocks(path, blocks)


def test_record_edit_with_crcs_fixed_passes_without_key_refused_with_it(good, tmp_path):
    d = copy(good, tmp_path)
    _record_edit(d / "layer-0002.img")
    with open_chain(d, verify_frames=True) as c:          # the CRCs all agree
        assert c.records("pstree")[0][1].comm == "XX"
    assert cli("verify", "-D", d).returncode == 0
    err = refused_with_key(d, "MAC mismatch")
    assert err.path.endswith("layer-0002.img")
    res = cli("verify", "-D", d, "--sign-key", keyfile(tmp_path))
    assert res.returncode == 5 and "layer-0002.img" in res.stderr and "MAC mismatch" in res.stderr
    rep = json.loads(cli("verify", "-D", d, "--json", "--sign-key", keyfile(tmp_path)).stdout)
    assert rep["ok"] is False and "MAC mismatch" in rep["error"]


def test_frame_edit_with_crcs_fixed_passes_without_key_refused_with_it(good, tmp_path):
    """Other page content in a frame, recompressed, every CRC right: the
    key-less reader hands out the attacker's pages; the keyed one refuses."""
    d = copy(good, tmp_path)
    path = d / "layer-0001.img"
    blocks = read_blocks(path)
    fi = next(i for i, b in enumerate(blocks) if b[0] == F.BT_FRAME)
    raw = zstandard.ZstdDecompressor().decompress(blocks[fi][2])
    evil = b"\xcc" * len(raw)
    blocks[fi][2] = zstandard.ZstdCompressor(level=1).compress(evil)
    write_blocks(path, blocks)
    assert chain_pages(d)[(1, 4)] == b"\xcc" * PS
    refused_with_key(d, "MAC mismatch")
    with pytest.raises(ImageError, match="MAC mismatch"):
        chain_pages(d, sign_key=KEY)


def test_signature_stripped_or_key_id_changed(good, tmp_path):
    """The top layer's signature removed (header fields, trailer MAC), every
    CRC and digest fixed: an ordinary layer to a key-less reader, refused
    as unsigned with the key."""
    d = copy(good, tmp_path)
    path = d / "layer-0002.img"
    blocks = read_blocks(path)
    inv = F.Inventory.FromString(blocks[0][2])
    inv.mac_alg = ""
    inv.mac_key_id = ""
    inv.parent_mac = b""
    blocks[0][2] = inv.SerializeToString()
    tr = F.Trailer.FromString(blocks[-1][2])
    tr.mac = b""
    blocks[-1][2] = tr.SerializeToString()
    write_blocks(path, blocks)
    assert chain_pages(d) == good[1]
    refused_with_key(d, "layer-0002.img.*not signed")
    # a signature claiming another key id
    d2 = copy(good, tmp_path, "kid")
    blocks = read_blocks(d2 / "layer-0002.img")
    inv = F.Inventory.FromString(blocks[0][2])
    inv.mac_key_id = key_id(OTHER)
    blocks[0][2] = inv.SerializeToString()
    write_blocks(d2 / "layer-0002.img", blocks)
    err = refused_with_key(d2, "not with the key given")
    assert err.path.endswith("layer-0002.img")
    from checkpoint.images.reader import Layer
    layer = Layer(str(d2 / "layer-0002.img"))
    try:
        with pytest.raises(ImageError, match="MAC mismatch"):
            layer.check_mac(OTHER)          # the id matches that key; the MAC does not
    finally:
        layer.close()


def test_swapped_replaced_reordered_layers(good, tmp_path):
    # a fork from the same base, signed with the same key: its layer 1 under our layer 2
    d = copy(good, tmp_path)
    fork = tmp_path / "fork"
    shutil.copytree(good[0], fork)
    os.unlink(fork / "layer-0002.img")
    os.unlink(fork / "layer-0001.img")
    signed_chain_from(fork)
    shutil.copy(fork / "layer-0001.img", d / "layer-0001.img")
    refused_with_key(d, "another chain")
    # reordered: file names swapped
    d = copy(good, tmp_path, "reorder")
    os.rename(d / "layer-0001.img", d / "tmp")
    os.rename(d / "layer-0002.img", d / "layer-0001.img")
    os.rename(d / "tmp", d / "layer-0002.img")
    refused_with_key(d, "file name says layer")
    # the parent's MAC named by the child is not the parent's (a re-signed
    # parent with the same header): replace the trailer MAC with garbage
    d = copy(good, tmp_path, "pmac")
    blocks = read_blocks(d / "layer-0001.img")
    tr = F.Trailer.FromString(blocks[-1][2])
    tr.mac = bytes(32)
    blocks[-1][2] = tr.SerializeToString()
    write_blocks(d / "layer-0001.img", blocks)
    with pytest.raises(ImageError, match="parent MAC differs"):
        open_chain(d).close()              # even without the key: the link says so
    refused_with_key(d, "parent MAC differs|MAC mismatch")


def signed_chain_from(d):
    """Append two signed layers with other content to the chain in d."""
    for i in (1, 2):
        with open_layer_for_write(d, frame_size=64 << 10, sign_key=KEY) as w:
            w.add_pages(1, 0, page_content(5000 + i))
            w.close()


def test_truncated_or_extended_signed_layer(good, tmp_path):
    d = copy(good, tmp_path)
    path = d / "layer-0002.img"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    refused_with_key(d, "truncated|trailer")
    path.write_bytes(data + b"\0")
    refused_with_key(d, "unexpected bytes after the trailer")


# ----------------------------------------------------------------------- squash

def test_squash_with_key_resigns_and_without_is_refused(good, tmp_path):
    d = copy(good, tmp_path)
    want = good[1]
    with pytest.raises(ImageError, match="give the key to squash"):
        squash(d, 2)
    with pytest.raises(ImageError, match="not with the key given"):
        squash(d, 2, sign_key=OTHER)
    res = cli("squash", "-D", d, "--into", "2")
    assert res.returncode == 5 and "give the key" in res.stderr
    st = squash(d, 2, sign_key=KEY)
    assert len(st.mac) == 32
    with open_chain(d, sign_key=KEY) as c:
        assert [layer.index for layer in c.layers] == [1, 2]
        assert c.base.inventory.squashed and c.base.inventory.replaces_mac
    assert chain_pages(d, sign_key=KEY) == want
    res = cli("squash", "-D", d, "--sign-key", keyfile(tmp_path))
    assert res.returncode == 0, res.stderr
    assert chain_pages(d, sign_key=KEY) == want
    with open_chain(d, sign_key=KEY) as c:
        assert len(c.layers) == 1
    # a squash refuses an input edited with CRCs fixed
    d2 = copy(good, tmp_path, "edited")
    _record_edit(d2 / "layer-0001.img")
    with pytest.raises(ImageError, match="MAC mismatch"):
        squash(d2, sign_key=KEY)
    assert sorted(os.listdir(d2)) == ["layer-0000.img", "layer-0001.img", "layer-0002.img"]


def test_signed_stream_layer(tmp_path):
    """The MAC is computed on the I/O thread for any sink: a StreamSink file too."""
    from checkpoint.images import StreamSink
    d = tmp_path / "img"
    d.mkdir(mode=0o700)
    with open(d / "layer-0000.img", "wb") as f:
        w = LayerWriter(StreamSink(f), sign_key=KEY, threads=2)
        w.add_pages(1, 0, b"".join(page_content(i) for i in range(600)))
        st = w.close()
    os.chmod(d / "layer-0000.img", 0o600)
    with open_chain(d, sign_key=KEY) as c:
        assert c.top.mac == st.mac
        assert c.read_page(1, 599 * PS) == page_content(599)


def test_crc_of_payload_unchanged_by_mac_suffix(good):
    """The trailer's MAC is its payload's last 34 bytes (tag, length, MAC)."""
    path = good[0] / "layer-0000.img"
    blocks = read_blocks(path)
    payload = blocks[-1][2]
    tr = F.Trailer.FromString(payload)
    assert payload[-34:] == bytes([0x62, 32]) + tr.mac
    assert zlib.crc32(payload) == F.BLOCK.unpack_from(
        path.read_bytes(), path.stat().st_size - len(payload) - F.BLOCK_HEADER_SIZE)[3]
