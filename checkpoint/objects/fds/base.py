"""What every fd kind shares: constants, the dump context and probe, the
restore engine's helpers, and the registration type (``FdKind``).

A kind module (regfile.py, pipe.py, ...) holds the dump and the restore of
one kind of fd and exports ``KIND = FdKind(...)``; ``fds/__init__.py``
lists them in one table. The dump asks each kind in table order whether it
``claims`` the fd; the restore dispatches on ``FdEntry.type``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from ...errors import InjectionError, RestoreError, UnsupportedObject
from ...images.pb import files_pb2
from ...inject import Injector
from ...kernel import procfs
from ...kernel.syscalls import NR, pidfd_getfd, pidfd_open, raw_syscall

FdEntry = files_pb2.FdEntry
FilesEntry = files_pb2.FilesEntry

MAX_CONTENT = 64 << 20  # deleted files, memfds and pipe buffers saved in the image
MOVE_MARGIN = 16  # placeholder fds are moved above max(image fds) + this

# <asm-generic/fcntl.h>, <linux/fcntl.h>
F_DUPFD_CLOEXEC = 1030
AT_FDCWD = -100
# <linux/kcmp.h>
KCMP_FILE, KCMP_EPOLL_TFD = 0, 7

OPEN_ONLY = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_CLOEXEC  # never replayed
__O_TMPFILE, O_DIRECTORY = 0o20000000, 0o200000  # an O_TMPFILE file keeps both in fdinfo
O_TMPFILE_FLAGS = __O_TMPFILE | O_DIRECTORY  # O_TMPFILE as the C library spells it
O_NOFOLLOW = os.O_NOFOLLOW
O_ASYNC = 0o20000
# what F_SETFL may change (fs/fcntl.c SETFL_MASK); O_DIRECT is kept as created
# (pipes refuse F_SETFL of it)
SETFL_MASK = os.O_APPEND | os.O_NONBLOCK | os.O_NOATIME | O_ASYNC


def reopen_flags(flags: int) -> int:
    """Open flags that reopen what ``flags`` (from fdinfo) describe."""
    if flags & __O_TMPFILE:
        flags &= ~(__O_TMPFILE | O_DIRECTORY)
    return flags & ~OPEN_ONLY


def fmt_name(fmt: int) -> str:
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


def opt(e: FdEntry, name: str) -> int | None:
    """An ``optional`` field of ``e`` (dup_of, same_inode_as, pty_index), None if absent."""
    return getattr(e, name) if e.HasField(name) else None


def fd_keys(e: FdEntry) -> tuple[str, str]:
    """The keys ``inherit`` may name this fd by: "fdN" first, then its link."""
    return f"fd{e.fd}", e.path


def link_kind(link: str) -> str:
    """"file" for a path, else what the link names: "pipe", "socket", "memfd",
    "eventfd" (anon_inode:[eventfd]), "pidfd" (anon_inode:[pidfd] or
    pidfd:[N]), "net" (net:[N])..."""
    if link.startswith("/memfd:"):
        return "memfd"
    if link.startswith("/"):
        return "file"
    if link.startswith("anon_inode:"):
        return link[len("anon_inode:"):].strip("[]") or "anon_inode"
    return link.split(":", 1)[0] or "other"


def fdinfo_fields(text: str) -> dict[str, str]:
    """"key: value" lines of an fdinfo text (the first of each key)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        out.setdefault(key.strip(), val.strip())
    return out


# --------------------------------------------------------------------------
# dump


@dataclass
class DumpCtx:
    """One dump of one process's fd table. ``options``: the dump's switches
    a kind may need ("file_locks", "external")."""
    pid: int
    max_content: int
    external: bool = False
    file_locks: bool = False
    tids: tuple[int, ...] = ()
    pidfd: int = -1
    kcmp_ok: bool = True
    tcp: object = None   # tcpsk.Connections of the round (--tcp-established/--tcp-close)
    by_inode: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    first_of_inode: dict[tuple[int, int], int] = field(default_factory=dict)
    entries: dict[int, FdEntry] = field(default_factory=dict)  # fd -> entry, in fd order

    def fd_path(self, fd: int) -> str:
        return f"/proc/{self.pid}/fd/{fd}"

    def kcmp(self, kind: int, a: int, b: int) -> int | None:
        """kcmp(pid, pid, kind, a, b): 0 equal, else 1/2/3; None without CONFIG_KCMP."""
        if not self.kcmp_ok:
            return None
        try:
            return raw_syscall(NR["kcmp"], self.pid, self.pid, kind, a, b)
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EPERM):
                self.kcmp_ok = False
                return None
            raise

    def same_description(self, a: int, b: int) -> bool:
        return self.kcmp(KCMP_FILE, a, b) == 0  # no CONFIG_KCMP: each fd its own description

    def getfd(self, fd: int) -> int:
        """Our own copy of the target's fd (the same open file description)."""
        if self.pidfd < 0:
            self.pidfd = pidfd_open(self.pid)
        return pidfd_getfd(self.pidfd, fd)

    def fdinfo(self, fd: int) -> str:
        try:
            with open(f"/proc/{self.pid}/fdinfo/{fd}") as f:
                return f.read()
        except OSError as exc:
            raise procfs._proc_open_error(exc, self.pid, f"/proc/{self.pid}/fdinfo/{fd}") \
                from None


@dataclass
class Probe:
    """What the dump knows of one fd before a kind claims it."""
    fd: int
    link: str
    kind: str                    # link_kind(link)
    flags: int
    st: os.stat_result
    e: FdEntry                   # filled so far: fd, flags, pos, path, identity, dup/same-inode
    carries_data: bool           # the first fd of its inode: holds the content


def refuse(e: FdEntry, kind: str, what: str, many: str, external: bool,
           why: str = "") -> FdEntry:
    """The one line a refused fd gets: ``fd N is WHAT (LINK): MANY are not
    supported yet; pass --external-fds ...``; with ``external`` the fd is
    recorded as external instead: an FD_UNKNOWN entry that the restore must
    be given (--inherit-fd)."""
    if not external:
        raise UnsupportedObject(
            f"fd {e.fd} is {what} ({e.path}){why}: {many} are not supported yet; pass"
            " --external-fds to leave it to the restore side (--inherit-fd)")
    for name in ("epoll", "inotify", "timerfd", "tty", "procfs", "locks", "content",
                 "pipe_data", "memfd_name", "memfd_seals"):
        e.ClearField(name)
    e.type = files_pb2.FD_UNKNOWN
    e.external = True
    e.kind = kind
    return e


# --------------------------------------------------------------------------
# restore


@dataclass
class Item:
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


class RestoreCore:
    """The helpers every kind's restore uses: injected calls that name the
    fd on failure, staging strings, placing an fd at its dumped number,
    opening image paths as the placeholder with the identity checked."""

    def __init__(self, remote: Injector, entry: FilesEntry, inherit: dict[str, int],
                 ghost_dir: str, keep: set[int], privs=None):
        self.r = remote
        self.privs = privs
        self.pid = remote.proc.pid
        self.entry = entry
        self.inherit = inherit
        self.ghost_dir = ghost_dir
        self.keep = keep
        self.items = [Item(e) for e in entry.fds]
        self.by_fd = {it.fd: it for it in self.items}
        self.needed = set(self.by_fd)
        self.base = max(self.needed | keep | {0}) + MOVE_MARGIN
        self.moved: dict[int, int] = {}  # placeholder fd -> where it was moved
        self.placed: set[int] = set()
        self.pty_new_index: dict[int, int] = {}  # dumped pty index -> restored master fd
        self.original: set[int] = set()
        self.inherited: set[int] = set()  # fds given a stand-in (the restorer's own)
        self.winch_sent = False
        self._boot_id: str | None = None
        self.tcp = None   # tcpsk.Repairs: connections made in repair mode

    def fail(self, it: Item, what: str) -> RestoreError:
        return RestoreError(f"fd {it.fd} ({it.e.path}): {what}")

    def stage(self, text: str, it: Item | None = None, at: int = 0) -> int:
        raw = text.encode("utf-8", "surrogateescape") + b"\0"
        if len(raw) > procfs.PAGE_SIZE - at:
            what = f"path of {len(raw) - 1} bytes is longer than {procfs.PAGE_SIZE - 1 - at}"
            raise self.fail(it, what) if it else RestoreError(f"{text[:80]}...: {what}")
        self.r.write(self.r.scratch + at, raw)
        return self.r.scratch + at

    def call(self, name: str, *args: int, it: Item | None = None) -> int:
        try:
            return self.r.call(name, *args)
        except InjectionError as exc:
            if it is None or exc.errno is None:
                raise
            raise self.fail(it, f"{name} failed in process {self.pid}:"
                                f" {os.strerror(exc.errno)}") from None

    def placeholder_fds(self) -> set[int]:
        return {int(n) for n in os.listdir(f"/proc/{self.pid}/fd")}

    def inherited_source(self, it: Item) -> int | None:
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

    def place(self, tmp: int, it: Item, close_tmp: bool = True) -> None:
        """Put the fd ``tmp`` at its dumped number with its dumped close-on-exec."""
        e = it.e
        if tmp == e.fd:
            self.call("fcntl", tmp, fcntl.F_SETFD, fcntl.FD_CLOEXEC if e.cloexec else 0)
        else:
            self.call("dup3", tmp, e.fd, os.O_CLOEXEC if e.cloexec else 0)
            if close_tmp:
                self.call("close", tmp)
        self.placed.add(e.fd)

    def setfl(self, fd: int, it: Item, current: int | None = None) -> None:
        """The dumped status flags (O_NONBLOCK, O_APPEND, O_NOATIME, O_ASYNC)
        on ``fd``; ``current``: its flags if known (else F_GETFL)."""
        if current is None:
            current = self.call("fcntl", fd, fcntl.F_GETFL, it=it)
        want = it.e.flags & SETFL_MASK
        if want != current & SETFL_MASK:
            self.call("fcntl", fd, fcntl.F_SETFL, want | (current & os.O_DIRECT), it=it)

    def openat(self, path: str, flags: int, it: Item) -> int:
        """Reopen ``/proc/self/fd/N`` (an fd the placeholder already holds);
        O_NOFOLLOW, kept in f_flags of the dumped fd, would refuse the magic
        link itself."""
        addr = self.stage(path, it)
        res = self.r.syscall("openat", AT_FDCWD, addr,
                             (reopen_flags(flags) & ~O_NOFOLLOW) | os.O_CLOEXEC, 0)
        if res < 0:
            raise self.fail(it, f"cannot open {path} in process {self.pid}: {os.strerror(-res)}")
        return res

    def open_image_path(self, it: Item, flags: int, path: str | None = None,
                        check: Callable[[Item, os.stat_result], None] | None = None) -> int:
        """Open a path the image names, as the placeholder (with its current,
        normally the dumped, credentials): O_PATH|O_NOFOLLOW first, check
        the object (``check``, default check_object), then the real open
        through the O_PATH fd, so nothing is opened that is not what the
        image says."""
        path = it.e.path if path is None else path
        self.stage_len_ok(it, path)
        pfd = open_path(self.r, path)
        if pfd < 0:
            raise self.fail(it, f"cannot open {path} in process {self.pid}: {os.strerror(-pfd)}")
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{pfd}")
            if flags & os.O_PATH and flags & O_NOFOLLOW and stat.S_ISLNK(st.st_mode):
                self.check_identity(it, st)  # an O_PATH fd on the symlink itself
                return self.fresh(pfd)
            (check or self.check_object)(it, st)
            fd = self.openat(f"/proc/self/fd/{pfd}", flags, it)
        except BaseException:
            self.r.syscall("close", pfd)
            raise
        self.call("close", pfd)
        return fd

    def check_object(self, it: Item, st: os.stat_result) -> None:
        """What was opened must be what the image says: its file type (a FIFO
        entry a FIFO, a device a device of the recorded number...) and, for
        files, directories and FIFOs, the dumped inode. Each kind adds its
        own rule through ``CHECKS``."""
        e, t = it.e, it.e.type
        fmt = stat.S_IFMT(st.st_mode)
        want = {files_pb2.FD_REG: (stat.S_IFREG, stat.S_IFBLK), files_pb2.FD_DIR: (stat.S_IFDIR,),
                files_pb2.FD_FIFO: (stat.S_IFIFO,), files_pb2.FD_DEVNULL: (stat.S_IFCHR,),
                files_pb2.FD_TTY: (stat.S_IFCHR,)}.get(t)
        if want is None:
            raise self.fail(it, f"{files_pb2.FdType.Name(t)} is not opened by path")
        if fmt not in want or (e.mode and t != files_pb2.FD_TTY
                               and stat.S_IFMT(e.mode) != fmt):
            raise self.fail(it, f"{e.path} is {fmt_name(fmt)}, the image says "
                                f"{files_pb2.FdType.Name(t)}"
                                f"{' (' + fmt_name(stat.S_IFMT(e.mode)) + ')' if e.mode else ''}"
                                "; refusing to open it")
        if t in (files_pb2.FD_REG, files_pb2.FD_DIR, files_pb2.FD_FIFO):
            self.check_identity(it, st)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK) and e.has_owner and st.st_rdev != e.rdev:
            raise self.fail(it, f"{e.path} is device {os.major(st.st_rdev)}:"
                                f"{os.minor(st.st_rdev)}, the image says {os.major(e.rdev)}:"
                                f"{os.minor(e.rdev)}")
        for rule in CHECKS.get(t, ()):
            rule(self, it, st)

    def own_copy(self, fd: int) -> int:
        """The engine's own duplicate of the placeholder's fd ``fd``: the
        very open file, reached without any path."""
        pidfd = pidfd_open(self.pid)
        try:
            return pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)

    def lseek(self, fd: int, it: Item, strict: bool = True) -> None:
        if it.e.pos and not it.e.flags & os.O_PATH:
            res = self.r.syscall("lseek", fd, it.e.pos, os.SEEK_SET)
            if res < 0 and strict:
                raise self.fail(it, f"cannot seek to {it.e.pos}: {os.strerror(-res)}")

    def stage_len_ok(self, it: Item, path: str | None = None) -> None:
        path = it.e.path if path is None else path
        if len(path.encode("utf-8", "surrogateescape")) >= procfs.PAGE_SIZE:
            raise self.fail(it, f"path longer than {procfs.PAGE_SIZE - 1} bytes")

    def check_identity(self, it: Item, st: os.stat_result) -> None:
        e = it.e
        if (st.st_dev, st.st_ino) != (e.dev, e.inode):
            raise self.fail(it, f"{e.path} is not the file that was dumped: dumped dev"
                                f" {os.major(e.dev)}:{os.minor(e.dev)} inode {e.inode}, now"
                                f" dev {os.major(st.st_dev)}:{os.minor(st.st_dev)}"
                                f" inode {st.st_ino}")
        if stat.S_ISREG(st.st_mode) and st.st_size < e.pos:
            raise self.fail(it, f"{e.path} shrank: {st.st_size} bytes now, less than the"
                                f" saved offset {e.pos}")

    def reopen_sibling(self, it: Item) -> None:
        """Another open file description of an inode already restored
        (a deleted file, a memfd, a second end of a pipe or FIFO)."""
        first = it.same_inode_as
        if first is None or first not in self.placed:
            raise self.fail(it, f"its inode was to be restored with fd {first}, which was not")
        fd = self.openat(f"/proc/self/fd/{first}", it.e.flags, it)
        self.lseek(fd, it)
        self.setfl(fd, it)
        self.place(fd, it)

    def privileged(self):
        return self.privs.privileged() if self.privs is not None else nullcontext()

    def boot_id(self) -> str:
        if self._boot_id is None:
            self._boot_id = read_boot_id()
        return self._boot_id


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# type-specific rules of check_object: FdType -> [rule(core, item, stat)]
CHECKS: dict[int, list[Callable[[RestoreCore, Item, os.stat_result], None]]] = {}


@dataclass(frozen=True)
class FdKind:
    """One kind of fd: how the dump recognizes it, dumps and restores it.

    claims(probe) -> bool: the fd is this kind's (asked in table order);
    dump(ctx, probe) -> FdEntry: fill ``probe.e`` (or refuse);
    restore(core, item): make the fd and place it (``core.place``);
    finish(core, item): after every fd is placed (epoll registrations,
    locks, terminal settings), in table order;
    check(core, item, stat): extra identity rule when opened by path."""
    name: str
    types: tuple[int, ...] = ()
    claims: Callable[[Probe], bool] | None = None
    dump: Callable[[DumpCtx, Probe], FdEntry] | None = None
    restore: Callable[[RestoreCore, Item], None] | None = None
    finish: Callable[[RestoreCore, Item], None] | None = None
    check: Callable[[RestoreCore, Item, os.stat_result], None] | None = None
