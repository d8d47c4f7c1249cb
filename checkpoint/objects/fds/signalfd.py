"""signalfd (fs/signalfd.c show_fdinfo): its signal mask; signalfd4."""

from __future__ import annotations

import os
import struct

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, fdinfo_fields

SFD_CLOEXEC = os.O_CLOEXEC


def dump(ctx: DumpCtx, p: Probe):
    p.e.type = files_pb2.FD_SIGNALFD
    p.e.signalfd_mask = int(fdinfo_fields(ctx.fdinfo(p.fd)).get("sigmask", "0"), 16)
    return p.e


def restore(R: RestoreCore, it: Item) -> None:
    R.r.write(R.r.scratch, struct.pack("<Q", it.e.signalfd_mask))
    flags = SFD_CLOEXEC | (it.e.flags & os.O_NONBLOCK)
    fd = R.fresh(R.call("signalfd4", -1, R.r.scratch, 8, flags, it=it))
    R.setfl(fd, it)
    R.place(fd, it)


KIND = FdKind("signalfd", (files_pb2.FD_SIGNALFD,), lambda p: p.kind == "signalfd", dump,
              restore)
