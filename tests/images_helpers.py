"""Shared helpers of the image tests: build chains from a page model."""

from __future__ import annotations

import random

from checkpoint.images import open_chain
from checkpoint.images.writer import LocalSink, LayerWriter
from checkpoint.images.pb import mm_pb2, pstree_pb2

PS = 4096
ZERO = "zero"
FRAME = 64 << 10


def page_content(seed: int) -> bytes:
    """A page, half compressible, distinct per seed."""
    r = random.Random(seed)
    return r.randbytes(PS // 2) + bytes([seed & 0xFF]) * (PS // 2)


def write_layer(images_dir, layer_pages: dict, *, parent=None, index=0, kind="pre-dump",
                threads=1, records=True, layer_id=None):
    """layer_pages: {(pid, page_no): seed | ZERO}. Runs are emitted per pid in
    address order, so pids interleave in frames. Returns the writer's stats."""
    sink = LocalSink(images_dir, index)
    w = LayerWriter(sink, index=index, kind=kind, parent=parent, threads=threads,
                    frame_size=FRAME, tracker="full", layer_id=layer_id)
    with w:
        if records:
            for pid in sorted({p for p, _ in layer_pages}):
                w.add_record("pstree", pstree_pb2.PstreeEntry(pid=pid, ppid=1, threads=[pid]))
                w.add_record("mm", mm_pb2.MmEntry(pid=pid, vmas=[mm_pb2.VmaEntry(
                    start=0, end=1 << 20, prot=3, path="")], auxv=[6, 4096, 0, 0]))
        by_pid: dict[int, list[int]] = {}
        for pid, pg in layer_pages:
            by_pid.setdefault(pid, []).append(pg)
        order = []
        for pid, pgs in by_pid.items():
            pgs.sort()
            i = 0
            while i < len(pgs):
                j = i
                kind_i = layer_pages[(pid, pgs[i])] == ZERO
                while (j + 1 < len(pgs) and pgs[j + 1] == pgs[j] + 1
                       and (layer_pages[(pid, pgs[j + 1])] == ZERO) == kind_i):
                    j += 1
                order.append((pid, pgs[i], j - i + 1, kind_i))
                i = j + 1
        # interleave pids while keeping each pid's address order
        order.sort(key=lambda t: (t[1], t[0]))
        for pid, pg, n, is_zero in order:
            if is_zero:
                w.add_zero(pid, pg * PS, n)
            else:
                data = b"".join(page_content(layer_pages[(pid, pg + k)]) for k in range(n))
                w.add_pages(pid, pg * PS, memoryview(data))
        stats = w.close()
    return w, stats


def write_chain(images_dir, layers: list[dict], threads=1):
    parent = None
    writers = []
    for i, lp in enumerate(layers):
        w, _ = write_layer(images_dir, lp, parent=parent, index=i,
                           kind="dump" if i == len(layers) - 1 else "pre-dump", threads=threads)
        parent = w.parent_ref
        writers.append(w)
    return writers


def expected(layers: list[dict]) -> dict:
    model = {}
    for lp in layers:
        model.update(lp)
    return model


def chain_pages(images_dir, **kw) -> dict:
    """{(pid, page_no): bytes} of every page, via the bulk API."""
    out = {}
    with open_chain(images_dir, **kw) as chain:
        for pid in chain.pids():
            prev_end = -1
            for run in chain.iter_runs(pid):
                assert run.addr >= prev_end, "runs out of address order"
                prev_end = run.addr + run.npages * PS
                assert len(run.data) == run.npages * PS
                for k in range(run.npages):
                    out[(pid, run.addr // PS + k)] = bytes(run.data[k * PS:(k + 1) * PS])
    return out


def as_content(model: dict) -> dict:
    return {k: (bytes(PS) if v == ZERO else page_content(v)) for k, v in model.items()}
