"""epoll instances (CRIU's eventpoll.c): every registration with its events
and data.

dump: fdinfo "tfd: N events: X data: Y pos: ino: sdev:" lines; the file a
registration names is found with kcmp(KCMP_EPOLL_TFD): it is fd N itself,
or, when N was closed or now names another file, another fd of the process
holding that file (``file_fd``); a registration whose file no fd of the
process holds is refused. restore: epoll_create1, and once every fd is
placed, epoll_ctl(ADD) for each; a registration keyed by a number that now
names another file (or none) is added with that file dup'ed there for the
moment, and the number's own file put back."""

from __future__ import annotations

import errno
import os
import struct

from ...errors import UnsupportedObject
from ...images.pb import files_pb2
from ...kernel.syscalls import NR, raw_syscall
from .base import KCMP_EPOLL_TFD, DumpCtx, FdKind, Item, Probe, RestoreCore, refuse

EPOLL_CLOEXEC, EPOLL_CTL_ADD = os.O_CLOEXEC, 1
EPOLL_USER_EVENTS = 0xF000_3FFF  # EPOLLIN..EPOLLRDHUP, EPOLLEXCLUSIVE/WAKEUP/ONESHOT/ET


def _same_target(ctx: DumpCtx, epfd: int, tfd: int, fd: int) -> bool:
    import ctypes
    slot = (ctypes.c_uint32 * 3)(epfd, tfd, 0)  # struct kcmp_epoll_slot {efd, tfd, toff}
    try:
        return raw_syscall(NR["kcmp"], ctx.pid, ctx.pid, KCMP_EPOLL_TFD, fd,
                           ctypes.addressof(slot)) == 0
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOENT):
            return False  # fd not open / no such registration
        if exc.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            raise UnsupportedObject("epoll registrations cannot be matched to fds: kcmp "
                                    "(KCMP_EPOLL_TFD) is missing (CONFIG_KCMP)") from None
        raise


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    e.type = files_pb2.FD_EVENTPOLL
    for line in ctx.fdinfo(p.fd).splitlines():
        if not line.startswith("tfd:"):
            continue
        f = line.split()
        # tfd: N events: X data: Y  pos:P ino:I sdev:D
        t = e.epoll.add(tfd=int(f[1]), events=int(f[3], 16), data=int(f[5], 16))
        ino = next((int(x[4:], 16) for x in f if x.startswith("ino:")), None)
        if _same_target(ctx, p.fd, t.tfd, t.tfd):
            continue
        for fd in _candidates(ctx, ino):
            if _same_target(ctx, p.fd, t.tfd, fd):
                t.file_fd = fd
                break
        else:
            return refuse(e, "epoll-orphan", "an epoll instance",
                          "registrations of files the process holds no fd of", ctx.external,
                          why=f" with a registration of fd {t.tfd} (inode {ino}) whose file"
                              " the process no longer holds as an fd")
    return e


def _candidates(ctx: DumpCtx, ino: int | None) -> list[int]:
    out = []
    for name in os.listdir(f"/proc/{ctx.pid}/fd"):
        try:
            if ino is None or os.stat(ctx.fd_path(int(name))).st_ino == ino:
                out.append(int(name))
        except OSError:
            pass
    return sorted(out)


def restore(R: RestoreCore, it: Item) -> None:
    # its registrations come once every fd is back (finish)
    fd = R.fresh(R.call("epoll_create1", EPOLL_CLOEXEC, it=it))
    R.place(fd, it)


def finish(R: RestoreCore, it: Item) -> None:
    if it.dup_of is not None:
        return
    for t in it.e.epoll:
        src = t.file_fd if t.HasField("file_fd") else t.tfd
        if src != t.tfd and src not in R.placed:
            raise R.fail(it, f"registration of fd {t.tfd} names the file of fd {src},"
                             " which was not restored")
        park = -1
        if src != t.tfd:  # key the registration by tfd: lend it src's file a moment
            if t.tfd in R.placed or t.tfd in R.placeholder_fds():
                park = R.dupfd_high(t.tfd)
            R.call("dup3", src, t.tfd, os.O_CLOEXEC, it=it)
        try:
            # struct epoll_event is packed on x86_64: u32 events, u64 data
            R.r.write(R.r.scratch, struct.pack("<IQ", t.events & EPOLL_USER_EVENTS, t.data))
            res = R.r.syscall("epoll_ctl", it.fd, EPOLL_CTL_ADD, t.tfd, R.r.scratch)
        finally:
            if src != t.tfd:
                if park >= 0:  # its own file back, with its close-on-exec
                    cloexec = R.by_fd[t.tfd].e.cloexec if t.tfd in R.by_fd else True
                    R.call("dup3", park, t.tfd, os.O_CLOEXEC if cloexec else 0)
                    R.call("close", park)
                else:
                    R.call("close", t.tfd)
        if res < 0:
            raise R.fail(it, f"epoll_ctl(ADD, fd {t.tfd}) failed: {os.strerror(-res)}")


KIND = FdKind("epoll", (files_pb2.FD_EVENTPOLL,), lambda p: p.kind == "eventpoll", dump,
              restore, finish=finish)
