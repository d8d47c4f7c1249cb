"""memfd (CRIU's memfd.c): name, content (capped), mode and seals.

dump: the name (without "/memfd:" and " (deleted)"), the content and the
seals (first fd of the memfd only), its mode (st_mode). restore:
memfd_create(MFD_ALLOW_SEALING), content written through the engine's own
copy, the mode (fchmod), then the seals; an fd whose access mode is not
O_RDWR is reopened through /proc/self/fd/N.

One memfd both mapped and held as an fd stays one object: the restorer asks
``premake`` for the memfds its mappings need before it maps them (and maps
/proc/self/fd/N of the memfd made here), and the fd room places that very
memfd at its number; its seals are added only once the pages are written."""

from __future__ import annotations

import os
import stat

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse
from .regfile import read_content

MFD_CLOEXEC, MFD_ALLOW_SEALING = 0x0001, 0x0002  # <linux/memfd.h>
F_ADD_SEALS = 1033
HUGETLBFS_MAGIC = 0x958458F6


def claims(p: Probe) -> bool:
    return p.kind == "memfd" and not p.flags & os.O_PATH


def memfd_name(link: str) -> str:
    name = link[len("/memfd:"):]
    return name[:-len(" (deleted)")] if name.endswith(" (deleted)") else name


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    if not stat.S_ISREG(p.st.st_mode) or _fs_magic(ctx.fd_path(p.fd)) == HUGETLBFS_MAGIC:
        return refuse(e, "hugetlb-memfd", "a hugetlb memfd", "hugetlb memfds", ctx.external)
    e.type = files_pb2.FD_MEMFD
    e.memfd_name = memfd_name(p.link)
    if p.carries_data:
        e.content, e.memfd_seals = read_content(ctx, p.fd, p.link, p.st.st_size, "memfd",
                                                seals=True)
    return e


def _fs_magic(path: str) -> int:
    import ctypes
    from ...kernel.syscalls import libc
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type first
    if libc.statfs(path.encode(), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[:8], "little")


def create(R: RestoreCore, it: Item) -> int:
    """A new memfd with the dumped name, content and mode (no seals yet):
    the placeholder's fd, above the image's numbers."""
    e = it.e
    addr = R.stage(e.memfd_name[:249], it)
    fd = R.fresh(R.call("memfd_create", addr, MFD_CLOEXEC | MFD_ALLOW_SEALING, it=it))
    if fd < R.base:
        new = R.dupfd_high(fd)
        R.call("close", fd)
        fd = new
    if e.content or e.file_size:
        wfd = R.own_copy(fd)
        try:
            if not os.readlink(f"/proc/{R.pid}/fd/{fd}").startswith("/memfd:") or \
                    not stat.S_ISREG(os.fstat(wfd).st_mode):
                raise R.fail(it, "the placeholder's memfd_create fd is no memfd")
            os.pwrite(wfd, e.content, 0)
            os.ftruncate(wfd, e.file_size)
        finally:
            os.close(wfd)
    if e.mode and stat.S_IMODE(e.mode) != 0o777:
        R.call("fchmod", fd, stat.S_IMODE(e.mode) & 0o777, it=it)
    return fd


def premake(R: RestoreCore, inode: tuple[int, int]) -> int | None:
    """The placeholder fd of the memfd with dumped (dev, inode), made now if
    the image holds it as an fd (the first fd of it); None if it does not."""
    if inode in R.premade:
        return R.premade[inode]
    for it in R.items:
        if it.e.type == files_pb2.FD_MEMFD and (it.e.dev, it.e.inode) == inode and \
                it.same_inode_as is None and it.dup_of is None and \
                R.inherited_source(it) is None:
            R.premade[inode] = create(R, it)
            return R.premade[inode]
    return None


def restore(R: RestoreCore, it: Item) -> None:
    if it.same_inode_as is not None:
        return R.reopen_sibling(it)
    fd = R.premade.get((it.e.dev, it.e.inode))
    if fd is None:
        fd = create(R, it)
    if it.e.memfd_seals:
        R.call("fcntl", fd, F_ADD_SEALS, it.e.memfd_seals, it=it)
    mode = it.e.flags & os.O_ACCMODE
    if mode != os.O_RDWR:  # memfd_create gives O_RDWR: reopen with the saved mode
        fd2 = R.openat(f"/proc/self/fd/{fd}", it.e.flags, it)
        R.call("close", fd)
        fd = fd2
    R.setfl(fd, it, os.O_RDWR)
    R.lseek(fd, it)
    R.place(fd, it)


KIND = FdKind("memfd", (files_pb2.FD_MEMFD,), claims, dump, restore)
