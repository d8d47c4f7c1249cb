"""Property tests: a chain returns the newest content of every page, and
squash keeps that content identical."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint.images import open_chain, open_layer_for_write
from checkpoint.images.squash import squash
from checkpoint.images.writer import LayerWriter, LocalSink, StreamSink
from images_helpers import PS, ZERO, as_content, chain_pages, expected, page_content, write_chain

page_value = st.one_of(st.integers(0, 10_000), st.just(ZERO))
layer_st = st.dictionaries(st.tuples(st.integers(1, 3), st.integers(0, 80)), page_value,
                           max_size=60)
chain_st = st.lists(layer_st, min_size=1, max_size=4)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers=chain_st, threads=st.sampled_from([1, 2]), into=st.integers(1, 4))
def test_chain_returns_newest_and_squash_keeps_content(layers, threads, into):
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "img")
        write_chain(d, layers, threads=threads)
        want = as_content(expected(layers))
        assert chain_pages(d, threads=threads) == want
        with open_chain(d) as chain:
            for (pid, pg), content in list(want.items())[:30]:
                assert chain.read_page(pid, pg * PS + 17) == content
            assert chain.read_page(99, 0) is None
            assert len(chain.records("pstree")) == len({p for p, _ in layers[-1]})
            chain.verify()
        squash(d, min(into, len(layers)), threads=threads)
        assert chain_pages(d) == want
        squash(d)
        assert chain_pages(d) == want
        with open_chain(d) as chain:
            assert len(chain.layers) == 1 and chain.stale == []


def test_permissions_and_next_layer(tmp_path):
    d = tmp_path / "img"
    with open_layer_for_write(d, kind="pre-dump", frame_size=64 << 10) as w:
        w.add_pages(7, 0x400000, page_content(1) * 40)
        w.add_zero(7, 0x500000, 3)
        s0 = w.close()
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(s0.path).st_mode) == 0o600
    assert s0.pages == 40 and s0.pages_zero == 3 and s0.frames == 3
    with open_layer_for_write(d, threads=2, frame_size=64 << 10) as w:
        w.add_pages(7, 0x401000, page_content(2))
        s1 = w.close(freezing_ms=1.5, pages_skipped_parent=39)
    assert s1.index == 1 and sorted(os.listdir(d)) == ["layer-0000.img", "layer-0001.img"]
    with open_chain(d) as chain:
        assert chain.top.inventory.parent_id == s0.layer_id
        assert chain.top.stats.freezing_ms == 1.5
        assert chain.read_page(7, 0x401000) == page_content(2)
        assert chain.read_page(7, 0x402000) == page_content(1)
        assert chain.read_page(7, 0x501000) == bytes(PS)


def test_writer_rejects_out_of_order_and_aborts_cleanly(tmp_path):
    d = tmp_path / "img"
    with pytest.raises(ValueError, match="increasing address order"):
        with open_layer_for_write(d) as w:
            w.add_pages(1, 0x2000, bytes(PS))
            w.add_pages(1, 0x1000, bytes(PS))
    assert os.listdir(d) == []          # nothing partial is left visible or behind


def test_large_add_pages_borrowed_frames(tmp_path):
    """Whole frames are compressed straight from the caller's buffer."""
    d = tmp_path / "img"
    data = bytearray(b"".join(page_content(i) for i in range(600)))   # > 2 MiB
    for threads in (1, 2):
        sub = d / str(threads)
        with open_layer_for_write(sub, threads=threads) as w:
            w.add_pages(1, 0x10000, data[:300 * PS])
            w.add_pages(1, 0x10000 + 300 * PS, data[300 * PS:])
            data_copy = bytes(data)
            data[:] = bytes(len(data))      # caller reuses its buffer after add_pages
            w.close()
        got = chain_pages(sub, threads=threads)
        assert b"".join(got[(1, 16 + i)] for i in range(600)) == data_copy
        data[:] = data_copy


class _FullDisk(LocalSink):
    """A LocalSink whose disk fills up after `room` bytes."""

    def __init__(self, *a, room: int, **kw):
        super().__init__(*a, **kw)
        self.room = room

    def write(self, buffers) -> None:
        n = sum(len(memoryview(b)) for b in buffers)
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        super().write(buffers)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("room", [0, 100, 3 << 20])
def test_write_errors_surface_and_abort_leaves_nothing(tmp_path, threads, room):
    """The background writer's ENOSPC comes out of add_pages or close as the
    same OSError; abort (via the context manager) removes the temp file and
    ends the writer's threads."""
    d = tmp_path / "img"
    before = set(threading.enumerate())
    data = os.urandom(64 * PS)
    with pytest.raises(OSError) as ei:
        with LayerWriter(_FullDisk(d, 0, room=room), threads=threads) as w:
            for i in range(200):                       # 50 MiB of incompressible pages
                w.add_pages(1, i * 64 * PS, data)
            w.close()
    assert ei.value.errno == errno.ENOSPC
    assert os.listdir(d) == []
    assert set(threading.enumerate()) <= before


def test_stream_sink_and_buffer_reuse(tmp_path):
    """StreamSink gets the same format; the caller's buffer is reusable on return."""
    d = tmp_path / "img"
    d.mkdir()
    buf = bytearray(3 * (1 << 20) + 5 * PS)
    want = {}
    with open(d / "layer-0000.img", "wb") as f:
        w = LayerWriter(StreamSink(f))
        for i in range(6):
            buf[:] = b"".join(page_content(i * 1000 + k) for k in range(len(buf) // PS))
            for k in range(len(buf) // PS):
                want[(1, i * 4096 + k)] = bytes(buf[k * PS:(k + 1) * PS])
            w.add_pages(1, i * 4096 * PS, buf)
        st = w.close()
    assert st.path is None and st.file_bytes == os.path.getsize(d / "layer-0000.img")
    assert chain_pages(d) == want
