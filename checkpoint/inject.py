"""Run syscalls inside a frozen thread (x86_64).

    with freeze(pid) as proc, Injector(proc) as remote:
        remote.call("getpid")
        buf = remote.scratch            # a page of the target's memory
        remote.write(buf, b"...")

The recipe (shared/KERNEL.md): save the general registers, the xstate and the
signal mask; block every signal; point ``rip`` at a ``syscall`` instruction
already present in the target (the vDSO has some); set ``rax`` and the
arguments with ``orig_rax = -1``; PTRACE_SYSCALL to the entry stop, again to
the exit stop, read ``rax``. To leave, the thread is parked in an interrupt
stop (PTRACE_INTERRUPT + PTRACE_CONT, wait for PTRACE_EVENT_STOP) and only
then gets its registers, xstate and mask back: installed at that stop, an
interrupted syscall is restarted by the kernel exactly as if nothing had
happened, and no -ERESTART* value leaks into the program.

Each injected syscall runs with SIGINT/SIGTERM deferred, so the thread is
always at a known stop when an exception can unwind; ``__exit__`` always puts
the thread back, also on errors.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from typing import Iterable

from .errors import InjectionError, TargetExited
from .freezer import FrozenProcess, deferred_signals, wait_stop
from .kernel import procfs
from .kernel import ptrace as pt
from .kernel.mem import ProcMem  # noqa: F401  (re-exported)
from .kernel.syscalls import NR, SYSCALL_NAME

PAGE_SIZE = procfs.PAGE_SIZE
SYSCALL_INSN = b"\x0f\x05"
ALL_SIGNALS = (1 << 64) - 1

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20

_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def _u64(v: int) -> int:
    return v & 0xFFFF_FFFF_FFFF_FFFF


def _s64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def find_syscall_gadget(pid: int, mem: ProcMem, vmas: Iterable[procfs.Vma] | None = None) -> int:
    """Address of a ``syscall`` instruction in an executable mapping of ``pid``:
    the vDSO first (always there, never changes), then other text."""
    vmas = list(vmas if vmas is not None else procfs.read_maps(pid))
    ordered = sorted((v for v in vmas if v.executable and v.path != "[vsyscall]"),
                     key=lambda v: v.path != "[vdso]")
    for v in ordered:
        chunk = min(v.size, 1 << 20)
        try:
            data = mem.read(v.start, chunk)
        except (OSError, InjectionError):
            continue
        i = data.find(SYSCALL_INSN)
        if i >= 0:
            return v.start + i
    raise InjectionError(f"no syscall instruction found in any executable mapping of {pid}",
                         pid)


class Injector:
    """Owns one frozen thread's registers while syscalls are injected into it."""

    def __init__(self, proc: FrozenProcess, tid: int | None = None):
        self.proc = proc
        self.tid = proc.pid if tid is None else tid
        if self.tid not in proc.threads:
            raise InjectionError(f"thread {self.tid} is not frozen", self.tid)
        self.thread = proc.threads[self.tid]
        self.mem: ProcMem | None = None
        self.saved_regs: pt.user_regs_struct | None = None
        self.saved_xstate: bytes | None = None
        self.saved_sigmask: int | None = None
        self._at_syscall_stop = False  # True once we left the original interrupt stop
        self._scratch: int | None = None
        self.count = 0

    # -- context ----------------------------------------------------------

    def __enter__(self) -> "Injector":
        with deferred_signals():
            tid = self.tid
            try:
                self.saved_regs = pt.getregs(tid)
                self.saved_xstate = pt.getregset(tid, pt.NT_X86_XSTATE)
                self.saved_sigmask = pt.getsigmask(tid)
                pt.setsigmask(tid, ALL_SIGNALS)
            except OSError as exc:
                self.saved_regs = None
                raise self._gone_or(exc, "saving registers") from None
            self.thread.injected = True
        try:
            self.mem = self.proc.mem
            if self.proc._gadget is None:
                self.proc._gadget = find_syscall_gadget(self.proc.pid, self.mem)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        with deferred_signals():
            try:
                if self._scratch is not None and exc[0] is not TargetExited:
                    try:
                        self._syscall(NR["munmap"], self._scratch, PAGE_SIZE)
                    except Exception:
                        pass
                    self._scratch = None
                self._restore()
            finally:
                self.thread.injected = False

    def _restore(self) -> None:
        """Park the thread in an interrupt stop, then put back regs, xstate, mask."""
        if self.saved_regs is None:
            return
        tid = self.tid
        try:
            if self._at_syscall_stop:
                self._park()
            pt.setregs(tid, self.saved_regs)
            pt.setregset(tid, pt.NT_X86_XSTATE, self.saved_xstate)
            pt.setsigmask(tid, self.saved_sigmask)
        except OSError as exc:
            if exc.errno == errno.ESRCH and not os.path.exists(f"/proc/{self.proc.pid}/task/{tid}"):
                return  # the thread died (SIGKILL): nothing left to restore
            raise InjectionError(f"could not restore thread {tid} of {self.proc.pid}: "
                                 f"{os.strerror(exc.errno)}", self.proc.pid) from None

    def _park(self) -> None:
        pt.interrupt(self.tid)
        pt.cont(self.tid)
        while True:
            st = self._wait()
            if st.is_interrupt_stop:
                self._at_syscall_stop = False
                return
            self._hold_signal(st)
            pt.interrupt(self.tid)
            pt.cont(self.tid)

    # -- syscalls ---------------------------------------------------------

    def syscall(self, nr: int | str, *args: int) -> int:
        """Run one syscall in the thread; return the raw signed result (-errno on error)."""
        if isinstance(nr, str):
            nr = NR[nr]
        with deferred_signals():
            return self._syscall(nr, *args)

    def call(self, nr: int | str, *args: int) -> int:
        """Like :meth:`syscall` but raise InjectionError for a -errno result."""
        res = self.syscall(nr, *args)
        if -4096 < res < 0:
            name = nr if isinstance(nr, str) else SYSCALL_NAME.get(nr, str(nr))
            raise InjectionError(f"{name} in process {self.proc.pid} (thread {self.tid}) "
                                 f"failed: {os.strerror(-res)}", self.proc.pid, -res)
        return res

    def _syscall(self, nr: int, *args: int) -> int:
        if len(args) > 6:
            raise ValueError("at most 6 syscall arguments")
        regs = pt.user_regs_struct.from_buffer_copy(self.saved_regs)
        regs.rip = self.proc._gadget
        regs.rax = nr
        regs.orig_rax = _u64(-1)
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, _u64(value))
        tid = self.tid
        try:
            pt.setregs(tid, regs)
            self._step_to_syscall_stop()  # entry
            self._at_syscall_stop = True
            self._step_to_syscall_stop()  # exit
            res = _s64(pt.getregs(tid).rax)
        except OSError as exc:
            raise self._gone_or(exc, f"injecting {SYSCALL_NAME.get(nr, nr)}") from None
        self.count += 1
        return res

    def _step_to_syscall_stop(self) -> None:
        pt.syscall(self.tid)
        while True:
            st = self._wait()
            if st.is_syscall_stop:
                return
            # a signal-delivery stop (only SIGKILL/SIGSTOP-class get through a
            # full mask) or a stray interrupt stop: hold the signal, go on
            self._hold_signal(st)
            pt.syscall(self.tid)

    def _wait(self) -> pt.WaitStatus:
        try:
            st = wait_stop(self.tid, self.proc.timeout)
        except ChildProcessError:
            raise TargetExited(f"thread {self.tid} of process {self.proc.pid} is gone",
                               self.proc.pid) from None
        if st.exited:
            self.proc._forget(self.tid)
            self.saved_regs = None
            raise TargetExited(f"process {self.proc.pid} {st.describe()} during syscall"
                               " injection", self.proc.pid)
        return st

    def _hold_signal(self, st: pt.WaitStatus) -> None:
        if st.is_signal_delivery_stop and st.stopsig not in (signal.SIGTRAP,):
            self.thread.pending_signal = st.stopsig

    def _gone_or(self, exc: OSError, what: str) -> Exception:
        if exc.errno == errno.ESRCH:
            return TargetExited(f"thread {self.tid} of process {self.proc.pid} vanished while"
                                f" {what}", self.proc.pid)
        return InjectionError(f"{what} in thread {self.tid} of process {self.proc.pid}: "
                              f"{os.strerror(exc.errno)}", self.proc.pid, exc.errno)

    # -- helpers ----------------------------------------------------------

    def install_on_exit(self, regs: pt.user_regs_struct, xstate: bytes, sigmask: int) -> None:
        """Leave the thread with this state instead of the one it had (the
        restorer's final registers); installed at the interrupt stop."""
        self.saved_regs = regs
        self.saved_xstate = xstate
        self.saved_sigmask = sigmask

    def forget_scratch(self) -> None:
        """The scratch page was unmapped by an injected call (the restorer
        clears the whole address space): map a new one on next use."""
        self._scratch = None

    @property
    def scratch(self) -> int:
        """A private RW page mapped in the target for syscall arguments;
        unmapped when the injector exits."""
        if self._scratch is None:
            addr = self.call("mmap", 0, PAGE_SIZE, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, _u64(-1), 0)
            self._scratch = addr
        return self._scratch

    def read(self, addr: int, size: int) -> bytes:
        return self.mem.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]
