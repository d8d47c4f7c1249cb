"""/dev/null, zero, full, random, urandom: reopened by path, checked to be
one of them (drivers/char/mem.c; /dev/mem, kmem, port, kmsg are refused as
other devices)."""

from __future__ import annotations

import os
import stat

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore

MEM_MAJOR = 1
MEM_MINORS_OK = {3, 5, 7, 8, 9}  # null, zero, full, random, urandom


def claims(p: Probe) -> bool:
    return p.kind == "file" and stat.S_ISCHR(p.st.st_mode) and \
        os.major(p.st.st_rdev) == MEM_MAJOR and os.minor(p.st.st_rdev) in MEM_MINORS_OK


def dump(ctx: DumpCtx, p: Probe):
    p.e.type = files_pb2.FD_DEVNULL
    return p.e


def restore(R: RestoreCore, it: Item) -> None:
    R.place(R.open_image_path(it, it.e.flags), it)


def check(R: RestoreCore, it: Item, st: os.stat_result) -> None:
    if os.major(st.st_rdev) != MEM_MAJOR or os.minor(st.st_rdev) not in MEM_MINORS_OK:
        raise R.fail(it, f"{it.e.path} (device {os.major(st.st_rdev)}:"
                         f"{os.minor(st.st_rdev)}) is not /dev/null, zero, full, random "
                         "or urandom")


KIND = FdKind("/dev/null & co.", (files_pb2.FD_DEVNULL,), claims, dump, restore, check=check)
