"""Open files: the fd table, cwd, root and umask of a process, dumped and restored.

The room for every fd that lives in the VFS (CRIU's files-reg.c, pipes.c,
fifo.c, tty.c and memfd.c in one place):

    kind                  dump                                  restore
    regular file, dir     path, offset, flags, identity         openat + identity check + lseek
    deleted file          + content (capped)                    "ghost": temp file, open, unlink
    memfd                 name, content (capped), seals         memfd_create + fill + F_ADD_SEALS
    pipe, FIFO            unread data via tee(2), pipe size      pipe2 / open, fill, F_SETPIPE_SZ
    /dev/null & co.       path                                  reopen
    tty, pty              path, pty index                       inherit, keep placeholder's, new pair, reopen
    socket, anon inode    UnsupportedObject, or "external"      only through ``inherit``

Every detail is a typed FdEntry field (proto/files.proto, docs/image-format.md
"Files record"): ``content``, ``ghost``, ``external``/``kind``, ``pipe_size``,
``dup_of``/``same_inode_as`` (explicit presence: absent = none),
``memfd_name``/``memfd_seals``, ``pty_master``/``pty_index``. ``extra`` is
kept empty for future type-specific blobs.

Several fds of the process that share one open file description (dup, fork)
are found with kcmp(KCMP_FILE) at dump and restored with dup3, so they keep
sharing offset and flags. Several descriptions of one inode that must stay one
object (a deleted file, a memfd, the same end of a pipe) are reopened from the
first through /proc/self/fd/N in the target.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import termios
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import (CheckpointError, InjectionError, KernelFeatureError, RestoreError,
                      UnsupportedObject)
from ..freezer import FrozenProcess
from ..images.pb import files_pb2
from ..inject import Injector
from ..kernel import procfs
from ..kernel.syscalls import NR, libc, pidfd_getfd, pidfd_open, raw_syscall


FdEntry = files_pb2.FdEntry
FilesEntry = files_pb2.FilesEntry

MAX_CONTENT = 64 << 20  # deleted files, memfds and pipe buffers saved in the image
MOVE_MARGIN = 16  # placeholder fds are moved above max(image fds) + this

# <asm-generic/fcntl.h>, <linux/fcntl.h>
F_DUPFD_CLOEXEC = 1030
EFD_SEMAPHORE, EFD_CLOEXEC = 1, os.O_CLOEXEC  # <linux/eventfd.h>
SFD_CLOEXEC = os.O_CLOEXEC  # <linux/signalfd.h>
EPOLL_CLOEXEC, EPOLL_CTL_ADD = os.O_CLOEXEC, 1  # <linux/eventpoll.h>
EPOLL_USER_EVENTS = 0xF000_3FFF  # EPOLLIN..EPOLLRDHUP, EPOLLEXCLUSIVE/WAKEUP/ONESHOT/ET
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
F_ADD_SEALS = 1033
F_GET_SEALS = 1034
F_SEAL_SEAL = 0x0001
AT_FDCWD = -100
# <linux/memfd.h>
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
# <asm-generic/ioctls.h>
TIOCGPTN = 0x80045430  # _IOR('T', 0x30, unsigned int)
TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
TIOCGPTPEER = 0x5441  # _IO('T', 0x41)
# <linux/kcmp.h>
KCMP_FILE = 0
# <linux/splice.h>
SPLICE_F_NONBLOCK = 0x02

OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC  # never replayed
__O_TMPFILE, O_DIRECTORY = 0o20000000, 0o200000  # an O_TMPFILE file keeps both in fdinfo
O_TMPFILE_FLAGS = __O_TMPFILE | O_DIRECTORY  # O_TMPFILE as the C library spells it


def reopen_flags(flags: int) -> int:
    """Open flags that reopen what ``flags`` (from fdinfo) describe."""
    if flags & __O_TMPFILE:
        flags &= ~(__O_TMPFILE | O_DIRECTORY)
    return flags & ~OPEN_ONLY
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_NOATIME  # what F_SETFL may change for us
MEM_MAJOR = 1  # /dev/null, /dev/zero, /dev/full, /dev/random, /dev/urandom (drivers/char/mem.c)
MEM_MINORS_OK = {3, 5, 7, 8, 9}  # null, zero, full, random, urandom (not mem, kmem, port, kmsg)
O_NOFOLLOW = os.O_NOFOLLOW


def _is_tty_major(major: int) -> bool:
    # <linux/major.h>: TTY_MAJOR 4, TTYAUX_MAJOR 5 (/dev/tty, console, ptmx),
    # UNIX98_PTY_SLAVE_MAJOR 136..143; other serial drivers have their own
    return major in (4, 5) or 136 <= major <= 143 or major >= 188


def _fmt_name(fmt: int) -> str:
    return {stat.S_IFREG: "a regular file", stat.S_IFDIR: "a directory",
            stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device",
            stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symbolic link",
            stat.S_IFSOCK: "a socket"}.get(fmt, f"file type {fmt:#o}")


def open_path(remote: Injector, path: str, extra: int = 0) -> int:
    """openat(path, O_PATH|O_NOFOLLOW|O_CLOEXEC) injected into the target:
    an fd that opens nothing (no device, FIFO or terminal side effect) and
    is never a symlink's target; -errno on failure."""
    raw = path.encode("utf-8", "surrogateescape") + b"\0"
    if len(raw) > procfs.PAGE_SIZE:
        return -errno.ENAMETOOLONG
    remote.write(remote.scratch, raw)
    return remote.syscall("openat", AT_FDCWD, remote.scratch,
                          os.O_PATH | O_NOFOLLOW | os.O_CLOEXEC | extra, 0)

_tee = libc.tee
_tee.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
_tee.restype = ctypes.c_ssize_t


# --------------------------------------------------------------------------
# FdEntry helpers


def opt(e: FdEntry, name: str) -> int | None:
    """An ``optional`` field of ``e`` (dup_of, same_inode_as, pty_index), None if absent."""
    return getattr(e, name) if e.HasField(name) else None


def fd_keys(e: FdEntry) -> tuple[str, str]:
    """The keys ``inherit`` may name this fd by: "fdN" first, then its link."""
    return f"fd{e.fd}", e.path


# --------------------------------------------------------------------------
# dump

_KIND_NAMES = {
    "socket": ("a socket", "sockets"),
    "timerfd": ("a timerfd", "timerfds"),
    "io_uring": ("an io_uring instance", "io_uring instances"),
    "inotify": ("an inotify instance", "inotify instances"),
    "fanotify": ("a fanotify instance", "fanotify instances"),
    "pidfd": ("a pidfd", "pidfds"),
    "userfaultfd": ("a userfaultfd", "userfaultfds"),
    "chardev": ("a character device", "character devices other than ttys and /dev/null & co."),
    "other": ("a special file", "such files"),
}


@dataclass
class _DumpCtx:
    pid: int
    max_content: int
    pidfd: int = -1
    kcmp_ok: bool = True
    by_inode: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    first_of_inode: dict[tuple[int, int], int] = field(default_factory=dict)

    def fd_path(self, fd: int) -> str:
        return f"/proc/{self.pid}/fd/{fd}"

    def same_description(self, a: int, b: int) -> bool:
        if not self.kcmp_ok:
            return False
        try:
            return raw_syscall(NR["kcmp"], self.pid, self.pid, KCMP_FILE, a, b) == 0
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM):
                self.kcmp_ok = False  # no CONFIG_KCMP: every fd is its own description
                return False
            raise

    def getfd(self, fd: int) -> int:
        """Our own copy of the target's fd (the same open file description)."""
        if self.pidfd < 0:
            self.pidfd = pidfd_open(self.pid)
        return pidfd_getfd(self.pidfd, fd)


def dump_files(proc: FrozenProcess, *, external: bool = False,
               exclude_fds: Iterable[int] = frozenset(),
               max_content: int = MAX_CONTENT) -> FilesEntry:
    """The fd table, cwd, root and umask of the frozen process ``proc``.

    Nothing of the target's state changes: pipe contents are copied with
    tee(2), never read. Sockets and anonymous inodes raise UnsupportedObject,
    or with ``external`` are recorded as FD_UNKNOWN entries that the restore
    must get through ``inherit``. ``exclude_fds`` are the engine's own fds
    parked in the target."""
    pid = proc.pid
    exclude = set(exclude_fds)
    entry = FilesEntry(pid=pid)
    entry.cwd = _readlink_proc(pid, "cwd")
    entry.root = _readlink_proc(pid, "root")
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
    ctx = _DumpCtx(pid, max_content)
    try:
        for info in procfs.read_fds(pid):
            if info.fd not in exclude:
                entry.fds.append(_dump_fd(ctx, info, external))
    finally:
        if ctx.pidfd >= 0:
            os.close(ctx.pidfd)
    return entry


def _readlink_proc(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/{name}")
    except OSError as exc:
        raise procfs._proc_open_error(exc, pid, f"/proc/{pid}/{name}") from None


def _dump_fd(ctx: _DumpCtx, info: procfs.FdInfo, external: bool) -> FdEntry:
    fd, link = info.fd, info.target
    e = FdEntry(fd=fd, flags=info.flags, cloexec=bool(info.flags & os.O_CLOEXEC),
                pos=info.pos, path=link)
    try:
        st = os.stat(ctx.fd_path(fd))
    except OSError as exc:
        raise procfs._proc_open_error(exc, ctx.pid, ctx.fd_path(fd)) from None
    e.dev, e.inode, e.file_size, e.file_mtime_ns, e.mode = (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
    e.has_owner, e.uid, e.gid, e.rdev = True, st.st_uid, st.st_gid, st.st_rdev
    key = (st.st_dev, st.st_ino)
    for other in ctx.by_inode.get(key, ()):
        if ctx.same_description(other, fd):
            e.dup_of = other
            break
    ctx.by_inode.setdefault(key, []).append(fd)
    first = ctx.first_of_inode.setdefault(key, fd)
    if first != fd and not e.HasField("dup_of"):
        e.same_inode_as = first
    carries_data = first == fd  # one copy of the content per inode

    kind = _kind(link)
    if kind in ANON_KINDS:
        return _dump_anon(ctx, e, kind)
    if kind not in ("pipe", "memfd", "file"):
        return _unsupported(e, kind, external)
    if info.flags & os.O_PATH:
        e.type = files_pb2.FD_DIR if stat.S_ISDIR(st.st_mode) else files_pb2.FD_REG
    elif kind == "pipe" or stat.S_ISFIFO(st.st_mode):
        e.type = files_pb2.FD_PIPE if kind == "pipe" else files_pb2.FD_FIFO
        e.pipe_id = st.st_ino
        e.pipe_data, e.pipe_size = _peek_pipe(ctx, fd, link, carries_data)
    elif kind == "memfd":
        e.type = files_pb2.FD_MEMFD
        e.memfd_name = _memfd_name(link)
        if carries_data:
            e.content, e.memfd_seals = _read_content(ctx, fd, link, st.st_size, "memfd",
                                                     seals=True)
    elif stat.S_ISREG(st.st_mode):
        e.type = files_pb2.FD_REG
        if st.st_nlink == 0 and link.endswith(" (deleted)"):
            e.ghost = True
            if carries_data:
                e.content, _ = _read_content(ctx, fd, link, st.st_size, "deleted file")
    elif stat.S_ISDIR(st.st_mode):
        e.type = files_pb2.FD_DIR
    elif stat.S_ISBLK(st.st_mode):
        e.type = files_pb2.FD_REG
    elif stat.S_ISCHR(st.st_mode):
        if os.major(st.st_rdev) == MEM_MAJOR:
            e.type = files_pb2.FD_DEVNULL
        else:
            pty = _tty_details(ctx, fd)
            if pty is None:
                return _unsupported(e, "chardev", external)
            e.type = files_pb2.FD_TTY
            e.pty_master, index = pty
            if index is not None:
                e.pty_index = index
    else:
        return _unsupported(e, "other", external)
    return e


ANON_KINDS = {"eventfd": files_pb2.FD_EVENTFD, "signalfd": files_pb2.FD_SIGNALFD,
              "eventpoll": files_pb2.FD_EVENTPOLL}


def _fdinfo_text(ctx: _DumpCtx, fd: int) -> str:
    try:
        with open(f"/proc/{ctx.pid}/fdinfo/{fd}") as f:
            return f.read()
    except OSError as exc:
        raise procfs._proc_open_error(exc, ctx.pid, f"/proc/{ctx.pid}/fdinfo/{fd}") from None


def _dump_anon(ctx: _DumpCtx, e: FdEntry, kind: str) -> FdEntry:
    """eventfd, signalfd and epoll: their whole state is in fdinfo
    (fs/eventfd.c, fs/signalfd.c, fs/eventpoll.c show_fdinfo)."""
    e.type = ANON_KINDS[kind]
    text = _fdinfo_text(ctx, e.fd)
    if kind == "eventfd":
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key == "eventfd-count":
                e.eventfd_count = int(val.strip(), 16)
            elif key == "eventfd-semaphore":
                e.eventfd_semaphore = val.strip() == "1"
    elif kind == "signalfd":
        for line in text.splitlines():
            key, _, val = line.partition(":")
            if key == "sigmask":
                e.signalfd_mask = int(val.strip(), 16)
    else:
        for line in text.splitlines():
            if line.startswith("tfd:"):
                f = line.split()
                # tfd: N events: X data: Y  pos:P ino:I sdev:D
                e.epoll.add(tfd=int(f[1]), events=int(f[3], 16), data=int(f[5], 16))
    return e


def _kind(link: str) -> str:
    """"file" for a path, else what the link names: "pipe", "socket", "memfd",
    "eventfd" (anon_inode:[eventfd]), "pidfd" (pidfd:[N]), "net" (net:[N])..."""
    if link.startswith("/memfd:"):
        return "memfd"
    if link.startswith("/"):
        return "file"
    if link.startswith("anon_inode:"):
        return link[len("anon_inode:"):].strip("[]") or "anon_inode"
    return link.split(":", 1)[0] or "other"


def _unsupported(e: FdEntry, kind: str, external: bool) -> FdEntry:
    one, many = _KIND_NAMES.get(kind, (f"an anonymous inode ({kind})", f"{kind} fds"))
    if not external:
        raise UnsupportedObject(
            f"fd {e.fd} is {one} ({e.path}): {many} are not supported yet; pass"
            " --external-fds to leave it to the restore side (--inherit-fd)")
    e.type = files_pb2.FD_UNKNOWN
    e.external = True
    e.kind = kind
    return e


def _memfd_name(link: str) -> str:
    name = link[len("/memfd:"):]
    return name[:-len(" (deleted)")] if name.endswith(" (deleted)") else name


def _read_content(ctx: _DumpCtx, fd: int, link: str, size: int, what: str,
                  seals: bool = False) -> tuple[bytes, int]:
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


def _peek_pipe(ctx: _DumpCtx, fd: int, link: str, want_data: bool) -> tuple[bytes, int]:
    """Unread content and size of the pipe behind ``fd`` without consuming it:
    a read end of our own (opening /proc/PID/fd/N of a pipe or FIFO joins
    the same pipe) is tee(2)'d into a private pipe of the same capacity."""
    rfd = os.open(ctx.fd_path(fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(rfd, F_GETPIPE_SZ)
        if not want_data:
            return b"", size
        n = _unread(rfd)
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


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe behind ``fd`` (either end)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def _tty_details(ctx: _DumpCtx, fd: int) -> tuple[bool, int | None] | None:
    """(pty master?, pty index or None) for a tty, None for another char device."""
    own = ctx.getfd(fd)
    try:
        if not os.isatty(own):
            return None
        try:
            idx = struct.unpack("I", fcntl.ioctl(own, TIOCGPTN, b"\0" * 4))[0]
            return True, idx
        except OSError:
            pass  # not a pty master
    finally:
        os.close(own)
    link = os.readlink(ctx.fd_path(fd))
    if link.startswith("/dev/pts/") and link[len("/dev/pts/"):].isdigit():
        return False, int(link[len("/dev/pts/"):])
    return False, None


# --------------------------------------------------------------------------
# restore


def restore_files(remote: Injector, entry: FilesEntry, *,
                  inherit: dict[str, int] | None = None, ghost_dir: str = "/tmp",
                  keep: Iterable[int] = (), privs=None) -> None:
    """Give the frozen placeholder behind ``remote`` the fd table, cwd, root and
    umask of ``entry``.

    ``inherit`` maps a key ("fdN", or a saved link such as "/dev/pts/3",
    "pipe:[1234]", "socket:[99]") to an fd already open in the placeholder
    that stands in for the dumped one (CRIU's --inherit-fd). ``keep`` are
    placeholder fds left open and untouched (they must not collide with the
    image). Every other placeholder fd is closed at the end. Deleted files
    are rebuilt as nameless files (O_TMPFILE) in ``ghost_dir``.

    Every path of the image is opened by the placeholder itself, with the
    credentials it has: the restorer runs this with the dumped process's
    (``privs``, a process.Privs, raises them back only for chroot). Each
    path is first opened O_PATH|O_NOFOLLOW, which opens nothing, and its
    type, identity and device number are checked against the image before
    the real open (through /proc/self/fd/N, the same inode). What the
    engine itself writes (pipe data, memfd and ghost content) goes through
    its own copy of the placeholder's fd (pidfd_getfd), never a path, and
    only after checking that it is a pipe, a memfd, a nameless file."""
    _Restorer(remote, entry, dict(inherit or {}), ghost_dir, set(keep), privs).run()


@dataclass
class _Item:
    e: FdEntry

    @property
    def fd(self) -> int:
        return self.e.fd

    @property
    def dup_of(self) -> int | None:
        return opt(self.e, "dup_of")

    @property
    def same_inode_as(self) -> int | None:
        return opt(self.e, "same_inode_as")

    @property
    def pty_index(self) -> int | None:
        return opt(self.e, "pty_index")


class _Restorer:
    def __init__(self, remote: Injector, entry: FilesEntry, inherit: dict[str, int],
                 ghost_dir: str, keep: set[int], privs=None):
        self.r = remote
        self.privs = privs
        self.pid = remote.proc.pid
        self.entry = entry
        self.inherit = inherit
        self.ghost_dir = ghost_dir
        self.keep = keep
        self.items = [_Item(e) for e in entry.fds]
        self.by_fd = {it.fd: it for it in self.items}
        self.needed = set(self.by_fd)
        self.base = max(self.needed | keep | {0}) + MOVE_MARGIN
        self.moved: dict[int, int] = {}  # placeholder fd -> where it was moved
        self.placed: set[int] = set()
        self.pty_new_index: dict[int, int] = {}  # dumped pty index -> restored master fd
        self.original: set[int] = set()

    # -- helpers -------------------------------------------------------------

    def fail(self, it: _Item, what: str) -> RestoreError:
        return RestoreError(f"fd {it.fd} ({it.e.path}): {what}")

    def stage(self, text: str, it: _Item | None = None) -> int:
        raw = text.encode("utf-8", "surrogateescape") + b"\0"
        if len(raw) > procfs.PAGE_SIZE:
            what = f"path of {len(raw) - 1} bytes is longer than {procfs.PAGE_SIZE - 1}"
            raise self.fail(it, what) if it else RestoreError(f"{text[:80]}...: {what}")
        self.r.write(self.r.scratch, raw)
        return self.r.scratch

    def call(self, name: str, *args: int, it: _Item | None = None) -> int:
        try:
            return self.r.call(name, *args)
        except InjectionError as exc:
            if it is None or exc.errno is None:
                raise
            raise self.fail(it, f"{name} failed in process {self.pid}:"
                                f" {os.strerror(exc.errno)}") from None

    def placeholder_fds(self) -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}

    def inherited_source(self, it: _Item) -> int | None:
        for key in fd_keys(it.e):
            if key in self.inherit:
                src = self.inherit[key]
                return self.moved.get(src, src)
        return None

    def fresh(self, tmp: int) -> int:
        """A temporary fd that lives while other fds are made and placed (pipe
        ends, the FIFO helper, a memfd being reopened) goes above ``base``
        if it sits on a number the image needs, so no dup3 can land on it
        (pitfall 20). A lone temporary needs no move: it is dup3'ed to its
        number and closed before the next fd is made."""
        if tmp < self.base and tmp in self.needed:
            new = self.dupfd_high(tmp)
            self.call("close", tmp)
            return new
        return tmp

    def dupfd_high(self, fd: int) -> int:
        res = self.r.syscall("fcntl", fd, F_DUPFD_CLOEXEC, self.base)
        if res == -errno.EINVAL:  # base above RLIMIT_NOFILE: any free number above the image
            res = self.r.syscall("fcntl", fd, F_DUPFD_CLOEXEC, max(self.needed | {0}) + 1)
        if res < 0:
            raise RestoreError(f"cannot move fd {fd} of placeholder {self.pid} above the"
                               f" image's fds: {os.strerror(-res)}")
        return res

    def place(self, tmp: int, it: _Item, close_tmp: bool = True) -> None:
        """Put the fd ``tmp`` at its dumped number with its dumped close-on-exec."""
        e = it.e
        if tmp == e.fd:
            self.call("fcntl", tmp, fcntl.F_SETFD, fcntl.FD_CLOEXEC if e.cloexec else 0)
        else:
            self.call("dup3", tmp, e.fd, os.O_CLOEXEC if e.cloexec else 0)
            if close_tmp:
                self.call("close", tmp)
        self.placed.add(e.fd)

    def setfl(self, fd: int, it: _Item, current: int) -> None:
        want = it.e.flags & SETFL_MASK
        if want != current & SETFL_MASK:  # O_DIRECT kept as created (pipes refuse F_SETFL of it)
            self.call("fcntl", fd, fcntl.F_SETFL, want | (current & os.O_DIRECT), it=it)

    def openat(self, path: str, flags: int, it: _Item) -> int:
        """Reopen ``/proc/self/fd/N`` (an fd the placeholder already holds);
        O_NOFOLLOW, kept in f_flags of the dumped fd, would refuse the magic
        link itself."""
        addr = self.stage(path, it)
        res = self.r.syscall("openat", AT_FDCWD, addr,
                             (reopen_flags(flags) & ~O_NOFOLLOW) | os.O_CLOEXEC, 0)
        if res < 0:
            raise self.fail(it, f"cannot open {path} in process {self.pid}: {os.strerror(-res)}")
        return res

    def open_image_path(self, it: _Item, flags: int, path: str | None = None) -> int:
        """Open a path the image names, as the placeholder (with its current,
        normally the dumped, credentials): O_PATH|O_NOFOLLOW first, check
        the object (check_object), then the real open through the O_PATH
        fd, so nothing is opened that is not what the image says."""
        path = it.e.path if path is None else path
        self.stage_len_ok(it)
        pfd = open_path(self.r, path)
        if pfd < 0:
            raise self.fail(it, f"cannot open {path} in process {self.pid}: {os.strerror(-pfd)}")
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{pfd}")
            if flags & os.O_PATH and flags & O_NOFOLLOW and stat.S_ISLNK(st.st_mode):
                self.check_identity(it, st)  # an O_PATH fd on the symlink itself
                return self.fresh(pfd)
            self.check_object(it, st)
            fd = self.openat(f"/proc/self/fd/{pfd}", flags, it)
        except BaseException:
            self.r.syscall("close", pfd)
            raise
        self.call("close", pfd)
        return fd

    def check_object(self, it: _Item, st: os.stat_result) -> None:
        """What was opened must be what the image says: its file type (a FIFO
        entry a FIFO, a device a device of the recorded number...) and, for
        files, directories and FIFOs, the dumped inode."""
        e, t = it.e, it.e.type
        fmt = stat.S_IFMT(st.st_mode)
        want = {files_pb2.FD_REG: (stat.S_IFREG, stat.S_IFBLK), files_pb2.FD_DIR: (stat.S_IFDIR,),
                files_pb2.FD_FIFO: (stat.S_IFIFO,), files_pb2.FD_DEVNULL: (stat.S_IFCHR,),
                files_pb2.FD_TTY: (stat.S_IFCHR,)}.get(t)
        if want is None:
            raise self.fail(it, f"{files_pb2.FdType.Name(t)} is not opened by path")
        if fmt not in want or (e.mode and t != files_pb2.FD_TTY
                               and stat.S_IFMT(e.mode) != fmt):
            raise self.fail(it, f"{e.path} is {_fmt_name(fmt)}, the image says "
                                f"{files_pb2.FdType.Name(t)}"
                                f"{' (' + _fmt_name(stat.S_IFMT(e.mode)) + ')' if e.mode else ''}"
                                "; refusing to open it")
        if t in (files_pb2.FD_REG, files_pb2.FD_DIR, files_pb2.FD_FIFO):
            self.check_identity(it, st)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and e.has_owner and st.st_rdev != e.rdev:
            raise self.fail(it, f"{e.path} is device {os.major(st.st_rdev)}:"
                                f"{os.minor(st.st_rdev)}, the image says {os.major(e.rdev)}:"
                                f"{os.minor(e.rdev)}")
        if t == files_pb2.FD_DEVNULL and (os.major(st.st_rdev) != MEM_MAJOR
                                          or os.minor(st.st_rdev) not in MEM_MINORS_OK):
            raise self.fail(it, f"{e.path} (device {os.major(st.st_rdev)}:"
                                f"{os.minor(st.st_rdev)}) is not /dev/null, zero, full, random "
                                "or urandom")
        if t == files_pb2.FD_TTY and not _is_tty_major(os.major(st.st_rdev)):
            raise self.fail(it, f"{e.path} (device {os.major(st.st_rdev)}:"
                                f"{os.minor(st.st_rdev)}) is not a terminal")

    def own_copy(self, fd: int) -> int:
        """The engine's own duplicate of the placeholder's fd ``fd``: the
        very open file, reached without any path."""
        pidfd = pidfd_open(self.pid)
        try:
            return pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)

    def lseek(self, fd: int, it: _Item, strict: bool = True) -> None:
        if it.e.pos and not it.e.flags & os.O_PATH:
            res = self.r.syscall("lseek", fd, it.e.pos, os.SEEK_SET)
            if res < 0 and strict:
                raise self.fail(it, f"cannot seek to {it.e.pos}: {os.strerror(-res)}")

    # -- the plan ------------------------------------------------------------

    def run(self) -> None:
        self.preflight()
        self.make_room()
        later: list[_Item] = []
        dups: list[_Item] = []
        done_pipes: set[tuple[int, int]] = set()
        for it in sorted(self.items, key=lambda i: i.fd):
            src = self.inherited_source(it)
            if src is not None:
                self.place(src, it, close_tmp=False)
            elif it.dup_of is not None:
                dups.append(it)
            elif it.same_inode_as is not None or self.is_pty_peer(it):
                later.append(it)
            elif it.e.type in (files_pb2.FD_PIPE, files_pb2.FD_FIFO):
                key = (it.e.dev, it.e.pipe_id)
                if key not in done_pipes:
                    done_pipes.add(key)
                    self.restore_pipe(it)
            else:
                self.restore_one(it)
        later.sort(key=lambda i: (not i.e.pty_master, i.fd))  # masters, then peers
        for it in later:
            if it.fd not in self.placed:
                self.restore_one(it)
        for it in dups:
            self.restore_dup(it)
        for it in self.items:
            if it.e.type == files_pb2.FD_EVENTPOLL and it.dup_of is None:
                self.restore_epoll_targets(it)
        self.restore_fs()
        self.close_others()

    def preflight(self) -> None:
        """Refuse what cannot work before touching the placeholder."""
        have = self.placeholder_fds()
        self.original = have
        for key, src in self.inherit.items():
            if src not in have:
                raise RestoreError(f"inherit: fd {src} given for {key!r} is not open in"
                                   f" placeholder {self.pid}")
        clash = self.keep & self.needed
        if clash:
            raise RestoreError(f"fds {sorted(clash)} of placeholder {self.pid} are to be kept"
                               " but the image has fds with those numbers")
        for it in self.items:
            if self.inherited_source(it) is not None:
                continue
            if it.e.external and it.dup_of is None:
                raise self.fail(it, "was left external at dump; give it with inherit"
                                    f" (--inherit-fd fd[N]:{it.e.path} or fd{it.fd})")
            if it.e.type in (files_pb2.FD_REG, files_pb2.FD_DIR, files_pb2.FD_FIFO) \
                    and not it.e.ghost and it.dup_of is None:
                self.stage_len_ok(it)
                try:
                    st = os.stat(it.e.path, follow_symlinks=False)
                except OSError as exc:
                    raise self.fail(it, f"cannot be reopened: {exc.strerror}") from None
                self.check_identity(it, st)

    def stage_len_ok(self, it: _Item) -> None:
        if len(it.e.path.encode("utf-8", "surrogateescape")) >= procfs.PAGE_SIZE:
            raise self.fail(it, f"path longer than {procfs.PAGE_SIZE - 1} bytes")

    def check_identity(self, it: _Item, st: os.stat_result) -> None:
        e = it.e
        if (st.st_dev, st.st_ino) != (e.dev, e.inode):
            raise self.fail(it, f"{e.path} is not the file that was dumped: dumped dev"
                                f" {os.major(e.dev)}:{os.minor(e.dev)} inode {e.inode}, now"
                                f" dev {os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                                f" inode {st.st_ino}")
        if stat.S_ISREG(st.st_mode) and st.st_size < e.pos:
            raise self.fail(it, f"{e.path} shrank: {st.st_size} bytes now, less than the"
                                f" saved offset {e.pos}")

    def make_room(self) -> None:
        """Move every placeholder fd sitting on a number the image needs."""
        for fd in sorted(self.original & self.needed):
            new = self.dupfd_high(fd)
            self.call("close", fd)
            self.moved[fd] = new

    def is_pty_peer(self, it: _Item) -> bool:
        idx = it.pty_index
        return (it.e.type == files_pb2.FD_TTY and not it.e.pty_master
                and idx is not None and any(o.e.pty_master and o.pty_index == idx
                                            for o in self.items))

    # -- one kind each -------------------------------------------------------

    def restore_one(self, it: _Item) -> None:
        t = it.e.type
        if it.same_inode_as is not None and t in (files_pb2.FD_REG, files_pb2.FD_MEMFD) \
                and (it.e.ghost or t == files_pb2.FD_MEMFD):
            return self.reopen_sibling(it)
        if t == files_pb2.FD_REG and it.e.ghost:
            return self.restore_ghost(it)
        if t in (files_pb2.FD_REG, files_pb2.FD_DIR):
            fd = self.open_image_path(it, it.e.flags)
            self.lseek(fd, it, strict=t == files_pb2.FD_REG)
            return self.place(fd, it)
        if t == files_pb2.FD_MEMFD:
            return self.restore_memfd(it)
        if t == files_pb2.FD_DEVNULL:
            return self.place(self.open_image_path(it, it.e.flags), it)
        if t == files_pb2.FD_TTY:
            return self.restore_tty(it)
        if t == files_pb2.FD_EVENTFD:
            if it.e.eventfd_count > 0xFFFF_FFFF:
                raise self.fail(it, f"eventfd count {it.e.eventfd_count} does not fit eventfd2")
            flags = EFD_CLOEXEC | (it.e.flags & os.O_NONBLOCK) | \
                (EFD_SEMAPHORE if it.e.eventfd_semaphore else 0)
            return self.place(self.fresh(self.call("eventfd2", it.e.eventfd_count, flags,
                                                   it=it)), it)
        if t == files_pb2.FD_SIGNALFD:
            self.r.write(self.r.scratch, struct.pack("<Q", it.e.signalfd_mask))
            flags = SFD_CLOEXEC | (it.e.flags & os.O_NONBLOCK)
            return self.place(self.fresh(self.call("signalfd4", -1, self.r.scratch, 8, flags,
                                                   it=it)), it)
        if t == files_pb2.FD_EVENTPOLL:  # its registrations come once every fd is back
            return self.place(self.fresh(self.call("epoll_create1", EPOLL_CLOEXEC, it=it)), it)
        if t in (files_pb2.FD_PIPE, files_pb2.FD_FIFO):  # a second end of a FIFO/pipe
            return self.reopen_sibling(it)
        raise self.fail(it, f"cannot restore fds of type {files_pb2.FdType.Name(t)}")

    def restore_epoll_targets(self, it: _Item) -> None:
        for t in it.e.epoll:
            # struct epoll_event is packed on x86_64: u32 events, u64 data
            self.r.write(self.r.scratch, struct.pack("<IQ", t.events & EPOLL_USER_EVENTS, t.data))
            res = self.r.syscall("epoll_ctl", it.fd, EPOLL_CTL_ADD, t.tfd, self.r.scratch)
            if res < 0:
                raise self.fail(it, f"epoll_ctl(ADD, fd {t.tfd}) failed: {os.strerror(-res)}")

    def reopen_sibling(self, it: _Item) -> None:
        """Another open file description of an inode already restored."""
        first = it.same_inode_as
        if first is None or first not in self.placed:
            raise self.fail(it, f"its inode was to be restored with fd {first}, which was not")
        fd = self.openat(f"/proc/self/fd/{first}", it.e.flags, it)
        self.lseek(fd, it)
        self.place(fd, it)

    def restore_dup(self, it: _Item) -> None:
        src = it.dup_of
        if src not in self.placed:
            raise self.fail(it, f"is a dup of fd {src}, which was not restored")
        self.call("dup3", src, it.fd, os.O_CLOEXEC if it.e.cloexec else 0, it=it)
        self.placed.add(it.fd)

    def restore_ghost(self, it: _Item) -> None:
        """A deleted file: made by the placeholder as a nameless file
        (O_TMPFILE, so a dying restore leaves no name behind) with its
        credentials (so it belongs to the dumped fsuid/fsgid), filled by the
        engine through its own copy of that fd, given the dumped owner where
        the placeholder may (fchown: CAP_CHOWN) and the dumped mode, minus
        set-uid/set-gid when the owner is not the dumped one."""
        e = it.e
        addr = self.stage(self.ghost_dir, it)
        tfd = self.r.syscall("openat", AT_FDCWD, addr, O_TMPFILE_FLAGS | os.O_RDWR
                             | os.O_CLOEXEC, 0o600)
        if tfd < 0:
            raise self.fail(it, f"cannot create a nameless file in {self.ghost_dir} for the "
                                f"deleted file: {os.strerror(-tfd)}")
        tfd = self.fresh(tfd)
        try:
            own = self.own_copy(tfd)
            try:
                st = os.fstat(own)
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
                    raise self.fail(it, "the placeholder's O_TMPFILE fd is not a nameless file")
                view = memoryview(e.content)
                off = 0
                while off < len(view):
                    off += os.pwrite(own, view[off:], off)
            finally:
                os.close(own)
            fd = self.openat(f"/proc/self/fd/{tfd}", e.flags, it)  # while it is 0600 and ours
            st = os.stat(f"/proc/{self.pid}/fd/{tfd}")
            if e.has_owner and (st.st_uid, st.st_gid) != (e.uid, e.gid):
                self.r.syscall("fchown", tfd, e.uid, e.gid)  # EPERM: stays the creator's
                st = os.stat(f"/proc/{self.pid}/fd/{tfd}")
            mode = stat.S_IMODE(e.mode) or 0o600
            if not e.has_owner or st.st_uid != e.uid:
                mode &= ~stat.S_ISUID
            if not e.has_owner or st.st_gid != e.gid:
                mode &= ~stat.S_ISGID
            res = self.r.syscall("fchmod", tfd, mode)
            if res < 0 and mode & (stat.S_ISUID | stat.S_ISGID):
                self.r.syscall("fchmod", tfd, mode & ~(stat.S_ISUID | stat.S_ISGID))
            st = os.stat(f"/proc/{self.pid}/fd/{tfd}")
            if (st.st_mode & stat.S_ISUID and (not e.has_owner or st.st_uid != e.uid)) or \
                    (st.st_mode & stat.S_ISGID and (not e.has_owner or st.st_gid != e.gid)):
                self.call("close", fd)
                raise self.fail(it, "the recreated deleted file kept set-uid/set-gid bits for "
                                    f"owner {st.st_uid}:{st.st_gid}, not the dumped owner")
        finally:
            self.r.syscall("close", tfd)
        self.lseek(fd, it)
        self.place(fd, it)

    def restore_memfd(self, it: _Item) -> None:
        name = it.e.memfd_name
        addr = self.stage(name[:249], it)
        fd = self.fresh(self.call("memfd_create", addr, MFD_CLOEXEC | MFD_ALLOW_SEALING, it=it))
        if it.e.content or it.e.file_size:
            wfd = self.own_copy(fd)
            try:
                if not os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("/memfd:") or \
                        not stat.S_ISREG(os.fstat(wfd).st_mode):
                    raise self.fail(it, "the placeholder's memfd_create fd is no memfd")
                os.pwrite(wfd, it.e.content, 0)
                os.ftruncate(wfd, it.e.file_size)
            finally:
                os.close(wfd)
        if it.e.memfd_seals:
            self.call("fcntl", fd, F_ADD_SEALS, it.e.memfd_seals, it=it)
        mode = it.e.flags & os.O_ACCMODE
        if mode != os.O_RDWR:  # memfd_create gives O_RDWR: reopen with the saved mode
            fd2 = self.openat(f"/proc/self/fd/{fd}", it.e.flags, it)
            self.call("close", fd)
            fd = fd2
        else:
            self.setfl(fd, it, os.O_RDWR)
        self.lseek(fd, it)
        self.place(fd, it)

    def restore_pipe(self, it: _Item) -> None:
        """The first fd of a pipe (or FIFO) makes the pipe; its other ends,
        other descriptions and its content come with it."""
        key = (it.e.dev, it.e.pipe_id)
        group = [o for o in self.items if (o.e.dev, o.e.pipe_id) == key
                 and o.e.type == it.e.type and o.dup_of is None
                 and self.inherited_source(o) is None]
        data = next((o.e.pipe_data for o in group if o.e.pipe_data), b"")
        size = next((o.e.pipe_size for o in group if o.e.pipe_size), 0)
        if it.e.type == files_pb2.FD_PIPE:
            addr = self.r.scratch
            created = os.O_DIRECT if any(o.e.flags & os.O_DIRECT for o in group) else 0
            self.call("pipe2", addr, os.O_CLOEXEC | created, it=it)  # O_DIRECT: packet mode
            rd, wr = struct.unpack("ii", self.r.read(addr, 8))
            ends = {os.O_RDONLY: self.fresh(rd), os.O_WRONLY: self.fresh(wr)}
        else:
            # a FIFO: an O_RDWR helper never blocks and lets the real opens not block
            helper = self.fresh(self.open_image_path(it, os.O_RDWR | os.O_NONBLOCK))
            ends = {os.O_RDONLY: helper, os.O_WRONLY: helper}
            created = 0
        self.fill_pipe(ends[os.O_WRONLY], it, data, size)
        used: set[int] = set()
        for o in group:
            mode = o.e.flags & os.O_ACCMODE
            if o.e.type == files_pb2.FD_FIFO:  # the helper keeps this open from blocking
                self.place(self.open_image_path(o, o.e.flags), o)
                continue
            src = ends.get(mode)
            if src is None:
                raise self.fail(o, f"pipe end with access mode {mode} cannot be restored")
            if src in used:  # another description of the same end
                self.place(self.openat(f"/proc/self/fd/{src}", o.e.flags, o), o)
                continue
            used.add(src)
            self.setfl(src, o, created)
            self.place(src, o, close_tmp=False)
        for fd in set(ends.values()):
            if fd not in self.placed:
                self.call("close", fd)  # an end the process did not hold, or the helper

    def fill_pipe(self, wr: int, it: _Item, data: bytes, size: int) -> None:
        if not data and not size:
            return
        wfd = self.own_copy(wr)  # the very pipe the placeholder holds, no path
        restore_fl = None
        try:
            st = os.fstat(wfd)
            if not stat.S_ISFIFO(st.st_mode) or (it.e.type == files_pb2.FD_FIFO and (
                    st.st_dev, st.st_ino) != (it.e.dev, it.e.inode)):
                raise self.fail(it, "the fd to fill is not the dumped pipe or FIFO")
            fl = fcntl.fcntl(wfd, fcntl.F_GETFL)
            if fl & os.O_ACCMODE == os.O_RDONLY:
                raise self.fail(it, "the fd to fill is a read end")
            if not fl & os.O_NONBLOCK:  # the copy shares the description: put back below
                fcntl.fcntl(wfd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
                restore_fl = fl
            if it.e.type == files_pb2.FD_FIFO and _unread(wfd):
                return  # the FIFO lives on (a peer holds it): its content is its own
            if size and fcntl.fcntl(wfd, F_GETPIPE_SZ) != size:
                try:
                    fcntl.fcntl(wfd, F_SETPIPE_SZ, size)
                except OSError as exc:
                    if len(data) > fcntl.fcntl(wfd, F_GETPIPE_SZ):
                        raise self.fail(it, f"cannot set the pipe size to {size}:"
                                            f" {exc.strerror}") from None
            view = memoryview(data)
            while view:
                n = os.write(wfd, view)
                view = view[n:]
        except BlockingIOError:
            raise self.fail(it, f"the pipe took only part of its {len(data)} saved bytes"
                                " (a FIFO with data already in it?)") from None
        finally:
            if restore_fl is not None:
                fcntl.fcntl(wfd, fcntl.F_SETFL, restore_fl)
            os.close(wfd)

    def restore_tty(self, it: _Item) -> None:
        e = it.e
        if e.pty_master:
            fd = self.open_image_path(it, e.flags | os.O_NOCTTY)
            scratch = self.r.scratch
            self.r.write(scratch, b"\0\0\0\0")
            self.call("ioctl", fd, TIOCSPTLCK, scratch, it=it)
            if it.pty_index is not None:
                self.pty_new_index[it.pty_index] = e.fd
            return self.place(fd, it)
        idx = it.pty_index
        if idx is not None and idx in self.pty_new_index:  # the slave of a master restored above
            master = self.pty_new_index[idx]
            flags = reopen_flags(e.flags) | os.O_NOCTTY | os.O_CLOEXEC
            fd = self.fresh(self.call("ioctl", master, TIOCGPTPEER, flags, it=it))
            return self.place(fd, it)
        if e.fd in self.original and self.placeholder_is_tty(self.moved.get(e.fd, e.fd)):
            return self.place(self.moved.get(e.fd, e.fd), it, close_tmp=False)
        self.place(self.open_image_path(it, e.flags | os.O_NOCTTY), it)

    def placeholder_is_tty(self, fd: int) -> bool:
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{fd}")
        except OSError:
            return False
        if not stat.S_ISCHR(st.st_mode):
            return False
        pidfd = pidfd_open(self.pid)
        try:
            own = pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        try:
            return os.isatty(own)
        finally:
            os.close(own)

    def restore_fs(self) -> None:
        """cwd and root: each opened O_PATH|O_DIRECTORY|O_NOFOLLOW with the
        placeholder's (the dumped) credentials and checked to be the dumped
        directory; fchdir to them (search permission checked as the dumped
        process); chroot(".") is the one step with the restorer's privilege
        (CAP_SYS_CHROOT: confining is no grant)."""
        e = self.entry
        if e.umask > 0o777:
            raise RestoreError(f"image field files.umask: {e.umask:#o}; refusing to restore")
        fds = []
        try:
            dirs = {}
            for name in ("root", "cwd"):
                path = getattr(e, name)
                if not path or (name == "root" and path == "/"):
                    continue
                fd = open_path(self.r, path, O_DIRECTORY)
                if fd < 0:
                    raise RestoreError(f"cannot open the {name} {path} in process {self.pid}:"
                                       f" {os.strerror(-fd)}")
                fd = self.fresh(fd)
                fds.append(fd)
                st = os.stat(f"/proc/{self.pid}/fd/{fd}")
                ident = (getattr(e, f"{name}_dev"), getattr(e, f"{name}_inode"))
                if not stat.S_ISDIR(st.st_mode) or (ident[1] and ident != (st.st_dev,
                                                                            st.st_ino)):
                    raise RestoreError(f"the {name} {path} is not the directory that was "
                                       "dumped; refusing to restore")
                dirs[name] = fd
            if "root" in dirs:
                self.call("fchdir", dirs["root"])
                with self.privileged():
                    res = self.r.syscall("chroot", self.stage("."))
                if res < 0:
                    raise RestoreError(f"cannot chroot to {e.root} in process {self.pid}:"
                                       f" {os.strerror(-res)}")
            if "cwd" in dirs:
                res = self.r.syscall("fchdir", dirs["cwd"])
                if res < 0:
                    raise RestoreError(f"cannot chdir to {e.cwd} in process {self.pid}:"
                                       f" {os.strerror(-res)}")
        finally:
            for fd in fds:
                self.r.syscall("close", fd)
        self.call("umask", e.umask)

    def privileged(self):
        from contextlib import nullcontext
        return self.privs.privileged() if self.privs is not None else nullcontext()

    def close_others(self) -> None:
        for fd in sorted(self.placeholder_fds() - self.needed - self.keep):
            self.call("close", fd)
