"""Freeze and thaw every thread of a process with PTRACE_SEIZE + INTERRUPT.

    with freeze(pid) as proc:
        ...            # every thread sits in a ptrace interrupt stop
    # every thread detached, running exactly as before

The tracer does not use PTRACE_O_EXITKILL: if the engine dies (even by
SIGKILL) the kernel detaches every thread and the target runs on.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from .errors import (CheckpointError, FreezeError, NoSuchProcess, PermissionDenied,
                     TargetError, TargetExited, UsageError)
from .interrupt import check as check_stop
from .interrupt import stoppable
from .kernel import procfs
from .kernel import ptrace as pt

if TYPE_CHECKING:
    from .kernel.mem import ProcMem

SEIZE_OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_TRACEEXEC
DEFAULT_TIMEOUT = 5.0

_DEFERRED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP/SIGQUIT until the block ends.

    Used around every sequence that must not be cut in half (a ptrace round
    trip that changes a thread's registers, the thaw): the signal is not
    lost, its Python handler runs right after the block.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wait_stop(tid: int, timeout: float = DEFAULT_TIMEOUT) -> pt.WaitStatus:
    """Wait for the next ptrace event of ``tid``, polling so a hung task
    cannot hang the engine; raises FreezeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    spins = 0
    delay = 2e-5
    while True:
        st = pt.waitpid(tid, os.WNOHANG)
        if st is not None:
            return st
        if spins < 200:
            spins += 1
            os.sched_yield()
            continue
        if time.monotonic() > deadline:
            state = _task_state(tid)
            raise FreezeError(f"thread {tid} did not stop within {timeout:g}s "
                              f"(state {state or 'gone'}"
                              f"{': uninterruptible sleep' if state == 'D' else ''})", tid)
        time.sleep(delay)
        delay = min(delay * 2, 2e-3)


def _task_state(tid: int) -> str:
    try:
        with open(f"/proc/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@dataclass
class FrozenThread:
    tid: int
    group_stop: bool = False  # stopped by SIGSTOP & co. before we came
    pending_signal: int = 0  # a stop signal we held back; delivered at detach
    injected: bool = False  # an Injector currently owns its registers


class _RetryFreeze(Exception):
    pass


@dataclass
class FrozenProcess:
    """A process whose every live thread is in a ptrace stop."""

    pid: int
    timeout: float = DEFAULT_TIMEOUT
    threads: dict[int, FrozenThread] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)
    freezing_ms: float = 0.0
    _gadget: int | None = None
    _mem: "ProcMem | None" = None
    _maps: "list[procfs.Vma] | None" = None

    @property
    def mem(self) -> "ProcMem":
        """/proc/PID/mem of the frozen process, opened once, closed on thaw."""
        if self._mem is None:
            from .kernel.mem import ProcMem
            self._mem = ProcMem(self.pid)
        return self._mem

    def maps(self) -> list[procfs.Vma]:
        """/proc/PID/maps as read once in this freeze (the layout cannot change
        while every thread is stopped, but for the engine's own scratch pages)."""
        if self._maps is None:
            self._maps = procfs.read_maps(self.pid)
        return self._maps

    @property
    def tids(self) -> list[int]:
        return sorted(self.threads)

    # -- freezing ---------------------------------------------------------

    def _freeze(self) -> None:
        t0 = time.perf_counter()
        self._wait_out_uninterruptible()
        while True:
            check_stop()
            new = [t for t in procfs.list_tasks(self.pid)
                   if t not in self.threads and t not in self.gone]
            new = [t for t in new if _task_state(t) not in ("Z", "X", "")]
            if not new:
                break
            seized = []
            for tid in new:
                if self._seize(tid):
                    seized.append(tid)
            for tid in seized:
                self._await_interrupt_stop(tid)
        if not self.threads:
            raise TargetExited(f"process {self.pid} exited while being frozen", self.pid)
        self.freezing_ms = (time.perf_counter() - t0) * 1e3

    def _wait_out_uninterruptible(self) -> None:
        """A thread in uninterruptible sleep (a vfork parent, a stuck NFS
        read...) cannot reach an interrupt stop, and a seized thread that
        is not stopped cannot be detached: give such threads up to the
        timeout to wake, then refuse before touching anything."""
        deadline = time.monotonic() + self.timeout
        while True:
            stuck = [t for t in procfs.list_tasks(self.pid) if _task_state(t) == "D"]
            if not stuck:
                return
            check_stop()
            if time.monotonic() > deadline:
                raise FreezeError(f"thread {stuck[0]} of process {self.pid} stays in "
                                  "uninterruptible sleep (state D: in vfork, or waiting on "
                                  f"I/O) for {self.timeout:g}s; nothing was touched, try again",
                                  self.pid)
            time.sleep(0.005)

    def _seize(self, tid: int) -> bool:
        # a thread under seccomp would filter the engine's injected syscalls
        # (a filter may kill it for them): suspend its filters while traced
        suspend = _seccomp_mode(self.pid, tid) != 0
        try:
            pt.seize(tid, SEIZE_OPTIONS | (pt.PTRACE_O_SUSPEND_SECCOMP if suspend else 0))
        except OSError as exc:
            if exc.errno == errno.ESRCH:  # exited between listing and seizing
                self.gone.add(tid)
                return False
            if exc.errno == errno.EPERM and suspend and _tracer_of(tid) == 0 and \
                    _task_state(tid) not in ("Z", "X", ""):
                raise PermissionDenied(f"thread {tid} of process {self.pid} runs under seccomp:"
                                       " the engine must suspend its filters while it injects"
                                       " syscalls (PTRACE_O_SUSPEND_SECCOMP), which needs"
                                       " CAP_SYS_ADMIN; nothing was touched", self.pid) from None
            if exc.errno == errno.EPERM:
                tracer = _tracer_of(tid)
                if tracer == os.getpid():
                    # auto-attached by PTRACE_O_TRACECLONE before its parent's
                    # clone event reached us: its first stop is ours to wait for
                    self.threads[tid] = FrozenThread(tid)
                    return True
                if tracer:
                    raise FreezeError(f"process {self.pid} is already traced by PID {tracer}"
                                      " (a debugger or another checkpoint engine);"
                                      " detach it first", self.pid) from None
                if _task_state(tid) in ("Z", "X", ""):
                    self.gone.add(tid)
                    return False
                raise PermissionDenied(f"not permitted to ptrace process {self.pid}"
                                       " (needs CAP_SYS_PTRACE or the same uid,"
                                       " and ptrace_scope allowing it)", self.pid) from None
            raise
        self.threads[tid] = FrozenThread(tid)
        try:
            pt.interrupt(tid)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        return True

    def _await_interrupt_stop(self, tid: int) -> None:
        """Wait until ``tid`` sits in PTRACE_EVENT_STOP, handling what comes first."""
        while True:
            try:
                st = wait_stop(tid, self.timeout)
            except ChildProcessError:
                self._forget(tid)
                return
            if st.exited:
                self._forget(tid)
                if tid == self.pid:
                    raise TargetExited(f"process {self.pid} exited while being frozen"
                                       f" ({st.describe()})", self.pid)
                return
            if st.is_interrupt_stop:
                # stopsig SIGTRAP: our interrupt; a stop signal: a group stop
                if st.stopsig != signal.SIGTRAP:
                    self.threads[tid].group_stop = True
                self._undo_stop_eintr(tid)
                return
            if st.event == pt.PTRACE_EVENT_CLONE:
                child = pt.geteventmsg(tid)
                if child not in self.threads:
                    self.threads[child] = FrozenThread(child)  # auto-attached
                    self._await_interrupt_stop(child)
                self._resume_towards_stop(tid)
                continue
            if st.event == pt.PTRACE_EVENT_EXEC:
                raise _RetryFreeze()
            if st.is_signal_delivery_stop:
                # let the signal through; the pending interrupt stops the
                # thread right after (in its handler, a consistent state)
                self._resume_towards_stop(tid, st.stopsig)
                continue
            self._resume_towards_stop(tid)

    def _undo_stop_eintr(self, tid: int) -> None:
        """Some blocking calls (epoll_wait, semop, sigtimedwait, io_getevents,
        inotify reads... see signal(7), "interruption by stop signals") fail
        with EINTR when the thread is merely stopped, without a signal. If
        the thread sits right after such a failed syscall and no signal is
        pending for it, that EINTR is ours: rewind the thread onto its
        ``syscall`` instruction so it issues the call again on thaw (a
        relative timeout then restarts in full: never earlier than asked)."""
        regs = pt.getregs(tid)
        if regs.rax != (1 << 64) - errno.EINTR or regs.orig_rax >= 1 << 63:
            return
        st = procfs.read_status(self.pid, tid)
        if (st.sig_pnd | st.shd_pnd) & ~st.sig_blk:
            return  # a real signal will be delivered: its EINTR is genuine
        try:
            if self.mem.read(regs.rip - 2, 2) != b"\x0f\x05":
                return  # not right after a syscall instruction (e.g. a handler)
        except (OSError, CheckpointError):
            return
        regs.rip -= 2
        regs.rax = regs.orig_rax
        pt.setregs(tid, regs)

    def _resume_towards_stop(self, tid: int, sig: int = 0) -> None:
        pt.interrupt(tid)
        pt.cont(tid, sig)

    def _forget(self, tid: int) -> None:
        self.threads.pop(tid, None)
        self.gone.add(tid)

    # -- thawing ----------------------------------------------------------

    def thaw(self) -> None:
        """Detach every thread; never raises for threads that died meanwhile."""
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        with deferred_signals():
            errors = []
            for tid in sorted(self.threads, key=lambda t: t == self.pid):
                try:
                    self._release(self.threads[tid])
                except Exception as exc:  # keep releasing the others
                    errors.append(f"thread {tid}: {exc}")
            self.threads.clear()
            if errors:
                raise FreezeError(f"could not release every thread of {self.pid}: "
                                  + "; ".join(errors), self.pid)

    def kill(self) -> None:
        """SIGKILL the frozen process and wait until every thread is gone (it
        never runs again: nothing it does after a dump can be lost)."""
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        with deferred_signals():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for tid in sorted(self.threads, key=lambda t: t == self.pid):
                for _ in range(100):
                    try:
                        st = wait_stop(tid, self.timeout)
                    except (ChildProcessError, FreezeError):
                        break
                    if st.exited:
                        break
                    try:  # a stop reported on the way out: let it go on dying
                        pt.cont(tid)
                    except OSError:
                        break
            self.threads.clear()

    def _release(self, th: FrozenThread) -> None:
        tid = th.tid
        for _ in range(3):
            try:
                pt.detach(tid, th.pending_signal)
                return
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise
            # ESRCH: either dead (reap it) or not in a ptrace stop (stop it)
            try:
                st = pt.waitpid(tid, os.WNOHANG)
            except ChildProcessError:
                return  # no longer ours
            if st is not None and st.exited:
                return
            if st is None:
                try:
                    pt.interrupt(tid)
                except OSError:
                    return
                try:
                    st = wait_stop(tid, self.timeout)
                except ChildProcessError:
                    return
                if st.exited:
                    return
        pt.detach(tid, th.pending_signal)

    def __enter__(self) -> "FrozenProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.thaw()


def _seccomp_mode(pid: int, tid: int) -> int:
    try:
        return int(procfs.read_status(pid, tid).raw.get("Seccomp", "0") or 0)
    except (CheckpointError, ValueError):
        return 0


def _tracer_of(pid: int) -> int:
    try:
        return procfs.read_status(pid).tracer_pid
    except CheckpointError:
        return 0


def check_target(pid: int) -> procfs.Status:
    """Refuse targets that cannot be frozen, with a message that says why."""
    if pid <= 0:
        raise NoSuchProcess(f"invalid PID {pid}", pid)
    if pid == os.getpid():
        raise TargetError(f"process {pid} is the engine itself", pid)
    try:
        status = procfs.read_status(pid)
        stat = procfs.read_stat(pid)
    except NoSuchProcess:
        raise NoSuchProcess(f"no such process: {pid}", pid) from None
    if status.tgid != pid:
        raise TargetError(f"{pid} is a thread of process {status.tgid}; give the process ID",
                          pid)
    if stat.is_kernel_thread:
        raise TargetError(f"process {pid} ({status.name}) is a kernel thread", pid)
    if status.state in ("Z", "X") and status.threads <= 1:
        raise TargetError(f"process {pid} is a zombie (exited, not yet reaped by its parent)",
                          pid)
    if status.tracer_pid:
        raise FreezeError(f"process {pid} is already traced by PID {status.tracer_pid}"
                          " (a debugger or another checkpoint engine); detach it first", pid)
    return status


def freeze_process(pid: int, timeout: float = DEFAULT_TIMEOUT) -> FrozenProcess:
    """Freeze every thread of ``pid``; on any failure nothing stays stopped."""
    check_target(pid)
    for attempt in range(3):
        proc = FrozenProcess(pid, timeout)
        try:
            with deferred_signals():
                proc._freeze()
            return proc
        except _RetryFreeze:
            proc.thaw()
            if attempt == 2:
                raise FreezeError(f"process {pid} keeps calling exec while being frozen",
                                  pid) from None
        except BaseException:
            proc.thaw()
            raise
    raise AssertionError("unreachable")


@contextmanager
def freeze(pid: int, timeout: float = DEFAULT_TIMEOUT) -> Iterator[FrozenProcess]:
    """Context manager: every thread frozen inside, always thawed on exit.
    A stop signal during the freeze itself is acted on once it is safe; the
    body runs with the caller's own signal handlers."""
    proc = None
    try:
        with stoppable():
            proc = freeze_process(pid, timeout)
        yield proc
    finally:
        if proc is not None:
            proc.thaw()


@dataclass
class Zombie:
    """A child that exited and is not reaped yet: nothing to freeze."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    exit_code: int   # its wait status (/proc/PID/stat exit_code)
    comm: str
    start_time: int


@dataclass
class FrozenTree:
    """A process and every descendant, each frozen (``procs``, the root
    first, parents before children), and the zombie children found."""

    root: int
    procs: list[FrozenProcess] = field(default_factory=list)
    zombies: list[Zombie] = field(default_factory=list)
    freezing_ms: float = 0.0

    @property
    def by_pid(self) -> dict[int, FrozenProcess]:
        return {p.pid: p for p in self.procs}

    @property
    def threads(self) -> bool:
        """Something is still frozen."""
        return any(p.threads for p in self.procs)

    def thaw(self) -> None:
        """Children first: a parent thawed first could wait() for one still
        stopped; every process is released even when one fails."""
        errors = []
        for p in reversed(self.procs):
            try:
                p.thaw()
            except FreezeError as exc:
                errors.append(str(exc))
        if errors:
            raise FreezeError("; ".join(errors), self.root)

    def kill(self) -> None:
        for p in self.procs:
            with deferred_signals():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.kill()


def _children_of(pid: int, tids) -> list[int]:
    out: set[int] = set()
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return sorted(out)


KCMP_VM = 1


def _same_mm(a: int, b: int) -> bool:
    from .kernel.syscalls import NR, raw_syscall
    try:
        return raw_syscall(NR["kcmp"], a, b, KCMP_VM, 0, 0) == 0
    except OSError:
        return False


def freeze_tree(root: int, timeout: float = DEFAULT_TIMEOUT,
                max_procs: int = 4096) -> FrozenTree:
    """Freeze the tree (``_freeze_tree``). A process still sharing its
    parent's memory (a vfork child that has not called exec yet: gcc, make
    and posix_spawn work that way) cannot be restored as a tree of its own
    address spaces; the tree is thawed and frozen again a moment later,
    when the child has called exec, for up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        tree = _freeze_tree(root, timeout, max_procs)
        by_pid = tree.by_pid
        shared = [p.pid for p in tree.procs[1:]
                  if (par := _ppid(p.pid)) in by_pid and _same_mm(p.pid, par)]
        if not shared:
            return tree
        tree.thaw()
        if time.monotonic() > deadline:
            raise FreezeError(f"process {shared[0]} shares its parent's memory (a vfork child "
                              "that has not called exec, or CLONE_VM): not supported", shared[0])
        check_stop()
        time.sleep(0.002)


def _ppid(pid: int) -> int:
    try:
        return procfs.read_stat(pid).ppid
    except CheckpointError:
        return 0


def _freeze_tree(root: int, timeout: float = DEFAULT_TIMEOUT,
                 max_procs: int = 4096) -> FrozenTree:
    """Freeze ``root`` and all its descendants. A process forking while the
    tree is frozen has its new child found and frozen too: the tree is
    listed again until a pass finds nothing new (a frozen process cannot
    fork, so this ends). A child that exits meanwhile is left out, or
    recorded as a zombie; on any failure nothing stays stopped."""
    t0 = time.perf_counter()
    tree = FrozenTree(root)
    frozen: dict[int, FrozenProcess] = {}
    zombies: dict[int, Zombie] = {}
    try:
        frozen[root] = freeze_process(root, timeout)
        order = [root]
        while True:
            check_stop()
            found = False
            for pid in list(order):
                proc = frozen.get(pid)
                if proc is None:
                    continue
                for kid in _children_of(pid, proc.tids):
                    if kid in frozen or kid in zombies:
                        continue
                    if len(frozen) + len(zombies) >= max_procs:
                        raise FreezeError(f"the tree of {root} has more than {max_procs} "
                                          "processes", root)
                    z = _zombie(kid)
                    if z is not None:
                        zombies[kid] = z
                        order.append(kid)
                        continue
                    try:
                        frozen[kid] = freeze_process(kid, timeout)
                    except (NoSuchProcess, TargetExited):
                        z = _zombie(kid)   # it exited meanwhile
                        if z is not None:
                            zombies[kid] = z
                            order.append(kid)
                        continue
                    except TargetError as exc:
                        if _zombie(kid) is not None:
                            zombies[kid] = _zombie(kid)
                            order.append(kid)
                            continue
                        raise type(exc)(f"child {kid} of {pid}: {exc}", kid) from None
                    order.append(kid)
                    found = True
            if not found:
                break
        tree.procs = [frozen[p] for p in order if p in frozen]
        tree.zombies = [zombies[p] for p in order if p in zombies]
    except BaseException:
        for p in reversed(list(frozen.values())):
            try:
                p.thaw()
            except FreezeError:
                pass
        raise
    tree.freezing_ms = (time.perf_counter() - t0) * 1e3
    return tree


def _zombie(pid: int) -> Zombie | None:
    try:
        st = procfs.read_stat(pid)
    except CheckpointError:
        return None
    if st.state not in ("Z", "X"):
        return None
    return Zombie(pid=pid, ppid=st.ppid, pgid=st.pgrp, sid=st.session,
                  exit_code=st.exit_code, comm=st.comm, start_time=st.starttime)


# --------------------------------------------------------------------------
# cgroup v2 freezer (--freeze-cgroup)


def _cgroup_file(path: str, name: str) -> str:
    return os.path.join(path, name)


def check_freeze_cgroup(path: str, pid: int) -> str:
    """``path``: a cgroup v2 directory holding ``pid``; returns it resolved."""
    real = os.path.realpath(path)
    if not os.path.isfile(_cgroup_file(real, "cgroup.freeze")):
        raise UsageError(f"--freeze-cgroup {path}: not a cgroup v2 directory with "
                         "cgroup.freeze (the v1 freezer is not supported)")
    mounts = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                mounts.append(parts[1])
    root = next((m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")), None)
    if root is None:
        raise UsageError(f"--freeze-cgroup {path}: not under a cgroup2 mount")
    rel = "/" + os.path.relpath(real, root) if real != root else "/"
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            mine = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")),
                        None)
    except OSError:
        raise NoSuchProcess(f"no such process: {pid}", pid) from None
    if mine is None or not (mine == rel or mine.startswith(rel.rstrip("/") + "/")):
        raise UsageError(f"--freeze-cgroup {path}: process {pid} is not in it (it is in "
                         f"{mine})")
    return real


@contextmanager
def cgroup_frozen(path: str, timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """The cgroup frozen (cgroup.freeze = 1, until cgroup.events says
    frozen) for the block, thawed after it whatever happens: no process in
    it can fork or run meanwhile, however fast it forks; ptrace still seizes
    and interrupts its tasks (a ptrace stop takes precedence over the
    freezer's)."""
    freeze = _cgroup_file(path, "cgroup.freeze")
    with deferred_signals():
        with open(freeze, "w") as f:
            f.write("1")
    try:
        deadline = time.monotonic() + timeout
        while True:
            with open(_cgroup_file(path, "cgroup.events")) as f:
                if "frozen 1" in f.read():
                    break
            if time.monotonic() > deadline:
                raise FreezeError(f"cgroup {path} did not freeze within {timeout} s", 0)
            check_stop()
            time.sleep(0.001)
        yield
    finally:
        with deferred_signals():
            with open(freeze, "w") as f:
                f.write("0")
