"""Byte layout of a layer file (docs/image-format.md is the reference).

A layer file is a 16-byte preamble followed by blocks::

    preamble  MAGIC (8) | u32 version | u32 flags(0)
    block     u32 type | u32 length | u64 aux | u32 payload_crc | u32 header_crc
              | payload (length bytes)

All integers are little-endian. ``payload_crc`` is zlib's CRC-32 of the
payload; ``header_crc`` is CRC-32 of the first 20 header bytes followed by the
block's file offset as u64, seeded with CRC-32 of the layer id (seed 0 for the
header block, which comes first and carries the id). A block therefore cannot
be moved inside a file or into another layer unnoticed.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

from .pb import core_pb2, files_pb2, inventory_pb2, mm_pb2, pagemap_pb2, pstree_pb2
from .pb import process_pb2, signals_pb2, stats_pb2, tracking_pb2

MAGIC = b"CKPTLAYR"
FORMAT_VERSION = 2    # 2: process trees (several processes in a layer)
READ_VERSIONS = (1, 2)
PREAMBLE = struct.Struct("<8sII")          # magic, version, flags
BLOCK = struct.Struct("<IIQII")            # type, length, aux, payload_crc, header_crc
PREAMBLE_SIZE = PREAMBLE.size              # 16
BLOCK_HEADER_SIZE = BLOCK.size             # 24

BT_HEADER = 1    # Inventory
BT_RECORD = 2    # Record
BT_FRAME = 3     # one zstd frame of page data; aux = raw (decompressed) length
BT_PAGEMAP = 4   # PagemapBlock
BT_TRAILER = 5   # Trailer; the last block of the file
OPTIONAL_TYPES = range(256, 512)   # readers skip unknown blocks of these types
BLOCK_NAMES = {BT_HEADER: "header", BT_RECORD: "record", BT_FRAME: "frame",
               BT_PAGEMAP: "pagemap", BT_TRAILER: "trailer"}

PE_DATA = 0
PE_ZERO = 1

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_FRAME_SIZE = 1 << 20
MIN_FRAME_SIZE = 64 << 10
MAX_FRAME_SIZE = 1 << 20
# Bounds a reader applies to what a layer says before it allocates anything.
MAX_METADATA_BLOCK = 256 << 20    # a RECORD (tracker state, file contents) or optional block
MAX_HEADER_BLOCK = 64 << 10       # the Inventory
MAX_PAGEMAP_BLOCK = 4 << 20       # one PagemapBlock payload
MAX_PAGEMAP_ENTRIES = 1 << 17     # entries of one PagemapBlock (the writer: < 65536 + 256)
MAX_LAYER_ENTRIES = 1 << 22       # pagemap entries of one layer (~60 bytes each in memory)
MAX_LAYER_PIDS = 1024             # distinct pids with pages in one layer
MAX_FRAME_RAW = MAX_FRAME_SIZE    # raw bytes of one frame (and at most the layer's frame_size)
MAX_PID = 1 << 22                 # PID_MAX_LIMIT
# x86_64 TASK_SIZE (47-bit user space): no user page lies at or above it.
USER_ADDR_LIMIT = 0x7FFFFFFFF000
MAX_ENTRY_PAGES = 0xFFFFFFFF      # npages is a uint32


def compress_bound(raw: int) -> int:
    """Largest zstd frame for ``raw`` input bytes (ZSTD_COMPRESSBOUND)."""
    return raw + (raw >> 8) + (((128 << 10) - raw) >> 11 if raw < (128 << 10) else 0)


def trailer_bound(blocks: int) -> int:
    """Largest Trailer payload for a layer of ``blocks`` indexed blocks:
    each offset is a varint of at most 10 bytes (+1 for packing slack), the
    rest is a few dozen scalar fields and the MAC."""
    return 4096 + 11 * blocks

KIND_PREDUMP = "pre-dump"
KIND_DUMP = "dump"
KINDS = (KIND_PREDUMP, KIND_DUMP)

LAYER_NAME = "layer-{:04d}.img"
LAYER_RE = r"^layer-(\d{4,10})\.img$"
TEMP_PREFIX = ".layer-"

# Metadata record kinds and the message each one holds.
RECORD_TYPES = {
    "pstree": pstree_pb2.PstreeEntry,
    "core": core_pb2.CoreEntry,
    "mm": mm_pb2.MmEntry,
    "files": files_pb2.FilesEntry,
    "signals": signals_pb2.SignalsEntry,
    "stats": stats_pb2.DumpStatsEntry,
    "restore-stats": stats_pb2.RestoreStatsEntry,
    "process": process_pb2.ProcessEntry,
    "tracker": tracking_pb2.TrackerStateEntry,
}

Inventory = inventory_pb2.Inventory
Trailer = inventory_pb2.Trailer
Record = inventory_pb2.Record
RoundStats = inventory_pb2.RoundStats
PagemapBlock = pagemap_pb2.PagemapBlock


def layer_seed(layer_id: str) -> int:
    return zlib.crc32(bytes.fromhex(layer_id))


def pack_block_header(btype: int, length: int, aux: int, payload_crc: int,
                      offset: int, seed: int) -> bytes:
    head = struct.pack("<IIQI", btype, length, aux, payload_crc)
    hcrc = zlib.crc32(struct.pack("<Q", offset), zlib.crc32(head, seed))
    return head + struct.pack("<I", hcrc)


def header_crc_ok(raw: bytes, offset: int, seed: int) -> bool:
    (hcrc,) = struct.unpack_from("<I", raw, 20)
    return zlib.crc32(struct.pack("<Q", offset), zlib.crc32(raw[:20], seed)) == hcrc


def digest(payload: bytes) -> bytes:
    """The header digest a child layer names: SHA-256 of the header payload."""
    return hashlib.sha256(payload).digest()


def layer_name(index: int) -> str:
    return LAYER_NAME.format(index)
