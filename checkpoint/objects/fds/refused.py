"""What the dump refuses, naming the fd: sockets, pidfds, fanotify,
io_uring, userfaultfd, character devices other than ttys and /dev/null &
co., shared anonymous memory or SysV shared memory held as an fd (an fd
opened on /proc/PID/map_files/...), and any other special file. With
``--external-fds`` each is recorded as external (FD_UNKNOWN): the restore
must give a stand-in with ``--inherit-fd``. Always last in the table: it
claims whatever no other kind did."""

from __future__ import annotations

import os
import stat

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Probe, refuse

NAMES = {
    "socket": ("a socket", "sockets"),
    "pidfd": ("a pidfd", "pidfds"),
    "io_uring": ("an io_uring instance", "io_uring instances"),
    "fanotify": ("a fanotify instance", "fanotify instances"),
    "userfaultfd": ("a userfaultfd", "userfaultfds"),
    "chardev": ("a character device", "character devices other than ttys and /dev/null & co."),
    "shmem": ("shared anonymous memory held as an fd", "fds of shared anonymous memory"
              " (/proc/PID/map_files of a MAP_SHARED|MAP_ANONYMOUS mapping)"),
    "sysvshm": ("SysV shared memory held as an fd", "fds of SysV shared memory segments"),
    "deleted": ("deleted", "deleted directories, FIFOs, devices and O_PATH files held open"),
    "other": ("a special file", "such files"),
}


def deleted_kind(p: Probe) -> bool:
    """An fd on a deleted inode that is no regular file opened for I/O (those
    are "ghosts", rebuilt from their content): no path reopens it."""
    return p.kind == "file" and p.link.endswith(" (deleted)") and p.st.st_nlink == 0 and \
        (not stat.S_ISREG(p.st.st_mode) or bool(p.flags & os.O_PATH))


def dump_deleted(ctx: DumpCtx, p: Probe):
    kind = {stat.S_IFDIR: "a deleted directory", stat.S_IFIFO: "a deleted FIFO",
            stat.S_IFCHR: "a deleted device", stat.S_IFBLK: "a deleted device"}.get(
        stat.S_IFMT(p.st.st_mode), "a deleted file opened O_PATH")
    return refuse(p.e, "deleted", kind, NAMES["deleted"][1], ctx.external)


def shm_kind(p: Probe) -> str | None:
    """"shmem" for the file behind shared anonymous memory ("/dev/zero
    (deleted)" on the kernel's internal shmem mount), "sysvshm" for a SysV
    segment ("/SYSV%08x (deleted)"), None otherwise."""
    if p.kind != "file" or not stat.S_ISREG(p.st.st_mode) or p.st.st_nlink:
        return None
    if p.link == "/dev/zero (deleted)":
        return "shmem"
    if p.link.startswith("/SYSV") and p.link.endswith(" (deleted)") and \
            len(p.link) == len("/SYSV00000000 (deleted)"):
        return "sysvshm"
    return None


def what(kind: str) -> tuple[str, str]:
    return NAMES.get(kind, (f"an anonymous inode ({kind})", f"{kind} fds"))


def dump(ctx: DumpCtx, p: Probe):
    kind = shm_kind(p) or p.kind
    if kind == "file":
        kind = "other"
    one, many = what(kind)
    return refuse(p.e, kind, one, many, ctx.external)


def refuse_chardev(ctx: DumpCtx, p: Probe):
    one, many = what("chardev")
    return refuse(p.e, "chardev", one, many, ctx.external)


DELETED = FdKind("deleted non-regular file", (), deleted_kind, dump_deleted)
SHM = FdKind("shared memory fd", (), lambda p: shm_kind(p) is not None, dump)
KIND = FdKind("refused", (files_pb2.FD_UNKNOWN,), lambda p: True, dump)
