"""eventfd (fs/eventfd.c show_fdinfo): the count and EFD_SEMAPHORE;
restored by eventfd2 with the count."""

from __future__ import annotations

import os

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, fdinfo_fields

EFD_SEMAPHORE, EFD_CLOEXEC = 1, os.O_CLOEXEC


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    e.type = files_pb2.FD_EVENTFD
    f = fdinfo_fields(ctx.fdinfo(p.fd))
    e.eventfd_count = int(f.get("eventfd-count", "0"), 16)
    e.eventfd_semaphore = f.get("eventfd-semaphore") == "1"
    return e


def restore(R: RestoreCore, it: Item) -> None:
    if it.e.eventfd_count > 0xFFFF_FFFF:
        raise R.fail(it, f"eventfd count {it.e.eventfd_count} does not fit eventfd2")
    flags = EFD_CLOEXEC | (it.e.flags & os.O_NONBLOCK) | \
        (EFD_SEMAPHORE if it.e.eventfd_semaphore else 0)
    fd = R.fresh(R.call("eventfd2", it.e.eventfd_count, flags, it=it))
    R.setfl(fd, it)
    R.place(fd, it)


KIND = FdKind("eventfd", (files_pb2.FD_EVENTFD,), lambda p: p.kind == "eventfd", dump, restore)
