"""cwd, root and umask of the process (CRIU's files.c dump_task_fs)."""

from __future__ import annotations

import os
import stat

from ...errors import KernelFeatureError, RestoreError, UnsupportedObject
from ...kernel import procfs
from .base import O_DIRECTORY, FilesEntry, RestoreCore, open_path


def readlink_proc(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError as exc:
        raise procfs._proc_open_error(exc, pid, f"/proc/{pid}/{name}") from None


def dump_fs(pid: int, entry: FilesEntry) -> None:
    entry.cwd = readlink_proc(pid, "cwd")
    entry.root = readlink_proc(pid, "root")
    if entry.cwd.endswith(" (deleted)"):
        raise UnsupportedObject(f"the working directory of process {pid} was deleted"
                                f" ({entry.cwd}); restoring it is not supported")
    umask = procfs.read_status(pid).umask
    if umask is None:
        raise KernelFeatureError("/proc/PID/status has no Umask line (Linux < 4.7)")
    entry.umask = umask
    for name in ("cwd", "root"):
        try:
            st = os.stat(f"/proc/{pid}/{name}")
        except OSError as exc:
            raise procfs._proc_open_error(exc, pid, f"/proc/{pid}/{name}") from None
        setattr(entry, f"{name}_dev", st.st_dev)
        setattr(entry, f"{name}_inode", st.st_ino)


def restore_fs(R: RestoreCore) -> None:
    """cwd and root: each opened O_PATH|O_DIRECTORY|O_NOFOLLOW with the
    placeholder's (the dumped) credentials and checked to be the dumped
    directory; fchdir to them (search permission checked as the dumped
    process); chroot(".") is the one step with the restorer's privilege
    (CAP_SYS_CHROOT: confining is no grant)."""
    e = R.entry
    if e.umask > 0o777:
        raise RestoreError(f"image field files.umask: {e.umask:#o}; refusing to restore")
    fds = []
    try:
        dirs = {}
        for name in ("root", "cwd"):
            path = getattr(e, name)
            if not path or (name == "root" and path == "/"):
                continue
            fd = open_path(R.r, path, O_DIRECTORY)
            if fd < 0:
                raise RestoreError(f"cannot open the {name} {path} in process {R.pid}:"
                                   f" {os.strerror(-fd)}")
            fd = R.fresh(fd)
            fds.append(fd)
            st = os.stat(f"/proc/{R.pid}/fd/{fd}")
            ident = (getattr(e, f"{name}_dev"), getattr(e, f"{name}_inode"))
            if not stat.S_ISDIR(st.st_mode) or (ident[1] and ident != (st.st_dev, st.st_ino)):
                raise RestoreError(f"the {name} {path} is not the directory that was "
                                   "dumped; refusing to restore")
            dirs[name] = fd
        if "root" in dirs:
            R.call("fchdir", dirs["root"])
            with R.privileged():
                res = R.r.syscall("chroot", R.stage("."))
            if res < 0:
                raise RestoreError(f"cannot chroot to {e.root} in process {R.pid}:"
                                   f" {os.strerror(-res)}")
        if "cwd" in dirs:
            res = R.r.syscall("fchdir", dirs["cwd"])
            if res < 0:
                raise RestoreError(f"cannot chdir to {e.cwd} in process {R.pid}:"
                                   f" {os.strerror(-res)}")
    finally:
        for fd in fds:
            R.r.syscall("close", fd)
    R.call("umask", e.umask)
