"""Pipes and FIFOs with their unread data (CRIU's pipes.c, fifo.c).

dump: the pipe's inode, size (F_GETPIPE_SZ) and unread bytes, copied with
tee(2) from a read end of our own, never consumed. restore: pipe2 (O_DIRECT
for packet mode) or the FIFO opened through an O_RDWR helper that keeps the
real opens from blocking; filled through the engine's own copy of the write
end; every end and description of the pipe placed together."""

from __future__ import annotations

import ctypes
import fcntl
import os
import stat
import struct
import termios

from ...errors import CheckpointError, UnsupportedObject
from ...images.pb import files_pb2
from ...kernel.syscalls import libc
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032
SPLICE_F_NONBLOCK = 0x02

_tee = libc.tee
_tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_tee.restype = ctypes.c_ssize_t


def claims(p: Probe) -> bool:
    return p.kind == "pipe" or (p.kind == "file" and stat.S_ISFIFO(p.st.st_mode))


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    e.type = files_pb2.FD_PIPE if p.kind == "pipe" else files_pb2.FD_FIFO
    e.pipe_id = p.st.st_ino
    e.pipe_data, e.pipe_size = peek_pipe(ctx, p.fd, p.link, p.carries_data)
    return e


def peek_pipe(ctx: DumpCtx, fd: int, link: str, want_data: bool) -> tuple[bytes, int]:
    """Unread content and size of the pipe behind ``fd`` without consuming it:
    a read end of our own (opening /proc/PID/fd/N of a pipe or FIFO joins
    the same pipe) is tee(2)'d into a private pipe of the same capacity."""
    rfd = os.open(ctx.fd_path(fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(rfd, F_GETPIPE_SZ)
        if not want_data:
            return b"", size
        n = unread(rfd)
        if n == 0:
            return b"", size
        if n > ctx.max_content:
            raise UnsupportedObject(f"fd {fd} ({link}) holds {n} unread bytes, more than"
                                    f" the {ctx.max_content} bytes a pipe may put in the image")
        pr, pw = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            if fcntl.fcntl(pw, F_GETPIPE_SZ) < size:
                fcntl.fcntl(pw, F_SETPIPE_SZ, size)  # same number of slots as the source
            got = _tee(rfd, pw, n, SPLICE_F_NONBLOCK)
            if got < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"tee from {link}: {os.strerror(err)}")
            if got != n:
                raise CheckpointError(f"fd {fd} ({link}): tee copied {got} of {n} unread bytes")
            data = bytearray()
            while len(data) < n:
                data += os.read(pr, n - len(data))
        finally:
            os.close(pr)
            os.close(pw)
    finally:
        os.close(rfd)
    return bytes(data), size


def unread(fd: int) -> int:
    """Bytes waiting behind ``fd`` (FIONREAD: a pipe's either end, an inotify fd)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def restore(R: RestoreCore, it: Item) -> None:
    """The first fd of a pipe (or FIFO) makes the pipe; its other ends,
    other descriptions and its content come with it."""
    if it.same_inode_as is not None:  # a second end, once the first is back
        return R.reopen_sibling(it)
    key = (it.e.dev, it.e.pipe_id)
    group = [o for o in R.items if (o.e.dev, o.e.pipe_id) == key
             and o.e.type == it.e.type and o.dup_of is None
             and R.inherited_source(o) is None]
    data = next((o.e.pipe_data for o in group if o.e.pipe_data), b"")
    size = next((o.e.pipe_size for o in group if o.e.pipe_size), 0)
    if it.e.type == files_pb2.FD_PIPE:
        addr = R.r.scratch
        created = os.O_DIRECT if any(o.e.flags & os.O_DIRECT for o in group) else 0
        R.call("pipe2", addr, os.O_CLOEXEC | created, it=it)  # O_DIRECT: packet mode
        rd, wr = struct.unpack("ii", R.r.read(addr, 8))
        ends = {os.O_RDONLY: R.fresh(rd), os.O_WRONLY: R.fresh(wr)}
    else:
        # a FIFO: an O_RDWR helper never blocks and lets the real opens not block
        helper = R.fresh(R.open_image_path(it, os.O_RDWR | os.O_NONBLOCK))
        ends = {os.O_RDONLY: helper, os.O_WRONLY: helper}
        created = 0
    fill_pipe(R, ends[os.O_WRONLY], it, data, size)
    used: set[int] = set()
    for o in group:
        mode = o.e.flags & os.O_ACCMODE
        if o.e.type == files_pb2.FD_FIFO:  # the helper keeps this open from blocking
            R.place(R.open_image_path(o, o.e.flags), o)
            continue
        src = ends.get(mode)
        if src is None:
            raise R.fail(o, f"pipe end with access mode {mode} cannot be restored")
        if src in used:  # another description of the same end
            fd = R.openat(f"/proc/self/fd/{src}", o.e.flags, o)
            R.setfl(fd, o)
            R.place(fd, o)
            continue
        used.add(src)
        R.setfl(src, o, created)
        R.place(src, o, close_tmp=False)
    for fd in set(ends.values()):
        if fd not in R.placed:
            R.call("close", fd)  # an end the process did not hold, or the helper


def fill_pipe(R: RestoreCore, wr: int, it: Item, data: bytes, size: int) -> None:
    if not data and not size:
        return
    wfd = R.own_copy(wr)  # the very pipe the placeholder holds, no path
    restore_fl = None
    try:
        st = os.fstat(wfd)
        if not stat.S_ISFIFO(st.st_mode) or (it.e.type == files_pb2.FD_FIFO and (
                st.st_dev, st.st_ino) != (it.e.dev, it.e.inode)):
            raise R.fail(it, "the fd to fill is not the dumped pipe or FIFO")
        fl = fcntl.fcntl(wfd, fcntl.F_GETFL)
        if fl & os.O_ACCMODE == os.O_RDONLY:
            raise R.fail(it, "the fd to fill is a read end")
        if not fl & os.O_NONBLOCK:  # the copy shares the description: put back below
            fcntl.fcntl(wfd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            restore_fl = fl
        if it.e.type == files_pb2.FD_FIFO and unread(wfd):
            return  # the FIFO lives on (a peer holds it): its content is its own
        if size and fcntl.fcntl(wfd, F_GETPIPE_SZ) != size:
            try:
                fcntl.fcntl(wfd, F_SETPIPE_SZ, size)
            except OSError as exc:
                if len(data) > fcntl.fcntl(wfd, F_GETPIPE_SZ):
                    raise R.fail(it, f"cannot set the pipe size to {size}:"
                                     f" {exc.strerror}") from None
        view = memoryview(data)
        while view:
            n = os.write(wfd, view)
            view = view[n:]
    except BlockingIOError:
        raise R.fail(it, f"the pipe took only part of its {len(data)} saved bytes"
                         " (a FIFO with data already in it?)") from None
    finally:
        if restore_fl is not None:
            fcntl.fcntl(wfd, fcntl.F_SETFL, restore_fl)
        os.close(wfd)


KIND = FdKind("pipe or FIFO", (files_pb2.FD_PIPE, files_pb2.FD_FIFO), claims, dump, restore)
