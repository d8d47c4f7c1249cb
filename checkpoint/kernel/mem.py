"""/proc/PID/mem: read and write any mapping of a traced process (even
PROT_NONE and read-only ones: the kernel forces access for a ptracer)."""

from __future__ import annotations

import os

from ..errors import TargetError, TargetExited


class ProcMem:
    """/proc/PID/mem opened once: reads and writes any mapping (even PROT_NONE
    and read-only ones, as the kernel forces access for a ptracer)."""

    def __init__(self, pid: int, writable: bool = True):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem",
                              (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TargetExited(f"process {pid} exited", pid) from None

    def read(self, addr: int, size: int) -> bytes:
        data = os.pread(self.fd, size, addr)
        if len(data) != size:
            raise TargetError(f"short read of {size} bytes at {addr:#x} in process {self.pid}",
                                 self.pid)
        return data

    def write(self, addr: int, data) -> None:
        n = os.pwrite(self.fd, data, addr)
        if n != len(data):
            raise TargetError(f"short write at {addr:#x} in process {self.pid}", self.pid)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
