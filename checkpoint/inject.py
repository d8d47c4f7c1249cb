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

**A dying engine.** If the engine is killed while a thread runs injected
syscalls, the kernel detaches the thread and it runs on from whatever
registers it holds. So, where it can, the injector makes every state it
leaves the thread in one that returns by itself to where it was frozen:

- it writes a signal frame (``kernel/sigframe.py``) holding the thread's own
  registers, FPU/AVX state and signal mask below the thread's stack pointer
  and its red zone (where the kernel writes a frame when it delivers a
  signal there), and keeps the bytes it overwrote; the scratch page for
  syscall arguments is the stack page below that frame, so nothing is
  mapped (nothing can be left mapped) and no mmap/munmap is injected;
- each syscall is issued from a ``syscall; ret`` instruction of the
  program's libc with ``rsp`` at that frame, whose return address is the
  libc's ``rt_sigreturn`` trampoline (``__restore_rt``): if nobody stops the
  thread after the call, it returns straight into its frozen state;
- the thread's signals are blocked only after its registers point at that
  path, and on the way out the mask, the xstate and the registers are put
  back in that order (the registers last: until then the thread would still
  return through the frame); then the stack bytes are put back.

The memory below a stack pointer and its red zone is free by the x86_64
ABI: the kernel may write a signal frame there at any time. (Go's goroutine
stacks are the exception: Go takes every signal on an alternate stack, so
on a goroutine stack that memory may belong to something else; the bytes
are always put back, but a dying engine leaves a frame there.)

Where that is not possible (no such instructions in the target, less than
about 8 KiB of stack below its pointer, user shadow stacks, or a process
the restorer is building) the injector works as before: a ``syscall`` in
the vDSO, a scratch page it maps, and a dying engine can leave the thread
broken.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
from typing import Iterable

from . import faults
from .errors import CheckpointError, InjectionError, TargetExited
from .freezer import FrozenProcess, deferred_signals, wait_stop
from .kernel import procfs
from .kernel import ptrace as pt
from .kernel import sigframe
from .kernel.mem import ProcMem  # noqa: F401  (re-exported)
from .kernel.syscalls import NR, SYSCALL_NAME

PAGE_SIZE = procfs.PAGE_SIZE
SYSCALL_INSN = b"\x0f\x05"
SYSCALL_RET = b"\x0f\x05\xc3"                                  # syscall; ret
RESTORE_RT = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",      # mov $15,%rax; syscall
              b"\xb8\x0f\x00\x00\x00\x0f\x05")               # mov $15,%eax; syscall
RED_ZONE = 128
GADGET_SEARCH_BUDGET = 32 << 20  # bytes of executable mappings read at most
ALL_SIGNALS = (1 << 64) - 1

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000

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


_SAFE_GADGETS: dict[int, tuple[int, int]] = {}  # pid -> (syscall;ret, rt_sigreturn)


def find_return_gadgets(pid: int, mem: ProcMem,
                        vmas: Iterable[procfs.Vma] | None = None) -> tuple[int, int] | None:
    """(address of ``syscall; ret``, address of an ``rt_sigreturn``
    trampoline) in the executable file mappings of ``pid`` (libc first), or
    None. Cached per process and re-checked by reading the bytes back."""
    cached = _SAFE_GADGETS.get(pid)
    if cached is not None:
        g, r = cached
        try:
            if mem.read(g, 3) == SYSCALL_RET and any(mem.read(r, len(p)) == p
                                                     for p in RESTORE_RT):
                return cached
        except (OSError, CheckpointError):
            pass
        del _SAFE_GADGETS[pid]
    vmas = list(vmas if vmas is not None else procfs.read_maps(pid))
    ordered = sorted((v for v in vmas if v.executable and v.is_file),
                     key=lambda v: ("libc" not in v.path.rsplit("/", 1)[-1], v.start))
    g = r = None
    budget = GADGET_SEARCH_BUDGET
    for v in ordered:
        if budget <= 0:
            break
        n = min(v.size, budget)
        budget -= n
        try:
            data = mem.read(v.start, n)
        except (OSError, CheckpointError):
            continue
        if g is None:
            i = data.find(SYSCALL_RET)
            g = v.start + i if i >= 0 else None
        if r is None:
            for pat in RESTORE_RT:
                i = data.find(pat)
                if i >= 0:
                    r = v.start + i
                    break
        if g is not None and r is not None:
            _SAFE_GADGETS[pid] = (g, r)
            return g, r
    return None


def _shadow_stack(pid: int, tid: int) -> bool:
    try:
        return "shstk" in procfs.read_status(pid, tid).raw.get("x86_Thread_features", "")
    except CheckpointError:
        return False


class Injector:
    """Owns one frozen thread's registers while syscalls are injected into it."""

    def __init__(self, proc: FrozenProcess, tid: int | None = None, *, safe: bool = True):
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
        self._masked = False  # the thread's signals are blocked (by us)
        self._scratch: int | None = None
        self._scratch_mapped = False  # mmap'ed by us (plain mode): munmap on exit
        self._want_safe = safe
        # the return path of a thread whose engine died (module docstring):
        self._ret_gadget: int | None = None  # libc "syscall; ret"
        self._frame_at = 0          # the signal frame below the thread's stack
        self._stack_at = 0          # lowest stack byte we use (the scratch page)
        self._stack_saved: bytes | None = None  # what the scratch and frame cover
        self.count = 0

    @property
    def safe(self) -> bool:
        """Whether a dying engine leaves this thread returning to its frozen state."""
        return self._stack_saved is not None

    # -- context ----------------------------------------------------------

    def __enter__(self) -> "Injector":
        with deferred_signals():
            tid = self.tid
            try:
                self.saved_regs = pt.getregs(tid)
                self.saved_xstate = pt.getregset(tid, pt.NT_X86_XSTATE)
                self.saved_sigmask = pt.getsigmask(tid)
            except OSError as exc:
                self.saved_regs = None
                raise self._gone_or(exc, "saving registers") from None
            self.thread.injected = True
        try:
            self.mem = self.proc.mem
            if self.proc._gadget is None:
                self.proc._gadget = find_syscall_gadget(self.proc.pid, self.mem)
            if self._want_safe:
                with deferred_signals():
                    self._place_frame()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _place_frame(self) -> None:
        """Put the signal frame and the scratch page below the thread's stack
        (module docstring); stay in plain mode when that cannot be done."""
        regs, tid, pid = self.saved_regs, self.tid, self.proc.pid
        if _shadow_stack(pid, tid):
            return
        gadgets = find_return_gadgets(pid, self.mem, self.proc.maps())
        if gadgets is None:
            return
        top = (regs.rsp - RED_ZONE) & ~15
        at = (top - sigframe.span(len(self.saved_xstate))) & ~15
        lo = (at - PAGE_SIZE) & ~63
        stack = next((v for v in self.proc.maps() if v.start <= regs.rsp - 1 < v.end), None)
        if stack is None or not stack.writable or lo < stack.start:
            return
        frame = sigframe.build(at, gadgets[1], regs, self.saved_xstate, self.saved_sigmask)
        saved = self.mem.read(lo, top - lo)
        self._stack_saved = saved   # from here on the bytes are put back, whatever happens
        self._stack_at, self._frame_at, self._ret_gadget = lo, at, gadgets[0]
        self._scratch = lo
        self.mem.write(at, frame)

    def __exit__(self, *exc) -> None:
        with deferred_signals():
            try:
                if self._scratch_mapped and exc[0] is not TargetExited:
                    try:
                        self._syscall(NR["munmap"], self._scratch, PAGE_SIZE)
                    except Exception:
                        pass
                self._scratch, self._scratch_mapped = None, False
                self._restore()
            finally:
                self.thread.injected = False

    def _restore(self) -> None:
        """Park the thread in an interrupt stop, then put back its mask, its
        xstate and last its registers (until then a dying engine's thread
        still returns through the frame), then the stack under the frame."""
        if self.saved_regs is None:
            return
        tid = self.tid
        try:
            if self._at_syscall_stop:
                self._park()
            faults.point("inject.restore")
            pt.setsigmask(tid, self.saved_sigmask)
            pt.setregset(tid, pt.NT_X86_XSTATE, self.saved_xstate)
            pt.setregs(tid, self.saved_regs)
            self._masked = False
            if self._stack_saved is not None:
                self.mem.write(self._stack_at, self._stack_saved)
                self._stack_saved = None
        except (OSError, CheckpointError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ESRCH and \
                    not os.path.exists(f"/proc/{self.proc.pid}/task/{tid}"):
                return  # the thread died (SIGKILL): nothing left to restore
            why = os.strerror(exc.errno) if isinstance(exc, OSError) else str(exc)
            raise InjectionError(f"could not restore thread {tid} of {self.proc.pid}: "
                                 f"{why}", self.proc.pid) from None

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
        if self._stack_saved is not None:
            regs.rip, regs.rsp = self._ret_gadget, self._frame_at
        else:
            regs.rip = self.proc._gadget
        regs.rax = nr
        regs.orig_rax = _u64(-1)
        for name, value in zip(_ARG_REGS, args):
            setattr(regs, name, _u64(value))
        tid = self.tid
        try:
            pt.setregs(tid, regs)
            if not self._masked:  # only once the registers lead back to the frame
                pt.setsigmask(tid, ALL_SIGNALS)
                self._masked = True
            faults.point("inject.entry")
            self._step_to_syscall_stop()  # entry
            self._at_syscall_stop = True
            self._step_to_syscall_stop()  # exit
            res = _s64(pt.getregs(tid).rax)
        except OSError as exc:
            raise self._gone_or(exc, f"injecting {SYSCALL_NAME.get(nr, nr)}") from None
        self.count += 1
        faults.point("inject.exit")
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
            self._stack_saved = None
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
        self._scratch, self._scratch_mapped = None, False

    def map_scratch(self, addr: int) -> int:
        """Map the scratch page at ``addr`` exactly (MAP_FIXED_NOREPLACE: never
        over a mapping), for a caller that is about to fill the address space
        with MAP_FIXED mappings and knows a page none of them covers."""
        if self._scratch_mapped:
            self.call("munmap", self._scratch, PAGE_SIZE)
        got = self.call("mmap", addr, PAGE_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, _u64(-1), 0)
        if got != addr:
            raise InjectionError(f"scratch page mapped at {got:#x}, not {addr:#x}",
                                 self.proc.pid)
        self._scratch, self._scratch_mapped = got, True
        return got

    @property
    def scratch(self) -> int:
        """A page of the target's memory for syscall arguments: the stack
        page below the injector's signal frame (put back on exit), or in
        plain mode a private RW page mapped now and unmapped on exit."""
        if self._scratch is None:
            self._scratch = self.call("mmap", 0, PAGE_SIZE, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, _u64(-1), 0)
            self._scratch_mapped = True
        return self._scratch

    def read(self, addr: int, size: int) -> bytes:
        return self.mem.read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self.mem.write(addr, data)

    def read_u64(self, addr: int) -> int:
        return struct.unpack("<Q", self.read(addr, 8))[0]

    def batch(self, entries, *, at: int | None = None) -> list[int]:
        """Run a table of syscalls for one ptrace round trip (``batch.py``):
        entries ``(nr, a0..a5[, expect])``; stops at the first error, or
        result other than ``expect``, raising ``batch.BatchError`` naming the
        entry; else the list of results. ``at``: where to map the routine's
        area (``batch.area_size()`` bytes free of what the table maps)."""
        from . import batch
        return batch.run(self, entries, at=at)
