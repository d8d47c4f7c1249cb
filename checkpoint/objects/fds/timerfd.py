"""timerfd (CRIU's timerfd.c): clock, flags, settings and unread expirations.

dump: fdinfo (fs/timerfd.c show_fdinfo: clockid, ticks, settime flags,
it_value left, it_interval) and the timer's clock at that moment, so the
next expiry is known as a time on its clock. A periodic timer that expired
and was not read yet has its expirations counted by the kernel only on
read (the timer is forwarded then): the dump reads them through its own
copy of the fd and puts the count back at once (TFD_IOC_SET_TICKS), which
is what the program would have read.

restore: timerfd_create with the clock and flags, timerfd_settime at the
dumped next expiry as an absolute time on its clock (CLOCK_REALTIME always;
CLOCK_MONOTONIC/BOOTTIME when restored on the same boot, else the time that
was left, counted from the restore); a timer that expired meanwhile counts
the expirations it missed (one, plus one per whole interval since) and, if
periodic, is armed at its next period: it fires after restore as if the
process had run on. The unread count goes back with TFD_IOC_SET_TICKS
(CONFIG_CHECKPOINT_RESTORE)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import struct
import time

from ...errors import UnsupportedObject
from ...images.pb import files_pb2
from .base import DumpCtx, FdKind, Item, Probe, RestoreCore, fdinfo_fields, read_boot_id

TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET = 1, 2
TFD_IOC_SET_TICKS = 0x40085400  # _IOW('T', 0, u64)
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME = 0, 1, 7
CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM = 8, 9
WALL_CLOCKS = (CLOCK_REALTIME, CLOCK_REALTIME_ALARM)
CLOCK_NAMES = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME",
               8: "CLOCK_REALTIME_ALARM", 9: "CLOCK_BOOTTIME_ALARM"}
NS = 1_000_000_000


def _pair(text: str) -> int:
    m = re.match(r"\((-?\d+),\s*(-?\d+)\)", text)
    return int(m.group(1)) * NS + int(m.group(2)) if m else 0


def clock_ns(clockid: int) -> int:
    base = {CLOCK_REALTIME_ALARM: CLOCK_REALTIME, CLOCK_BOOTTIME_ALARM: CLOCK_BOOTTIME}
    return time.clock_gettime_ns(base.get(clockid, clockid))


def _parse(text: str) -> files_pb2.TimerfdState:
    f = fdinfo_fields(text)
    return files_pb2.TimerfdState(
        clockid=int(f.get("clockid", "0")), ticks=int(f.get("ticks", "0")),
        settime_flags=int(f.get("settime flags", "0"), 8),
        value_ns=_pair(f.get("it_value", "")), interval_ns=_pair(f.get("it_interval", "")))


_set_ticks_ok: bool | None = None


def set_ticks_works() -> bool:
    """TFD_IOC_SET_TICKS exists here (tried on a timerfd of our own)."""
    global _set_ticks_ok
    if _set_ticks_ok is None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.timerfd_create(CLOCK_MONOTONIC, os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TFD_IOC_SET_TICKS, struct.pack("<Q", 1))  # 0 is EINVAL
            _set_ticks_ok = True
        except OSError:
            _set_ticks_ok = False
        finally:
            os.close(fd)
    return _set_ticks_ok


def dump(ctx: DumpCtx, p: Probe):
    e = p.e
    e.type = files_pb2.FD_TIMERFD
    t = _parse(ctx.fdinfo(p.fd))
    if t.ticks and t.interval_ns:
        # expired, periodic, unread: the kernel counts the periods missed on read
        if not set_ticks_works():
            raise UnsupportedObject(
                f"fd {p.fd} is a timerfd ({p.link}) with unread expirations: counting them"
                " needs TFD_IOC_SET_TICKS (CONFIG_CHECKPOINT_RESTORE), which this kernel"
                " lacks")
        own = ctx.getfd(p.fd)
        try:
            fl = fcntl.fcntl(own, fcntl.F_GETFL)
            fcntl.fcntl(own, fcntl.F_SETFL, fl | os.O_NONBLOCK)
            try:
                n = struct.unpack("<Q", os.read(own, 8))[0]
            except BlockingIOError:
                n = 0
            finally:
                fcntl.fcntl(own, fcntl.F_SETFL, fl)
            fcntl.ioctl(own, TFD_IOC_SET_TICKS, struct.pack("<Q", n))  # as it was
        finally:
            os.close(own)
        t = _parse(ctx.fdinfo(p.fd))
        t.ticks = n
    t.boot_id = read_boot_id()
    if t.value_ns:
        t.expires_ns = clock_ns(t.clockid) + t.value_ns
    e.timerfd.CopyFrom(t)
    return e


def plan(t: files_pb2.TimerfdState, same_boot: bool, now: int) -> tuple[int, int, int]:
    """(absolute expiry to arm at or 0, interval, ticks) for a restore at ``now``
    on the timer's clock."""
    if not t.value_ns:
        return 0, t.interval_ns, t.ticks
    if t.clockid in WALL_CLOCKS or same_boot:
        at = t.expires_ns
    else:  # another boot: the monotonic clocks started again; the time left, from now
        at = now + t.value_ns
    ticks = t.ticks
    if at <= now:
        missed = 1 + ((now - at) // t.interval_ns if t.interval_ns else 0)
        ticks += missed
        at = at + missed * t.interval_ns if t.interval_ns else 0
    return at, t.interval_ns, ticks


def restore(R: RestoreCore, it: Item) -> None:
    t = it.e.timerfd
    if t.clockid not in CLOCK_NAMES:
        raise R.fail(it, f"image field timerfd.clockid: {t.clockid}")
    flags = os.O_CLOEXEC | (it.e.flags & os.O_NONBLOCK)
    fd = R.fresh(R.call("timerfd_create", t.clockid, flags, it=it))
    R.setfl(fd, it)
    R.place(fd, it)


def finish(R: RestoreCore, it: Item) -> None:
    """Armed as late as possible: the last steps before the process runs."""
    if it.dup_of is not None:
        return
    t = it.e.timerfd
    at, interval, ticks = plan(t, t.boot_id == R.boot_id(), clock_ns(t.clockid))
    if at:
        raw = struct.pack("<qqqq", interval // NS, interval % NS, at // NS, at % NS)
        R.r.write(R.r.scratch, raw)
        flags = TFD_TIMER_ABSTIME | (t.settime_flags & TFD_TIMER_CANCEL_ON_SET)
        res = R.r.syscall("timerfd_settime", it.fd, flags, R.r.scratch, 0)
        if res < 0:
            raise R.fail(it, f"timerfd_settime ({CLOCK_NAMES[t.clockid]}) failed:"
                             f" {os.strerror(-res)}")
    if ticks:
        R.r.write(R.r.scratch, struct.pack("<Q", ticks))
        res = R.r.syscall("ioctl", it.fd, TFD_IOC_SET_TICKS, R.r.scratch)
        if res == -errno.ENOTTY:
            raise R.fail(it, f"cannot give back its {ticks} unread expirations:"
                             " TFD_IOC_SET_TICKS is missing (CONFIG_CHECKPOINT_RESTORE)")
        if res < 0:
            raise R.fail(it, f"TFD_IOC_SET_TICKS failed: {os.strerror(-res)}")


KIND = FdKind("timerfd", (files_pb2.FD_TIMERFD,), lambda p: p.kind == "[timerfd]" or
              p.kind == "timerfd", dump, restore, finish=finish)
