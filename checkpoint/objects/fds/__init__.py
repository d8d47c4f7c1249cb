"""Open files: the fd table, cwd, root and umask of a process, dumped and
restored; one module per kind of fd, registered in ``KINDS``.

    kind (module)         dump                                  restore
    regfile               path, offset, flags, identity         openat + identity check + lseek
                          deleted: + content (capped)           "ghost": O_TMPFILE, filled
    procfile              /proc path (own pid made relative)    reopened for the restored pid
    memfd                 name, content (capped), mode, seals   memfd_create + fill + seals
    pipe                  unread data via tee(2), pipe size      pipe2 / open, fill, F_SETPIPE_SZ
    devnull               path                                  reopen
    tty                   path, pty index, termios, winsize     keep restorer's, new pair, reopen
    eventfd, signalfd     count / mask                          eventfd2 / signalfd4
    epoll                 registrations (kcmp-matched fds)      epoll_create1 + epoll_ctl
    timerfd               clock, settings, ticks                timerfd_create/settime/SET_TICKS
    inotify               watches: path, mask                   inotify_init1 + add_watch
    refused               UnsupportedObject, or "external"      only through ``inherit``
    locks (every fd)      flock, POSIX, OFD locks (--file-locks) re-taken once every fd is back

Adding a kind: a module with ``KIND = FdKind(...)`` (base.py), its fields
in proto/files.proto, and one line in ``KINDS``.

Several fds of the process that share one open file description (dup, fork)
are found with kcmp(KCMP_FILE) at dump and restored with dup3, so they keep
sharing offset and flags. Several descriptions of one inode that must stay one
object (a deleted file, a memfd, the same end of a pipe) are reopened from the
first through /proc/self/fd/N in the target.
"""

from __future__ import annotations

import os
import stat
from typing import Iterable

from ...errors import RestoreError, UnsupportedObject  # noqa: F401  (re-exported)
from ...freezer import FrozenProcess
from ...images.pb import files_pb2
from ...inject import Injector
from ...kernel import procfs
from . import (devnull, epoll, eventfd, inotify, locks, memfd, pipe, procfile, refused,
               regfile, signalfd, tcpsk, timerfd, tty, unixsk, inetsk, nlsk)
from .base import (CHECKS, MAX_CONTENT, DumpCtx, FdEntry, FdKind, FilesEntry, Item, Probe,
                   RestoreCore, fd_keys, link_kind, open_path, opt)  # noqa: F401
from .fs import dump_fs, restore_fs

# the table: asked in this order at dump (first that claims the fd), by
# FdEntry.type at restore; finish hooks run in this order once every fd is placed
KINDS: tuple[FdKind, ...] = (
    refused.SHM,        # before regfile: "/dev/zero (deleted)" is a regular file
    refused.DELETED,    # before regfile, pipe, tty: nothing reopens a deleted dir, FIFO...
    procfile.KIND,      # before regfile: files of /proc
    regfile.KIND,
    memfd.KIND,
    pipe.KIND,
    devnull.KIND,
    tty.KIND,           # after devnull: every other character device
    eventfd.KIND,
    signalfd.KIND,
    epoll.KIND,
    timerfd.KIND,
    inotify.KIND,
    inetsk.KIND,        # sockets: TCP/UDP without connections, unix ones (unixsk)
    unixsk.KIND,        # (claims nothing itself: inetsk hands it the unix sockets)
    nlsk.KIND,          # (nor this one: the netlink sockets)
    refused.KIND,       # last: whatever no kind claimed
)
LOCKS = locks.KIND      # not a kind of fd: the locks any fd holds

BY_TYPE = {t: k for k in KINDS for t in k.types}
for _k in KINDS:
    if _k.check is not None:
        for _t in _k.types:
            CHECKS.setdefault(_t, []).append(_k.check)


# --------------------------------------------------------------------------
# dump


def dump_files(proc: FrozenProcess, *, external: bool = False,
               exclude_fds: Iterable[int] = frozenset(),
               max_content: int = MAX_CONTENT, file_locks: bool = False,
               tcp=None) -> FilesEntry:
    """The fd table, cwd, root and umask of the frozen process ``proc``.

    Nothing of the target's state changes: pipe contents are copied with
    tee(2), never read. What no kind can restore raises UnsupportedObject
    naming the fd, or with ``external`` is recorded as an FD_UNKNOWN entry
    that the restore must get through ``inherit``. Locks held through an fd
    raise UnsupportedObject unless ``file_locks``. ``exclude_fds`` are the
    engine's own fds parked in the target. ``tcp``: the round's
    tcpsk.Connections (how TCP connections are taken; None: refused)."""
    pid = proc.pid
    exclude = set(exclude_fds)
    entry = FilesEntry(pid=pid)
    dump_fs(pid, entry)
    ctx = DumpCtx(pid, max_content, external=external, file_locks=file_locks,
                  tids=tuple(getattr(proc, "tids", ()) or ()), tcp=tcp)
    try:
        for info in procfs.read_fds(pid):
            if info.fd not in exclude:
                e = _dump_fd(ctx, info)
                ctx.entries[e.fd] = e
                entry.fds.append(e)
        LOCKS.dump(ctx, None)  # every lock of the process is one of an fd we dumped
    finally:
        if ctx.pidfd >= 0:
            os.close(ctx.pidfd)
    return entry


def _dump_fd(ctx: DumpCtx, info: procfs.FdInfo) -> FdEntry:
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
    if link.startswith("anon_inode:"):  # one inode for every such file: no relation
        first = fd
    else:
        first = ctx.first_of_inode.setdefault(key, fd)
    if first != fd and not e.HasField("dup_of"):
        e.same_inode_as = first
    p = Probe(fd, link, link_kind(link), info.flags, st, e, carries_data=first == fd)
    for kind in KINDS:
        if kind.claims(p):
            e = kind.dump(ctx, p)
            break
    if not e.external:
        LOCKS.claims(p) and LOCKS.dump(ctx, p)
    return e


# --------------------------------------------------------------------------
# restore


def restore_files(remote: Injector, entry: FilesEntry, *,
                  inherit: dict[str, int] | None = None, ghost_dir: str = "/tmp",
                  keep: Iterable[int] = (), privs=None,
                  premade: dict[tuple[int, int], int] | None = None,
                  tree_links: dict[int, int] | None = None,
                  unix_spares: dict[int, int] | None = None, tcp=None) -> None:
    """Give the frozen placeholder behind ``remote`` the fd table, cwd, root and
    umask of ``entry``.

    ``inherit`` maps a key ("fdN", or a saved link such as "/dev/pts/3",
    "pipe:[1234]", "socket:[99]") to an fd already open in the placeholder
    that stands in for the dumped one (CRIU's --inherit-fd); it gets the
    dumped fd's status flags (O_NONBLOCK, O_APPEND...). ``keep`` are
    placeholder fds left open and untouched (they must not collide with the
    image). Every other placeholder fd is closed at the end. Deleted files
    are rebuilt as nameless files (O_TMPFILE) in ``ghost_dir``. ``premade``:
    memfds made before (``premake_memfds``), by dumped (dev, inode).

    Every path of the image is opened by the placeholder itself, with the
    credentials it has: the restorer runs this with the dumped process's
    (``privs``, a process.Privs, raises them back only for chroot). Each
    path is first opened O_PATH|O_NOFOLLOW, which opens nothing, and its
    type, identity and device number are checked against the image before
    the real open (through /proc/self/fd/N, the same inode). What the
    engine itself writes (pipe data, memfd and ghost content) goes through
    its own copy of the placeholder's fd (pidfd_getfd), never a path, and
    only after checking that it is a pipe, a memfd, a nameless file.

    ``tree_links``: fd -> placeholder fd, for the fds another process of
    the tree holds too (FdEntry.tree_pid; ``pull_tree_fds`` got them): the
    same description is placed as it is, another description of the inode
    is opened through it.

    ``tcp``: the restore's tcpsk.Repairs, where TCP connections made in
    repair mode wait until every process is built (the caller resumes
    them); None: they are resumed here, once every fd is in place."""
    r = _Restorer(remote, entry, dict(inherit or {}), ghost_dir, set(keep), privs)
    r.premade = dict(premade or {})
    r.tree_links = dict(tree_links or {})
    r.unix_spares = unix_spares if unix_spares is not None else {}
    r.tcp = tcp if tcp is not None else tcpsk.Repairs()
    try:
        r.run()
        if tcp is None:
            r.tcp.resume()
    except BaseException:
        if tcp is None:
            r.tcp.abort()
        raise


def pull_tree_fds(remote: Injector, entry: FilesEntry,
                  spares: dict[int, tuple[int, int]] | None = None) -> dict[int, int]:
    """The open file descriptions of ``entry`` that an earlier process of
    the tree holds (FdEntry.tree_pid/tree_fd), copied into the placeholder
    from that process with pidfd_getfd (by the placeholder itself, before
    it takes the dumped credentials: the earlier process is already
    restored and may be another user). PIDs are as the restored processes
    see them (the dumped ones). A unix socket an earlier process made
    (UnixSocket.maker) is taken from where ``spares`` (socket inode ->
    (maker, fd)) says it waits. Returns fd -> the copy in the placeholder."""
    out: dict[int, int] = {}
    pidfds: dict[int, int] = {}
    try:
        for e in entry.fds:
            if e.HasField("tree_pid"):
                src_pid, src_fd = e.tree_pid, e.tree_fd
            elif e.type == files_pb2.FD_UNIX_SOCKET and e.unix.maker and \
                    not e.HasField("dup_of"):
                got = (spares or {}).get(e.unix.inode)
                if got is None:
                    raise RestoreError(f"fd {e.fd} ({e.path}): the unix socket process "
                                       f"{e.unix.maker} was to make is not there")
                src_pid, src_fd = got
            else:
                continue
            if src_pid not in pidfds:
                res = remote.syscall("pidfd_open", src_pid, 0)
                if res < 0:
                    raise RestoreError(f"fd {e.fd} ({e.path}): pidfd_open of process "
                                       f"{src_pid}: {os.strerror(-res)}")
                pidfds[src_pid] = res
            res = remote.syscall("pidfd_getfd", pidfds[src_pid], src_fd, 0)
            if res < 0:
                raise RestoreError(f"fd {e.fd} ({e.path}): taking fd {src_fd} of process "
                                   f"{src_pid}: {os.strerror(-res)}")
            out[e.fd] = res
    except BaseException:
        for fd in out.values():
            remote.syscall("close", fd)
        raise
    finally:
        for fd in pidfds.values():
            remote.syscall("close", fd)
    return out


def premake_memfds(remote: Injector, entry: FilesEntry,
                   inodes: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """Make now, in the placeholder, the memfds of ``entry`` with these dumped
    (dev, inode) that the process holds as fds, so its mappings can be made
    from them (the restorer maps /proc/self/fd/N); returns (dev, inode) ->
    placeholder fd for those it holds, to pass to restore_files."""
    r = _Restorer(remote, entry, {}, "/tmp", set(), None)
    r.premade = {}
    out = {}
    for ino in inodes:
        fd = memfd.premake(r, ino)
        if fd is not None:
            out[ino] = fd
    return out


def _accepted(it: Item) -> bool:
    """An accepted connection (made through its listener) or a client
    waiting in one's queue: once every listener is back."""
    u = it.e.unix
    return it.e.type == files_pb2.FD_UNIX_SOCKET and not u.maker and (
        bool(u.pending_on) or not u.single and bool(u.name or u.peer_name))


class _Restorer(RestoreCore):
    premade: dict[tuple[int, int], int]
    tree_links: dict[int, int] = {}
    unix_spares: dict[int, int] = {}

    def run(self) -> None:
        self.preflight()
        self.make_room()
        later: list[Item] = []
        dups: list[Item] = []
        for it in sorted(self.items, key=lambda i: i.fd):
            if it.fd in self.placed:
                continue  # came with another (the other ends of a pipe)
            if it.fd in self.tree_links:
                self.restore_tree_link(it)
                continue
            src = self.inherited_source(it)
            if src is not None:
                self.setfl(src, it)  # a stand-in gets the dumped O_NONBLOCK & co.
                self.place(src, it, close_tmp=False)
                self.inherited.add(it.fd)
            elif it.dup_of is not None:
                dups.append(it)
            elif it.same_inode_as is not None or self.is_pty_peer(it) or _accepted(it):
                later.append(it)   # (an accepted connection: once its listener is back)
            else:
                self.restore_one(it)
        # pty masters, then peers; accepted connections before the clients
        # waiting in a listener's queue (an accept must not take one of them)
        later.sort(key=lambda i: (not i.e.pty_master, bool(i.e.unix.pending_on), i.fd))
        for it in later:
            if it.fd not in self.placed:
                self.restore_one(it)
        for it in dups:
            self.restore_dup(it)
        for kind in (*KINDS, LOCKS):
            if kind.finish is None:
                continue
            for it in self.items:
                if it.fd in self.inherited and kind is not tty.KIND:
                    continue  # a stand-in is the restorer's: only its terminal settings
                if it.fd in self.tree_links and kind is not LOCKS:
                    continue  # the earlier process restored the object; locks are ours
                if kind is LOCKS or it.e.type in kind.types:
                    kind.finish(self, it)
        restore_fs(self)
        self.close_others()

    def restore_one(self, it: Item) -> None:
        t = it.e.type
        if it.same_inode_as is not None and t == files_pb2.FD_REG and it.e.ghost:
            return self.reopen_sibling(it)
        kind = procfile.KIND if it.e.HasField("procfs") else BY_TYPE.get(t)
        if kind is None or kind.restore is None:
            raise self.fail(it, f"cannot restore fds of type {files_pb2.FdType.Name(t)}")
        kind.restore(self, it)

    def restore_tree_link(self, it: Item) -> None:
        """An fd whose description (or inode) an earlier process of the tree
        restored: that description as it is, or the inode opened again
        through it (a pipe or FIFO end by way of an O_RDWR helper, so the
        open never waits for a peer), with the dumped flags and offset."""
        src = self.tree_links[it.fd]
        src = self.moved.get(src, src)
        if it.e.type == files_pb2.FD_UNIX_SOCKET and not it.e.HasField("tree_pid"):
            self.setfl(src, it)   # its end of a pair an earlier process made
            self.place(src, it)
            return
        if it.e.tree_same_description:
            self.place(src, it)
            return
        path = f"/proc/self/fd/{src}"
        helper = None
        if it.e.type in (files_pb2.FD_PIPE, files_pb2.FD_FIFO):
            helper = self.fresh(self.openat(path, os.O_RDWR | os.O_NONBLOCK, it))
        fd = self.fresh(self.openat(path, it.e.flags | os.O_NONBLOCK, it))
        if helper is not None:
            self.call("close", helper)
        self.call("close", src)
        self.setfl(fd, it)
        if it.e.type not in (files_pb2.FD_PIPE, files_pb2.FD_FIFO):
            self.lseek(fd, it)
        self.place(fd, it)

    def restore_dup(self, it: Item) -> None:
        src = it.dup_of
        if src not in self.placed:
            raise self.fail(it, f"is a dup of fd {src}, which was not restored")
        self.call("dup3", src, it.fd, os.O_CLOEXEC if it.e.cloexec else 0, it=it)
        self.placed.add(it.fd)

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
            if self.inherited_source(it) is not None or it.fd in self.tree_links:
                continue
            if it.e.external and it.dup_of is None:
                raise self.fail(it, "was left external at dump; give it with inherit"
                                    f" (--inherit-fd fd[N]:{it.e.path} or fd{it.fd})")
            if it.e.type in (files_pb2.FD_REG, files_pb2.FD_DIR, files_pb2.FD_FIFO) \
                    and not it.e.ghost and it.dup_of is None and not it.e.HasField("procfs"):
                self.stage_len_ok(it)
                try:
                    st = os.stat(it.e.path, follow_symlinks=False)
                except OSError as exc:
                    raise self.fail(it, f"cannot be reopened: {exc.strerror}") from None
                self.check_identity(it, st)
            if it.e.type == files_pb2.FD_INOTIFY:
                inotify.preflight(self, it)

    def make_room(self) -> None:
        """Move every placeholder fd sitting on a number the image needs."""
        for fd in sorted(self.original & self.needed):
            new = self.dupfd_high(fd)
            self.call("close", fd)
            self.moved[fd] = new

    def is_pty_peer(self, it: Item) -> bool:
        idx = it.pty_index
        return (it.e.type == files_pb2.FD_TTY and not it.e.pty_master
                and idx is not None and any(o.e.pty_master and o.pty_index == idx
                                            for o in self.items))

    def close_others(self) -> None:
        for fd in sorted(self.placeholder_fds() - self.needed - self.keep):
            self.call("close", fd)
