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
                threads=1, records=True, layer_id=None, sign_key=None):
    """layer_pages: {(pid, page_no): seed | ZERO}. Runs are emitted per pid in
    address order, so pids interleave in frames. Returns the writer's stats."""
    sink = LocalSink(images_dir, index)
    w = LayerWriter(sink, index=index, kind=kind, parent=parent, threads=threads,
                    frame_size=FRAME, tracker="full", layer_id=layer_id, sign_key=sign_key)
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


def write_chain(images_dir, layers: list[dict], threads=1, sign_key=None):
    parent = None
    writers = []
    for i, lp in enumerate(layers):
        w, _ = write_layer(images_dir, lp, parent=parent, index=i,
                           kind="dump" if i == len(layers) - 1 else "pre-dump", threads=threads,
                           sign_key=sign_key)
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


# ------------------------------------------------- raw block-level editing

def read_blocks(path) -> list[list]:
    """[btype, aux, payload] of every block of the layer file ``path``
    (structure only: no checksum is checked)."""
    from checkpoint.images import format as F

    data = open(path, "rb").read()
    out = []
    pos = F.PREAMBLE_SIZE
    while pos < len(data):
        btype, length, aux, _, _ = F.BLOCK.unpack_from(data, pos)
        start = pos + F.BLOCK_HEADER_SIZE
        out.append([btype, aux, data[start:start + length]])
        pos = start + length
    return out


def write_blocks(path, blocks, *, fix_trailer: bool = True) -> None:
    """Write ``blocks`` ([btype, aux, payload]) as a layer file with every
    CRC right, the way an attacker who edits a layer would: header CRCs
    seeded with the layer id, payload CRCs, and (``fix_trailer``) the
    trailer's offsets, counts, page counts, stored bytes and header digest
    recomputed.
    A signed layer's MAC is left as it was."""
    import os
    import zlib

    from checkpoint.images import format as F

    inv = F.Inventory.FromString(blocks[0][2])
    seed = F.layer_seed(inv.layer_id)
    out = bytearray(F.PREAMBLE.pack(F.MAGIC, F.FORMAT_VERSION, 0))
    frames, pagemaps, records = [], [], []
    stored = 0
    for i, (btype, aux, payload) in enumerate(blocks):
        pos = len(out)
        if btype == F.BT_TRAILER and fix_trailer:
            tr = F.Trailer.FromString(payload)
            mac = tr.mac
            tr.mac = b""
            del tr.frame_offsets[:], tr.pagemap_offsets[:], tr.record_offsets[:]
            tr.frame_offsets.extend(frames)
            tr.pagemap_offsets.extend(pagemaps)
            tr.record_offsets.extend(records)
            tr.frames, tr.pagemaps, tr.records = len(frames), len(pagemaps), len(records)
            tr.stats.bytes_stored = stored
            tr.stats.pages_written = tr.pages_zero = 0
            for bt, _, pl in blocks:
                if bt == F.BT_PAGEMAP:
                    pm = F.PagemapBlock.FromString(pl)
                    for n, fl in zip(pm.npages, pm.flags):
                        if fl == F.PE_DATA:
                            tr.stats.pages_written += n
                        else:
                            tr.pages_zero += n
            tr.header_digest = F.digest(blocks[0][2])
            payload = tr.SerializeToString()
            if mac:
                payload += bytes([(12 << 3) | 2, len(mac)]) + mac
        {F.BT_FRAME: frames, F.BT_PAGEMAP: pagemaps, F.BT_RECORD: records}.get(
            btype, []).append(pos)
        if btype == F.BT_FRAME:
            stored += len(payload)
        out += F.pack_block_header(btype, len(payload), aux, zlib.crc32(payload), pos,
                                   0 if i == 0 else seed)
        out += payload
    tmp = f"{path}.edit"
    with open(tmp, "wb") as f:
        f.write(out)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
