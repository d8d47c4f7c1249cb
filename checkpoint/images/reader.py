"""The chain reader: a source of pages that follows the parent links.

Layers are untrusted input. ``open_chain(DIR)`` opens each layer file
relative to the directory's fd without following links or blocking, accepts
only regular files owned by the caller or root, bounds every length and
count before allocating, and checks every link (ids, header digests, MACs
when signed), every block header checksum and every metadata block checksum
before returning. A frame's checksum and zstd header are checked when the
frame is read, before any byte of it is handed out; ``verify_frames=True``
(or :meth:`Chain.verify`) checks them all up front. With ``sign_key`` every
layer must be signed with that key and its MAC, which covers every byte,
is checked before anything is returned.

Files are not kept open: a layer is closed after its scan and reopened
(through a small LRU of fds) when a frame is read, after checking it is
still the same file (device, inode, size, mtime) that was scanned, so a
chain may be longer than RLIMIT_NOFILE.
"""

from __future__ import annotations

import bisect
import heapq
import hmac as _hmac
import os
import re
import resource
import threading
import zlib
from array import array
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import accumulate, compress, islice, repeat
from operator import add, lt
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import zstandard
from google.protobuf.message import DecodeError

from ..errors import ImageError
from . import format as F
from . import fsutil
from . import signing as S

_LAYER_RE = re.compile(F.LAYER_RE)
_HEX_ID = re.compile(r"[0-9a-f]{32}")
_HEX_KEY_ID = re.compile(r"[0-9a-f]{16}")
MAX_OPEN = 16           # layer fds a chain keeps open at most (besides transient ones)
_CHUNK = 1 << 20


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


def _decompressor() -> zstandard.ZstdDecompressor:
    # no frame of ours needs a window above the largest frame
    return zstandard.ZstdDecompressor(max_window_size=F.MAX_FRAME_RAW)


class _Files:
    """The images directory's fd and an LRU of open layer fds, shared by the
    layers of one chain and safe to use from several threads. An fd in use
    is never closed under its user: eviction only closes idle ones."""

    def __init__(self, images_dir: str, cap: int = MAX_OPEN):
        self.dir = images_dir
        self.dir_fd = fsutil.open_dir(images_dir)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, soft // 4)       # leave most of a low limit to everything else
        self.cap = max(1, cap)
        self._lock = threading.Lock()
        self._idle: OrderedDict = OrderedDict()     # layer -> fd
        self._busy: dict = {}                       # layer -> [fd, users]
        self._dead: set = set()                     # forgotten while busy

    def display(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def open_new(self, name: str) -> tuple[int, os.stat_result]:
        if self.dir_fd < 0:
            raise ImageError("chain is closed", path=self.display(name))
        return fsutil.open_entry(self.dir_fd, name, self.display(name))

    def adopt(self, layer, fd: int) -> None:
        """Keep ``fd`` (of a freshly scanned layer) as an idle entry."""
        with self._lock:
            self._idle[layer] = fd
            self._evict()

    def _evict(self) -> None:
        while self._idle and len(self._idle) + len(self._busy) > self.cap:
            _, fd = self._idle.popitem(last=False)
            os.close(fd)

    @contextmanager
    def use(self, layer):
        fd = None
        with self._lock:
            ent = self._busy.get(layer)
            if ent is not None:
                ent[1] += 1
                fd = ent[0]
            else:
                fd = self._idle.pop(layer, None)
                if fd is not None:
                    self._busy[layer] = [fd, 1]
        if fd is None:
            new = layer._reopen()
            with self._lock:
                ent = self._busy.get(layer)
                if ent is not None:         # another thread reopened it meanwhile
                    ent[1] += 1
                    fd = ent[0]
                    os.close(new)
                else:
                    fd = new
                    self._busy[layer] = [fd, 1]
        try:
            yield fd
        finally:
            with self._lock:
                ent = self._busy[layer]
                ent[1] -= 1
                if ent[1] == 0:
                    del self._busy[layer]
                    if layer in self._dead or self.dir_fd < 0:
                        self._dead.discard(layer)
                        os.close(fd)
                    else:
                        self._idle[layer] = fd
                        self._evict()

    def forget(self, layer) -> None:
        with self._lock:
            fd = self._idle.pop(layer, None)
            if fd is not None:
                os.close(fd)
            elif layer in self._busy:
                self._dead.add(layer)

    def close(self) -> None:
        with self._lock:
            for fd in self._idle.values():
                os.close(fd)
            self._idle.clear()
            self._dead.update(self._busy)
            if self.dir_fd >= 0:
                os.close(self.dir_fd)
                self.dir_fd = -1


#: a layer's entries of one pid up to this many are sorted at once (a list of
#: their indexes, ~80 bytes an entry for a moment); more are merged lazily
_SORT_AT_ONCE = 1 << 18


class Layer:
    """One scanned, validated layer file. Its fd is handed to the chain's fd
    cache after the scan; frame reads reopen it when needed."""

    def __init__(self, path: str, files: _Files | None = None):
        self.path = path
        self.name = os.path.basename(path)
        self._own_files = files is None
        self._files = files if files is not None else _Files(os.path.dirname(path) or ".", cap=1)
        try:
            fd, st = self._files.open_new(self.name)
            try:
                self.size = st.st_size
                self.ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                self._scan(fd)
            except BaseException:
                os.close(fd)
                raise
            self._files.adopt(self, fd)
        except BaseException:
            if self._own_files:
                self._files.close()
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

    @property
    def signed(self) -> bool:
        return bool(self.inventory.mac_alg)

    @property
    def key_id(self) -> str | None:
        return self.inventory.mac_key_id if self.signed else None

    def close(self) -> None:
        self._files.forget(self)
        if self._own_files:
            self._files.close()

    def _err(self, msg: str, offset: int | None) -> ImageError:
        return ImageError(msg, path=self.path, offset=offset)

    def _reopen(self) -> int:
        fd, st = self._files.open_new(self.name)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self.ident:
            os.close(fd)
            raise self._err("changed since the chain was opened (replaced or rewritten); "
                            "refusing to read it", None)
        return fd

    def _pread_fd(self, fd: int, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
        try:
            return os.pread(fd, n, offset)
        except OSError as exc:
            raise self._err(f"read error: {exc.strerror}", offset) from None

    def _pread(self, fd: int, n: int, offset: int) -> bytes:
        try:
            data = os.pread(fd, n, offset)
        except OSError as exc:
            raise self._err(f"read error: {exc.strerror}", offset) from None
        if len(data) != n:
            raise self._err(f"truncated: needs {n} bytes here, file ends at offset "
                            f"{offset + len(data)}", offset)
        return data

    def _parse(self, cls, payload: bytes, what: str, offset: int):
        try:
            return cls.FromString(payload)
        except (DecodeError, ValueError, RuntimeError):
            # the parser's message is not shown: it may quote the bytes
            raise self._err(f"undecodable {what} block (not a valid "
                            f"{cls.DESCRIPTOR.name} message)", offset) from None

    # ------------------------------------------------------------------ scan
    def _scan(self, fd: int) -> None:
        size = self.size
        pre = self._pread_fd(fd, F.PREAMBLE_SIZE, 0)
        if len(pre) < F.PREAMBLE_SIZE:
            raise self._err(f"truncated: {len(pre)} bytes, not even the {F.PREAMBLE_SIZE}-byte "
                            f"preamble (a layer left half-written?)", 0)
        magic, version, flags = F.PREAMBLE.unpack(pre)
        if magic != F.MAGIC:
            raise self._err("not a checkpoint layer (bad magic)", 0)
        if version not in F.READ_VERSIONS:
            raise self._err(f"unsupported layer format version {version} (this engine "
                            f"reads {', '.join(map(str, F.READ_VERSIONS))})", 8)
        if flags != 0:
            raise self._err(f"unknown preamble flags {flags:#x}", 12)
        self.frames: list[Frame] = []
        self._crc_ok: set[int] = set()  # frames whose checksum was already checked
        self._records: list[tuple[str, int, int]] = []   # kind, block offset, length
        self.record_offsets: list[int] = []
        self.pagemap_offsets: list[int] = []
        self.trailer = None
        self.inventory = None
        self.mac = b""
        self._mac_tail = b""            # trailer payload bytes the MAC covers
        self.trailer_offset = -1
        # per pid: starts, ends, frame (-1 zero), byte offset, pagemap offset
        cols: dict[int, tuple[array, array, array, array, array]] = {}
        described = -1           # last frame a pagemap described
        pages = zero = 0
        entries = 0
        seed = 0
        pos = F.PREAMBLE_SIZE
        while True:
            if pos >= size:
                raise self._err("truncated: file ends before the trailer block (a layer left "
                                "half-written?)", pos)
            head = self._pread_fd(fd, F.BLOCK_HEADER_SIZE, pos)
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
                fs = self.inventory.frame_size
                if aux == 0 or aux > fs or aux % self.inventory.page_size:
                    raise self._err(f"frame {len(self.frames)}: raw size (aux) {aux} is not a "
                                    f"multiple of the page size in 1..{fs} (the layer's "
                                    f"frame_size)", pos)
                if length == 0 or length > F.compress_bound(aux) + 64:
                    raise self._err(f"frame {len(self.frames)}: {length} compressed bytes "
                                    f"cannot hold {aux} raw bytes", pos)
                if described != len(self.frames) - 1:
                    raise self._err("frame follows a frame without a pagemap", pos)
                self.frames.append(Frame(pos, length, aux, pcrc))
                pos = end
                continue
            limit = {F.BT_HEADER: F.MAX_HEADER_BLOCK, F.BT_PAGEMAP: F.MAX_PAGEMAP_BLOCK,
                     F.BT_TRAILER: F.trailer_bound(len(self.frames) + len(self.pagemap_offsets)
                                                   + len(self.record_offsets))
                     }.get(btype, F.MAX_METADATA_BLOCK)
            if length > limit:
                raise self._err(f"{name} block: length {length} exceeds the {limit}-byte "
                                f"bound", pos)
            if btype != F.BT_HEADER and btype != F.BT_RECORD and btype != F.BT_PAGEMAP \
                    and btype != F.BT_TRAILER:
                if btype not in F.OPTIONAL_TYPES:
                    raise self._err(f"unknown block type {btype}", pos)
                # an optional block we do not know: checksummed, never held whole
                crc = 0
                for off in range(0, length, _CHUNK):
                    crc = zlib.crc32(self._pread(fd, min(_CHUNK, length - off),
                                                 pos + F.BLOCK_HEADER_SIZE + off), crc)
                if crc != pcrc:
                    raise self._err(f"checksum mismatch in {name} block", pos)
                pos = end
                continue
            payload = self._pread(fd, length, pos + F.BLOCK_HEADER_SIZE)
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
                self._records.append((rec.kind, pos, length))
                self.record_offsets.append(pos)
            elif btype == F.BT_PAGEMAP:
                pm = self._parse(F.PagemapBlock, payload, name, pos)
                del payload
                p, z, n = self._add_pagemap(pm, cols, pos)
                entries += n
                if entries > F.MAX_LAYER_ENTRIES:
                    raise self._err(f"pagemap block: the layer has more than "
                                    f"{F.MAX_LAYER_ENTRIES} pagemap entries", pos)
                pages += p
                zero += z
                if pm.HasField("frame"):
                    described = pm.frame
                self.pagemap_offsets.append(pos)
            else:   # trailer
                tr = self._parse(F.Trailer, payload, name, pos)
                if end != size:
                    raise self._err(f"{size - end} unexpected bytes after the trailer", end)
                if described != len(self.frames) - 1:
                    raise self._err("the last frame has no pagemap", pos)
                self._check_trailer(tr, pages, zero, pos)
                self._check_trailer_mac(tr, payload, pos)
                self.trailer = tr
                self.trailer_offset = pos
                break
            pos = end
        self.pages, self.pages_zero = pages, zero
        self._index_runs(cols)

    def _index_runs(self, cols) -> None:
        """Per pid: address-sorted, non-overlapping columns for bisect."""
        self.runs: dict[int, tuple[array, array, array, array]] = {}
        for pid, (starts, ends, fnos, offs, pms) in cols.items():
            n = len(starts)
            if n <= _SORT_AT_ONCE and any(map(lt, islice(starts, 1, None), starts)):
                # The writer's entries come as a few ascending sequences (data
                # and zero entries of each pagemap): timsort merges those, in C
                order = sorted(range(n), key=starts.__getitem__)
                starts, ends, fnos, offs, pms = (array(c.typecode, map(c.__getitem__, order))
                                                 for c in (starts, ends, fnos, offs, pms))
                del order
            breaks = [i for i in range(1, n) if starts[i] < starts[i - 1]] \
                if n > _SORT_AT_ONCE else ()
            if breaks:
                # a larger layer: merged lazily (no list of every entry); only
                # a file in no order at all pays for a full sort
                if len(breaks) < 64:
                    bounds = [0] + breaks + [n]
                    order = heapq.merge(*(range(a, b) for a, b in zip(bounds, bounds[1:])),
                                        key=starts.__getitem__)
                else:
                    order = sorted(range(n), key=starts.__getitem__)
                ns, ne, nf, no, npm = (array("Q"), array("Q"), array("i"), array("i"),
                                       array("I"))
                for i in order:
                    ns.append(starts[i])
                    ne.append(ends[i])
                    nf.append(fnos[i])
                    no.append(offs[i])
                    npm.append(pms[i])
                del order
                starts, ends, fnos, offs, pms = ns, ne, nf, no, npm
            if any(map(lt, islice(starts, 1, None), ends)):
                i = next(i for i in range(1, n) if starts[i] < ends[i - 1])
                raise self._err(f"pagemap block: pid {pid}: page {starts[i]:#x} appears "
                                f"twice in this layer", self.pagemap_offsets[pms[i]])
            self.runs[pid] = (starts, ends, fnos, offs)

    def _check_inventory(self, inv, pos: int) -> None:
        if not _HEX_ID.fullmatch(inv.layer_id):
            raise self._err("header block: layer_id is not 32 lower-case hex digits", pos)
        if inv.kind not in F.KINDS:
            raise self._err(f"header block: kind is not one of {', '.join(F.KINDS)}", pos)
        if inv.page_size not in (4096, 16384, 65536):
            raise self._err(f"header block: page_size {inv.page_size} is not 4096, 16384 "
                            f"or 65536", pos)
        if not (F.MIN_FRAME_SIZE <= inv.frame_size <= F.MAX_FRAME_SIZE
                and inv.frame_size % inv.page_size == 0):
            raise self._err(f"header block: frame_size {inv.frame_size} is not a multiple of "
                            f"the page size in [{F.MIN_FRAME_SIZE}, {F.MAX_FRAME_SIZE}]", pos)
        if inv.compression != "zstd":
            raise self._err("header block: compression is not zstd", pos)
        if inv.parent_id and not _HEX_ID.fullmatch(inv.parent_id):
            raise self._err("header block: parent_id is not 32 lower-case hex digits", pos)
        if inv.mac_alg:
            if inv.mac_alg != S.MAC_ALG:
                raise self._err(f"header block: mac_alg is not {S.MAC_ALG} (signed by a "
                                f"newer engine?)", pos)
            if not _HEX_KEY_ID.fullmatch(inv.mac_key_id):
                raise self._err("header block: mac_key_id is not 16 lower-case hex digits", pos)
            if inv.parent_id and len(inv.parent_mac) != S.MAC_LEN:
                raise self._err(f"header block: a signed layer with a parent needs a "
                                f"{S.MAC_LEN}-byte parent_mac", pos)
        elif inv.mac_key_id:
            raise self._err("header block: mac_key_id set on an unsigned layer", pos)
        for field in ("parent_mac", "replaces_mac"):
            v = getattr(inv, field)
            if v and len(v) != S.MAC_LEN:
                raise self._err(f"header block: {field} is not {S.MAC_LEN} bytes", pos)

    def _add_pagemap(self, pm, cols, pos: int) -> tuple[int, int, int]:
        n = len(pm.pid)
        if not (len(pm.vaddr) == len(pm.npages) == len(pm.flags) == n):
            raise self._err("pagemap block: columns pid/vaddr/npages/flags of different "
                            "lengths", pos)
        if n > F.MAX_PAGEMAP_ENTRIES:
            raise self._err(f"pagemap block: {n} entries (at most {F.MAX_PAGEMAP_ENTRIES})", pos)
        has_frame = pm.HasField("frame")
        if has_frame and pm.frame != len(self.frames) - 1:
            raise self._err(f"pagemap block: frame {pm.frame}, but it follows frame "
                            f"{len(self.frames) - 1}", pos)
        ps = self.inventory.page_size
        limit = F.USER_ADDR_LIMIT
        fno = pm.frame if has_frame else -1
        pm_index = len(self.pagemap_offsets)    # this block's, once appended
        got = self._add_pagemap_fast(pm, cols, fno, pm_index)
        if got is not None:
            return got
        off = 0
        pages = zero = 0
        for i, (pid, addr, npages, flags) in enumerate(zip(pm.pid, pm.vaddr, pm.npages,
                                                           pm.flags)):
            if not 0 < pid <= F.MAX_PID:
                raise self._err(f"pagemap block: entry {i}: pid {pid} out of range "
                                f"1..{F.MAX_PID}", pos)
            if addr % ps or npages == 0 or addr >= limit or npages > (limit - addr) // ps:
                raise self._err(f"pagemap block: entry {i} (pid {pid}): vaddr {addr:#x}, "
                                f"npages {npages}: not {ps}-aligned pages inside the user "
                                f"address space (below {limit:#x})", pos)
            end = addr + npages * ps
            c = cols.get(pid)
            if c is None:
                if len(cols) >= F.MAX_LAYER_PIDS:
                    raise self._err(f"pagemap block: entry {i}: more than {F.MAX_LAYER_PIDS} "
                                    f"pids in one layer", pos)
                # start, end, frame (-1 zero), byte offset in the frame (< 1 MiB), pagemap
                c = cols[pid] = (array("Q"), array("Q"), array("i"), array("i"), array("I"))
            if flags == F.PE_DATA:
                if not has_frame:
                    raise self._err(f"pagemap block: entry {i}: data entry in a pagemap "
                                    f"without a frame", pos)
                c[2].append(fno)
                c[3].append(off)
                off += npages * ps
                pages += npages
                if off > self.frames[fno].raw:
                    raise self._err(f"pagemap block: entries describe more than the "
                                    f"{self.frames[fno].raw} bytes of frame {fno}", pos)
            elif flags == F.PE_ZERO:
                c[2].append(-1)
                c[3].append(-1)
                zero += npages
            else:
                raise self._err(f"pagemap block: entry {i}: unknown flags {flags}", pos)
            c[0].append(addr)
            c[1].append(end)
            c[4].append(pm_index)
        if has_frame and off != self.frames[fno].raw:
            raise self._err(f"pagemap block: entries describe {off} bytes but frame {fno} "
                            f"holds {self.frames[fno].raw}", pos)
        return pages, zero, n

    def _add_pagemap_fast(self, pm, cols, fno: int, pm_index: int):
        """:meth:`_add_pagemap` of a block of one pid that passes every check
        (the writer's: one pid a block in a single-process dump), by columns
        in C-speed passes instead of a Python step an entry: (pages, zero
        pages, entries), or None (more pids, or some check fails: the
        entry-by-entry walk then names the entry)."""
        pids = list(pm.pid)
        n = len(pids)
        if not n:
            return None
        pid = pids[0]
        if pids.count(pid) != n or not 0 < pid <= F.MAX_PID or (
                pid not in cols and len(cols) >= F.MAX_LAYER_PIDS):
            return None
        ps = self.inventory.page_size
        vaddr, npages, flags = list(pm.vaddr), list(pm.npages), list(pm.flags)
        if 0 in npages or any(map(ps.__rmod__, vaddr)):
            return None
        sizes = list(map(ps.__mul__, npages))
        ends = list(map(add, vaddr, sizes))
        if max(ends) > F.USER_ADDR_LIMIT:     # (vaddr below it too: npages > 0)
            return None
        data = [f == F.PE_DATA for f in flags]
        ndata = data.count(True)
        if ndata + flags.count(F.PE_ZERO) != n or (ndata and fno < 0):
            return None
        used = sum(compress(sizes, data))
        if fno >= 0 and used != self.frames[fno].raw:
            return None
        c = cols.get(pid)
        if c is None:
            c = cols[pid] = (array("Q"), array("Q"), array("i"), array("i"), array("I"))
        offs = iter(accumulate(compress(sizes, data), initial=0))
        c[0].extend(vaddr)
        c[1].extend(ends)
        c[2].extend([fno if d else -1 for d in data])
        c[3].extend([next(offs) if d else -1 for d in data])
        c[4].extend(repeat(pm_index, n))
        pages = used // ps
        return pages, sum(npages) - pages, n

    def _check_trailer(self, tr, pages: int, zero: int, pos: int) -> None:
        def bad(what):
            return self._err(f"trailer block: disagrees with the blocks: {what}", pos)
        if list(tr.frame_offsets) != [f.offset for f in self.frames] or tr.frames != len(self.frames):
            raise bad("frame index")
        if list(tr.pagemap_offsets) != self.pagemap_offsets or tr.pagemaps != len(self.pagemap_offsets):
            raise bad("pagemap index")
        if list(tr.record_offsets) != self.record_offsets or tr.records != len(self._records):
            raise bad("record index")
        if tr.header_digest != self.header_digest:
            raise bad("header digest")
        if tr.stats.pages_written != pages or tr.pages_zero != zero:
            raise bad(f"page counts ({tr.stats.pages_written}/{tr.pages_zero} vs {pages}/{zero})")
        if tr.stats.bytes_stored != sum(f.stored for f in self.frames):
            raise bad("stored bytes")

    def _check_trailer_mac(self, tr, payload: bytes, pos: int) -> None:
        if not self.inventory.mac_alg:
            if tr.mac:
                raise self._err("trailer block: a MAC in an unsigned layer", pos)
            return
        tail = payload[-S.MAC_SUFFIX_LEN:]
        if (len(payload) < S.MAC_SUFFIX_LEN or tail[:len(S.MAC_FIELD_PREFIX)] != S.MAC_FIELD_PREFIX
                or tr.mac != tail[len(S.MAC_FIELD_PREFIX):]):
            raise self._err("trailer block: the layer is signed but its trailer does not end "
                            "with its MAC", pos)
        self.mac = bytes(tr.mac)
        self._mac_tail = payload[:-S.MAC_SUFFIX_LEN]

    # ----------------------------------------------------------- signature
    def check_mac(self, key: bytes, kid: str | None = None) -> int:
        """Check this layer's MAC with ``key``: one sequential read of every
        byte, which also checks every frame's CRC. Returns bytes read."""
        kid = kid or S.key_id(key)
        if not self.signed:
            raise self._err("not signed, and a signing key was given: every layer must be "
                            "signed with it", F.PREAMBLE_SIZE)
        if self.key_id != kid:
            raise self._err(f"signed with key {self.key_id}, not with the key given "
                            f"({kid})", F.PREAMBLE_SIZE)
        h = S.new_mac(key)
        pos = 0
        with self._files.use(self) as fd:
            for fno, fr in enumerate(self.frames):
                while pos < fr.offset:
                    n = min(_CHUNK, fr.offset - pos)
                    h.update(self._pread(fd, n, pos))
                    pos += n
                block = self._pread(fd, F.BLOCK_HEADER_SIZE + fr.stored, fr.offset)
                h.update(block)
                if fno not in self._crc_ok:
                    if zlib.crc32(memoryview(block)[F.BLOCK_HEADER_SIZE:]) != fr.crc:
                        raise self._err(f"frame {fno}: checksum mismatch", fr.offset)
                pos = fr.offset + len(block)
            while pos < self.trailer_offset:
                n = min(_CHUNK, self.trailer_offset - pos)
                h.update(self._pread(fd, n, pos))
                pos += n
        h.update(self._mac_tail)
        if not _hmac.compare_digest(h.digest(), self.mac):
            raise self._err("MAC mismatch: the layer was modified after it was signed, or "
                            "was not signed with this key", self.trailer_offset)
        self._crc_ok.update(range(len(self.frames)))
        return pos

    # ----------------------------------------------------------- page access
    def lookup(self, pid: int, addr: int) -> tuple[int, int] | None:
        """(frame, byte offset) of the page at ``addr``; frame -1 = zero page;
        None if this layer does not hold it."""
        r = self.runs.get(pid)
        if r is None:
            return None
        starts, ends, fnos, offs = r
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0 or addr >= ends[i]:
            return None
        if fnos[i] < 0:
            return -1, 0
        return fnos[i], offs[i] + (addr - starts[i])

    def _frame_payload(self, fno: int) -> bytes:
        fr = self.frames[fno]
        with self._files.use(self) as fd:
            try:
                payload = os.pread(fd, fr.stored, fr.offset + F.BLOCK_HEADER_SIZE)
            except OSError as exc:
                raise self._err(f"frame {fno}: read error: {exc.strerror}", fr.offset) from None
        if len(payload) != fr.stored:
            raise self._err(f"frame {fno}: truncated (file changed since it was opened?)",
                            fr.offset)
        if fno not in self._crc_ok:
            if zlib.crc32(payload) != fr.crc:
                raise self._err(f"frame {fno}: checksum mismatch", fr.offset)
            self._crc_ok.add(fno)
        return payload

    def read_frame(self, fno: int, dctx=None) -> bytes:
        """Read, check and decompress frame ``fno``. The zstd frame header's
        declared content size must equal the block's raw size before
        anything is decompressed (zstandard allocates what a frame declares)."""
        fr = self.frames[fno]
        payload = self._frame_payload(fno)
        try:
            params = zstandard.get_frame_parameters(payload)
        except zstandard.ZstdError:
            raise self._err(f"frame {fno}: no valid zstd frame header", fr.offset) from None
        if params.content_size != fr.raw:
            declared = ("no content size" if params.content_size >= 1 << 63
                        else f"content size {params.content_size}")
            raise self._err(f"frame {fno}: the zstd frame declares {declared}, the block's "
                            f"raw size (aux) is {fr.raw}", fr.offset)
        if params.dict_id:
            raise self._err(f"frame {fno}: the zstd frame needs a dictionary", fr.offset)
        dctx = dctx or _decompressor()
        try:
            data = dctx.decompress(payload, max_output_size=fr.raw)
        except zstandard.ZstdError as exc:
            raise self._err(f"frame {fno}: does not decompress ({exc})", fr.offset) from None
        if len(data) != fr.raw:
            raise self._err(f"frame {fno}: decompresses to {len(data)} bytes, expected {fr.raw}",
                            fr.offset)
        return data

    def check_frame_crcs(self) -> int:
        """Checksum every frame without decompressing; returns bytes read."""
        n = 0
        for fno in range(len(self.frames)):
            if fno not in self._crc_ok:
                n += len(self._frame_payload(fno))
        return n

    # -------------------------------------------------------------- records
    @property
    def records(self) -> list[tuple[str, bytes]]:
        """(kind, payload) of every RECORD block, read again from the file
        (they are not kept in memory between uses)."""
        out = []
        with self._files.use(self) as fd:
            for kind, pos, length in self._records:
                payload = self._pread(fd, length, pos + F.BLOCK_HEADER_SIZE)
                head = self._pread(fd, F.BLOCK_HEADER_SIZE, pos)
                if zlib.crc32(payload) != F.BLOCK.unpack(head)[3]:
                    raise self._err("record block: checksum mismatch (file changed since it "
                                    "was opened?)", pos)
                rec = self._parse(F.Record, payload, "record", pos)
                out.append((rec.kind, rec.payload))
        return out

    def record_kinds(self) -> list[str]:
        return [k for k, _, _ in self._records]

    def decoded_records(self, kind: str | None = None) -> list[tuple[str, object]]:
        out = []
        if kind is not None and kind not in self.record_kinds():
            return out
        for (k, payload), off in zip(self.records, self.record_offsets):
            if kind is not None and k != kind:
                continue
            cls = F.RECORD_TYPES.get(k)
            out.append((k, self._parse(cls, payload, f"{k} record", off) if cls else payload))
        return out


# --------------------------------------------------------------------- chain

def _list(images_dir: str, dir_fd: int) -> list[str]:
    return fsutil.list_names(dir_fd, images_dir)


def list_layers(images_dir: str) -> dict[int, str]:
    """{index: path} of the entries named like published layers
    (``layer-NNNN.img``, canonical names only) in ``images_dir``. Whether
    they are acceptable files is checked when they are opened."""
    images_dir = os.fspath(images_dir)
    fd = fsutil.open_dir(images_dir)
    try:
        names = _list(images_dir, fd)
    finally:
        os.close(fd)
    out = {}
    for name in names:
        m = _LAYER_RE.match(name)
        if m and F.layer_name(int(m.group(1))) == name:
            out[int(m.group(1))] = os.path.join(images_dir, name)
    return out


def _is_temp_name(n: str) -> bool:
    return n.startswith(F.TEMP_PREFIX) and ".tmp-" in n


def leftover_temps(images_dir: str) -> list[str]:
    """Temp files of writers (never part of a chain), live or dead."""
    images_dir = os.fspath(images_dir)
    fd = fsutil.open_dir(images_dir)
    try:
        names = _list(images_dir, fd)
    finally:
        os.close(fd)
    return sorted(os.path.join(images_dir, n) for n in names if _is_temp_name(n))


def temp_report(images_dir: str) -> list[tuple[str, str]]:
    """(name, state) of every writer temp file: state is 'live' (a writer
    holds it), 'dead' (its writer is gone: the next writer removes it) or
    'odd: WHY'. Looks under the directory's exclusive lock when it can get
    it, so a writer between creating and locking its file is not seen."""
    images_dir = os.fspath(images_dir)
    fd = fsutil.open_dir(images_dir)
    try:
        names = [n for n in _list(images_dir, fd) if _is_temp_name(n)]
        if not names:
            return []
        locked = False
        try:
            fsutil.lock_dir_exclusive(fd, images_dir)
            locked = True
        except ImageError:
            pass
        try:
            return [(n, fsutil.temp_state(fd, n) if fsutil.TEMP_RE.match(n)
                     else "odd: not a temp name of this engine") for n in sorted(names)]
        finally:
            if locked:
                fsutil.unlock(fd)
    finally:
        os.close(fd)


def _links_to(child: Layer, parent: Layer) -> bool:
    pid, pdig, pmac = (child.inventory.parent_id, child.inventory.parent_digest,
                       child.inventory.parent_mac)
    inv = parent.inventory
    return ((pid == inv.layer_id and pdig == parent.header_digest
             and (not pmac or pmac == parent.mac))
            or (inv.squashed and pid == inv.replaces_id and pdig == inv.replaces_digest
                and (not pmac or pmac == inv.replaces_mac)))


class Chain:
    """Layers base first; answers page queries from the newest holder."""

    def __init__(self, images_dir: str, layers: list[Layer], stale: list[str],
                 threads: int = 1, cache_frames: int = 8, files: _Files | None = None,
                 key_id: str | None = None):
        self.dir = images_dir
        self.layers = layers
        self.stale = stale          # layer files superseded by a squash, not yet removed
        self.threads = max(1, threads)
        self.key_id = key_id        # the key every layer's MAC was checked with, or None
        self._cache: OrderedDict = OrderedDict()
        self._cache_frames = cache_frames
        self._local = threading.local()
        self._files = files
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
        if self._files is not None:
            self._files.close()
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
            d = self._local.dctx = _decompressor()
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

    def segments(self, pid: int) -> Iterator[tuple[int, int, int, int, int]]:
        """Address-ordered segments (start, end, layer, frame | -1, byte offset)
        of ``pid``, each page from the newest layer holding it; neighbours
        from one source come as one (a zero run split in uint32-sized
        entries, a run cut by a frame boundary). Lazy: memory is a few
        arrays of the covered intervals and of each layer's visible part,
        about 40 bytes a segment, never a Python object per segment."""
        parts = []                  # (layer, starts, ends, frames, offsets) visible parts
        cov_s = cov_e = None        # what newer layers cover, once an older one needs it
        newest = None
        for li in range(len(self.layers) - 1, -1, -1):
            r = self.layers[li].runs.get(pid)
            if not r:
                continue
            starts, ends, fnos, offs = r
            if newest is None:      # the newest holder: all of it is visible
                parts.append((li, starts, ends, fnos, offs))
                newest = (starts, ends)
                continue
            if cov_s is None:
                cov_s, cov_e = _coalesce(*newest)
            vs, ve, vf, vo = array("Q"), array("Q"), array("i"), array("i")
            j = 0
            ncov = len(cov_s)
            for s, e, fno, off in zip(starts, ends, fnos, offs):
                cur = s
                while j < ncov and cov_e[j] <= cur:
                    j += 1
                k = j
                while cur < e:
                    if k < ncov and cov_s[k] < e:
                        cs = cov_s[k]
                        if cs > cur:
                            vs.append(cur)
                            ve.append(cs)
                            vf.append(fno)
                            vo.append(off + (cur - s) if fno >= 0 else -1)
                        cur = max(cur, cov_e[k])
                        k += 1
                    else:
                        vs.append(cur)
                        ve.append(e)
                        vf.append(fno)
                        vo.append(off + (cur - s) if fno >= 0 else -1)
                        cur = e
            if vs:
                parts.append((li, vs, ve, vf, vo))
            cov_s, cov_e = _merge_intervals(cov_s, cov_e, starts, ends)
        del cov_s, cov_e, newest

        def walk(part):
            li, ss, es, fs, os_ = part
            for s, e, fno, off in zip(ss, es, fs, os_):
                yield s, e, li, fno, (off if fno >= 0 else 0)

        if len(parts) == 1:
            merged = walk(parts[0])
        else:
            merged = heapq.merge(*(walk(p) for p in parts), key=_first)
        prev = None
        for seg in merged:
            if prev is not None:
                ps_, pe, pli, pfno, poff = prev
                s, e, li, fno, off = seg
                if s == pe and li == pli and fno == pfno and (
                        fno < 0 or off == poff + (pe - ps_)):
                    prev = (ps_, e, li, fno, poff)
                    continue
                yield prev
            prev = seg
        if prev is not None:
            yield prev

    def resolve(self, pid: int) -> list[tuple[int, int, int, int, int]]:
        """:meth:`segments` as a list."""
        return list(self.segments(pid))

    def data_pages(self, pid: int, within=None) -> int:
        """How many data pages (not zero) :meth:`iter_runs` yields for ``pid``
        (a progress bar's total): one walk of the segments, no frame read."""
        segs = self.segments(pid)
        if within is not None:
            segs = _clip(segs, _spans(within, self.page_size))
        return sum(e - s for s, e, _, fno, _ in segs if fno >= 0) // self.page_size

    def iter_runs(self, pid: int, *, zero_data: bool = True, max_run: int = 1 << 20,
                  within=None) -> Iterator[PageRun]:
        """All pages of ``pid`` in address order: data runs of at most
        ``max_run`` bytes; zero runs likewise with ``zero_data``, and whole
        (however long, at no cost) without it. Each frame is read and
        decompressed once (ahead, on ``threads`` workers) and dropped after
        its last run is yielded.

        ``within``: an iterable of page-aligned (start, end) address ranges;
        only the pages inside them are yielded, and frames holding none are
        never read. The cost is linear in the segments and ranges, not in the
        pages covered."""
        ps = self.page_size
        if max_run < ps or max_run % ps:
            raise ValueError(f"max_run must be a positive multiple of {ps}")
        zeros = memoryview(bytes(max_run)) if zero_data else None
        for s, size, buf, off in self._pieces(pid, within, True):
            e = s + size
            if buf is None:
                if zeros is None:
                    yield PageRun(s, size // ps, None, True)
                    continue
                a = s
                while a < e:
                    n = min(e - a, max_run)
                    yield PageRun(a, n // ps, zeros[:n], True)
                    a += n
                continue
            a = s
            while a < e:
                n = min(e - a, max_run)
                o = off + (a - s)
                yield PageRun(a, n // ps, buf[o:o + n], False)
                a += n

    def iter_data(self, pid: int, *, within=None) -> Iterator[tuple[int, int, memoryview, int]]:
        """The data pages of ``pid`` (zero pages left out) in address order,
        as (address, bytes, frame, offset): ``frame`` a memoryview of the
        whole decompressed frame (one object for all of its pieces), the
        pages at ``frame[offset:offset + bytes]``. :meth:`iter_runs` without
        a Python object a run, and pieces not joined (a run cut by a frame
        boundary, entries side by side in one frame, come as they are in
        the layer): for a writer that joins and batches many pieces of one
        frame into one call (pagewrite.py). ``within`` as there."""
        return self._pieces(pid, within, False)

    def _pieces(self, pid: int, within, zeros: bool):
        """(address, bytes, frame memoryview or None for zero pages, offset)
        in address order, zero pieces only with ``zeros``; each frame read
        once, ahead on the workers, and dropped after its last piece."""
        holders = [li for li, layer in enumerate(self.layers) if layer.runs.get(pid)]
        if not zeros and len(holders) == 1:
            # the pid's pages in one layer: its columns as they are, no Python
            # step a segment to join neighbours (the caller's writes join them)
            li = holders[0]
            starts, ends, fnos, offs = self.layers[li].runs[pid]
            segs = zip(starts, ends, repeat(li), fnos, offs)
        else:
            segs = self.segments(pid)
        spans = _spans(within, self.page_size) if within is not None else None
        # one pass to clip to the spans (two pointers, linear in both) and
        # count each frame's uses (kept as arrays), one to yield
        cs, cn, cl, cf, co = array("Q"), array("Q"), array("i"), array("i"), array("i")
        uses: dict[tuple[int, int], int] = {}
        order = []
        j, nsp = 0, len(spans) if spans is not None else 0
        for s, e, li, fno, off in segs:
            if fno < 0:
                if not zeros:
                    continue
                off = 0
            if spans is None:
                cs.append(s)
                cn.append(e - s)
                cl.append(li)
                cf.append(fno)
                co.append(off)
                hits = 1
            else:
                while j < nsp and spans[j][1] <= s:
                    j += 1
                k = j
                while k < nsp and spans[k][0] < e:
                    a, b = spans[k]
                    a = a if a > s else s
                    b = b if b < e else e
                    cs.append(a)
                    cn.append(b - a)
                    cl.append(li)
                    cf.append(fno)
                    co.append(off + (a - s) if fno >= 0 else 0)
                    k += 1
                hits = k - j
            if fno >= 0 and hits:
                key = (li, fno)
                if key not in uses:
                    order.append(key)
                    uses[key] = 0
                uses[key] += hits
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zstd-r") \
            if self.threads > 1 and len(order) > 1 else None
        pending: dict[tuple[int, int], object] = {}
        loaded: dict[tuple[int, int], memoryview] = {}
        nxt = 0
        window = 2 * self.threads

        def load(key):
            return self.layers[key[0]].read_frame(key[1], self._dctx())

        try:
            for s, n, li, fno, off in zip(cs, cn, cl, cf, co):
                if fno < 0:
                    yield s, n, None, 0
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
                yield s, n, loaded[key], off
                uses[key] -= 1
                if uses[key] == 0:
                    del loaded[key]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def verify(self) -> dict:
        """Read, checksum and decompress every frame of every layer, and
        decode every record."""
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
        return {"layers": len(self.layers), "frames": frames, "bytes_raw": raw,
                "signed_with": self.key_id}


def _first(seg):
    return seg[0]


def _coalesce(starts, ends) -> tuple[array, array]:
    """Sorted, disjoint intervals with touching ones joined."""
    os_, oe = array("Q"), array("Q")
    for s, e in zip(starts, ends):
        if oe and s <= oe[-1]:
            if e > oe[-1]:
                oe[-1] = e
        else:
            os_.append(s)
            oe.append(e)
    return os_, oe


def _merge_intervals(as_, ae, bs, be) -> tuple[array, array]:
    """Union of two sorted interval lists, coalesced (linear)."""
    os_, oe = array("Q"), array("Q")
    i = j = 0
    na, nb = len(as_), len(bs)
    while i < na or j < nb:
        if j >= nb or (i < na and as_[i] <= bs[j]):
            s, e = as_[i], ae[i]
            i += 1
        else:
            s, e = bs[j], be[j]
            j += 1
        if oe and s <= oe[-1]:
            if e > oe[-1]:
                oe[-1] = e
        else:
            os_.append(s)
            oe.append(e)
    return os_, oe


def _spans(within, ps: int) -> list[tuple[int, int]]:
    spans = []
    for s, e in within:
        if s % ps or e % ps:
            raise ValueError(f"range {s:#x}-{e:#x} is not {ps}-aligned")
        if e > s:
            spans.append((s, e))
    spans.sort()
    ms, me = _coalesce([s for s, _ in spans], [e for _, e in spans])
    return list(zip(ms, me))


def _clip(segs, spans):
    """The parts of ``segs`` (sorted, disjoint) inside ``spans`` (sorted,
    disjoint): two pointers, linear in both, lazy."""
    j = 0
    ns = len(spans)
    for s, e, li, fno, off in segs:
        while j < ns and spans[j][1] <= s:
            j += 1
        k = j
        while k < ns and spans[k][0] < e:
            a, b = max(s, spans[k][0]), min(e, spans[k][1])
            yield a, b, li, fno, off + (a - s) if fno >= 0 else 0
            k += 1


def _check_mac_all(layers: list[Layer], key: bytes, threads: int) -> None:
    kid = S.key_id(key)
    if threads > 1 and len(layers) > 1:
        with ThreadPoolExecutor(min(threads, len(layers)), thread_name_prefix="mac") as pool:
            for _ in pool.map(lambda layer: layer.check_mac(key, kid), layers):
                pass
    else:
        for layer in layers:
            layer.check_mac(key, kid)


def open_chain(images_dir: str | os.PathLike, *, upto: int | None = None,
               verify_frames: bool | str = False, threads: int = 1,
               sign_key: bytes | None = None, max_open: int = MAX_OPEN) -> Chain:
    """Open and validate the chain in ``images_dir``. ``upto``: keep only the
    first ``upto`` layers (base first). ``verify_frames``: True decompresses
    every frame now, "crc" checks every frame's checksum now. ``sign_key``:
    every kept layer must be signed with this key, and its MAC (over every
    byte, frames included; the pass checks every frame's CRC too) must
    verify before this returns. Raises ImageError on any problem."""
    images_dir = os.fspath(images_dir)
    if sign_key is not None:
        sign_key = S.check_key(sign_key)
    files = _Files(images_dir, cap=max_open)
    opened: list[Layer] = []
    try:
        names = {}
        for name in _list(images_dir, files.dir_fd):
            m = _LAYER_RE.match(name)
            if m and F.layer_name(int(m.group(1))) == name:
                names[int(m.group(1))] = name
        if not names:
            raise ImageError("no layers (layer-NNNN.img) in the images directory",
                             path=images_dir)
        idx = max(names)
        child = None
        while True:
            name = names.get(idx)
            if name is None:
                raise ImageError(f"names parent layer {idx} (id {child.inventory.parent_id}) "
                                 f"but {F.layer_name(idx)} is missing",
                                 path=child.path, offset=F.PREAMBLE_SIZE)
            path = os.path.join(images_dir, name)
            layer = Layer(path, files)
            opened.append(layer)
            if layer.index != idx:
                raise ImageError(f"file name says layer {idx} but its header says index "
                                 f"{layer.index}", path=path, offset=F.PREAMBLE_SIZE)
            if opened[0].inventory.page_size != layer.inventory.page_size:
                raise ImageError("page size differs from the rest of the chain",
                                 path=path, offset=F.PREAMBLE_SIZE)
            if child is not None and not _links_to(child, layer):
                cinv = child.inventory
                if cinv.parent_id not in (layer.layer_id, layer.inventory.replaces_id):
                    why = (f"names parent id {cinv.parent_id} but {F.layer_name(idx)} "
                           f"has id {layer.layer_id} (a layer from another chain?)")
                elif cinv.parent_digest not in (layer.header_digest,
                                                layer.inventory.replaces_digest):
                    why = (f"parent header digest differs from {F.layer_name(idx)}'s "
                           f"(parent rewritten or swapped)")
                else:
                    why = (f"parent MAC differs from {F.layer_name(idx)}'s (parent re-signed, "
                           f"replaced or swapped)")
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
        stale = [os.path.join(images_dir, n) for i, n in sorted(names.items())
                 if i < base.index]
        if upto is not None:
            if not 1 <= upto <= len(opened):
                raise ImageError(f"chain has {len(opened)} layers; cannot take the first {upto}",
                                 path=images_dir)
            for layer in opened[upto:]:
                layer.close()
            opened = opened[:upto]
        if sign_key is not None:
            _check_mac_all(opened, sign_key, max(1, threads))
        chain = Chain(images_dir, opened, stale, threads=threads, files=files,
                      key_id=S.key_id(sign_key) if sign_key is not None else None)
        if verify_frames == "crc":
            for layer in chain.layers:  # checksums only: reading decompresses anyway
                layer.check_frame_crcs()
        elif verify_frames:
            chain.verify()
        return chain
    except BaseException:
        for layer in opened:
            layer.close()
        files.close()
        raise
