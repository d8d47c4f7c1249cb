"""File locks held by the process (CRIU's file-lock.c): flock, POSIX
(fcntl F_SETLK: owned by the process) and OFD (F_OFD_SETLK: owned by the
open file description).

dump: the "lock:" lines of /proc/PID/fdinfo/N (fs/locks.c shows each lock
under the fd of the description it was taken through), cross-checked
against /proc/locks: a POSIX lock of the process that no fd shows is
refused. Without --file-locks a process holding any lock is refused,
naming the fd and the lock (the locks are let go when the process dies at
the dump's end, so another process may take them before the restore:
accepting that is what the option says). Leases are refused.

restore: once every fd is placed, before the process runs, each lock is
taken again, without waiting (F_SETLK, F_OFD_SETLK, flock LOCK_NB), through
its fd; one another process took meanwhile fails the restore, naming it."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ...errors import RestoreError, UnsupportedObject
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, refuse

F_OFD_SETLK = 37
OFFSET_MAX = (1 << 63) - 1
KINDS = {"POSIX": "posix", "OFDLCK": "ofd", "FLOCK": "flock"}
NAMES = {"posix": "POSIX", "ofd": "OFD", "flock": "flock"}


def parse_lock(text: str) -> tuple[str, bool, int, int | None, int, str] | None:
    """One fdinfo/"proc/locks" lock line -> (kind, write, start, end or None
    for EOF, pid, "MAJ:MIN:INO"); kind is "posix"/"ofd"/"flock" or the
    kernel's word (LEASE, DELEG, ACCESS...); None for a blocked waiter."""
    f = text.split()
    if len(f) < 8 or "->" in f:
        return None
    kind = KINDS.get(f[1], f[1])
    # "N: POSIX  ADVISORY  WRITE pid dev:ino start end"; a lease has
    # "LEASE  ACTIVE    WRITE ..." (the same columns)
    write = f[3] == "WRITE"
    end = None if f[7] == "EOF" else int(f[7])
    return kind, write, int(f[6]), end, int(f[4]), f[5]


def describe(lk) -> str:
    span = f"bytes {lk.start}-{'EOF' if not lk.HasField('end') else lk.end}"
    if lk.kind == "flock":
        return f"an flock {'exclusive' if lk.write else 'shared'} lock"
    return f"a {NAMES.get(lk.kind, lk.kind)} {'write' if lk.write else 'read'} lock on {span}"


def claims(p: Probe) -> bool:
    return not p.e.HasField("dup_of")  # a dup shows the same locks: taken once


def dump(ctx: DumpCtx, p: Probe | None) -> None:
    """Per fd (``p``): its locks into ``p.e.locks``; at the end (``p`` None):
    the /proc/locks cross-check."""
    if p is None:
        return _cross_check(ctx)
    text = ctx.fdinfo(p.fd)
    for line in text.splitlines():
        if not line.startswith("lock:"):
            continue
        got = parse_lock(line[len("lock:"):])
        if got is None:
            continue
        kind, write, start, end, _pid, _ino = got
        if kind not in NAMES:  # a lease: the fd is left to the restore side, or refused
            p.e.ClearField("locks")
            refuse(p.e, "lease", f"a file holding a {kind.lower()}", "file leases",
                   ctx.external, why=f" ({line.split(':', 1)[1].strip()})")
            return
        lk = p.e.locks.add(kind=kind, write=write, start=start)
        if end is not None:
            lk.end = end
        if not ctx.file_locks:
            raise UnsupportedObject(f"fd {p.fd} ({p.link}) holds {describe(lk)}: pass "
                                    "--file-locks to dump and restore file locks")


def _cross_check(ctx: DumpCtx) -> None:
    shown = set()
    for e in ctx.entries.values():
        for lk in e.locks:
            if lk.kind == "posix":
                shown.add((e.inode, lk.start, lk.end if lk.HasField("end") else None, lk.write))
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return  # no /proc/locks (CONFIG_FILE_LOCKING off): no locks either
    for line in lines:
        got = parse_lock(line)
        if got is None:
            continue
        kind, write, start, end, pid, ident = got
        if kind != "posix" or pid != ctx.pid:
            continue
        ino = int(ident.rsplit(":", 1)[1])
        if (ino, start, end, write) not in shown:
            raise UnsupportedObject(
                f"process {ctx.pid} holds a POSIX {'write' if write else 'read'} lock on "
                f"inode {ident} bytes {start}-{'EOF' if end is None else end} that none of "
                "its dumped fds shows; it cannot be restored")


def finish(R: RestoreCore, it: Item) -> None:
    for lk in it.e.locks:
        if lk.kind == "flock":
            res = R.r.syscall("flock", it.fd, (fcntl.LOCK_EX if lk.write else fcntl.LOCK_SH)
                              | fcntl.LOCK_NB)
        elif lk.kind in ("posix", "ofd"):
            length = 0 if not lk.HasField("end") or lk.end >= OFFSET_MAX else \
                lk.end - lk.start + 1
            if lk.start > OFFSET_MAX or length < 0:
                raise R.fail(it, f"image field lock: start {lk.start}, end {lk.end}")
            # struct flock: short l_type, l_whence; off_t l_start, l_len; pid_t l_pid
            raw = struct.pack("<hh4xqqi4x", fcntl.F_WRLCK if lk.write else fcntl.F_RDLCK,
                              os.SEEK_SET, lk.start, length, 0)
            R.r.write(R.r.scratch, raw)
            cmd = fcntl.F_SETLK if lk.kind == "posix" else F_OFD_SETLK
            res = R.r.syscall("fcntl", it.fd, cmd, R.r.scratch)
        else:
            raise R.fail(it, f"image field lock: unknown kind {lk.kind!r}")
        if res in (-errno.EAGAIN, -errno.EACCES):
            raise RestoreError(f"fd {it.fd} ({it.e.path}): cannot take back {describe(lk)}:"
                               " another process holds a conflicting lock (it took it after"
                               " the dump let it go)")
        if res < 0:
            raise R.fail(it, f"cannot take back {describe(lk)}: {os.strerror(-res)}")


KIND = FdKind("file locks", (), claims, dump, finish=finish)
