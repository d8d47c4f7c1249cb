"""Merge the first N layers of a chain into one layer with identical content.

The merged layer takes the index (and file name) of the last layer it
replaces and records ``replaces_id``/``replaces_digest``, so the layers
after it still link to it. Publication is one rename over that file: before
it, the old chain is intact; after it, the reader ignores the older files
(``squashed_first`` says the new base covers them) and they are then removed.
A crash at any point leaves a readable chain.

With ``sign_key`` the merged layers must all be signed with that key and
verify (MACs checked before anything is written), and the result is signed
too, naming the replaced layer's MAC so the later layers still link. A
signed chain is never squashed without its key (the result would be
unsigned, and a reader with the key would refuse the chain).
"""

from __future__ import annotations

import os

from ..errors import ImageError
from . import format as F
from .reader import list_layers, open_chain
from .writer import LayerStats, LayerWriter, LocalSink, ParentRef, fsync_dir


def squash(images_dir: str | os.PathLike, upto: int | None = None, *, level: int | None = None,
           threads: int = 1, frame_size: int | None = None,
           sign_key: bytes | None = None) -> LayerStats | None:
    """Squash the first ``upto`` layers (default: all) into one. Returns the
    new layer's stats, or None when there was nothing to merge (removing
    leftovers of an interrupted squash either way)."""
    images_dir = os.fspath(images_dir)
    with open_chain(images_dir, upto=upto, threads=threads, sign_key=sign_key) as chain:
        if sign_key is None:
            for layer in chain.layers:
                if layer.signed:
                    raise ImageError(f"signed with key {layer.key_id}: give the key to squash "
                                     f"the chain (it would lose its signature)",
                                     path=layer.path)
        if len(chain.layers) < 2:
            _remove_stale(images_dir, chain.base.index)
            return None
        last, base = chain.top, chain.base
        inv = last.inventory
        first = base.inventory.squashed_first if base.inventory.squashed else base.index
        sink = LocalSink(images_dir, last.index, replace=True)
        try:
            w = LayerWriter(
                sink, index=last.index, kind=inv.kind, parent=None, tracker=inv.tracker,
                kernel_release=inv.kernel_release,
                level=inv.compression_level if level is None else level, threads=threads,
                frame_size=frame_size or inv.frame_size or F.DEFAULT_FRAME_SIZE,
                page_size=inv.page_size, squashed_first=first,
                replaces=ParentRef(last.layer_id, last.header_digest, last.index, last.mac),
                sign_key=sign_key)
        except BaseException:
            sink.abort()
            raise
        with w:
            for kind, payload in last.records:
                w.add_record(kind, payload)
            for pid in chain.pids():
                for run in chain.iter_runs(pid, zero_data=False):
                    if run.zero:
                        w.add_zero(pid, run.addr, run.npages)
                    else:
                        w.add_pages(pid, run.addr, run.data)
            s = last.stats
            stats = w.close(freezing_ms=s.freezing_ms, frozen_ms=s.frozen_ms,
                            memdump_ms=s.memdump_ms, pages_scanned=s.pages_scanned)
    _remove_stale(images_dir, last.index)
    return stats


def _remove_stale(images_dir: str, base_index: int) -> None:
    removed = False
    for idx, path in list_layers(images_dir).items():
        if idx < base_index:
            try:
                os.unlink(path)     # unlink never follows a link
                removed = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ImageError(f"cannot remove a layer superseded by squash: {exc.strerror}",
                                 path=path) from None
    if removed:
        fsync_dir(images_dir)
