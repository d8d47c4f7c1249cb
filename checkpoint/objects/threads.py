"""Threads: registers, FPU/AVX state, signal mask, pending signals, rseq,
sigaltstack, clear_child_tid and robust list of every thread."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ..errors import CheckpointError, RestoreError
from ..images.pb import core_pb2
from ..inject import Injector
from ..kernel import procfs
from ..kernel import ptrace as pt
from ..kernel.syscalls import NR, raw_syscall
from . import sched

PR_GET_TID_ADDRESS = 40
PR_GET_NO_NEW_PRIVS = 39
STACK_T = struct.Struct("<QiiQ")  # ss_sp, ss_flags, (pad), ss_size

# <linux/ptrace.h>, <linux/seccomp.h>
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D
SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 0, 1, 2
BPF_MAXINSNS = 4096
SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516


def get_robust_list(tid: int) -> tuple[int, int]:
    head, length = ctypes.c_uint64(), ctypes.c_uint64()
    raw_syscall(NR["get_robust_list"], tid, ctypes.addressof(head), ctypes.addressof(length))
    return head.value, length.value


def seccomp_filters(tid: int) -> list[tuple[bytes, int]]:
    """Every seccomp filter of the stopped thread ``tid``, oldest first, as
    (struct sock_filter[] bytes, SECCOMP_FILTER_FLAG_* the kernel reports).
    Needs CAP_SYS_ADMIN (the engine is root) and a tracer not in seccomp."""
    out: list[tuple[bytes, int]] = []
    index = 0
    while True:
        try:
            n = pt._call(PTRACE_SECCOMP_GET_FILTER, tid, index, 0)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                break
            raise CheckpointError(f"cannot read seccomp filter {index} of thread {tid} "
                                  f"(PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN): "
                                  f"{os.strerror(exc.errno)}") from None
        buf = ctypes.create_string_buffer(n * SOCK_FILTER_SIZE)
        got = pt._call(PTRACE_SECCOMP_GET_FILTER, tid, index, ctypes.addressof(buf))
        meta = (ctypes.c_uint64 * 2)(index, 0)  # struct seccomp_metadata {filter_off, flags}
        try:
            pt._call(PTRACE_SECCOMP_GET_METADATA, tid, ctypes.sizeof(meta),
                     ctypes.addressof(meta))
            flags = meta[1]
        except OSError:
            flags = 0
        out.append((buf.raw[:got * SOCK_FILTER_SIZE], flags))
        index += 1
    return out


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
    core.no_new_privs = bool(remote.call("prctl", PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
    status = procfs.read_status(pid, tid)
    core.seccomp_mode = int(status.raw.get("Seccomp", "0"))
    sched.dump_sched(core, tid)
    if core.seccomp_mode == SECCOMP_MODE_FILTER:
        for insns, flags in seccomp_filters(tid):
            core.seccomp_filters.add(insns=insns, flags=flags)
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


# --------------------------------------------------------------------------
# seccomp on restore

SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_RET_USER_NOTIF = 0x7FC0_0000
SECCOMP_RET_ACTION_FULL = 0xFFFF_0000
BPF_RET_K = 0x06  # BPF_RET | BPF_K


def check_seccomp(core: core_pb2.CoreEntry) -> None:
    """Refuse by name, before anything starts, a seccomp state that cannot
    be restored exactly (or is not one)."""
    def bad(what: str):
        raise RestoreError(f"thread {core.tid}: seccomp {what}; refusing to restore")

    mode, filters = core.seccomp_mode, core.seccomp_filters
    if mode not in (SECCOMP_MODE_DISABLED, SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER):
        bad(f"mode {mode} is none of 0 (disabled), 1 (strict), 2 (filter)")
    if (mode == SECCOMP_MODE_FILTER) != bool(filters):
        bad(f"mode {mode} with {len(filters)} filters")
    for i, f in enumerate(filters):
        n, rest = divmod(len(f.insns), SOCK_FILTER_SIZE)
        if rest or not 1 <= n <= BPF_MAXINSNS:
            bad(f"filter {i} is {len(f.insns)} bytes, not 1..{BPF_MAXINSNS} instructions")
        if f.flags & ~SECCOMP_FILTER_FLAG_LOG:
            bad(f"filter {i} has flags {f.flags:#x}: only SECCOMP_FILTER_FLAG_LOG can be "
                "restored")
        for j in range(n):
            code, _, _, k = struct.unpack_from("<HBBI", f.insns, j * SOCK_FILTER_SIZE)
            if code == BPF_RET_K and k & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_USER_NOTIF:
                bad(f"filter {i} returns SECCOMP_RET_USER_NOTIF (instruction {j}): its "
                    "listener is not restored, so user-notification filters are refused")


def restore_seccomp(r: Injector, core: core_pb2.CoreEntry) -> None:
    """Install the thread's seccomp state: strict mode, or every filter in
    the order it was installed (oldest first), each with its flag. The
    restorer's tracer option PTRACE_O_SUSPEND_SECCOMP keeps them from
    acting on its own later calls; they act once the thread is released."""
    if core.seccomp_mode == SECCOMP_MODE_STRICT:
        res = r.syscall("seccomp", SECCOMP_SET_MODE_STRICT, 0, 0)
        if res < 0:
            raise RestoreError(f"thread {core.tid}: seccomp strict mode: {os.strerror(-res)}")
        return
    if core.seccomp_mode != SECCOMP_MODE_FILTER:
        return
    size = 16 + max(len(f.insns) for f in core.seccomp_filters)
    size = (size + procfs.PAGE_SIZE - 1) // procfs.PAGE_SIZE * procfs.PAGE_SIZE
    buf = r.call("mmap", 0, size, 3, 0x22, (1 << 64) - 1, 0)  # RW, MAP_PRIVATE|MAP_ANONYMOUS
    try:
        for i, f in enumerate(core.seccomp_filters):
            r.write(buf + 16, f.insns)
            r.write(buf, struct.pack("<HxxxxxxQ", len(f.insns) // SOCK_FILTER_SIZE, buf + 16))
            res = r.syscall("seccomp", SECCOMP_SET_MODE_FILTER, f.flags, buf)
            if res < 0:
                raise RestoreError(f"thread {core.tid}: installing seccomp filter {i} of "
                                   f"{len(core.seccomp_filters)}: {os.strerror(-res)}")
    finally:
        r.syscall("munmap", buf, size)
