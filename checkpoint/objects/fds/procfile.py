"""Files of /proc (CRIU's files-reg.c, its procfs case): reopened by path,
not by inode (procfs inode numbers are made afresh for every process).

dump: a file on the procfs the engine sees (same device as its /proc). One
of the process's own /proc/PID/... (the dumped PID; also a path reached by
/proc/self or /proc/thread-self: the link names the PID) is recorded
relative to it: the restore opens the restored process's. /proc/TID/... of
one of its other threads is refused (threads are made after the files);
so is /proc/PID/... of another process: it may be gone or be another
process with the same PID at restore. Global files (/proc/stat,
/proc/meminfo, /proc/sys/...) are reopened as they are.

restore: the path (made the restored process's) opened as the dumped user,
checked to be on procfs and of the dumped file type, then lseek to the
dumped offset as far as the file allows (a seq_file regenerates up to it;
one that cannot seek stays at 0, as in CRIU)."""

from __future__ import annotations

import os
import re
import stat

from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, fmt_name, refuse

_PID_PATH = re.compile(r"^/proc/(\d+)(/.*)?$")


def _proc_dev() -> int:
    return os.stat("/proc/self").st_dev


def claims(p: Probe) -> bool:
    return p.kind == "file" and p.link.startswith("/proc") and \
        (p.link == "/proc" or p.link.startswith("/proc/")) and p.st.st_dev == _proc_dev()


def dump(ctx: DumpCtx, p: Probe):
    e, st = p.e, p.st
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or p.flags & os.O_PATH):
        return refuse(e, "other", "a special file of /proc", "such files", ctx.external)
    e.type = files_pb2.FD_DIR if stat.S_ISDIR(st.st_mode) else files_pb2.FD_REG
    m = _PID_PATH.match(p.link.removesuffix(" (deleted)"))
    if m:
        n, rest = int(m.group(1)), m.group(2) or ""
        if n != ctx.pid:
            what = "of one of its other threads" if n in ctx.tids else "of another process"
            return refuse(e, "procfs-other", f"a file of /proc {what}",
                          "files of another process's or thread's /proc/PID", ctx.external)
        tm = re.match(r"^/task/(\d+)(/.*)?$", rest)
        if tm and int(tm.group(1)) != ctx.pid:
            return refuse(e, "procfs-other", "a file of /proc of one of its other threads",
                          "files of another process's or thread's /proc/PID", ctx.external)
        if p.link.endswith(" (deleted)"):  # its own /proc of an exited thread?
            return refuse(e, "procfs-other", "a file of /proc of an exited task",
                          "such files", ctx.external)
        e.procfs.own = True
        e.procfs.rest = rest
    else:
        e.procfs.own = False
    return e


def path_now(R: RestoreCore, it: Item) -> str:
    """The path to open: the restored process's /proc/PID (as the placeholder
    sees it: procfs is the engine's, also in --pid-ns) for its own files."""
    pf = it.e.procfs
    if not pf.own:
        return it.e.path
    rest = pf.rest
    m = re.match(r"^/task/(\d+)(/.*)?$", rest)
    if m:
        rest = f"/task/{R.pid}{m.group(2) or ''}"
    return f"/proc/{R.pid}{rest}"


def check(R: RestoreCore, it: Item, st: os.stat_result) -> None:
    """Instead of the inode check: on procfs, of the dumped file type."""
    want = stat.S_IFMT(it.e.mode) if it.e.mode else None
    if st.st_dev != _proc_dev() or (want is not None and stat.S_IFMT(st.st_mode) != want):
        raise R.fail(it, f"{path_now(R, it)} is {fmt_name(stat.S_IFMT(st.st_mode))}"
                         f"{'' if st.st_dev == _proc_dev() else ' not on procfs'}, the image"
                         f" says a procfs {fmt_name(want or 0)}; refusing to open it")


def restore(R: RestoreCore, it: Item) -> None:
    fd = R.open_image_path(it, it.e.flags, path=path_now(R, it),
                           check=lambda i, st: check(R, i, st))
    R.lseek(fd, it, strict=False)
    R.place(fd, it)


# restores FD_REG/FD_DIR entries that carry ``procfs`` (see __init__.restore_one)
KIND = FdKind("procfs file", (), claims, dump, restore)
