"""ptrace regsets, sigmask, siginfo, rseq configuration, process_vm_* and
pidfd bindings against real threads."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time

import pytest

from checkpoint.freezer import freeze
from checkpoint.kernel import ptrace as pt
from checkpoint.kernel.syscalls import (pidfd_getfd, pidfd_open, process_vm_readv,
                                        process_vm_writev)
from conftest import build_target


@pytest.fixture
def busy(spawn):
    t = spawn([build_target("busy_threads")])
    t.expect("READY")
    time.sleep(0.05)
    return t


def test_regsets_match_getregs_and_roundtrip(busy):
    with freeze(busy.pid) as proc:
        for tid in proc.tids:
            regs = pt.getregs(tid)
            prstatus = pt.getregset(tid, pt.NT_PRSTATUS)
            assert prstatus == bytes(regs)
            fp = pt.getregset(tid, pt.NT_PRFPREG)
            assert len(fp) == 512  # struct user_fpregs_struct (FXSAVE area)
            xs = pt.getregset(tid, pt.NT_X86_XSTATE)
            assert len(xs) >= 576 and xs[:160] == fp[:160]  # legacy area shared
            pt.setregset(tid, pt.NT_X86_XSTATE, xs)
            assert pt.getregset(tid, pt.NT_X86_XSTATE)[:576] == xs[:576]
            pt.setregs(tid, regs)
            assert bytes(pt.getregs(tid)) == bytes(regs)


def test_sigmask_and_rseq(busy):
    with freeze(busy.pid) as proc:
        masks = {tid: pt.getsigmask(tid) for tid in proc.tids}
        rt_bit = 1 << (signal.SIGRTMIN - 1)
        assert not masks[busy.pid] & rt_bit  # main takes SIGRTMIN
        assert all(m & rt_bit for t, m in masks.items() if t != busy.pid)
        tid = proc.tids[1]
        pt.setsigmask(tid, masks[tid] | 1 << (signal.SIGUSR2 - 1))
        assert pt.getsigmask(tid) == masks[tid] | 1 << (signal.SIGUSR2 - 1)
        pt.setsigmask(tid, masks[tid])
        for tid in proc.tids:
            cfg = pt.get_rseq_configuration(tid)
            # glibc >= 2.35 registers rseq in every thread (32 bytes, RSEQ_SIG)
            assert cfg.pointer != 0 and cfg.size >= 20 and cfg.signature == 0x53053053


def test_peeksiginfo_sees_queued_signals(busy):
    with freeze(busy.pid) as proc:
        for _ in range(3):
            os.kill(busy.pid, signal.SIGRTMIN)
        shared = pt.peeksiginfo(proc.pid, shared=True)
        assert len(shared) == 3
        assert all(struct.unpack_from("<i", s)[0] == signal.SIGRTMIN for s in shared)
        assert pt.peeksiginfo(proc.pid, shared=False) == []


def test_process_vm_rw_and_pidfd_getfd():
    data = ctypes.create_string_buffer(b"hello world", 64)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    try:
        buf = bytearray(11)
        assert process_vm_readv(child, buf, ctypes.addressof(data)) == 11
        assert bytes(buf) == b"hello world"
        assert process_vm_writev(child, bytearray(b"HELLO"), ctypes.addressof(data)) == 5
        assert process_vm_readv(child, buf, ctypes.addressof(data)) == 11
        assert bytes(buf) == b"HELLO world" and data.value == b"hello world"
        pidfd = pidfd_open(child)
        fd = pidfd_getfd(pidfd, w)
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        os.close(fd)
        os.close(pidfd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(r)
        os.close(w)
