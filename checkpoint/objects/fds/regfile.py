"""Regular files, directories, block devices, O_PATH fds, and deleted-but-open
files ("ghosts", CRIU's files-reg.c).

dump: path, offset, flags, identity (dev, inode, size, mtime, owner); a
deleted file also its content (capped). restore: the path opened as the
dumped user (O_PATH first, identity checked) + lseek; a deleted file is made
again as a nameless O_TMPFILE file filled from the image."""

from __future__ import annotations

import fcntl
import os
import stat

from ...errors import UnsupportedObject
from ...images.pb import files_pb2
from .base import AT_FDCWD, O_TMPFILE_FLAGS, DumpCtx, FdKind, Item, Probe, RestoreCore

F_GET_SEALS = 1034


def read_content(ctx: DumpCtx, fd: int, link: str, size: int, what: str,
                 seals: bool = False) -> tuple[bytes, int]:
    """The whole content of the target's fd ``fd`` (and its seals)."""
    if size > ctx.max_content:
        raise UnsupportedObject(
            f"fd {fd} is a {what} ({link}) of {size} bytes, more than the"
            f" {ctx.max_content} bytes a {what} may put in the image")
    rfd = os.open(ctx.fd_path(fd), os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(size)
        got = os.preadv(rfd, [buf], 0) if size else 0
        s = fcntl.fcntl(rfd, F_GET_SEALS) if seals else 0
    finally:
        os.close(rfd)
    return bytes(buf[:got]), s


def claims(p: Probe) -> bool:
    if p.kind != "file":
        return False
    if p.flags & os.O_PATH:
        return True
    return stat.S_ISREG(p.st.st_mode) or stat.S_ISDIR(p.st.st_mode) or \
        stat.S_ISBLK(p.st.st_mode)


def dump(ctx: DumpCtx, p: Probe):
    e, st = p.e, p.st
    if p.flags & os.O_PATH:
        e.type = files_pb2.FD_DIR if stat.S_ISDIR(st.st_mode) else files_pb2.FD_REG
    elif stat.S_ISREG(st.st_mode):
        e.type = files_pb2.FD_REG
        if st.st_nlink == 0 and p.link.endswith(" (deleted)"):
            e.ghost = True
            if p.carries_data:
                e.content, _ = read_content(ctx, p.fd, p.link, st.st_size, "deleted file")
    elif stat.S_ISDIR(st.st_mode):
        e.type = files_pb2.FD_DIR
    else:  # a block device: reopened by path like a file
        e.type = files_pb2.FD_REG
    return e


def restore(R: RestoreCore, it: Item) -> None:
    t = it.e.type
    if t == files_pb2.FD_REG and it.e.ghost:
        return restore_ghost(R, it)
    fd = R.open_image_path(it, it.e.flags)
    R.lseek(fd, it, strict=t == files_pb2.FD_REG)
    R.place(fd, it)


def restore_ghost(R: RestoreCore, it: Item) -> None:
    """A deleted file: made by the placeholder as a nameless file
    (O_TMPFILE, so a dying restore leaves no name behind) with its
    credentials (so it belongs to the dumped fsuid/fsgid), filled by the
    engine through its own copy of that fd, given the dumped owner where
    the placeholder may (fchown: CAP_CHOWN) and the dumped mode, minus
    set-uid/set-gid when the owner is not the dumped one."""
    e = it.e
    addr = R.stage(R.ghost_dir, it)
    tfd = R.r.syscall("openat", AT_FDCWD, addr, O_TMPFILE_FLAGS | os.O_RDWR
                      | os.O_CLOEXEC, 0o600)
    if tfd < 0:
        raise R.fail(it, f"cannot create a nameless file in {R.ghost_dir} for the "
                         f"deleted file: {os.strerror(-tfd)}")
    tfd = R.fresh(tfd)
    try:
        own = R.own_copy(tfd)
        try:
            st = os.fstat(own)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
                raise R.fail(it, "the placeholder's O_TMPFILE fd is not a nameless file")
            view = memoryview(e.content)
            off = 0
            while off < len(view):
                off += os.pwrite(own, view[off:], off)
        finally:
            os.close(own)
        fd = R.openat(f"/proc/self/fd/{tfd}", e.flags, it)  # while it is 0600 and ours
        st = os.stat(f"/proc/{R.pid}/fd/{tfd}")
        if e.has_owner and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            R.r.syscall("fchown", tfd, e.uid, e.gid)  # EPERM: stays the creator's
            st = os.stat(f"/proc/{R.pid}/fd/{tfd}")
        mode = stat.S_IMODE(e.mode) or 0o600
        if not e.has_owner or st.st_uid != e.uid:
            mode &= ~stat.S_ISUID
        if not e.has_owner or st.st_gid != e.gid:
            mode &= ~stat.S_ISGID
        res = R.r.syscall("fchmod", tfd, mode)
        if res < 0 and mode & (stat.S_ISUID | stat.S_ISGID):
            R.r.syscall("fchmod", tfd, mode & ~(stat.S_ISUID | stat.S_ISGID))
        st = os.stat(f"/proc/{R.pid}/fd/{tfd}")
        if (st.st_mode & stat.S_ISUID and (not e.has_owner or st.st_uid != e.uid)) or \
                (st.st_mode & stat.S_ISGID and (not e.has_owner or st.st_gid != e.gid)):
            R.call("close", fd)
            raise R.fail(it, "the recreated deleted file kept set-uid/set-gid bits for "
                             f"owner {st.st_uid}:{st.st_gid}, not the dumped owner")
    finally:
        R.r.syscall("close", tfd)
    R.lseek(fd, it)
    R.place(fd, it)


KIND = FdKind("regular file", (files_pb2.FD_REG, files_pb2.FD_DIR), claims, dump, restore)
