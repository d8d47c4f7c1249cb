"""ptrace(2) bindings, named as in include/uapi/linux/ptrace.h.

python-ptrace provides the raw call and the x86_64 ``user_regs_struct``; the
SEIZE-era requests it lacks (SEIZE, INTERRUPT, LISTEN, GETREGSET for
NT_X86_XSTATE, sigmask, rseq configuration, PEEKSIGINFO) are added here with
ctypes. Every function raises ``OSError`` with the kernel's errno; callers
translate that into the engine's errors with the context they know.

All requests for one tracee must come from the OS thread that attached it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

from ptrace.binding.func import ptrace as _raw_ptrace
from ptrace.binding.linux_struct import user_regs_struct
from ptrace.error import PtraceError

from .syscalls import iovec

__all__ = ["user_regs_struct"]

# requests (include/uapi/linux/ptrace.h, asm/ptrace-abi.h)
PTRACE_PEEKDATA = 2
PTRACE_POKEDATA = 5
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_GETFPREGS = 14
PTRACE_SETFPREGS = 15
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SETSIGINFO = 0x4203
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F

# options
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_TRACEFORK = 1 << 1
PTRACE_O_TRACEVFORK = 1 << 2
PTRACE_O_TRACECLONE = 1 << 3
PTRACE_O_TRACEEXEC = 1 << 4
PTRACE_O_TRACEVFORKDONE = 1 << 5
PTRACE_O_TRACEEXIT = 1 << 6
PTRACE_O_TRACESECCOMP = 1 << 7
PTRACE_O_EXITKILL = 1 << 20
PTRACE_O_SUSPEND_SECCOMP = 1 << 21

# events (status >> 16)
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7
PTRACE_EVENT_STOP = 128

PTRACE_PEEKSIGINFO_SHARED = 1

# regsets (include/uapi/linux/elf.h)
NT_PRSTATUS = 1
NT_PRFPREG = 2
NT_X86_XSTATE = 0x202

__WALL = 0x40000000

SIGINFO_SIZE = 128


def _call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    try:
        return _raw_ptrace(request, tid, addr, data)
    except PtraceError as exc:
        err = exc.errno or 0
        raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}") from None


def seize(tid: int, options: int = 0) -> None:
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid)


def listen(tid: int) -> None:
    _call(PTRACE_LISTEN, tid)


def cont(tid: int, sig: int = 0) -> None:
    _call(PTRACE_CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: run to the next syscall-enter or -exit stop."""
    _call(PTRACE_SYSCALL, tid, 0, sig)


def detach(tid: int, sig: int = 0) -> None:
    _call(PTRACE_DETACH, tid, 0, sig)


def setoptions(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, 0, options)


def geteventmsg(tid: int) -> int:
    v = ctypes.c_ulong()
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(v))
    return v.value


def getregs(tid: int) -> user_regs_struct:
    regs = user_regs_struct()
    _call(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def setregs(tid: int, regs: user_regs_struct) -> None:
    _call(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def getregset(tid: int, nt_type: int, max_size: int = 16384) -> bytes:
    """PTRACE_GETREGSET; the kernel trims the iovec to the real size."""
    buf = ctypes.create_string_buffer(max_size)
    iov = iovec(ctypes.addressof(buf), max_size)
    _call(PTRACE_GETREGSET, tid, nt_type, ctypes.addressof(iov))
    return buf.raw[: iov.iov_len]


def setregset(tid: int, nt_type: int, data: bytes) -> None:
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    iov = iovec(ctypes.addressof(buf), len(data))
    _call(PTRACE_SETREGSET, tid, nt_type, ctypes.addressof(iov))


def getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _call(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    m = ctypes.c_uint64(mask)
    _call(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(m))


def getsiginfo(tid: int) -> bytes:
    buf = ctypes.create_string_buffer(SIGINFO_SIZE)
    _call(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf.raw


class ptrace_peeksiginfo_args(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("nr", ctypes.c_int32)]


def peeksiginfo(tid: int, shared: bool, max_n: int = 64) -> list[bytes]:
    """Pending (queued) siginfos of a thread, or of the process if ``shared``."""
    out: list[bytes] = []
    buf = ctypes.create_string_buffer(SIGINFO_SIZE * max_n)
    while True:
        args = ptrace_peeksiginfo_args(len(out), PTRACE_PEEKSIGINFO_SHARED if shared else 0, max_n)
        n = _call(PTRACE_PEEKSIGINFO, tid, ctypes.addressof(args), ctypes.addressof(buf))
        n = ctypes.c_long(n).value
        for i in range(n):
            out.append(buf.raw[i * SIGINFO_SIZE:(i + 1) * SIGINFO_SIZE])
        if n < max_n:
            return out


class ptrace_rseq_configuration(ctypes.Structure):
    _fields_ = [
        ("rseq_abi_pointer", ctypes.c_uint64),
        ("rseq_abi_size", ctypes.c_uint32),
        ("signature", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class RseqConfig:
    pointer: int
    size: int
    signature: int
    flags: int


def get_rseq_configuration(tid: int) -> RseqConfig:
    c = ptrace_rseq_configuration()
    _call(PTRACE_GET_RSEQ_CONFIGURATION, tid, ctypes.sizeof(c), ctypes.addressof(c))
    return RseqConfig(c.rseq_abi_pointer, c.rseq_abi_size, c.signature, c.flags)


# --------------------------------------------------------------------------
# wait status decoding


@dataclass(frozen=True, slots=True)
class WaitStatus:
    tid: int
    raw: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.raw) or os.WIFSIGNALED(self.raw)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.raw)

    @property
    def stopsig(self) -> int:
        return os.WSTOPSIG(self.raw) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.raw >> 16) & 0xFF if self.stopped else 0

    @property
    def is_syscall_stop(self) -> bool:
        """A syscall-enter/exit stop (needs PTRACE_O_TRACESYSGOOD)."""
        return self.stopped and self.stopsig == (signal.SIGTRAP | 0x80) and self.event == 0

    @property
    def is_interrupt_stop(self) -> bool:
        """PTRACE_EVENT_STOP: interrupt, group-stop or new auto-attached child."""
        return self.stopped and self.event == PTRACE_EVENT_STOP

    @property
    def is_signal_delivery_stop(self) -> bool:
        return self.stopped and self.event == 0 and self.stopsig != (signal.SIGTRAP | 0x80)

    def describe(self) -> str:
        if os.WIFEXITED(self.raw):
            return f"exited with status {os.WEXITSTATUS(self.raw)}"
        if os.WIFSIGNALED(self.raw):
            return f"killed by {signal.Signals(os.WTERMSIG(self.raw)).name}"
        if self.stopped:
            return f"stopped (sig {self.stopsig}, event {self.event})"
        return f"status {self.raw:#x}"


def waitpid(tid: int, options: int = 0) -> WaitStatus | None:
    """waitpid(tid, __WALL|options); None when WNOHANG found nothing."""
    pid, status = os.waitpid(tid, __WALL | options)
    if pid == 0:
        return None
    return WaitStatus(pid, status)
