"""Threads: registers, FPU/AVX state, signal mask, pending signals, rseq,
sigaltstack, clear_child_tid and robust list of every thread."""

from __future__ import annotations

import ctypes
import struct

from ..images.pb import core_pb2
from ..inject import Injector
from ..kernel import procfs
from ..kernel import ptrace as pt
from ..kernel.syscalls import NR, raw_syscall

PR_GET_TID_ADDRESS = 40
STACK_T = struct.Struct("<QiiQ")  # ss_sp, ss_flags, (pad), ss_size

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516


def get_robust_list(tid: int) -> tuple[int, int]:
    head, length = ctypes.c_uint64(), ctypes.c_uint64()
    raw_syscall(NR["get_robust_list"], tid, ctypes.addressof(head), ctypes.addressof(length))
    return head.value, length.value


def dump_thread(remote: Injector) -> core_pb2.CoreEntry:
    """State of the thread ``remote`` is injected into (frozen). The general
    registers are the ones the thread had at the freeze (the Injector's
    saved copy), not the injector's."""
    tid, pid = remote.tid, remote.proc.pid
    regs = remote.saved_regs
    core = core_pb2.CoreEntry(tid=tid, pid=pid, arch="x86_64")
    core.gpregs = bytes(regs)
    core.xstate = remote.saved_xstate
    core.sigmask = remote.saved_sigmask
    core.fs_base, core.gs_base = regs.fs_base, regs.gs_base
    rs = pt.get_rseq_configuration(tid)
    core.rseq.rseq_abi_pointer, core.rseq.rseq_abi_size = rs.pointer, rs.size
    core.rseq.signature = rs.signature
    scratch = remote.scratch
    remote.call("sigaltstack", 0, scratch)
    sp, flags, _, size = STACK_T.unpack(remote.read(scratch, STACK_T.size))
    core.sigaltstack.ss_sp, core.sigaltstack.ss_flags, core.sigaltstack.ss_size = sp, flags, size
    remote.call("prctl", PR_GET_TID_ADDRESS, scratch)
    core.clear_child_tid = remote.read_u64(scratch)
    core.robust_list, core.robust_list_len = get_robust_list(tid)
    core.comm = procfs.read_stat(pid, tid).comm
    core.pending_siginfo = b"".join(pt.peeksiginfo(tid, shared=False))
    orig, rax = regs.orig_rax, regs.rax - (1 << 64) if regs.rax >= 1 << 63 else regs.rax
    core.in_syscall = orig < 1 << 63
    core.syscall_nr = orig if core.in_syscall else -1
    core.syscall_ret = rax
    return core


def restart_fixup(regs: pt.user_regs_struct, restart_block: str = "eintr") -> None:
    """Apply by hand what the kernel would do to a thread leaving a syscall
    with -ERESTART*, for a *new* thread built from dumped registers (the
    kernel's restart state of the old thread is gone): -512..-514 re-issue
    the syscall; -516 (ERESTART_RESTARTBLOCK, its restart block lived in the
    old kernel task) becomes -EINTR, as CRIU does, or a re-issue of the
    original call. Then orig_rax = -1 so the kernel leaves the regs alone."""
    if regs.orig_rax < 1 << 63:
        err = (1 << 64) - regs.rax if regs.rax >= 1 << 63 else 0
        if err in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            regs.rip -= 2
            regs.rax = regs.orig_rax
        elif err == ERESTART_RESTARTBLOCK:
            if restart_block == "reissue":
                regs.rip -= 2
                regs.rax = regs.orig_rax
            else:
                regs.rax = (1 << 64) - 4  # -EINTR
    regs.orig_rax = (1 << 64) - 1
