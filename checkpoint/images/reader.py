"""The chain reader: a source of pages that follows the parent links.

``open_chain(DIR)`` finds the layers, checks every link (ids, header
digests), every block header checksum and every metadata block checksum
before returning. A frame's checksum is checked when the frame is read,
before any byte of it is handed out; ``verify_frames=True`` (or
:meth:`Chain.verify`) checks them all up front.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import zstandard
from google.protobuf.message import DecodeError

from ..errors import ImageError
from . import format as F


class PageRun(NamedTuple):
    """``npages`` pages of a pid from ``addr``. ``data`` is a memoryview of
    their content (shared zeros for zero runs), or None for a zero run when
    the caller asked for ``zero_data=False``."""

    addr: int
    npages: int
    data: memoryview | None
    zero: bool


@dataclass(frozen=True)
class Frame:
    offset: int       # of the block header
    stored: int       # compressed payload length
    raw: int          # decompressed length
    crc: int


class Layer:
    """One scanned, validated layer file (kept open until the chain closes)."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._scan()
        except BaseException:
            os.close(self.fd)
            raise

    # header shortcuts
    @property
    def layer_id(self) -> str:
        return self.inventory.layer_id

    @property
    def index(self) -> int:
        return self.inventory.index

    @property
    def kind(self) -> str:
        return self.inventory.kind

    @property
    def stats(self):
        return self.trailer.stats

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _err(self, msg: str, offset: int | None) -> ImageError:
        return ImageError(msg, path=self.path, offset=offset)

    def _pread(self, n: int, offset: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise self._err(f"truncated: needs {n} bytes here, file ends at offset "
                            f"{offset + len(data)}", offset)
        return data

    def _parse(self, cls, payload: bytes, what: str, offset: int):
        try:
            return cls.FromString(payload)
        except DecodeError as exc:
            raise self._err(f"undecodable {what} block ({exc})", offset) from None

    def _scan(self) -> None:
        size = os.fstat(self.fd).st_size
        self.size = size
        pre = os.pread(self.fd, F.PREAMBLE_SIZE, 0)
        if len(pre) < F.PREAMBLE_SIZE:
            raise self._err(f"truncated: {len(pre)} bytes, not even the {F.PREAMBLE_SIZE}-byte "
                            f"preamble (a layer left half-written?)", 0)
        magic, version, flags = F.PREAMBLE.unpack(pre)
        if magic != F.MAGIC:
            raise self._err(f"not a checkpoint layer (magic {magic!r}, expected {F.MAGIC!r})", 0)
        if version != F.FORMAT_VERSION:
            raise self._err(f"unsupported layer format version {version} "
                            f"(this engine reads {F.FORMAT_VERSION})", 8)
        if flags != 0:
            raise self._err(f"unknown preamble flags {flags:#x}", 12)
        self.frames: list[Frame] = []
        self._crc_ok: set[int] = set()  # frames whose checksum was already checked
        self.records: list[tuple[str, bytes]] = []
        self.record_offsets: list[int] = []
        self.pagemap_offsets: list[int] = []
        self.trailer = None
        self.inventory = None
        runs: dict[int, list[tuple]] = {}
        described = -1           # last frame a pagemap described
        pages = zero = 0
        seed = 0
        pos = F.PREAMBLE_SIZE
        while True:
            if pos >= size:
                raise self._err("truncated: file ends before the trailer block (a layer left "
                                "half-written?)", pos)
            head = os.pread(self.fd, F.BLOCK_HEADER_SIZE, pos)
            if len(head) < F.BLOCK_HEADER_SIZE:
                raise self._err(f"truncated: block header needs {F.BLOCK_HEADER_SIZE} bytes, "
                                f"file ends at offset {size}", pos)
            btype, length, aux, pcrc, _ = F.BLOCK.unpack(head)
            if not F.header_crc_ok(head, pos, seed):
                raise self._err("block header checksum mismatch (corrupt, or a block moved "
                                "from elsewhere)", pos)
            name = F.BLOCK_NAMES.get(btype, f"type-{btype}")
            end = pos + F.BLOCK_HEADER_SIZE + length
            if end > size:
                raise self._err(f"truncated inside a {name} block: it needs {length} payload "
                                f"bytes, file ends at offset {size}", pos)
            if (self.inventory is None) != (btype == F.BT_HEADER):
                raise self._err(f"{name} block where "
                                f"{'the header' if self.inventory is None else 'no header'} "
                                f"block belongs", pos)
            if btype == F.BT_FRAME:
                if aux == 0 or aux > F.MAX_FRAME_RAW or aux % self.inventory.page_size:
                    raise self._err(f"frame of implausible raw size {aux}", pos)
                if described != len(self.frames) - 1:
                    raise self._err("frame follows a frame without a pagemap", pos)
                self.frames.append(Frame(pos, length, aux, pcrc))
                pos = end
                continue
            if length > F.MAX_METADATA_BLOCK:
                raise self._err(f"{name} block of implausible size {length}", pos)
            payload = self._pread(length, pos + F.BLOCK_HEADER_SIZE)
            if zlib.crc32(payload) != pcrc:
                raise self._err(f"checksum mismatch in {name} block", pos)
            if btype == F.BT_HEADER:
                inv = self._parse(F.Inventory, payload, name, pos)
                self._check_inventory(inv, pos)
                self.inventory = inv
                self.header_digest = F.digest(payload)
                seed = F.layer_seed(inv.layer_id)
            elif btype == F.BT_RECORD:
                rec = self._parse(F.Record, payload, name, pos)
                self.records.append((rec.kind, rec.payload))
                self.record_offsets.append(pos)
            elif btype == F.BT_PAGEMAP:
                pm = self._parse(F.PagemapBlock, payload, name, pos)
                p, z = self._add_pagemap(pm, runs, pos)
                pages += p
                zero += z
                if pm.HasField("frame"):
                    described = pm.frame
                self.pagemap_offsets.append(pos)
            elif btype == F.BT_TRAILER:
                tr = self._parse(F.Trailer, payload, name, pos)
                if end != size:
                    raise self._err(f"{size - end} unexpected bytes after the trailer", end)
                if described != len(self.frames) - 1:
                    raise self._err("the last frame has no pagemap", pos)
                self._check_trailer(tr, pages, zero, pos)
                self.trailer = tr
                break
            elif btype not in F.OPTIONAL_TYPES:
                raise self._err(f"unknown block type {btype}", pos)
            pos = end
        self.pages, self.pages_zero = pages, zero
        # Per pid: sorted starts for bisect and (end, frame, byte offset | -1 for zero).
        self.runs: dict[int, tuple[list[int], list[tuple[int, int, int]]]] = {}
        ps = self.inventory.page_size
        for pid, lst in runs.items():
            lst.sort()
            prev_end = -1
            for start, end_, _, _, off in lst:
                if start < prev_end:
                    raise self._err(f"pid {pid}: page {start:#x} appears twice in this layer",
                                    off)
                prev_end = end_
            self.runs[pid] = ([r[0] for r in lst], [(r[1], r[2], r[3]) for r in lst])
        del ps

    def _check_inventory(self, inv, pos: int) -> None:
        if len(inv.layer_id) != 32 or not re.fullmatch(r"[0-9a-f]{32}", inv.layer_id):
            raise self._err(f"bad layer id {inv.layer_id!r}", pos)
        if inv.kind not in F.KINDS:
            raise self._err(f"bad layer kind {inv.kind!r}", pos)
        if inv.page_size not in (4096, 16384, 65536):
            raise self._err(f"bad page size {inv.page_size}", pos)
        if inv.compression != "zstd":
            raise self._err(f"unknown compression {inv.compression!r}", pos)

    def _add_pagemap(self, pm, runs, pos: int) -> tuple[int, int]:
        n = len(pm.pid)
        if not (len(pm.vaddr) == len(pm.npages) == len(pm.flags) == n):
            raise self._err("pagemap columns of different lengths", pos)
        has_frame = pm.HasField("frame")
        if has_frame and pm.frame != len(self.frames) - 1:
            raise self._err(f"pagemap names frame {pm.frame}, but it follows frame "
                            f"{len(self.frames) - 1}", pos)
        ps = self.inventory.page_size
        fno = pm.frame if has_frame else -1
        off = 0
        pages = zero = 0
        for pid, addr, npages, flags in zip(pm.pid, pm.vaddr, pm.npages, pm.flags):
            if addr % ps or npages == 0 or addr + npages * ps > 1 << 64:
                raise self._err(f"bad pagemap entry: pid {pid} addr {addr:#x} npages {npages}",
                                pos)
            end = addr + npages * ps
            if flags == F.PE_DATA:
                if not has_frame:
                    raise self._err("data entry in a pagemap without a frame", pos)
                runs.setdefault(pid, []).append((addr, end, fno, off, pos))
                off += npages * ps
                pages += npages
            elif flags == F.PE_ZERO:
                runs.setdefault(pid, []).append((addr, end, -1, -1, pos))
                zero += npages
            else:
                raise self._err(f"unknown pagemap flags {flags}", pos)
        if has_frame and off != self.frames[fno].raw:
            raise self._err(f"pagemap describes {off} bytes but frame {fno} holds "
                            f"{self.frames[fno].raw}", pos)
        return pages, zero

    def _check_trailer(self, tr, pages: int, zero: int, pos: int) -> None:
        def bad(what):
            return self._err(f"trailer disagrees with the blocks: {what}", pos)
        if list(tr.frame_offsets) != [f.offset for f in self.frames] or tr.frames != len(self.frames):
            raise bad("frame index")
        if list(tr.pagemap_offsets) != self.pagemap_offsets or tr.pagemaps != len(self.pagemap_offsets):
            raise bad("pagemap index")
        if list(tr.record_offsets) != self.record_offsets or tr.records != len(self.records):
            raise bad("record index")
        if tr.header_digest != self.header_digest:
            raise bad("header digest")
        if tr.stats.pages_written != pages or tr.pages_zero != zero:
            raise bad(f"page counts ({tr.stats.pages_written}/{tr.pages_zero} vs {pages}/{zero})")
        if tr.stats.bytes_stored != sum(f.stored for f in self.frames):
            raise bad("stored bytes")

    # ----------------------------------------------------------- page access
    def lookup(self, pid: int, addr: int) -> tuple[int, int] | None:
        """(frame, byte offset) of the page at ``addr``; frame -1 = zero page;
        None if this layer does not hold it."""
        r = self.runs.get(pid)
        if r is None:
            return None
        starts, rest = r
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            return None
        end, fno, off = rest[i]
        if addr >= end:
            return None
        if fno < 0:
            return -1, 0
        return fno, off + (addr - starts[i])

    def read_frame(self, fno: int, dctx=None) -> bytes:
        """Read, check and decompress frame ``fno``."""
        fr = self.frames[fno]
        payload = os.pread(self.fd, fr.stored, fr.offset + F.BLOCK_HEADER_SIZE)
        if len(payload) != fr.stored:
            raise self._err(f"truncated inside frame {fno} (file changed since it was opened?)",
                            fr.offset)
        if fno not in self._crc_ok:
            if zlib.crc32(payload) != fr.crc:
                raise self._err(f"checksum mismatch in frame {fno}", fr.offset)
            self._crc_ok.add(fno)
        dctx = dctx or zstandard.ZstdDecompressor()
        try:
            data = dctx.decompress(payload, max_output_size=fr.raw)
        except zstandard.ZstdError as exc:
            raise self._err(f"frame {fno} does not decompress ({exc})", fr.offset) from None
        if len(data) != fr.raw:
            raise self._err(f"frame {fno} decompresses to {len(data)} bytes, expected {fr.raw}",
                            fr.offset)
        return data

    def check_frame_crcs(self) -> int:
        """Checksum every frame without decompressing; returns bytes read."""
        n = 0
        for fno, fr in enumerate(self.frames):
            if fno in self._crc_ok:
                continue
            payload = os.pread(self.fd, fr.stored, fr.offset + F.BLOCK_HEADER_SIZE)
            if len(payload) != fr.stored:
                raise self._err(f"truncated inside frame {fno}", fr.offset)
            if zlib.crc32(payload) != fr.crc:
                raise self._err(f"checksum mismatch in frame {fno}", fr.offset)
            self._crc_ok.add(fno)
            n += len(payload)
        return n

    def decoded_records(self, kind: str | None = None) -> list[tuple[str, object]]:
        out = []
        for (k, payload), off in zip(self.records, self.record_offsets):
            if kind is not None and k != kind:
                continue
            cls = F.RECORD_TYPES.get(k)
            out.append((k, self._parse(cls, payload, f"{k} record", off) if cls else payload))
        return out


# --------------------------------------------------------------------- chain

def list_layers(images_dir: str) -> dict[int, str]:
    """{index: path} of the published layer files in ``images_dir``."""
    try:
        names = os.listdir(images_dir)
    except FileNotFoundError:
        raise ImageError("images directory does not exist", path=images_dir) from None
    except NotADirectoryError:
        raise ImageError("not a directory", path=images_dir) from None
    out = {}
    for name in names:
        m = re.match(F.LAYER_RE, name)
        if m:
            out[int(m.group(1))] = os.path.join(images_dir, name)
    return out


def leftover_temps(images_dir: str) -> list[str]:
    """Partial layers left by a crashed writer (never part of a chain)."""
    return sorted(os.path.join(images_dir, n) for n in os.listdir(images_dir)
                  if n.startswith(F.TEMP_PREFIX) and ".tmp-" in n)


def _links_to(child: Layer, parent: Layer) -> bool:
    pid, pdig = child.inventory.parent_id, child.inventory.parent_digest
    inv = parent.inventory
    return ((pid == inv.layer_id and pdig == parent.header_digest)
            or (inv.squashed and pid == inv.replaces_id and pdig == inv.replaces_digest))


class Chain:
    """Layers base first; answers page queries from the newest holder."""

    def __init__(self, images_dir: str, layers: list[Layer], stale: list[str],
                 threads: int = 1, cache_frames: int = 8):
        self.dir = images_dir
        self.layers = layers
        self.stale = stale          # layer files superseded by a squash, not yet removed
        self.threads = max(1, threads)
        self._cache: OrderedDict = OrderedDict()
        self._cache_frames = cache_frames
        self._local = threading.local()
        self.page_size = layers[0].inventory.page_size

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    @property
    def base(self) -> Layer:
        return self.layers[0]

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        self._cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def pids(self) -> list[int]:
        return sorted({pid for layer in self.layers for pid in layer.runs})

    def records(self, kind: str | None = None) -> list[tuple[str, object]]:
        """The latest layer's metadata records as (kind, message)."""
        return self.top.decoded_records(kind)

    def _dctx(self):
        d = getattr(self._local, "dctx", None)
        if d is None:
            d = self._local.dctx = zstandard.ZstdDecompressor()
        return d

    def _frame(self, li: int, fno: int) -> bytes:
        key = (li, fno)
        data = self._cache.get(key)
        if data is None:
            data = self.layers[li].read_frame(fno, self._dctx())
            self._cache[key] = data
            while len(self._cache) > self._cache_frames:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return data

    def locate(self, pid: int, addr: int) -> tuple[int, int, int] | None:
        """(layer position, frame or -1 for zero, byte offset) of the newest copy."""
        addr -= addr % self.page_size
        for li in range(len(self.layers) - 1, -1, -1):
            hit = self.layers[li].lookup(pid, addr)
            if hit is not None:
                return li, hit[0], hit[1]
        return None

    def read_page(self, pid: int, addr: int) -> bytes | None:
        """Content of the page holding ``addr``, or None if no layer holds it."""
        loc = self.locate(pid, addr)
        if loc is None:
            return None
        li, fno, off = loc
        if fno < 0:
            return bytes(self.page_size)
        return self._frame(li, fno)[off:off + self.page_size]

    def resolve(self, pid: int) -> list[tuple[int, int, int, int, int]]:
        """Address-ordered segments (start, end, layer, frame | -1, byte offset)
        of ``pid``, each page from the newest layer holding it."""
        out = []
        covered: list[tuple[int, int]] = []      # disjoint, sorted
        for li in range(len(self.layers) - 1, -1, -1):
            r = self.layers[li].runs.get(pid)
            if not r:
                continue
            starts, rest = r
            mine = []
            j = 0
            for s, (e, fno, off) in zip(starts, rest):
                cur = s
                while j < len(covered) and covered[j][1] <= cur:
                    j += 1
                k = j
                while cur < e:
                    if k < len(covered) and covered[k][0] < e:
                        cs, ce = covered[k]
                        if cs > cur:
                            out.append((cur, cs, li, fno, off + (cur - s) if fno >= 0 else 0))
                        cur = max(cur, ce)
                        k += 1
                    else:
                        out.append((cur, e, li, fno, off + (cur - s) if fno >= 0 else 0))
                        cur = e
                mine.append((s, e))
            covered = _union(covered, mine)
        out.sort()
        return out

    def iter_runs(self, pid: int, *, zero_data: bool = True,
                  max_run: int = 1 << 20) -> Iterator[PageRun]:
        """All pages of ``pid`` in address order, as runs of at most
        ``max_run`` bytes. Each frame is read and decompressed once (ahead,
        on ``threads`` workers) and dropped after its last run is yielded."""
        segs = self.resolve(pid)
        ps = self.page_size
        uses: dict[tuple[int, int], int] = {}
        order = []
        for s, e, li, fno, off in segs:
            if fno >= 0:
                key = (li, fno)
                if key not in uses:
                    order.append(key)
                    uses[key] = 0
                uses[key] += 1
        zeros = memoryview(bytes(max_run)) if zero_data else None
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zstd-r") \
            if self.threads > 1 and len(order) > 1 else None
        pending: dict[tuple[int, int], object] = {}
        loaded: dict[tuple[int, int], memoryview] = {}
        nxt = 0
        window = 2 * self.threads

        def load(key):
            return self.layers[key[0]].read_frame(key[1], self._dctx())

        try:
            for s, e, li, fno, off in segs:
                if fno < 0:
                    a = s
                    while a < e:
                        n = min(e - a, max_run)
                        yield PageRun(a, n // ps, zeros[:n] if zeros is not None else None, True)
                        a += n
                    continue
                key = (li, fno)
                if key not in loaded:
                    if pool is not None:
                        while nxt < len(order) and len(pending) + len(loaded) < window:
                            k = order[nxt]
                            nxt += 1
                            pending[k] = pool.submit(load, k)
                        while key not in pending:   # scheduled ahead of the window? load now
                            k = order[nxt]
                            nxt += 1
                            pending[k] = pool.submit(load, k)
                        loaded[key] = memoryview(pending.pop(key).result())
                    else:
                        loaded[key] = memoryview(load(key))
                buf = loaded[key]
                a = s
                while a < e:
                    n = min(e - a, max_run)
                    o = off + (a - s)
                    yield PageRun(a, n // ps, buf[o:o + n], False)
                    a += n
                uses[key] -= 1
                if uses[key] == 0:
                    del loaded[key]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def verify(self) -> dict:
        """Read, checksum and decompress every frame of every layer."""
        frames = 0
        raw = 0

        def check(args):
            layer, fno = args
            return len(layer.read_frame(fno, self._dctx()))

        jobs = [(layer, i) for layer in self.layers for i in range(len(layer.frames))]
        if self.threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                for n in pool.map(check, jobs):
                    frames += 1
                    raw += n
        else:
            for j in jobs:
                raw += check(j)
                frames += 1
        for layer in self.layers:
            layer.decoded_records()
        return {"layers": len(self.layers), "frames": frames, "bytes_raw": raw}


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = sorted(a + b)
    out: list[list[int]] = []
    for s, e in merged:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def open_chain(images_dir: str | os.PathLike, *, upto: int | None = None,
               verify_frames: bool = False, threads: int = 1) -> Chain:
    """Open and validate the chain in ``images_dir``. ``upto``: keep only the
    first ``upto`` layers (base first). Raises ImageError on any problem."""
    images_dir = os.fspath(images_dir)
    files = list_layers(images_dir)
    if not files:
        raise ImageError("no layers (layer-NNNN.img) in the images directory", path=images_dir)
    opened: list[Layer] = []
    try:
        idx = max(files)
        child = None
        while True:
            path = files.get(idx)
            if path is None:
                raise ImageError(f"names parent layer {idx} (id {child.inventory.parent_id}) "
                                 f"but {F.layer_name(idx)} is missing",
                                 path=child.path, offset=F.PREAMBLE_SIZE)
            layer = Layer(path)
            opened.append(layer)
            if layer.index != idx:
                raise ImageError(f"file name says layer {idx} but its header says index "
                                 f"{layer.index}", path=path, offset=F.PREAMBLE_SIZE)
            if opened[0].inventory.page_size != layer.inventory.page_size:
                raise ImageError("page size differs from the rest of the chain",
                                 path=path, offset=F.PREAMBLE_SIZE)
            if child is not None and not _links_to(child, layer):
                if child.inventory.parent_id not in (layer.layer_id, layer.inventory.replaces_id):
                    why = (f"names parent id {child.inventory.parent_id} but {F.layer_name(idx)} "
                           f"has id {layer.layer_id} (a layer from another chain?)")
                else:
                    why = (f"parent header digest differs from {F.layer_name(idx)}'s "
                           f"(parent rewritten or swapped)")
                raise ImageError(why, path=child.path, offset=F.PREAMBLE_SIZE)
            inv = layer.inventory
            if not inv.parent_id:
                if inv.index != 0 and not (inv.squashed and inv.squashed_first == 0):
                    raise ImageError(f"layer {inv.index} has no parent and is not a base "
                                     f"layer", path=path, offset=F.PREAMBLE_SIZE)
                break
            if idx == 0:
                raise ImageError("layer 0 names a parent", path=path, offset=F.PREAMBLE_SIZE)
            child = layer
            idx -= 1
        opened.reverse()
        base = opened[0]
        stale = [p for i, p in sorted(files.items()) if i < base.index]
        if upto is not None:
            if not 1 <= upto <= len(opened):
                raise ImageError(f"chain has {len(opened)} layers; cannot take the first {upto}",
                                 path=images_dir)
            for layer in opened[upto:]:
                layer.close()
            opened = opened[:upto]
        chain = Chain(images_dir, opened, stale, threads=threads)
        if verify_frames == "crc":
            for layer in chain.layers:  # checksums only: reading decompresses anyway
                layer.check_frame_crcs()
        elif verify_frames:
            chain.verify()
        return chain
    except BaseException:
        for layer in opened:
            layer.close()
        raise
