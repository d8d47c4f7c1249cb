"""The restorer: replay a layer chain into a new process that continues
exactly where the dumped one stopped.

    r = restore(images_dir, detach=True)    # -> Restored(pid)
    r.wait()

How (shared/notes/restore-probe.md has the probe this follows):
1. Open the chain and check every checksum and link *before* anything is
   started; check the vDSO (same kernel) and every mapped file's identity.
2. Start a placeholder (``sleep``) with the original PID (clone3 ``set_tid``
   from the engine), or a new one (``new_pids``); seize it.
3. Inside it, by injected syscalls: unregister its rseq; unmap everything but
   the vDSO block; move [vvar]/[vvar_vclock]/[vdso] to their dumped
   addresses; map every VMA (files reopened, anonymous memory fresh); write
   the pages from the newest layer holding each; PR_SET_MM_MAP (mm fields,
   auxv, exe); signal dispositions; files; process attributes; per-thread
   state; the other threads by clone3 with their original TIDs.
4. Install the final registers at an interrupt stop (with the restart of an
   interrupted syscall applied by hand) and detach.

A failure at any step kills the half-built process and says which object
failed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import logging
import os
import shutil
import signal
import stat
import struct
import time
from array import array
from dataclasses import dataclass

from . import batch, hooks
from .errors import (CheckpointError, ImageError, InjectionError, Interrupted, RestoreError,
                     UsageError)
from .interrupt import check as check_stop
from .interrupt import stoppable
from .freezer import (SEIZE_OPTIONS, FrozenProcess, FrozenThread, _task_state, deferred_signals,
                      freeze_process)
from .images import open_chain
from .images.pb import files_pb2
from .images.format import KIND_DUMP
from .inject import Injector, ProcMem
from .kernel import procfs
from .kernel import ptrace as pt
from .kernel.syscalls import NR, clone_args, fork_syscall, libc, pidfd_open
from .objects import madvise
from .objects import mm as mm_obj
from .objects import process as proc_obj
from .objects import pstree as tree_obj
from .objects import sched as sched_obj
from .objects import session as session_obj
from .objects import timers as timer_obj
from .objects.fds import tcpsk
from .objects.files import open_path, premake_memfds, pull_tree_fds, restore_files
from .objects.threads import restart_fixup, restore_seccomp
from .pagewrite import PageWriter
from .progress import Progress

PAGE = procfs.PAGE_SIZE
TASK_SIZE = 0x7FFF_FFFF_F000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
MAP_FIXED = 0x10
_U64 = 0xFFFF_FFFF_FFFF_FFFF
O_RDONLY, O_RDWR, O_CLOEXEC = 0, 2, 0o2000000
AT_FDCWD = -100
RSEQ_FLAG_UNREGISTER = 1
PR_SET_NAME, PR_SET_MM, PR_SET_MM_MAP = 15, 35, 14
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_THREAD, CLONE_SYSVSEM, CLONE_CHILD_CLEARTID = 0x10000, 0x40000, 0x200000
THREAD_FLAGS = (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD
                | CLONE_SYSVSEM | CLONE_CHILD_CLEARTID)
SS_DISABLE = 2
CLONE_NEWPID = 0x20000000
PLACEHOLDER = ["sleep", "infinity"]
log = logging.getLogger("checkpoint.restore")


@dataclass
class Restored:
    """A restored process. ``pid`` is its PID; the engine is its parent.

    With ``detach`` a background thread reaps it when it exits (no zombie
    is left while the caller goes on); ``wait()`` returns the status either
    way: the exit code, or minus the signal number that killed it."""

    pid: int
    restore_ms: float
    pages_restored: int
    layers: int
    detached: bool = False
    pid_ns: bool = False
    waiter: int = 0  # our child to wait for: the process itself, or its namespace's keeper
    #: the PIDs of the restored tree (as dumped), the root first
    tree: list = None
    _status: int | None = None
    _reaper: object = None

    def __post_init__(self):
        self.waiter = self.waiter or self.pid

    def _start_reaper(self) -> None:
        import threading

        def reap():
            _, status = os.waitpid(self.waiter, 0)
            self._status = self._decode(status)
        self._reaper = threading.Thread(target=reap, name=f"reap-{self.pid}", daemon=True)
        self._reaper.start()

    def wait(self, timeout: float | None = None) -> int:
        if self._reaper is not None:
            self._reaper.join(timeout)
            if self._reaper.is_alive():
                raise TimeoutError(f"restored process {self.pid} still running")
            return self._status
        if self._status is not None:
            return self._status
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.waiter, 0 if deadline is None else os.WNOHANG)
            if pid == self.waiter:
                self._status = self._decode(status)
                return self._status
            if time.monotonic() > deadline:
                raise TimeoutError(f"restored process {self.pid} still running")
            time.sleep(0.01)

    def _decode(self, status: int) -> int:
        code = os.waitstatus_to_exitcode(status)
        if self.waiter != self.pid and code > 128:  # a keeper passes 128 + signal on
            return 128 - code
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def as_json(self) -> dict:
        return {"pid": self.pid, "restore_ms": self.restore_ms,
                "pages_restored": self.pages_restored, "layers": self.layers,
                "processes": list(self.tree or [self.pid])}


# --------------------------------------------------------------------------
# checks before anything starts


def _own_vdso() -> tuple[bytes, int, int, int]:
    vmas = procfs.read_maps(os.getpid())
    mem = ProcMem(os.getpid(), writable=False)
    try:
        ident = mm_obj.vdso_identity(os.getpid(), vmas, mem)
    finally:
        mem.close()
    return (ident["vdso_digest"], ident["vdso_size"], ident["vvar_size"],
            ident["vvar_vclock_size"])


def check_images(process, mm) -> None:
    """Refuse, before starting anything, what cannot be restored right."""
    written_files = {(v.dev, v.inode) for v in mm.vmas if v.flags & 0x01 and v.prot & 2}
    madvise.check_image(mm, mm_obj.SPECIAL)
    mine = _own_vdso()
    theirs = (process.vdso_digest, process.vdso_size, process.vvar_size,
              process.vvar_vclock_size)
    if mine != theirs:
        raise RestoreError("the image was dumped with another kernel's vDSO (its [vdso] "
                           "differs from this kernel's): restore on the kernel it was "
                           "dumped on")
    for v in mm.vmas:
        if not v.inode or v.path.startswith("[") or v.status & (mm_obj.VMA_DELETED
                                                                 | mm_obj.VMA_SHARED_ANON):
            continue
        if v.path.startswith("/memfd:"):
            continue
        try:
            st = os.stat(v.path)
        except OSError as exc:
            raise RestoreError(f"mapped file {v.path} (VMA {v.start:#x}-{v.end:#x}): "
                               f"{exc.strerror}") from None
        diffs = []
        if st.st_ino != v.inode or st.st_dev != v.dev:
            diffs.append("it is another file (device/inode differ)")
        # a file the process maps shared and writable changes by design (its
        # own writes land there, also seen through its private mappings of
        # it): only its identity must hold
        shared_rw = (v.dev, v.inode) in written_files
        if v.file_size and st.st_size != v.file_size and not shared_rw:
            diffs.append(f"size {st.st_size} != {v.file_size}")
        if v.file_mtime_ns and st.st_mtime_ns != v.file_mtime_ns and not shared_rw:
            diffs.append("modification time differs")
        if diffs:
            raise RestoreError(f"mapped file {v.path} changed since the dump: "
                               + ", ".join(diffs) + "; refusing to restore on top of it")


# --------------------------------------------------------------------------
# the placeholder


def _clone_with_pid(pid: int) -> int:
    """fork() with a chosen PID: clone3 set_tid. The dumped process, just
    killed, may still be a zombie waiting for its parent: retry a moment."""
    tid = (ctypes.c_int32 * 1)(pid)
    args = clone_args(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    give_up = time.monotonic() + 3
    while True:
        try:
            return fork_syscall(NR["clone3"], ctypes.addressof(args), ctypes.sizeof(args))
        except OSError as exc:
            if exc.errno == errno.EEXIST and time.monotonic() < give_up and \
                    _task_state(pid) in ("Z", "X", ""):
                time.sleep(0.01)
                continue
            if exc.errno == errno.EEXIST:
                raise RestoreError(f"PID {pid} of the dumped process is taken on this host; "
                                   "restore with --pid-ns (a new PID namespace) or "
                                   "--new-pids") from None
            if exc.errno == errno.EPERM:
                raise RestoreError(f"not permitted to create a process with PID {pid} "
                                   "(clone3 set_tid needs CAP_CHECKPOINT_RESTORE or "
                                   "CAP_SYS_ADMIN); try --new-pids") from None
            raise RestoreError(f"clone3 with PID {pid} failed: {exc.strerror}") from None


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # pragma: no cover - in a fresh child
    """PR_SET_PDEATHSIG(SIGKILL), then make sure the parent did not die
    before it was set (the child would have been re-parented already)."""
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(NS_EXIT_OTHER)


def _exec_placeholder(exe: str, pass_fds: tuple[int, ...], parent: int,
                      session: "session_obj.Plan | None" = None) -> None:  # pragma: no cover
    """In a fresh child: become the placeholder program (never returns). It
    dies with its parent (the engine, or the PID namespace's init) until
    the build sets the dumped parent-death signal as one of its last steps;
    once the engine seized it, PTRACE_O_EXITKILL covers the same."""
    try:
        _die_with_parent(parent)
        if session is not None:
            try:
                session.apply()
            except OSError:
                os._exit(NS_EXIT_SESSION)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(s, signal.SIG_DFL)
        for fd in pass_fds:  # everything else of ours is close-on-exec
            os.set_inheritable(fd, True)
        os.execv(exe, [exe, *PLACEHOLDER[1:]])
    finally:
        os._exit(127)


NS_EXIT_EPERM, NS_EXIT_OTHER, NS_EXIT_SESSION = 121, 122, 123


KEEPER_RELEASE = signal.SIGUSR1


def _keeper_child(pid: int, exe: str, pass_fds: tuple[int, ...], engine: int,
                  ack: int, session: "session_obj.Plan | None" = None,
                  keeper_sid: int = 0) -> None:  # pragma: no cover
    """The keeper, in a fresh child of the engine: a new PID namespace
    whose init starts the placeholder with ns-PID ``pid`` and lives as long
    as it does, exiting with its status (128 + signal when it was killed).

    The keeper (this process) dies with the engine until the engine, the
    build done, sends it KEEPER_RELEASE (it answers on ``ack``); the init
    dies with the keeper (and with it, the whole namespace).

    With ``keeper_sid`` there is no new namespace: the keeper (started with
    that PID) makes a new session and is the placeholder's parent itself
    (session.py)."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        _die_with_parent(engine)

        def release(_sig, _frame):
            libc.prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
            os.write(ack, b"k")
        signal.signal(KEEPER_RELEASE, release)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {KEEPER_RELEASE})
        if keeper_sid:
            _session_keeper(pid, exe, pass_fds, ack, session)
        if libc.unshare(CLONE_NEWPID) != 0:
            os._exit(NS_EXIT_EPERM if ctypes.get_errno() == errno.EPERM else NS_EXIT_OTHER)
        keeper = pidfd_open(os.getpid())  # init sees no PID of its parent (another namespace)
        # nothing of the engine's stays open here but what the placeholder
        # gets (its stdio, the inherited fds): no listening socket, no pipe
        # of the caller kept open by a process that lives as long as the copy
        _close_all_but({0, 1, 2, ack, keeper, *pass_fds})
        init = os.fork()
        if init:
            _close_all_but({ack})
            os._exit(_exit_code_of(init) & 0xFF)  # init passes 128 + signal on
        os.close(ack)
        signal.signal(KEEPER_RELEASE, signal.SIG_DFL)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            os._exit(NS_EXIT_OTHER)
        if session is None or not session.shell_job:
            os.setsid()  # not in the restorer's session (session.py)
        import select
        if select.select([keeper], [], [], 0)[0]:  # the keeper died before that: go too
            os._exit(NS_EXIT_OTHER)
        os.close(keeper)
        try:
            child = _clone_with_pid(pid)
        except RestoreError as exc:
            os._exit(NS_EXIT_EPERM if "not permitted" in str(exc) else NS_EXIT_OTHER)
        if child == 0:
            _exec_placeholder(exe, pass_fds, 1, session)  # the namespace's init is PID 1
        _close_all_but(set())
        while True:  # the namespace's init: reap everything, leave with the placeholder
            got, status = os.waitpid(-1, 0)
            if got == child:
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
    finally:
        os._exit(NS_EXIT_OTHER)


def _session_keeper(pid: int, exe: str, pass_fds: tuple[int, ...], ack: int,
                    session: "session_obj.Plan") -> None:  # pragma: no cover
    """The keeper of a session whose leader is gone (session.py): in the
    child the engine started with the session's PID, make the session, start
    the placeholder with ``pid``, live as long as it does, exit with its
    status (128 + signal when it was killed)."""
    try:
        os.setsid()
        _close_all_but({0, 1, 2, ack, *pass_fds})
        me = os.getpid()
        try:
            child = _clone_with_pid(pid)
        except RestoreError as exc:
            os._exit(NS_EXIT_EPERM if "not permitted" in str(exc) else NS_EXIT_OTHER)
        if child == 0:
            _exec_placeholder(exe, pass_fds, me, session)
        _close_all_but({ack})
        code = _exit_code_of(child)
        os._exit(code if code >= 0 else 128 - code)
    finally:
        os._exit(NS_EXIT_OTHER)


def _exit_code_of(child: int) -> int:  # pragma: no cover (in keepers)
    """Wait for ``child``: its exit code, or minus the signal that killed it."""
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


def _close_all_but(keep: set[int]) -> None:  # pragma: no cover (in forked children)
    """Close every fd not in ``keep``; stdio not kept becomes /dev/null."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep and fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@dataclass
class _Spawned:
    """What the engine started for one restore; ``kill()`` undoes it all."""

    pid: int | None = None      # the placeholder, as the engine sees it
    waiter: int | None = None   # the engine's child: the placeholder or the ns keeper
    ack: int = -1               # --pid-ns: the keeper's answer to KEEPER_RELEASE

    def kill(self) -> None:
        with deferred_signals():
            for p in (self.pid, self.waiter):
                if p:
                    _kill_reap(p)
            self.close()

    def close(self) -> None:
        if self.ack >= 0:
            os.close(self.ack)
            self.ack = -1

    def release_keeper(self) -> None:
        """--pid-ns: the build is done; the keeper (and so the namespace)
        no longer dies with the engine."""
        if self.ack < 0:
            return
        os.kill(self.waiter, KEEPER_RELEASE)
        import select
        r, _, _ = select.select([self.ack], [], [], 5)
        if not r or os.read(self.ack, 1) != b"k":
            raise RestoreError("the PID namespace keeper did not answer")
        self.close()


def _spawn_placeholder(pid: int | None, pass_fds: tuple[int, ...] = (),
                       pid_ns: bool = False, spawned: _Spawned | None = None,
                       session: "session_obj.Plan | None" = None) -> tuple[int, int]:
    """Start the placeholder with PID ``pid`` (clone3 set_tid; in a new PID
    namespace with ``pid_ns``) or any PID. Returns (placeholder PID as the
    engine sees it, the engine's child to wait for) once the placeholder
    program runs. Whatever it started is in ``spawned`` as soon as it
    exists (SIGINT/SIGTERM are held from the fork until it is), so the
    caller's clean-up kills it also when this is interrupted."""
    exe = shutil.which(PLACEHOLDER[0])
    if exe is None:
        raise RestoreError(f"placeholder program {PLACEHOLDER[0]!r} not found in PATH")
    spawned = spawned if spawned is not None else _Spawned()
    me = os.getpid()
    keeper_sid = session.keeper_sid if session is not None and not pid_ns else 0
    with deferred_signals():
        if pid_ns or keeper_sid:
            ack_r, ack_w = os.pipe2(os.O_CLOEXEC)
            try:
                waiter = _clone_with_pid(keeper_sid) if keeper_sid else os.fork()
                if waiter == 0:  # pragma: no cover
                    os.close(ack_r)
                    _keeper_child(pid, exe, pass_fds, me, ack_w, session, keeper_sid)
            finally:
                os.close(ack_w)
            spawned.waiter, spawned.ack = waiter, ack_r
            child = None
        else:
            waiter = child = os.fork() if pid is None else _clone_with_pid(pid)
            if child == 0:  # pragma: no cover - the child: become the placeholder
                _exec_placeholder(exe, pass_fds, me, session)
            spawned.pid = spawned.waiter = child
    deadline = time.monotonic() + 5
    while True:
        if child is None and keeper_sid:  # the keeper's child
            kids = _children(waiter)
            child = kids[0] if kids else None
        elif child is None:  # find it: the child of the namespace's init
            for init in _children(waiter):
                kids = _children(init)
                child = kids[0] if kids else None
        try:
            if child is not None and os.readlink(f"/proc/{child}/exe") == \
                    os.path.realpath(exe) and procfs.read_stat(child).state == "S":
                spawned.pid = child
                return child, waiter
        except (OSError, CheckpointError):
            pass
        got, status = os.waitpid(waiter, os.WNOHANG)
        if got == waiter:
            code = os.waitstatus_to_exitcode(status)
            if code == NS_EXIT_EPERM:
                raise RestoreError("not permitted to create a PID namespace or choose PIDs "
                                   "in it (needs CAP_SYS_ADMIN, or a user namespace)")
            if code == NS_EXIT_SESSION:
                raise RestoreError(f"the placeholder could not take its session and process "
                                   f"group ({session.how if session else '?'}): restore "
                                   "with --shell-job (it joins this session) or --pid-ns")
            raise RestoreError(f"the placeholder process did not start (status {code})")
        if time.monotonic() > deadline:
            _kill_reap(waiter)
            raise RestoreError("the placeholder process did not start")
        time.sleep(0.0005)


def _ident(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


def _same_file(a: str, b: str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _kill_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(200):
        try:
            got, _ = os.waitpid(pid, os.WNOHANG | pt.__WALL)
        except ChildProcessError:
            return
        if got == pid:
            return
        time.sleep(0.005)


# --------------------------------------------------------------------------
# the restore proper


class _Builder:
    """Builds the dumped process inside a frozen placeholder."""

    @property
    def _what(self) -> str:
        """The step being built (named in errors); entering a step is a safe
        point to act on a stop signal."""
        return self._step

    @_what.setter
    def _what(self, step: str) -> None:
        check_stop()
        self._step = step

    def __init__(self, chain, records: dict, proc: FrozenProcess, inherit: dict[str, int],
                 restart_block: str):
        self.chain = chain
        self.rec = records
        self.proc = proc
        self.pid = proc.pid
        self.inherit = inherit
        self.restart_block = restart_block
        self.pages = 0
        #: memfds the fd room made before the mappings of them: (dev, inode) -> fd
        self.premade: dict[tuple[int, int], int] = {}
        self._engine_tid: dict[int, int] = {}  # dumped TID -> TID as the engine sees it
        self.session: session_obj.Plan | None = None  # set by the caller that spawned it
        #: a progress bar of the pages on a terminal (None: when stderr is one)
        self.progress: bool | None = False
        #: a process of a tree: the PIDs of the other processes as the engine
        #: sees them (by dumped PID), for the objects they share with this one
        self.engine_pids: dict[int, int] = {}
        self.tree_maps: dict[int, int] = {}   # VMA start -> fd of the shared object
        #: VMAs inherited from the restored parent and kept (begin), by start
        self.kept: dict[int, object] = {}
        self.parent_pid = 0   # a child of a tree: its parent's dumped PID
        self.groups: set[int] = set()   # process groups the restore makes (a tree's)
        #: ends of unix socketpairs made here for later processes: socket inode ->
        #: (maker's dumped PID, fd in it), shared by the tree's builders
        self.unix_spares: dict[int, tuple[int, int]] = {}
        self.spare_fds: list[int] = []   # those fds of this process, closed at the end
        #: TCP connections made in repair mode, resumed once every process
        #: of the tree is built (tcpsk.Repairs; None: by restore_files)
        self.tcp = None
        self._span_cache: tuple = (None, [])

    def run(self) -> None:
        """The whole build from a complete chain (``checkpoint restore``)."""
        rec = self.rec
        log.info("building PID %d: %d VMAs, %d threads", self.pid, len(rec["mm"].vmas),
                 len(rec["core"]))
        # safe=False: a half-built process has nothing to return to; it dies
        # with the engine instead
        with Injector(self.proc, self.proc.pid, safe=False) as r:
            self.memory(r)
            self.finish(r)
        self.check_applied()

    def memory(self, r: Injector, parent: int = 0) -> None:
        """The address space with every page (``begin``'s ``parent``: a
        child of a tree forked from its restored parent)."""
        self.begin(r, parent)
        self._mm_injector = r
        self._what = "memory shared with other processes of the tree"
        self.tree_maps = self._open_tree_maps(r)
        with self.privs.as_dumped():
            self._map_vmas(r)
        self._what = "memory pages"
        self._write_pages()
        log.info("%d pages written%s", self.pages,
                 f" ({len(self.kept)} VMAs kept from the parent)" if self.kept else "")

    def begin(self, r: Injector, parent: int = 0) -> None:
        """An empty address space with the dumped vDSO block, and the
        credentials to open what the image names (the dumped ones).

        ``parent``: the placeholder was forked from the restored parent
        (dumped PID) of a tree; the mappings it inherited that the dumped
        child still had (same range, protection, object: it was forked with
        them) are kept, so the pages it shared copy-on-write with its
        parent stay shared (MmEntry.cow_parent); ``self.kept`` has them."""
        rec, proc = self.rec, self.proc
        self.parent_pid = parent
        # the placeholder starts with the restorer's credentials; opens of
        # what the image names run with the dumped ones (Privs)
        sb = r.call("prctl", proc_obj.PR_GET_SECUREBITS, 0, 0, 0, 0)
        self.current = proc_obj.Creds.of_status(procfs.read_status(self.pid), sb)
        self.dumped = proc_obj.Creds.of_entry(rec["process"].creds, self.current)
        self.privs = proc_obj.Privs(r, self.dumped, self.current)
        self._engine_tid[rec["pstree"].pid] = self.pid
        self._what = "placeholder rseq"
        cfg = pt.get_rseq_configuration(proc.pid)
        if cfg.pointer:
            r.call("rseq", cfg.pointer, cfg.size, RSEQ_FLAG_UNREGISTER, cfg.signature)
        self._what = "address space"
        self.kept = self._inherited(parent) if parent else {}
        if not self._clear_and_move_vdso(r, self.kept):
            self.kept = {}
        # the scratch page where no dumped VMA will go: a MAP_FIXED
        # mapping landing on it would silently replace the staged paths
        self.scratch_at = _free_page_in(self._spans())
        r.map_scratch(self.scratch_at)

    def finish(self, r: Injector) -> None:
        """Everything but memory, once the memory is in place: mm fields,
        signals, files, process attributes, the threads, credentials, and
        the leader's registers (installed when ``r`` exits)."""
        rec = self.rec
        cores = {c.tid: c for c in rec["core"]}
        leader = rec["pstree"].pid
        privs = self.privs
        self._what = "mm fields (PR_SET_MM_MAP)"
        self._set_mm(r, privs)
        self._what = "signal dispositions"
        self._sigactions(r)
        self._what = "files shared with other processes of the tree"
        # before the dumped credentials
        links = pull_tree_fds(r, rec["files"], self.unix_spares)
        self._what = "files"
        made: dict[int, int] = {}
        with privs.as_dumped():
            restore_files(r, rec["files"], inherit=self.inherit, privs=privs,
                          premade=self.premade, tree_links=links, unix_spares=made,
                          tcp=self.tcp)
        for inode, fd in made.items():   # ends of pairs a later process takes
            self.unix_spares[inode] = (rec["pstree"].pid, fd)
            self.spare_fds.append(fd)
        self._what = "process attributes"
        self._process_attrs(r)
        if self.session is not None:
            self._what = "controlling terminal"
            session_obj.take_terminal(r, self.pid, self.session)
            fg = rec["process"].tty_pgrp
            if self.session.ctty and fg > 0 and fg != rec["pstree"].pgid and fg in self.groups:
                self._what = f"foreground process group {fg} of its terminal"
                session_obj.set_foreground(r, self.pid, self.session, fg)
        self._what = "interval timers"
        timer_obj.restore_itimers(r, rec["process"])
        # every page is written by now (also the stager's final layer)
        self._what = "protection of read-only shared memory"
        for v in rec["mm"].vmas:
            if v.flags & 0x01 and _written_shared_ro(v, -1):   # shared ones only
                r.call("mprotect", v.start, v.end - v.start, v.prot)
        self._what = "madvise state, THP disable"
        madvise.apply_advice(r, rec["mm"], mm_obj.SPECIAL)
        # after the rlimits, with the dumped capabilities: the kernel checks
        # RLIMIT_MEMLOCK (or CAP_IPC_LOCK) as it did for the original
        self._what = "mlocked VMAs"
        with privs.as_dumped():
            madvise.apply_locks(r, rec["mm"], mm_obj.SPECIAL)
        self._what = f"thread {leader}"
        self._thread_state(r, cores[leader])
        for tid in rec["pstree"].threads:
            if tid != leader:
                self._what = f"thread {tid}"
                self._new_thread(r, cores[tid])
        self._what = "POSIX timers"  # once every thread they may signal exists
        timer_obj.restore_posix_timers(r, rec["process"])
        self._what = "pending signals"
        self._pending_signals(r, cores)
        # last: the leader's credentials, seccomp, then what a change of
        # credentials resets (parent-death signal, dumpable)
        self._what = f"thread {leader} credentials and seccomp"
        self._creds(r, cores[leader])
        proc_obj.finish_leader(r, rec["process"])
        self._what = f"thread {leader} registers"
        r.install_on_exit(*self._final_state(cores[leader]))

    def check_applied(self) -> None:
        for tid, core in {c.tid: c for c in self.rec["core"]}.items():
            self._what = f"thread {tid} credentials"
            proc_obj.check_applied(self.pid, self._engine_tid.get(tid, tid), self.dumped,
                                   self._nnp(core), core.seccomp_mode)

    def _spans(self) -> list[tuple[int, int]]:
        """(start, end) of every VMA of the image, sorted: computed once per
        mm record (a process with 30,000 mappings pays ~10 ms a pass)."""
        mm = self.rec["mm"]
        if self._span_cache[0] is not mm:
            self._span_cache = (mm, sorted([(v.start, v.end) for v in mm.vmas]))
        return self._span_cache[1]

    def _nnp(self, core) -> bool:
        return bool(core.no_new_privs or self.rec["process"].creds.no_new_privs)

    def _creds(self, r: Injector, core) -> None:
        proc_obj.apply_creds(r, self.dumped, self.current, self._nnp(core),
                             seccomp=lambda rr: restore_seccomp(rr, core))

    # -- address space ---------------------------------------------------------

    def _inherited(self, parent: int) -> dict[int, object]:
        """Dumped VMA start -> VMA, of the mappings the placeholder (forked
        from the restored parent) has exactly as the dumped process had
        them."""
        dumped = {(v.start, v.end): v for v in self.rec["mm"].vmas
                  if v.path not in mm_obj.SPECIAL}
        out = {}
        for c in procfs.read_maps(self.pid):
            d = dumped.get((c.start, c.end))
            if d is None or c.path in mm_obj.SPECIAL:
                continue
            prot = (1 if c.perms[0] == "r" else 0) | (2 if c.perms[1] == "w" else 0) | \
                (4 if c.perms[2] == "x" else 0)
            if prot != d.prot or (c.perms[3] == "s") != bool(d.flags & 0x01):
                continue
            if d.shared_pid:   # one object with an earlier process: the parent's, here
                if (d.shared_pid, d.shared_start, d.shared_end) != (parent, c.start, c.end):
                    continue
            elif d.flags & 0x01 and not mm_obj.VMA_CONTENT_IN_FILE & d.status:
                continue       # shared memory of its own: not the parent's
            elif c.inode or d.inode:
                if (c.inode, c.offset, c.path) != (d.inode, d.offset, d.path):
                    continue
            # anonymous both: [heap] and [stack] are named only once the
            # parent's mm fields are set (after its children are forked)
            out[d.start] = d
        return out

    def _clear_and_move_vdso(self, r: Injector, keep=None) -> bool:
        """Unmap everything but the vDSO block (and the VMAs starting at
        ``keep``), then move the block where the image has it. Returns
        whether ``keep`` was kept (not when the block had to move)."""
        cur = {v.path: v for v in procfs.read_maps(self.pid)
               if v.path in ("[vvar]", "[vvar_vclock]", "[vdso]")}
        lo = min(v.start for v in cur.values())
        hi = max(v.end for v in cur.values())
        gadget_off = self.proc._gadget - cur["[vdso]"].start
        want = {v.path: v for v in self.rec["mm"].vmas
                if v.path in ("[vvar]", "[vvar_vclock]", "[vdso]")}
        wlo = min(v.start for v in want.values()) if want else lo
        if keep and wlo == lo:
            for v in procfs.read_maps(self.pid):
                if v.path not in mm_obj.SPECIAL and v.start not in keep:
                    r.call("munmap", v.start, v.end - v.start)
        else:
            keep = None
            r.call("munmap", 0, lo)
            r.call("munmap", hi, TASK_SIZE - hi)
        r.forget_scratch()
        if set(want) != set(cur):
            raise RestoreError(f"vDSO layout differs: image has {sorted(want)}, this kernel "
                               f"{sorted(cur)}")
        whi = max(v.end for v in want.values())
        if wlo == lo:
            return bool(keep)
        if wlo < hi and lo < whi:  # overlap: bounce through a free place first
            bounce = whi + 0x100000 if whi + (hi - lo) + 0x100000 < TASK_SIZE else 0x10000000
            self._move_block(r, cur, bounce - lo)
            cur = {p: procfs.Vma(v.start + bounce - lo, v.end + bounce - lo, v.perms, 0, 0, 0,
                                 0, p) for p, v in cur.items()}
            lo = bounce
        self._move_block(r, cur, wlo - lo)
        self.proc._gadget = want["[vdso]"].start + gadget_off
        return False

    def _move_block(self, r: Injector, cur: dict, delta: int) -> None:
        for path in ("[vvar]", "[vvar_vclock]", "[vdso]"):
            v = cur.get(path)
            if v is not None:
                got = r.call("mremap", v.start, v.size, v.size, MREMAP_MAYMOVE | MREMAP_FIXED,
                             v.start + delta)
                if path == "[vdso]":
                    self.proc._gadget += got - v.start

    def _open_checked(self, r: Injector, path: str, acc: int, ident: tuple[int, int],
                      what: str) -> int:
        """Open a file the image names, in the placeholder and with its
        current (the dumped) credentials: O_PATH|O_NOFOLLOW, check it is a
        regular file with the dumped device and inode, then open it for
        real through /proc/self/fd/N (the same inode)."""
        pfd = open_path(r, path)
        if pfd < 0:
            raise RestoreError(f"cannot open the {what} {path} as the dumped process (uid "
                               f"{self.dumped.uid[3]}, gid {self.dumped.gid[3]}): "
                               f"{os.strerror(-pfd)}")
        try:
            st = os.stat(f"/proc/{self.pid}/fd/{pfd}")
            kinds = (stat.S_IFREG, stat.S_IFCHR) if what == "mapped file" else (stat.S_IFREG,)
            if stat.S_IFMT(st.st_mode) not in kinds or (st.st_dev, st.st_ino) != ident:
                raise RestoreError(f"the {what} {path} is not the file that was dumped "
                                   f"(now {'a regular file' if stat.S_ISREG(st.st_mode) else 'no regular file'}"
                                   f", device/inode {st.st_dev}/{st.st_ino}, dumped "
                                   f"{ident[0]}/{ident[1]}); refusing to open it")
            raw = f"/proc/self/fd/{pfd}".encode() + b"\0"
            r.write(r.scratch, raw)
            fd = r.syscall("openat", AT_FDCWD, r.scratch, acc | O_CLOEXEC, 0)
            if fd < 0:
                raise RestoreError(f"cannot open the {what} {path} as the dumped process (uid "
                                   f"{self.dumped.uid[3]}, gid {self.dumped.gid[3]}): "
                                   f"{os.strerror(-fd)}")
        finally:
            r.syscall("close", pfd)
        return fd

    def _map_vmas(self, r: Injector, vmas=None) -> None:
        """Map ``vmas`` (default: all of the image's) fresh at their addresses."""
        opened: dict[tuple[str, int], int] = {}
        vmas = self.rec["mm"].vmas if vmas is None else vmas
        # a memfd the process also holds as an fd is made by the fd room first
        # and mapped from (one object, as dumped); one with no fd left is
        # mapped anonymous and filled from the image
        files = self.rec.get("files")
        if files is not None:
            want = {(v.dev, v.inode) for v in vmas if v.path.startswith("/memfd:")} - \
                set(self.premade)
            if want:
                self._what = "memfds of mappings"
                self.premade.update(premake_memfds(r, files, sorted(want)))
        # one batch of mmaps (batch.py), each checked to land at its address:
        # packed here, 8 words an entry, with no tuple a VMA
        table, named = array("Q"), []
        put = table.extend
        entry = NR["mmap"] | batch.EXPECT
        special, kept, tree_maps = mm_obj.SPECIAL, self.kept, self.tree_maps
        no_file = mm_obj.VMA_DELETED | mm_obj.VMA_SHARED_ANON
        try:
            for v in vmas:
                path = v.path
                start = v.start
                if path in special or start in kept:
                    continue
                flags = v.flags
                if not path and not flags & 0x01 and not v.inode and start not in tree_maps:
                    # private anonymous memory (most VMAs of a big process): the short way
                    put((entry, start, (v.end - start) & _U64, v.prot,
                         flags | MAP_FIXED | 0x20, _U64, 0, start))
                    named.append(v)
                    continue
                flags = (flags & ~0x20) | MAP_FIXED  # MAP_ANONYMOUS set below when needed
                fd, off = -1, 0
                file_backed = v.inode and not path.startswith(("[", "/memfd:")) and \
                    not v.status & no_file
                if file_backed:
                    self._what = _vma_what(v)
                    # a shared mapping that is writable, or may become so
                    # (VM_MAYWRITE, "mw": the file was opened for writing
                    # and a later mprotect may ask for it), needs the file
                    # open for writing
                    acc = O_RDWR if v.flags & 0x01 and (v.prot & 2 or "mw" in v.vmflags) \
                        else O_RDONLY
                    fd = opened.get((path, acc))
                    if fd is None:
                        fd = self._open_checked(r, path, acc, (v.dev, v.inode), "mapped file")
                        opened[(path, acc)] = fd
                    off = v.offset
                elif start in tree_maps:
                    fd, off = tree_maps[start], v.offset
                elif path.startswith("/memfd:") and (v.dev, v.inode) in self.premade:
                    fd, off = self.premade[(v.dev, v.inode)], v.offset
                else:
                    flags |= 0x20
                prot = v.prot
                if flags & 0x01 and _written_shared_ro(v, fd):
                    prot |= mm_obj.PROT_READ | mm_obj.PROT_WRITE  # no forced write into it
                put((entry, start, (v.end - start) & _U64, prot, flags, fd & _U64, off, start))
                named.append(v)
            self._what = f"{len(named)} mappings"
            try:
                r.batch(table, at=batch.free_area(
                    self._spans() + [(r.scratch, r.scratch + PAGE)], batch.area_size()))
            except batch.BatchError as e:
                self._what = _vma_what(named[e.index])
                if e.errno is not None:
                    raise InjectionError(f"mmap in process {self.pid} (thread {r.tid}) failed: "
                                         f"{os.strerror(e.errno)}", self.pid, e.errno) from None
                raise RestoreError(f"mmap put {self._what} at {e.result:#x}") from None
        finally:
            for fd in [*opened.values(), *self.tree_maps.values()]:
                r.syscall("close", fd)
            self.tree_maps = {}

    def _open_tree_maps(self, r: Injector) -> dict[int, int]:
        """The shared memory objects an earlier process of the tree mapped
        (VmaEntry.shared_pid): opened from its mapping (/proc/PID/map_files,
        which needs the placeholder's CAP_SYS_ADMIN: before the dumped
        credentials), one fd per VMA."""
        out: dict[int, int] = {}
        try:
            for v in self.rec["mm"].vmas:
                if not v.shared_pid:
                    continue
                src = self.engine_pids.get(v.shared_pid)
                if src is None:
                    raise RestoreError(f"VMA {v.start:#x}: process {v.shared_pid} it shares "
                                       "memory with was not restored")
                path = f"/proc/{src}/map_files/{v.shared_start:x}-{v.shared_end:x}"
                acc = O_RDWR if v.prot & 2 or "mw" in v.vmflags else O_RDONLY
                r.write(r.scratch, path.encode() + b"\0")
                res = r.syscall("openat", AT_FDCWD, r.scratch, acc | O_CLOEXEC, 0)
                if res < 0:
                    raise RestoreError(f"VMA {v.start:#x}-{v.end:#x}: cannot open the memory "
                                       f"it shares with process {v.shared_pid} ({path}): "
                                       f"{os.strerror(-res)}")
                out[v.start] = res
        except BaseException:
            for fd in out.values():
                r.syscall("close", fd)
            raise
        return out

    def _write_pages(self) -> None:
        """Every data page from the newest layer holding it, inside the
        dumped VMAs that keep their pages in the image (the chain clips the
        runs to them: an image's page entries outside cost nothing)."""
        pid = self.rec["pstree"].pid
        # a shared mapping of a memfd made from its fd shows the memfd's content
        # (the chain sorts the spans)
        special, kept, premade = mm_obj.SPECIAL, self.kept, self.premade
        in_file = mm_obj.VMA_CONTENT_IN_FILE
        spans = [(v.start, v.end) for v in self.rec["mm"].vmas
                 if v.path not in special and not v.shared_pid and v.start not in kept
                 and not v.status & in_file
                 and not (v.flags & 0x01 and v.path.startswith("/memfd:")
                          and (v.dev, v.inode) in premade)]
        spans += self._own_in_kept()
        self._copy_from_parent()
        # many ranges a process_vm_writev (pagewrite.py); through the
        # injectors' own /proc/PID/mem where it refuses
        writer = PageWriter(self.proc.pid, self.proc.mem.fd)
        progress = Progress("restore", enabled=self.progress)
        written = 0
        try:
            if progress.enabled:
                progress.total(self.chain.data_pages(pid, spans))
            # zero pages are left out: fresh mappings are zero, or show their file
            for addr, n, frame, off in self.chain.iter_data(pid, within=spans):
                writer.add(frame, off, addr, n)
                written += n
                if progress.enabled:
                    progress.advance(n // PAGE)
            writer.flush()
            self.pages += written // PAGE
        finally:
            writer.release()
            progress.close()

    def _copy_from_parent(self) -> None:
        """Pages shared with the parent (MmEntry.cow_parent) in a VMA that
        could not be kept: copied from the restored parent's memory (the
        image has them only there)."""
        cow = self.rec["mm"].cow_parent
        if not cow or self.parent_pid == 0:
            return
        src = self.engine_pids.get(self.parent_pid)
        if src is None:
            raise RestoreError(f"memory shared with parent {self.parent_pid}, which was not "
                               "restored")
        kept = sorted((v.start, v.end) for v in self.kept.values())
        rows = array("Q")
        for s, e in zip(cow[0::2], cow[1::2]):
            rows.extend((s, e, 0))
        rest = tree_obj.subtract(rows, [x for k in kept for x in k])
        if not rest:
            return
        pfd = procfs.open_proc_fd(src, "mem")
        try:
            for i in range(0, len(rest), 3):
                s, e = rest[i], rest[i + 1]
                for at in range(s, e, 1 << 20):
                    n = min(e - at, 1 << 20)
                    data = os.pread(pfd, n, at)
                    if len(data) != n or os.pwrite(self.proc.mem.fd, data, at) != n:
                        raise RestoreError(f"copying the pages at {at:#x} shared with the "
                                           f"parent {self.parent_pid}: short read or write")
                    self.pages += n // PAGE
        finally:
            os.close(pfd)

    def _own_in_kept(self) -> list[tuple[int, int]]:
        """The parts of the kept private VMAs that are not shared with the
        parent: emptied (MADV_DONTNEED: zero again, or the file's page),
        then given this process's own pages from the image."""
        if not self.kept:
            return []
        rows = array("Q")
        for v in self.kept.values():
            if not v.flags & 0x01:
                rows.extend((v.start, v.end, 0))
        cow = sorted(zip(self.rec["mm"].cow_parent[0::2], self.rec["mm"].cow_parent[1::2]))
        rest = tree_obj.subtract(rows, [x for p in cow for x in p])
        out = [(rest[i], rest[i + 1]) for i in range(0, len(rest), 3)]
        r = self._mm_injector
        for s, e in out:
            r.call("madvise", s, e - s, MADV_DONTNEED)
        return out

    def _set_mm(self, r: Injector, privs) -> None:
        mm, p = self.rec["mm"], self.rec["process"]
        auxv = list(mm.auxv) + [0, 0]
        auxv_raw = struct.pack(f"<{len(auxv)}Q", *auxv)
        # the exe link: changing it is refused (EBUSY) while the old exe is
        # mapped, which it is when the placeholder runs the same binary
        same = _same_file(f"/proc/{self.pid}/exe", mm.exe_path)
        exe_fd = -1
        if not same:
            ident = (p.exe_dev, p.exe_inode) if p.exe_inode else _ident(mm.exe_path)
            with privs.as_dumped():
                exe_fd = self._open_checked(r, mm.exe_path, O_RDONLY, ident, "executable")
        try:
            base = r.scratch
            r.write(base + 1024, auxv_raw)
            m = struct.pack("<11QQIi", mm.mm_start_code, mm.mm_end_code, mm.mm_start_data,
                            mm.mm_end_data, mm.mm_start_brk, mm.mm_brk, mm.mm_start_stack,
                            mm.mm_arg_start, mm.mm_arg_end, mm.mm_env_start, mm.mm_env_end,
                            base + 1024, len(auxv_raw), exe_fd)
            r.write(base, m)
            # the restorer's privilege: CAP_CHECKPOINT_RESTORE/CAP_SYS_ADMIN for the exe link
            res = r.syscall("prctl", PR_SET_MM, PR_SET_MM_MAP, base, len(m), 0)
            if res == -errno.EPERM:
                raise RestoreError(
                    f"setting the exe link to {mm.exe_path} (PR_SET_MM_MAP) needs "
                    "CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN): give the engine that "
                    "capability (e.g. setpriv --inh-caps +checkpoint_restore --ambient-caps "
                    "+checkpoint_restore), or restore as root")
            if res < 0:
                raise RestoreError(f"PR_SET_MM_MAP failed: {os.strerror(-res)}")
        finally:
            if exe_fd >= 0:
                r.syscall("close", exe_fd)

    def _sigactions(self, r: Injector) -> None:
        for a in self.rec["signals"].actions:
            r.write(r.scratch, struct.pack("<QQQQ", a.handler, a.flags, a.restorer, a.mask))
            r.call("rt_sigaction", a.sig, r.scratch, 0, 8)

    def _process_attrs(self, r: Injector) -> None:
        p = self.rec["process"]
        sched_obj.restore_oom(p, self.pid)
        r.call("personality", p.personality)
        for lim in p.rlimits:
            r.write(r.scratch, struct.pack("<QQ", lim.cur, lim.max))
            res = r.syscall("prlimit64", 0, lim.resource, r.scratch, 0)
            if res == -errno.EPERM:
                # raising a hard limit needs CAP_SYS_RESOURCE: never grant more
                # than the caller has; keep the lower limit (documented)
                continue
            if res < 0:
                raise RestoreError(f"rlimit {lim.resource}: {os.strerror(-res)}")

    # -- threads -----------------------------------------------------------------

    def _thread_state(self, r: Injector, core) -> None:
        """Per-thread kernel state that syscalls in the thread itself set."""
        r.call("set_robust_list", core.robust_list, core.robust_list_len or 24)
        r.call("set_tid_address", core.clear_child_tid)
        ss = core.sigaltstack
        if not ss.ss_flags & SS_DISABLE and ss.ss_size:
            r.write(r.scratch, struct.pack("<QiiQ", ss.ss_sp, ss.ss_flags & ~1, 0, ss.ss_size))
            r.call("sigaltstack", r.scratch, 0)
        r.write(r.scratch, core.comm.encode()[:15] + b"\0")
        r.call("prctl", PR_SET_NAME, r.scratch)
        if core.rseq.rseq_abi_pointer:
            r.call("rseq", core.rseq.rseq_abi_pointer, core.rseq.rseq_abi_size, 0,
                   core.rseq.signature)
        # still with the restorer's credentials: never more than the caller has
        sched_obj.restore_sched(r, core)

    def _final_state(self, core):
        regs = pt.user_regs_struct.from_buffer_copy(core.gpregs)
        restart_fixup(regs, self.restart_block)
        return regs, core.xstate, core.sigmask

    def _new_thread(self, r: Injector, core) -> None:
        tids = (ctypes.c_int32 * 1)(core.tid)
        args = clone_args(flags=THREAD_FLAGS, child_tid=core.clear_child_tid,
                          exit_signal=0, set_tid_size=1)
        base = r.scratch
        args.set_tid = base + 512
        r.write(base + 512, bytes(tids))
        r.write(base, bytes(args))
        before = set(procfs.list_tasks(self.pid))
        got = r.call("clone3", base, ctypes.sizeof(args))  # the TID as the process sees it
        if got != core.tid:
            raise RestoreError(f"clone3 gave TID {got}, wanted {core.tid}")
        # the same thread as the engine sees it (they differ in a new PID namespace)
        new = set(procfs.list_tasks(self.pid)) - before - set(self.proc.threads)
        if len(new) != 1:
            raise RestoreError(f"cannot tell the new thread {core.tid} among {sorted(new)}")
        tid = new.pop()
        self.proc.threads[tid] = FrozenThread(tid)  # auto-attached (TRACECLONE)
        self._engine_tid[core.tid] = tid
        self.proc._await_interrupt_stop(tid)
        with Injector(self.proc, tid, safe=False) as rc:
            self._thread_state(rc, core)
            self._what = f"thread {core.tid} credentials and seccomp"
            self._creds(rc, core)  # per thread: the kernel keeps credentials per task
            rc.install_on_exit(*self._final_state(core))

    def _pending_signals(self, r: Injector, cores: dict) -> None:
        # injected: PIDs as the restored process sees them (the dumped ones)
        pid = self.rec["pstree"].pid
        shared = self.rec["signals"].shared_pending_siginfo
        for i in range(0, len(shared), pt.SIGINFO_SIZE):
            info = shared[i:i + pt.SIGINFO_SIZE]
            sig = struct.unpack_from("<i", info)[0]
            r.write(r.scratch, info)
            r.call("rt_sigqueueinfo", pid, sig, r.scratch)
        for tid, core in cores.items():
            data = core.pending_siginfo
            for i in range(0, len(data), pt.SIGINFO_SIZE):
                info = data[i:i + pt.SIGINFO_SIZE]
                sig = struct.unpack_from("<i", info)[0]
                r.write(r.scratch, info)
                r.call("rt_tgsigqueueinfo", pid, tid, sig, r.scratch)


def _build_tree(chain, nodes, procs: dict, inherit: dict[str, int], restart_block: str,
                session, progress, repairs=None) -> int:
    """Build every process of ``nodes`` (the root's placeholder is in
    ``procs``, which gets the others as they are forked): the forks first,
    each from its parent's placeholder with its PID, sessions at the fork,
    then the process groups and the zombies, then each live process in the
    tree's order (the objects it shares come from processes built before
    it). Returns the pages written. ``repairs`` (tcpsk.Repairs) gets the
    TCP connections, for the caller to resume once the tree is built."""
    root = nodes[0]
    timeout = procs[root.pid].timeout
    engine_pids: dict[int, int] = {}
    builders = {}

    def step(n, b, what):
        try:
            return what()
        except (OSError, InjectionError, CheckpointError) as exc:
            if isinstance(exc, (RestoreError, Interrupted)):
                raise
            who = f"process {n.pid}: " if len(nodes) > 1 else ""
            raise RestoreError(f"restoring {who}{b._what} failed: {exc}") from None

    groups = {m.tree.pgid for m in nodes}
    spares: dict[int, tuple[int, int]] = {}

    def builder(n):
        b = _Builder(chain, n.rec, procs[n.pid], inherit if n is root else {}, restart_block)
        b.session = session if n is root else None
        if n is not root and n.tree.sid == n.pid and n.rec["process"].tty_nr:
            # a session leader of the tree with its controlling terminal
            b.session = session_obj.Plan(setsid=True, ctty=n.rec["process"].tty_nr,
                                         how=f"session leader {n.pid}")
        b.groups = groups
        b.unix_spares = spares
        b.tcp = repairs
        b.progress, b.engine_pids = progress, engine_pids
        b._what = "start"
        return b

    if len(nodes) == 1:
        b = builder(root)
        step(root, b, b.run)
        return b.pages
    # 1. in the tree's order: each process's memory (a child forked from its
    # parent keeps what it still shared with it copy-on-write), then its
    # children forked from it
    for n in nodes:
        if n.rec is None:
            continue
        proc = procs[n.pid]
        engine_pids[n.pid] = proc.pid
        b = builders[n.pid] = builder(n)
        parent = n.tree.ppid if n is not root else 0
        with Injector(proc, proc.pid, safe=False) as r:
            step(n, b, lambda: b.memory(r, parent))
            for c in n.children:
                check_stop()
                try:
                    procs[c.pid] = tree_obj.fork_child(proc, c, timeout, r)
                except (OSError, InjectionError) as exc:
                    raise RestoreError(f"forking process {c.pid}: {exc}") from None
                engine_pids[c.pid] = procs[c.pid].pid
    # 2. once every process exists: process groups, zombies
    with Injector(procs[root.pid], procs[root.pid].pid, safe=False) as r:
        root_pgid = r.syscall("getpgid", 0)
    tree_obj.set_groups(nodes, procs, max(root_pgid, 0))
    tree_obj.make_zombies(nodes, procs)
    # 3. the rest of each process, in the tree's order (what it shares with
    # an earlier one is taken from it)
    pages = 0
    for n in nodes:
        if n.rec is None:
            continue
        b = builders[n.pid]
        with Injector(procs[n.pid], procs[n.pid].pid, safe=False) as r:
            step(n, b, lambda: b.finish(r))
        step(n, b, b.check_applied)
        pages += b.pages
    # 4. the ends of socketpairs kept for later processes: taken by now
    for n in nodes:
        b = builders.get(n.pid)
        if b is not None and b.spare_fds:
            with Injector(procs[n.pid], procs[n.pid].pid, safe=False) as r:
                for fd in b.spare_fds:
                    r.syscall("close", fd)
    return pages


def _vma_what(v) -> str:
    return f"VMA {v.start:#x}-{v.end:#x} {v.path}".rstrip()


def _written_shared_ro(v, fd: int) -> bool:
    """A shared mapping the restore maps anonymous (shmem: shared anonymous
    memory, a deleted file's or a memfd's that no fd brought back) and
    fills through /proc/PID/mem, without write permission: the kernel
    refuses a forced write into a shared mapping that is not writable, so
    it is mapped writable, filled, then given its dumped protection."""
    return bool(v.flags & 0x01) and fd < 0 and not v.prot & mm_obj.PROT_WRITE and \
        v.path not in mm_obj.SPECIAL and not v.status & mm_obj.VMA_CONTENT_IN_FILE


def _trace_options(proc: FrozenProcess, seccomp: bool) -> None:
    """PTRACE_O_EXITKILL: the placeholder dies if the engine does, at any
    point of the build (its parent-death signal is reset by every change
    of credentials). PTRACE_O_SUSPEND_SECCOMP (CAP_SYS_ADMIN), when the
    image has seccomp state: the filters the build installs do not act on
    the build's own later calls; both go with the detach."""
    opts = SEIZE_OPTIONS | pt.PTRACE_O_EXITKILL
    if seccomp:
        opts |= pt.PTRACE_O_SUSPEND_SECCOMP
    for tid in list(proc.threads):
        try:
            pt.setoptions(tid, opts)
        except OSError as exc:
            if seccomp and exc.errno == errno.EPERM:
                raise RestoreError("restoring seccomp needs CAP_SYS_ADMIN "
                                   "(PTRACE_O_SUSPEND_SECCOMP)") from None
            raise RestoreError(f"PTRACE_SETOPTIONS on placeholder thread {tid}: "
                               f"{os.strerror(exc.errno)}") from None


STDIO_KINDS = ("pipe:", "/dev/pts/", "/dev/tty")


def _stdio_fds(files) -> list:
    """The dumped fds 0-2 that led outside the process: pipes and terminals."""
    return [e for e in files.fds if e.fd in (0, 1, 2)
            and (e.path.startswith(STDIO_KINDS) or e.type == 0)]


def _stdio_plan(files, inherit: dict[str, int], stdio: str) -> tuple[dict[str, int], list[int]]:
    """Stand-ins for the dumped fds 0-2 that led outside the process (pipes,
    terminals), unless ``inherit`` names them: ``inherit``: the engine's own
    0-2 (the restored program shares the caller's streams); ``null``:
    /dev/null; a path: that file, appended to (created 0600), for output,
    /dev/null for input; ``none``: no stand-in (a pipe end then refuses).
    Returns ({dumped link: fd in the placeholder}, fds this opened)."""
    keys: dict[str, int] = {}
    opened: list[int] = []
    if stdio == "none":
        return keys, opened
    for e in _stdio_fds(files):
        if e.path in inherit or f"fd{e.fd}" in inherit or e.path in keys:
            continue
        if stdio == "inherit":
            keys[e.path] = e.fd
            continue
        out = e.fd != 0
        target = stdio if out and stdio != "null" else "/dev/null"
        try:
            fd = os.open(target, (os.O_WRONLY | os.O_APPEND | os.O_CREAT if out else
                                  os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY, 0o600)
        except OSError as exc:
            for f in opened:
                os.close(f)
            raise UsageError(f"--stdio {stdio}: {exc.strerror}") from None
        opened.append(fd)
        keys[e.path] = fd
    return keys, opened


def _refuse_lone_pipe_ends(fds, covered: dict[str, int], stdio: str, root_fds=()) -> None:
    """A pipe of which the tree held only one end led to another process:
    restored alone, its writes would die of SIGPIPE and its reads see EOF.
    Refuse it, naming the fd and how to give it a stand-in. ``covered``
    (links or "fdN" of the root's ``root_fds``) have one."""
    modes: dict[tuple[int, int], set[int]] = {}
    first: dict[tuple[int, int], object] = {}
    root = {id(e) for e in root_fds}
    for e in fds:
        if e.type != files_pb2.FD_PIPE or e.path in covered or e.pipe_peer_closed or (
                id(e) in root and f"fd{e.fd}" in covered):
            continue
        key = (e.dev, e.pipe_id)
        acc = e.flags & os.O_ACCMODE
        modes.setdefault(key, set()).update((os.O_RDONLY, os.O_WRONLY) if acc == os.O_RDWR
                                            else (acc,))
        first.setdefault(key, e)
    for key, m in modes.items():
        if len(m) == 2:
            continue
        e = first[key]
        end = "read" if os.O_RDONLY in m else "write"
        hint = f"--inherit-fd fd[N]:{e.path}"
        if e.fd <= 2:
            hint += " or --stdio inherit|null|FILE"
        raise RestoreError(f"fd {e.fd} ({e.path}) is the {end} end of a pipe whose other end "
                           f"is not in the process (another process held it): restored alone, "
                           f"the program would see EOF or die of SIGPIPE; give it a stand-in: "
                           f"{hint}")


def _free_page(vmas) -> int:
    """The address of a page no VMA of the image covers (the highest hole
    below the highest VMA, above the usual mmap_min_addr)."""
    return _free_page_in(sorted([(v.start, v.end) for v in vmas]))


def _free_page_in(spans: list[tuple[int, int]]) -> int:
    """:func:`_free_page` of sorted (start, end) pairs."""
    top = TASK_SIZE
    for start, end in reversed(spans):
        if end <= top - PAGE:
            return top - PAGE
        top = min(top, start)
    if top - PAGE >= 0x10000:
        return top - PAGE
    raise RestoreError("the image's VMAs leave no free page for the restorer's scratch page")


def _load(images_dir: str, sign_key: bytes | None = None):
    # every frame's checksum before anything starts; then each frame is
    # read and decompressed once, while the pages are written
    chain = open_chain(images_dir, verify_frames="crc", sign_key=sign_key,
                       threads=os.cpu_count() or 1)
    try:
        if chain.top.kind != KIND_DUMP:
            raise ImageError("the chain ends with a pre-dump: there is no complete state to "
                             "restore (run `checkpoint dump` first)", path=chain.top.path)
        nodes = _tree_records(chain.top.decoded_records(), chain.top.path)
    except BaseException:
        chain.close()
        raise
    return chain, nodes


PER_PROCESS = ("pstree", "mm", "files", "signals", "process")


def _tree_records(records, path: str) -> list:
    """The final layer's records by process, in the tree's order (each
    record names its pid; the pstree records give the order)."""
    from .objects.pstree import Node
    trees, by_pid = [], {}
    for kind, msg in records:
        if kind == "pstree":
            trees.append(msg)
            if not msg.zombie:
                by_pid.setdefault(msg.pid, {"core": []})
    for kind, msg in records:
        if kind == "pstree" and msg.zombie:
            continue
        if kind in PER_PROCESS or kind == "core":
            pid = msg.pid
            if pid not in by_pid:
                raise ImageError(f"a {kind} record of PID {pid}, which the tree does not hold",
                                 path=path)
            if kind == "core":
                by_pid[pid]["core"].append(msg)
            elif kind in by_pid[pid] and kind != "pstree":
                raise ImageError(f"two {kind} records of PID {pid}", path=path)
            else:
                by_pid[pid][kind] = msg
    if not trees:
        raise ImageError("the final layer lacks records: ['pstree']", path=path)
    nodes = []
    for t in trees:
        rec = None if t.zombie else by_pid[t.pid]
        if rec is not None:
            missing = set(PER_PROCESS) - set(rec)
            if missing or not rec["core"]:
                raise ImageError(f"the final layer lacks records of PID {t.pid}: "
                                 f"{sorted(missing) or ['core']}", path=path)
        nodes.append(Node(t, rec))
    return nodes


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off for a restore: its passes over the
    objects of a big image (30,000 VMAs) cost ~10% of the restore, and a
    restore makes no cycles worth collecting in the meantime."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def restore(images_dir: str | os.PathLike, *, detach: bool = False, new_pids: bool = False,
            pid_ns: bool = False,
            inherit_stdio: bool = True, inherit: dict[str, int] | None = None,
            restart_block: str = "eintr", sign_key: bytes | None = None,
            action_scripts: list[str] | None = None, stdio: str | None = None,
            shell_job: bool = False, progress: bool | None = False) -> Restored:
    # ``progress``: a bar of the pages written on stderr (None: when it is a
    # terminal; the CLI's default, off with --json)
    # ``shell_job``: join this session as a job (CRIU's -j), not the dumped
    # session (objects/session.py)
    # ``stdio``: "inherit" / "null" / a file path / "none", for the dumped fds
    # 0-2 that were pipes or terminals (default: "inherit" with inherit_stdio)
    # SIGINT/SIGTERM only set a flag meanwhile: checked between build steps
    # (interrupt.py); the commit point is the thaw
    with stoppable(), _gc_paused():
        check_stop()
        return _restore(images_dir, detach=detach, new_pids=new_pids, pid_ns=pid_ns,
                        inherit_stdio=inherit_stdio, inherit=inherit,
                        restart_block=restart_block, sign_key=sign_key,
                        action_scripts=action_scripts, stdio=stdio, shell_job=shell_job,
                        progress=progress)


def _restore(images_dir, *, detach, new_pids, pid_ns, inherit_stdio, inherit,
             restart_block, sign_key=None, action_scripts=None, stdio=None,
             shell_job=False, progress=False) -> Restored:
    """Restore the process in ``images_dir``; returns once it runs.

    ``detach``: reap the process in the background when it exits (else the
    caller must ``wait()`` for it, as for any child).
    ``inherit`` maps a dumped fd key (its link, e.g. "pipe:[1234]" or
    "/dev/pts/3") to an fd of this engine that the restored process gets in
    its place (CRIU's --inherit-fd). ``inherit_stdio``: fds 0-2 that were
    pipes or terminals become this engine's own 0-2.
    """
    t0 = time.perf_counter()
    images_dir = os.fspath(images_dir)
    hooks.run(action_scripts, "pre-restore", images_dir=images_dir)
    chain, nodes = _load(images_dir, sign_key)
    # the dump's network locks go with this restore, also when it fails
    repairs = tcpsk.Repairs()
    try:
        rec = nodes[0].rec
        live = [n for n in nodes if n.rec is not None]
        repairs.expect([n.rec["files"] for n in live])
        # upb makes a Python object for a VMA each time a pass over mm.vmas
        # reaches it, unless one is alive: held for the restore's dozen passes
        vma_objects = [list(n.rec["mm"].vmas) for n in live]  # noqa: F841
        creds = proc_obj.caller_creds()
        for n in live:
            check_images(n.rec["process"], n.rec["mm"])
            proc_obj.validate(n.rec["process"], n.rec["core"], creds)
        tree = rec["pstree"]
        if len(nodes) > 1:
            tree_obj.check_tree(nodes, chain.top.path)
            if new_pids:
                raise UsageError(f"--new-pids only for a single process: this image holds a "
                                 f"tree of {len(nodes)} processes (restore with --pid-ns)")
        if new_pids and len(tree.threads) > 1:
            raise UsageError("--new-pids only for single-threaded processes: glibc caches "
                             "thread IDs (pthread_kill, robust mutexes would break)")
        inherit = dict(inherit or {})
        stdio = stdio if stdio is not None else ("inherit" if inherit_stdio else "none")
        keys, opened = _stdio_plan(rec["files"], inherit, stdio)
        pass_fds = tuple(sorted(set(inherit.values()) | set(opened)))
        try:
            _refuse_lone_pipe_ends([f for n in live for f in n.rec["files"].fds],
                                   {**inherit, **keys}, stdio, root_fds=rec["files"].fds)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        if new_pids and pid_ns:
            raise UsageError("--new-pids and --pid-ns exclude each other")
        session = session_obj.plan(tree.pid, tree.sid, tree.pgid, shell_job=shell_job,
                                   pid_ns=pid_ns, new_pids=new_pids,
                                   tty_nr=rec["process"].tty_nr)
        log.info("session and group: %s", session.how)
        if len(nodes) > 1:
            tree_obj.plan(nodes)
        seccomp = any(c.seccomp_mode for n in live for c in n.rec["core"])
        spawned = _Spawned()
        try:
            try:
                pid, waiter = _spawn_placeholder(None if new_pids else tree.pid, pass_fds,
                                                 pid_ns, spawned, session)
            finally:
                for fd in opened:   # the placeholder holds its own copies now
                    os.close(fd)
            proc = freeze_process(pid)
            procs = {tree.pid: proc}   # by dumped PID
            try:
                _trace_options(proc, seccomp)
                pages = _build_tree(chain, nodes, procs, {**keys, **inherit}, restart_block,
                                    session, progress, repairs)
                repairs.resume()   # every process is built: the connections' lock goes
                hooks.run(action_scripts, "post-restore", pid=pid, images_dir=images_dir)
                check_stop()  # the last chance: from the thaw on it runs
                hooks.run(action_scripts, "pre-resume", pid=pid, images_dir=images_dir)
                spawned.release_keeper()
            except BaseException:
                for p in reversed(list(procs.values())):
                    p.kill()  # still traced: it never runs half-built
                raise
            for p in reversed(list(procs.values())):   # children first, the root last
                p.thaw()
        except BaseException:
            spawned.kill()
            raise
        spawned.close()
    except BaseException:
        repairs.abort()
        raise
    finally:
        chain.close()
    ms = (time.perf_counter() - t0) * 1e3
    log.info("restored PID %d in %.1f ms", pid, ms)
    hooks.run(action_scripts, "post-resume", pid=pid, images_dir=images_dir, fatal=False)
    r = Restored(pid=pid, restore_ms=ms, pages_restored=pages, layers=len(chain.layers),
                 detached=detach, pid_ns=pid_ns, waiter=waiter,
                 tree=[n.pid for n in nodes])
    if detach:
        r._start_reaper()
    return r

