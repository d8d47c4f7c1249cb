"""Raw syscalls the C library does not wrap (or Python does not expose).

x86_64 numbers come from python-ptrace's syscall table where it has them;
newer ones are listed here with the header they come from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os

from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES as _NAMES

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long

# name -> number, x86_64 (arch/x86/entry/syscalls/syscall_64.tbl)
# (entries from 512 up in that table are the x32 ABI: skip them)
NR: dict[str, int] = {name: nr for nr, name in _NAMES.items() if nr < 512}
NR.update({
    "timerfd_create": 283,  # python-ptrace names it timerfd
    "userfaultfd": 323,
    "membarrier": 324,
    "copy_file_range": 326,
    "pkey_mprotect": 329,
    "statx": 332,
    "rseq": 334,
    "pidfd_send_signal": 424,
    "clone3": 435,
    "close_range": 436,
    "pidfd_open": 434,
    "pidfd_getfd": 438,
    "process_madvise": 440,
})
SYSCALL_NAME: dict[int, str] = {nr: name for name, nr in NR.items()}


def raw_syscall(nr: int, *args: int) -> int:
    """Call syscall ``nr``; return its result or raise OSError(errno)."""
    res = _syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    if res == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{SYSCALL_NAME.get(nr, nr)}: {os.strerror(e)}")
    return res


_fork_syscall = ctypes.PyDLL(libc._name, use_errno=True).syscall
_fork_syscall.restype = ctypes.c_long


def fork_syscall(nr: int, *args: int) -> int:
    """A syscall that forks this process (clone3 with set_tid), made as
    os.fork makes fork: holding the GIL (a ctypes call through CDLL lets
    it go, and a child forked while another thread of the engine had
    taken it would wait for it forever), between PyOS_BeforeFork and
    PyOS_AfterFork_Parent/Child. Returns 0 in the child, else the child's
    PID; raises OSError(errno)."""
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    res = _fork_syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    e = ctypes.get_errno()
    if res == 0:
        api.PyOS_AfterFork_Child()
        return 0
    api.PyOS_AfterFork_Parent()
    if res == -1:
        raise OSError(e, f"{SYSCALL_NAME.get(nr, nr)}: {os.strerror(e)}")
    return res


def pidfd_open(pid: int, flags: int = 0) -> int:
    return raw_syscall(NR["pidfd_open"], pid, flags)


def pidfd_getfd(pidfd: int, targetfd: int, flags: int = 0) -> int:
    """Duplicate fd ``targetfd`` of the process behind ``pidfd`` into ours."""
    return raw_syscall(NR["pidfd_getfd"], pidfd, targetfd, flags)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    raw_syscall(NR["tgkill"], tgid, tid, sig)


class iovec(ctypes.Structure):  # include/uapi/linux/uio.h
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class Py_buffer(ctypes.Structure):  # Include/pybuffer.h
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(Py_buffer), ctypes.c_int]
_ReleaseBuffer = ctypes.pythonapi.PyBuffer_Release
_ReleaseBuffer.argtypes = [ctypes.POINTER(Py_buffer)]


def _vm_rw(nr: int, pid: int, local, remote_addr: int) -> int:
    """process_vm_readv/writev of one contiguous buffer. The buffer is
    pinned with PyObject_GetBuffer, so read-only ones (bytes) work for
    writev without a copy."""
    view = Py_buffer()
    _GetBuffer(local, ctypes.byref(view), 1 if nr == NR["process_vm_readv"] else 0)
    try:
        liov = iovec(view.buf, view.len)
        riov = iovec(remote_addr, view.len)
        return raw_syscall(nr, pid, ctypes.addressof(liov), 1, ctypes.addressof(riov), 1, 0)
    finally:
        _ReleaseBuffer(ctypes.byref(view))


def process_vm_readv(pid: int, buf, remote_addr: int) -> int:
    """Read len(buf) bytes of ``pid`` at ``remote_addr`` into ``buf`` (writable)."""
    return _vm_rw(NR["process_vm_readv"], pid, buf, remote_addr)


def process_vm_writev(pid: int, buf, remote_addr: int) -> int:
    """Write ``buf`` (any contiguous buffer, bytes too) into ``pid`` at ``remote_addr``."""
    return _vm_rw(NR["process_vm_writev"], pid, buf, remote_addr)


IOV_MAX = 1024


def process_vm_readv_scatter(pid: int, buf, remote) -> int:
    """Read many remote ranges of ``pid`` into ``buf`` back to back in one
    call. ``remote`` is an ``array('Q')`` of (address, length) pairs (the
    layout of ``struct iovec[]``), at most IOV_MAX pairs. Returns the bytes
    read: less than asked when a range is not readable (e.g. PROT_NONE)."""
    mv = memoryview(buf)
    local = (ctypes.c_char * len(mv)).from_buffer(mv)
    liov = iovec(ctypes.addressof(local), len(mv))
    addr, n = remote.buffer_info()
    return raw_syscall(NR["process_vm_readv"], pid, ctypes.addressof(liov), 1, addr, n // 2, 0)


class clone_args(ctypes.Structure):  # include/uapi/linux/sched.h (CLONE_ARGS_SIZE_VER2)
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("pidfd", ctypes.c_uint64),
        ("child_tid", ctypes.c_uint64),
        ("parent_tid", ctypes.c_uint64),
        ("exit_signal", ctypes.c_uint64),
        ("stack", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("tls", ctypes.c_uint64),
        ("set_tid", ctypes.c_uint64),
        ("set_tid_size", ctypes.c_uint64),
        ("cgroup", ctypes.c_uint64),
    ]


ENOSYS = _errno.ENOSYS
