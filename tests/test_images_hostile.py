"""Hostile images: odd directory entries, lengths, counts, decompression
bombs and huge zero runs are refused (one line, exit 5) or cost nothing,
and never hang the engine or make its memory grow. Real files, real
subprocesses, no mocks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zstandard

from checkpoint.cli import main as cli_main
from checkpoint.errors import ImageError
from checkpoint.images import LayerWriter, LocalSink, open_chain
from checkpoint.images import format as F
from checkpoint.images.pb import pagemap_pb2
from checkpoint.images.squash import squash
from images_helpers import (PS, ZERO, as_content, chain_pages, expected, page_content,
                            read_blocks, write_blocks, write_chain)

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    {(1, p): p for p in range(40)} | {(1, 50): ZERO},
    {(1, p): 1000 + p for p in range(5, 12)},
    {(1, p): 2000 + p for p in range(20, 25)},
]
RSS_LIMIT_MIB = 200


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good") / "img"
    write_chain(d, LAYERS)
    return d


def copy(good, tmp_path, name="img") -> Path:
    d = tmp_path / name
    shutil.copytree(good, d)
    return d


def cli(*args, timeout=20, env_extra=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess: a hang is a test failure, not a stuck suite."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "checkpoint", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def assert_refused(res, *needles):
    assert res.returncode == 5, (res.returncode, res.stdout, res.stderr)
    err = res.stderr
    assert err.count("\n") == 1 and err.startswith("checkpoint: error: "), err
    assert "Traceback" not in err + res.stdout
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------ directory entries

def _odd_entries(good, tmp_path):
    """(name, directory, expected words) for every odd entry planted in place
    of a layer."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOP-SECRET-CONTENT " * 10)
    os.chmod(secret, 0o600)
    cases = []

    def case(tag, victim, plant, *words):
        d = copy(good, tmp_path, tag)
        p = d / victim
        p.unlink()
        plant(p)
        cases.append((tag, d, words))

    case("fifo", "layer-0001.img", lambda p: os.mkfifo(p), "layer-0001.img", "FIFO")
    case("dir", "layer-0002.img", lambda p: p.mkdir(), "layer-0002.img", "directory")
    case("dangling", "layer-0000.img", lambda p: p.symlink_to(tmp_path / "nowhere"),
         "layer-0000.img", "symbolic link")
    case("symlink-secret", "layer-0002.img", lambda p: p.symlink_to(secret),
         "layer-0002.img", "symbolic link")
    case("symlink-layer", "layer-0001.img",
         lambda p: p.symlink_to(good / "layer-0001.img"), "layer-0001.img", "symbolic link")

    def foreign(p):
        shutil.copy(good / "layer-0001.img", p)
        os.chown(p, 12345, 12345)
    case("other-uid", "layer-0001.img", foreign, "owned by uid 12345")

    def world_writable(p):
        shutil.copy(good / "layer-0002.img", p)
        os.chmod(p, 0o666)
    case("world-writable", "layer-0002.img", world_writable, "writable by everybody")

    def socket_(p):
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    case("socket", "layer-0002.img", socket_, "socket")
    case("devnull", "layer-0002.img", lambda p: os.mknod(p, 0o600 | 0o020000, os.makedev(1, 3)),
         "character device")
    case("hardlink-secret", "layer-0002.img", lambda p: os.link(secret, p), "bad magic")
    case("deleted", "layer-0001.img", lambda p: None, "layer-0001.img is missing")
    case("swapped", "layer-0001.img",
         lambda p: shutil.copy(good / "layer-0002.img", p), "file name says layer 1")
    return cases


def test_odd_entries_refused_by_verify_and_show(good, tmp_path, capsys):
    """FIFOs, directories, dangling symlinks, symlinks to other files, device
    nodes, other users' files...: one line, exit 5, no hang, no traceback,
    and never a byte of the file a symlink or hard link points to."""
    for tag, d, words in _odd_entries(good, tmp_path):
        for verb in (["verify", "-D", d, "--threads", "1"], ["show", "-D", d]):
            res = cli(*verb)
            err = assert_refused(res, *words)
            assert "TOP-SECRET" not in err + res.stdout, tag
        # --json in-process (the subprocess runs above showed nothing hangs)
        assert cli_main(["verify", "-D", str(d), "--json"]) == 5, tag
        rep = json.loads(capsys.readouterr().out)
        assert rep["ok"] is False and rep["error"] and "TOP-SECRET" not in rep["error"]
        assert rep["path"].endswith(".img")
        with pytest.raises(ImageError):
            open_chain(d).close()


def test_open_chain_never_blocks_on_a_fifo_being_written(good, tmp_path):
    """Even with a writer on the FIFO, the reader never opens it."""
    d = copy(good, tmp_path)
    (d / "layer-0002.img").unlink()
    os.mkfifo(d / "layer-0002.img")
    w = os.open(d / "layer-0002.img", os.O_RDWR)      # keeps a writer end open
    try:
        with pytest.raises(ImageError, match="FIFO"):
            open_chain(d)
    finally:
        os.close(w)


def test_odd_entries_that_are_no_layers_are_harmless(good, tmp_path):
    """A directory named like a temp file, unreadable junk, names with too
    many digits: show and verify still work on the chain."""
    d = copy(good, tmp_path)
    (d / ".layer-0003.img.tmp-deadbeef").mkdir()
    os.mkfifo(d / ".layer-0004.img.tmp-0badf00d")
    (d / ("layer-" + "9" * 240 + ".img")).write_bytes(b"x")
    (d / "layer-00001.img").write_bytes(b"not canonical")
    (d / "notes.txt").write_text("hello")
    res = cli("show", "-D", d)
    assert res.returncode == 0, res.stderr
    assert ".layer-0003.img.tmp-deadbeef" in res.stdout
    res = cli("verify", "-D", d, "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    states = {t["file"]: t["state"] for t in rep["temps"]}
    assert states[".layer-0003.img.tmp-deadbeef"].startswith("odd: ")
    assert "directory" in states[".layer-0003.img.tmp-deadbeef"]
    assert "FIFO" in states[".layer-0004.img.tmp-0badf00d"]
    assert chain_pages(d) == as_content(expected(LAYERS))


def test_images_dir_is_odd(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    os.mkfifo(tmp_path / "fifo")
    for d, words in ((f, "not a directory"), (tmp_path / "fifo", "not a directory"),
                     (tmp_path / "missing", "does not exist")):
        for verb in ("verify", "show", "squash"):
            assert_refused(cli(verb, "-D", d), words)


# ------------------------------------------------------------------ RLIMIT_NOFILE

def test_chain_longer_than_rlimit_nofile(tmp_path):
    """60 layers under a soft limit of 24 fds: open_chain, verify, iter_runs
    (threaded too), the CLI's verify and squash all work."""
    n = 60
    d = tmp_path / "img"
    layers = [{(1, i): i * 7 + 1, (1, 100 + i): ZERO} for i in range(n)]
    write_chain(d, layers)
    want = {f"{pid}:{pg}": h for (pid, pg), h in
            ((k, v.hex()[:16]) for k, v in as_content(expected(layers)).items())}
    (tmp_path / "want.json").write_text(json.dumps(want))
    script = textwrap.dedent(f"""
        import json, os, resource, sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'tests')!r})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (24, hard))
        from checkpoint.images import open_chain
        from checkpoint.images.squash import squash
        from images_helpers import chain_pages
        want = json.load(open({str(tmp_path / 'want.json')!r}))
        def check(**kw):
            got = {{f"{{p}}:{{g}}": v.hex()[:16] for (p, g), v in chain_pages({str(d)!r}, **kw).items()}}
            assert got == want, "content differs"
        with open_chain({str(d)!r}, verify_frames=True, threads=2) as c:
            assert len(c.layers) == {n}
            c.verify()
        check()
        check(threads=2)
        from checkpoint import cli
        rc = cli.main(["verify", "-D", {str(d)!r}, "--threads", "2"])
        assert rc == 0, rc
        rc = cli.main(["squash", "-D", {str(d)!r}, "--into", "{n - 5}"])
        assert rc == 0, rc
        check()
        with open_chain({str(d)!r}) as c:
            assert len(c.layers) == 6
        print("ok", os.listdir("/proc/self/fd").__len__())
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1].startswith("ok")


# ------------------------------------------------------------- hostile contents

def _rss_run(d, extra: str = "") -> dict:
    """open_chain/verify/iter_runs on ``d`` in a fresh interpreter; returns
    {"errors": [...], "rss_mib": peak RSS}."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from checkpoint.errors import ImageError
        from checkpoint.images import open_chain
        errors = []
        def attempt(f):
            try:
                f()
            except ImageError as e:
                msg = str(e)
                assert "\\n" not in msg
                errors.append(msg)
        def walk(**kw):
            with open_chain({str(d)!r}) as c:
                for pid in c.pids():
                    for run in c.iter_runs(pid, **kw):
                        pass
        def verify():
            with open_chain({str(d)!r}, verify_frames=True) as c:
                c.verify()
        attempt(lambda: open_chain({str(d)!r}).close())
        attempt(verify)
        attempt(lambda: walk(zero_data=False))
        attempt(lambda: walk(zero_data=False, within=[(0, 1 << 30)]))
        {extra}
        print(json.dumps({{"errors": errors,
              "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


def _one_layer(d, pages=8):
    w = LayerWriter(LocalSink(d, 0), frame_size=64 << 10)
    w.add_record("pstree", b"")
    w.add_pages(1, 0x10000, b"".join(page_content(i) for i in range(pages)))
    w.add_zero(1, 0x100000, 4)
    w.close()
    return d / "layer-0000.img"


def _kinds(blocks):
    return [b[0] for b in blocks]


def test_decompression_bomb_refused_without_allocating(tmp_path):
    """A frame whose zstd header declares 1 GiB for a block that says 32 KiB
    (CRCs all right): refused before decompression; RSS stays small."""
    d = tmp_path / "img"
    path = _one_layer(d)
    blocks = read_blocks(path)
    fi = _kinds(blocks).index(F.BT_FRAME)
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=1 << 30)
    chunk = bytes(1 << 20)
    bomb = b"".join(cobj.compress(chunk) for _ in range(1024)) + cobj.flush()
    assert zstandard.get_frame_parameters(bomb).content_size == 1 << 30
    blocks[fi][2] = bomb
    write_blocks(path, blocks)
    r = _rss_run(d)
    assert r["errors"], r
    assert len(r["errors"]) == 3 and all(
        "declares content size 1073741824" in e and "frame 0" in e for e in r["errors"]), r
    assert r["rss_mib"] < RSS_LIMIT_MIB, r
    res = cli("verify", "-D", d)
    assert_refused(res, "layer-0000.img", "frame 0", "declares content size")


def test_frame_without_content_size_refused(tmp_path):
    d = tmp_path / "img"
    path = _one_layer(d)
    blocks = read_blocks(path)
    fi = _kinds(blocks).index(F.BT_FRAME)
    raw = zstandard.ZstdDecompressor().decompress(blocks[fi][2])
    blocks[fi][2] = zstandard.ZstdCompressor(write_content_size=False).compress(raw)
    write_blocks(path, blocks)
    assert_refused(cli("verify", "-D", d), "no content size")


@pytest.mark.parametrize("length", [1 << 31, (1 << 32) - 1, 300 << 20, 5 << 20])
@pytest.mark.parametrize("btype", ["record", "pagemap", "header", "frame"])
def test_huge_length_prefixes(tmp_path, btype, length):
    """A block header claiming a huge payload, with its header CRC right:
    refused by a bound or as truncated, before anything that size exists."""
    d = tmp_path / "img"
    path = _one_layer(d)
    data = bytearray(path.read_bytes())
    blocks = read_blocks(path)
    kind = {"record": F.BT_RECORD, "pagemap": F.BT_PAGEMAP, "header": F.BT_HEADER,
            "frame": F.BT_FRAME}[btype]
    pos = F.PREAMBLE_SIZE
    for b in blocks:
        if b[0] == kind:
            break
        pos += F.BLOCK_HEADER_SIZE + len(b[2])
    inv = F.Inventory.FromString(blocks[0][2])
    seed = 0 if kind == F.BT_HEADER else F.layer_seed(inv.layer_id)
    btype_, _, aux, pcrc, _ = F.BLOCK.unpack_from(data, pos)
    data[pos:pos + F.BLOCK_HEADER_SIZE] = F.pack_block_header(btype_, length, aux, pcrc, pos, seed)
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as ei:
        open_chain(d).close()
    msg = str(ei.value)
    assert "layer-0000.img" in msg and f"offset {pos}" in msg
    assert "truncated" in msg or "bound" in msg or "cannot hold" in msg, msg


def _edit_pagemap(path, edit):
    blocks = read_blocks(path)
    pi = _kinds(blocks).index(F.BT_PAGEMAP)
    pm = pagemap_pb2.PagemapBlock.FromString(blocks[pi][2])
    edit(pm)
    blocks[pi][2] = pm.SerializeToString()
    write_blocks(path, blocks)


@pytest.mark.parametrize("case,words", [
    ("addr_above_task_size", "user address space"),
    ("npages_past_task_size", "user address space"),
    ("npages_max", "user address space"),
    ("unaligned", "user address space"),
    ("pid_zero", "pid 0 out of range"),
    ("pid_huge", "out of range"),
    ("too_many_entries", r"entries \(at most"),
    ("columns", "different lengths"),
    ("flags", "unknown flags"),
    ("overlap", "appears twice"),
    ("frame_overrun", "more than the"),
])
def test_absurd_pagemap_entries(tmp_path, case, words):
    d = tmp_path / "img"
    path = _one_layer(d)

    def edit(pm):
        if case == "addr_above_task_size":
            pm.vaddr[0] = 0xFFFFFFFFFF600000
        elif case == "npages_past_task_size":
            pm.vaddr[0] = F.USER_ADDR_LIMIT - 4 * PS
        elif case == "npages_max":
            pm.flags[0] = 1
            pm.npages[0] = 0xFFFFFFFF
            pm.vaddr[0] = 0x7FF000000000
        elif case == "unaligned":
            pm.vaddr[0] += 1
        elif case == "pid_zero":
            pm.pid[0] = 0
        elif case == "pid_huge":
            pm.pid[0] = 0xFFFFFFFF
        elif case == "too_many_entries":
            n = F.MAX_PAGEMAP_ENTRIES + 1
            pm.pid.extend([1] * n)
            pm.vaddr.extend(0x200000000 + i * PS for i in range(n))
            pm.npages.extend([1] * n)
            pm.flags.extend([1] * n)
        elif case == "columns":
            pm.flags.append(1)
        elif case == "flags":
            pm.flags[0] = 7
        elif case == "overlap":
            pm.pid.append(1)
            pm.vaddr.append(pm.vaddr[0] + PS)
            pm.npages.append(1)
            pm.flags.append(1)
        elif case == "frame_overrun":
            pm.npages[0] = 1000
    _edit_pagemap(path, edit)
    with pytest.raises(ImageError, match=words) as ei:
        open_chain(d).close()
    assert "pagemap block" in str(ei.value) and "layer-0000.img" in str(ei.value)
    assert_refused(cli("verify", "-D", d), "pagemap block")


def test_absurd_trailer_counts(tmp_path):
    d = tmp_path / "img"
    path = _one_layer(d)
    blocks = read_blocks(path)
    tr = F.Trailer.FromString(blocks[-1][2])
    tr.frames = 1 << 60
    blocks[-1][2] = tr.SerializeToString()
    write_blocks(path, blocks, fix_trailer=False)
    with pytest.raises(ImageError, match="trailer block: disagrees with the blocks: frame index"):
        open_chain(d).close()
    # a trailer inflated far beyond what its blocks need
    tr.frames = 1
    tr.frame_offsets.extend(range(10 ** 6))
    blocks[-1][2] = tr.SerializeToString()
    write_blocks(path, blocks, fix_trailer=False)
    with pytest.raises(ImageError, match="trailer block: length .* exceeds"):
        open_chain(d).close()


def test_too_many_pids(tmp_path):
    d = tmp_path / "img"
    path = _one_layer(d)

    def edit(pm):
        n = F.MAX_LAYER_PIDS + 1
        pm.pid.extend(range(100, 100 + n))
        pm.vaddr.extend([0x200000000] * n)
        pm.npages.extend([1] * n)
        pm.flags.extend([1] * n)
    _edit_pagemap(path, edit)
    with pytest.raises(ImageError, match="more than 1024 pids"):
        open_chain(d).close()


def test_huge_frame_aux_and_stored_lengths(tmp_path):
    d = tmp_path / "img"
    path = _one_layer(d)
    blocks = read_blocks(path)
    fi = _kinds(blocks).index(F.BT_FRAME)
    blocks[fi][1] = 64 << 20          # aux: far above the layer's frame_size
    write_blocks(path, blocks)
    with pytest.raises(ImageError, match=r"frame 0: raw size \(aux\) 67108864"):
        open_chain(d).close()
    blocks[fi][1] = 8 * PS
    blocks[fi][2] = blocks[fi][2] + bytes(200 << 10)   # padding no zstd frame needs
    write_blocks(path, blocks)
    with pytest.raises(ImageError, match="cannot hold"):
        open_chain(d).close()


def test_16_tib_zero_run_costs_nothing(tmp_path):
    """16 TiB of zero pages (written by our own writer, so it is a valid
    layer): open, verify, iter_runs without zero data, iter_runs clipped to
    ranges and squash are instant and RSS stays small."""
    d = tmp_path / "img"
    w = LayerWriter(LocalSink(d, 0), frame_size=64 << 10)
    w.add_pages(1, 0x1000, page_content(1) * 4)
    w.add_zero(1, 0x10000000, (16 << 40) // PS)
    w.add_pages(1, 0x7F0000000000, page_content(2))
    w.close()
    with open_chain(d) as c:
        runs = list(c.iter_runs(1, zero_data=False))
        assert [r.zero for r in runs] == [False, True, False]
        assert runs[1].npages == (16 << 40) // PS and runs[1].data is None
        clipped = list(c.iter_runs(1, within=[(0x10000000 + 5 * PS, 0x10000000 + 9 * PS),
                                              (0x0, 0x2000), (0x7F0000000000, 0x7F0000001000)]))
        assert [(r.addr, r.npages, r.zero) for r in clipped] == [
            (0x1000, 1, False), (0x10000000 + 5 * PS, 4, True), (0x7F0000000000, 1, False)]
        assert bytes(clipped[0].data) == page_content(1)
        assert bytes(clipped[1].data) == bytes(4 * PS)
        assert bytes(clipped[2].data) == page_content(2)
        assert list(c.iter_runs(1, within=[(0x300000000000, 0x300000001000)])) == []
    r = _rss_run(d)
    assert r["errors"] == [] and r["rss_mib"] < RSS_LIMIT_MIB, r
    res = cli("verify", "-D", d, timeout=30)
    assert res.returncode == 0, res.stderr
    # squash keeps the run (split in uint32-sized entries) and stays cheap
    w1 = LayerWriter(LocalSink(d, 1), index=1, frame_size=64 << 10, parent=_ref(d))
    w1.add_pages(1, 0x2000, page_content(3))
    w1.close()
    squash(d)
    with open_chain(d) as c:
        zero = [r for r in c.iter_runs(1, zero_data=False) if r.zero]
        assert sum(r.npages for r in zero) == (16 << 40) // PS
        assert c.read_page(1, 0x2000) == page_content(3)


def _ref(d):
    from checkpoint.images import ParentRef
    with open_chain(d) as c:
        t = c.top
        return ParentRef(t.layer_id, t.header_digest, t.index, t.mac)


def test_within_clips_without_reading_other_frames(good, tmp_path):
    """Frames outside the ranges are never read: corrupt one and clip around it."""
    d = copy(good, tmp_path)
    with open_chain(d) as c:
        want = {r.addr: bytes(r.data) for r in c.iter_runs(1, max_run=PS)
                if r.addr < 8 * PS}
    blocks = read_blocks(d / "layer-0000.img")
    # damage the base's last frame (pages 32..39)
    fis = [i for i, b in enumerate(blocks) if b[0] == F.BT_FRAME]
    blocks[fis[-1]][2] = bytes(len(blocks[fis[-1]][2]))
    write_blocks(d / "layer-0000.img", blocks)
    with open_chain(d) as c:
        got = {}
        for r in c.iter_runs(1, within=[(0, 8 * PS)]):
            for k in range(r.npages):
                got[r.addr + k * PS] = bytes(r.data[k * PS:(k + 1) * PS])
        assert got == want
        with pytest.raises(ImageError):
            for _ in c.iter_runs(1, within=[(32 * PS, 40 * PS)]):
                pass
    with pytest.raises(ValueError, match="aligned"):
        with open_chain(d) as c:
            list(c.iter_runs(1, within=[(1, PS)]))


def test_layer_replaced_after_open_is_refused(good, tmp_path):
    """A layer file swapped for another after open_chain (and after its fd
    left the cache): the reopen notices, no byte of the new file is used."""
    d = copy(good, tmp_path)
    with open_chain(d, max_open=1) as c:     # scanned 2, 1, 0: only layer 0 stays open
        data = (d / "layer-0002.img").read_bytes()
        (d / "layer-0002.img").unlink()
        (d / "layer-0002.img").write_bytes(data)        # same bytes, another inode
        os.chmod(d / "layer-0002.img", 0o600)
        with pytest.raises(ImageError, match="changed since the chain was opened"):
            for pid in c.pids():
                for _ in c.iter_runs(pid):
                    pass


def test_show_and_verify_never_traceback_on_garbage_records(good, tmp_path, capsys):
    """Records of random bytes (CRCs fixed, so they reach the decoders) under
    every kind show prints: exit 0 or 5, one error line at most, and no
    control character from the image reaches the terminal."""
    import random

    from checkpoint import cli as cli_mod
    from checkpoint.images.pb import files_pb2, mm_pb2, pstree_pb2
    rnd = random.Random(5)
    kinds = ["pstree", "mm", "files", "core", "signals", "stats", "process", "tracker", "junk"]
    seen = set()
    for i in range(60):
        d = copy(good, tmp_path, f"g{i}")
        path = d / "layer-0002.img"
        blocks = read_blocks(path)
        esc = "\x1b[2J\x1b]0;owned\x07"             # clear screen, set the title
        evil = {"pstree": pstree_pb2.PstreeEntry(pid=1, comm=esc),
                "mm": mm_pb2.MmEntry(pid=1, vmas=[mm_pb2.VmaEntry(start=0, end=4096,
                                                                 path=esc)]),
                "files": files_pb2.FilesEntry(pid=1, fds=[files_pb2.FdEntry(fd=3, path=esc)])}
        for b in blocks:
            if b[0] == F.BT_RECORD:
                rec = F.Record.FromString(b[2])
                rec.kind = rnd.choice(kinds)
                if i % 3 or rec.kind not in evil:
                    rec.payload = rnd.randbytes(rnd.randint(0, 80))
                else:
                    rec.payload = evil[rec.kind].SerializeToString()
                    seen.add(("evil", rec.kind))
                b[2] = rec.SerializeToString()
        write_blocks(path, blocks)
        for argv in (["show", "-D", str(d)], ["show", "-D", str(d), "--json"],
                     ["verify", "-D", str(d), "--threads", "1"]):
            rc = cli_mod.main(argv)
            out, err = capsys.readouterr()
            assert rc in (0, 5), (argv, rc, err)
            assert "\x1b" not in err + out     # JSON escapes it as \\u001b
            if rc:
                assert err.count("\n") == 1 and err.startswith("checkpoint: error: ")
            seen.add((argv[0], rc))
    assert ("show", 5) in seen and ("verify", 5) in seen and ("show", 0) in seen
    assert {("evil", k) for k in ("pstree", "mm", "files")} <= seen


def test_a_million_pagemap_entries_stay_cheap(tmp_path):
    """A layer our own writer makes for a sparse pattern (every other page a
    zero page: 10^6 entries, an 8 MB file): reading it keeps a fresh
    interpreter's RSS under 200 MiB (the reader keeps columns in arrays,
    never an object per entry)."""
    d = tmp_path / "img"
    w = LayerWriter(LocalSink(d, 0), frame_size=64 << 10)
    for i in range(1_000_000):
        w.add_zero(1, 0x100000000 + 2 * i * PS, 1)
    w.add_pages(1, 0x7F0000000000, page_content(1))
    w.close()
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from checkpoint.images import open_chain
        with open_chain({str(d)!r}) as c:
            n = sum(1 for r in c.iter_runs(1, zero_data=False))
            m = sum(1 for r in c.iter_runs(1, within=[(0x100000000, 0x100000000 + (1 << 30))]))
        print(n, m, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    n, m, rss = res.stdout.split()
    assert int(n) == 1_000_001 and int(m) == (1 << 30) // PS // 2
    assert float(rss) < RSS_LIMIT_MIB, rss
