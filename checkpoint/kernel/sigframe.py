"""The x86_64 signal frame that ``rt_sigreturn(2)`` consumes, built by hand.

The injector writes one below a frozen thread's stack pointer (where the
kernel itself writes a frame when it delivers a signal there) holding the
thread's own registers, FPU/AVX state and signal mask, and points every
injected syscall's return at it: should the engine die while the thread
runs injected syscalls, the thread returns through ``rt_sigreturn`` to
exactly where it was frozen (``inject.py``). Layouts (Linux uapi):

- ``struct rt_sigframe`` (arch/x86/include/asm/sigframe.h): ``pretcode``
  (8), ``struct ucontext uc`` (304), ``struct siginfo info`` (128); 440 bytes;
  ``rt_sigreturn`` finds it at ``rsp - 8``;
- ``struct ucontext`` (asm-generic/ucontext.h): ``uc_flags``, ``uc_link``,
  ``uc_stack`` (24), ``uc_mcontext`` (``struct sigcontext``, 256),
  ``uc_sigmask`` (8);
- ``struct sigcontext`` (asm/sigcontext.h, 64-bit): r8..r15, rdi, rsi, rbp,
  rbx, rdx, rax, rcx, rsp, rip, eflags, cs/gs/fs/ss (u16 each), err,
  trapno, oldmask, cr2, fpstate (pointer), reserved1[8];
- the fpstate is the XSAVE area (the NT_X86_XSTATE regset bytes, 64-byte
  aligned) with ``struct _fpx_sw_bytes`` in its ``sw_reserved`` bytes
  (magic1, extended_size, xfeatures, xstate_size) and ``FP_XSTATE_MAGIC2``
  right after it (arch/x86/kernel/fpu/signal.c checks both).

``rt_sigreturn`` sets ``orig_rax = -1``: a frozen thread that was inside an
interrupted syscall would then see ``-ERESTART*`` as the syscall's result.
The frame therefore carries the registers with the restart already applied,
as the kernel does before it builds a frame for a signal handler: the call
is issued again with its original arguments. That includes
``-ERESTART_RESTARTBLOCK`` (nanosleep, poll, futex waits with a timeout):
``rt_sigreturn`` resets the kernel's restart block, so ``restart_syscall``
would only return EINTR; issued again, a relative timeout restarts in full,
so the call may wait longer, never shorter (the freezer's rule too).
"""

from __future__ import annotations

import struct

from . import cpuid

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
FRAME_SIZE = 440
_UC = 8                       # offset of uc in the frame
_MCONTEXT = _UC + 40          # uc_flags, uc_link, uc_stack
_SIGMASK = _MCONTEXT + 256
_SW_BYTES = 464               # sw_reserved in the legacy FXSAVE area
_XCR0_WORD = 464              # where the ptrace regset keeps XCR0 (xfeatures)
_XSTATE_BV = 512              # the XSAVE header: which components are not in init state
_XSAVE_MIN = 576              # legacy area and header

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
_U64 = (1 << 64) - 1

_GP = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx",
       "rdx", "rax", "rcx", "rsp", "rip", "eflags")


def restarted(regs) -> dict[str, int]:
    """The general registers of a frozen thread with an interrupted syscall
    set up to be issued again (module docstring)."""
    out = {name: getattr(regs, name) & _U64 for name in _GP}
    if regs.orig_rax < 1 << 63:
        err = (1 << 64) - regs.rax if regs.rax >= 1 << 63 else 0
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK):
            out["rax"], out["rip"] = regs.orig_rax, regs.rip - 2
    return out


def frame_size(xstate: bytes) -> tuple[int, int]:
    """(bytes, xfeatures) of XSAVE state a frame for this thread may carry.

    The kernel restores a frame's XSAVE state only when its size is no more
    than the thread's own signal-frame size, else it takes the legacy FXSAVE
    part alone and zeroes the upper YMM/ZMM halves. The regset is the
    largest size the CPU has; a thread's frame leaves out the dynamic
    (XFD) components, such as AMX tile data, unless the thread uses them
    (then their bit is set in the XSAVE header). Layout from CPUID (cpuid.py).
    """
    (xcr0,) = struct.unpack_from("<Q", xstate, _XCR0_WORD)
    comps = cpuid.layout()
    if not comps or len(xstate) < _XSAVE_MIN:
        return len(xstate), xcr0
    (xstate_bv,) = struct.unpack_from("<Q", xstate, _XSTATE_BV)
    end, features = _XSAVE_MIN, xcr0 & 0b11
    for i, (offset, size, dynamic) in comps.items():
        if not xcr0 >> i & 1 or (dynamic and not xstate_bv >> i & 1):
            continue
        end, features = max(end, offset + size), features | 1 << i
    return min(end, len(xstate)), features


def fpstate(xstate: bytes) -> bytes:
    """The XSAVE regset bytes as a signal frame's fpstate: cut to the size
    the kernel takes (frame_size), sw bytes filled in, MAGIC2 appended."""
    size, xfeatures = frame_size(xstate)
    buf = bytearray(xstate[:size])
    buf[_SW_BYTES:_SW_BYTES + 48] = struct.pack("<IIQI28x", FP_XSTATE_MAGIC1, size + 4,
                                                xfeatures, size)
    return bytes(buf) + struct.pack("<I", FP_XSTATE_MAGIC2)


def span(xstate_len: int) -> int:
    """Bytes a frame for an xstate of this size needs from its start (the
    fpstate is 64-byte aligned after it; worst case alignment included)."""
    return FRAME_SIZE + 63 + xstate_len + 4


def build(at: int, pretcode: int, regs, xstate: bytes, sigmask: int) -> bytes:
    """The frame to write at address ``at`` (16-byte aligned): its fpstate
    follows at the next 64-byte boundary. ``regs`` is a user_regs_struct."""
    if at % 16:
        raise ValueError("signal frame must be 16-byte aligned")
    fp_at = (at + FRAME_SIZE + 63) & ~63
    fp = fpstate(xstate)
    frame = bytearray(fp_at - at + len(fp))
    g = restarted(regs)
    struct.pack_into("<QQQ", frame, 0, pretcode, UC_FP_XSTATE | UC_SIGCONTEXT_SS
                     | UC_STRICT_RESTORE_SS, 0)
    # uc_stack stays zero: rt_sigreturn then leaves the sigaltstack as it is
    # (do_sigaltstack refuses a zero size, and that error is ignored)
    struct.pack_into("<18Q", frame, _MCONTEXT, *(g[n] for n in _GP))
    struct.pack_into("<4H", frame, _MCONTEXT + 144, regs.cs & 0xFFFF, 0, 0, regs.ss & 0xFFFF)
    struct.pack_into("<5Q", frame, _MCONTEXT + 152, 0, 0, sigmask & _U64, 0, fp_at)
    struct.pack_into("<Q", frame, _SIGMASK, sigmask & _U64)
    frame[fp_at - at:] = fp
    return bytes(frame)
