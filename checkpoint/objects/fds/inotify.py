"""inotify instances (CRIU's fsnotify.c): every watch with its mask, re-added
by path.

dump: fdinfo "inotify wd: ino: sdev: mask: ... f_handle:" lines; the watched
inode's path is found from its file handle (open_by_handle_at on a mount of
that filesystem, as CRIU), identity (dev, inode) kept. An inode that no
longer has a path (deleted) is refused naming it; so is an instance with
events queued and not read (they cannot be put back). restore:
inotify_init1, then each watch in wd order, as the dumped user,
inotify_add_watch(path, mask | IN_DONT_FOLLOW) with its dumped wd number
(INOTIFY_IOC_SETNEXTWD, else added and removed until the kernel's counter
reaches it, the IN_IGNORED events that makes read off again), checked to
watch the dumped inode."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from ...images.pb import files_pb2
from ...kernel.syscalls import libc
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse
from .pipe import unread

IN_ALL_EVENTS = 0xFFF
IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ONESHOT = 0x0200_0000, 0x0400_0000, 0x8000_0000
USER_MASK = IN_ALL_EVENTS | IN_EXCL_UNLINK | IN_ONESHOT
INOTIFY_IOC_SETNEXTWD = 0x40044900  # _IOW('I', 0, __s32)
MAX_WD_STEPS = 1 << 16

_open_by_handle_at = libc.open_by_handle_at
_open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_open_by_handle_at.restype = ctypes.c_int


def parse_watches(text: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        if not line.startswith("inotify "):
            continue
        out.append(dict(kv.split(":", 1) for kv in line.split()[1:] if ":" in kv))
    return out


def _kdev(sdev: int) -> tuple[int, int]:
    return sdev >> 20, sdev & 0xFFFFF  # the kernel's dev_t (MINORBITS 20)


def _mount_of(pid: int, major: int, minor: int) -> str | None:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[2] == f"{major}:{minor}":
                    return fields[4]
    except OSError:
        return None
    return None


def watch_path(ctx: DumpCtx, w: dict[str, str]) -> tuple[str, os.stat_result] | None:
    """The path (as the engine sees it) of the watched inode, or None if it has none."""
    major, minor = _kdev(int(w["sdev"], 16))
    mnt = _mount_of(ctx.pid, major, minor)
    if mnt is None:
        return None
    n = int(w.get("fhandle-bytes", "0"), 16)
    raw = bytes.fromhex(w.get("f_handle", ""))
    if not n or len(raw) < n:
        return None
    handle = struct.pack("<Ii", n, int(w.get("fhandle-type", "0"), 16)) + raw[:n]
    buf = ctypes.create_string_buffer(handle, len(handle))
    # an O_PATH mount fd is refused (EBADF)
    mfd = os.open(f"/proc/{ctx.pid}/root{mnt}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_by_handle_at(mfd, buf, os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            return None  # ESTALE: deleted
    finally:
        os.close(mfd)
    try:
        st = os.fstat(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    if path.endswith(" (deleted)") or not path.startswith("/"):
        return None
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return None
    return path, st


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    e.type = files_pb2.FD_INOTIFY
    own = ctx.getfd(p.fd)
    try:
        queued = unread(own)
    finally:
        os.close(own)
    if queued:
        return refuse(e, "inotify-queued", "an inotify instance", "queued inotify events",
                      ctx.external, why=f" with {queued} bytes of events not read yet")
    for w in sorted(parse_watches(ctx.fdinfo(p.fd)), key=lambda w: int(w["wd"])):
        wd, ino = int(w["wd"]), int(w["ino"], 16)
        found = watch_path(ctx, w)
        if found is None:
            major, minor = _kdev(int(w["sdev"], 16))
            return refuse(e, "inotify-deleted", "an inotify instance",
                          "watches of deleted files", ctx.external,
                          why=f" watching inode {ino} on device {major}:{minor} (wd {wd}),"
                              " which has no path any more")
        path, st = found
        e.inotify.add(wd=wd, mask=int(w["mask"], 16) & USER_MASK, path=path, dev=st.st_dev,
                      inode=st.st_ino)
    return e


def preflight(R: RestoreCore, it: Item) -> None:
    for w in it.e.inotify:
        try:
            st = os.stat(w.path, follow_symlinks=False)
        except OSError as exc:
            raise R.fail(it, f"watched {w.path} (wd {w.wd}) is gone: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != (w.dev, w.inode):
            raise R.fail(it, f"watched {w.path} (wd {w.wd}) is not the file that was dumped"
                             f" (inode {w.inode}, now {st.st_ino})")


def restore(R: RestoreCore, it: Item) -> None:
    flags = os.O_CLOEXEC | (it.e.flags & os.O_NONBLOCK)
    fd = R.fresh(R.call("inotify_init1", flags, it=it))
    stray = False
    for w in sorted(it.e.inotify, key=lambda w: w.wd):
        stray |= _add_watch(R, it, fd, w)
    if stray:  # IN_IGNORED of the watches added and removed to reach a wd
        own = R.own_copy(fd)
        try:
            fl = fcntl.fcntl(own, fcntl.F_GETFL)
            fcntl.fcntl(own, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            try:
                while unread(own):
                    os.read(own, 65536)
            finally:
                fcntl.fcntl(own, fcntl.F_SETFL, fl)
        finally:
            os.close(own)
    _check(R, it, fd)
    R.setfl(fd, it)
    R.place(fd, it)


def _add_watch(R: RestoreCore, it: Item, fd: int, w) -> bool:
    if w.wd < 1:
        raise R.fail(it, f"image field inotify.wd: {w.wd}")
    setnext = R.r.syscall("ioctl", fd, INOTIFY_IOC_SETNEXTWD, w.wd) == 0
    stray = False
    for _ in range(MAX_WD_STEPS):
        addr = R.stage(w.path, it)
        wd = R.r.syscall("inotify_add_watch", fd, addr, (w.mask & USER_MASK) | IN_DONT_FOLLOW)
        if wd < 0:
            raise R.fail(it, f"cannot watch {w.path} again (wd {w.wd}):"
                             f" {os.strerror(-wd)}")
        if wd == w.wd:
            return stray
        if wd > w.wd or setnext:
            raise R.fail(it, f"watch of {w.path} got wd {wd}, not the dumped {w.wd}")
        R.call("inotify_rm_watch", fd, wd, it=it)
        stray = True
    raise R.fail(it, f"could not reach wd {w.wd} for {w.path}")


def _check(R: RestoreCore, it: Item, fd: int) -> None:
    with open(f"/proc/{R.pid}/fdinfo/{fd}") as f:
        got = {int(w["wd"]): int(w["ino"], 16) for w in parse_watches(f.read())}
    want = {w.wd: w.inode for w in it.e.inotify}
    if got != want:
        raise R.fail(it, f"its watches are {sorted(got.items())}, the image says"
                         f" {sorted(want.items())}")


KIND = FdKind("inotify", (files_pb2.FD_INOTIFY,), lambda p: p.kind == "inotify", dump, restore)
